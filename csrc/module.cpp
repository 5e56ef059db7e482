// The single pybind11 module engine._C: binds the kernels on raw data pointers (torch tensors'
// data_ptr() / numpy addresses), ISA selection, and the per-thread scratch memory.
#include <pybind11/pybind11.h>

#include <atomic>
#include <cstdlib>
#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#include <stdexcept>
#include <string>
#include <tuple>

#include "bf16.h"
#include "common.h"
#include "sparse_linear.h"

namespace py = pybind11;

namespace se {

bool cpu_has_avx2() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
           __builtin_cpu_supports("f16c");
  }();
  return ok;
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool ok = cpu_has_avx2() && __builtin_cpu_supports("avx512f");
  return ok;
#else
  return false;
#endif
}

Isa best_isa() {
  return cpu_has_avx512() ? ISA_AVX512 : (cpu_has_avx2() ? ISA_AVX2 : ISA_PORTABLE);
}

static std::atomic<int> g_isa{-1};

Isa current_isa() {
  int v = g_isa.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* env = std::getenv("SPARSE_ENGINE_ISA");
    const std::string want = env ? env : "";
    v = best_isa();
    if (want == "portable") v = ISA_PORTABLE;
    else if (want == "avx2" && v > ISA_AVX2) v = ISA_AVX2;
    g_isa.store(v);
  }
  return static_cast<Isa>(v);
}

void set_isa(Isa isa) {
  if (isa == ISA_AVX2 && !cpu_has_avx2()) throw std::runtime_error("set_isa: this CPU lacks AVX2/FMA/F16C");
  if (isa == ISA_AVX512 && !cpu_has_avx512()) throw std::runtime_error("set_isa: this CPU lacks AVX-512F");
  g_isa.store(isa);
}

bool avx512_split() {
#if defined(__x86_64__) || defined(__i386__)
  static const bool split = [] {
    if (!cpu_has_avx512()) return false;
    unsigned a, b, c, d;
    if (!__get_cpuid(0, &a, &b, &c, &d)) return false;
    const bool amd = b == 0x68747541u && d == 0x69746e65u && c == 0x444d4163u;  // "AuthenticAMD"
    if (!amd || !__get_cpuid(1, &a, &b, &c, &d)) return false;
    const unsigned base = (a >> 8) & 0xf, family = base == 0xf ? base + ((a >> 20) & 0xff) : base;
    return family == 0x19;
  }();
  return split;
#else
  return false;
#endif
}

int auto_csr_bits() { return cpu_has_avx512() && !avx512_split() ? 512 : 256; }

static std::atomic<int> g_csr_bits{-1};  // 256 or 512 once read; the setting, not the ISA's limit

int csr_bits() {
  int v = g_csr_bits.load(std::memory_order_relaxed);
  if (v < 0) {
    const char* env = std::getenv("SPARSE_ENGINE_CSR_BITS");
    const std::string want = env ? env : "";
    v = want == "256" ? 256 : (want == "512" ? 512 : auto_csr_bits());
    g_csr_bits.store(v);
  }
  return current_isa() == ISA_AVX512 ? v : 256;
}

void set_csr_bits(int bits) {
  if (bits != 0 && bits != 256 && bits != 512)
    throw std::invalid_argument("set_csr_bits: expected 0 (auto), 256 or 512, got " + std::to_string(bits));
  if (bits == 512 && !cpu_has_avx512()) throw std::runtime_error("set_csr_bits: 512 needs AVX-512F");
  g_csr_bits.store(bits == 0 ? auto_csr_bits() : bits);
}

namespace {
struct Scratch {
  static constexpr int kSlots = 4;
  float* ptr[kSlots] = {};
  size_t cap[kSlots] = {};
  ~Scratch() { for (auto* p : ptr) std::free(p); }
};
}  // namespace

float* scratch(int slot, size_t n_floats) {
  thread_local Scratch s;
  if (s.cap[slot] < n_floats) {
    std::free(s.ptr[slot]);
    const size_t bytes = ((n_floats * sizeof(float) + 4095) / 4096) * 4096;  // page-rounded, 64-B aligned
    s.ptr[slot] = static_cast<float*>(std::aligned_alloc(64, bytes));
    if (!s.ptr[slot]) { s.cap[slot] = 0; throw std::bad_alloc(); }
    s.cap[slot] = bytes / sizeof(float);
  }
  return s.ptr[slot];
}

void csr_linear(const LinearArgs& a) {
  if (a.n == 0 || a.out_features == 0) return;
  if (current_isa() >= ISA_AVX2) csr_linear_avx2(a); else csr_linear_portable(a);
}

void bsr_linear(const LinearArgs& a) {
  if (a.n == 0 || a.out_features == 0) return;
  if (current_isa() >= ISA_AVX2) bsr_linear_avx2(a); else bsr_linear_portable(a);
}

void csr_pair(const LinearArgs& a1, const LinearArgs& a2) {
  if (a1.n == 0 || a2.out_features == 0) return;
  if (current_isa() < ISA_AVX2) throw std::runtime_error("csr_pair: needs the AVX2 or AVX-512 kernels (set_isa)");
  if (csr_bits() == 512 && (a1.n + 7) / 8 * 8 % 16)
    throw std::invalid_argument("csr_pair: with 512-bit CSR kernels the batch rounded up to 8 must be a multiple of 16");
  csr_pair_avx2(a1, a2);
}

void attention(const float* qkv, float* out, int64_t B, int64_t S, int64_t nh, int64_t hs, float scale, int nthreads) {
  if (current_isa() < ISA_AVX2) throw std::runtime_error("attention: needs the AVX2 or AVX-512 kernels (set_isa)");
  if (hs % 8) throw std::invalid_argument("attention: the head size must be a multiple of 8");
  if (B == 0 || S == 0 || nh == 0) return;
  attention_avx2(qkv, out, B, S, nh, hs, scale, nthreads);
}

void add_layer_norm(void* y, const void* h, const void* r, bool bf16, int64_t N, int64_t H, const float* gamma,
                    const float* beta, float eps, int nthreads) {
  if (current_isa() < ISA_AVX2) throw std::runtime_error("add_layer_norm: needs the AVX2 or AVX-512 kernels (set_isa)");
  if (N == 0 || H == 0) return;
  add_layer_norm_avx2(y, h, r, bf16, N, H, gamma, beta, eps, nthreads);
}

}  // namespace se

namespace {

const char* const kBf16Names[] = {"none", "avx512_bf16", "amx"};
// se::Bf16Kernel -> name: the BSR kernels by their ISA, the CSR and attention kernels by their own names.
const char* const kBf16KernelNames[] = {"none", "avx512_bf16", "amx", "avx512_bf16_csr", "amx_attention"};

template <typename T>
T* as_ptr(uintptr_t p) { return reinterpret_cast<T*>(p); }

se::LinearArgs make_args(uintptr_t y, uintptr_t x, int64_t n, int64_t i, int64_t o, uintptr_t crow,
                         uintptr_t col, uintptr_t val, int wdtype, uintptr_t bias, int act, int nthreads) {
  if (wdtype < 0 || wdtype > 2) throw std::invalid_argument("wdtype must be 0 (fp32), 1 (bf16) or 2 (fp16)");
  if (act < 0 || act > 3) throw std::invalid_argument("act must be 0..3 (none, relu, gelu, gelu_tanh)");
  if (n < 0 || i < 0 || o < 0) throw std::invalid_argument("sizes must be non-negative");
  se::LinearArgs a;
  a.y = as_ptr<float>(y);
  a.x = as_ptr<const float>(x);
  a.n = n;
  a.in_features = i;
  a.out_features = o;
  a.crow = as_ptr<const int32_t>(crow);
  a.col = as_ptr<const int32_t>(col);
  a.values = as_ptr<const void>(val);
  a.wdtype = wdtype;
  a.bias = bias ? as_ptr<const float>(bias) : nullptr;
  a.act = act;
  a.nthreads = nthreads;
  return a;
}

// make_args plus the R x C block shape, which must tile the (O, I) weight.
se::LinearArgs make_bsr_args(uintptr_t y, uintptr_t x, int64_t n, int64_t i, int64_t o, int64_t r, int64_t c,
                             uintptr_t crow, uintptr_t col, uintptr_t val, int wdtype, uintptr_t bias, int act,
                             int nthreads) {
  if (r <= 0 || c <= 0 || o % r || i % c) throw std::invalid_argument("block size must divide the shape");
  se::LinearArgs a = make_args(y, x, n, i, o, crow, col, val, wdtype, bias, act, nthreads);
  a.block_r = r;
  a.block_c = c;
  return a;
}

// The batched kernels' copy of a CSR weight: panel-major (seg, col, val) and/or grouped SELL-4
// (off, len, rows, col, val), each optional, over input panels of panel_width features.
void set_batched_layout(se::LinearArgs& a, int64_t panel_width, uintptr_t panel_seg, uintptr_t panel_col,
                        uintptr_t panel_val, uintptr_t grp_off, uintptr_t grp_len, uintptr_t grp_rows,
                        uintptr_t grp_col, uintptr_t grp_val) {
  if ((panel_seg || grp_off) && a.in_features > 65536) throw std::invalid_argument("uint16 indices need in_features <= 65536");
  if (grp_off && se::csr_bits() != 512) throw std::invalid_argument("the grouped layout needs the 512-bit CSR kernels");
  if (panel_seg) {
    if (panel_width <= 0 || !panel_col || !panel_val) throw std::invalid_argument("panel layout incomplete");
    a.panel_seg = as_ptr<const int32_t>(panel_seg);
    a.panel_col = as_ptr<const uint16_t>(panel_col);
    a.panel_val = as_ptr<const void>(panel_val);
    a.panel_width = panel_width;
  }
  if (grp_off) {
    if (panel_width <= 0 || !grp_len || !grp_rows || !grp_col || !grp_val)
      throw std::invalid_argument("grouped panel layout incomplete");
    a.grp_off = as_ptr<const int32_t>(grp_off);
    a.grp_len = as_ptr<const int32_t>(grp_len);
    a.grp_rows = as_ptr<const int32_t>(grp_rows);
    a.grp_col = as_ptr<const uint16_t>(grp_col);
    a.grp_val = as_ptr<const void>(grp_val);
    a.panel_width = panel_width;
  }
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "sparse-engine C++ CPU kernels (CSR/BSR linear, AVX2/FMA with a portable fallback)";

  m.def("csr_linear",
        [](uintptr_t y, uintptr_t x, int64_t n, int64_t i, int64_t o, uintptr_t crow, uintptr_t col,
           uintptr_t val, int wdtype, uintptr_t bias, int act, int nthreads, uintptr_t col16,
           uintptr_t panel_seg, uintptr_t panel_col, uintptr_t panel_val, int64_t panel_width,
           uintptr_t grp_off, uintptr_t grp_len, uintptr_t grp_rows, uintptr_t grp_col, uintptr_t grp_val) {
          se::LinearArgs a = make_args(y, x, n, i, o, crow, col, val, wdtype, bias, act, nthreads);
          if (col16 && i > 65536) throw std::invalid_argument("uint16 indices need in_features <= 65536");
          if (col16) a.col16 = as_ptr<const uint16_t>(col16);
          set_batched_layout(a, panel_width, panel_seg, panel_col, panel_val, grp_off, grp_len, grp_rows, grp_col, grp_val);
          py::gil_scoped_release nogil;
          se::csr_linear(a);
        },
        "Y(N,O) = act(X(N,I) · Wᵀ + b), W in CSR. Arguments are data pointers (ints): y, x, N, I, O, "
        "crow, col, values, wdtype (0 fp32, 1 bf16, 2 fp16), bias (0 for none), act (0 none, 1 relu, "
        "2 gelu, 3 gelu_tanh), nthreads, and optionally col16: a (nnz,) uint16 copy of the column "
        "indices (0 for none) that the kernels then read instead; optionally the panelled layout "
        "(panel_seg (P·O+1,) int32, panel_col (nnz,) uint16, panel_val (nnz,), panel_width) for the "
        "batched AVX2/AVX-512 paths, or, with the 512-bit kernels, the grouped one (grp_off, grp_len, "
        "grp_rows, grp_col, grp_val: sparse_linear.h). Inputs are trusted: validate in Python.",
        py::arg("y"), py::arg("x"), py::arg("n"), py::arg("in_features"), py::arg("out_features"),
        py::arg("crow"), py::arg("col"), py::arg("values"), py::arg("wdtype"), py::arg("bias"),
        py::arg("act"), py::arg("nthreads"), py::arg("col16") = 0, py::arg("panel_seg") = 0,
        py::arg("panel_col") = 0, py::arg("panel_val") = 0, py::arg("panel_width") = 0,
        py::arg("grp_off") = 0, py::arg("grp_len") = 0, py::arg("grp_rows") = 0, py::arg("grp_col") = 0,
        py::arg("grp_val") = 0);

  m.def("csr_pair",
        [](uintptr_t y, uintptr_t x, int64_t n, int64_t i, int64_t f, int64_t o, int wdtype, int nthreads,
           int64_t panel_width, uintptr_t crow1, py::tuple layout1, uintptr_t bias1, int act1, uintptr_t crow2,
           py::tuple layout2, uintptr_t bias2, int act2) {
          se::LinearArgs a1 = make_args(0, x, n, i, f, crow1, 0, 0, wdtype, bias1, act1, nthreads);
          se::LinearArgs a2 = make_args(y, 0, n, f, o, crow2, 0, 0, wdtype, bias2, act2, nthreads);
          if (i > 65536 || f > 65536) throw std::invalid_argument("csr_pair: uint16 indices need in_features <= 65536");
          for (auto [a, layout] : {std::pair{&a1, layout1}, std::pair{&a2, layout2}}) {
            const auto p = [&](int k) { return layout[k].cast<uintptr_t>(); };
            if (layout.size() == 3)
              set_batched_layout(*a, panel_width, p(0), p(1), p(2), 0, 0, 0, 0, 0);
            else if (layout.size() == 5)
              set_batched_layout(*a, panel_width, 0, 0, 0, p(0), p(1), p(2), p(3), p(4));
            else
              throw std::invalid_argument("csr_pair: each layout is (panel_seg, panel_col, panel_val) or "
                                          "(grp_off, grp_len, grp_rows, grp_col, grp_val)");
            if (!a->panel_seg && !a->grp_off) throw std::invalid_argument("csr_pair: both batched layouts are needed");
          }
          py::gil_scoped_release nogil;
          se::csr_pair(a1, a2);
        },
        "Y(N,O) = act2(act1(X(N,I) · W1ᵀ + b1) · W2ᵀ + b2), W1 (F, I) and W2 (O, F) in CSR, one weight dtype, "
        "each with its batched copy as csr_linear takes it: a tuple (panel_seg, panel_col, panel_val) or, with "
        "the 512-bit kernels, (grp_off, grp_len, grp_rows, grp_col, grp_val); the (N, F) hidden activations "
        "stay in the kernels' packed layout. AVX2/AVX-512 only.",
        py::arg("y"), py::arg("x"), py::arg("n"), py::arg("in_features"), py::arg("hidden_features"),
        py::arg("out_features"), py::arg("wdtype"), py::arg("nthreads"), py::arg("panel_width"),
        py::arg("crow1"), py::arg("layout1"), py::arg("bias1"), py::arg("act1"), py::arg("crow2"),
        py::arg("layout2"), py::arg("bias2"), py::arg("act2"));

  m.def("attention",
        [](uintptr_t out, uintptr_t qkv, int64_t b, int64_t s, int64_t heads, int64_t head_size, double scale,
           int nthreads) {
          if (b < 0 || s < 0 || heads < 0 || head_size <= 0) throw std::invalid_argument("attention: sizes must be positive");
          py::gil_scoped_release nogil;
          se::attention(as_ptr<const float>(qkv), as_ptr<float>(out), b, s, heads, head_size, float(scale), nthreads);
        },
        "OUT(B·S, H) = softmax(Q Kᵀ · scale) V per (batch, head), no mask; Q, K, V read from QKV (B·S, 3H) fp32 "
        "(each row: the heads' queries, then keys, then values), H = heads · head_size, head_size a multiple "
        "of 8. AVX2/AVX-512 only.",
        py::arg("out"), py::arg("qkv"), py::arg("batch"), py::arg("seq"), py::arg("heads"), py::arg("head_size"),
        py::arg("scale"), py::arg("nthreads"));

  m.def("attention_bf16",
        [](uintptr_t out, uintptr_t qkv, int64_t b, int64_t s, int64_t heads, int64_t head_size, double scale,
           int nthreads) {
          if (b < 0 || s < 0 || heads < 0 || head_size <= 0) throw std::invalid_argument("attention_bf16: sizes must be positive");
          py::gil_scoped_release nogil;
          se::attention_amx(as_ptr<const uint16_t>(qkv), as_ptr<uint16_t>(out), b, s, heads, head_size, float(scale),
                            nthreads);
        },
        "attention() for bf16 QKV and OUT on AMX tiles (bf16 products, fp32 scores, softmax and "
        "accumulation); head_size a multiple of 32; needs bf16_isa() == 'amx'.",
        py::arg("out"), py::arg("qkv"), py::arg("batch"), py::arg("seq"), py::arg("heads"), py::arg("head_size"),
        py::arg("scale"), py::arg("nthreads"));

  m.def("add_layer_norm",
        [](uintptr_t y, uintptr_t h, uintptr_t r, bool bf16, int64_t n, int64_t hidden, uintptr_t gamma, uintptr_t beta,
           double eps, int nthreads) {
          if (n < 0 || hidden < 0) throw std::invalid_argument("add_layer_norm: sizes must be non-negative");
          py::gil_scoped_release nogil;
          se::add_layer_norm(as_ptr<void>(y), as_ptr<const void>(h), as_ptr<const void>(r), bf16, n, hidden,
                             as_ptr<const float>(gamma), as_ptr<const float>(beta), float(eps), nthreads);
        },
        "Y(N, H) = LayerNorm(H_in + R) per row · gamma + beta (fp32 gamma/beta, 0 for none), biased variance, "
        "computed in fp32; Y, H_in and R all fp32 or all bf16 (bf16=True); Y may be H_in. AVX2/AVX-512 only.",
        py::arg("y"), py::arg("h"), py::arg("r"), py::arg("bf16"), py::arg("n"), py::arg("hidden"), py::arg("gamma"),
        py::arg("beta"), py::arg("eps"), py::arg("nthreads"));

  m.def("bsr_linear",
        [](uintptr_t y, uintptr_t x, int64_t n, int64_t i, int64_t o, int64_t r, int64_t c,
           uintptr_t crow, uintptr_t col, uintptr_t val, int wdtype, uintptr_t bias, int act,
           int nthreads, uintptr_t blocks_t) {
          se::LinearArgs a = make_bsr_args(y, x, n, i, o, r, c, crow, col, val, wdtype, bias, act, nthreads);
          if (blocks_t && (r != 16 || se::current_isa() != se::ISA_AVX512))
            throw std::invalid_argument("bsr_linear: blocks_t needs 16-row blocks and the AVX-512 kernels");
          a.blocks_t = as_ptr<const float>(blocks_t);
          py::gil_scoped_release nogil;
          se::bsr_linear(a);
        },
        "Y(N,O) = act(X(N,I) · Wᵀ + b), W in BSR with R×C blocks. Same pointer arguments as "
        "csr_linear plus R and C after O. blocks_t (R = 16, AVX-512; 0 for none): the "
        "values transposed to (nnzb, C, 16) fp32, 64-byte aligned, for the batch-as-rows kernel.",
        py::arg("y"), py::arg("x"), py::arg("n"), py::arg("in_features"), py::arg("out_features"),
        py::arg("block_r"), py::arg("block_c"), py::arg("crow"), py::arg("col"), py::arg("values"),
        py::arg("wdtype"), py::arg("bias"), py::arg("act"), py::arg("nthreads"), py::arg("blocks_t") = 0);

  // The py::arg lists of csr_linear, bsr_linear and bsr_linear_bf16 look alike on purpose: each
  // spells out its own Python signature (names, order, defaults) beside its docstring.
  m.def("bsr_linear_bf16",
        [](uintptr_t y, uintptr_t x, int64_t n, int64_t i, int64_t o, int64_t r, int64_t c,
           uintptr_t crow, uintptr_t col, uintptr_t packed, uintptr_t bias, int act, int nthreads, bool x_bf16, bool y_bf16,
           uintptr_t residual, uintptr_t ln_gamma, uintptr_t ln_beta, double ln_eps) {
          se::LinearArgs a = make_bsr_args(y, x, n, i, o, r, c, crow, col, packed, 1, bias, act, nthreads);
          a.residual = as_ptr<const uint16_t>(residual);
          a.ln_gamma = as_ptr<const float>(ln_gamma);
          a.ln_beta = as_ptr<const float>(ln_beta);
          a.ln_eps = float(ln_eps);
          if (r > 16 || c > 32 || c % 2) throw std::invalid_argument("bf16 kernels need R <= 16 and an even C <= 32");
          if (se::current_bf16_isa() == se::BF16_NONE) throw std::runtime_error("bsr_linear_bf16: no bf16 ISA selected (see bf16_support())");
          a.x_bf16 = x_bf16;
          a.y_bf16 = y_bf16;
          py::gil_scoped_release nogil;
          se::bsr_linear_bf16(a);
        },
        "Y(N,O) = act(X(N,I) · Wᵀ + b), bf16 products with fp32 accumulation (AMX tiles "
        "or AVX512-BF16, per bf16_isa()), W in BSR with R×C blocks (R <= 16, C even <= 32) whose "
        "values are VNNI-packed: (nnzb, C/2, R, 2) bf16. Same pointer arguments as bsr_linear; x_bf16: "
        "x points at bf16 (else fp32, rounded to bf16 once per call); y_bf16: y points at bf16 (else fp32). "
        "residual (0 for none; AMX, bf16 y, act none): Y = LayerNorm(X · Wᵀ + b + RESIDUAL(N,O) bf16) per row "
        "· ln_gamma + ln_beta ((O,) fp32 or 0), biased variance, eps ln_eps.",
        py::arg("y"), py::arg("x"), py::arg("n"), py::arg("in_features"), py::arg("out_features"),
        py::arg("block_r"), py::arg("block_c"), py::arg("crow"), py::arg("col"), py::arg("packed"),
        py::arg("bias"), py::arg("act"), py::arg("nthreads"), py::arg("x_bf16") = false, py::arg("y_bf16") = false,
        py::arg("residual") = 0, py::arg("ln_gamma") = 0, py::arg("ln_beta") = 0, py::arg("ln_eps") = 1e-5);
  m.def("csr_linear_bf16",
        [](uintptr_t y, uintptr_t x, int64_t n, int64_t i, int64_t o, uintptr_t pair_ptr, uintptr_t pair_col,
           uintptr_t pair_val, uintptr_t bias, int act, int nthreads) {
          se::LinearArgs a = make_args(y, x, n, i, o, pair_ptr, 0, pair_val, 1, bias, act, nthreads);
          if (i > 65536) throw std::invalid_argument("csr_linear_bf16: uint16 pair columns need in_features <= 65536");
          if (se::current_bf16_isa() == se::BF16_NONE) throw std::runtime_error("csr_linear_bf16: no bf16 ISA selected (see bf16_support())");
          a.col16 = as_ptr<const uint16_t>(pair_col);
          a.x_bf16 = a.y_bf16 = true;
          py::gil_scoped_release nogil;
          se::csr_linear_bf16(a);
        },
        "Y(N,O) = act(X(N,I) · Wᵀ + b) on AVX512-BF16, X and Y bf16, W in CSR with its entries paired "
        "per row (an odd row padded with a zero weight on its last column): pair_ptr (O+1,) int32, "
        "pair_col (P, 2) uint16 input columns, pair_val (P, 2) bf16 weights; bias (O,) fp32 or 0.",
        py::arg("y"), py::arg("x"), py::arg("n"), py::arg("in_features"), py::arg("out_features"),
        py::arg("pair_ptr"), py::arg("pair_col"), py::arg("pair_val"), py::arg("bias"), py::arg("act"),
        py::arg("nthreads"));
  m.def("bf16_support", [] {
    std::string amx, dp;
    const bool has_amx = se::amx_usable(&amx), has_dp = se::avx512_bf16_usable(&dp);
    py::dict d;
    d["amx"] = has_amx;
    d["amx_reason"] = amx;
    d["avx512_bf16"] = has_dp;
    d["avx512_bf16_reason"] = dp;
    return d;
  }, "Whether AMX and AVX512-BF16 can run here, and why not (empty reason when they can). The first "
     "call requests AMX tile permission from Linux.");
  m.def("set_bf16_isa",
        [](const std::string& name) {
          if (name == "auto") return se::set_bf16_isa(se::best_bf16_isa());
          for (int i = 0; i < 3; ++i)
            if (name == kBf16Names[i]) return se::set_bf16_isa(static_cast<se::Bf16Isa>(i));
          throw std::invalid_argument("set_bf16_isa: expected 'auto', 'amx', 'avx512_bf16' or 'none', got '" + name + "'");
        },
        "Select the bf16 kernel family for later calls: 'auto', 'amx', 'avx512_bf16' or 'none'.");
  m.def("bf16_isa", [] { return std::string(kBf16Names[se::current_bf16_isa()]); },
        "bf16 kernel family in use: 'amx', 'avx512_bf16' or 'none' ('none' while the ISA is below avx512).");
  m.def("last_bf16_kernel", [] { return std::string(kBf16KernelNames[se::last_bf16_kernel()]); },
        "Which bf16 kernel served the latest bsr_linear_bf16 / csr_linear_bf16 call: 'amx' or "
        "'avx512_bf16' (BSR), 'avx512_bf16_csr' (CSR), 'none' before any.");
  m.def("set_isa",
        [](const std::string& name) {
          if (name == "portable") se::set_isa(se::ISA_PORTABLE);
          else if (name == "avx2") se::set_isa(se::ISA_AVX2);
          else if (name == "avx512") se::set_isa(se::ISA_AVX512);
          else if (name == "auto") se::set_isa(se::best_isa());
          else throw std::invalid_argument("set_isa: expected 'auto', 'avx512', 'avx2' or 'portable', got '" + name + "'");
        },
        "Select the kernel ISA for later calls: 'auto', 'avx512', 'avx2' or 'portable'.");
  m.def("get_isa", [] {
    static const char* names[] = {"portable", "avx2", "avx512"};
    return std::string(names[se::current_isa()]);
  });
  m.def("set_csr_bits", &se::set_csr_bits, py::arg("bits"),
        "Vector width of the batched fp32 CSR kernels under AVX-512: 0 (auto), 256 or 512.");
  m.def("avx512_split", &se::avx512_split,
        "Whether this CPU has AVX-512 and runs each 512-bit operation as two 256-bit halves (AMD Zen 4).");
  m.def("csr_bits", &se::csr_bits, "Vector width (bits) the batched fp32 CSR kernels use now: 512 or 256.");
  m.def("cpu_has_avx2", &se::cpu_has_avx2, "Whether this CPU runs the AVX2+FMA+F16C kernels.");
  m.def("cpu_has_avx512", &se::cpu_has_avx512, "Whether this CPU also runs the AVX-512F micro-kernels.");
  m.def("has_openmp", [] {
#ifdef _OPENMP
    return true;
#else
    return false;
#endif
  });
}
