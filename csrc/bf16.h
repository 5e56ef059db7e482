// bf16-compute BSR kernels: Intel AMX tiles (TDPBF16PS) and AVX512-BF16 (VDPBF16PS).
//
// Y (N, O) = act(X · Wᵀ + b) with W in BSR of R×C blocks, R <= 16, C even and <= 32 (the
// tile-friendly shape is 16×32: one block is exactly one 1 KiB AMX tile). X is bf16, or fp32 rounded
// to bf16 (round-to-nearest-even) once per call; products accumulate in fp32; Y is fp32 or bf16
// (LinearArgs::x_bf16 / y_bf16).
//
// The weight values are stored "VNNI-packed" (prepared once in Python, engine/cpu.py):
//   packed (nnzb, C/2, R, 2) bf16: packed[k][p][r][j] = W_block_k[r][2p + j]
// which is the layout TDPBF16PS wants for its B operand (C/2 rows of R fp32-sized pairs) and the
// one VDPBF16PS wants to multiply R outputs by one broadcast pair of X.
#pragma once

#include <cstdint>
#include <string>

#include "sparse_linear.h"

namespace se {

// Which bf16 kernel served the latest call (last_bf16_kernel): the BSR families by their ISA
// (the values of Bf16Isa), or the AVX512-BF16 CSR kernel.
enum Bf16Kernel : int { KERNEL_NONE = 0, KERNEL_BSR_AVX512 = 1, KERNEL_BSR_AMX = 2, KERNEL_CSR_AVX512 = 3,
                        KERNEL_ATTENTION_AMX = 4 };

// Which bf16 kernel family runs: none (the fp32-compute kernels take bf16 weights instead),
// AVX512-BF16 dot products, or AMX tiles.
enum Bf16Isa : int { BF16_NONE = 0, BF16_AVX512 = 1, BF16_AMX = 2 };

// CPU + OS support, checked once (cpuid, XGETBV; for AMX also the Linux permission request
// arch_prctl(ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)). reason: why not, empty when usable.
bool amx_usable(std::string* reason = nullptr);
bool avx512_bf16_usable(std::string* reason = nullptr);

Bf16Isa best_bf16_isa();
Bf16Isa current_bf16_isa();  // none while the fp32 ISA is forced below AVX-512
void set_bf16_isa(Bf16Isa isa);  // throws std::runtime_error when the CPU/OS lacks it
Bf16Kernel last_bf16_kernel();   // which kernel served the latest bsr/csr_linear_bf16 call

// a.values: the packed weight above; a.wdtype is ignored (bf16). Requires current_bf16_isa() !=
// BF16_NONE and the block shape above; the Python wrapper checks both.
void bsr_linear_bf16(const LinearArgs& a);

// Unstructured (CSR) weight on AVX512-BF16 (VDPBF16PS; also chosen while bf16 ISA is AMX: tiles
// need blocks). The entries of each row are paired (prepared once in Python, engine/cpu.py), an
// odd row padded with a zero weight on the column of its last entry (so the pad never reads an x
// the row does not already read):
//   a.crow   (O + 1,) int32 pair pointers: row o owns pairs [crow[o], crow[o + 1])
//   a.col16  (P, 2) uint16 each pair's input columns (k1, k2); needs I <= 65536
//   a.values (P, 2) bf16 each pair's weights (w1, w2): one 32-bit VDPBF16PS operand
// x: (N, I) bf16; y: (N, O) bf16 (a.x_bf16, a.y_bf16 must be set); a.col, a.wdtype unused.
// N = 1: 16 pairs per VDPBF16PS, the x pairs gathered (32-bit) from a zero-bordered copy of x.
// N = 2..8: x regrouped to 64-bit quads of batch values per column (1 or 2 groups of 4 rows);
// 8 pairs' quads gathered at once and interleaved, so 4 batch rows cost the gathers of one.
// N >= 9: X transposed once per call to (I, N) bf16 panels; each pair broadcast against rows
// k1, k2 of Xᵀ interleaved (VPUNPCK[LH]WD), 32 batch rows per pair of registers.
void csr_linear_bf16(const LinearArgs& a);

// Self-attention without a mask on AMX tiles: out (B·S, nh·hs) bf16 = softmax(Q Kᵀ · scale) V per
// (batch, head), Q, K, V read from qkv (B·S, 3·nh·hs) bf16 (each row: the heads' queries, then
// keys, then values), as the fp32 attention() reads them. Scores, softmax and accumulation in fp32,
// the softmax weights rounded to bf16 for P · V (as dense bf16 attention does). hs a multiple of
// 32; requires current_bf16_isa() == BF16_AMX.
void attention_amx(const uint16_t* qkv, uint16_t* out, int64_t B, int64_t S, int64_t nh, int64_t hs, float scale,
                   int nthreads);

}  // namespace se
