"""Calibrated one-shot pruning: Wanda and SparseGPT, run sequentially block by block.

Each prunable layer sees its own input activations X (rows = tokens or samples) on calibration data:
- magnitude: score |W_ij| (no data; here only for side-by-side reconstruction errors).
- wanda (Sun et al., 2023): score |W_ij| * ||X_j||_2, ranked within each output row.
- sparsegpt (Frantar & Alistarh, 2023): Optimal-Brain-Surgeon pruning with reconstruction. With
  H = 2 X^T X / n + lambda I (lambda = 1 % of the mean diagonal), in float64, and U the upper
  Cholesky factor of H^-1, the columns are visited left to right in lazy blocks of 128: a weight's
  saliency is w^2 / U_jj^2, the mask of each column block is chosen from the current (already
  updated) weights, and every pruned weight's error is spread onto the columns to its right.

- taylor: first-order Taylor saliency |W_ij * dL/dW_ij|, summed over calibration batches, ranked
  within each output row like wanda (no reconstruction; see `taylor_prune` for the loss L).

Sequential: the first nn.ModuleList of blocks holding prunable layers (a transformer's layers) is
pruned block by block; each block's calibration inputs are the outputs of the already pruned
block before it, so memory holds one block's inputs and one layer's H at a time. Inside a block
the layers go one at a time in module order, each seeing inputs through the block's already
pruned layers (the forward pass stops at the layer being measured). Prunable layers
outside such a list (an MLP's layers, a head) are pruned one at a time, in order, each with inputs
from a full forward pass of the model as pruned so far.

The result is a `MaskSet` with the weights updated in place, the export of `masks.py` unchanged.
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch import nn

from .granularity import Granularity, PruneError, check_fits, check_sparsity, keep_top, nm_mask, \
    parse_granularity, unit_scores, expand_units
from .masks import MaskSet, prunable_layers, unwrap, weight_2d

CALIBRATED = ("magnitude", "wanda", "sparsegpt", "taylor")
LAZY_COLUMNS = 128


class _Stop(Exception):
    """Raised by a hook once a layer's input is recorded, to cut the forward pass short."""


# -- statistics of one layer's inputs -----------------------------------------------------------
class InputStats:
    """Accumulates X^T X (float64, in x in) over the rows of every input a Linear sees."""

    def __init__(self, module: nn.Module, stop: bool = False):
        n_in = weight_2d(module).shape[1]
        self.stop = stop  # raise _Stop after recording: the rest of the forward pass is not needed
        self.xtx = torch.zeros(n_in, n_in, dtype=torch.float64)
        self.rows = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        x = args[0].detach()
        if isinstance(module, nn.Conv2d):  # 1x1 conv: channels are the features
            x = x.movedim(1, -1)
        x = x.reshape(-1, x.shape[-1]).to(torch.float64)
        self.xtx += x.T @ x
        self.rows += x.shape[0]
        if self.stop:
            raise _Stop

    def hessian(self) -> torch.Tensor:
        """H = 2 X^T X / n, the Hessian of the layer's squared reconstruction error."""
        if self.rows == 0:
            raise PruneError("calibration: a layer saw no input (the calibration data yielded no batches?)")
        return 2.0 * self.xtx / self.rows

    def remove(self):
        self.handle.remove()


# -- one layer ----------------------------------------------------------------------------------
def _row_masks(scores: torch.Tensor, gran: Granularity, sparsity: float) -> torch.Tensor:
    """Keep-mask from scores compared within each output row (unstructured), per N:M group, or per
    tile over the whole layer (blocks)."""
    if gran.kind == "nm":
        return nm_mask(scores, *gran.nm)
    if gran.kind == "block":
        units = unit_scores(scores, gran)
        return expand_units(keep_top(units, round(sparsity * units.numel())), gran, tuple(scores.shape))
    n_prune = round(sparsity * scores.shape[1])
    keep = torch.ones_like(scores, dtype=torch.bool)
    if n_prune:
        order = torch.sort(scores, dim=1, stable=True).indices[:, :n_prune]
        keep.scatter_(1, order, False)
    return keep


def magnitude_layer(weight: torch.Tensor, gran: Granularity, sparsity: float) -> torch.Tensor:
    return _row_masks(weight.abs().float(), gran, sparsity)


def wanda_layer(weight: torch.Tensor, hessian: torch.Tensor, gran: Granularity, sparsity: float) -> torch.Tensor:
    """|W_ij| * ||X_j||_2 (diag(H) is proportional to ||X_j||^2)."""
    norms = hessian.diagonal().clamp(min=0).sqrt().to(torch.float32)
    return _row_masks(weight.abs().float() * norms, gran, sparsity)


def _inverse_cholesky(hessian: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + lambda I)^-1, float64; the damping grows until H is positive
    definite (a few dead or collinear inputs make the plain H singular)."""
    h = hessian.clone()
    dead = h.diagonal() == 0
    h[dead, dead] = 1.0
    mean_diag = float(h.diagonal().mean())
    for scale in (1, 10, 100, 1000):
        lam = damp * scale * mean_diag
        chol, info = torch.linalg.cholesky_ex(h + lam * torch.eye(h.shape[0], dtype=h.dtype))
        if int(info) == 0:
            hinv = torch.cholesky_inverse(chol)
            return torch.linalg.cholesky(hinv, upper=True)
    raise PruneError("sparsegpt: the input Hessian stays singular even with 1000x damping")


def _chunk_mask(w: torch.Tensor, d: torch.Tensor, gran: Granularity, sparsity: float) -> torch.Tensor:
    """Keep-mask of one lazy column block by OBS saliency w^2 / d^2 (d = diag of U): the lowest
    `sparsity` share of elements, or of tiles by their summed saliency (per element area, so a
    partial edge tile competes fairly). N:M masks are chosen column group by group instead."""
    saliency = w.pow(2) / d.pow(2)
    if gran.kind == "block":
        units = unit_scores(saliency, gran)
        return expand_units(keep_top(units, round(sparsity * units.numel())), gran, tuple(w.shape))
    return keep_top(saliency, round(sparsity * saliency.numel()))


def sparsegpt_layer(weight: torch.Tensor, hessian: torch.Tensor, gran: Granularity, sparsity: float,
                    damp: float = 0.01, columns: int = LAZY_COLUMNS) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (reconstructed weight with pruned entries exactly 0, keep-mask), both W[out, in]."""
    w = weight.detach().to(torch.float64).clone()
    n_in = w.shape[1]
    u = _inverse_cholesky(hessian, damp)
    step = columns
    if gran.kind == "block":  # column blocks hold whole tiles
        step = max(1, columns // gran.block[1]) * gran.block[1]
    if gran.kind == "nm":
        step = max(1, columns // gran.nm[1]) * gran.nm[1]
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, n_in, step):
        i2 = min(i1 + step, n_in)
        w1, u1 = w[:, i1:i2].clone(), u[i1:i2, i1:i2]
        err = torch.zeros_like(w1)
        k1 = None if gran.kind == "nm" else _chunk_mask(w1, u1.diagonal(), gran, sparsity)
        if k1 is None:
            k1 = torch.ones_like(w1, dtype=torch.bool)
        for j in range(i2 - i1):
            if gran.kind == "nm" and j % gran.nm[1] == 0:
                m = gran.nm[1]
                sal = w1[:, j:j + m].pow(2) / u1.diagonal()[j:j + m].pow(2)
                k1[:, j:j + m] = nm_mask(sal, gran.nm[0], m)
            col = w1[:, j]
            q = col * k1[:, j]
            e = (col - q) / u1[j, j]
            w1[:, j:] -= e[:, None] * u1[j, j:][None, :]
            w1[:, j] = q
            err[:, j] = e
        w[:, i1:i2] = w1
        keep[:, i1:i2] = k1
        w[:, i2:] -= err @ u[i1:i2, i2:]
    w *= keep
    return w.to(weight.dtype), keep


def reconstruction_error(dense: torch.Tensor, pruned: torch.Tensor, hessian: torch.Tensor) -> float:
    """||(W - W') X||^2 / ||W X||^2 from H (proportional to X^T X): how much of the layer's output
    the pruning changed on the calibration inputs."""
    dense, pruned = dense.detach().double(), pruned.detach().double()
    delta = dense - pruned
    num = float(((delta @ hessian) * delta).sum())
    den = float(((dense @ hessian) * dense).sum())
    return num / den if den > 0 else 0.0


@torch.no_grad()
def prune_layer(module: nn.Module, stats: InputStats | None, method: str, gran: Granularity,
                sparsity: float) -> tuple[torch.Tensor, dict]:
    """Prunes `module` in place; -> (keep-mask of the weight's shape, {"sparsity", "error"})."""
    weight = module.weight
    w2 = weight_2d(module).detach()
    hessian = stats.hessian() if stats is not None else None
    if method == "sparsegpt":
        new, keep = sparsegpt_layer(w2, hessian, gran, sparsity)
    else:
        keep = magnitude_layer(w2, gran, sparsity) if method == "magnitude" else wanda_layer(w2, hessian, gran, sparsity)
        new = w2 * keep
    info = {"sparsity": 1.0 - float(keep.float().mean())}
    if hessian is not None:
        info["error"] = reconstruction_error(w2, new, hessian)
    weight.copy_(new.reshape(weight.shape))
    return keep.reshape(weight.shape), info


# -- the sequential driver ----------------------------------------------------------------------
def _as_args(batch) -> tuple:
    return tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)


def find_blocks(model: nn.Module, layers: dict[str, nn.Module]) -> tuple[str, nn.ModuleList] | None:
    """The first nn.ModuleList (by module order) whose children hold prunable layers."""
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and any(k.startswith(f"{name}.") for k in layers):
            return name, module
    return None


def _block_inputs(model: nn.Module, block: nn.Module, batches: list) -> list[tuple[tuple, dict]]:
    """(args, kwargs) the first block is called with, per calibration batch."""
    seen = []

    def grab(module, args, kwargs):
        seen.append((args, kwargs))
        raise _Stop

    handle = block.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in batches:
            try:
                model(*_as_args(batch))
            except _Stop:
                pass
    finally:
        handle.remove()
    return seen


def _first_output(out):
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.no_grad()
def calibrated_prune(model: nn.Module, batches: Iterable, method: str = "sparsegpt", sparsity: float = 0.5,
                     granularity: str | Granularity = "unstructured", skip: Iterable[str] = (),
                     log: Callable[[str], None] | None = None, per_layer: dict | None = None
                     ) -> tuple[MaskSet, dict]:
    """Prunes every prunable layer of `model` (minus `skip`) in place, sequentially; -> (masks,
    {layer: {"sparsity", "error"}}). `batches`: the model's positional inputs per batch (a tensor
    or a tuple); N:M ignores `sparsity` (it is 1 - N/M). `per_layer`: {layer: (granularity,
    sparsity)} for the layers that differ from the default (a latency plan)."""
    if method not in CALIBRATED:
        raise PruneError(f"unknown calibrated method {method!r}; choose one of {', '.join(CALIBRATED)}")
    gran = parse_granularity(granularity)
    sparsity = gran.fixed_sparsity if gran.kind == "nm" else check_sparsity(sparsity)
    model = unwrap(model)
    layers = prunable_layers(model, tuple(skip))
    choice = {name: (gran, sparsity) for name in layers}
    for name, (g, s) in (per_layer or {}).items():
        if name not in layers:
            raise PruneError(f"calibration: the plan names {name!r}, which is not a prunable layer here "
                             f"(layers are named like {list(layers)[:3]})")
        g = parse_granularity(g)
        choice[name] = (g, g.fixed_sparsity if g.kind == "nm" else check_sparsity(s))
    for name, m in layers.items():
        check_fits(name, tuple(weight_2d(m).shape), choice[name][0])
    batches = list(batches)
    if not batches:
        raise PruneError("calibration: no calibration batches given")
    if method == "taylor":
        if per_layer:
            raise PruneError("calibration: per-layer plans prune with wanda or sparsegpt, not taylor")
        return taylor_prune(model, batches, sparsity, gran, layers, log=log)
    was_training = model.training
    model.eval()
    masks, report = {}, {}
    log = log or (lambda _msg: None)

    def prune_one(name: str, module: nn.Module, run: Callable[[], None]) -> None:
        """Capture the layer's inputs (the forward stops right after it), then prune it."""
        stats = InputStats(module, stop=True)  # magnitude too: its error is reported
        try:
            run()
        finally:
            stats.remove()
        masks[name], report[name] = prune_layer(module, stats, method, *choice[name])
        log(f"{name}: sparsity {report[name]['sparsity']:.3f}, relative output error {report[name]['error']:.4f}")

    def each(fn, items):
        for item in items:
            try:
                fn(item)
            except _Stop:
                pass

    try:
        found = find_blocks(model, layers)
        done = set()
        if found is not None:
            prefix, blocks = found
            inputs = _block_inputs(model, blocks[0], batches)
            for i, block in enumerate(blocks):
                # Layers in module order, each from inputs through the block's already pruned layers.
                for n, m in layers.items():
                    if n.startswith(f"{prefix}.{i}."):
                        prune_one(n, m, lambda b=block: each(lambda a: b(*a[0], **a[1]), inputs))
                        done.add(n)
                inputs = [((_first_output(block(*args, **kwargs)),) + tuple(args[1:]), kwargs)
                          for args, kwargs in inputs]
        for n, m in layers.items():  # the rest, one at a time, through the whole (pruned) model
            if n not in done:
                prune_one(n, m, lambda: each(lambda b: model(*_as_args(b)), batches))
    finally:
        model.train(was_training)
    return MaskSet(masks), report


class _Unpack(nn.Module):
    """model(*batch) as a one-argument module, for criteria's (x, y) batches."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch):
        return self.model(*_as_args(batch))


def _projection_loss(out: torch.Tensor, target: tuple) -> torch.Tensor:
    """sum over real tokens of <h_t, r_t>: `target` = (attention mask or None, r ~ N(0, I))."""
    h = _first_output(out)
    mask, r = target
    if mask is not None and h.dim() == 3:
        r = r * mask.unsqueeze(-1).to(r.dtype)
    return (h * r).sum()


def taylor_prune(model: nn.Module, batches: list, sparsity: float, gran: Granularity, layers: dict[str, nn.Module],
                 seed: int = 0, log: Callable[[str], None] | None = None) -> tuple[MaskSet, dict]:
    """Taylor saliency |w * dL/dw| summed over `batches`, masks per output row (or N:M group, or
    tile); prunes `model` in place, no reconstruction. -> (masks, {layer: {"sparsity"}}).

    The loss. The distillation loss against the dense model is identically zero (and flat) before
    pruning, and the squared norm of the outputs is a poor stand-in for an encoder: its final
    hidden states come out of a LayerNorm (norm nearly fixed) and its pooled embedding is
    L2-normalised (norm exactly 1, gradient 0). So L is a random projection of the outputs,
    L = sum over real tokens t of <h_t, r_t> with r_t ~ N(0, I) drawn afresh per batch (seeded). That
    is the log-likelihood gradient of a unit-variance Gaussian model around the model's own output
    (labels sampled from the model, y = h + r), so E[(dL/dw)^2] = the diagonal of the (true)
    Fisher information J^T J, and E|w dL/dw| = sqrt(2/pi) |w| sqrt(F_ww): a Fisher / output
    sensitivity score, how much the outputs move when w is zeroed, ranked monotonically like the
    OBD saliency w^2 F_ww."""
    from .criteria import scores as criterion_scores
    gen = torch.Generator().manual_seed(seed)

    def with_targets():
        for batch in batches:
            args = _as_args(batch)
            with torch.no_grad():
                h = _first_output(model(*args))
            yield batch, (args[1] if len(args) > 1 else None, torch.randn(h.shape, generator=gen, dtype=h.dtype))

    weights = [m.weight for m in layers.values()]
    flags = [w.requires_grad for w in weights]
    try:
        with torch.enable_grad():
            for w in weights:
                w.requires_grad_(True)
            found = criterion_scores("taylor", _Unpack(model), layers, batches=with_targets(),
                                     loss_fn=_projection_loss)
    finally:
        for w, flag in zip(weights, flags):
            w.requires_grad_(flag)
    masks, report = {}, {}
    for name, module in layers.items():
        keep = _row_masks(found[name], gran, sparsity)
        module.weight.mul_(keep.reshape(module.weight.shape).to(module.weight.dtype))
        masks[name] = keep.reshape(module.weight.shape)
        report[name] = {"sparsity": 1.0 - float(keep.float().mean())}
        if log:
            log(f"{name}: sparsity {report[name]['sparsity']:.3f} (taylor)")
    return MaskSet(masks), report


def sparsegpt(model: nn.Module, calib_batches: Iterable, sparsity: float = 0.5,
              granularity: str | Granularity = "unstructured", skip: Iterable[str] = (), **kw) -> MaskSet:
    """SparseGPT one-shot pruning of `model` in place; -> its MaskSet (see `calibrated_prune`)."""
    return calibrated_prune(model, calib_batches, "sparsegpt", sparsity, granularity, skip, **kw)[0]


def wanda(model: nn.Module, calib_batches: Iterable, sparsity: float = 0.5,
          granularity: str | Granularity = "unstructured", skip: Iterable[str] = (), **kw) -> MaskSet:
    """Wanda one-shot pruning of `model` in place; -> its MaskSet (see `calibrated_prune`)."""
    return calibrated_prune(model, calib_batches, "wanda", sparsity, granularity, skip, **kw)[0]
