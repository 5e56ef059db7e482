// AVX2 + FMA + F16C kernels for CSR and BSR linear layers.
//
// Compiled with function-level target options (not -mavx2), so the module still loads on CPUs
// without AVX2; module.cpp only calls in here when the CPU has the features.
//
// Two regimes (and, for BSR with 16-row blocks on AVX-512 at larger batches, a third: bsr_rows_major):
//  * small batch (N < kSpmmMinN): memory-bound SpMV. Each weight is read once and multiplied with
//    the batch rows straight from X (CSR gathers X with vpgatherdd; BSR loads X contiguously).
//  * batch (N >= kSpmmMinN): X is packed once per call into Xt (I, Np), batch contiguous, so one
//    stored weight is broadcast and FMA'd against 8 batch columns at a time: no gathers, and up to
//    64 batch columns stay in registers per output row. Results go through a small (rows x 64) tile
//    that is transposed 8x8 in registers into Y (N, O) with the bias + activation epilogue fused.
#include "common.h"
#include "sparse_linear.h"

#if !(defined(__x86_64__) || defined(__i386__))
// Not x86: no intrinsics to compile; cpu_has_avx2() is false, so these are never chosen.
namespace se {
void csr_linear_avx2(const LinearArgs& a) { csr_linear_portable(a); }
void bsr_linear_avx2(const LinearArgs& a) { bsr_linear_portable(a); }
void csr_pair_avx2(const LinearArgs&, const LinearArgs&) {}  // never called: no panelled layout here
void attention_avx2(const float*, float*, int64_t, int64_t, int64_t, int64_t, float, int) {}  // never called
void add_layer_norm_avx2(void*, const void*, const void*, bool, int64_t, int64_t, const float*, const float*, float,
                        int) {}  // never called
}  // namespace se
#else

#include <immintrin.h>

#include "avx512.h"

SE_TARGET_PUSH("avx2,fma,f16c")

#include "simd_kernels.h"

namespace se {
namespace {

constexpr int64_t kSpmmMinN = 4;  // batch from which packing X transposed pays for itself
constexpr int kChunk = 64;        // batch columns per register pass: 8 ymm accumulators
constexpr int64_t kPanelBytes = 1 << 20;  // Xt panel (I x panel columns) kept near L2 size

// ---- loads of 8 weights / one scalar weight, converted to fp32 ----------------------------------
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const bf16_t* p) {
  const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}
inline __m256 load8(const f16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline float scalar(const float* p) { return *p; }
inline float scalar(const bf16_t* p) { return to_f32(*p); }
inline float scalar(const f16_t* p) { return _cvtsh_ss(p->bits); }

// 8-wide ymm traits for the shared micro-kernels (simd_kernels.h).
struct Avx2 {
  SE_SIMD_FP32_TRAITS(_mm256, __m256, 8)
  static __m256 round(__m256 v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static __m256 scale2(__m256 e, __m256 n) {  // 2^n built in the exponent field
    return _mm256_mul_ps(e, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n),
                                                                                   _mm256_set1_epi32(127)), 23)));
  }
  // 16 ymm registers: accumulator sets only while the chunk is narrow.
  static constexpr int csr_unroll(int v) { return v >= 4 ? 1 : (v >= 2 ? 2 : 4); }
  static constexpr int bsr_unroll(int rbv) { return rbv >= 4 ? 1 : (rbv >= 2 ? 2 : 4); }
  static constexpr int attention_rows = 4;  // query rows per block: 8 of the 16 ymm registers
  static __m256 exp_nonpositive(__m256 u) { return simd::exp_nonpositive<Avx2>(u); }
  static __m256 recip(__m256 d) { return _mm256_div_ps(_mm256_set1_ps(1.f), d); }
  static __m256 abs(__m256 v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }
  static __m256 select_neg(__m256 x, __m256 if_neg, __m256 if_not) { return _mm256_blendv_ps(if_not, if_neg, x); }
};

inline float hmax(__m256 v) {
  __m128 h = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  h = _mm_max_ps(h, _mm_movehl_ps(h, h));
  return _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
}

inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

inline void transpose8(__m256 r[8]) {
  const __m256 t0 = _mm256_unpacklo_ps(r[0], r[1]), t1 = _mm256_unpackhi_ps(r[0], r[1]);
  const __m256 t2 = _mm256_unpacklo_ps(r[2], r[3]), t3 = _mm256_unpackhi_ps(r[2], r[3]);
  const __m256 t4 = _mm256_unpacklo_ps(r[4], r[5]), t5 = _mm256_unpackhi_ps(r[4], r[5]);
  const __m256 t6 = _mm256_unpacklo_ps(r[6], r[7]), t7 = _mm256_unpackhi_ps(r[6], r[7]);
  const __m256 u0 = _mm256_shuffle_ps(t0, t2, 0x44), u1 = _mm256_shuffle_ps(t0, t2, 0xEE);
  const __m256 u2 = _mm256_shuffle_ps(t1, t3, 0x44), u3 = _mm256_shuffle_ps(t1, t3, 0xEE);
  const __m256 u4 = _mm256_shuffle_ps(t4, t6, 0x44), u5 = _mm256_shuffle_ps(t4, t6, 0xEE);
  const __m256 u6 = _mm256_shuffle_ps(t5, t7, 0x44), u7 = _mm256_shuffle_ps(t5, t7, 0xEE);
  r[0] = _mm256_permute2f128_ps(u0, u4, 0x20);
  r[1] = _mm256_permute2f128_ps(u1, u5, 0x20);
  r[2] = _mm256_permute2f128_ps(u2, u6, 0x20);
  r[3] = _mm256_permute2f128_ps(u3, u7, 0x20);
  r[4] = _mm256_permute2f128_ps(u0, u4, 0x31);
  r[5] = _mm256_permute2f128_ps(u1, u5, 0x31);
  r[6] = _mm256_permute2f128_ps(u2, u6, 0x31);
  r[7] = _mm256_permute2f128_ps(u3, u7, 0x31);
}

// ---- X packing ------------------------------------------------------------------------------------
// xt (I, np) <- x[n0 : n0 + np, :]ᵀ for input features [i0, i1); columns past N are zero so the
// kernels never branch on the batch tail. x: (N, I); np: multiple of 8.
void pack_xt(const float* x, int64_t N, int64_t I, int64_t n0, int64_t np, float* xt, int64_t i0,
             int64_t i1) {
  const int64_t nv = std::min<int64_t>(np, N - n0);  // valid columns in this panel
  int64_t i = i0;
  // 16 features (a whole 64-byte line of each x row) by 8 rows at a time, then 8 for the rest: the
  // row's line is used whole while it is in L1. Rows I·4 bytes apart share few L1 sets (I = 768: 4,
  // I = 3072: 1), so with 8 features per pass each line was fetched from L2 twice.
  for (const int64_t f : {16, 8})
    for (; i + f <= i1; i += f) {
      int64_t n = 0;
      for (; n + 8 <= nv; n += 8)
        for (int64_t h = 0; h < f; h += 8) {
          __m256 r[8];
          for (int j = 0; j < 8; ++j) r[j] = _mm256_loadu_ps(x + (n0 + n + j) * I + i + h);
          transpose8(r);
          for (int j = 0; j < 8; ++j) _mm256_storeu_ps(xt + (i + h + j) * np + n, r[j]);
        }
      for (; n < np; ++n)
        for (int64_t j = 0; j < f; ++j) xt[(i + j) * np + n] = n < nv ? x[(n0 + n) * I + i + j] : 0.f;
    }
  for (; i < i1; ++i)
    for (int64_t n = 0; n < np; ++n) xt[i * np + n] = n < nv ? x[(n0 + n) * I + i] : 0.f;
}

// Batch columns per Xt panel: the panel (I x columns) stays near kPanelBytes (L2), whole chunks.
inline int64_t panel_columns(int64_t I, int64_t n_pad) {
  const int64_t cols = kPanelBytes / (4 * std::max<int64_t>(I, 1)) / kChunk * kChunk;
  return std::min(std::max<int64_t>(kChunk, cols), n_pad);
}

// Floats of the packed-X scratch for a panel of `panel` columns over I inputs, room for the
// chunk-major packing (whole kChunk-column chunks) as for the (I, panel) one.
inline size_t packed_x_floats(int64_t I, int64_t panel) {
  return size_t(std::max<int64_t>(I, 1) * ((panel + kChunk - 1) / kChunk * kChunk));
}

// Called by every thread t of a team of nt for each panel: waits until the team is done with the
// previous panel, packs this thread's 8-aligned share of the input features, waits for the rest.
// chunk_major: each kChunk columns of the panel packed apart, (I, kChunk) at xt + c0·I, so a
// chunk's rows are contiguous 256-byte lines (in the (I, np) layout a chunk's rows sit np floats
// apart, a power-of-two stride at np = 128 that maps them onto half of L1's sets).
void pack_panel(const float* x, int64_t N, int64_t I, int64_t p0, int64_t np, float* xt, int t, int nt,
                bool chunk_major = false) {
  const int64_t i0 = std::min(I, (I * t / nt + 7) / 8 * 8), i1 = std::min(I, (I * (t + 1) / nt + 7) / 8 * 8);
  if (p0) {
#pragma omp barrier
  }
  if (chunk_major)
    for (int64_t c0 = 0; c0 < np; c0 += kChunk) pack_xt(x, N, I, p0 + c0, kChunk, xt + c0 * I, i0, i1);
  else
    pack_xt(x, N, I, p0, np, xt, i0, i1);
#pragma omp barrier
}

// ---- GELU on 8 lanes ---------------------------------------------------------------------------

// erf-GELU on 8 lanes (simd::gelu). std::erf per lane was 10-17x slower
// than the kernel it followed.
inline __m256 gelu8(__m256 v) { return simd::gelu<Avx2>(v); }

// ---- epilogue: tile (g rows, kChunk) -> Y[n0 : n0 + nn, o0 : o0 + g] with bias and activation ----
// Batch column outer, 8-row blocks inner: a 16-row tile writes each Y row's 64-byte segment with two
// back-to-back stores. (8-row tiles wrote half lines; with Y rows 12-16 KiB apart they alias in L1
// and every line was fetched twice — the per-call floor at batch 128 was ~2 cycles per output.)
void store_tile(float* y, int64_t O, const float* tile, int64_t o0, int64_t g, int64_t n0, int64_t nn,
                const float* bias, int act) {
  const int64_t g8 = g / 8 * 8;
  for (int64_t j0 = 0; j0 < nn; j0 += 8) {
    const int64_t m = std::min<int64_t>(8, nn - j0);
    for (int64_t r0 = 0; r0 < g8; r0 += 8) {
      const __m256 b = bias ? _mm256_loadu_ps(bias + o0 + r0) : _mm256_setzero_ps();
      __m256 r[8];
      for (int q = 0; q < 8; ++q) r[q] = _mm256_load_ps(tile + (r0 + q) * kChunk + j0);
      transpose8(r);
      for (int64_t q = 0; q < m; ++q) {
        __m256 v = _mm256_add_ps(r[q], b);
        if (act == ACT_RELU) v = _mm256_max_ps(_mm256_setzero_ps(), v);  // NaN in v stays NaN (maxps returns the second operand)
        else if (act == ACT_GELU) v = gelu8(v);
        _mm256_storeu_ps(y + (n0 + j0 + q) * O + o0 + r0, v);
      }
    }
  }
  if (act > ACT_GELU && g8)  // gelu_tanh: per element
    for (int64_t j = 0; j < nn; ++j) {
      float* dst = y + (n0 + j) * O + o0;
      for (int64_t r = 0; r < g8; ++r) dst[r] = activate(dst[r], act);
    }
  for (int64_t r0 = g8; r0 < g; ++r0) {
    const float b = bias ? bias[o0 + r0] : 0.f;
    for (int64_t j = 0; j < nn; ++j)
      y[(n0 + j) * O + o0 + r0] = activate(tile[r0 * kChunk + j] + b, act);
  }
}

constexpr int64_t kTileRows = 16;  // output rows per epilogue tile: one 64-byte line of Y per row

// =================================== CSR =========================================================

// One output row, one chunk of V (1..8) vectors of 8 batch columns (simd::csr_row).
template <typename WT, typename IT>
void csr_row_chunk_v(int V, const IT* col, const WT* val, int32_t k0, int32_t k1, const float* xt,
                     int64_t np, float* out) {
  simd::with_v<8>(V, [&](auto v) {
    simd::csr_row<Avx2, WT, IT, decltype(v)::value>(col, val, k0, k1, xt, np, out);
  });
}

// Σ_k w_k · x[col_k] over one row, 16 entries per step with two gathers in flight.
inline __m256i load8_idx(const int32_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline __m256i load8_idx(const uint16_t* p) {
  return _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}

template <typename WT, typename IT>
inline float csr_dot_gather(const IT* col, const WT* val, int32_t k0, int32_t k1, const float* x) {
  __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
  int32_t k = k0;
  for (; k + 16 <= k1; k += 16) {
    const __m256i i0 = load8_idx(col + k), i1 = load8_idx(col + k + 8);
    a0 = _mm256_fmadd_ps(load8(val + k), _mm256_i32gather_ps(x, i0, 4), a0);
    a1 = _mm256_fmadd_ps(load8(val + k + 8), _mm256_i32gather_ps(x, i1, 4), a1);
  }
  if (k + 8 <= k1) {
    a0 = _mm256_fmadd_ps(load8(val + k), _mm256_i32gather_ps(x, load8_idx(col + k), 4), a0);
    k += 8;
  }
  float s = hsum(_mm256_add_ps(a0, a1));
  for (; k < k1; ++k) s += scalar(val + k) * x[col[k]];
  return s;
}

// Panelled CSR, one batch chunk of nc (multiple of 16) columns, rows [o0, o1): for each input
// panel (its Xt rows, panel_width x nc floats, stay in L1), every row adds that panel's entries to
// its partial sums acc ((o1-o0) x kChunk, L2). The row-at-a-time loop instead pulls 4 bytes of Xt
// per FMA lane from L2 and is bound by L2 bandwidth at large batch.
template <typename WT>
void csr_chunk_panelled(const LinearArgs& a, int64_t o0, int64_t o1, const float* xt, int64_t np,
                        int64_t nc, float* acc) {
  const int64_t O = a.out_features, P = (a.in_features + a.panel_width - 1) / a.panel_width;
  const WT* val = static_cast<const WT*>(a.panel_val);
  const bool w512 = csr_bits() == 512;  // 16-wide vectors (nc % 16 == 0), else 8-wide
  const int v16 = int(nc / 16), v8 = int(nc / 8);
  for (int64_t p = 0; p < P; ++p) {
    const int32_t* seg = a.panel_seg + p * O;
    for (int64_t o = o0; o < o1; ++o) {
      const int32_t k0 = seg[o], k1 = seg[o + 1];
      float* out = acc + (o - o0) * kChunk;
      if (k1 > k0) {
        if (w512) {
          csr_row_acc_512<WT, uint16_t>(v16, a.panel_col, val, k0, k1, xt, np, out, p > 0);
        } else {
          simd::with_v<8>(v8, [&](auto v) {
            simd::csr_row_acc<Avx2, WT, uint16_t, decltype(v)::value, 2>(a.panel_col, val, k0, k1, xt, np, out, p > 0);
          });
        }
      }
      else if (p == 0) std::memset(out, 0, size_t(nc) * sizeof(float));
    }
  }
  if (P == 0)
    for (int64_t o = o0; o < o1; ++o) std::memset(acc + (o - o0) * kChunk, 0, size_t(nc) * sizeof(float));
}

// Grouped panels (SELL-4), one batch chunk, 64-row windows [w0, w1): acc (O_pad x kChunk, shared,
// each thread touching only its windows' rows) starts at zero and every group of every panel adds
// its 4 rows at once: one loop exit per ~4 rows' entries instead of per row.
template <typename WT>
void csr_chunk_grouped(const LinearArgs& a, int64_t w0, int64_t w1, const float* xt, int64_t np,
                       int64_t nc, float* acc) {
  const int64_t P = (a.in_features + a.panel_width - 1) / a.panel_width;
  const int64_t G = (a.out_features + 63) / 64 * 16;
  const WT* val = static_cast<const WT*>(a.grp_val);
  const int v16 = int(nc / 16);
  for (int64_t r = w0 * 64; r < w1 * 64; ++r) std::memset(acc + r * kChunk, 0, size_t(nc) * sizeof(float));
  for (int64_t p = 0; p < P; ++p)
    csr_groups_512<WT>(v16, a.grp_off, a.grp_len, a.grp_rows, a.grp_col, val, p * G + w0 * 16, p * G + w1 * 16,
                       xt, np, acc, kChunk);
}

// IT: int32_t column indices, or uint16_t (a prepared copy when I <= 65536: 2 bytes less per entry
// on the memory-bound small-batch path).
template <typename WT, typename IT>
void csr_avx2(const LinearArgs& a, const IT* col) {
  const WT* val = static_cast<const WT*>(a.values);
  const int64_t N = a.n, I = a.in_features, O = a.out_features;
  const int32_t* crow = a.crow;
  const double work = double(crow[O]) * double(N);
  // Packing X touches N·I values; with fewer stored values than inputs (a 10-output head on a wide
  // layer) that costs more than the products, so such a layer reads X rows as the SpMV path does.
  const bool spmv = N < kSpmmMinN || int64_t(crow[O]) < I;
  const int T = pick_threads(a.nthreads, spmv ? est_spmv_csr(work) : est_spmm(work));
  const bool w512 = csr_bits() == 512;  // batched path only

  if (spmv) {
#pragma omp parallel num_threads(T) if (T > 1)
    {
      const int t = thread_id(), nt = team_size();
      // 16-row alignment keeps threads off each other's cache lines of y.
      const int64_t o0 = split_begin(crow, O, 16, 4, t, nt), o1 = split_begin(crow, O, 16, 4, t + 1, nt);
      for (int64_t o = o0; o < o1; ++o) {
        const float b = a.bias ? a.bias[o] : 0.f;
        for (int64_t n = 0; n < N; ++n) {
          // vpgatherdd beat both 16-wide AVX-512 gathers and scalar loads here (kernel log, cpu.md).
          const float d = csr_dot_gather(col, val, crow[o], crow[o + 1], a.x + n * I);
          a.y[n * O + o] = activate(d + b, a.act);
        }
      }
    }
    return;
  }

  const int64_t n_pad = (N + 7) / 8 * 8, panel = panel_columns(I, n_pad);
  // The panelled layout: AVX-512 needs every chunk 16-aligned (n_pad % 16 == 0); AVX2 8-aligned.
  const bool panelled = a.panel_seg && (!w512 || n_pad % 16 == 0);
  float* xt = scratch(0, packed_x_floats(I, panel));
  const bool grouped = w512 && a.grp_off && n_pad % 16 == 0;
  float* acc_shared = grouped ? scratch(2, size_t((O + 63) / 64 * 64 * kChunk)) : nullptr;
#pragma omp parallel num_threads(T) if (T > 1)
  {
    const int t = thread_id(), nt = team_size();
    float* tile = scratch(1, kTileRows * kChunk);
    const int64_t align = grouped ? 64 : kTileRows;  // grouped: whole 64-row windows per thread
    const int64_t o0 = split_begin(crow, O, align, 4, t, nt), o1 = split_begin(crow, O, align, 4, t + 1, nt);
    for (int64_t p0 = 0; p0 < n_pad; p0 += panel) {
      const int64_t np = std::min(panel, n_pad - p0);
      pack_panel(a.x, N, I, p0, np, xt, t, nt, panelled || grouped);
      if (grouped) {
        const int64_t w0 = o0 / 64, w1 = (o1 + 63) / 64;  // o0, o1: multiples of 64 (or O)
        for (int64_t c0 = 0; c0 < np; c0 += kChunk) {
          const int64_t nc = std::min<int64_t>(kChunk, np - c0);
          csr_chunk_grouped<WT>(a, w0, w1, xt + c0 * I, kChunk, nc, acc_shared);
          store_tile(a.y, O, acc_shared + o0 * kChunk, o0, o1 - o0, p0 + c0, std::min(nc, N - p0 - c0), a.bias, a.act);
        }
        continue;
      }
      if (panelled) {
        for (int64_t c0 = 0; c0 < np; c0 += kChunk) {
          const int64_t nc = std::min<int64_t>(kChunk, np - c0);
          float* acc = scratch(2, size_t(std::max<int64_t>(1, o1 - o0) * kChunk));
          csr_chunk_panelled<WT>(a, o0, o1, xt + c0 * I, kChunk, nc, acc);
          store_tile(a.y, O, acc, o0, o1 - o0, p0 + c0, std::min(nc, N - p0 - c0), a.bias, a.act);
        }
        continue;
      }
      for (int64_t og = o0; og < o1; og += kTileRows) {
        const int64_t g = std::min<int64_t>(kTileRows, o1 - og);
        for (int64_t c0 = 0; c0 < np; c0 += kChunk) {
          const int64_t nc = std::min<int64_t>(kChunk, np - c0);
          for (int64_t r = 0; r < g; ++r) {
            const int32_t k0 = crow[og + r], k1 = crow[og + r + 1];
            float* out = tile + r * kChunk;
            if (w512) {
              const int v16 = int(nc / 16);
              if (v16) csr_row_chunk_512<WT, IT>(v16, col, val, k0, k1, xt + c0, np, out);
              if (nc % 16) csr_row_chunk_v<WT, IT>(1, col, val, k0, k1, xt + c0 + 16 * v16, np, out + 16 * v16);
            } else {
              csr_row_chunk_v<WT, IT>(int(nc / 8), col, val, k0, k1, xt + c0, np, out);
            }
          }
          store_tile(a.y, O, tile, og, g, p0 + c0, std::min(nc, N - p0 - c0), a.bias, a.act);
        }
      }
    }
  }
}

// ============================ two CSR layers back to back ======================================

// rows [r0, r1) of a (rows x kChunk) block of partial sums, first nc columns, in place:
// v <- act(v + bias[row]); on zmm registers with the 512-bit kernels (nc a multiple of 16 there).
void bias_act_rows(float* h, int64_t r0, int64_t r1, int64_t nc, const float* bias, int act) {
  if (csr_bits() == 512) bias_act_rows_512(h, kChunk, r0, r1, nc, bias, act);
  else simd::bias_act_rows<Avx2>(h, kChunk, r0, r1, nc, bias, act);
}

// y = L2(act1(L1(x))) with both weights in a batched layout (the transformer's FFN): panel-major,
// or grouped SELL-4 with the 512-bit kernels. For one chunk of batch columns, L1's partial sums
// (row f at hidden + f·kChunk) are already the chunk-major packed input L2 reads: L1's output is
// never transposed into (N, F) and packed back; its bias and activation are applied in place.
// hidden (F, rounded up to 64, x kChunk) is shared by the team; so is L2's grouped accumulator.
template <typename WT>
void csr_pair(const LinearArgs& a1, const LinearArgs& a2) {
  const int64_t N = a1.n, I = a1.in_features, F = a1.out_features, O = a2.out_features;
  const int T = pick_threads(a1.nthreads, est_spmm((double(a1.crow[F]) + double(a2.crow[O])) * double(N)));
  const int64_t n_pad = (N + 7) / 8 * 8, panel = panel_columns(I, n_pad);
  const bool grouped1 = a1.grp_off != nullptr, grouped2 = a2.grp_off != nullptr;
  float* xt = scratch(0, packed_x_floats(I, panel));
  float* hidden = scratch(3, size_t((F + 63) / 64 * 64 * kChunk));
  float* acc_shared = grouped2 ? scratch(2, size_t((O + 63) / 64 * 64 * kChunk)) : nullptr;
#pragma omp parallel num_threads(T) if (T > 1)
  {
    const int t = thread_id(), nt = team_size();
    const int64_t align1 = grouped1 ? 64 : kTileRows, align2 = grouped2 ? 64 : kTileRows;
    const int64_t f0 = split_begin(a1.crow, F, align1, 4, t, nt), f1 = split_begin(a1.crow, F, align1, 4, t + 1, nt);
    const int64_t o0 = split_begin(a2.crow, O, align2, 4, t, nt), o1 = split_begin(a2.crow, O, align2, 4, t + 1, nt);
    float* acc = grouped2 ? acc_shared + o0 * kChunk : scratch(2, size_t(std::max<int64_t>(1, o1 - o0) * kChunk));
    for (int64_t p0 = 0; p0 < n_pad; p0 += panel) {
      const int64_t np = std::min(panel, n_pad - p0);
      pack_panel(a1.x, N, I, p0, np, xt, t, nt, true);  // its first barrier: the last chunk's L2 is done
      for (int64_t c0 = 0; c0 < np; c0 += kChunk) {
        const int64_t nc = std::min<int64_t>(kChunk, np - c0);
        if (c0) {
#pragma omp barrier
        }
        if (grouped1) csr_chunk_grouped<WT>(a1, f0 / 64, (f1 + 63) / 64, xt + c0 * I, kChunk, nc, hidden);
        else csr_chunk_panelled<WT>(a1, f0, f1, xt + c0 * I, kChunk, nc, hidden + f0 * kChunk);
        bias_act_rows(hidden, f0, f1, nc, a1.bias, a1.act);
#pragma omp barrier
        if (grouped2) csr_chunk_grouped<WT>(a2, o0 / 64, (o1 + 63) / 64, hidden, kChunk, nc, acc_shared);
        else csr_chunk_panelled<WT>(a2, o0, o1, hidden, kChunk, nc, acc);
        store_tile(a2.y, O, acc, o0, o1 - o0, p0 + c0, std::min(nc, N - p0 - c0), a2.bias, a2.act);
      }
    }
  }
}

// ================================= attention ===================================================

// The ymm traits with the softmax's helpers (simd::attention_rows).
struct Avx2Softmax : Avx2 {
  static float hmax(__m256 v) { return se::hmax(v); }
  static float hsum(__m256 v) { return se::hsum(v); }
};

}  // namespace

// softmax(Q Kᵀ · scale) V for every (batch, head), read straight from the QKV projection's output
// (B·S, 3·nh·hs) and written as (B·S, nh·hs), the layout the output projection reads: no strided
// views, no transposed copy. One (batch, head) per task (simd::attention_task); 512-bit vectors
// where the CPU runs them whole and the head size is a multiple of 16 (Intel: 1.4-1.6x the ymm
// code), else 256-bit.
void attention_avx2(const float* qkv, float* out, int64_t B, int64_t S, int64_t nh, int64_t hs, float scale,
                    int nthreads) {
  const bool zmm = current_isa() == ISA_AVX512 && !avx512_split() && hs % 16 == 0;
  const int T = pick_threads(nthreads, est_spmm(double(B * nh) * double(S) * double(S) * double(hs) * 2));
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
  for (int64_t task = 0; task < B * nh; ++task) {
    if (zmm) attention_task_512(qkv, out, S, nh, hs, scale, task);
    else simd::attention_task<Avx2Softmax>(qkv, out, S, nh, hs, scale, task);
  }
}

namespace {

// =================================== BSR =========================================================

// Rows [r0, r0 + RB) of one block row, V vectors of 8 batch columns (simd::bsr_rows), out row
// stride kChunk. Register budget: RB·V accumulators + V x vectors + 1 broadcast <= 16 ymm, so
// V <= 8 / RB (the callers split wider chunks).
template <typename WT, int RB>
void bsr_rows_chunk_v(int V, const int32_t* bcol, const WT* val, int32_t k0, int32_t k1, int64_t R,
                      int64_t C, int64_t r0, const float* xt, int64_t np, float* out) {
  simd::with_v<8 / RB>(V, [&](auto v) {
    simd::bsr_rows<Avx2, WT, RB, decltype(v)::value>(bcol, val, k0, k1, R, C, r0, xt, np, out, kChunk);
  });
}

template <typename WT>
void bsr_block_row_chunk(const LinearArgs& a, const WT* val, int64_t b, const float* xt, int64_t np,
                         int64_t nc, float* tile, bool w512) {
  const int64_t R = a.block_r, C = a.block_c;
  const int32_t k0 = a.crow[b], k1 = a.crow[b + 1];
  if (w512) {
    const int v16 = int(nc / 16);
    if (v16)
      for (int64_t r0 = 0; r0 < R; r0 += 4)
        bsr_rows_chunk_512<WT>(int(std::min<int64_t>(4, R - r0)), v16, a.col, val, k0, k1, R, C, r0, xt,
                               np, tile + r0 * kChunk, kChunk);
    if (nc % 16 == 0) return;
    xt += 16 * v16;  // the last 8 columns go through the AVX2 kernels below
    tile += 16 * v16;
    nc = 8;
  }
  const int vtot = int(nc / 8);
  int64_t r0 = 0;
  for (; r0 + 4 <= R; r0 += 4)
    for (int v0 = 0; v0 < vtot; v0 += 2)
      bsr_rows_chunk_v<WT, 4>(std::min(2, vtot - v0), a.col, val, k0, k1, R, C, r0, xt + 8 * v0, np,
                              tile + r0 * kChunk + 8 * v0);
  for (; r0 + 2 <= R; r0 += 2)
    for (int v0 = 0; v0 < vtot; v0 += 4)
      bsr_rows_chunk_v<WT, 2>(std::min(4, vtot - v0), a.col, val, k0, k1, R, C, r0, xt + 8 * v0, np,
                              tile + r0 * kChunk + 8 * v0);
  for (; r0 < R; ++r0)
    bsr_rows_chunk_v<WT, 1>(vtot, a.col, val, k0, k1, R, C, r0, xt, np, tile + r0 * kChunk);
}

// SpMV rows [r0, r0 + RB) of block row b for one batch row, C a multiple of 8: each block row
// segment is a contiguous dot product with x[col·C : col·C + C]. Two block-parity accumulator sets.
template <typename WT, int RB>
inline void bsr_rows_dot(const int32_t* bcol, const WT* val, int32_t k0, int32_t k1, int64_t R, int64_t C,
                         int64_t r0, const float* x, float* out) {
  constexpr int U = RB >= 8 ? 1 : 2;  // 8 rows already give 8 independent FMA chains
  __m256 acc[2][RB];
  for (int u = 0; u < 2; ++u)
    for (int rb = 0; rb < RB; ++rb) acc[u][rb] = _mm256_setzero_ps();
  int32_t k = k0;
  for (; k + U <= k1; k += U) {
    for (int u = 0; u < U; ++u) {
      const WT* w = val + (int64_t(k + u) * R + r0) * C;
      const float* xb = x + int64_t(bcol[k + u]) * C;
      for (int64_t c = 0; c < C; c += 8) {
        const __m256 xv = _mm256_loadu_ps(xb + c);
        for (int rb = 0; rb < RB; ++rb) acc[u][rb] = _mm256_fmadd_ps(load8(w + rb * C + c), xv, acc[u][rb]);
      }
    }
  }
  if (k < k1) {
    const WT* w = val + (int64_t(k) * R + r0) * C;
    const float* xb = x + int64_t(bcol[k]) * C;
    for (int64_t c = 0; c < C; c += 8) {
      const __m256 xv = _mm256_loadu_ps(xb + c);
      for (int rb = 0; rb < RB; ++rb) acc[0][rb] = _mm256_fmadd_ps(load8(w + rb * C + c), xv, acc[0][rb]);
    }
  }
  for (int rb = 0; rb < RB; ++rb) out[rb] = hsum(_mm256_add_ps(acc[0][rb], acc[1][rb]));
}

// SpMV for R×1 blocks with R a multiple of 8: a block is a contiguous column segment, so x[col] is
// broadcast against up to 4 vectors of rows [r0, r0 + 8·RV).
template <typename WT, int RV>
inline void bsr_col_dot(const int32_t* bcol, const WT* val, int32_t k0, int32_t k1, int64_t R, int64_t r0,
                        const float* x, float* out) {
  __m256 acc[2][RV];
  for (int u = 0; u < 2; ++u)
    for (int v = 0; v < RV; ++v) acc[u][v] = _mm256_setzero_ps();
  int32_t k = k0;
  for (; k + 2 <= k1; k += 2)
    for (int u = 0; u < 2; ++u) {
      const __m256 xs = _mm256_broadcast_ss(x + bcol[k + u]);
      const WT* w = val + int64_t(k + u) * R + r0;
      for (int v = 0; v < RV; ++v) acc[u][v] = _mm256_fmadd_ps(load8(w + 8 * v), xs, acc[u][v]);
    }
  if (k < k1) {
    const __m256 xs = _mm256_broadcast_ss(x + bcol[k]);
    const WT* w = val + int64_t(k) * R + r0;
    for (int v = 0; v < RV; ++v) acc[0][v] = _mm256_fmadd_ps(load8(w + 8 * v), xs, acc[0][v]);
  }
  for (int v = 0; v < RV; ++v) _mm256_storeu_ps(out + 8 * v, _mm256_add_ps(acc[0][v], acc[1][v]));
}

template <typename WT>
void bsr_spmv_block_row(const LinearArgs& a, const WT* val, int64_t b, const float* x, float* out) {
  const int64_t R = a.block_r, C = a.block_c;
  const int32_t k0 = a.crow[b], k1 = a.crow[b + 1];
  if (C % 8 == 0) {
    int64_t r0 = 0;
    // All rows of a block in one pass: its values are read once, front to back (8-row passes over
    // 16-row blocks read each block's halves in two strided streams: ~half the bandwidth when cold).
    for (; r0 + 16 <= R; r0 += 16) bsr_rows_dot<WT, 16>(a.col, val, k0, k1, R, C, r0, x, out + r0);
    for (; r0 + 8 <= R; r0 += 8) bsr_rows_dot<WT, 8>(a.col, val, k0, k1, R, C, r0, x, out + r0);
    for (; r0 + 4 <= R; r0 += 4) bsr_rows_dot<WT, 4>(a.col, val, k0, k1, R, C, r0, x, out + r0);
    for (; r0 + 2 <= R; r0 += 2) bsr_rows_dot<WT, 2>(a.col, val, k0, k1, R, C, r0, x, out + r0);
    for (; r0 < R; ++r0) bsr_rows_dot<WT, 1>(a.col, val, k0, k1, R, C, r0, x, out + r0);
  } else if (C == 1 && R % 8 == 0) {
    int64_t r0 = 0;
    for (; r0 + 32 <= R; r0 += 32) bsr_col_dot<WT, 4>(a.col, val, k0, k1, R, r0, x, out + r0);
    for (; r0 < R; r0 += 8) bsr_col_dot<WT, 1>(a.col, val, k0, k1, R, r0, x, out + r0);
  } else {
    for (int64_t r = 0; r < R; ++r) {
      float s = 0.f;
      for (int32_t k = k0; k < k1; ++k) {
        const WT* w = val + (int64_t(k) * R + r) * C;
        const float* xb = x + int64_t(a.col[k]) * C;
        for (int64_t c = 0; c < C; ++c) s += scalar(w + c) * xb[c];
      }
      out[r] = s;
    }
  }
}

// Batch as rows, for R = 16 on AVX-512 where the caller passes the transposed blocks (a.blocks_t;
// engine/cpu.py decides when: whole AVX-512, from 128 rows): the 16 outputs of a block row in a
// zmm's lanes, X read row-major and broadcast, so neither X is packed transposed nor the result
// transposed back (bsr_rows16_512); bias and activation on the way out. Threads take whole groups
// of 8 batch rows (whole output rows).
void bsr_rows_major(const LinearArgs& a) {
  const int64_t N = a.n, I = a.in_features, O = a.out_features, C = a.block_c, BR = O / 16;
  const int T = pick_threads(a.nthreads, est_spmm(double(a.crow[BR]) * double(16 * C) * double(N)));
#pragma omp parallel for num_threads(T) schedule(static) if (T > 1)
  for (int64_t g = 0; g < (N + 7) / 8; ++g) {
    const int64_t n0 = g * 8;
    for (int64_t b = 0; b < BR; ++b)
      bsr_rows16_512(int(std::min<int64_t>(8, N - n0)), a.blocks_t, a.col, a.crow[b], a.crow[b + 1], C,
                     a.x + n0 * I, I, a.bias ? a.bias + b * 16 : nullptr, a.act, a.y + n0 * O + b * 16, O);
  }
}

template <typename WT>
void bsr_avx2(const LinearArgs& a) {
  if (a.blocks_t) {  // the caller asked for batch-as-rows (16-row blocks, AVX-512: the binding checks)
    bsr_rows_major(a);
    return;
  }
  const WT* val = static_cast<const WT*>(a.values);
  const int64_t N = a.n, I = a.in_features, O = a.out_features, R = a.block_r, C = a.block_c;
  const int64_t BR = O / R;
  const int32_t* crow = a.crow;
  const double work = double(crow[BR]) * double(R * C) * double(N);
  const int T = pick_threads(a.nthreads, N < kSpmmMinN ? est_spmv_bsr(work) : est_spmm(work));
  // Block rows handled together so the tile covers >= 8 output rows (one 8x8 transpose).
  const int64_t gb = R >= kTileRows ? 1 : kTileRows / R;
  const bool w512 = current_isa() == ISA_AVX512;
  const int row_cost = int(std::max<int64_t>(1, 4 / (R * C)));

  if (N < kSpmmMinN) {
#pragma omp parallel num_threads(T) if (T > 1)
    {
      const int t = thread_id(), nt = team_size();
      float* acc = scratch(1, size_t(R));
      const int64_t align = std::max<int64_t>(1, 16 / R);
      const int64_t b0 = split_begin(crow, BR, align, row_cost, t, nt);
      const int64_t b1 = split_begin(crow, BR, align, row_cost, t + 1, nt);
      for (int64_t b = b0; b < b1; ++b)
        for (int64_t n = 0; n < N; ++n) {
          bsr_spmv_block_row<WT>(a, val, b, a.x + n * I, acc);
          float* y = a.y + n * O + b * R;
          for (int64_t r = 0; r < R; ++r) y[r] = activate(acc[r] + (a.bias ? a.bias[b * R + r] : 0.f), a.act);
        }
    }
    return;
  }

  const int64_t n_pad = (N + 7) / 8 * 8, panel = panel_columns(I, n_pad);
  float* xt = scratch(0, size_t(std::max<int64_t>(I, 1) * panel));
#pragma omp parallel num_threads(T) if (T > 1)
  {
    const int t = thread_id(), nt = team_size();
    float* tile = scratch(1, size_t(gb * R * kChunk));
    const int64_t b0 = split_begin(crow, BR, gb, row_cost, t, nt);
    const int64_t b1 = split_begin(crow, BR, gb, row_cost, t + 1, nt);
    for (int64_t p0 = 0; p0 < n_pad; p0 += panel) {
      const int64_t np = std::min(panel, n_pad - p0);
      pack_panel(a.x, N, I, p0, np, xt, t, nt);
      for (int64_t bg = b0; bg < b1; bg += gb) {
        const int64_t nb = std::min(gb, b1 - bg);
        for (int64_t c0 = 0; c0 < np; c0 += kChunk) {
          const int64_t nc = std::min<int64_t>(kChunk, np - c0);
          for (int64_t j = 0; j < nb; ++j)
            bsr_block_row_chunk<WT>(a, val, bg + j, xt + c0, np, nc, tile + j * R * kChunk, w512);
          store_tile(a.y, O, tile, bg * R, nb * R, p0 + c0, std::min(nc, N - p0 - c0), a.bias, a.act);
        }
      }
    }
  }
}

}  // namespace

// ================================= residual + LayerNorm ==========================================
namespace {

// 8 values of a row as fp32, from fp32 or bf16 storage (n < 8: the first n, the rest 0).
inline __m256 load_row(const void* p, bool bf16, int64_t i, int64_t n = 8) {
  if (n < 8) {
    alignas(32) float t[8] = {};
    for (int64_t k = 0; k < n; ++k)
      t[k] = bf16 ? to_f32(static_cast<const bf16_t*>(p)[i + k]) : static_cast<const float*>(p)[i + k];
    return _mm256_load_ps(t);
  }
  return bf16 ? load8(static_cast<const bf16_t*>(p) + i) : load8(static_cast<const float*>(p) + i);
}

// 8 fp32 -> fp32 or bf16 storage (round to nearest even; NaN stays a quiet NaN), the first n.
inline void store_row(void* p, bool bf16, int64_t i, __m256 v, int64_t n = 8) {
  if (!bf16) {
    if (n == 8) _mm256_storeu_ps(static_cast<float*>(p) + i, v);
    else for (int64_t k = 0; k < n; ++k) static_cast<float*>(p)[i + k] = v[k];
    return;
  }
  const __m256i u = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff), lsb)), 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q)));
  const __m128i h = _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
  auto* q = static_cast<uint16_t*>(p) + i;
  if (n == 8) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(q), h);
  } else {
    alignas(16) uint16_t t[8];
    _mm_store_si128(reinterpret_cast<__m128i*>(t), h);
    std::memcpy(q, t, size_t(n) * 2);
  }
}

}  // namespace

namespace {

// One row of add_layer_norm_avx2 (BF16: the rows' storage), v: H + 8 floats of scratch. Four partial
// sums per reduction in registers (one add chain, 4 cycles per 8 values, was the row's cost).
template <bool BF16>
void add_layer_norm_row(void* y, const void* h, const void* r, int64_t at, int64_t H, const float* gamma,
                        const float* beta, float eps, float* v) {
  __m256 s[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
  int64_t i = 0;
  for (; i + 32 <= H; i += 32)
    SE_UNROLL
    for (int k = 0; k < 4; ++k) {
      const __m256 x = _mm256_add_ps(load_row(h, BF16, at + i + 8 * k), load_row(r, BF16, at + i + 8 * k));
      _mm256_storeu_ps(v + i + 8 * k, x);
      s[k] = _mm256_add_ps(s[k], x);
    }
  for (; i < H; i += 8) {  // the tail: load_row pads with zeros
    const int64_t m = std::min<int64_t>(8, H - i);
    const __m256 x = _mm256_add_ps(load_row(h, BF16, at + i, m), load_row(r, BF16, at + i, m));
    _mm256_storeu_ps(v + i, x);
    s[0] = _mm256_add_ps(s[0], x);
  }
  const float mean = hsum(_mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3]))) / float(H);
  const __m256 mv = _mm256_set1_ps(mean);
  SE_UNROLL
  for (int k = 0; k < 4; ++k) s[k] = _mm256_setzero_ps();
  i = 0;
  for (; i + 32 <= H; i += 32)
    SE_UNROLL
    for (int k = 0; k < 4; ++k) {
      const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(v + i + 8 * k), mv);
      s[k] = _mm256_fmadd_ps(d, d, s[k]);
    }
  for (; i + 8 <= H; i += 8) {
    const __m256 d = _mm256_sub_ps(_mm256_loadu_ps(v + i), mv);
    s[0] = _mm256_fmadd_ps(d, d, s[0]);
  }
  float tail = 0.f;
  for (; i < H; ++i) tail += (v[i] - mean) * (v[i] - mean);
  const float ss = hsum(_mm256_add_ps(_mm256_add_ps(s[0], s[1]), _mm256_add_ps(s[2], s[3]))) + tail;
  const __m256 rstd = _mm256_set1_ps(1.f / std::sqrt(ss / float(H) + eps));
  i = 0;
  if (gamma && beta)  // the usual LayerNorm: whole vectors without a test
    for (; i + 8 <= H; i += 8) {
      const __m256 o = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(v + i), mv), rstd);
      store_row(y, BF16, at + i, _mm256_fmadd_ps(o, _mm256_loadu_ps(gamma + i), _mm256_loadu_ps(beta + i)));
    }
  for (; i < H; i += 8) {
    const int64_t m = std::min<int64_t>(8, H - i);
    __m256 o = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(v + i), mv), rstd);
    if (gamma) o = _mm256_mul_ps(o, m == 8 ? _mm256_loadu_ps(gamma + i) : load_row(gamma, false, i, m));
    if (beta) o = _mm256_add_ps(o, m == 8 ? _mm256_loadu_ps(beta + i) : load_row(beta, false, i, m));
    store_row(y, BF16, at + i, o, m);
  }
}

}  // namespace

// y = LayerNorm(h + r) per row (biased variance, as torch), in fp32 from fp32 or bf16 rows.
void add_layer_norm_avx2(void* y, const void* h, const void* r, bool bf16, int64_t N, int64_t H, const float* gamma,
                         const float* beta, float eps, int nthreads) {
  const int T = pick_threads(nthreads, double(N) * double(H) * 1e-9);
#pragma omp parallel num_threads(T) if (T > 1)
  {
    float* v = scratch(0, size_t(H + 8));
#pragma omp for schedule(static)
    for (int64_t n = 0; n < N; ++n) {
      if (bf16) add_layer_norm_row<true>(y, h, r, n * H, H, gamma, beta, eps, v);
      else add_layer_norm_row<false>(y, h, r, n * H, H, gamma, beta, eps, v);
    }
  }
}

void csr_linear_avx2(const LinearArgs& a) {
  with_wtype(a.wdtype, [&](auto w) {
    using WT = decltype(w);
    if (a.col16) csr_avx2<WT, uint16_t>(a, a.col16);
    else csr_avx2<WT, int32_t>(a, a.col);
  });
}

void bsr_linear_avx2(const LinearArgs& a) {
  with_wtype(a.wdtype, [&](auto w) { bsr_avx2<decltype(w)>(a); });
}

void csr_pair_avx2(const LinearArgs& a1, const LinearArgs& a2) {
  with_wtype(a1.wdtype, [&](auto w) { csr_pair<decltype(w)>(a1, a2); });
}

}  // namespace se

SE_TARGET_POP

#endif  // x86
