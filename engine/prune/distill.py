"""Distillation of a pruned encoder (student, masks enforced) from its dense original (teacher).

Loss per batch of training sentences: MSE of the final hidden states over real (non-padding) tokens,
per hidden unit, plus 1 - cosine of the pooled sentence embeddings; with `layer_loss` W > 0, plus W
times the same masked MSE between the hidden states after every encoder layer, averaged over the
layers (read by forward hooks on the model's first nn.ModuleList of blocks, `encoder.layer` for BERT,
so the model itself is not changed). AdamW with a short linear warm-up and a cosine decay to zero over
the run (the run's length is its step count or, when a time budget ends it sooner, its seconds),
or a constant rate (`lr_decay="none"`). Batches hold sentences of similar length (a pool of
`POOL` random batches' worth, sorted by token count and cut into batches, served in random order),
so little time goes into padding. The embeddings stay the teacher's (they are not pruned; frozen,
they also cost no optimizer work), and the teacher's final states of each training sentence are kept
after their first use (`TeacherCache`; not with `layer_loss`, which needs the teacher's layers).
The masks stay enforced
(gradients masked, weights re-masked after every step, `MaskSet.enforce`). Validation cosine to the
dense embeddings every `eval_every` steps; the best state is kept and restored at the end. A time
budget stops training early (checked every step). `schedule="gradual"` (hf.py) starts from the dense
model or a given initial sparsity and re-prunes on Zhu & Gupta's cubic schedule over the first half of
the run (steps, or the time budget's seconds) with the chosen
criterion (weights pruned earlier are zero, so they score lowest and stay pruned).
"""
from __future__ import annotations

import copy
import math
import time
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import distributed
from .embeddings import fidelity, token_batches, tokenizer
from .granularity import PruneError
from .masks import MaskSet, unwrap

LR_DECAYS = ("cosine", "none")
WARMUP = 0.03  # fraction of the run spent raising the learning rate from 0
POOL = 8  # batches drawn at once and regrouped by length


def lr_factor(progress: float, decay: str) -> float:
    """The learning rate's multiplier at `progress` (0 at the start, 1 at the end of the run)."""
    if decay == "none":
        return 1.0
    progress = min(max(progress, 0.0), 1.0)
    if progress < WARMUP:
        return progress / WARMUP
    return 0.5 * (1.0 + math.cos(math.pi * (progress - WARMUP) / (1.0 - WARMUP)))


def length_grouped(lengths: list[int], batch: int, gen: torch.Generator):
    """Endless index batches: POOL batches' worth of random indices, sorted by `lengths`, cut into
    batches of `batch` and yielded in random order (sentences of a batch pad to similar lengths)."""
    while True:
        idx = torch.randint(0, len(lengths), (batch * POOL,), generator=gen).tolist()
        idx.sort(key=lengths.__getitem__)
        chunks = [idx[i:i + batch] for i in range(0, len(idx), batch)]
        for k in torch.randperm(len(chunks), generator=gen).tolist():
            yield chunks[k]


def encoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's transformer layers: its first nn.ModuleList (`encoder.layer` for BERT)."""
    for module in unwrap(model).modules():
        if isinstance(module, nn.ModuleList) and len(module):
            return module
    raise PruneError(f"--layer-loss: {type(unwrap(model)).__name__} has no list of encoder layers to compare")


class LayerTap:
    """Records the output of every encoder layer on each forward pass (hooks, removed by close())."""

    def __init__(self, model: nn.Module):
        self.outputs: list[torch.Tensor] = []
        self.handles = [b.register_forward_hook(lambda _m, _a, out: self.outputs.append(
            out[0] if isinstance(out, (tuple, list)) else out)) for b in encoder_blocks(model)]

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


class TeacherCache:
    """The dense teacher's final hidden states per training sentence (real tokens only), computed
    the first time a sentence is drawn and reused after: the teacher never changes, and its forward
    pass is a fifth of a distillation step. Stops adding once it holds `limit_bytes`."""

    def __init__(self, teacher: nn.Module, limit_bytes: int = 1 << 30):
        self.teacher, self.limit, self.held, self.states = teacher, limit_bytes, 0, {}

    @torch.no_grad()
    def __call__(self, idx: list[int], ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """(B, S, H) teacher states of the batch of training sentences `idx`; zeros at padding."""
        lengths = mask.sum(1).tolist()
        todo = {k: j for j, k in enumerate(k for k, i in enumerate(idx) if i not in self.states)}
        fresh = self.teacher(ids[list(todo)], mask[list(todo)]) if todo else None
        states = [fresh[todo[k]][:n] if k in todo else self.states[i] for k, (i, n) in enumerate(zip(idx, lengths))]
        for k in todo:
            if self.held < self.limit:
                self.states[idx[k]] = states[k].clone()
                self.held += states[k].numel() * states[k].element_size()
        out = nn.utils.rnn.pad_sequence(states, batch_first=True)
        return F.pad(out, (0, 0, 0, ids.shape[1] - out.shape[1]))


def masked_mse(a: torch.Tensor, b: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Mean squared difference over real tokens (m: (B, S, 1) of 0/1) and hidden units."""
    return ((a - b).pow(2) * m).sum() / m.sum() / a.shape[-1]


def layer_mse(taps: tuple[LayerTap, LayerTap], m: torch.Tensor) -> torch.Tensor:
    """Masked MSE between student's and teacher's outputs of every encoder layer (what the taps
    recorded since their last take), averaged over the layers."""
    s_layers, t_layers = taps[0].take(), taps[1].take()
    if not s_layers or len(s_layers) != len(t_layers):
        raise ValueError(f"layer_mse: {len(s_layers)} student and {len(t_layers)} teacher layer outputs recorded")
    return sum(masked_mse(s, t, m) for s, t in zip(s_layers, t_layers)) / len(s_layers)


def distill_loss(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, mask: torch.Tensor,
                 layer_loss: float = 0.0, taps: tuple[LayerTap, LayerTap] | None = None,
                 t_h: torch.Tensor | None = None) -> torch.Tensor:
    """The loss of one batch; `taps` (student's, teacher's) are needed when `layer_loss` > 0;
    `t_h`: the teacher's final hidden states of this batch when already known (else computed)."""
    for tap in taps or ():
        tap.take()  # drop what other forward passes (validation) recorded
    if t_h is None:
        with torch.no_grad():
            t_h = teacher(ids, mask)
    s_h = student(ids, mask)
    m = mask.unsqueeze(-1).to(s_h.dtype)  # (B, S, 1)
    cos = F.cosine_similarity(unwrap(student).pool(s_h, mask), unwrap(teacher).pool(t_h, mask), dim=-1)
    loss = masked_mse(s_h, t_h, m) + (1.0 - cos).mean()
    if layer_loss:
        if taps is None:
            raise ValueError("distill_loss: layer_loss > 0 needs the (student, teacher) LayerTaps")
        loss = loss + layer_loss * layer_mse(taps, m)
    return loss


def _max_over_ranks(value: float) -> float:
    """The largest `value` of all ranks (so all ranks set the same rate and stop at the same step)."""
    if not distributed.active():
        return value
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def _sync_from_rank0(model: nn.Module, masks: MaskSet) -> MaskSet:
    """Rank 0's masks and weights on every rank (a calibrated re-pruning updates weights)."""
    if not distributed.active():
        return masks
    for t in unwrap(model).state_dict().values():
        dist.broadcast(t, src=0)
    return MaskSet(distributed.broadcast_masks(masks.masks))


def distill(student: nn.Module, teacher: nn.Module, masks: MaskSet, tokenizer_json: str, texts,
            dense_emb: torch.Tensor, val: list[str], *, steps: int, seq_len: int = 128, batch: int = 16,
            lr: float = 6e-4, lr_decay: str = "cosine", weight_decay: float = 0.01, eval_every: int = 50,
            time_budget: float | None = None, layer_loss: float = 0.0,
            reprune: Callable[[float], MaskSet] | None = None, plan: dict[float, float] | None = None, seed: int = 0,
            start: dict | None = None, log: Callable[[str], None] = print) -> tuple[list[dict], MaskSet]:
    """Trains `student` in place; -> (one {"step", "seconds", "cosine_mean", ...} per evaluation,
    the one whose state is kept marked "kept": True; the final masks). `start`, the caller's
    evaluation of the student as given (step 0), competes for the kept state too (not with a plan,
    whose step 0 is not at the final sparsity): a short run cannot end below its starting point.
    With `reprune` and `plan` ({fraction of the run: sparsity}), masks are recomputed when the run's
    progress (steps done of `steps`, or seconds of `time_budget` when that ends it sooner) reaches each
    fraction after the first (gradual pruning).
    Under torchrun (distributed.active()) each rank draws its batches from its own shard of the
    training texts (every world_size-th), DDP averages the gradients, rank 0's masks and weights are
    the start (and are re-broadcast after every re-pruning), every rank validates on all of `val` so
    the best-state choice agrees, and the time budget stops all ranks at the same step."""
    if layer_loss < 0:
        raise PruneError(f"--layer-loss must be >= 0, got {layer_loss}")
    if lr_decay not in LR_DECAYS:
        raise PruneError(f"--distill-lr-decay: unknown {lr_decay!r}; choose one of {', '.join(LR_DECAYS)}")
    rank, world = distributed.rank(), distributed.world_size()
    gen = torch.Generator().manual_seed(seed + rank)
    masks = _sync_from_rank0(student, masks)
    student.requires_grad_(True)
    for m in student.modules():  # not pruned, so the teacher's are right; frozen, they cost no AdamW work
        if isinstance(m, nn.Embedding):
            m.requires_grad_(False)
    model = distributed.wrap(student)  # DDP's constructor broadcasts rank 0's parameters
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=weight_decay)
    masks.enforce(student, opt)
    t0 = time.time()
    history, best, best_state, best_row = [], -2.0, None, None
    if start is not None and plan is None:
        best, best_state, best_row = start["cosine_mean"], copy.deepcopy(student.state_dict()), start
    train, tok = texts.train[rank::world], tokenizer(tokenizer_json, seq_len)
    if not train:
        raise PruneError(f"distillation: rank {rank} of {world} got no training texts")
    taps = (LayerTap(student), LayerTap(teacher)) if layer_loss else None
    cache = None if layer_loss else TeacherCache(teacher)  # the layer term needs the teacher's pass
    batches = length_grouped([sum(e.attention_mask) for e in tok.encode_batch(train)], batch, gen)
    pending = sorted(plan.items())[1:] if plan and reprune is not None else []  # (fraction, sparsity) to come

    def evaluate(step: int) -> None:
        nonlocal best, best_state, best_row
        student.eval()
        row = {"step": step, "seconds": time.time() - t0, "lr": opt.param_groups[0]["lr"],
               **fidelity(dense_emb, student.encode(val))}
        student.train()
        history.append(row)
        if not pending and row["cosine_mean"] > best:  # only states at the final sparsity compete
            best, best_state, best_row = row["cosine_mean"], copy.deepcopy(student.state_dict()), row
        log(f"step {step}: cosine {row['cosine_mean']:.4f}, NN agreement {row['nn_agreement']:.3f} "
            f"({row['seconds']:.0f} s)")

    student.train()
    elapsed = 0.0
    try:
        for step in range(1, steps + 1):
            timed = elapsed / time_budget if time_budget else 0.0
            due = [s for f, s in pending if f <= max((step - 1) / steps, timed)]
            if due:  # one re-prune, to the latest target reached (a slow step may pass several)
                pending = pending[len(due):]
                masks.release()
                masks = _sync_from_rank0(student, reprune(due[-1]))
                masks.enforce(student, opt)
                log(f"step {step}: pruned to {due[-1]:.3f}")
            for group in opt.param_groups:
                group["lr"] = lr * lr_factor(max(step / steps, timed), lr_decay)
            idx = next(batches)
            (ids, mask), = token_batches(tok, [train[i] for i in idx], batch)
            t_h = cache(idx, ids, mask) if cache else None
            loss = distill_loss(model, teacher, ids, mask, layer_loss, taps, t_h)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            elapsed = _max_over_ranks(time.time() - t0)
            out_of_time = time_budget is not None and elapsed > time_budget
            if step % eval_every == 0 or step == steps or out_of_time:
                evaluate(step)
            if out_of_time:
                log(f"time budget of {time_budget:.0f} s reached after {step} steps")
                break
    finally:
        masks.release()
        if taps:
            taps[0].close(), taps[1].close()
        student.eval().requires_grad_(False)
    if best_state is not None:
        student.load_state_dict(best_state)
        best_row["kept"] = True  # the state the student ends in (what the report calls final)
    masks.apply(student)
    distributed.check_ranks_agree(student)
    return history, masks
