"""Whole-model CPU speed of the transformer-block fast path (engine/transformer.py), interleaved in
one process, medians (and minima) of `rounds` rounds:

- minilm: all-MiniLM-L6-v2 pruned by magnitude to 90 % (16x16 blocks -> BSR, unstructured -> CSR;
  for speed only, no distillation), the whole `encode` path (tokenizer, embeddings, 6 layers,
  pooling) on texts of exactly `--seq` tokens at batch 1 and 32: dense torch fp32, dense torch bf16,
  the engine before this change (layer by layer: SparseLinear per projection) and after (one
  SparseEncoderLayer per layer; also with GELU in the kernel epilogue instead of after the kernel;
  and the engine model cast to bf16, against dense bf16).
- bert: the issue-12 encoder (2 layers x 768, 12 heads, FFN 3072, GELU, post-LN, seq 128) pruned per
  layer by L1 magnitude (unstructured) at 80/90/95 %, batch 1 and 8: dense torch vs
  engine.modules.sparsify (linear layers only, the "before") vs engine.sparsify (blocks).
- bert-bf16: that encoder at --sparsity in 16x32 tiles, batch 1 and 8: dense fp32 / bf16 vs the
  engine (engine.sparsify, BSR 16x32) in fp32 and cast to bf16 (AMX / AVX512-BF16 kernels).
- crossover: 90 % unstructured (CSR) whole models cast to bf16 against dense bf16, batch by batch
  (MLP 784-4096-4096-10, BERT 2x768 seq 128, MiniLM seq 128): where dense bf16 starts to win.
- profile: where the time of one fast MiniLM layer goes (each op timed alone on the layer's real
  intermediate tensors, x 6 layers), beside the whole encode time.

    PYTHONPATH=. .venv/bin/python bench/minilm_speed.py minilm --threads 2
    PYTHONPATH=. .venv/bin/python bench/minilm_speed.py bert --threads 2
    PYTHONPATH=. .venv/bin/python bench/minilm_speed.py bert-bf16 --threads 2
    PYTHONPATH=. .venv/bin/python bench/minilm_speed.py crossover --threads 2
    PYTHONPATH=. .venv/bin/python bench/minilm_speed.py profile --threads 2
    ... --cpu-time: 1 thread timed by its own CPU time, for a box shared with other jobs
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import time
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import engine
from engine import checkpoint as checkpoint_io
from engine import modules, transformer
from engine.convert import convert
from engine.models import bert, get_family
from engine.peers import BERT_2X768 as BERT, l1_prune_, pruned_mlp
from engine.timing import cpu_model, median_and_min, time_samples

sys.path.insert(0, str(Path(__file__).parent))
from minilm import apply_masks, block_masks, model_folder, save_folder  # noqa: E402

TEXT = ("Sparse kernels read only the weights a pruned model keeps, so a transformer layer runs in a "
        "fraction of the time of its dense twin when the memory traffic dominates. ")


def texts(batch: int, seq: int, tokenizer) -> list[str]:
    """`batch` distinct texts the tokenizer truncates at exactly `seq` tokens."""
    tokenizer.enable_truncation(max_length=seq)
    # ~30 tokens per TEXT: a few tokens past `seq`, so tokenizing costs what a `seq`-token text costs.
    out = [f"{i} " + TEXT * (1 + seq // 28) for i in range(batch)]
    assert all(len(e.ids) == seq for e in tokenizer.encode_batch(out))
    return out


def load_variants(art: Path, seq: int) -> dict[str, nn.Module]:
    """{'before': layer by layer, 'after': fast blocks (GELU after the kernel), 'after, GELU in the
    kernel epilogue', 'after, bf16'} of one artifact."""
    fam = get_family("bert")
    prepare = fam.prepare_runtime
    try:
        fam.prepare_runtime = lambda m, c: prepare(m, c, fast_blocks=False)
        before = engine.load(art)
    finally:
        fam.prepare_runtime = prepare
    after = engine.load(art)
    fused = engine.load(art)
    for layer in fused.encoder.layer:
        layer.ffn_in.activation, layer.post_activation = layer.activation, None
    # The whole model cast to bf16, as a user casts the dense one: AMX / AVX512-BF16 BSR kernels.
    in_bf16 = engine.load(art).to(torch.bfloat16)
    return {"before": before, "after": after, "after, GELU in the kernel epilogue": fused, "after, bf16": in_bf16}


def report(title: str, samples: dict, base: str = "dense fp32") -> None:
    stats = median_and_min(samples)
    print(f"\n{title}\n| model | median ms | min ms | speedup vs {base} (medians) | (minima) |\n|---|---|---|---|---|")
    bm, bn = stats[base]
    for name, (m, n) in stats.items():
        print(f"| {name} | {m * 1e3:.2f} | {n * 1e3:.2f} | {bm / m:.2f}x | {bn / n:.2f}x |")
    sys.stdout.flush()


def teacher_and_tokenizer():
    """The dense all-MiniLM-L6-v2 as the bert family's torch module (nn.Linear), with its tokenizer."""
    src = model_folder()
    config, sd, _ = bert.from_checkpoint(checkpoint_io.read(src), {})
    teacher = bert.build(config)
    teacher.load_state_dict(sd)
    teacher.eval().requires_grad_(False)
    from tokenizers import Tokenizer
    get_family("bert").attach_tokenizer(teacher, config, Tokenizer.from_file(str(src / "tokenizer.json")))
    return src, teacher


def pruned_artifact(src: Path, teacher: nn.Module, sparsity: float, block: int, fmt: str, tmp: Path) -> Path:
    """Magnitude-pruned (block x block tiles) MiniLM converted to `fmt`; for speed, not accuracy."""
    student = copy.deepcopy(teacher)
    student.tokenizer = None
    masks = block_masks(student, sparsity, block)
    apply_masks(student, masks)
    save_folder(student, masks, src, tmp / f"{fmt}-src")
    convert(tmp / f"{fmt}-src", tmp / f"{fmt}.sparse", format=fmt, log=lambda *_: None)
    return tmp / f"{fmt}.sparse"


def minilm(args) -> None:
    src, dense = teacher_and_tokenizer()
    bf16 = copy.deepcopy(dense).to(torch.bfloat16)  # oneDNN's bf16 GEMMs (AMX on this CPU)
    bf16.tokenizer = dense.tokenizer
    models = {"dense fp32": dense, "dense bf16": bf16}
    with tempfile.TemporaryDirectory() as tmp:
        for label, block, fmt in (("bsr 16x16", 16, "bsr"), ("csr unstructured", 1, "csr")):
            art = pruned_artifact(src, dense, args.sparsity, block, fmt, Path(tmp))
            for name, m in load_variants(art, args.seq).items():
                models[f"{label} {name}"] = m
    for batch in args.batch:
        batch_texts = texts(batch, args.seq, dense.tokenizer)
        for m in models.values():
            m.tokenizer.enable_truncation(max_length=args.seq)
        with torch.inference_mode():
            base = dense.encode(batch_texts)
            for name, m in models.items():
                cos = float(F.cosine_similarity(m.encode(batch_texts), base).mean())
                print(f"batch {batch} {name}: cosine vs dense {cos:.4f}")
        fns = {name: (lambda m=m: m.encode(batch_texts, batch_size=batch)) for name, m in models.items()}
        report(f"all-MiniLM-L6-v2 encode, batch {batch}, seq {args.seq}, {args.threads} threads, "
               f"{args.sparsity:.0%} sparsity", time_samples(fns, args.min_time, args.rounds, args.clock))


def bert_grid(args) -> None:
    torch.manual_seed(0)
    for sparsity in args.sparsities:
        dense = bert.build(BERT).eval()
        l1_prune_(dense, sparsity)
        before = modules.sparsify(copy.deepcopy(dense), skip=())
        get_family("bert").prepare_runtime(before, BERT, fast_blocks=False)  # GELU fused, as load does
        after = transformer.sparsify(copy.deepcopy(dense))
        assert all(isinstance(layer, transformer.SparseEncoderLayer) for layer in after.encoder.layer)
        for batch in args.bert_batch:
            gen = torch.Generator().manual_seed(batch)
            ids = torch.randint(1000, BERT["vocab_size"], (batch, args.seq), generator=gen)
            mask = torch.ones_like(ids)
            models = {"dense fp32": dense, "engine before (linears)": before, "engine after (blocks)": after}
            with torch.inference_mode():
                ref = dense(ids, mask)
                for name, m in models.items():
                    err = float((m(ids, mask) - ref).abs().max())
                    print(f"{sparsity:.0%} batch {batch} {name}: max |diff| vs dense {err:.2e}")
            fns = {name: (lambda m=m: m(ids, mask)) for name, m in models.items()}
            report(f"BERT 2x768 encoder, {sparsity:.0%} unstructured, batch {batch}, seq {args.seq}, "
                   f"{args.threads} threads", time_samples(fns, args.min_time, args.rounds, args.clock))


def tile_prune_(model: nn.Module, sparsity: float, tile: tuple[int, int]) -> None:
    """Per encoder linear layer: zero the `sparsity` share of R x C tiles with the lowest L2 norm."""
    r, c = tile
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and name.startswith("encoder."):
                o, i = m.weight.shape
                norms = m.weight.reshape(o // r, r, i // c, c).pow(2).sum(dim=(1, 3))
                keep = torch.ones_like(norms, dtype=torch.bool)
                keep.view(-1)[norms.view(-1).argsort()[:int(round(sparsity * norms.numel()))]] = False
                m.weight.mul_(keep.repeat_interleave(r, 0).repeat_interleave(c, 1))


def bert_bf16(args) -> None:
    """Issue 17's BERT bar: 90 % in 16x32 tiles (one AMX tile each), fp32 and cast to bf16, engine vs dense."""
    torch.manual_seed(0)
    dense = bert.build(BERT).eval()
    tile_prune_(dense, args.sparsity, (16, 32))
    engine_fp32 = transformer.sparsify(copy.deepcopy(dense), "bsr", (16, 32))
    models = {"dense fp32": dense, "dense bf16": copy.deepcopy(dense).to(torch.bfloat16),
              "engine fp32": engine_fp32, "engine bf16": copy.deepcopy(engine_fp32).to(torch.bfloat16)}
    for batch in args.bert_batch:
        ids = torch.randint(1000, BERT["vocab_size"], (batch, args.seq), generator=torch.Generator().manual_seed(batch))
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            ref = dense(ids, mask)
            for name, m in models.items():
                print(f"batch {batch} {name}: max |diff| vs dense fp32 {float((m(ids, mask).float() - ref).abs().max()):.2e}")
        print(f"bf16 kernel family that ran: {engine.cpu.last_bf16_kernel()}")
        fns = {name: (lambda m=m: m(ids, mask)) for name, m in models.items()}
        report(f"BERT 2x768 encoder, {args.sparsity:.0%} in 16x32 tiles, batch {batch}, seq {args.seq}, "
               f"{args.threads} threads", time_samples(fns, args.min_time, args.rounds, args.clock), base="dense bf16")


def crossover(args) -> None:
    """Unstructured (CSR) 90 % models, the engine's cast to bf16 vs the dense model cast to bf16, at
    growing batch: the speedup per batch and the first batch at which dense bf16 is as fast."""
    def row(title: str, dense: nn.Module, sparse: nn.Module, batches, call) -> None:
        dense16, sparse16 = copy.deepcopy(dense).to(torch.bfloat16), sparse.to(torch.bfloat16)
        ratios = {}
        for batch in batches:
            inputs = call(batch)
            fns = {"dense bf16": lambda: dense16(*inputs), "engine bf16": lambda: sparse16(*inputs)}
            with torch.inference_mode():
                t = median_and_min(time_samples(fns, args.min_time, args.rounds, args.clock))
            ratios[batch] = t["dense bf16"][0] / t["engine bf16"][0]
            print(f"{title} batch {batch}: dense bf16 {t['dense bf16'][0] * 1e3:.2f} ms, engine bf16 "
                  f"{t['engine bf16'][0] * 1e3:.2f} ms", flush=True)
        cross = next((b for b, r in ratios.items() if r <= 1.0), None)
        cells = ", ".join(f"{b}: {ratios[b]:.2f}x" for b in batches)
        table.append(f"| {title} | {cells} | {'none up to ' + str(batches[-1]) if cross is None else cross} |")

    table: list[str] = []
    torch.manual_seed(0)
    mlp = pruned_mlp(args.sparsity)
    row("MLP 784-4096-4096-10", mlp, engine.sparsify(copy.deepcopy(mlp), "csr"), (1, 4, 16, 32, 64, 128, 256),
        lambda b: (torch.randn(b, 784).bfloat16(),))
    bert_dense = bert.build(BERT).eval()
    l1_prune_(bert_dense, args.sparsity)
    row("BERT 2x768 (seq 128)", bert_dense, transformer.sparsify(copy.deepcopy(bert_dense), "csr"), (1, 2, 4, 8),
        lambda b: (torch.randint(1000, BERT["vocab_size"], (b, args.seq)), torch.ones(b, args.seq, dtype=torch.long)))
    src, minilm_dense = teacher_and_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        sparse = engine.load(pruned_artifact(src, minilm_dense, args.sparsity, 1, "csr", Path(tmp)))
    minilm_dense.tokenizer.enable_truncation(max_length=args.seq)
    ids = torch.tensor([e.ids for e in minilm_dense.tokenizer.encode_batch(texts(32, args.seq, minilm_dense.tokenizer))])
    row("all-MiniLM-L6-v2 (seq 128)", minilm_dense, sparse, (1, 2, 4, 8, 16, 32),
        lambda b: (ids[:b], torch.ones(b, args.seq, dtype=torch.long)))
    print(f"\n{args.sparsity:.0%} unstructured, the engine cast to bf16 vs dense bf16 (medians), {args.threads} threads"
          f"\n| model | speedup by batch | crossover batch (dense bf16 as fast) |\n|---|---|---|")
    print("\n".join(table))


def profile(args) -> None:
    """Each op of one fast MiniLM layer timed alone on the layer's real inputs, x layers."""
    src, dense = teacher_and_tokenizer()
    with tempfile.TemporaryDirectory() as tmp:
        model = engine.load(pruned_artifact(src, dense, args.sparsity, 16, "bsr", Path(tmp)))
        model.tokenizer.enable_truncation(max_length=args.seq)
        n_layers = len(model.encoder.layer)
        layer = model.encoder.layer[0]
        for batch in args.batch:
            batch_texts = texts(batch, args.seq, model.tokenizer)
            b, s, h = batch, args.seq, layer.hidden
            x2 = torch.randn(b * s, h)
            qkv = layer.qkv(x2).view(b, s, 3, layer.heads, h // layer.heads)
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
            ctx = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * s, h)
            f = layer.ffn_in(x2)

            def attend():
                return F.scaled_dot_product_attention(q, k, v)
            scratch = torch.zeros_like(x2)
            n1 = layer.norm1
            fns = {
                "qkv sparse linear": lambda: layer.qkv(x2),
                "attention (SDPA)": attend,
                "ctx reshape (copy)": lambda: attend().transpose(1, 2).reshape(b * s, h),
                "out sparse linear": lambda: layer.out(ctx),
                "ffn_in sparse linear": lambda: layer.ffn_in(x2),
                "GELU (in place, after the kernel)": lambda: torch.ops.aten.gelu_(f),
                "ffn_out sparse linear": lambda: layer.ffn_out(f),
                "residual add + layernorm (x2)": lambda: F.layer_norm(scratch.add_(x2), (h,), n1.weight, n1.bias,
                                                                      n1.eps),
                "whole layer": lambda: layer(x2.view(b, s, h)),
                "whole encode": lambda: model.encode(batch_texts, batch_size=batch),
            }
            samples = time_samples(fns, args.min_time, args.rounds, args.clock)
            t = {k: sorted(v)[len(v) // 2] for k, v in samples.items()}
            t["ctx reshape (copy)"] = max(0.0, t["ctx reshape (copy)"] - t["attention (SDPA)"])
            t["residual add + layernorm (x2)"] *= 2
            ops_sum = sum(v for k, v in t.items() if not k.startswith("whole"))
            print(f"\nprofile, bsr 16x16 {args.sparsity:.0%}, batch {batch}, seq {s}, {args.threads} threads "
                  f"({n_layers} layers)\n| op | ms per layer | ms x {n_layers} | share of encode |\n|---|---|---|---|")
            for k, v in t.items():
                scale = 1 if k == "whole encode" else n_layers
                print(f"| {k} | {v * 1e3:.3f} | {v * scale * 1e3:.2f} | {v * scale / t['whole encode']:.0%} |")
            glue = t["whole encode"] - n_layers * t["whole layer"]
            print(f"| per-layer glue (whole layer - sum of ops) | {(t['whole layer'] - ops_sum) * 1e3:.3f} | "
                  f"{(t['whole layer'] - ops_sum) * n_layers * 1e3:.2f} | |")
            print(f"| outside the layers (tokenizer, embeddings, pooling) | | {glue * 1e3:.2f} | "
                  f"{glue / t['whole encode']:.0%} |")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=("minilm", "bert", "bert-bf16", "crossover", "profile"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sparsity", type=float, default=0.9, help="MiniLM sparsity")
    p.add_argument("--sparsities", type=float, nargs="+", default=(0.8, 0.9, 0.95), help="BERT grid")
    p.add_argument("--batch", type=int, nargs="+", default=(1, 32), help="MiniLM batches")
    p.add_argument("--bert-batch", type=int, nargs="+", default=(1, 8))
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--min-time", type=float, default=1.0, help="seconds per model and batch")
    p.add_argument("--cpu-time", action="store_true",
                   help="1 thread, timed by this thread's CPU time (time.thread_time): immune to time slices "
                        "lost to other processes on a shared box; tokenizer parallelism off")
    args = p.parse_args(argv)
    args.clock = time.perf_counter
    if args.cpu_time:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
        args.threads, args.clock = 1, time.thread_time
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, torch {torch.__version__}, C++ kernels isa="
          f"{engine.cpu.isa_label()}, {args.threads} threads, clock {args.clock.__name__}")
    {"minilm": minilm, "bert": bert_grid, "bert-bf16": bert_bf16, "crossover": crossover,
     "profile": profile}[args.part](args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
