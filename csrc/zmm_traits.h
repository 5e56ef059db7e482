// The 16-wide zmm traits of simd_kernels.h (AVX-512F), shared by avx512.cpp and bf16.cpp. Include it
// after simd_kernels.h, inside the including file's target region: each translation unit gets its
// own copy in its anonymous namespace.
#pragma once

namespace se {
namespace {

struct Avx512 {
  SE_SIMD_FP32_TRAITS(_mm512, __m512, 16)
  // FMA latency 4 x 2 ports wants ~8 accumulators in flight.
  static constexpr int csr_unroll(int v) { return v >= 4 ? 2 : 4; }
  static constexpr int bsr_unroll(int rbv) { return rbv >= 8 ? 1 : (rbv >= 4 ? 2 : 4); }
  static constexpr int attention_rows = 8;  // query rows per block: 16 score / output accumulators
  static __m512 round(__m512 v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static __m512 scale2(__m512 e, __m512 n) { return _mm512_scalef_ps(e, n); }
  static __m512 exp_nonpositive(__m512 u) { return simd::exp_nonpositive<Avx512>(u); }
  // 1/d, d >= 1: VRCP14PS and one Newton step (~2^-28 relative, as good as VDIVPS at a fraction of its
  // cost, which was ~a third of the GELU's); d clamped to 2^100 first so that inf gives ~0, not NaN.
  static __m512 recip(__m512 d) {
    d = _mm512_min_ps(d, _mm512_set1_ps(0x1p100f));
    const __m512 r = _mm512_rcp14_ps(d);
    return _mm512_fmadd_ps(r, _mm512_fnmadd_ps(d, r, _mm512_set1_ps(1.f)), r);
  }
  static float hmax(__m512 v) { return _mm512_reduce_max_ps(v); }
  static float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }
  static __m512 abs(__m512 v) { return _mm512_abs_ps(v); }
  static __m512 select_neg(__m512 x, __m512 if_neg, __m512 if_not) {  // by the sign bit, as VBLENDVPS
    const __mmask16 neg = _mm512_test_epi32_mask(_mm512_castps_si512(x), _mm512_set1_epi32(INT32_MIN));
    return _mm512_mask_blend_ps(neg, if_not, if_neg);
  }
};

}  // namespace
}  // namespace se
