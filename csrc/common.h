// Shared pieces of the CPU kernels: weight element types, the fused epilogue, ISA selection,
// per-thread scratch memory and the work split across threads.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <type_traits>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace se {

// Weight value storage (values buffer element type); compute is always fp32.
enum WDType : int { W_F32 = 0, W_BF16 = 1, W_F16 = 2 };
// Fused epilogue applied to (x · Wᵀ + b).
enum Act : int { ACT_NONE = 0, ACT_RELU = 1, ACT_GELU = 2, ACT_GELU_TANH = 3 };
// Instruction set the kernels run with: plain C++, AVX2+FMA+F16C intrinsics, or the AVX2 kernels
// with AVX-512F micro-kernels for the batched paths.
enum Isa : int { ISA_PORTABLE = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

struct bf16_t { uint16_t bits; };
struct f16_t { uint16_t bits; };

inline float bits_to_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

inline float to_f32(float v) { return v; }
// bf16 is the top half of an fp32: widening is a 16-bit shift.
inline float to_f32(bf16_t v) { return bits_to_f32(uint32_t(v.bits) << 16); }
// IEEE binary16 -> binary32 without F16C (portable path and scalar tails).
inline float to_f32(f16_t v) {
  const uint32_t h = v.bits, sign = (h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, man = h & 0x3ffu;
  if (exp == 0) {                                   // zero or subnormal: man · 2^-24
    const float f = std::ldexp(float(man), -24);
    return sign ? -f : f;
  }
  if (exp == 31) return bits_to_f32(sign | 0x7f800000u | (man << 13));  // inf / nan
  return bits_to_f32(sign | ((exp + 112u) << 23) | (man << 13));
}

// f(WT{}) with WT the C++ type of a values buffer of dtype wdtype (float, bf16_t or f16_t).
template <typename F>
inline void with_wtype(int wdtype, F&& f) {
  switch (wdtype) {
    case W_BF16: return f(bf16_t{});
    case W_F16: return f(f16_t{});
    default: return f(float{});
  }
}

// Compile the functions between SE_TARGET_PUSH("isa,list") and SE_TARGET_POP for those ISA
// extensions (GCC: push_options + target; clang: attribute push), without -m flags for the file.
#define SE_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define SE_TARGET_PUSH(t) SE_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#define SE_TARGET_POP SE_PRAGMA(clang attribute pop)
#elif defined(__GNUC__)
#define SE_TARGET_PUSH(t) SE_PRAGMA(GCC push_options) SE_PRAGMA(GCC target(t))
#define SE_TARGET_POP SE_PRAGMA(GCC pop_options)
#else
#define SE_TARGET_PUSH(t)
#define SE_TARGET_POP
#endif

inline float activate(float v, int act) {
  switch (act) {
    case ACT_RELU: return v < 0.f ? 0.f : v;  // NaN stays NaN, as torch.relu
    case ACT_GELU: return 0.5f * v * (1.f + std::erf(v * 0.70710678118654752f));
    case ACT_GELU_TANH: {
      const float u = 0.79788456080286536f * (v + 0.044715f * v * v * v);
      return 0.5f * v * (1.f + std::tanh(u));
    }
    default: return v;
  }
}

// Currently selected ISA (set once at import from SPARSE_ENGINE_ISA and the CPU's features; tests
// may switch it between calls).
Isa current_isa();
bool cpu_has_avx2();
bool cpu_has_avx512();
void set_isa(Isa isa);
// Vector width (bits) of the batched fp32 CSR kernels now: 512 (zmm) only under ISA_AVX512 with the
// wide kernels selected, else 256 (the AVX2 kernels' ymm; also under ISA_AVX512 when narrow).
// Auto (0) picks 256 on AMD family 0x19 with AVX-512 (Zen 4), whose cores run each 512-bit operation
// as two 256-bit halves: there the ymm panel kernels were 1.05-1.2x the zmm ones on whole models
// (bench/results/cpu.md, "AVX-512 on AMD Zen 4"); elsewhere 512. SPARSE_ENGINE_CSR_BITS=256|512 or
// set_csr_bits(...) overrides it.
int csr_bits();
int auto_csr_bits();
bool avx512_split();  // AVX-512 executed as two 256-bit halves (AMD family 0x19, Zen 4)
void set_csr_bits(int bits);

// Per-thread reusable scratch, 64-byte aligned, so a call allocates nothing once warm.
// slot picks one of a few independent buffers (packed X, output tiles).
float* scratch(int slot, size_t n_floats);

inline int thread_id() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}
inline int team_size() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

// Threads worth using for a call whose single-thread time is about `seconds`: waking a team costs
// a few microseconds, so a layer of a few microseconds runs on the calling thread.
inline int pick_threads(int requested, double seconds) {
  if (requested < 1) requested = 1;
  return seconds < 4e-6 ? 1 : requested;
}
// Single-thread cost estimates (measured on the development machine, kernel log in
// bench/results/cpu.md): a gathered CSR entry ~0.3 ns; a streamed BSR value ~0.06 ns; a batched
// multiply-add lane ~0.02 ns (about 50 GFLOP/s).
inline double est_spmv_csr(double entries) { return entries * 0.3e-9; }
inline double est_spmv_bsr(double values) { return values * 0.06e-9; }
inline double est_spmm(double lanes) { return lanes * 0.02e-9; }

// Split rows [0, rows) into `parts` contiguous ranges of about equal cost, cost(row) = its stored
// entries + a fixed per-row overhead, with every boundary a multiple of `align` rows.
// ptr: (rows + 1,) int32 compressed-row pointers. Returns the begin row of part t.
inline int64_t split_begin(const int32_t* ptr, int64_t rows, int64_t align, int row_cost, int t,
                           int parts) {
  if (t <= 0) return 0;
  if (t >= parts) return rows;
  const double total = double(ptr[rows]) + double(row_cost) * double(rows);
  const double target = total * t / parts;
  int64_t lo = 0, hi = rows;  // first row r with cost(r) >= target
  while (lo < hi) {
    const int64_t mid = (lo + hi) / 2;
    if (double(ptr[mid]) + double(row_cost) * double(mid) < target) lo = mid + 1; else hi = mid;
  }
  int64_t r = (lo + align / 2) / align * align;
  return std::min(r, rows);
}

}  // namespace se
