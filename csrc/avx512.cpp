// AVX-512F micro-kernels (see avx512.h): the SIMD-generic bodies of simd_kernels.h instantiated with
// the 16-wide zmm traits (zmm_traits.h); the 32 zmm registers hold a 4 rows x 64 columns accumulator
// block.
// Also the batch-as-rows BSR block row (bsr_rows16_512) and one (batch, head) of the fp32 attention.
#if defined(__x86_64__) || defined(__i386__)  // elsewhere the AVX-512 path is never selected
#include <immintrin.h>

#include "avx512.h"

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_ps (GCC bug
// 105593) in max / roundscale / scalef, and -Wuninitialized in _mm512_reduce_*; nothing here reads
// an uninitialized value.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
SE_TARGET_PUSH("avx512f,avx2,fma,f16c")

#include "simd_kernels.h"
#include "zmm_traits.h"

namespace se {

template <typename WT, typename IT>
void csr_row_chunk_512(int v16, const IT* col, const WT* val, int32_t k0, int32_t k1,
                       const float* xt, int64_t np, float* out) {
  simd::with_v<4>(v16, [&](auto V) {
    simd::csr_row<Avx512, WT, IT, decltype(V)::value>(col, val, k0, k1, xt, np, out);
  });
}

template <typename WT, typename IT>
void csr_row_acc_512(int v16, const IT* col, const WT* val, int32_t k0, int32_t k1, const float* xt,
                     int64_t np, float* out, bool accumulate) {
  simd::with_v<4>(v16, [&](auto V) {
    simd::csr_row_acc<Avx512, WT, IT, decltype(V)::value, 2>(col, val, k0, k1, xt, np, out, accumulate);
  });
}

template <typename WT>
void csr_groups_512(int v16, const int32_t* off, const int32_t* len, const int32_t* rows, const uint16_t* col,
                    const WT* val, int64_t g0, int64_t g1, const float* xt, int64_t np, float* acc, int64_t stride) {
  simd::with_v<4>(v16, [&](auto V) {
    for (int64_t g = g0; g < g1; ++g) {
      if (g + 2 < g1) {  // partial sums of the group after next: L2 -> L1 ahead of use
        const int32_t* nr = rows + 4 * (g + 2);
        for (int r = 0; r < 4; ++r)
          for (int v = 0; v < decltype(V)::value; ++v)
            _mm_prefetch(reinterpret_cast<const char*>(acc + nr[r] * stride + 16 * v), _MM_HINT_T0);
      }
      if (len[g] > 0)
        simd::csr_group_acc<Avx512, WT, decltype(V)::value>(col + off[g], val + off[g], len[g], rows + 4 * g,
                                                            xt, np, acc, stride);
    }
  });
}

template <typename WT>
void bsr_rows_chunk_512(int rb, int v16, const int32_t* bcol, const WT* val, int32_t k0, int32_t k1,
                        int64_t R, int64_t C, int64_t r0, const float* xt, int64_t np, float* out,
                        int64_t os) {
  simd::with_v<4>(rb, [&](auto RB) {
    simd::with_v<4>(v16, [&](auto V) {
      simd::bsr_rows<Avx512, WT, decltype(RB)::value, decltype(V)::value>(bcol, val, k0, k1, R, C, r0, xt,
                                                                           np, out, os);
    });
  });
}

// Batch as rows (no transposes): NB (1..8) rows of X (row stride I) times one block row of R = 16
// outputs, blocks given transposed as wt (nnzb, C, 16) fp32: out[n][0:16] = Σ_k Σ_c wt[k][c] · x[n][bcol·C + c].
template <int NB>
void bsr_rows16(const float* wt, const int32_t* bcol, int32_t k0, int32_t k1, int64_t C, const float* x, int64_t I,
                const float* bias, int act, float* y, int64_t ldy) {
  __m512 acc[NB];
  for (int n = 0; n < NB; ++n) acc[n] = _mm512_setzero_ps();
  for (int32_t k = k0; k < k1; ++k) {
    const float* w = wt + int64_t(k) * C * 16;
    const float* xk = x + int64_t(bcol[k]) * C;
    for (int64_t c = 0; c < C; ++c) {
      const __m512 wc = _mm512_load_ps(w + c * 16);
      for (int n = 0; n < NB; ++n) acc[n] = _mm512_fmadd_ps(_mm512_set1_ps(xk[n * I + c]), wc, acc[n]);
    }
  }
  const __m512 b = bias ? _mm512_loadu_ps(bias) : _mm512_setzero_ps();
  for (int n = 0; n < NB; ++n) {
    __m512 v = _mm512_add_ps(acc[n], b);
    if (act == ACT_RELU) v = _mm512_max_ps(_mm512_setzero_ps(), v);  // NaN stays NaN (the second operand)
    else if (act == ACT_GELU) v = simd::gelu<Avx512>(v);
    _mm512_storeu_ps(y + n * ldy, v);
    if (act > ACT_GELU)  // gelu_tanh: per element
      for (int q = 0; q < 16; ++q) y[n * ldy + q] = activate(y[n * ldy + q], act);
  }
}

void bsr_rows16_512(int nb, const float* wt, const int32_t* bcol, int32_t k0, int32_t k1, int64_t C,
                    const float* x, int64_t I, const float* bias, int act, float* y, int64_t ldy) {
  simd::with_v<8>(nb, [&](auto NB) { bsr_rows16<decltype(NB)::value>(wt, bcol, k0, k1, C, x, I, bias, act, y, ldy); });
}

void bias_act_rows_512(float* h, int64_t ld, int64_t r0, int64_t r1, int64_t nc, const float* bias, int act) {
  simd::bias_act_rows<Avx512>(h, ld, r0, r1, nc, bias, act);
}

void attention_task_512(const float* qkv, float* out, int64_t S, int64_t nh, int64_t hs, float scale, int64_t task) {
  simd::attention_task<Avx512>(qkv, out, S, nh, hs, scale, task);
}

#define SE_INSTANTIATE(WT)                                                                         \
  template void csr_row_chunk_512<WT, int32_t>(int, const int32_t*, const WT*, int32_t, int32_t,  \
                                               const float*, int64_t, float*);                     \
  template void csr_row_chunk_512<WT, uint16_t>(int, const uint16_t*, const WT*, int32_t, int32_t, \
                                                const float*, int64_t, float*);                    \
  template void csr_groups_512<WT>(int, const int32_t*, const int32_t*, const int32_t*, const uint16_t*, \
                                   const WT*, int64_t, int64_t, const float*, int64_t, float*, int64_t);  \
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

SE_TARGET_POP

#endif  // x86
