"""Python side of the C++ CPU kernels (engine._C): checks once at the boundary, then hands raw
buffers to the extension. Kernels compute in fp32; weights may be stored as fp32, bf16 or fp16.

The kernels pick their instruction set at import: AVX-512F micro-kernels where the CPU has them,
else AVX2+FMA+F16C, else portable C++. SPARSE_ENGINE_ISA=avx2|portable (environment) or
`set_isa(...)` forces a narrower one (tests run every path). Under AVX-512 the batched fp32 CSR runs
512 bits wide, or 256 on AMD Zen 4 where that is faster (`csr_bits`, `set_csr_bits`,
SPARSE_ENGINE_CSR_BITS). bf16 x with bf16 BSR weights computes in
bf16 on AMX tiles or AVX512-BF16 where the CPU has them (`bf16_isa`, `set_bf16_isa`, `bf16_support`);
bf16 x with bf16 CSR weights on AVX512-BF16 (except a few batch sizes, see bf16_kernel_for).

Per call the only Python work is the launch; the one prepared layout (a uint16 copy of a CSR
weight's column indices) is made once per index tensor and cached (`prepare_weight`).
"""
from __future__ import annotations

import weakref

import torch

from .formats import BSR, CSR

try:
    from . import _C
    _IMPORT_ERROR = None
except ImportError as e:  # the extension is optional: engine imports and falls back without it
    _C = None
    _IMPORT_ERROR = str(e)

_ACT = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3}
_WDTYPE = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_U16_MAX_COLS = 65536  # uint16 column indices address at most this many input features


def available() -> bool:
    return _C is not None


def import_error() -> str | None:
    return _IMPORT_ERROR


# Mirror the C++ settings for per-call checks: the ISA, and the batched CSR kernels' vector width.
_ISA = [_C.get_isa() if _C is not None else "none"]
_CSR_BITS = [_C.csr_bits() if _C is not None else 0]


def isa() -> str:
    """Instruction set the kernels run with now: "avx512", "avx2" or "portable"."""
    return _C.get_isa()


def set_isa(name: str) -> None:
    """Select "auto", "avx512", "avx2" or "portable" for later calls (process-wide)."""
    _C.set_isa(name)
    _ISA[0], _CSR_BITS[0] = _C.get_isa(), _C.csr_bits()


def isa_label() -> str:
    """The ISA as benchmark banners state it: "avx512 (256-bit batched CSR)" where it applies."""
    name = _C.get_isa()
    return f"{name} (256-bit batched CSR)" if name == "avx512" and _C.csr_bits() == 256 else name


def csr_bits() -> int:
    """Vector width (bits) of the batched fp32 CSR kernels now: 512 (AVX-512 zmm kernels) or 256
    (the AVX2 kernels, also chosen under AVX-512 on AMD Zen 4, where they are faster)."""
    return _C.csr_bits()


def set_csr_bits(bits: int | str) -> None:
    """Select "auto", 256 or 512 (process-wide; 512 needs AVX-512, and takes effect under it)."""
    _C.set_csr_bits(0 if bits == "auto" else int(bits))
    _CSR_BITS[0] = _C.csr_bits()


# Prepared copies of a weight's buffers, built once and keyed by the source tensors themselves, so
# a copy outlives the short-lived CSR views SparseLinear builds per call; an in-place update
# (load_state_dict copies into buffers) bumps a source's _version and triggers a fresh copy; the
# entry goes when the first source tensor does. (A plain dict: WeakIdKeyDictionary lookups cost
# microseconds, which matters on a 10 µs layer.) Tensors made under torch.inference_mode keep no
# version counter; they count as version 0, so an in-place edit of one inside inference_mode is
# not seen (outside it such a tensor cannot be edited at all).
# (kind, id(sources[0])) -> (weakrefs of sources, their _versions, built copy)
_CACHE: dict[tuple[str, int], tuple] = {}


def _cached(kind: str, sources: tuple[torch.Tensor, ...], build):
    """build() once per (kind, source tensors, their versions); later calls return the same copy."""
    key = (kind, id(sources[0]))
    versions = tuple(0 if t.is_inference() else t._version for t in sources)
    hit = _CACHE.get(key)
    if hit is not None and hit[1] == versions and all(r() is t for r, t in zip(hit[0], sources)):
        return hit[2]
    built = build()
    refs = (weakref.ref(sources[0], lambda _r: _CACHE.pop(key, None)),) + tuple(
        weakref.ref(t) for t in sources[1:])
    _CACHE[key] = (refs, versions, built)
    return built


def _col16(w: CSR) -> torch.Tensor | None:
    """uint16 copy of w's column indices (None when I > 65536), made once per index tensor."""
    if w.shape[1] > _U16_MAX_COLS:
        return None
    # int32 -> int16 keeps the low 16 bits: the uint16 value of every index < 65536.
    return _cached("col16", (w.col_indices,), lambda: w.col_indices.contiguous().to(torch.int16))


# Panelled CSR copy for the batched AVX-512 and AVX2 paths: entries regrouped by input panel of
# _PANEL_WIDTH features (128 x 64 batch columns of packed X = 32 KiB, an L1's worth), then by row.
_PANEL_WIDTH = 128
_PANEL_MIN_BATCH = 16          # below, one 8-column chunk: the row-at-a-time loop is as fast
# The 512-bit batched layout: grouped panels (SELL-4, 4 rows at a time over chunk-major packed X) or the
# row-at-a-time loop over L2-resident packed X (panel-major rows lose to both). Groups pay a fixed cost
# each (16 partial-sum vectors loaded and stored, a loop exit), so they need enough work per group:
# entries per row per 128-input panel (= 128 x density) times 16-column vectors per batch chunk.
# Minimum entries per row-panel by vectors per chunk (Intel Xeon with AMX, 2026-12-08,
# bench/results/cpu.md "Grouped CSR kernel in registers"): 4 vectors (>= 64 rows) from 5 (95 %:
# 1.0-1.27x the row loop; 97 % mixed), 3 (48 rows) from 9 (90 %: 5 of 6 shapes), 2 (32 rows) from 20
# (80 %; at 90 % mixed, 0.8-1.25x); one vector (16 rows): never (the row loop 1.03-1.9x). The batch
# rounded up to 8 must be a multiple of 16 (the kernel's 16-column vectors) for groups at all.
_GROUP_MIN_PER_ROW = {2: 20.0, 3: 9.0, 4: 5.0}
# AVX2 (AMD EPYC Zen 3, 32 KiB L1, 512 KiB L2; bench/results/cpu.md "AVX2: panel-major CSR" and "AVX2,
# afternoon"): with X packed chunk-major, panel-major rows beat the row loop from s = 0.8 to 0.97
# (3.8 entries per row-panel: 7 of 9 cells, 2 ties) at 64-1024 rows; at 0.98 (2.6) it is mixed and at
# 0.99 the row loop wins. No grouped copy on AVX2 (4 rows x 64 columns of partial sums need 32 ymm
# registers, AVX2 has 16). The same rule serves the 256-bit kernels under AVX-512 on Zen 4, where
# 256-bit panel-major rows beat every 512-bit layout in 17/18 cells at 80-95 % (cpu.md).
_AVX2_PANEL_MIN_PER_ROW = 3.0


def _batched_layout(w: CSR, batch: int) -> str:
    """"rows" (the CSR itself), "panels" or "groups": which copy the batched kernel reads."""
    o, i = w.shape
    if not (batch >= _PANEL_MIN_BATCH and _ISA[0] in ("avx512", "avx2") and 2 * _PANEL_WIDTH < i <= _U16_MAX_COLS):
        return "rows"
    per_row_panel = w.values.numel() * _PANEL_WIDTH / (o * i)
    if _CSR_BITS[0] == 256:  # the AVX2 kernels (also under AVX-512 on Zen 4)
        return "panels" if per_row_panel >= _AVX2_PANEL_MIN_PER_ROW else "rows"
    n_pad = -(-batch // 8) * 8
    vectors = min(4, n_pad // 16) if n_pad % 16 == 0 else 0
    return "groups" if per_row_panel >= _GROUP_MIN_PER_ROW.get(vectors, float("inf")) else "rows"


def _panels(w: CSR):
    """(seg (P·O+1,) int32, col (nnz,) int16-as-uint16, values (nnz,)) regrouped panel-major."""
    return _cached("panels", (w.values, w.col_indices), lambda: _build_panels(w))


def _panel_slots(w: CSR, stride: int) -> tuple[torch.Tensor, int]:
    """Each stored entry's (input panel, output row) as panel * stride + row; and the panel count."""
    o, i = w.shape
    rows = torch.repeat_interleave(torch.arange(o), (w.crow_indices[1:] - w.crow_indices[:-1]).long())
    return (w.col_indices.long() // _PANEL_WIDTH) * stride + rows, -(-i // _PANEL_WIDTH)


def _build_panels(w: CSR):
    val, col = w.values, w.col_indices
    o = w.shape[0]
    slot, n_panels = _panel_slots(w, o)                     # (panel, row), panel-major
    order = torch.argsort(slot, stable=True)                # keeps columns sorted within a slot
    seg = torch.zeros(n_panels * o + 1, dtype=torch.int64)
    seg[1:] = torch.cumsum(torch.bincount(slot, minlength=n_panels * o), 0)
    built = (seg.to(torch.int32), col[order].to(torch.int16).contiguous(), val[order].contiguous())
    return built


def _groups(w: CSR):
    """Grouped panels (SELL-4 per input panel): (off, len, rows, col, val), see csrc/sparse_linear.h."""
    return _cached("groups", (w.values, w.col_indices), lambda: _build_groups(w))


def _build_groups(w: CSR):
    val, col = w.values, w.col_indices
    o_pad = -(-w.shape[0] // 64) * 64
    n_win = o_pad // 64
    slot, n_panels = _panel_slots(w, o_pad)                            # (panel, row)
    length = torch.bincount(slot, minlength=n_panels * o_pad).reshape(n_panels, n_win, 64)
    # Rows sorted by length (longest first) inside each 64-row window of each panel, so the 4 rows
    # of a group have similar lengths and little padding.
    perm = torch.argsort(length, dim=2, descending=True, stable=True)  # lane position -> row in window
    pos = torch.empty_like(perm)
    pos.scatter_(2, perm, torch.arange(64).expand_as(perm))             # row in window -> position
    glen = torch.gather(length, 2, perm).reshape(n_panels, n_win, 16, 4)[..., 0]  # group max = lane 0
    glen = glen.reshape(-1)
    goff = torch.zeros_like(glen)
    goff[1:] = torch.cumsum(glen * 4, 0)[:-1]
    grows = (perm + (torch.arange(n_win) * 64).view(1, n_win, 1)).reshape(-1)
    # Each entry's slot: group offset + 4 * (its rank inside its (panel, row) segment) + lane.
    order = torch.argsort(slot, stable=True)
    seg_start = torch.zeros(n_panels * o_pad + 1, dtype=torch.int64)
    seg_start[1:] = torch.cumsum(length.reshape(-1), 0)
    ranked_slot = slot[order]
    rank = torch.arange(order.numel()) - seg_start[ranked_slot]
    p_of, r_of = ranked_slot // o_pad, ranked_slot % o_pad
    lane_pos = pos.reshape(n_panels, o_pad)[p_of, r_of]
    gid = p_of * (o_pad // 4) + (r_of // 64) * 16 + lane_pos // 4
    dest = goff[gid] + 4 * rank + lane_pos % 4
    total = int((glen * 4).sum())
    gcol = torch.zeros(total, dtype=torch.int16)
    gval = torch.zeros(total, dtype=val.dtype)
    gcol[dest] = col[order].to(torch.int16)
    gval[dest] = val[order]
    built = (goff.to(torch.int32), glen.to(torch.int32), grows.to(torch.int32), gcol, gval)
    return built


def prepare_weight(w: CSR | BSR, batch: int | None = None) -> CSR | BSR:
    """One-time layout work for the C++ kernels, cached and reused by every later call on the same
    buffers: for CSR with in_features <= 65536, a uint16 copy of the column indices (2 bytes less
    per stored value on the memory-bound small-batch path; 2 bytes/value extra memory), and, given
    a `batch` >= 16, the panel-major or grouped copy the batched kernel reads (512-bit kernels grouped
    from density 0.04 at >= 64 rows, 0.07 at 48, 0.16 at 32; 256-bit panel-major from 0.023;
    another value + 2 bytes per stored value, plus padding). The first kernel call does it lazily (so
    does csr_pair for the copy it reads); SparseLinear calls this (without `batch`) at construction to
    keep the index copy out of the first inference."""
    if isinstance(w, CSR) and w.device.type == "cpu":
        _col16(w)
        layout = "rows" if batch is None else _batched_layout(w, batch)
        if layout == "panels":
            _panels(w)
        elif layout == "groups":
            _groups(w)
    return w


def _weight(fn: str, w: CSR | BSR):
    val = w.values
    if not val.is_cpu:
        raise ValueError(f"{fn}: weight is on {val.device}, the C++ kernels need CPU tensors")
    wdtype = _WDTYPE.get(val.dtype)
    if wdtype is None:
        raise TypeError(f"{fn}: weight values must be float32/bfloat16/float16, got {val.dtype}")
    # No-ops for layouts built by engine.formats; they guard hand-made views.
    return w.crow_indices.contiguous(), w.col_indices.contiguous(), val.contiguous(), wdtype


def _io(x: torch.Tensor, bias: torch.Tensor | None, o: int):
    if x.dtype is not torch.float32 or not x.is_contiguous():
        x = x.to(torch.float32).contiguous()
    bias = _bias32(bias)
    return x, bias, x.new_empty((x.shape[0], o))


def csr_linear_cpu(x: torch.Tensor, w: CSR, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """x (N, I) -> act(x · Wᵀ + b) (N, O), in x's dtype."""
    crow, col, val, wdtype = _weight("csr_linear_cpu", w)
    out_dtype = x.dtype
    if out_dtype is torch.bfloat16 and bf16_kernel_for(w, x.shape[0]) != "none":
        return _csr_linear_bf16(x, w, bias, activation)
    c16 = _col16(w)
    x, b, y = _io(x, bias, w.shape[0])
    extra = (0, 0, 0, 0, 0, 0, 0, 0, 0)
    layout = _batched_layout(w, x.shape[0])
    if layout == "groups":
        extra = (0, 0, 0, _PANEL_WIDTH) + tuple(t.data_ptr() for t in _groups(w))
    elif layout == "panels":
        seg, pcol, pval = _panels(w)
        extra = (seg.data_ptr(), pcol.data_ptr(), pval.data_ptr(), _PANEL_WIDTH, 0, 0, 0, 0, 0)
    _C.csr_linear(y.data_ptr(), x.data_ptr(), x.shape[0], w.shape[1], w.shape[0], crow.data_ptr(),
                  col.data_ptr(), val.data_ptr(), wdtype, 0 if b is None else b.data_ptr(),
                  _ACT[activation], torch.get_num_threads(), 0 if c16 is None else c16.data_ptr(),
                  *extra)
    return y if out_dtype is torch.float32 else y.to(out_dtype)


def pair_fits(x: torch.Tensor, w1, w2) -> bool:
    """Whether csr_pair_cpu runs act2(act1(x · W1ᵀ + b1) · W2ᵀ + b2) for this x: fp32 x on the CPU,
    both weights CSR with one value dtype, and both in a panelled batched layout at x's batch
    (panel-major or grouped; with the 512-bit kernels, grouped needs the batch rounded up to 8 a
    multiple of 16)."""
    if not (isinstance(w1, CSR) and isinstance(w2, CSR) and x.dtype is torch.float32 and x.dim() == 2
            and x.device.type == "cpu" and w1.values.is_cpu and w2.values.is_cpu
            and w1.values.dtype is w2.values.dtype and w1.shape[0] == w2.shape[1]):
        return False
    n = x.shape[0]
    return _batched_layout(w1, n) != "rows" and _batched_layout(w2, n) != "rows"


def _layout_ptrs(w: CSR, batch: int) -> tuple[int, ...]:
    """The batched copy csr_pair reads, as data pointers: (seg, col, val) or (off, len, rows, col, val)."""
    built = _groups(w) if _batched_layout(w, batch) == "groups" else _panels(w)
    return tuple(t.data_ptr() for t in built)


def csr_pair_cpu(x: torch.Tensor, w1: CSR, b1: torch.Tensor | None, act1: str, w2: CSR,
                 b2: torch.Tensor | None, act2: str = "none") -> torch.Tensor:
    """act2(act1(x · W1ᵀ + b1) · W2ᵀ + b2) (N, O) in one kernel call, where pair_fits(x, w1, w2):
    the (N, F) hidden activations never leave the kernels' packed layout (no transposing them out
    and packing them back in between), which is most of a layer's non-multiply work at batch >= 16."""
    x = x.contiguous()
    n = x.shape[0]
    crow1, crow2 = w1.crow_indices.contiguous(), w2.crow_indices.contiguous()
    b1, b2 = _bias32(b1), _bias32(b2)
    y = x.new_empty((n, w2.shape[0]))
    _C.csr_pair(y.data_ptr(), x.data_ptr(), n, w1.shape[1], w1.shape[0], w2.shape[0],
                _WDTYPE[w1.values.dtype], torch.get_num_threads(), _PANEL_WIDTH,
                crow1.data_ptr(), _layout_ptrs(w1, n), 0 if b1 is None else b1.data_ptr(), _ACT[act1],
                crow2.data_ptr(), _layout_ptrs(w2, n), 0 if b2 is None else b2.data_ptr(), _ACT[act2])
    return y


def attention_fits(qkv: torch.Tensor, heads: int) -> bool:
    """Whether attention_cpu runs on this QKV projection output: (tokens, 3H) on the CPU, in fp32 with
    a head size that is a multiple of 8 (AVX2 or AVX-512 kernels), or in bf16 with a head size that
    is a multiple of 32 on AMX tiles (bf16_isa() == "amx")."""
    if not (qkv.device.type == "cpu" and qkv.dim() == 2 and heads > 0 and qkv.shape[1] % (3 * heads) == 0):
        return False
    hs = qkv.shape[1] // (3 * heads)
    if qkv.dtype is torch.bfloat16:
        return hs % 32 == 0 and bf16_isa() == "amx"
    return qkv.dtype is torch.float32 and _ISA[0] in ("avx2", "avx512") and hs % 8 == 0


def attention_cpu(qkv: torch.Tensor, batch: int, seq: int, heads: int) -> torch.Tensor:
    """softmax(Q Kᵀ / sqrt(head size)) V per (batch, head), no mask, straight from the QKV projection's
    output (batch·seq, 3H) (each row: the heads' queries, then keys, then values) to (batch·seq, H),
    the layout the output projection reads (where attention_fits). bf16 runs on AMX tiles: bf16
    products, fp32 scores, softmax and sums, the softmax weights rounded to bf16 for P · V, as
    torch's bf16 attention does (last_bf16_kernel() == "amx_attention")."""
    qkv = qkv.contiguous()
    h = qkv.shape[1] // 3
    out = qkv.new_empty((qkv.shape[0], h))
    kernel = _C.attention_bf16 if qkv.dtype is torch.bfloat16 else _C.attention
    kernel(out.data_ptr(), qkv.data_ptr(), batch, seq, heads, h // heads, (h // heads) ** -0.5,
           torch.get_num_threads())
    return out


def add_norm_fits(h: torch.Tensor, r: torch.Tensor, weight, bias) -> bool:
    """Whether add_layer_norm_ runs LayerNorm(h + r): h and r (tokens, H) of one shape, both fp32 or
    both bf16, contiguous on the CPU; weight / bias None or (H,); AVX2 or AVX-512 kernels."""
    return (_ISA[0] in ("avx2", "avx512") and h.dtype in (torch.float32, torch.bfloat16) and r.dtype is h.dtype
            and h.dim() == 2 and h.shape == r.shape and h.device.type == "cpu" and r.device.type == "cpu"
            and h.is_contiguous() and r.is_contiguous()
            and all(t is None or (t.device.type == "cpu" and t.shape == h.shape[1:]) for t in (weight, bias)))


def add_layer_norm_(h: torch.Tensor, r: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                    eps: float) -> torch.Tensor:
    """h = LayerNorm(h + r) over the last dim, in place (where add_norm_fits), one pass in C++: the
    sum is normalised in fp32 without rounding it to h's dtype first (torch's h.add_(r) rounds a bf16
    h + r before layer_norm; the rest is the same arithmetic, the output rounded once)."""
    weight, bias = _bias32(weight), _bias32(bias)
    _C.add_layer_norm(h.data_ptr(), h.data_ptr(), r.data_ptr(), h.dtype is torch.bfloat16, h.shape[0], h.shape[1],
                      0 if weight is None else weight.data_ptr(), 0 if bias is None else bias.data_ptr(), eps,
                      torch.get_num_threads())
    return h


def bsr_linear_cpu(x: torch.Tensor, w: BSR, bias: torch.Tensor | None, activation: str) -> torch.Tensor:
    """x (N, I) -> act(x · Wᵀ + b) (N, O), in x's dtype, for W in R×C blocks. bf16 x with bf16
    weights in bf16-kernel blocks computes in bf16 on AMX / AVX512-BF16 where present."""
    crow, col, val, wdtype = _weight("bsr_linear_cpu", w)
    out_dtype = x.dtype
    if out_dtype is torch.bfloat16 and bf16_kernel_for(w) != "none":
        return _bsr_linear_bf16(x, w, crow, col, bias, activation)
    x, b, y = _io(x, bias, w.shape[0])
    blocks_t = _blocks_t(w, x.shape[0])
    _C.bsr_linear(y.data_ptr(), x.data_ptr(), x.shape[0], w.shape[1], w.shape[0], val.shape[1],
                  val.shape[2], crow.data_ptr(), col.data_ptr(), val.data_ptr(), wdtype,
                  0 if b is None else b.data_ptr(), _ACT[activation], torch.get_num_threads(),
                  0 if blocks_t is None else blocks_t.data_ptr())
    return y if out_dtype is torch.float32 else y.to(out_dtype)


# fp32 BSR with 16-row blocks on whole AVX-512 (not Zen 4's split halves): from this batch the
# batch-as-rows kernel (outputs in a zmm's lanes, no packing of X, no transposing back) wins; the
# Intel Xeon, 2 threads, 90 % 16x16 blocks (bench/results/minilm_speed.md): 1.3-1.9x at 1024-4096 rows.
_ROWS_MAJOR_MIN_BATCH = 128
_AVX512_SPLIT = _C is not None and _C.avx512_split()  # a CPU fact, read once


def _blocks_t(w: BSR, batch: int) -> torch.Tensor | None:
    """The values transposed to (nnzb, C, 16) fp32, made once per values tensor, where the
    batch-as-rows kernel serves this call; else None."""
    if not (_ISA[0] == "avx512" and not _AVX512_SPLIT and w.values.shape[1] == 16 and batch >= _ROWS_MAJOR_MIN_BATCH):
        return None
    return _cached("blocks_t", (w.values,), lambda: w.values.float().transpose(1, 2).contiguous())


# ---- bf16 compute: BSR on AMX tiles / AVX512-BF16, CSR on AVX512-BF16 (csrc/bf16.cpp) ---------------
# Used when both x and the weight values are bf16 (the model was cast to bf16, as a dense
# `model.to(torch.bfloat16)` runs on oneDNN's AMX kernels); fp32 x keeps the fp32-compute kernels,
# whose contract is fp32 arithmetic on upcast 16-bit weights. Products are bf16 x bf16, accumulated
# in fp32; the output is rounded to bf16 like torch's bf16 F.linear.
BF16_TILE = (16, 32)  # the largest block one AMX tile holds: R outputs x C inputs (C even: bf16 pairs)


def bf16_block_fits(block: tuple[int, int]) -> bool:
    """Whether R x C blocks run on the bf16 kernels (at most one tile, an even C)."""
    r, c = block
    return r <= BF16_TILE[0] and c <= BF16_TILE[1] and c % 2 == 0


def bf16_support() -> dict:
    """{"amx": bool, "amx_reason": str, "avx512_bf16": bool, "avx512_bf16_reason": str}: what this
    CPU/OS can run and, where not, why (e.g. Linux refused the AMX tile permission)."""
    if _C is None:
        why = f"engine._C did not import: {_IMPORT_ERROR}"
        return {"amx": False, "amx_reason": why, "avx512_bf16": False, "avx512_bf16_reason": why}
    return dict(_C.bf16_support())


def bf16_isa() -> str:
    """bf16 kernel family in use: "amx", "avx512_bf16" or "none" (also while set_isa() < avx512)."""
    return _C.bf16_isa() if _C is not None else "none"


def set_bf16_isa(name: str) -> None:
    """Select "auto", "amx", "avx512_bf16" or "none" (process-wide); raises when the CPU/OS lacks it."""
    _C.set_bf16_isa(name)


def last_bf16_kernel() -> str:
    """Which bf16 kernel served the latest bf16 call ("none" before any): "amx" / "avx512_bf16" for
    BSR, "avx512_bf16_csr" for CSR. Proves the fast path ran."""
    return _C.last_bf16_kernel()


# Batch rows for which bf16 CSR keeps the fp32-compute kernel, measured per CPU (bench/results/bf16.md):
# - Intel (Xeon with AMX): 9-15. The bf16 kernel's batched path pads the batch to 32 rows, and
#   VDPBF16PS retires about half as often as an FMA there, so it lost; below 9 the quad path won.
# - AMD Zen 4: 5-8. Its 64-bit gathers are slow, so the quad path's second group of 4 rows cost more
#   than it saved (0.65-0.82x), while the padded 32-row path wins from 9 rows (1.17-1.26x).
_BF16_CSR_FP32_BATCHES = range(5, 9) if _C is not None and _C.avx512_split() else range(9, 16)


def bf16_kernel_for(w: CSR | BSR, batch: int | None = None) -> str:
    """The bf16 kernel that would serve bf16 x (`batch` rows, if given) with this weight, as
    last_bf16_kernel() names it, or "none" (the fp32-compute kernels). CSR: AVX512-BF16 (also
    where the family is AMX, whose tiles need blocks), for in_features <= 65536 (uint16 pair
    columns) and a batch outside _BF16_CSR_FP32_BATCHES."""
    if not isinstance(w, (CSR, BSR)) or w.values.dtype is not torch.bfloat16 or _C is None:
        return "none"
    family = _C.bf16_isa()
    if family == "none":
        return "none"
    if isinstance(w, CSR):
        ok = w.shape[1] <= _U16_MAX_COLS and batch not in _BF16_CSR_FP32_BATCHES
        return "avx512_bf16_csr" if ok else "none"
    return family if bf16_block_fits(tuple(w.values.shape[1:])) else "none"


def _vnni(w: BSR) -> torch.Tensor:
    """Values (nnzb, R, C) -> (nnzb, C/2, R, 2): pairs of adjacent inputs per output, the operand
    layout of TDPBF16PS / VDPBF16PS. Made once per values tensor (cached like the CSR copies)."""
    def build():
        nb, r, c = w.values.shape
        return w.values.reshape(nb, r, c // 2, 2).permute(0, 2, 1, 3).contiguous()
    return _cached("vnni", (w.values,), build)


def _bias32(bias: torch.Tensor | None) -> torch.Tensor | None:
    """The bias the bf16 kernels read: fp32, contiguous. A bf16 model's bias is bf16: its fp32
    copy is made once, like the weight's VNNI copy."""
    if bias is not None and (bias.dtype is not torch.float32 or not bias.is_contiguous()):
        bias = _cached("bias32", (bias,), lambda: bias.to(torch.float32).contiguous())
    return bias


def _bsr_linear_bf16(x, w: BSR, crow, col, bias, activation, residual=None, gamma=None, beta=None, eps=0.0):
    if not x.is_contiguous():
        x = x.contiguous()
    bias, gamma, beta = _bias32(bias), _bias32(gamma), _bias32(beta)
    y = torch.empty((x.shape[0], w.shape[0]), dtype=torch.bfloat16)
    packed = _vnni(w)
    _C.bsr_linear_bf16(y.data_ptr(), x.data_ptr(), x.shape[0], w.shape[1], w.shape[0], packed.shape[2],
                       2 * packed.shape[1], crow.data_ptr(), col.data_ptr(), packed.data_ptr(),
                       0 if bias is None else bias.data_ptr(), _ACT[activation], torch.get_num_threads(),
                       True, True, 0 if residual is None else residual.data_ptr(),
                       0 if gamma is None else gamma.data_ptr(), 0 if beta is None else beta.data_ptr(), eps)
    return y


def linear_add_norm_fits(x: torch.Tensor, w, residual: torch.Tensor, weight, bias) -> bool:
    """Whether linear_add_norm runs LayerNorm(x · Wᵀ + b + residual) in one AMX kernel call: bf16 x and
    residual (N, O) on the CPU, contiguous; W in BSR with bf16 values in AMX tiles; weight / bias None
    or (O,)."""
    return (isinstance(w, BSR) and x.dtype is torch.bfloat16 and residual.dtype is torch.bfloat16
            and x.dim() == 2 and x.device.type == "cpu" and residual.device.type == "cpu"
            and residual.shape == (x.shape[0], w.shape[0]) and residual.is_contiguous()
            and w.values.dtype is torch.bfloat16 and w.values.is_cpu and bf16_kernel_for(w) == "amx"
            and all(t is None or (t.device.type == "cpu" and t.shape == (w.shape[0],)) for t in (weight, bias)))


def linear_add_norm(x: torch.Tensor, w: BSR, b: torch.Tensor | None, residual: torch.Tensor,
                    weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float) -> torch.Tensor:
    """LayerNorm(x · Wᵀ + b + residual) · weight + bias (N, O) bf16, where linear_add_norm_fits: the
    AMX kernel's threads each own whole rows, so each 64-row group's fp32 sums get the residual and
    the LayerNorm before anything is rounded or written (no separate pass over the output)."""
    crow, col, _, _ = _weight("linear_add_norm", w)
    return _bsr_linear_bf16(x, w, crow, col, b, "none", residual, weight, bias, eps)


def _pairs(w: CSR):
    """The CSR weight with each row's entries paired, the layout of csrc/bf16.h's csr_linear_bf16:
    (pair_ptr (O+1,) int32, pair_col (P, 2) int16-as-uint16, pair_val (P, 2) bf16). An odd row
    gets a zero weight on its last entry's column (it reads no x the row does not already read).
    Made once per weight (cached like the VNNI copy)."""
    def build():
        o = w.shape[0]
        crow = w.crow_indices.long()
        count = crow[1:] - crow[:-1]
        pairs = (count + 1) // 2
        pair_ptr = torch.zeros(o + 1, dtype=torch.int64)
        pair_ptr[1:] = torch.cumsum(pairs, 0)
        slots = 2 * int(pair_ptr[-1])
        row = torch.repeat_interleave(torch.arange(o), count)
        dest = 2 * pair_ptr[row] + torch.arange(row.numel()) - crow[row]   # entry -> slot
        col = torch.zeros(slots, dtype=torch.int16)
        val = torch.zeros(slots, dtype=torch.bfloat16)
        col[dest] = w.col_indices.to(torch.int16)  # int32 -> int16 keeps the uint16 bits
        val[dest] = w.values
        odd = torch.nonzero(count % 2 == 1).flatten()
        col[2 * pair_ptr[odd + 1] - 1] = col[2 * pair_ptr[odd + 1] - 2]     # pad: the last column, weight 0
        return pair_ptr.to(torch.int32), col.reshape(-1, 2), val.reshape(-1, 2)
    return _cached("pairs", (w.values, w.col_indices, w.crow_indices), build)


def _csr_linear_bf16(x, w: CSR, bias, activation):
    if not x.is_contiguous():
        x = x.contiguous()
    bias = _bias32(bias)
    y = torch.empty((x.shape[0], w.shape[0]), dtype=torch.bfloat16)
    pair_ptr, pair_col, pair_val = _pairs(w)
    _C.csr_linear_bf16(y.data_ptr(), x.data_ptr(), x.shape[0], w.shape[1], w.shape[0], pair_ptr.data_ptr(),
                       pair_col.data_ptr(), pair_val.data_ptr(), 0 if bias is None else bias.data_ptr(),
                       _ACT[activation], torch.get_num_threads())
    return y
