// AVX-512F micro-kernels (see avx512.h). Same algorithms as the AVX2 ones in avx2.cpp, with 16-wide
// vectors and the 32 zmm registers spent on a 4 rows x 64 columns accumulator block.
#if defined(__x86_64__) || defined(__i386__)  // elsewhere the AVX-512 path is never selected
#include <immintrin.h>

#include "avx512.h"

#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx512f,avx2,fma,f16c"))), apply_to = function)
#elif defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx2,fma,f16c")
#endif

namespace se {
namespace {

inline __m512 bcast16(const float* p) { return _mm512_set1_ps(*p); }
inline __m512 bcast16(const bf16_t* p) { return _mm512_set1_ps(to_f32(*p)); }
inline __m512 bcast16(const f16_t* p) { return _mm512_set1_ps(_cvtsh_ss(p->bits)); }

template <typename WT, typename IT, int V>
inline void csr_row(const IT* col, const WT* val, int32_t k0, int32_t k1, const float* xt,
                    int64_t np, float* out) {
  // Independent chains: FMA latency 4 x 2 ports wants ~8 accumulators in flight.
  constexpr int U = V >= 4 ? 2 : 4;
  __m512 acc[U][V];
  for (int u = 0; u < U; ++u)
    for (int v = 0; v < V; ++v) acc[u][v] = _mm512_setzero_ps();
  int32_t k = k0;
  for (; k + U <= k1; k += U)
    for (int u = 0; u < U; ++u) {
      const __m512 w = bcast16(val + k + u);
      const float* p = xt + int64_t(col[k + u]) * np;
      for (int v = 0; v < V; ++v) acc[u][v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(p + 16 * v), acc[u][v]);
    }
  for (; k < k1; ++k) {
    const __m512 w = bcast16(val + k);
    const float* p = xt + int64_t(col[k]) * np;
    for (int v = 0; v < V; ++v) acc[0][v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(p + 16 * v), acc[0][v]);
  }
  for (int v = 0; v < V; ++v) {
    for (int u = 1; u < U; ++u) acc[0][v] = _mm512_add_ps(acc[0][v], acc[u][v]);
    _mm512_store_ps(out + 16 * v, acc[0][v]);
  }
}

template <typename WT, typename IT, int V>
inline void csr_row_acc(const IT* col, const WT* val, int32_t k0, int32_t k1, const float* xt,
                        int64_t np, float* out, bool accumulate) {
  __m512 a0[V], a1[V];
  for (int v = 0; v < V; ++v) {
    a0[v] = accumulate ? _mm512_load_ps(out + 16 * v) : _mm512_setzero_ps();
    a1[v] = _mm512_setzero_ps();
  }
  int32_t k = k0;
  for (; k + 2 <= k1; k += 2) {  // two entries in flight: 2·V independent FMA chains
    const __m512 w0 = bcast16(val + k), w1 = bcast16(val + k + 1);
    const float* p0 = xt + int64_t(col[k]) * np;
    const float* p1 = xt + int64_t(col[k + 1]) * np;
    for (int v = 0; v < V; ++v) {
      a0[v] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(p0 + 16 * v), a0[v]);
      a1[v] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(p1 + 16 * v), a1[v]);
    }
  }
  if (k < k1) {
    const __m512 w0 = bcast16(val + k);
    const float* p0 = xt + int64_t(col[k]) * np;
    for (int v = 0; v < V; ++v) a0[v] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(p0 + 16 * v), a0[v]);
  }
  for (int v = 0; v < V; ++v) _mm512_store_ps(out + 16 * v, _mm512_add_ps(a0[v], a1[v]));
}

template <typename WT, int V>
inline void csr_group_acc(const uint16_t* col, const WT* val, int32_t len, const int32_t* rows,
                          const float* xt, int64_t np, float* acc, int64_t stride) {
  __m512 a[4][V];
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < V; ++v) a[r][v] = _mm512_load_ps(acc + rows[r] * stride + 16 * v);
  for (int32_t j = 0; j < len; ++j, col += 4, val += 4)
    for (int r = 0; r < 4; ++r) {
      const __m512 w = bcast16(val + r);
      const float* p = xt + int64_t(col[r]) * np;
      for (int v = 0; v < V; ++v) a[r][v] = _mm512_fmadd_ps(w, _mm512_loadu_ps(p + 16 * v), a[r][v]);
    }
  for (int r = 0; r < 4; ++r)
    for (int v = 0; v < V; ++v) _mm512_store_ps(acc + rows[r] * stride + 16 * v, a[r][v]);
}

template <typename WT, int RB, int V>
inline void bsr_rows(const int32_t* bcol, const WT* val, int32_t k0, int32_t k1, int64_t R, int64_t C,
                     int64_t r0, const float* xt, int64_t np, float* out, int64_t out_stride) {
  constexpr int U = RB * V >= 8 ? 1 : (RB * V >= 4 ? 2 : 4);
  __m512 acc[U][RB][V];
  for (int u = 0; u < U; ++u)
    for (int rb = 0; rb < RB; ++rb)
      for (int v = 0; v < V; ++v) acc[u][rb][v] = _mm512_setzero_ps();
  for (int32_t k = k0; k < k1; ++k) {
    const WT* w = val + (int64_t(k) * R + r0) * C;
    const float* xb = xt + int64_t(bcol[k]) * C * np;
    int64_t c = 0;
    for (; c + U <= C; c += U)
      for (int u = 0; u < U; ++u) {
        __m512 xv[V];
        for (int v = 0; v < V; ++v) xv[v] = _mm512_loadu_ps(xb + (c + u) * np + 16 * v);
        for (int rb = 0; rb < RB; ++rb) {
          const __m512 wv = bcast16(w + rb * C + c + u);
          for (int v = 0; v < V; ++v) acc[u][rb][v] = _mm512_fmadd_ps(wv, xv[v], acc[u][rb][v]);
        }
      }
    for (; c < C; ++c)
      for (int rb = 0; rb < RB; ++rb) {
        const __m512 wv = bcast16(w + rb * C + c);
        for (int v = 0; v < V; ++v)
          acc[0][rb][v] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(xb + c * np + 16 * v), acc[0][rb][v]);
      }
  }
  for (int rb = 0; rb < RB; ++rb)
    for (int v = 0; v < V; ++v) {
      for (int u = 1; u < U; ++u) acc[0][rb][v] = _mm512_add_ps(acc[0][rb][v], acc[u][rb][v]);
      _mm512_store_ps(out + rb * out_stride + 16 * v, acc[0][rb][v]);
    }
}

template <typename WT, int RB>
void bsr_rows_v(int v16, const int32_t* bcol, const WT* val, int32_t k0, int32_t k1, int64_t R,
                int64_t C, int64_t r0, const float* xt, int64_t np, float* out, int64_t os) {
  switch (v16) {
    case 1: return bsr_rows<WT, RB, 1>(bcol, val, k0, k1, R, C, r0, xt, np, out, os);
    case 2: return bsr_rows<WT, RB, 2>(bcol, val, k0, k1, R, C, r0, xt, np, out, os);
    case 3: return bsr_rows<WT, RB, 3>(bcol, val, k0, k1, R, C, r0, xt, np, out, os);
    default: return bsr_rows<WT, RB, 4>(bcol, val, k0, k1, R, C, r0, xt, np, out, os);
  }
}

}  // namespace

template <typename WT, typename IT>
void csr_row_chunk_512(int v16, const IT* col, const WT* val, int32_t k0, int32_t k1,
                       const float* xt, int64_t np, float* out) {
  switch (v16) {
    case 1: return csr_row<WT, IT, 1>(col, val, k0, k1, xt, np, out);
    case 2: return csr_row<WT, IT, 2>(col, val, k0, k1, xt, np, out);
    case 3: return csr_row<WT, IT, 3>(col, val, k0, k1, xt, np, out);
    default: return csr_row<WT, IT, 4>(col, val, k0, k1, xt, np, out);
  }
}

template <typename WT, typename IT>
void csr_row_acc_512(int v16, const IT* col, const WT* val, int32_t k0, int32_t k1, const float* xt,
                     int64_t np, float* out, bool accumulate) {
  switch (v16) {
    case 1: return csr_row_acc<WT, IT, 1>(col, val, k0, k1, xt, np, out, accumulate);
    case 2: return csr_row_acc<WT, IT, 2>(col, val, k0, k1, xt, np, out, accumulate);
    case 3: return csr_row_acc<WT, IT, 3>(col, val, k0, k1, xt, np, out, accumulate);
    default: return csr_row_acc<WT, IT, 4>(col, val, k0, k1, xt, np, out, accumulate);
  }
}

template <typename WT>
void csr_group_acc_512(int v16, const uint16_t* col, const WT* val, int32_t len, const int32_t* rows,
                       const float* xt, int64_t np, float* acc, int64_t stride) {
  switch (v16) {
    case 1: return csr_group_acc<WT, 1>(col, val, len, rows, xt, np, acc, stride);
    case 2: return csr_group_acc<WT, 2>(col, val, len, rows, xt, np, acc, stride);
    case 3: return csr_group_acc<WT, 3>(col, val, len, rows, xt, np, acc, stride);
    default: return csr_group_acc<WT, 4>(col, val, len, rows, xt, np, acc, stride);
  }
}

template <typename WT>
void bsr_rows_chunk_512(int rb, int v16, const int32_t* bcol, const WT* val, int32_t k0, int32_t k1,
                        int64_t R, int64_t C, int64_t r0, const float* xt, int64_t np, float* out,
                        int64_t os) {
  switch (rb) {
    case 1: return bsr_rows_v<WT, 1>(v16, bcol, val, k0, k1, R, C, r0, xt, np, out, os);
    case 2: return bsr_rows_v<WT, 2>(v16, bcol, val, k0, k1, R, C, r0, xt, np, out, os);
    case 3: return bsr_rows_v<WT, 3>(v16, bcol, val, k0, k1, R, C, r0, xt, np, out, os);
    default: return bsr_rows_v<WT, 4>(v16, bcol, val, k0, k1, R, C, r0, xt, np, out, os);
  }
}

#define SE_INSTANTIATE(WT)                                                                         \
  template void csr_row_chunk_512<WT, int32_t>(int, const int32_t*, const WT*, int32_t, int32_t,  \
                                               const float*, int64_t, float*);                     \
  template void csr_row_chunk_512<WT, uint16_t>(int, const uint16_t*, const WT*, int32_t, int32_t, \
                                                const float*, int64_t, float*);                    \
  template void csr_group_acc_512<WT>(int, const uint16_t*, const WT*, int32_t, const int32_t*,      \
                                      const float*, int64_t, float*, int64_t);                     \
  template void csr_row_acc_512<WT, uint16_t>(int, const uint16_t*, const WT*, int32_t, int32_t,   \
                                              const float*, int64_t, float*, bool);                \
  template void bsr_rows_chunk_512<WT>(int, int, const int32_t*, const WT*, int32_t, int32_t,     \
                                       int64_t, int64_t, int64_t, const float*, int64_t, float*,   \
                                       int64_t);
SE_INSTANTIATE(float)
SE_INSTANTIATE(bf16_t)
SE_INSTANTIATE(f16_t)
#undef SE_INSTANTIATE

}  // namespace se

#if defined(__clang__)
#pragma clang attribute pop
#elif defined(__GNUC__)
#pragma GCC pop_options
#endif

#endif  // x86
