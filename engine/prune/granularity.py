"""Turning importance scores into keep-masks: unstructured, aligned R x C blocks, or N:M groups.

Every function works on the 2-D view W[out, in] of a layer's weight. A mask is a bool tensor of
the weight's shape, True = kept. Block masks keep whole aligned tiles (what becomes BSR); N:M masks
keep exactly N of every M consecutive weights along the input dimension of each output row.
Scores of -inf mark weights that are already pruned, so a gradual schedule never revives them.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch


class PruneError(ValueError):
    """A pruning argument is out of range or does not fit a layer."""


@dataclass(frozen=True)
class Granularity:
    kind: str                 # "unstructured" | "block" | "nm"
    block: tuple[int, int] = (1, 1)  # (rows R along out, cols C along in) for "block"
    nm: tuple[int, int] = (0, 0)     # (N kept, M group size) for "nm"

    def __str__(self) -> str:
        if self.kind == "block":
            return f"block:{self.block[0]}x{self.block[1]}"
        if self.kind == "nm":
            return f"nm:{self.nm[0]}:{self.nm[1]}"
        return "unstructured"

    @property
    def fixed_sparsity(self) -> float | None:
        """N:M fixes the sparsity at 1 - N/M; the other kinds take any sparsity."""
        return 1.0 - self.nm[0] / self.nm[1] if self.kind == "nm" else None


def parse_granularity(text: str | Granularity) -> Granularity:
    """'unstructured', 'block:RxC' (e.g. block:4x4) or 'nm:N:M' (e.g. nm:2:4)."""
    if isinstance(text, Granularity):
        return text
    if text == "unstructured":
        return Granularity("unstructured")
    m = re.fullmatch(r"block:(\d+)x(\d+)", text)
    if m:
        r, c = int(m.group(1)), int(m.group(2))
        if r < 1 or c < 1:
            raise PruneError(f"granularity {text!r}: block sides must be >= 1")
        return Granularity("block", block=(r, c))
    m = re.fullmatch(r"nm:(\d+):(\d+)", text)
    if m:
        n, mm = int(m.group(1)), int(m.group(2))
        if not 0 < n < mm:
            raise PruneError(f"granularity {text!r}: need 0 < N < M, got N={n}, M={mm}")
        return Granularity("nm", nm=(n, mm))
    raise PruneError(f"unknown granularity {text!r}; use 'unstructured', 'block:RxC' (e.g. block:4x4) "
                     f"or 'nm:N:M' (e.g. nm:2:4)")


def check_sparsity(sparsity: float, what: str = "sparsity") -> float:
    s = float(sparsity)
    if not 0.0 <= s < 1.0 or math.isnan(s):
        raise PruneError(f"{what} must be in [0, 1), got {sparsity!r}")
    return s


def check_fits(name: str, shape: tuple[int, int], gran: Granularity) -> None:
    """Raise a PruneError naming the layer when its 2-D weight shape does not fit `gran`. Blocks
    always fit: a side that does not divide the shape leaves partial tiles at the bottom / right
    edge, ranked like whole ones (convert pads them for BSR or stores the layer in another format)."""
    out_f, in_f = shape
    if gran.kind == "nm" and in_f % gran.nm[1]:
        raise PruneError(f"layer {name!r}: N:M group size M={gran.nm[1]} does not divide its "
                         f"{in_f} input features; skip the layer or choose another M")


def unit_scores(scores: torch.Tensor, gran: Granularity) -> torch.Tensor:
    """Per-unit scores: elements for unstructured, the mean element score of each aligned tile for
    blocks (shape (ceil(out/R), ceil(in/C))). Partial edge tiles average their real elements only.
    Tiles holding an already-pruned (-inf) element score -inf."""
    if gran.kind != "block":
        return scores
    r, c = gran.block
    out_f, in_f = scores.shape
    pad = (0, -in_f % c, 0, -out_f % r)
    def tile_sum(t):
        t = torch.nn.functional.pad(t, pad)
        return t.reshape(t.shape[0] // r, r, t.shape[1] // c, c).sum(dim=(1, 3))
    return tile_sum(scores.float()) / tile_sum(torch.ones_like(scores, dtype=torch.float32))


def expand_units(keep_units: torch.Tensor, gran: Granularity, shape: tuple[int, int] | None = None
                 ) -> torch.Tensor:
    """Inverse of `unit_scores` for masks: a tile-level keep-mask back to element level, cut to
    `shape` (the weight's) where edge tiles are partial."""
    if gran.kind != "block":
        return keep_units
    r, c = gran.block
    full = keep_units.repeat_interleave(r, dim=0).repeat_interleave(c, dim=1)
    return full if shape is None else full[:shape[0], :shape[1]]


def keep_top(scores: torch.Tensor, n_prune: int) -> torch.Tensor:
    """Keep-mask of `scores`' shape that drops the `n_prune` lowest scores (ties by position)."""
    flat = scores.flatten()
    keep = torch.ones_like(flat, dtype=torch.bool)
    if n_prune > 0:
        # A stable sort makes tie-breaking (e.g. among already-pruned -inf units) repeatable.
        order = torch.sort(flat, stable=True).indices
        keep[order[:n_prune]] = False
    return keep.view_as(scores)


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the N highest-scoring of every M consecutive weights along each row."""
    out_f, in_f = scores.shape
    groups = scores.reshape(out_f, in_f // m, m)
    top = groups.topk(n, dim=-1).indices
    keep = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(out_f, in_f)


def layer_masks(scores: dict[str, torch.Tensor], gran: Granularity, sparsity: float | dict[str, float]
                ) -> dict[str, torch.Tensor]:
    """Rank each layer on its own: layer `name` loses round(sparsity * units) of its units."""
    masks = {}
    for name, s in scores.items():
        check_fits(name, tuple(s.shape), gran)
        if gran.kind == "nm":
            masks[name] = nm_mask(s, *gran.nm)
            continue
        target = sparsity[name] if isinstance(sparsity, dict) else sparsity
        units = unit_scores(s, gran)
        masks[name] = expand_units(keep_top(units, round(target * units.numel())), gran, tuple(s.shape))
    return masks


def global_masks(scores: dict[str, torch.Tensor], gran: Granularity, sparsity: float
                 ) -> dict[str, torch.Tensor]:
    """Rank the units of all layers together: the lowest round(sparsity * total units) go.
    Only meaningful where scores are comparable across layers (magnitude, random, normalised)."""
    if gran.kind == "nm":
        return layer_masks(scores, gran, sparsity)  # N:M is per group; there is nothing to rank globally
    for name, s in scores.items():
        check_fits(name, tuple(s.shape), gran)
    units = {name: unit_scores(s, gran) for name, s in scores.items()}
    if not units:
        return {}
    flat = torch.cat([u.flatten() for u in units.values()])
    keep = keep_top(flat, round(sparsity * flat.numel()))
    masks, start = {}, 0
    for name, u in units.items():
        masks[name] = expand_units(keep[start:start + u.numel()].view_as(u), gran, tuple(scores[name].shape))
        start += u.numel()
    return masks
