"""SparseLinear (an nn.Linear whose weight is CSR, BSR or dense) and `sparsify`, which swaps the
nn.Linear layers of a pruned model in place. `choose_layout` is the `format="auto"` policy: the
layout the cost model predicts fastest for this layer, dense where sparse would not pay."""
from __future__ import annotations

import torch
import torch.nn as nn

from . import costmodel, cpu
from .formats import BSR, CSR
from .ops import sparse_linear
from .reference import check_activation

FORMATS = ("auto", "csr", "bsr", "dense")
# Block shapes `auto` tries, widest first: C a multiple of 8 fills an AVX2 vector / a tensor-core tile.
BLOCK_CANDIDATES = ((32, 32), (16, 16), (8, 8), (4, 8), (1, 8), (8, 1), (4, 4), (4, 1), (2, 2))
# A block size counts as the mask's structure when at most this share of stored values are padding.
MAX_BLOCK_PADDING = 0.05


def _kept_blocks(keep: torch.Tensor, r: int, c: int) -> int:
    o, i = keep.shape
    return int(keep.reshape(o // r, r, i // c, c).any(dim=(1, 3)).sum())


def detect_blocksize(keep: torch.Tensor, max_padding: float = MAX_BLOCK_PADDING) -> tuple[int, int] | None:
    """Largest candidate block whose kept tiles hold (almost) only kept weights, or None."""
    nnz = int(keep.sum())
    if nnz == 0:
        return None
    o, i = keep.shape
    for r, c in BLOCK_CANDIDATES:
        if o % r == 0 and i % c == 0 and r * c > 1:
            stored = _kept_blocks(keep, r, c) * r * c
            if stored - nnz <= max_padding * stored:
                return (r, c)
    return None


def choose_layout(weight: torch.Tensor, mask: torch.Tensor | None = None, *, batch: int = 8,
                  device: str = "cpu", value_bytes: int = 4) -> tuple[str, tuple[int, int] | None, str]:
    """-> (format, blocksize, reason) for one layer, by the cost model's predicted time."""
    keep = (weight != 0) if mask is None else (mask != 0)
    shape = tuple(weight.shape)
    nnz = int(keep.sum())
    times = {"dense": costmodel.predict_seconds("dense", shape, shape[0] * shape[1], batch,
                                                value_bytes=value_bytes, device=device),
             "csr": costmodel.predict_seconds("csr", shape, nnz, batch, value_bytes=value_bytes,
                                              device=device)}
    block = detect_blocksize(keep)
    if block is not None:
        stored = _kept_blocks(keep, *block) * block[0] * block[1]
        times["bsr"] = costmodel.predict_seconds("bsr", shape, stored, batch, block,
                                                 value_bytes=value_bytes, device=device)
    best = min(times, key=times.get)
    speedup = times["dense"] / times[best]
    density = nnz / max(1, weight.numel())
    reason = (f"density {density:.3f}, block structure {block or 'none'}: {best} predicted "
              f"{speedup:.2f}x vs dense at batch {batch} on {device}")
    return best, (block if best == "bsr" else None), reason


class SparseLinear(nn.Module):
    """y = act(x Wᵀ + b) with W stored as CSR, BSR or dense; runs on `engine.sparse_linear`.

    The layout's tensors are buffers (`weight_crow_indices`, `weight_col_indices`, `weight_values`
    for sparse layouts, `weight` for dense), so `.to()`, `state_dict()` and `load_state_dict()` work.
    """

    def __init__(self, weight, bias: torch.Tensor | None = None, activation: str | None = None,
                 backend: str = "auto"):
        super().__init__()
        if not isinstance(weight, (CSR, BSR, torch.Tensor)):
            raise TypeError(f"SparseLinear: weight must be CSR, BSR or a dense tensor, got {type(weight).__name__}")
        self.out_features, self.in_features = (int(s) for s in weight.shape)
        self.activation = check_activation(activation, "SparseLinear")
        self.backend = backend
        self.format = "csr" if isinstance(weight, CSR) else "bsr" if isinstance(weight, BSR) else "dense"
        if self.format == "dense":
            self.register_buffer("weight", weight.detach().contiguous())
        else:
            self.register_buffer("weight_crow_indices", weight.crow_indices)
            self.register_buffer("weight_col_indices", weight.col_indices)
            self.register_buffer("weight_values", weight.values)
        if bias is not None and tuple(bias.shape) != (self.out_features,):
            raise ValueError(f"SparseLinear: bias must have shape ({self.out_features},), got {tuple(bias.shape)}")
        self.register_buffer("bias", None if bias is None else bias.detach().contiguous())
        if self.format == "csr" and self.weight_values.device.type == "cpu" and cpu.available():
            cpu.prepare_weight(self.sparse_weight)  # index copy made now, not in the first inference

    @property
    def sparse_weight(self):
        """The weight as a CSR/BSR object (or the dense tensor) over this module's buffers."""
        if self.format == "dense":
            return self.weight
        b = self._buffers  # direct: nn.Module.__getattr__ is slow on a per-call path
        buffers = (b["weight_crow_indices"], b["weight_col_indices"], b["weight_values"])
        key, cached = self.__dict__.get("_sparse_weight", (None, None))
        # Rebuilt only when .to() / load_state_dict(assign=True) replaced a buffer.
        if key is None or any(a is not k for a, k in zip(buffers, key)):
            cls = CSR if self.format == "csr" else BSR
            cached = cls.trusted(*buffers, (self.out_features, self.in_features))
            self.__dict__["_sparse_weight"] = (buffers, cached)
        return cached

    @classmethod
    def from_linear(cls, linear: nn.Linear, format: str = "auto", blocksize=None, *,
                    mask: torch.Tensor | None = None, dtype: torch.dtype | None = None,
                    activation: str | None = None, batch: int = 8) -> "SparseLinear":
        """Converts a (pruned) nn.Linear. The mask defaults to `linear.weight_mask` when
        torch.nn.utils.prune left one, else to the weight's non-zeros."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"SparseLinear.from_linear: expected nn.Linear, got {type(linear).__name__}")
        if format not in FORMATS:
            raise ValueError(f"SparseLinear.from_linear: unknown format {format!r}; expected one of {FORMATS}")
        # torch.nn.utils.prune keeps the trained values in weight_orig; `weight` may be stale.
        weight = getattr(linear, "weight_orig", linear.weight).detach()
        if mask is None:
            mask = getattr(linear, "weight_mask", None)
        if mask is not None:
            weight = weight * (mask != 0)
        device = weight.device.type
        if format == "auto":
            value_bytes = torch.tensor([], dtype=dtype or weight.dtype).element_size()
            format, auto_block, _ = choose_layout(weight, mask, batch=batch, device=device,
                                                  value_bytes=value_bytes)
            blocksize = blocksize or auto_block
        if dtype is not None:
            weight = weight.to(dtype)
        if format == "dense":
            w = weight
        elif format == "csr":
            w = CSR.from_dense(weight, mask)
        else:
            if blocksize is None:
                keep = (weight != 0) if mask is None else (mask != 0)
                blocksize = detect_blocksize(keep) or next(
                    ((r, c) for r, c in BLOCK_CANDIDATES if weight.shape[0] % r == 0 and weight.shape[1] % c == 0), (1, 1))
            w = BSR.from_dense(weight, mask, blocksize)
        bias = None if linear.bias is None else linear.bias.detach().to(dtype or linear.bias.dtype)
        return cls(w, bias, activation)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return sparse_linear(x, self.sparse_weight, self.bias, activation=self.activation,
                             backend=self.backend)

    def extra_repr(self) -> str:
        w = self.sparse_weight
        extra = f", block={w.blocksize}" if self.format == "bsr" else ""
        density = 1.0 if self.format == "dense" else w.density
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
