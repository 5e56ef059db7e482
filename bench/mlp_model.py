"""Whole-model MLP benchmark: the wide digits MLP (64-2048-1024-10), trained, block-pruned at each
sparsity with a short masked fine-tune, converted (`format=auto`) and loaded with engine.load.
Reports fidelity (accuracy, agreement and relative error vs the same pruned model in dense torch)
and latency (median, dense torch F.linear vs engine) at batch 1 and 32.

    PYTHONPATH=. .venv/bin/python bench/mlp_model.py [--threads 2] [--block 16] [--out table.md]
"""
from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

import engine
from engine.convert import convert
from engine.examples import accuracy, digits_data, mlp_digits, train_dense
from engine.timing import cpu_model, median_and_min, time_samples

sys.path.insert(0, str(Path(__file__).parent))
from report import publish  # noqa: E402


def median_latency(fns: dict, x: torch.Tensor, rounds: int = 15, min_time: float = 0.02) -> dict:
    """(median, minimum) seconds per call of each fn, interleaved round by round (engine.timing)."""
    samples = time_samples({k: (lambda f=f: f(x)) for k, f in fns.items()},
                           min_time=min_time * rounds, rounds=rounds)
    return median_and_min(samples)


def cells(v: dict) -> str:
    """'dense median (min) | engine median (min) | speedup of medians (of minima)' in us."""
    (dm, dn), (em, en) = v["dense"], v["engine"]
    return (f"{dm * 1e6:.0f} ({dn * 1e6:.0f}) | {em * 1e6:.0f} ({en * 1e6:.0f}) | "
            f"{dm / em:.2f}x ({dn / en:.2f}x)")

def block_masks(model: nn.Sequential, sparsity: float, block: int) -> dict[str, torch.Tensor]:
    """Per-layer block magnitude pruning of the hidden layers (block L2 norm, lowest dropped).
    The 10-wide classifier stays dense: 10 rows do not tile into blocks."""
    masks = {}
    for name, m in model.named_children():
        if not isinstance(m, nn.Linear) or m.out_features % block or m.in_features % block:
            continue
        o, i = m.weight.shape
        norms = m.weight.detach().reshape(o // block, block, i // block, block).pow(2).sum(dim=(1, 3))
        k = int(round(sparsity * norms.numel()))
        keep = torch.ones_like(norms, dtype=torch.bool)
        keep.view(-1)[norms.view(-1).argsort()[:k]] = False
        masks[f"{name}.weight"] = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return masks


def finetune_masked(model, masks, data, epochs: int, seed: int = 0):
    """Adam on the training split with the masks re-applied after every step."""
    from engine.examples import loader
    torch.manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=5e-4)
    params = dict(model.named_parameters())

    def enforce():
        with torch.no_grad():
            for k, m in masks.items():
                params[k].mul_(m)
    enforce()
    for epoch in range(epochs):
        model.train()
        for xb, yb in loader(data.train, 32, shuffle=True, seed=seed + epoch):
            opt.zero_grad()
            nn.functional.cross_entropy(model(xb), yb).backward()
            opt.step()
            enforce()
    return model.eval()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--block", type=int, default=16)
    p.add_argument("--sparsity", type=float, action="append")
    p.add_argument("--epochs", type=int, default=8, help="dense training epochs")
    p.add_argument("--finetune", type=int, default=4, help="masked fine-tune epochs per sparsity")
    p.add_argument("--out", help="append the markdown table to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = digits_data(0)
    dense = mlp_digits("wide", seed=0)
    train_dense(dense, data, epochs=args.epochs)
    dense.eval()
    x_test = data.test.x
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for s in args.sparsity or (0.5, 0.7, 0.9, 0.95):
            pruned = copy.deepcopy(dense)
            masks = block_masks(pruned, s, args.block)
            finetune_masked(pruned, masks, data, args.finetune)
            sd = dict(pruned.state_dict())
            sd.update({k + "_mask": v for k, v in masks.items()})
            ckpt, art = Path(tmp) / f"mlp{s}.pt", Path(tmp) / f"mlp{s}.sparse"
            torch.save(sd, ckpt)
            meta = convert(ckpt, art, arch="mlp:relu", log=lambda *_: None)
            sparse = engine.load(art)
            with torch.inference_mode():
                y_ref, y = pruned(x_test), sparse(x_test)
            agree = float((y.argmax(1) == y_ref.argmax(1)).float().mean())
            rel = float((y - y_ref).norm() / y_ref.norm())
            fmts = ",".join(l["format"] for l in meta["layers"].values())
            lat = {}
            for b in (1, 32):
                xb = torch.randn(b, 64)
                lat[b] = median_latency({"dense": pruned, "engine": sparse}, xb)
            rows.append((s, accuracy(dense, data.test), accuracy(pruned, data.test), accuracy(sparse, data.test),
                         agree, rel, fmts, lat))
            print(f"sparsity {s:.2f}: acc dense {rows[-1][1]:.3f} pruned {rows[-1][2]:.3f} engine "
                  f"{rows[-1][3]:.3f}, agree {agree:.3f}, rel err {rel:.1e}, layers {fmts}, "
                  + ", ".join(f"b{b} {cells(v)}" for b, v in lat.items()), flush=True)
    cpu = engine.cpu.available() if hasattr(engine, "cpu") else None
    lines = [f"### Whole-model MLP (wide digits 64-2048-1024-10, {args.block}x{args.block} block pruning "
             f"of the hidden layers, {args.finetune}-epoch masked fine-tune)", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; `PYTHONPATH=. .venv/bin/python "
             f"bench/mlp_model.py --threads {args.threads}`; torch {torch.__version__}, "
             f"{args.threads} threads, {cpu_model()}, C++ kernels "
             f"{'on' if cpu else 'off (torch fallback)'}. Latency per forward call: median (minimum) of 15 "
             "interleaved rounds; dense = the same pruned weights in nn.Linear (torch F.linear).", "",
             "| sparsity | test acc dense | test acc pruned (torch) | test acc engine | argmax agreement | "
             "rel. error vs torch | layer formats | b1 dense µs | b1 engine µs | b1 speedup | "
             "b32 dense µs | b32 engine µs | b32 speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for s, acc_d, acc_p, acc_e, agree, rel, fmts, lat in rows:
        lines.append(f"| {s:.0%} | {acc_d:.3f} | {acc_p:.3f} | {acc_e:.3f} | {agree:.3f} | {rel:.1e} | {fmts} | "
                     + " | ".join(cells(lat[b]) for b in (1, 32)) + " |")
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
