"""Distillation of a pruned encoder (student, masks enforced) from its dense original (teacher).

Loss per batch of training sentences: MSE of the final hidden states over real (non-padding) tokens,
per hidden unit, plus 1 - cosine of the pooled sentence embeddings. AdamW; the masks stay enforced
(gradients masked, weights re-masked after every step, `MaskSet.enforce`). Validation cosine to the
dense embeddings every `eval_every` steps; the best state is kept and restored at the end. A time
budget stops training early (checked every step). `schedule="gradual"` starts from the dense model
and re-prunes on Zhu & Gupta's cubic schedule over the first half of the steps with the chosen
criterion (weights pruned earlier are zero, so they score lowest and stay pruned).
"""
from __future__ import annotations

import copy
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from .embeddings import fidelity, token_batches, tokenizer
from .masks import MaskSet


def distill_loss(student: nn.Module, teacher: nn.Module, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        t_h = teacher(ids, mask)
    s_h = student(ids, mask)
    m = mask.unsqueeze(-1).to(s_h.dtype)  # (B, S, 1)
    mse = ((s_h - t_h).pow(2) * m).sum() / m.sum() / s_h.shape[-1]
    cos = F.cosine_similarity(student.pool(s_h, mask), teacher.pool(t_h, mask), dim=-1)
    return mse + (1.0 - cos).mean()


def distill(student: nn.Module, teacher: nn.Module, masks: MaskSet, tokenizer_json: str, texts,
            dense_emb: torch.Tensor, val: list[str], *, steps: int, seq_len: int = 128, batch: int = 16,
            lr: float = 1e-4, weight_decay: float = 0.01, eval_every: int = 50, time_budget: float | None = None,
            reprune: Callable[[float], MaskSet] | None = None, plan: dict[int, float] | None = None,
            seed: int = 0, log: Callable[[str], None] = print) -> tuple[list[dict], MaskSet]:
    """Trains `student` in place; -> (one {"step", "seconds", "cosine_mean", ...} per evaluation,
    the final masks).
    With `reprune` and `plan` ({step: sparsity}), masks are recomputed at those steps (gradual)."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(student.parameters(), lr=lr,
                            weight_decay=weight_decay)
    student.requires_grad_(True)
    masks.enforce(student, opt)
    t0 = time.time()
    history, best, best_state = [], -2.0, None
    train, tok = texts.train, tokenizer(tokenizer_json, seq_len)

    def evaluate(step: int) -> None:
        nonlocal best, best_state
        student.eval()
        row = {"step": step, "seconds": time.time() - t0, **fidelity(dense_emb, student.encode(val))}
        student.train()
        history.append(row)
        final_sparsity = plan is None or step >= max(plan)
        if final_sparsity and row["cosine_mean"] > best:
            best, best_state = row["cosine_mean"], copy.deepcopy(student.state_dict())
        log(f"step {step}: cosine {row['cosine_mean']:.4f}, NN agreement {row['nn_agreement']:.3f} "
            f"({row['seconds']:.0f} s)")

    student.train()
    try:
        for step in range(1, steps + 1):
            if plan and reprune is not None and step - 1 in plan and step > 1:
                masks.release()
                masks = reprune(plan[step - 1])
                masks.enforce(student, opt)
            idx = torch.randint(0, len(train), (batch,), generator=gen).tolist()
            (ids, mask), = token_batches(tok, [train[i] for i in idx], batch)
            loss = distill_loss(student, teacher, ids, mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            out_of_time = time_budget is not None and time.time() - t0 > time_budget
            if step % eval_every == 0 or step == steps or out_of_time:
                evaluate(step)
            if out_of_time:
                log(f"time budget of {time_budget:.0f} s reached after {step} steps")
                break
    finally:
        masks.release()
        student.eval().requires_grad_(False)
    if best_state is not None:
        student.load_state_dict(best_state)
    masks.apply(student)
    return history, masks
