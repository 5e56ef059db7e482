// Sparse linear layers on the CPU: Y = act(X · Wᵀ + b) with W stored in CSR or BSR.
//
// Every buffer is a plain, C-contiguous host array (no torch C++ API). Units: element counts
// unless said; "rows" of W are output features, "columns" are input features.
#pragma once

#include <cstdint>

namespace se {

struct LinearArgs {
  float* y;              // (N, O) fp32 output, row-major; fully overwritten
  const float* x;        // (N, I) fp32 input, row-major
  int64_t n;             // N: batch rows
  int64_t in_features;   // I
  int64_t out_features;  // O
  // CSR: crow (O + 1,) int32 entry pointers; col (nnz,) int32 input-feature index, increasing
  //      within a row; values (nnz,) in wdtype.
  // BSR: crow (O/R + 1,) int32 block pointers; col (nnzb,) int32 block-column index (units of C
  //      input features), increasing within a block row; values (nnzb, R, C) row-major in wdtype.
  const int32_t* crow;
  const int32_t* col;
  // CSR only, optional: (nnz,) uint16 copy of col (valid when I <= 65536); used instead of col.
  const uint16_t* col16 = nullptr;
  const void* values;
  // CSR only, optional "panelled" copy for the batched AVX-512 path (prepared once in Python):
  // entries regrouped by input panel of panel_width features, then by row, so a panel of packed X
  // stays in L1 while every row adds that panel's entries.
  //   panel_seg: (P·O + 1,) int32, entries of row o in panel p are [seg[p·O + o], seg[p·O + o + 1])
  //   panel_col: (nnz,) uint16 input-feature index; panel_val: (nnz,) in wdtype
  const int32_t* panel_seg = nullptr;
  const uint16_t* panel_col = nullptr;
  const void* panel_val = nullptr;
  int64_t panel_width = 0;
  // CSR only, optional "grouped panels" (SELL-4 within each panel, rows sorted by length inside
  // 64-row windows): the batched AVX-512 kernel runs 4 rows at once, one loop per group.
  //   grp_off (P·G,) int32 first slot of group; grp_len (P·G,) int32 slots per row of the group;
  //   grp_rows (P·G·4,) int32 output row of each lane (rows >= O are padding);
  //   grp_col (slots,) uint16, grp_val (slots,) wdtype, slot (j, lane) at grp_off + 4·j + lane
  //   (padding slots hold value 0, column 0). G = O_pad / 4 groups per panel, O_pad = 64·ceil(O/64).
  const int32_t* grp_off = nullptr;
  const int32_t* grp_len = nullptr;
  const int32_t* grp_rows = nullptr;
  const uint16_t* grp_col = nullptr;
  const void* grp_val = nullptr;
  int wdtype;            // WDType: 0 fp32, 1 bf16, 2 fp16 (converted to fp32 in registers)
  int64_t block_r = 1;   // R (BSR only): output rows per block, divides O
  int64_t block_c = 1;   // C (BSR only): input columns per block, divides I
  const float* bias;     // (O,) fp32, or nullptr
  int act;               // Act: 0 none, 1 relu, 2 gelu (erf), 3 gelu_tanh
  int nthreads;          // OpenMP threads to use (the caller passes torch.get_num_threads())
  bool x_bf16 = false;   // bf16 kernels only (bf16.h): x points at (N, I) bf16, not fp32
  bool y_bf16 = false;   // bf16 kernels only: y points at (N, O) bf16, not fp32
  // fp32 BSR with R = 16 on AVX-512, optional: the values transposed to (nnzb, C, 16) fp32
  // (prepared once in Python, 64-byte aligned); when given, the batch-as-rows kernel runs.
  const float* blocks_t = nullptr;
  // bf16 BSR on AMX only, optional: y = LayerNorm(x · Wᵀ + b + residual) per row (biased variance,
  // in fp32; act must be none), residual (N, O) bf16, ln_gamma / ln_beta (O,) fp32 or nullptr.
  const uint16_t* residual = nullptr;
  const float* ln_gamma = nullptr;
  const float* ln_beta = nullptr;
  float ln_eps = 0.f;
};

// Inputs are trusted: the Python wrapper (engine/cpu.py) validated shapes, dtypes and indices.
void csr_linear(const LinearArgs& a);
void bsr_linear(const LinearArgs& a);

// Portable C++ versions (no intrinsics): the fallback on CPUs without AVX2/FMA/F16C.
void csr_linear_portable(const LinearArgs& a);
void bsr_linear_portable(const LinearArgs& a);

// AVX2 + FMA + F16C versions, compiled with function-level target options; call only when
// cpu_has_avx2().
void csr_linear_avx2(const LinearArgs& a);
void bsr_linear_avx2(const LinearArgs& a);

// y = act2(act1(x · W1ᵀ + b1) · W2ᵀ + b2) in one call: a1 (x, W1 in the panelled layout, b1, act1)
// and a2 (y, W2 in the panelled layout, b2, act2; its x unused), a1.out_features == a2.in_features,
// a1.n == a2.n > 0, one weight dtype. AVX2 or AVX-512 (then with n rounded up to 8 a multiple of 16).
void csr_pair(const LinearArgs& a1, const LinearArgs& a2);
void csr_pair_avx2(const LinearArgs& a1, const LinearArgs& a2);

// Self-attention without a mask: out (B·S, nh·hs) = softmax(Q Kᵀ · scale) V per (batch, head), Q, K, V
// read from qkv (B·S, 3·nh·hs) (each token's row: all heads' q, then k, then v). hs a multiple of 8.
void attention(const float* qkv, float* out, int64_t B, int64_t S, int64_t nh, int64_t hs, float scale, int nthreads);
void attention_avx2(const float* qkv, float* out, int64_t B, int64_t S, int64_t nh, int64_t hs, float scale,
                    int nthreads);

// y (N, H) = LayerNorm(h + r) per row · gamma + beta (each may be null), biased variance, computed in
// fp32; h, r, y all fp32 or all bf16 (bf16 = true; y rounded to nearest even); y may be h (in place).
// AVX2 or AVX-512.
void add_layer_norm(void* y, const void* h, const void* r, bool bf16, int64_t N, int64_t H, const float* gamma,
                    const float* beta, float eps, int nthreads);
void add_layer_norm_avx2(void* y, const void* h, const void* r, bool bf16, int64_t N, int64_t H, const float* gamma,
                         const float* beta, float eps, int nthreads);

}  // namespace se
