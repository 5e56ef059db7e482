// AVX-512 register micro-kernels for the batched (packed-X) paths. The drivers in avx2.cpp call
// them for the 16-column-aligned part of each 64-column chunk when the CPU has AVX-512F and the
// ISA is "avx512"; everything else (packing, epilogue, SpMV) stays AVX2. The attention driver calls
// attention_task_512 where AVX-512 runs whole (not split in halves) and the head size allows.
#pragma once

#include <cstdint>

#include "common.h"

namespace se {

// One CSR row, V16 (1..4) vectors of 16 batch columns:
// out[0 : 16·V16] = Σ_{k in [k0,k1)} val[k] · xt[col[k] · np + (0 : 16·V16)].
// col: (nnz,) int32 or uint16; val: (nnz,) WT; xt: packed X panel (I, np) fp32, pre-offset to the chunk;
// out: 64-byte aligned fp32.
template <typename WT, typename IT>
void csr_row_chunk_512(int v16, const IT* col, const WT* val, int32_t k0, int32_t k1,
                       const float* xt, int64_t np, float* out);

// One row's entries [k0, k1) of one input panel: out[0 : 16·V16] (+)= Σ val[k] · xt[col[k]·np + ...];
// adds to out when accumulate (partial sums of earlier panels), else overwrites it.
template <typename WT, typename IT>
void csr_row_acc_512(int v16, const IT* col, const WT* val, int32_t k0, int32_t k1, const float* xt,
                     int64_t np, float* out, bool accumulate);

// SELL-4 groups [g0, g1) of one panel: group g's 4 rows (lanes) rows[4g : 4g + 4] with len[g] entries
// each, slot (j, lane) at col/val[off[g] + 4·j + lane]; acc rows (row stride acc_stride floats)
// += Σ_j val · xt[col·np + (0 : 16·V16)].
template <typename WT>
void csr_groups_512(int v16, const int32_t* off, const int32_t* len, const int32_t* rows, const uint16_t* col,
                    const WT* val, int64_t g0, int64_t g1, const float* xt, int64_t np, float* acc,
                    int64_t acc_stride);

// Rows [r0, r0 + rb) (rb = 1..4) of one BSR block row, V16 (1..4) vectors of 16 batch columns:
// out[r][0 : 16·V16] = Σ_blocks Σ_c W[block][r0 + r][c] · xt[(bcol·C + c) · np + ...].
// val points at the values (nnzb, R, C); out row stride: out_stride floats.
template <typename WT>
void bsr_rows_chunk_512(int rb, int v16, const int32_t* bcol, const WT* val, int32_t k0, int32_t k1,
                        int64_t R, int64_t C, int64_t r0, const float* xt, int64_t np, float* out,
                        int64_t out_stride);

// NB (1..8) batch rows of row-major X (stride I) times block row [k0, k1) of R = 16 outputs, the
// blocks transposed to wt (nnzb, C, 16) fp32 (64-byte aligned): y[n][0 : 16] = act(· + bias[0 : 16])
// (bias may be null), row stride ldy.
void bsr_rows16_512(int nb, const float* wt, const int32_t* bcol, int32_t k0, int32_t k1, int64_t C,
                    const float* x, int64_t I, const float* bias, int act, float* y, int64_t ldy);

// Rows [r0, r1) (row stride ld floats, 64-byte aligned), the first nc columns (a multiple of 16), in
// place: v <- act(v + bias[row]) (bias may be null).
void bias_act_rows_512(float* h, int64_t ld, int64_t r0, int64_t r1, int64_t nc, const float* bias, int act);

// One (batch, head) of attention() on zmm registers (simd::attention_task): hs a multiple of 16.
void attention_task_512(const float* qkv, float* out, int64_t S, int64_t nh, int64_t hs, float scale, int64_t task);

}  // namespace se
