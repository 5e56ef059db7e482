"""Kernel-level A/B of the transformer pieces, interleaved in one process (medians of `--rounds`):

- attention: the engine's C++ attention (fp32: ymm/zmm; bf16: AMX tiles) against torch's
  scaled_dot_product_attention on the same QKV output (the reshape to the out projection's rows
  included on torch's side), at MiniLM and BERT-base shapes;
- bsr-rows: fp32 BSR with 16x16 blocks at 90 %, the batch-as-rows kernel (engine.cpu._blocks_t,
  outputs in zmm lanes, no transposes) against the packed-X kernel it replaces, by batch rows, with
  --activation in both epilogues;
- bf16-bsr: the AMX BSR kernel against dense bf16 F.linear, by batch rows.

    PYTHONPATH=. .venv/bin/python bench/layer_kernels.py [--threads 2] [--parts attention,bsr-rows,bf16-bsr]
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path
from unittest import mock

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402
from engine import cpu  # noqa: E402
from engine.formats import BSR  # noqa: E402
from engine.timing import cpu_model, time_samples  # noqa: E402

# (O, I): MiniLM's qkv / ffn_in / ffn_out, BERT-base's ffn_in / ffn_out
LAYERS = ((1152, 384), (1536, 384), (384, 1536), (3072, 768), (768, 3072))
ROWS = (128, 256, 1024, 4096)
# (batch, seq, heads, head size): MiniLM batch 32 and 1, BERT-base batch 8 and 1
ATTENTION = ((32, 128, 12, 32), (1, 128, 12, 32), (8, 128, 12, 64), (1, 128, 12, 64))


def block_weight(o: int, i: int, sparsity: float, gen) -> tuple[torch.Tensor, torch.Tensor]:
    keep = (torch.rand(o // 16, i // 16, generator=gen) >= sparsity).repeat_interleave(16, 0).repeat_interleave(16, 1)
    return torch.randn(o, i, generator=gen) * keep / i ** 0.5, keep


def medians(fns: dict, args) -> dict[str, float]:
    return {k: statistics.median(v) * 1e3 for k, v in time_samples(fns, args.min_time, args.rounds).items()}


def attention(args) -> None:
    print("\n| B, S, heads x head size | dtype | torch SDPA ms | engine ms | speedup | kernel |\n|---|---|---|---|---|---|")
    for b, s, nh, hs in ATTENTION:
        for dtype in (torch.float32, torch.bfloat16):
            qkv = torch.randn(b * s, 3 * nh * hs).to(dtype)
            if not cpu.attention_fits(qkv, nh):
                continue

            def sdpa():
                q, k, v = qkv.view(b, s, 3, nh, hs).permute(2, 0, 3, 1, 4).unbind(0)
                return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b * s, nh * hs)
            t = medians({"sdpa": sdpa, "engine": lambda: cpu.attention_cpu(qkv, b, s, nh)}, args)
            kernel = cpu.last_bf16_kernel() if dtype is torch.bfloat16 else cpu.isa_label()
            print(f"| {b}, {s}, {nh} x {hs} | {str(dtype)[6:]} | {t['sdpa']:.3f} | {t['engine']:.3f} | "
                  f"{t['sdpa'] / t['engine']:.2f}x | {kernel} |", flush=True)


def bsr_rows(args) -> None:
    gen = torch.Generator().manual_seed(0)
    act = args.activation
    print(f"\n| layer O x I | rows | packed X ms | batch as rows ms | speedup | (activation {act}) |\n|---|---|---|---|---|---|")
    for o, i in LAYERS:
        w, keep = block_weight(o, i, args.sparsity, gen)
        s = BSR.from_dense(w, mask=keep, blocksize=(16, 16))
        for n in ROWS:
            x = torch.randn(n, i, generator=gen)
            if cpu._blocks_t(s, n) is None:
                print(f"| {o}x{i} | {n} | batch-as-rows kernel not used here (needs whole AVX-512, >= 128 rows) | | |")
                continue

            def packed():
                with mock.patch.object(cpu, "_blocks_t", lambda *a: None):
                    return engine.sparse_linear(x, s, activation=act)
            t = medians({"packed": packed, "rows": lambda: engine.sparse_linear(x, s, activation=act)}, args)
            print(f"| {o}x{i} | {n} | {t['packed']:.3f} | {t['rows']:.3f} | {t['packed'] / t['rows']:.2f}x | |",
                  flush=True)


def bf16_bsr(args) -> None:
    gen = torch.Generator().manual_seed(0)
    print("\n| layer O x I | rows | dense bf16 ms | engine bf16 16x16 ms | speedup | kernel |\n|---|---|---|---|---|---|")
    for o, i in LAYERS:
        w, keep = block_weight(o, i, args.sparsity, gen)
        s16, w16 = BSR.from_dense(w.bfloat16(), mask=keep, blocksize=(16, 16)), w.bfloat16()
        for n in ROWS:
            x = torch.randn(n, i, generator=gen).bfloat16()
            t = medians({"dense": lambda: F.linear(x, w16), "engine": lambda: engine.sparse_linear(x, s16)}, args)
            print(f"| {o}x{i} | {n} | {t['dense']:.3f} | {t['engine']:.3f} | {t['dense'] / t['engine']:.2f}x | "
                  f"{cpu.last_bf16_kernel()} |", flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--activation", default="none", help="bsr-rows: the layers' activation (none, relu, gelu)")
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--min-time", type=float, default=0.3, help="seconds per variant over all rounds")
    p.add_argument("--parts", default="attention,bsr-rows,bf16-bsr")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    print(f"{cpu_model()}, torch {torch.__version__}, kernels isa={cpu.isa_label()}, bf16 kernels {cpu.bf16_isa()}, "
          f"{args.threads} threads, {args.sparsity:.0%} 16x16 blocks, medians of {args.rounds} interleaved rounds")
    parts = {"attention": attention, "bsr-rows": bsr_rows, "bf16-bsr": bf16_bsr}
    for name in args.parts.split(","):
        parts[name](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
