"""SparseLinear (an nn.Linear whose weight is CSR, BSR or dense) and `sparsify`, which swaps the
nn.Linear layers of a pruned model in place. `choose_layout` is the `format="auto"` policy: the
layout the cost model predicts fastest for this layer, dense where sparse would not pay."""
from __future__ import annotations

from operator import is_

import torch
import torch.nn as nn

from . import costmodel, cpu, formats
from .formats import format_of
from .ops import BACKENDS, sparse_linear
from .reference import check_activation

FORMATS = ("auto", *formats.names())
# Block shapes `auto` tries, widest first: C a multiple of 8 fills an AVX2 vector / a tensor-core tile.
BLOCK_CANDIDATES = ((32, 32), (16, 16), (8, 8), (4, 8), (1, 8), (8, 1), (4, 4), (4, 1), (2, 2))
# A block size counts as the mask's structure when at most this share of stored values are padding.
MAX_BLOCK_PADDING = 0.05


def _divides(shape, block) -> bool:
    return shape[0] % block[0] == 0 and shape[1] % block[1] == 0


def detect_blocksize(keep: torch.Tensor, max_padding: float = MAX_BLOCK_PADDING) -> tuple[int, int] | None:
    """Largest candidate block (dividing the shape) whose kept tiles hold (almost) only kept
    weights, or None."""
    nnz = int(keep.sum())
    if nnz == 0:
        return None
    for block in BLOCK_CANDIDATES:
        if _divides(keep.shape, block) and block[0] * block[1] > 1:
            stored = formats.blocked_stored(keep, block)
            if stored - nnz <= max_padding * stored:
                return block
    return None


def choose_layout(weight: torch.Tensor, mask: torch.Tensor | None = None, *, batch: int = 8,
                  device: str = "cpu", value_bytes: int = 4, blocksize=None,
                  isa: str | None = None, compute: str = "fp32") -> tuple[str, tuple[int, int] | None, str]:
    """-> (format, blocksize, reason) for one layer, by the cost model's predicted time.

    Every registered layout the cost model has rates for competes; a blocked one with the block
    detected from the mask (or `blocksize`, when given), and never with a block that does not
    divide the weight's shape. isa: the CPU kernels' instruction set to predict for (default: this
    machine's). compute="bf16": a bf16 model (bf16 x and weights), so dense is torch's bf16 GEMM
    (oneDNN, AMX where present) and BSR blocks that fit an AMX tile run the bf16 kernels."""
    keep = (weight != 0) if mask is None else (mask != 0)
    shape = tuple(weight.shape)
    isa = isa or costmodel.current_isa()
    if blocksize is None:
        block = detect_blocksize(keep)
    else:
        block = formats.parse_blocksize(blocksize, "choose_layout")
        block = block if _divides(shape, block) else None
    times = {}
    for fmt in map(formats.get, formats.names()):
        if not costmodel.has_rates(fmt.name, device) or (fmt.blocked and block is None):
            continue
        blk = block if fmt.blocked else None
        times[fmt.name] = costmodel.predict_seconds(fmt.name, shape, fmt.stored(keep, blk), batch, blk,
                                                    value_bytes=value_bytes, device=device, isa=isa,
                                                    compute=compute)
    best = "dense"  # the baseline: a sparse layout is chosen only when predicted strictly faster
    for name, t in times.items():
        if t < times[best]:
            best = name
    speedup = times["dense"] / times[best]
    density = int(keep.sum()) / max(1, weight.numel())
    target = f"{device} ({isa})" if device == "cpu" else device
    reason = (f"density {density:.3f}, block structure {block or 'none'}: {best} predicted "
              f"{speedup:.2f}x vs dense {compute} at batch {batch} on {target}")
    return best, (block if formats.get(best).blocked else None), reason


class SparseLinear(nn.Module):
    """y = act(x Wᵀ + b) with W in any registered layout (CSR, BSR, dense); runs on
    `engine.sparse_linear`.

    The layout's tensors are buffers named by its format description (`weight_crow_indices`,
    `weight_col_indices`, `weight_values` for CSR/BSR, `weight` for dense), so `.to()`,
    `state_dict()` and `load_state_dict()` work. The weight, bias, activation and backend are
    checked here, once; `forward` then calls the kernels through sparse_linear's skip-checks path.
    """

    def __init__(self, weight, bias: torch.Tensor | None = None, activation: str | None = None,
                 backend: str = "auto"):
        super().__init__()
        fmt = format_of(weight)
        if fmt is None:
            raise TypeError(f"SparseLinear: weight must be one of the layouts {formats.names()} "
                            f"(CSR, BSR or a dense tensor), got {type(weight).__name__}")
        if len(weight.shape) != 2:
            raise ValueError(f"SparseLinear: weight must be 2-D, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.activation = activation
        self.backend = backend
        self.format = fmt.name
        self._format = fmt
        buffers = tuple(t.detach().contiguous() for t in fmt.to_buffers(weight))
        for name, t in zip(fmt.buffers, buffers):
            self.register_buffer(name, t)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"SparseLinear: bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())
        if buffers and buffers[-1].device.type == "cpu" and cpu.available():
            cpu.prepare_weight(self.sparse_weight)  # e.g. CSR's index copy: now, not in the first inference

    # Checked when set (at construction, or by a family's activation fusion / the loader), so the
    # per-call path can trust them.
    @property
    def activation(self) -> str:
        return self.__dict__["_activation"]

    @activation.setter
    def activation(self, value: str | None) -> None:
        self.__dict__["_activation"] = check_activation(value, "SparseLinear")

    @property
    def backend(self) -> str:
        return self.__dict__["_backend"]

    @backend.setter
    def backend(self, value: str) -> None:
        if value not in BACKENDS:
            raise ValueError(f"SparseLinear: unknown backend {value!r}; expected one of {BACKENDS}")
        self.__dict__["_backend"] = value

    @property
    def sparse_weight(self):
        """The weight as its layout's object (CSR, BSR, or the dense tensor) over this module's buffers."""
        hit = self.__dict__.get("_sparse_weight")
        # Rebuilt only when .to() / load_state_dict(assign=True) replaced a buffer; the check runs
        # in C (map over the buffer dict), as it sits on every forward.
        if hit is not None and all(map(is_, map(self._buffers.__getitem__, hit[0]), hit[1])):
            return hit[2]
        fmt = self._format
        buffers = tuple(self._buffers[name] for name in fmt.buffers)
        cached = fmt.from_buffers(buffers, (self.out_features, self.in_features), True)
        self.__dict__["_sparse_weight"] = (fmt.buffers, buffers, cached)
        return cached

    def validate(self) -> None:
        """Runs the layout's full checks on the current buffers (raises FormatError)."""
        fmt = self._format
        fmt.from_buffers(tuple(self._buffers[n] for n in fmt.buffers), (self.out_features, self.in_features), False)

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str = "auto", blocksize=None, *,
                    mask: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                    activation: str | None = None, batch: int = 8) -> "SparseLinear":
        """Converts a (pruned) nn.Linear. The mask defaults to `linear.weight_mask` when
        torch.nn.utils.prune left one, else to the weight's non-zeros. With format="auto", a
        `blocksize` that does not divide the weight's shape rules the blocked layouts out, and
        bf16 values (`dtype` or the weight's) are judged against dense bf16 (see choose_layout)."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        if format != "auto" and format not in formats.names():
            raise ValueError(f"SparseLinear.from_linear: unknown format {format!r}; expected one of "
                             f"{('auto', *formats.names())}")
        # torch.nn.utils.prune keeps the trained values in weight_orig; `weight` may be stale.
        weight = getattr(linear, "weight_orig", linear.weight).detach()
        if mask is None:
            mask = getattr(linear, "weight_mask", None)
        if mask is not None:
            weight = weight * (mask != 0)
        if format == "auto":
            value_dtype = dtype or weight.dtype
            # bf16 weights: taken as a bf16 model, whose dense baseline is torch's bf16 GEMM.
            compute = "bf16" if value_dtype is torch.bfloat16 and costmodel.bf16_compute_available() else "fp32"
            format, blocksize, _ = choose_layout(weight, mask, batch=batch, device=weight.device.type,
                                                 value_bytes=value_dtype.itemsize, blocksize=blocksize,
                                                 compute=compute)
        fmt = formats.get(format)
        if dtype is not None:
            weight = weight.to(dtype)
        if fmt.blocked and blocksize is None:
            keep = (weight != 0) if mask is None else (mask != 0)
            blocksize = detect_blocksize(keep) or next(
                (b for b in BLOCK_CANDIDATES if _divides(weight.shape, b)), (1, 1))
        w = fmt.build(weight, mask, blocksize if fmt.blocked else None)
        bias = None if linear.bias is None else linear.bias.detach().to(dtype or linear.bias.dtype)
        return cls(w, bias, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, self.sparse_weight, self._buffers["bias"], activation=self._activation,
                             backend=self._backend, skip_checks=True)

    def extra_repr(self) -> str:
        fmt, w = self._format, self.sparse_weight
        block = fmt.blocksize(w)
        extra = f", block={block}" if block is not None else ""
        density = fmt.stored_values(w) / max(1, self.out_features * self.in_features)
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"format={self.format}{extra}, density={density:.3f}, activation={self.activation}")


_FUSABLE = {nn.ReLU: "relu", nn.GELU: "gelu"}


def _fusable_activation(module: nn.Module) -> str | None:
    if type(module) is nn.GELU and module.approximate == "tanh":
        return "gelu_tanh"
    return _FUSABLE.get(type(module))


def sparsify(model: nn.Module, format: str = "auto", blocksize=None, *, dtype: torch.dtype | None = None,
             skip: tuple[str, ...] = (), min_sparsity: float = 0.0, fuse_activations: bool = True,
             batch: int = 8) -> nn.Module:
    """Swaps every nn.Linear of `model` (in place) for a SparseLinear; returns the model.
    (engine.sparsify, in engine/transformer.py, first swaps whole transformer encoder blocks for
    the fast block, then calls this for the linear layers left.)

    skip: qualified module names left untouched (e.g. ("classifier",)).
    min_sparsity: layers sparser than this are candidates; others stay nn.Linear.
    fuse_activations: inside nn.Sequential, a ReLU/GELU right after a linear layer is fused into
    the kernel's epilogue (the activation module becomes nn.Identity).
    With format="auto", a layer whose predicted sparse time is not below dense stays nn.Linear.
    """
    if format not in FORMATS:
        raise ValueError(f"sparsify: unknown format {format!r}; expected one of {FORMATS}")
    for name, parent in list(model.named_modules()):
        children = list(parent.named_children())
        for idx, (child_name, child) in enumerate(children):
            qual = f"{name}.{child_name}" if name else child_name
            if not isinstance(child, nn.Linear) or qual in skip:
                continue
            w = child.weight.detach()
            mask = getattr(child, "weight_mask", None)
            sparsity = 1.0 - float(((w != 0) if mask is None else (mask != 0)).float().mean()) if w.numel() else 0.0
            if sparsity < min_sparsity:
                continue
            layer = SparseLinear.from_linear(child, format, blocksize, dtype=dtype, batch=batch)
            if format == "auto" and layer.format == "dense":
                continue  # sparse would not be faster: keep torch's own dense layer
            nxt = children[idx + 1][1] if idx + 1 < len(children) else None
            act = _fusable_activation(nxt) if (fuse_activations and isinstance(parent, nn.Sequential)
                                               and nxt is not None) else None
            if act is not None:
                layer.activation = act
                setattr(parent, children[idx + 1][0], nn.Identity())
            setattr(parent, child_name, layer)
    return model
