// Portable C++ kernels: the fallback for CPUs without AVX2/FMA, and the path tests force to check
// it. Straight loops in the reference's order; speed comes from the AVX2 file.
#include "common.h"
#include "sparse_linear.h"

namespace se {
namespace {

// csr_portable and bsr_portable share their outline (thread split, batch loop, bias, activation)
// on purpose: each is the plain scalar reference of its format, kept in the reference's order so
// it can be read against engine/reference.py line by line.
template <typename WT>
void csr_portable(const LinearArgs& a) {
  const WT* val = static_cast<const WT*>(a.values);
  const int64_t N = a.n, I = a.in_features, O = a.out_features;
  const int T = pick_threads(a.nthreads, est_spmv_csr(double(a.crow[O]) * double(N)));
#pragma omp parallel num_threads(T) if (T > 1)
  {
    const int t = thread_id(), nt = team_size();
    const int64_t o0 = split_begin(a.crow, O, 1, 4, t, nt), o1 = split_begin(a.crow, O, 1, 4, t + 1, nt);
    for (int64_t n = 0; n < N; ++n) {
      const float* x = a.x + n * I;
      float* y = a.y + n * O;
      for (int64_t o = o0; o < o1; ++o) {
        float s = 0.f;
        if (a.col16)
          for (int32_t k = a.crow[o]; k < a.crow[o + 1]; ++k) s += to_f32(val[k]) * x[a.col16[k]];
        else
          for (int32_t k = a.crow[o]; k < a.crow[o + 1]; ++k) s += to_f32(val[k]) * x[a.col[k]];
        if (a.bias) s += a.bias[o];
        y[o] = activate(s, a.act);
      }
    }
  }
}

template <typename WT>
void bsr_portable(const LinearArgs& a) {
  const WT* val = static_cast<const WT*>(a.values);
  const int64_t N = a.n, I = a.in_features, O = a.out_features, R = a.block_r, C = a.block_c;
  const int64_t BR = O / R;
  const int T = pick_threads(a.nthreads, est_spmv_csr(double(a.crow[BR]) * double(R * C) * double(N)));
#pragma omp parallel num_threads(T) if (T > 1)
  {
    const int t = thread_id(), nt = team_size();
    const int64_t b0 = split_begin(a.crow, BR, 1, 1, t, nt), b1 = split_begin(a.crow, BR, 1, 1, t + 1, nt);
    for (int64_t n = 0; n < N; ++n) {
      const float* x = a.x + n * I;
      float* y = a.y + n * O;
      for (int64_t b = b0; b < b1; ++b) {
        for (int64_t r = 0; r < R; ++r) {
          float s = 0.f;
          for (int32_t k = a.crow[b]; k < a.crow[b + 1]; ++k) {
            const WT* w = val + (int64_t(k) * R + r) * C;
            const float* xb = x + int64_t(a.col[k]) * C;
            for (int64_t c = 0; c < C; ++c) s += to_f32(w[c]) * xb[c];
          }
          const int64_t o = b * R + r;
          if (a.bias) s += a.bias[o];
          y[o] = activate(s, a.act);
        }
      }
    }
  }
}

}  // namespace

void csr_linear_portable(const LinearArgs& a) {
  with_wtype(a.wdtype, [&](auto w) { csr_portable<decltype(w)>(a); });
}

void bsr_linear_portable(const LinearArgs& a) {
  with_wtype(a.wdtype, [&](auto w) { bsr_portable<decltype(w)>(a); });
}

}  // namespace se
