// bf16-compute kernels (see bf16.h): run-time detection, the AMX tile kernel and the AVX512-BF16
// dot-product kernel for BSR, the AVX512-BF16 CSR kernel, and attention on AMX tiles. Compiled with
// function-level target options like avx2.cpp, so the module still loads on CPUs without these
// features; they are chosen only when detected.
//
// AMX kernel, per 16-row block row (R <= 16 outputs) and per 64 rows of the (bf16, zero-padded to
// a multiple of 16 rows) batch:
//   tiles 0-3  C: fp32 accumulators, 16 batch rows × R outputs each (4 chunks of 16 batch rows)
//   tiles 4,6,7 A: 16 batch rows × C inputs of X, loaded straight from row-major bf16 X (stride I)
//   tile  5    B: one packed weight block, C/2 rows × R pairs (the block's whole 1 KiB at 16×32)
// Each block: one B load, then per batch chunk one A load + one TDPBF16PS (three A tiles in turn,
// so a load need not wait for the previous TDPBF16PS to finish reading its tile). The C tiles are stored to
// a per-thread buffer and written to Y with bias + activation. Batch is the tile's M dimension, so
// Y tiles come out row-major (no transpose), and a weight block is loaded once per 64 batch rows.
// Threads split the batch rows once each gets 64 or more (whole output rows per thread), else the
// block rows. The same file holds the AMX attention kernel (attention_amx, at its end).
#include "bf16.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <stdexcept>

#include "common.h"

namespace se {
namespace {
std::atomic<int> g_bf16{-1};
std::atomic<int> g_last{KERNEL_NONE};
}  // namespace

Bf16Isa best_bf16_isa() {
  return amx_usable() ? BF16_AMX : (avx512_bf16_usable() ? BF16_AVX512 : BF16_NONE);
}

Bf16Isa current_bf16_isa() {
  if (current_isa() != ISA_AVX512) return BF16_NONE;
  int v = g_bf16.load(std::memory_order_relaxed);
  if (v < 0) {
    v = best_bf16_isa();
    g_bf16.store(v);
  }
  return static_cast<Bf16Isa>(v);
}

void set_bf16_isa(Bf16Isa isa) {
  std::string why;
  if (isa == BF16_AMX && !amx_usable(&why)) throw std::runtime_error("set_bf16_isa: " + why);
  if (isa == BF16_AVX512 && !avx512_bf16_usable(&why)) throw std::runtime_error("set_bf16_isa: " + why);
  g_bf16.store(isa);
}

Bf16Kernel last_bf16_kernel() { return static_cast<Bf16Kernel>(g_last.load(std::memory_order_relaxed)); }

}  // namespace se

// AMX intrinsics need GCC >= 11 or clang >= 12; older compilers build the module without them.
#if (defined(__x86_64__) || defined(__i386__)) && \
    ((defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11))
#define SE_BF16_KERNELS 1
#endif

#ifndef SE_BF16_KERNELS
namespace se {
static const char* const kNoBf16 = "built without AMX/AVX512-BF16 kernels (not x86, or compiler older than GCC 11 / clang 12)";
bool amx_usable(std::string* reason) {
  if (reason) *reason = kNoBf16;
  return false;
}
bool avx512_bf16_usable(std::string* reason) {
  if (reason) *reason = kNoBf16;
  return false;
}
void bsr_linear_bf16(const LinearArgs&) { throw std::runtime_error(std::string("bsr_linear_bf16: ") + kNoBf16); }
void csr_linear_bf16(const LinearArgs&) { throw std::runtime_error(std::string("csr_linear_bf16: ") + kNoBf16); }
void attention_amx(const uint16_t*, uint16_t*, int64_t, int64_t, int64_t, int64_t, float, int) {
  throw std::runtime_error(std::string("attention_amx: ") + kNoBf16);
}
}  // namespace se
#else

#include <cpuid.h>
#include <immintrin.h>
#if defined(__linux__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace se {
namespace {

struct Cpu {
  bool osxsave = false, avx512 = false, avx512_bf16 = false, amx_tile = false, amx_bf16 = false;
  uint64_t xcr0 = 0;
};

uint64_t xgetbv0() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  return (uint64_t(hi) << 32) | lo;
}

const Cpu& cpu() {
  static const Cpu c = [] {
    Cpu r;
    unsigned a, b, cx, d;
    if (!__get_cpuid(1, &a, &b, &cx, &d)) return r;
    r.osxsave = cx & (1u << 27);
    if (r.osxsave) r.xcr0 = xgetbv0();
    if (!__get_cpuid_count(7, 0, &a, &b, &cx, &d)) return r;
    r.avx512 = (b & (1u << 16)) && (b & (1u << 30)) && (b & (1u << 31));  // F, BW, VL
    r.amx_bf16 = d & (1u << 22);
    r.amx_tile = d & (1u << 24);
    if (__get_cpuid_count(7, 1, &a, &b, &cx, &d)) r.avx512_bf16 = a & (1u << 5);
    return r;
  }();
  return c;
}

constexpr uint64_t kXcr0Avx512 = 0xE6;      // SSE, AVX, opmask, ZMM_Hi256, Hi16_ZMM state
constexpr uint64_t kXcr0Amx = 3ull << 17;   // XTILECFG, XTILEDATA state

#if defined(__linux__)
constexpr long kArchReqXcompPerm = 0x1023;  // arch_prctl(ARCH_REQ_XCOMP_PERM, feature)
constexpr long kXfeatureXtiledata = 18;
#endif

}  // namespace

bool avx512_bf16_usable(std::string* reason) {
  const Cpu& c = cpu();
  const char* why = nullptr;
  if (!c.avx512) why = "CPU lacks AVX-512F/BW/VL";
  else if (!c.avx512_bf16) why = "CPU lacks AVX512-BF16 (vdpbf16ps)";
  else if (!c.osxsave || (c.xcr0 & kXcr0Avx512) != kXcr0Avx512) why = "OS does not enable AVX-512 state (XCR0)";
  if (reason) *reason = why ? why : "";
  return !why;
}

bool amx_usable(std::string* reason) {
  // Checked (and permission requested) once; the answer never changes within a process.
  static const std::string why = [] {
    const char* off = std::getenv("SPARSE_ENGINE_NO_AMX");
    if (off && std::string(off) == "1") return std::string("disabled by SPARSE_ENGINE_NO_AMX=1");
    const Cpu& c = cpu();
    if (!c.amx_tile || !c.amx_bf16) return std::string("CPU lacks AMX-TILE/AMX-BF16");
    std::string sub;
    if (!avx512_bf16_usable(&sub)) return "AMX kernel converts X with AVX512-BF16, but: " + sub;
    if (!c.osxsave || (c.xcr0 & kXcr0Amx) != kXcr0Amx) return std::string("OS does not enable AMX tile state (XCR0)");
#if defined(__linux__)
    if (syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) != 0)
      return std::string("Linux refused AMX tile data permission (arch_prctl ARCH_REQ_XCOMP_PERM)");
    return std::string();
#else
    return std::string("AMX permission request is implemented for Linux only");
#endif
  }();
  if (reason) *reason = why;
  return why.empty();
}

}  // namespace se

#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's AVX-512 headers trip -Wmaybe-uninitialized on their own _mm512_undefined_ps (GCC bug
// 105593), and -Wuninitialized on the shuffles of transpose16; nothing here reads an
// uninitialized value.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"
#endif
SE_TARGET_PUSH("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16,avx2,fma,f16c")

#include "simd_kernels.h"
#include "zmm_traits.h"

namespace se {
namespace {

constexpr int64_t kTile = 16;           // batch rows per tile (M) and max outputs per block (N)
constexpr int64_t kAmxChunks = 4;       // batch tiles per weight-tile load
constexpr int kDpRows = 8;              // batch rows per AVX512-BF16 register block
constexpr int64_t kXCacheBytes = 1 << 20;  // bf16 X kept per pass over the weights (~half an L2)

// X rows [r0, r1) of (N, I) -> bf16 (fp32 rounded to nearest even; bf16 copied); rows >= N are
// zero (AMX tile padding).
void to_bf16_rows(const void* x, bool x_bf16, int64_t N, int64_t I, int64_t r0, int64_t r1, uint16_t* xb) {
  for (int64_t r = r0; r < r1; ++r) {
    uint16_t* dst = xb + r * I;
    if (r >= N) {
      std::memset(dst, 0, size_t(I) * 2);
      continue;
    }
    if (x_bf16) {
      std::memcpy(dst, static_cast<const uint16_t*>(x) + r * I, size_t(I) * 2);
      continue;
    }
    const float* src = static_cast<const float*>(x) + r * I;
    for (int64_t i = 0; i < I; i += 16) {
      const __mmask16 m = I - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (I - i)) - 1);
      const __m256bh h = _mm512_cvtneps_pbh(_mm512_maskz_loadu_ps(m, src + i));
      _mm256_mask_storeu_epi16(dst + i, m, reinterpret_cast<const __m256i&>(h));
    }
  }
}

// exp(x), 16 lanes: n = round(x / ln2), r = x - n·ln2 (two-part ln2), e^r by its degree-6 Taylor
// polynomial (|r| <= 0.35: relative error ~1e-7), times 2^n by VSCALEFPS. x is clamped to ±88.7
// (finite results); NaN stays NaN (min/max return their second operand for NaN).
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-88.7f), _mm512_min_ps(_mm512_set1_ps(88.7f), x));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.f / 720);
  for (float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// 2^x for x <= 0 (the softmax's shifted scores, the bf16 GELU's -a²·log2 e): n = round(x), 2^(x - n)
// by its degree-4 Taylor polynomial in (x - n)·ln2 (|x - n| <= 0.5: relative error < 4e-5, well
// below a bf16 rounding), times 2^n by VSCALEFPS; x clamped at -127 (results ~0, also for -inf);
// NaN stays NaN (MAXPS returns its second operand).
inline __m512 exp2_nonpositive(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-127.f), x);
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 p = _mm512_set1_ps(9.61812911e-3f);
  for (float c : {5.55041087e-2f, 0.240226507f, 0.693147181f, 1.f}) p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(c));
  return _mm512_scalef_ps(p, n);
}

// The erf-GELU (simd::gelu) for a bf16 result, rounded to 2^-9 relative: 1/d by VRCP14PS alone
// (2^-14) and e^u as 2^(u·log2 e) by exp2_nonpositive (< 4e-5) keep the relative error of 1 ± erf
// at ~1e-4, also in the negative tail, a twentieth of the rounding, in ~24 vector operations
// instead of ~32. fp32 results take the Avx512 traits (1/d divided, e^u to ~1e-7).
struct Avx512Bf16Out : Avx512 {
  static __m512 recip(__m512 d) { return _mm512_rcp14_ps(d); }
  static __m512 exp_nonpositive(__m512 u) { return exp2_nonpositive(_mm512_mul_ps(u, _mm512_set1_ps(1.44269504f))); }
};

// tanh-GELU: 0.5·v·(1 + tanh(u)) = v / (1 + e^(-2u)), u = √(2/π)·(v + 0.044715·v³).
inline __m512 gelu_tanh512(__m512 v) {
  const __m512 v3 = _mm512_mul_ps(_mm512_mul_ps(v, v), v);
  const __m512 u = _mm512_mul_ps(_mm512_set1_ps(0.79788456f), _mm512_fmadd_ps(v3, _mm512_set1_ps(0.044715f), v));
  const __m512 e = exp512(_mm512_mul_ps(u, _mm512_set1_ps(-2.f)));
  return _mm512_div_ps(v, _mm512_add_ps(_mm512_set1_ps(1.f), e));
}

// buf rows [0, rows) of 16 fp32 (row stride 16) -> Y[n0 + r, o0 : o0 + R] = act(buf + bias), Y in
// fp32 or, when a.y_bf16, rounded to bf16 (RNE) in the same pass (erf-GELU then by Avx512Bf16Out).
template <int ACT, bool Y16>
void store_rows_as(const LinearArgs& a, const float* buf, int64_t rows, int64_t n0, int64_t o0, int64_t R) {
  const __mmask16 m = __mmask16((1u << R) - 1);
  const __m512 b = a.bias ? _mm512_maskz_loadu_ps(m, a.bias + o0) : _mm512_setzero_ps();
  const int64_t ld = a.out_features;
  float* y32 = a.y + n0 * ld + o0;
  uint16_t* y16 = static_cast<uint16_t*>(static_cast<void*>(a.y)) + n0 * ld + o0;
  for (int64_t r = 0; r < rows; ++r) {
    __m512 v = _mm512_add_ps(_mm512_load_ps(buf + r * kTile), b);
    // max(0, v) returns its second operand when either is NaN: relu(NaN) = NaN, as in torch.
    if (ACT == ACT_RELU) v = _mm512_max_ps(_mm512_setzero_ps(), v);
    if (ACT == ACT_GELU) v = simd::gelu<std::conditional_t<Y16, Avx512Bf16Out, Avx512>>(v);
    if (ACT == ACT_GELU_TANH) v = gelu_tanh512(v);
    if (Y16) {
      const __m256bh h = _mm512_cvtneps_pbh(v);
      _mm256_mask_storeu_epi16(y16 + r * ld, m, reinterpret_cast<const __m256i&>(h));
    } else {
      _mm512_mask_storeu_ps(y32 + r * ld, m, v);
    }
  }
}

template <bool Y16>
void store_rows_y(const LinearArgs& a, const float* buf, int64_t rows, int64_t n0, int64_t o0, int64_t R) {
  switch (a.act) {
    case ACT_RELU: store_rows_as<ACT_RELU, Y16>(a, buf, rows, n0, o0, R); break;
    case ACT_GELU: store_rows_as<ACT_GELU, Y16>(a, buf, rows, n0, o0, R); break;
    case ACT_GELU_TANH: store_rows_as<ACT_GELU_TANH, Y16>(a, buf, rows, n0, o0, R); break;
    default: store_rows_as<ACT_NONE, Y16>(a, buf, rows, n0, o0, R); break;
  }
}

void store_rows(const LinearArgs& a, const float* buf, int64_t rows, int64_t n0, int64_t o0, int64_t R) {
  if (a.y_bf16) store_rows_y<true>(a, buf, rows, n0, o0, R);
  else store_rows_y<false>(a, buf, rows, n0, o0, R);
}

// ---- AMX ----------------------------------------------------------------------------------------
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void load_tile_config(int64_t R, int64_t C) {
  TileConfig cfg;
  for (int t = 0; t < 4; ++t) { cfg.rows[t] = kTile; cfg.colsb[t] = uint16_t(R * 4); }  // C tiles
  for (int t : {4, 6, 7}) { cfg.rows[t] = kTile; cfg.colsb[t] = uint16_t(C * 2); }       // A tiles
  cfg.rows[5] = uint8_t(C / 2);                                                             // B tile
  cfg.colsb[5] = uint16_t(R * 4);
  _tile_loadconfig(&cfg);
}

// One block row, J (1..4) chunks of 16 batch rows from xb (pre-offset to the first chunk's row):
// buf[j·16·ldb ...] = Σ_blocks X_chunk_j · W_blockᵀ (16 × R fp32, row stride ldb).
template <int J>
void amx_block_row(const uint16_t* xb, int64_t I, const int32_t* bcol, const uint16_t* pk,
                   int32_t k0, int32_t k1, int64_t R, int64_t C, float* buf, int64_t ldb = kTile) {
  _tile_zero(0);
  if (J > 1) _tile_zero(1);
  if (J > 2) _tile_zero(2);
  if (J > 3) _tile_zero(3);
  const int64_t xs = I * 2;  // bytes between batch rows of X
  for (int32_t k = k0; k < k1; ++k) {
    _tile_loadd(5, pk + int64_t(k) * R * C, R * 4);
    const uint16_t* xp = xb + int64_t(bcol[k]) * C;
    _tile_loadd(4, xp, xs);
    _tile_dpbf16ps(0, 4, 5);
    if (J > 1) { _tile_loadd(6, xp + kTile * I, xs); _tile_dpbf16ps(1, 6, 5); }
    if (J > 2) { _tile_loadd(4, xp + 2 * kTile * I, xs); _tile_dpbf16ps(2, 4, 5); }
    if (J > 3) { _tile_loadd(7, xp + 3 * kTile * I, xs); _tile_dpbf16ps(3, 7, 5); }
  }
  _tile_stored(0, buf, ldb * 4);
  if (J > 1) _tile_stored(1, buf + kTile * ldb, ldb * 4);
  if (J > 2) _tile_stored(2, buf + 2 * kTile * ldb, ldb * 4);
  if (J > 3) _tile_stored(3, buf + 3 * kTile * ldb, ldb * 4);
}

// y row (O) = LayerNorm(v + bias + residual) · gamma + beta, v the row's fp32 sums (overwritten).
void add_norm_row(const LinearArgs& a, float* v, const uint16_t* res, uint16_t* y) {
  const int64_t O = a.out_features;
  auto mask = [&](int64_t i) { return O - i >= 16 ? __mmask16(0xffff) : __mmask16((1u << (O - i)) - 1); };
  __m512 sum = _mm512_setzero_ps();
  for (int64_t i = 0; i < O; i += 16) {
    const __mmask16 m = mask(i);
    __m512 x = _mm512_maskz_loadu_ps(m, v + i);
    if (a.bias) x = _mm512_add_ps(x, _mm512_maskz_loadu_ps(m, a.bias + i));
    const __m512i r = _mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, res + i));
    x = _mm512_add_ps(x, _mm512_castsi512_ps(_mm512_slli_epi32(r, 16)));
    _mm512_mask_storeu_ps(v + i, m, x);
    sum = _mm512_add_ps(sum, x);
  }
  const __m512 mean = _mm512_set1_ps(_mm512_reduce_add_ps(sum) / float(O));
  __m512 sq = _mm512_setzero_ps();
  for (int64_t i = 0; i < O; i += 16) {
    const __m512 d = _mm512_maskz_sub_ps(mask(i), _mm512_maskz_loadu_ps(mask(i), v + i), mean);
    sq = _mm512_fmadd_ps(d, d, sq);
  }
  const __m512 rstd = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(sq) / float(O) + a.ln_eps));
  for (int64_t i = 0; i < O; i += 16) {
    const __mmask16 m = mask(i);
    __m512 o = _mm512_mul_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, v + i), mean), rstd);
    if (a.ln_gamma) o = _mm512_mul_ps(o, _mm512_maskz_loadu_ps(m, a.ln_gamma + i));
    if (a.ln_beta) o = _mm512_add_ps(o, _mm512_maskz_loadu_ps(m, a.ln_beta + i));
    const __m256bh h = _mm512_cvtneps_pbh(o);
    _mm256_mask_storeu_epi16(y + i, m, reinterpret_cast<const __m256i&>(h));
  }
}

// Block rows [b0, b1) for batch rows [r0, r1) (r0 a multiple of 16), 64 batch rows at a time. With a
// residual (a.residual, whole rows: b0 = 0, b1 = all), each group's sums go to rows (64 × O fp32),
// then residual + LayerNorm per row; else each tile through buf to Y with store_rows.
void amx_rows(const LinearArgs& a, const uint16_t* xb, int64_t b0, int64_t b1, int64_t r0, int64_t r1, float* buf,
              float* rows) {
  const int64_t R = a.block_r, C = a.block_c, I = a.in_features, N = a.n, O = a.out_features;
  const auto* pk = static_cast<const uint16_t*>(a.values);
  const int64_t group = kAmxChunks * kTile;
  load_tile_config(R, C);
  for (int64_t n0 = r0; n0 < r1; n0 += group) {
    const int64_t J = std::min<int64_t>(kAmxChunks, (r1 - n0 + kTile - 1) / kTile);
    const uint16_t* xc = xb + n0 * I;
    for (int64_t b = b0; b < b1; ++b) {
      const int32_t k0 = a.crow[b], k1 = a.crow[b + 1];
      float* out = a.residual ? rows + b * R : buf;
      const int64_t ldo = a.residual ? O : kTile;
      switch (J) {
        case 1: amx_block_row<1>(xc, I, a.col, pk, k0, k1, R, C, out, ldo); break;
        case 2: amx_block_row<2>(xc, I, a.col, pk, k0, k1, R, C, out, ldo); break;
        case 3: amx_block_row<3>(xc, I, a.col, pk, k0, k1, R, C, out, ldo); break;
        default: amx_block_row<4>(xc, I, a.col, pk, k0, k1, R, C, out, ldo); break;
      }
      if (!a.residual)
        for (int64_t j = 0; j < J; ++j)
          store_rows(a, buf + j * 256, std::min<int64_t>(kTile, N - n0 - j * kTile), n0 + j * kTile, b * R, R);
    }
    if (a.residual) {
      auto* y = static_cast<uint16_t*>(static_cast<void*>(a.y));
      for (int64_t r = 0; r < std::min(J * kTile, N - n0); ++r)
        add_norm_row(a, rows + r * O, a.residual + (n0 + r) * O, y + (n0 + r) * O);
    }
  }
  _tile_release();
}

// ---- AVX512-BF16 --------------------------------------------------------------------------------
// One block row, NB (1..8) batch rows from xb (pre-offset to the first row): buf[r·16 ...] =
// Σ_blocks Σ_pairs W pair (R lanes) · broadcast X pair, by VDPBF16PS.
template <int NB>
void dp_block_row(const uint16_t* xb, int64_t I, const int32_t* bcol, const uint16_t* pk, int32_t k0,
                  int32_t k1, int64_t R, int64_t C, float* buf) {
  const __mmask32 wm = R >= 16 ? ~__mmask32(0) : __mmask32((1u << (2 * R)) - 1);
  __m512 acc[NB];
  for (int r = 0; r < NB; ++r) acc[r] = _mm512_setzero_ps();
  for (int32_t k = k0; k < k1; ++k) {
    const uint16_t* w = pk + int64_t(k) * R * C;
    const uint16_t* x = xb + int64_t(bcol[k]) * C;
    for (int64_t p = 0; p < C / 2; ++p) {
      const __m512i wv = _mm512_maskz_loadu_epi16(wm, w + p * 2 * R);
      for (int r = 0; r < NB; ++r) {
        uint32_t pair;
        std::memcpy(&pair, x + r * I + 2 * p, 4);
        acc[r] = _mm512_dpbf16_ps(acc[r], (__m512bh)wv, (__m512bh)_mm512_set1_epi32(int(pair)));
      }
    }
  }
  for (int r = 0; r < NB; ++r) _mm512_store_ps(buf + r * kTile, acc[r]);
}

void dp_rows(const LinearArgs& a, const uint16_t* xb, int64_t b0, int64_t b1, float* buf) {
  const int64_t R = a.block_r, C = a.block_c, I = a.in_features, N = a.n;
  const auto* pk = static_cast<const uint16_t*>(a.values);
  for (int64_t n0 = 0; n0 < N; n0 += kDpRows) {
    const int64_t nb = std::min<int64_t>(kDpRows, N - n0);
    const uint16_t* xc = xb + n0 * I;
    for (int64_t b = b0; b < b1; ++b) {
      const int32_t k0 = a.crow[b], k1 = a.crow[b + 1];
      switch (nb) {
        case 1: dp_block_row<1>(xc, I, a.col, pk, k0, k1, R, C, buf); break;
        case 2: dp_block_row<2>(xc, I, a.col, pk, k0, k1, R, C, buf); break;
        case 3: dp_block_row<3>(xc, I, a.col, pk, k0, k1, R, C, buf); break;
        case 4: dp_block_row<4>(xc, I, a.col, pk, k0, k1, R, C, buf); break;
        case 5: dp_block_row<5>(xc, I, a.col, pk, k0, k1, R, C, buf); break;
        case 6: dp_block_row<6>(xc, I, a.col, pk, k0, k1, R, C, buf); break;
        case 7: dp_block_row<7>(xc, I, a.col, pk, k0, k1, R, C, buf); break;
        default: dp_block_row<8>(xc, I, a.col, pk, k0, k1, R, C, buf); break;
      }
      store_rows(a, buf, nb, n0, b * R, R);
    }
  }
}

}  // namespace

void bsr_linear_bf16(const LinearArgs& a) {
  const Bf16Isa isa = current_bf16_isa();
  if (isa == BF16_NONE) throw std::runtime_error("bsr_linear_bf16: no bf16 ISA selected");
  if (a.residual && (isa != BF16_AMX || !a.y_bf16 || a.act != ACT_NONE))
    throw std::invalid_argument("bsr_linear_bf16: residual + LayerNorm needs the AMX kernel, bf16 y and no activation");
  g_last.store(isa == BF16_AMX ? KERNEL_BSR_AMX : KERNEL_BSR_AVX512, std::memory_order_relaxed);
  if (a.n == 0 || a.out_features == 0) return;
  const int64_t N = a.n, I = a.in_features, nbr = a.out_features / a.block_r;
  const int64_t n_pad = isa == BF16_AMX ? (N + kTile - 1) / kTile * kTile : N;
  // bf16 X (n_pad, I): x itself when it is bf16 and needs no tile padding, else a shared copy
  // allocated by the calling thread (thread 0 of the team) and filled by the team.
  const bool direct = a.x_bf16 && n_pad == N;
  auto* xb = direct ? static_cast<uint16_t*>(const_cast<void*>(static_cast<const void*>(a.x)))
                    : reinterpret_cast<uint16_t*>(scratch(0, size_t((n_pad * I + 1) / 2 + 16)));
  const double flops = 2.0 * double(a.crow[nbr]) * double(a.block_r * a.block_c) * double(N);
  const int T = pick_threads(a.nthreads, flops * 0.01e-9);
  // AMX: threads split the batch rows (each writes whole output rows, reads all the weights) once
  // each gets 64 rows; below that, the block rows. Rows won at 128-4096 rows on BERT and MiniLM
  // shapes (2 threads: up to 1.4x at 4096 rows), where split block rows left each thread writing
  // half of every output line.
  const bool by_rows = isa == BF16_AMX && (n_pad >= kAmxChunks * kTile * T || a.residual);
#pragma omp parallel num_threads(T) if (T > 1)
  {
    const int t = thread_id(), nt = team_size();
    if (!direct) {
      to_bf16_rows(a.x, a.x_bf16, N, I, n_pad * t / nt, n_pad * (t + 1) / nt, xb);
#pragma omp barrier
    }
    float* buf = scratch(1, size_t(kAmxChunks * kTile * kTile));
    float* rows = a.residual ? scratch(2, size_t(kAmxChunks * kTile * a.out_features)) : nullptr;
    if (by_rows) {  // each thread: whole output rows (16-row tiles), all block rows
      const int64_t tiles = n_pad / kTile;
      amx_rows(a, xb, 0, nbr, tiles * t / nt * kTile, tiles * (t + 1) / nt * kTile, buf, rows);
    } else {
      const int64_t b0 = split_begin(a.crow, nbr, 1, 1, t, nt), b1 = split_begin(a.crow, nbr, 1, 1, t + 1, nt);
      if (b0 < b1) {
        if (isa == BF16_AMX) amx_rows(a, xb, b0, b1, 0, n_pad, buf, nullptr); else dp_rows(a, xb, b0, b1, buf);
      }
    }
  }
}


// ---- AVX512-BF16, unstructured (CSR with paired entries, see bf16.h) ----------------------------
namespace {

constexpr int64_t kCsrBatchMin = 9;   // batch rows from which X is transposed (up to 2 groups of 4 gathered)
constexpr int64_t kChunk32 = 32;      // batch rows per pair of accumulators (one 64-byte Xᵀ load)
constexpr int kCsrChunks = 4;         // 32-row chunks per pass over a row's pairs: 8 accumulators
constexpr int64_t kQuad = 4;          // batch rows per 64-bit gather element

// N = 1: xs (I + 2) <- x with a zero before and after, so a 32-bit gather at any column (k1 one
// element right, k2 one element left) stays inside the buffer.
void zero_bordered(const uint16_t* x, int64_t I, uint16_t* xs) {
  xs[0] = xs[I + 1] = 0;
  std::memcpy(xs + 1, x, size_t(I) * 2);
}

// N = 1: Σ_pairs (w1·x[k1] + w2·x[k2]) over pairs [p0, p1): 16 pairs per VDPBF16PS, the x pairs
// from two 32-bit gathers of xs blended by 16-bit halves.
float csr_pairs_gather(const uint32_t* pcol, const uint32_t* pval, int32_t p0, int32_t p1, const uint16_t* xs) {
  __m512 acc = _mm512_setzero_ps();
  const __m512i lo16 = _mm512_set1_epi32(0xffff), zero = _mm512_setzero_si512();
  for (int32_t p = p0; p < p1; p += 16) {
    const __mmask16 m = p1 - p >= 16 ? __mmask16(0xffff) : __mmask16((1u << (p1 - p)) - 1);
    const __m512i cv = _mm512_maskz_loadu_epi32(m, pcol + p);
    const __m512i wv = _mm512_maskz_loadu_epi32(m, pval + p);
    const __m512i k1 = _mm512_and_si512(cv, lo16), k2 = _mm512_srli_epi32(cv, 16);
    // low half: xs[k1 + 1] = x[k1]; high half: xs[k2 + 1] = x[k2]
    const __m512i g1 = _mm512_mask_i32gather_epi32(zero, m, k1, xs + 1, 2);
    const __m512i g2 = _mm512_mask_i32gather_epi32(zero, m, k2, xs, 2);
    acc = _mm512_dpbf16_ps(acc, (__m512bh)wv, (__m512bh)_mm512_mask_blend_epi16(__mmask32(0xaaaaaaaau), g1, g2));
  }
  return _mm512_reduce_add_ps(acc);
}

// 2 <= N < kCsrBatchMin: xq (G, I, 4) <- the batch's column quads, group g of batch rows
// [4g, 4g + 4): xq[g][k] = (x_4g[k], .., x_4g+3[k]), rows >= N zero.
void feature_quads(const uint16_t* x, int64_t N, int64_t I, uint16_t* xq) {
  for (int64_t g = 0; g * kQuad < N; ++g)
    for (int64_t k = 0; k < I; ++k)
      for (int64_t n = 0; n < kQuad; ++n) {
        const int64_t row = g * kQuad + n;
        xq[(g * I + k) * kQuad + n] = row < N ? x[row * I + k] : 0;
      }
}

// 2 <= N < kCsrBatchMin, G = ceil(N / 4) quad groups: out[n · out_stride] = Σ_pairs (w1·x_n[k1] +
// w2·x_n[k2]) for n < N. 8 pairs per step: the quads of k1 and k2 gathered as 64-bit elements (4
// batch rows per element), interleaved by VPUNPCK[LH]WD into (x_n[k1], x_n[k2]) at lane
// 4·(pair / 2) + n, each pair's weights spread over its 4 lanes by VPERMD (once for all groups).
// 4 batch rows cost the gathered elements of one.
template <int G>
void csr_pairs_quads(const uint32_t* pcol, const uint32_t* pval, int32_t p0, int32_t p1, const uint16_t* xq,
                     int64_t I, int64_t N, float* out, int64_t out_stride) {
  const __m512i even = _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0);
  const __m512i odd = _mm512_add_epi32(even, _mm512_set1_epi32(1));
  const __m256i lo16 = _mm256_set1_epi32(0xffff);
  __m512 acc[G][2];
  for (int g = 0; g < G; ++g) acc[g][0] = acc[g][1] = _mm512_setzero_ps();
  for (int32_t p = p0; p < p1; p += 8) {
    const __mmask8 m = p1 - p >= 8 ? __mmask8(0xff) : __mmask8((1u << (p1 - p)) - 1);
    const __m256i cv = _mm256_maskz_loadu_epi32(m, pcol + p);
    const __m256i k1 = _mm256_and_si256(cv, lo16), k2 = _mm256_srli_epi32(cv, 16);
    const __m512i wv = _mm512_castsi256_si512(_mm256_maskz_loadu_epi32(m, pval + p));
    const __m512bh w0 = (__m512bh)_mm512_permutexvar_epi32(even, wv), w1 = (__m512bh)_mm512_permutexvar_epi32(odd, wv);
    for (int g = 0; g < G; ++g) {
      const uint16_t* q = xq + g * I * kQuad;
      const __m512i a = _mm512_mask_i32gather_epi64(_mm512_setzero_si512(), m, k1, q, 8);
      const __m512i b = _mm512_mask_i32gather_epi64(_mm512_setzero_si512(), m, k2, q, 8);
      acc[g][0] = _mm512_dpbf16_ps(acc[g][0], (__m512bh)_mm512_unpacklo_epi16(a, b), w0);
      acc[g][1] = _mm512_dpbf16_ps(acc[g][1], (__m512bh)_mm512_unpackhi_epi16(a, b), w1);
    }
  }
  alignas(64) float s[16];
  for (int g = 0; g < G; ++g) {
    _mm512_store_ps(s, _mm512_add_ps(acc[g][0], acc[g][1]));
    for (int64_t n = 0; n < kQuad && g * kQuad + n < N; ++n)
      out[(g * kQuad + n) * out_stride] = s[n] + s[4 + n] + s[8 + n] + s[12 + n];
  }
}

// N < kCsrBatchMin, rows [o0, o1): xg is the zero-bordered x (N = 1) or the quads (N >= 2).
void csr_small_rows(const LinearArgs& a, const uint16_t* xg, int64_t o0, int64_t o1, float* buf) {
  const auto* pcol = reinterpret_cast<const uint32_t*>(a.col16);
  const auto* pval = static_cast<const uint32_t*>(a.values);
  const int64_t I = a.in_features, N = a.n;
  for (int64_t og = o0; og < o1; og += kTile) {
    const int64_t g = std::min<int64_t>(kTile, o1 - og);
    for (int64_t r = 0; r < g; ++r) {  // buf (N, 16): batch row, output
      const int32_t p0 = a.crow[og + r], p1 = a.crow[og + r + 1];
      if (N == 1) buf[r] = csr_pairs_gather(pcol, pval, p0, p1, xg);
      else if (N <= kQuad) csr_pairs_quads<1>(pcol, pval, p0, p1, xg, I, N, buf + r, kTile);
      else csr_pairs_quads<2>(pcol, pval, p0, p1, xg, I, N, buf + r, kTile);
    }
    store_rows(a, buf, N, 0, og, g);
  }
}

// Within each 32-row chunk of Xᵀ, position 8L + q holds batch row 4L + q and position 8L + 4 + q
// holds 16 + 4L + q (L, q = 0..3): VPUNPCKLWD of two such rows then yields batch rows 0..15 in
// lane order and VPUNPCKHWD rows 16..31, each lane a (row k1, row k2) pair.
constexpr int batch_at(int pos) { return (pos & 4 ? 16 : 0) + 4 * (pos >> 3) + (pos & 3); }

// xt (I, np) rows [i0, i1) (i0 even) <- x rows [n0, n0 + np)ᵀ, chunk-permuted as above; rows past
// N are zero. Two features per 32-bit gather (x[n][i], x[n][i + 1]), split by VPERMT2W.
void transpose_bf16(const uint16_t* x, int64_t N, int64_t I, int64_t n0, int64_t np, uint16_t* xt,
                    int64_t i0, int64_t i1) {
  alignas(64) uint16_t lo_idx[32];
  for (int pos = 0; pos < 32; ++pos) {
    const int b = batch_at(pos);
    lo_idx[pos] = uint16_t(b < 16 ? 2 * b : 32 + 2 * (b - 16));  // words of (gather A, gather B)
  }
  const __m512i ilo = _mm512_load_si512(lo_idx), ihi = _mm512_add_epi16(ilo, _mm512_set1_epi16(1));
  const __m512i rows = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                          _mm512_set1_epi32(int(I)));
  const int64_t ie = i0 + (i1 - i0) / 2 * 2;  // even count through gathers; an odd last feature below
  for (int64_t c = 0; c < np; c += kChunk32) {
    const int64_t v = std::min<int64_t>(kChunk32, N - n0 - c);  // valid rows in this chunk (may be <= 0)
    const __mmask16 ma = v >= 16 ? __mmask16(0xffff) : v > 0 ? __mmask16((1u << v) - 1) : 0;
    const __mmask16 mb = v >= 32 ? __mmask16(0xffff) : v > 16 ? __mmask16((1u << (v - 16)) - 1) : 0;
    const uint16_t* xa = x + (n0 + c) * I;
    const uint16_t* xb = xa + 16 * I;
    for (int64_t i = i0; i < ie; i += 2) {
      const __m512i ga = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), ma, rows, xa + i, 2);
      const __m512i gb = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), mb, rows, xb + i, 2);
      _mm512_storeu_si512(xt + i * np + c, _mm512_permutex2var_epi16(ga, ilo, gb));
      _mm512_storeu_si512(xt + (i + 1) * np + c, _mm512_permutex2var_epi16(ga, ihi, gb));
    }
    for (int64_t i = ie; i < i1; ++i)
      for (int pos = 0; pos < kChunk32; ++pos) {
        const int64_t n = c + batch_at(pos);
        xt[i * np + c + pos] = n < N - n0 ? x[(n0 + n) * I + i] : 0;
      }
  }
}

// One output row, V 32-row chunks of xt (pre-offset to the first): out[32v + j] = batch row 32v + j
// of Σ_pairs w pair · (Xᵀ[k1], Xᵀ[k2]) interleaved. U pair streams (even/odd pairs) keep enough
// VDPBF16PS chains in flight when V is small.
template <int V>
void csr_pairs_batched(const uint16_t* pcol, const uint32_t* pval, int32_t p0, int32_t p1,
                       const uint16_t* xt, int64_t np, float* out) {
  constexpr int U = V == 1 ? 4 : 2;
  __m512 acc[U][2 * V];
  for (int u = 0; u < U; ++u)
    for (int v = 0; v < 2 * V; ++v) acc[u][v] = _mm512_setzero_ps();
  auto step = [&](int u, int32_t p) {
    const __m512bh w = (__m512bh)_mm512_set1_epi32(int(pval[p]));
    const uint16_t* r1 = xt + int64_t(pcol[2 * p]) * np;
    const uint16_t* r2 = xt + int64_t(pcol[2 * p + 1]) * np;
    for (int v = 0; v < V; ++v) {
      const __m512i a = _mm512_loadu_si512(r1 + kChunk32 * v), b = _mm512_loadu_si512(r2 + kChunk32 * v);
      acc[u][2 * v] = _mm512_dpbf16_ps(acc[u][2 * v], (__m512bh)_mm512_unpacklo_epi16(a, b), w);
      acc[u][2 * v + 1] = _mm512_dpbf16_ps(acc[u][2 * v + 1], (__m512bh)_mm512_unpackhi_epi16(a, b), w);
    }
  };
  int32_t p = p0;
  for (; p + U <= p1; p += U)
    for (int u = 0; u < U; ++u) step(u, p + u);
  for (; p < p1; ++p) step(0, p);  // u stays a constant: acc[][] stays in registers
  for (int v = 0; v < 2 * V; ++v) {
    for (int u = 1; u < U; ++u) acc[0][v] = _mm512_add_ps(acc[0][v], acc[u][v]);
    _mm512_store_ps(out + 16 * v, acc[0][v]);
  }
}

// dst[j][i] = src[i][j], 16 x 16 fp32 (row strides ss, ds; 64-byte aligned rows).
void transpose16(const float* src, int64_t ss, float* dst, int64_t ds) {
  __m512 r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_load_ps(src + i * ss);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_shuffle_ps(t[i], t[i + 2], 0x44);
    r[i + 1] = _mm512_shuffle_ps(t[i], t[i + 2], 0xee);
    r[i + 2] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0x44);
    r[i + 3] = _mm512_shuffle_ps(t[i + 1], t[i + 3], 0xee);
  }
  for (int h = 0; h < 16; h += 8)
    for (int i = 0; i < 4; ++i) {
      t[h + i] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0x88);
      t[h + i + 4] = _mm512_shuffle_f32x4(r[h + i], r[h + i + 4], 0xdd);
    }
  for (int i = 0; i < 8; ++i) {
    r[i] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_f32x4(t[i], t[i + 8], 0xdd);
  }
  for (int i = 0; i < 16; ++i) _mm512_store_ps(dst + i * ds, r[i]);
}

// Rows [o0, o1) of Y for Xᵀ panel rows [s0, s0 + np): per 16 outputs and 128 batch rows, a tile
// (16 outputs, 128 batch) of row sums, transposed to buf (128 batch, 16 outputs) for store_rows.
void csr_batched_rows(const LinearArgs& a, const uint16_t* xt, int64_t s0, int64_t np, int64_t o0,
                      int64_t o1, float* tile, float* buf) {
  const auto* pval = static_cast<const uint32_t*>(a.values);
  constexpr int64_t step = kCsrChunks * kChunk32;
  for (int64_t og = o0; og < o1; og += kTile) {
    const int64_t g = std::min<int64_t>(kTile, o1 - og);
    for (int64_t c0 = 0; c0 < np && s0 + c0 < a.n; c0 += step) {
      const int V = int(std::min<int64_t>(kCsrChunks, (np - c0) / kChunk32));
      for (int64_t r = 0; r < g; ++r) {
        const int32_t p0 = a.crow[og + r], p1 = a.crow[og + r + 1];
        float* out = tile + r * step;
        switch (V) {
          case 1: csr_pairs_batched<1>(a.col16, pval, p0, p1, xt + c0, np, out); break;
          case 2: csr_pairs_batched<2>(a.col16, pval, p0, p1, xt + c0, np, out); break;
          case 3: csr_pairs_batched<3>(a.col16, pval, p0, p1, xt + c0, np, out); break;
          default: csr_pairs_batched<4>(a.col16, pval, p0, p1, xt + c0, np, out); break;
        }
      }
      const int64_t rows = std::min<int64_t>(V * kChunk32, a.n - s0 - c0);
      for (int64_t b = 0; b < rows; b += kTile) transpose16(tile + b, step, buf + b * kTile, kTile);
      store_rows(a, buf, rows, s0 + c0, og, g);
    }
  }
}

}  // namespace

void csr_linear_bf16(const LinearArgs& a) {
  if (current_bf16_isa() == BF16_NONE) throw std::runtime_error("csr_linear_bf16: no bf16 ISA selected");
  g_last.store(KERNEL_CSR_AVX512, std::memory_order_relaxed);
  if (a.n == 0 || a.out_features == 0) return;
  const int64_t N = a.n, I = a.in_features, O = a.out_features;
  const auto* x = reinterpret_cast<const uint16_t*>(a.x);
  const double flops = 4.0 * double(a.crow[O]) * double(N);
  const int T = pick_threads(a.nthreads, flops * (N < kCsrBatchMin ? 0.2e-9 : 0.02e-9));
  if (N < kCsrBatchMin) {
    auto* xs = reinterpret_cast<uint16_t*>(scratch(0, size_t(4 * I + 16)));  // (2, I, 4) bf16 at most
    if (N == 1) zero_bordered(x, I, xs); else feature_quads(x, N, I, xs);
#pragma omp parallel num_threads(T) if (T > 1)
    {
      const int t = thread_id(), nt = team_size();
      float* buf = scratch(1, size_t(kCsrBatchMin * kTile));
      const int64_t o0 = split_begin(a.crow, O, kTile, 2, t, nt), o1 = split_begin(a.crow, O, kTile, 2, t + 1, nt);
      if (o0 < o1) csr_small_rows(a, xs, o0, o1, buf);
    }
    return;
  }
  // Batch rows per Xᵀ panel: whole 128-row passes, the panel near kXCacheBytes (half an L2).
  const int64_t step = kCsrChunks * kChunk32, n_pad = (N + kChunk32 - 1) / kChunk32 * kChunk32;
  const int64_t span = std::min(n_pad, std::max<int64_t>(step, kXCacheBytes / (2 * std::max<int64_t>(I, 1)) / step * step));
  auto* xt = reinterpret_cast<uint16_t*>(scratch(0, size_t((I * span + 1) / 2 + 16)));
#pragma omp parallel num_threads(T) if (T > 1)
  {
    const int t = thread_id(), nt = team_size();
    float* buf = scratch(1, size_t(step * kTile));
    float* tile = scratch(2, size_t(step * kTile));
    const int64_t o0 = split_begin(a.crow, O, kTile, 2, t, nt), o1 = split_begin(a.crow, O, kTile, 2, t + 1, nt);
    const int64_t i0 = std::min(I, I * t / nt / 2 * 2), i1 = t + 1 == nt ? I : std::min(I, I * (t + 1) / nt / 2 * 2);
    for (int64_t s0 = 0; s0 < N; s0 += span) {
      const int64_t np = std::min(span, n_pad - s0);
      if (s0) {
#pragma omp barrier
      }
      transpose_bf16(x, N, I, s0, np, xt, i0, i1);
#pragma omp barrier
      if (o0 < o1) csr_batched_rows(a, xt, s0, np, o0, o1, tile, buf);
    }
  }
}


// ---- attention on AMX ---------------------------------------------------------------------------
// softmax(Q Kᵀ · scale) V per (batch, head), bf16 in and out, fp32 scores and accumulation. Every
// tile is 16 rows × 64 bytes: Q (16 queries × 32 dims), Kᵀ pairs (16 dim pairs × 16 keys), scores /
// outputs (16 × 16 fp32), P (16 queries × 32 keys), V pairs (16 key pairs × 16 dims). Per task
// (batch, head) K and V are packed once into the B-operand layout (pairs along the reduced axis);
// per 16 queries: scores by TDPBF16PS, softmax in fp32 (AVX-512), P rounded to bf16, then P · V.
namespace {

struct AttnScratch {
  uint32_t* kp;  // (hs/2, sp): kp[p][j] = K[j][2p], K[j][2p + 1]; keys j >= S zero
  uint16_t* vp;  // (sp/2, hs, 2): vp[kp][d] = V[2kp][d], V[2kp + 1][d]; keys >= S zero
  float* sc;     // (G·16, sp) scores of a group of query blocks
  uint16_t* pb;  // (G·16, sp) P in bf16
  float* ob;     // (G·16, hs) P · V, fp32
  uint16_t* qpad;  // (16, hs) a partial query block, zero-padded
};

void attention_tile_config() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) { cfg.rows[t] = kTile; cfg.colsb[t] = 64; }
  _tile_loadconfig(&cfg);
}

// r[0..15] (16 × 16 32-bit) -> its transpose, in place: 32- and 64-bit unpacks within 128-bit
// lanes, then two rounds of lane shuffles.
inline void transpose16x16_epi32(__m512i r[16]) {
  __m512i t[16], u[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int g = 0; g < 16; g += 4) {  // u[g + c], lane L: rows g..g+3 of column 4L + c
    u[g] = _mm512_unpacklo_epi64(t[g], t[g + 2]);
    u[g + 1] = _mm512_unpackhi_epi64(t[g], t[g + 2]);
    u[g + 2] = _mm512_unpacklo_epi64(t[g + 1], t[g + 3]);
    u[g + 3] = _mm512_unpackhi_epi64(t[g + 1], t[g + 3]);
  }
  for (int c = 0; c < 4; ++c) {
    const __m512i a = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x88), b = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xdd);
    const __m512i a2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x88);
    const __m512i b2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xdd);
    r[c] = _mm512_shuffle_i32x4(a, a2, 0x88);
    r[8 + c] = _mm512_shuffle_i32x4(a, a2, 0xdd);
    r[4 + c] = _mm512_shuffle_i32x4(b, b2, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(b, b2, 0xdd);
  }
}

// K and V rows (stride ld) of one head -> the packed B operands (keys past S zero).
void pack_kv(const uint16_t* k, const uint16_t* v, int64_t ld, int64_t S, int64_t sp, int64_t hs,
             const AttnScratch& w) {
  // K: per 16 keys and 32 dims, the 16 × 16 matrix of dim pairs transposed to 16 rows of keys.
  for (int64_t j0 = 0; j0 < sp; j0 += kTile) {
    for (int64_t d = 0; d < hs; d += 32) {
      __m512i r[16];
      for (int64_t j = 0; j < kTile; ++j)
        r[j] = j0 + j < S ? _mm512_loadu_si512(k + (j0 + j) * ld + d) : _mm512_setzero_si512();
      transpose16x16_epi32(r);
      for (int64_t p = 0; p < kTile; ++p) _mm512_storeu_si512(w.kp + (d / 2 + p) * sp + j0, r[p]);
    }
  }
  // V: rows 2kp and 2kp + 1 interleaved element by element, 32 dims per register pair.
  alignas(64) static const uint16_t lo_idx[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39,
                                                  8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47};
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_add_epi16(lo, _mm512_set1_epi16(16));
  for (int64_t kp = 0; kp < sp / 2; ++kp) {
    const int64_t j = 2 * kp;
    for (int64_t d = 0; d < hs; d += 32) {
      const __m512i a = j < S ? _mm512_loadu_si512(v + j * ld + d) : _mm512_setzero_si512();
      const __m512i b = j + 1 < S ? _mm512_loadu_si512(v + (j + 1) * ld + d) : _mm512_setzero_si512();
      uint16_t* dst = w.vp + (kp * hs + d) * 2;
      _mm512_storeu_si512(dst, _mm512_permutex2var_epi16(a, lo, b));
      _mm512_storeu_si512(dst + 32, _mm512_permutex2var_epi16(a, hi, b));
    }
  }
}

// Scores of 16 queries (q: rows of stride qs elements) against all sp keys (kp) -> sc (16 × sp).
void block_scores(const uint16_t* q, int64_t qs, int64_t sp, int64_t hs, const uint32_t* kp, float* sc) {
  for (int64_t j0 = 0; j0 < sp; j0 += 4 * kTile) {
    const int64_t nb = std::min<int64_t>(4, (sp - j0) / kTile);
    _tile_zero(0);
    _tile_zero(1);
    _tile_zero(2);
    _tile_zero(3);
    for (int64_t d = 0; d < hs; d += 32) {
      _tile_loadd(4, q + d, qs * 2);
      const uint32_t* kb = kp + (d / 2) * sp + j0;
      _tile_loadd(5, kb, sp * 4);
      _tile_dpbf16ps(0, 4, 5);
      if (nb > 1) { _tile_loadd(6, kb + kTile, sp * 4); _tile_dpbf16ps(1, 4, 6); }
      if (nb > 2) { _tile_loadd(7, kb + 2 * kTile, sp * 4); _tile_dpbf16ps(2, 4, 7); }
      if (nb > 3) { _tile_loadd(5, kb + 3 * kTile, sp * 4); _tile_dpbf16ps(3, 4, 5); }
    }
    float* out = sc + j0;
    _tile_stored(0, out, sp * 4);
    if (nb > 1) _tile_stored(1, out + kTile, sp * 4);
    if (nb > 2) _tile_stored(2, out + 2 * kTile, sp * 4);
    if (nb > 3) _tile_stored(3, out + 3 * kTile, sp * 4);
  }
}

// One row of scores s (sp): P = exp(scale · (s - max)) over the S real keys (0 past them) -> p
// (bf16); returns 1 / Σ P (of the fp32 values, before rounding).
float softmax_row(const float* s, int64_t S, int64_t sp, float scale, uint16_t* p) {
  __m512 mv = _mm512_set1_ps(-INFINITY);
  for (int64_t j = 0; j < S; j += 16) {
    const __mmask16 m = S - j >= 16 ? __mmask16(0xffff) : __mmask16((1u << (S - j)) - 1);
    mv = _mm512_mask_max_ps(mv, m, mv, _mm512_loadu_ps(s + j));
  }
  const float c = scale * 1.44269504f;  // exp(scale · (s - max)) = 2^(c·s - c·max)
  const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(mv) * c), sv = _mm512_set1_ps(c);
  __m512 sum = _mm512_setzero_ps();
  auto put = [&](int64_t j, __m512 e) {
    sum = _mm512_add_ps(sum, e);
    const __m256bh h = _mm512_cvtneps_pbh(e);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + j), reinterpret_cast<const __m256i&>(h));
  };
  int64_t j = 0;
  for (; j + 16 <= S; j += 16) put(j, exp2_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), sv, shift)));
  for (; j < sp; j += 16) {  // the last real keys, then the padding (weight 0)
    const __mmask16 m = j >= S ? 0 : __mmask16((1u << (S - j)) - 1);
    put(j, _mm512_maskz_mov_ps(m, exp2_nonpositive(_mm512_fmsub_ps(_mm512_loadu_ps(s + j), sv, shift))));
  }
  return 1.f / _mm512_reduce_add_ps(sum);
}

// P (pb: QB = 1 or 2 blocks of 16 rows, row stride sp) · V (vp) -> ob (QB·16 × hs fp32): 32 value
// dims × QB query blocks at a time (up to four C tiles, each A and B load used twice).
template <int QB>
void block_values(const uint16_t* pb, int64_t sp, int64_t hs, const uint16_t* vp, float* ob) {
  for (int64_t d0 = 0; d0 < hs; d0 += 32) {
    _tile_zero(0);
    _tile_zero(1);
    if (QB > 1) { _tile_zero(2); _tile_zero(3); }
    for (int64_t k = 0; k < sp; k += 32) {
      const uint16_t* vb = vp + (k / 2) * hs * 2 + d0 * 2;
      _tile_loadd(4, pb + k, sp * 2);
      _tile_loadd(6, vb, hs * 4);
      _tile_loadd(7, vb + 2 * kTile, hs * 4);
      _tile_dpbf16ps(0, 4, 6);
      _tile_dpbf16ps(1, 4, 7);
      if (QB > 1) {
        _tile_loadd(5, pb + kTile * sp + k, sp * 2);
        _tile_dpbf16ps(2, 5, 6);
        _tile_dpbf16ps(3, 5, 7);
      }
    }
    _tile_stored(0, ob + d0, hs * 4);
    _tile_stored(1, ob + d0 + kTile, hs * 4);
    if (QB > 1) {
      _tile_stored(2, ob + kTile * hs + d0, hs * 4);
      _tile_stored(3, ob + kTile * hs + d0 + kTile, hs * 4);
    }
  }
}

// Query blocks per group: each stage (scores, softmax, P · V) runs over a whole group before the
// next starts, so a tile load rarely waits for the vector stores just made to the same lines; the
// group's scores (G·16·sp fp32) are kept to 32 KiB. (128 keys: G = 4; MiniLM batch 32, 1 thread,
// 4.2 ms against 4.8 ms with G = 1.)
int64_t attention_group(int64_t sp) { return std::clamp<int64_t>(32768 / (kTile * sp * 4), 1, 8); }

// One (batch, head): q, k, v rows of stride ld; out rows of stride ldo.
void attention_head(const uint16_t* q, const uint16_t* k, const uint16_t* v, int64_t ld, int64_t S, int64_t hs,
                    float scale, uint16_t* out, int64_t ldo, const AttnScratch& w) {
  const int64_t sp = (S + 31) / 32 * 32, G = attention_group(sp);
  pack_kv(k, v, ld, S, sp, hs, w);
  float inv[8 * kTile];
  for (int64_t g0 = 0; g0 < S; g0 += G * kTile) {
    const int64_t rows = std::min(G * kTile, S - g0), nb = (rows + kTile - 1) / kTile;
    for (int64_t i = 0; i < nb; ++i) {
      const uint16_t* qb = q + (g0 + i * kTile) * ld;
      int64_t qs = ld;
      if (rows - i * kTile < kTile) {  // a partial block: the tile load must not read past the sequence
        std::memset(w.qpad, 0, size_t(kTile * hs) * 2);
        for (int64_t r = 0; r < rows - i * kTile; ++r) std::memcpy(w.qpad + r * hs, qb + r * ld, size_t(hs) * 2);
        qb = w.qpad;
        qs = hs;
      }
      block_scores(qb, qs, sp, hs, w.kp, w.sc + i * kTile * sp);
    }
    for (int64_t r = 0; r < rows; ++r) inv[r] = softmax_row(w.sc + r * sp, S, sp, scale, w.pb + r * sp);
    // P of the padding queries: zero (their outputs are dropped)
    std::memset(w.pb + rows * sp, 0, size_t((nb * kTile - rows) * sp) * 2);
    int64_t i = 0;
    for (; i + 2 <= nb; i += 2) block_values<2>(w.pb + i * kTile * sp, sp, hs, w.vp, w.ob + i * kTile * hs);
    if (i < nb) block_values<1>(w.pb + i * kTile * sp, sp, hs, w.vp, w.ob + i * kTile * hs);
    for (int64_t r = 0; r < rows; ++r) {
      uint16_t* o = out + (g0 + r) * ldo;
      const __m512 iv = _mm512_set1_ps(inv[r]);
      for (int64_t d = 0; d < hs; d += 16) {
        const __m256bh h = _mm512_cvtneps_pbh(_mm512_mul_ps(_mm512_loadu_ps(w.ob + r * hs + d), iv));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(o + d), reinterpret_cast<const __m256i&>(h));
      }
    }
  }
}

}  // namespace

void attention_amx(const uint16_t* qkv, uint16_t* out, int64_t B, int64_t S, int64_t nh, int64_t hs, float scale,
                   int nthreads) {
  if (current_bf16_isa() != BF16_AMX) throw std::runtime_error("attention_amx: the AMX kernels are not selected");
  if (hs % 32) throw std::invalid_argument("attention_amx: the head size must be a multiple of 32");
  g_last.store(KERNEL_ATTENTION_AMX, std::memory_order_relaxed);
  if (B == 0 || S == 0 || nh == 0) return;
  const int64_t H = nh * hs, ld = 3 * H, sp = (S + 31) / 32 * 32;
  const int T = pick_threads(nthreads, est_spmm(double(B * nh) * double(S) * double(S) * double(hs) * 0.5));
#pragma omp parallel num_threads(T) if (T > 1)
  {
    // One scratch block per thread: kp, vp (hs·sp bf16 each), sc (G·16·sp fp32), pb (G·16·sp bf16),
    // ob (G·16·hs fp32), qpad (16·hs bf16); every part a multiple of 64 bytes.
    const int64_t g = attention_group(sp) * kTile;
    const int64_t kv = hs * sp * 2, scb = g * sp * 4, pbb = g * sp * 2, obb = g * hs * 4;
    auto* base = reinterpret_cast<char*>(scratch(0, size_t((2 * kv + scb + pbb + obb + kTile * hs * 2) / 4)));
    const AttnScratch w{reinterpret_cast<uint32_t*>(base), reinterpret_cast<uint16_t*>(base + kv),
                        reinterpret_cast<float*>(base + 2 * kv), reinterpret_cast<uint16_t*>(base + 2 * kv + scb),
                        reinterpret_cast<float*>(base + 2 * kv + scb + pbb),
                        reinterpret_cast<uint16_t*>(base + 2 * kv + scb + pbb + obb)};
    attention_tile_config();
#pragma omp for schedule(static)
    for (int64_t task = 0; task < B * nh; ++task) {
      const int64_t b = task / nh, h = task % nh;
      const uint16_t* q = qkv + b * S * ld + h * hs;
      attention_head(q, q + H, q + 2 * H, ld, S, hs, scale, out + b * S * H + h * hs, H, w);
    }
    _tile_release();
  }
}

}  // namespace se

SE_TARGET_POP

#endif  // SE_BF16_KERNELS
