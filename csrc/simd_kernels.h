// Register micro-kernels of the batched (packed-X) paths and the fp32 attention, written once for
// any SIMD width.
//
// Each ISA translation unit (avx2.cpp, avx512.cpp) defines a traits struct S inside its own
// `#pragma GCC target` region and includes this header *inside that region*, so every
// instantiation is compiled for that ISA. S provides:
//   using vec;  static constexpr int W;               // register type, fp32 lanes
//   zero(), loadu(const float*), load(const float*), store(float*, vec), storeu, fmadd(a, b, c),
//   add, sub, mul, max(a, b), set1(float)
//   bcast(const float* / const bf16_t* / const f16_t*) // one weight, widened to fp32 in all lanes
// (SE_SIMD_FP32_TRAITS below writes all of these from the intrinsic prefix), and
//   static constexpr int csr_unroll(int V), bsr_unroll(int RB_times_V)  // accumulator sets
//   static constexpr int attention_rows                // query rows per attention block
//   static vec round(vec), scale2(vec e, vec n)       // nearest integer; e · 2^n (n integral)
//   static vec exp_nonpositive(vec); static float hmax(vec), hsum(vec)  // the attention's softmax
//   static vec abs(vec); static vec select_neg(vec x, vec if_neg, vec if_not)  // erf-GELU
//   static vec recip(vec d)                            // 1/d for d >= 1 (finite or inf): erf-GELU
// The 16-wide zmm traits are in zmm_traits.h, shared by avx512.cpp and bf16.cpp.
// The traits types live in each TU's anonymous namespace, so the two instantiations never meet
// at link time.
#pragma once

// No standard headers here: anything first included inside a target region would take its ISA.
#include "common.h"  // (already included by the TU before its target region)

// The fp32 part of a traits struct for the x86 intrinsic family P (_mm256, _mm512): every
// operation is P##_op_ps on VEC; a 16-bit weight is widened by scalar code and broadcast.
#define SE_SIMD_FP32_TRAITS(P, VEC, LANES)                                              \
  using vec = VEC;                                                                      \
  static constexpr int W = LANES;                                                       \
  static vec zero() { return P##_setzero_ps(); }                                        \
  static vec loadu(const float* p) { return P##_loadu_ps(p); }                          \
  static vec load(const float* p) { return P##_load_ps(p); }                            \
  static void store(float* p, vec v) { P##_store_ps(p, v); }                            \
  static vec fmadd(vec a, vec b, vec c) { return P##_fmadd_ps(a, b, c); }               \
  static vec add(vec a, vec b) { return P##_add_ps(a, b); }                             \
  static vec sub(vec a, vec b) { return P##_sub_ps(a, b); }                             \
  static vec mul(vec a, vec b) { return P##_mul_ps(a, b); }                             \
  static vec max(vec a, vec b) { return P##_max_ps(a, b); }                             \
  static vec set1(float f) { return P##_set1_ps(f); }                                   \
  static void storeu(float* p, vec v) { P##_storeu_ps(p, v); }                          \
  static vec fnmadd(vec a, vec b, vec c) { return P##_fnmadd_ps(a, b, c); }             \
  static vec bcast(const float* p) { return P##_set1_ps(*p); }                          \
  static vec bcast(const bf16_t* p) { return P##_set1_ps(to_f32(*p)); }                 \
  static vec bcast(const f16_t* p) { return P##_set1_ps(_cvtsh_ss(p->bits)); }

// Full unrolling of the loops over compile-time register counts, before register allocation: without
// it GCC kept some accumulator arrays on the stack (stored and reloaded around every call).
#define SE_UNROLL _Pragma("GCC unroll 16")

namespace se {
namespace simd {

// f(std::integral_constant<int, V>) with V = clamp(v, 1, N): the run-time vector count of a
// chunk turned into a compile-time unroll.
template <int N, typename F>
inline void with_v(int v, F&& f) {
  if constexpr (N > 1) {
    if (v >= N) return f(std::integral_constant<int, N>{});
    return with_v<N - 1>(v, f);
  } else {
    return f(std::integral_constant<int, 1>{});
  }
}

// One row's entries [k0, k1), V vectors of batch columns: out[0 : W·V] (+)= Σ val[k] · xt[col[k]·np + ...];
// adds to out when accumulate (partial sums of earlier input panels), else overwrites it.
// min(UMAX, S::csr_unroll(V)) accumulator sets hide FMA latency when V is small (on 16-register
// AVX2, V >= 4 keeps one set: V chains already). out: aligned.
template <typename S, typename WT, typename IT, int V, int UMAX = 4>
inline void csr_row_acc(const IT* col, const WT* val, int32_t k0, int32_t k1, const float* xt,
                        int64_t np, float* out, bool accumulate) {
  constexpr int W = S::W, U = S::csr_unroll(V) < UMAX ? S::csr_unroll(V) : UMAX;
  typename S::vec a[U][V];
  SE_UNROLL
  for (int v = 0; v < V; ++v) {
    a[0][v] = accumulate ? S::load(out + W * v) : S::zero();
    SE_UNROLL
    for (int u = 1; u < U; ++u) a[u][v] = S::zero();
  }
  int32_t k = k0;
  for (; k + U <= k1; k += U)
    SE_UNROLL
    for (int u = 0; u < U; ++u) {
      const auto w = S::bcast(val + k + u);
      const float* p = xt + int64_t(col[k + u]) * np;
      SE_UNROLL
      for (int v = 0; v < V; ++v) a[u][v] = S::fmadd(w, S::loadu(p + W * v), a[u][v]);
    }
  for (; k < k1; ++k) {
    const auto w = S::bcast(val + k);
    const float* p = xt + int64_t(col[k]) * np;
    SE_UNROLL
    for (int v = 0; v < V; ++v) a[0][v] = S::fmadd(w, S::loadu(p + W * v), a[0][v]);
  }
  SE_UNROLL
  for (int v = 0; v < V; ++v) {
    SE_UNROLL
    for (int u = 1; u < U; ++u) a[0][v] = S::add(a[0][v], a[u][v]);
    S::store(out + W * v, a[0][v]);
  }
}

// One CSR row, V vectors of batch columns: out[0 : W·V] = Σ_{k in [k0,k1)} val[k] · xt[col[k]·np + ...].
template <typename S, typename WT, typename IT, int V>
inline void csr_row(const IT* col, const WT* val, int32_t k0, int32_t k1, const float* xt,
                    int64_t np, float* out) {
  csr_row_acc<S, WT, IT, V>(col, val, k0, k1, xt, np, out, false);
}

// One SELL-4 group of one panel: 4 rows (lanes) with len entries each, slot (j, lane) at
// col/val[4·j + lane]; acc rows rows[lane] (row stride `stride` floats) += Σ_j val · xt[col·np].
template <typename S, typename WT, int V>
inline void csr_group_acc(const uint16_t* col, const WT* val, int32_t len, const int32_t* rows,
                          const float* xt, int64_t np, float* acc, int64_t stride) {
  constexpr int W = S::W;
  // The 4 row pointers first: the vector stores below may alias rows[] for the compiler.
  float* const out[4] = {acc + rows[0] * stride, acc + rows[1] * stride, acc + rows[2] * stride,
                         acc + rows[3] * stride};
  typename S::vec a[4][V];
  SE_UNROLL
  for (int r = 0; r < 4; ++r)
    SE_UNROLL
    for (int v = 0; v < V; ++v) a[r][v] = S::load(out[r] + W * v);
  for (int32_t j = 0; j < len; ++j, col += 4, val += 4)
    SE_UNROLL
    for (int r = 0; r < 4; ++r) {
      const auto w = S::bcast(val + r);
      const float* p = xt + int64_t(col[r]) * np;
      SE_UNROLL
      for (int v = 0; v < V; ++v) a[r][v] = S::fmadd(w, S::loadu(p + W * v), a[r][v]);
    }
  SE_UNROLL
  for (int r = 0; r < 4; ++r)
    SE_UNROLL
    for (int v = 0; v < V; ++v) S::store(out[r] + W * v, a[r][v]);
}

// Rows [r0, r0 + RB) of one BSR block row, V vectors of batch columns:
// out[rb][0 : W·V] = Σ_blocks Σ_c W[block][r0 + rb][c] · xt[(bcol·C + c)·np + ...].
// val: the values (nnzb, R, C); out row stride: out_stride floats (aligned rows).
template <typename S, typename WT, int RB, int V>
inline void bsr_rows(const int32_t* bcol, const WT* val, int32_t k0, int32_t k1, int64_t R, int64_t C,
                     int64_t r0, const float* xt, int64_t np, float* out, int64_t out_stride) {
  constexpr int U = S::bsr_unroll(RB * V), W = S::W;
  typename S::vec acc[U][RB][V];
  SE_UNROLL
  for (int u = 0; u < U; ++u)
    SE_UNROLL
    for (int rb = 0; rb < RB; ++rb)
      SE_UNROLL
      for (int v = 0; v < V; ++v) acc[u][rb][v] = S::zero();
  for (int32_t k = k0; k < k1; ++k) {
    const WT* w = val + (int64_t(k) * R + r0) * C;
    const float* xb = xt + int64_t(bcol[k]) * C * np;
    int64_t c = 0;
    for (; c + U <= C; c += U)
      SE_UNROLL
      for (int u = 0; u < U; ++u) {
        typename S::vec xv[V];
        SE_UNROLL
        for (int v = 0; v < V; ++v) xv[v] = S::loadu(xb + (c + u) * np + W * v);
        SE_UNROLL
        for (int rb = 0; rb < RB; ++rb) {
          const auto wv = S::bcast(w + rb * C + c + u);
          SE_UNROLL
          for (int v = 0; v < V; ++v) acc[u][rb][v] = S::fmadd(wv, xv[v], acc[u][rb][v]);
        }
      }
    for (; c < C; ++c)
      SE_UNROLL
      for (int rb = 0; rb < RB; ++rb) {
        const auto wv = S::bcast(w + rb * C + c);
        SE_UNROLL
        for (int v = 0; v < V; ++v) acc[0][rb][v] = S::fmadd(wv, S::loadu(xb + c * np + W * v), acc[0][rb][v]);
      }
  }
  SE_UNROLL
  for (int rb = 0; rb < RB; ++rb)
    SE_UNROLL
    for (int v = 0; v < V; ++v) {
      SE_UNROLL
      for (int u = 1; u < U; ++u) acc[0][rb][v] = S::add(acc[0][rb][v], acc[u][rb][v]);
      S::store(out + rb * out_stride + W * v, acc[0][rb][v]);
    }
}

// exp(u) for u <= 0: u = n·ln2 + r (|r| <= ln2/2), e^r by its degree-6 Taylor polynomial (relative
// error < 2e-7), times 2^n; u below -87 is clamped (the result is then < 1e-37). MAX returns its
// second operand for NaN: NaN stays NaN.
template <typename S>
typename S::vec exp_nonpositive(typename S::vec u) {
  u = S::max(S::set1(-87.f), u);
  const auto n = S::round(S::mul(u, S::set1(1.44269504088896341f)));
  auto r = S::fnmadd(n, S::set1(0.693145751953125f), u);  // ln2 in two parts
  r = S::fnmadd(n, S::set1(1.42860682030941723e-6f), r);
  auto e = S::set1(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) e = S::fmadd(e, r, S::set1(c));
  return S::scale2(e, n);
}

// 0.5·v·(1 + erf(v/√2)): with a = |x|, x = v/√2, Abramowitz & Stegun 7.1.26 gives 1 - erf(a) =
// q(t)·e^(-a²), t = 1/(1 + 0.3275911·a) (|error| <= 1.5e-7); 1 + erf(x) is 2 - q·e^(-a²) for x >= 0
// and q·e^(-a²) itself for x < 0 (no cancellation in the negative tail). NaN stays NaN. The
// accuracy is S's: recip and exp_nonpositive (bf16.cpp's bf16-output traits trade them for speed).
template <typename S>
typename S::vec gelu(typename S::vec v) {
  const auto x = S::mul(v, S::set1(0.70710678118654752f));
  const auto a = S::abs(x);
  const auto t = S::recip(S::fmadd(a, S::set1(0.3275911f), S::set1(1.f)));
  auto q = S::set1(1.061405429f);
  for (float c : {-1.453152027f, 1.421413741f, -0.284496736f, 0.254829592f}) q = S::fmadd(q, t, S::set1(c));
  q = S::mul(S::mul(q, t), S::exp_nonpositive(S::sub(S::zero(), S::mul(a, a))));
  const auto one_plus_erf = S::select_neg(x, q, S::sub(S::set1(2.f), q));
  return S::mul(S::mul(S::set1(0.5f), v), one_plus_erf);
}

// Rows [r0, r1) of a block of partial sums (row stride ld floats, aligned), the first nc columns
// (a multiple of W), in place: v <- act(v + bias[row]) (bias may be null).
template <typename S>
void bias_act_rows(float* h, int64_t ld, int64_t r0, int64_t r1, int64_t nc, const float* bias, int act) {
  for (int64_t r = r0; r < r1; ++r) {
    float* row = h + r * ld;
    const auto b = S::set1(bias ? bias[r] : 0.f);
    for (int64_t j = 0; j < nc; j += S::W) {
      auto v = S::add(S::load(row + j), b);
      if (act == ACT_RELU) v = S::max(S::zero(), v);  // NaN stays NaN (the second operand)
      else if (act == ACT_GELU) v = gelu<S>(v);
      S::store(row + j, v);
    }
    if (act > ACT_GELU)  // gelu_tanh: per element
      for (int64_t j = 0; j < nc; ++j) row[j] = activate(row[j], act);
  }
}

// ---- attention -------------------------------------------------------------------------------
// One query block (RB rows) of one (batch, head): scores against all S keys, softmax, times V.
// q: RB query rows (row stride ld); kt: packed Kᵀ (hs, sk), keys past S zero, sk a multiple of
// 2·W; v: S value rows (stride ld); p: RB x sk scratch; out: RB rows (stride ld_out). hs a
// multiple of W (the last value columns in one vector when hs - d < 2·W).
template <typename S, int RB>
void attention_rows(const float* q, int64_t ld, const float* kt, const float* v, int64_t Sq, int64_t sk, int64_t hs,
                    float scale, float* p, float* out, int64_t ld_out) {
  constexpr int W = S::W;
  for (int64_t j = 0; j < sk; j += 2 * W) {  // scores, 2·W keys (2 vectors) x RB rows in registers
    typename S::vec acc[RB][2];
    for (int r = 0; r < RB; ++r) acc[r][0] = acc[r][1] = S::zero();
    for (int64_t d = 0; d < hs; ++d) {
      const auto k0 = S::load(kt + d * sk + j), k1 = S::load(kt + d * sk + j + W);
      for (int r = 0; r < RB; ++r) {
        const auto qb = S::bcast(q + r * ld + d);
        acc[r][0] = S::fmadd(qb, k0, acc[r][0]);
        acc[r][1] = S::fmadd(qb, k1, acc[r][1]);
      }
    }
    for (int r = 0; r < RB; ++r) {
      S::store(p + r * sk + j, S::mul(acc[r][0], S::set1(scale)));
      S::store(p + r * sk + j + W, S::mul(acc[r][1], S::set1(scale)));
    }
  }
  float inv[RB];
  for (int r = 0; r < RB; ++r) {  // softmax over the S real keys; the padding keys get weight 0
    float* pr = p + r * sk;
    auto mv = S::set1(-INFINITY);
    int64_t j = 0;
    for (; j + W <= Sq; j += W) mv = S::max(mv, S::load(pr + j));  // not a scalar chain
    float m = S::hmax(mv);
    for (; j < Sq; ++j) m = std::max(m, pr[j]);
    auto sum = S::zero();
    j = 0;
    for (; j + W <= Sq; j += W) {
      const auto e = S::exp_nonpositive(S::sub(S::load(pr + j), S::set1(m)));
      S::store(pr + j, e);
      sum = S::add(sum, e);
    }
    float tail = 0.f;
    for (; j < Sq; ++j) tail += (pr[j] = std::exp(pr[j] - m));
    for (; j < sk; ++j) pr[j] = 0.f;
    inv[r] = 1.f / (S::hsum(sum) + tail);
  }
  for (int64_t d = 0; d < hs; d += 2 * W) {  // out = P · V, 2·W value columns x RB rows in registers
    const int nv = hs - d >= 2 * W ? 2 : 1;
    typename S::vec acc[RB][2];
    for (int r = 0; r < RB; ++r) acc[r][0] = acc[r][1] = S::zero();
    for (int64_t j = 0; j < Sq; ++j) {
      const auto v0 = S::loadu(v + j * ld + d);
      const auto v1 = nv == 2 ? S::loadu(v + j * ld + d + W) : S::zero();
      for (int r = 0; r < RB; ++r) {
        const auto pb = S::bcast(p + r * sk + j);
        acc[r][0] = S::fmadd(pb, v0, acc[r][0]);
        acc[r][1] = S::fmadd(pb, v1, acc[r][1]);
      }
    }
    for (int r = 0; r < RB; ++r) {
      S::storeu(out + r * ld_out + d, S::mul(acc[r][0], S::set1(inv[r])));
      if (nv == 2) S::storeu(out + r * ld_out + d + W, S::mul(acc[r][1], S::set1(inv[r])));
    }
  }
}

// softmax(Q Kᵀ · scale) V for one (batch, head) task, read straight from the QKV projection's
// output (B·S, 3·nh·hs) and written as (B·S, nh·hs). Kᵀ packed per task; queries in blocks of
// S::attention_rows, then of 4, then one by one.
template <typename S>
void attention_task(const float* qkv, float* out, int64_t Sq, int64_t nh, int64_t hs, float scale, int64_t task) {
  const int64_t H = nh * hs, ld = 3 * H, sk = (Sq + 2 * S::W - 1) / (2 * S::W) * (2 * S::W);
  const int64_t b = task / nh, h = task % nh;
  const float* q = qkv + b * Sq * ld + h * hs;
  const float* k = q + H;
  const float* v = q + 2 * H;
  float* kt = scratch(0, size_t(hs * sk));
  constexpr int RB = S::attention_rows;
  float* p = scratch(1, size_t(RB * sk));
  for (int64_t d = 0; d < hs; ++d)
    for (int64_t j = 0; j < sk; ++j) kt[d * sk + j] = j < Sq ? k[j * ld + d] : 0.f;
  float* o = out + b * Sq * H + h * hs;
  int64_t i = 0;
  for (; i + RB <= Sq; i += RB) attention_rows<S, RB>(q + i * ld, ld, kt, v, Sq, sk, hs, scale, p, o + i * H, H);
  if constexpr (RB > 4)
    for (; i + 4 <= Sq; i += 4) attention_rows<S, 4>(q + i * ld, ld, kt, v, Sq, sk, hs, scale, p, o + i * H, H);
  for (; i < Sq; ++i) attention_rows<S, 1>(q + i * ld, ld, kt, v, Sq, sk, hs, scale, p, o + i * H, H);
}

}  // namespace simd
}  // namespace se
