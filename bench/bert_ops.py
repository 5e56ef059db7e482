"""Where one encoder layer's time goes: each step of the first SparseEncoderLayer of the peer grid's
BERT (2 layers x 768, 12 heads, FFN 3072, seq 128; engine.peers, L1-pruned, `engine.sparsify`) timed
on its own, medians over interleaved rounds, with each sparse step's rate on its stored weights.

    PYTHONPATH=. .venv/bin/python bench/bert_ops.py [--sparsity 0.9] [--batch 1] [--threads 2] [--rounds 200]

Steps: qkv (one CSR call), attention (the C++ kernel, no mask), out, residual + LayerNorm, the FFN
(`csr_pair` when both layers are panel-major), residual + LayerNorm, and the whole layer.
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import engine  # noqa: E402
from engine import cpu, peers  # noqa: E402
from engine.timing import cpu_model  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sparsity", type=float, default=0.9)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=200)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    fast = engine.sparsify(peers.pruned_model("bert", args.sparsity), batch=args.batch)
    L = next(m for m in fast.modules() if isinstance(m, engine.transformer.SparseEncoderLayer))
    b, s, h = args.batch, 128, L.hidden
    x = torch.randn(b * s, h)
    qkv = L.qkv(x)
    ctx = cpu.attention_cpu(qkv, b, s, L.heads)
    a = F.layer_norm(L.out(ctx), (h,), L.norm1.weight, L.norm1.bias, L.norm1.eps)
    f = L._ffn(a)
    steps = {
        "qkv": lambda: L.qkv(x),
        "attention": lambda: cpu.attention_cpu(qkv, b, s, L.heads),
        "out": lambda: L.out(ctx),
        "add+LN 1": lambda: F.layer_norm(ctx + x, (h,), L.norm1.weight, L.norm1.bias, L.norm1.eps),
        "ffn": lambda: L._ffn(a),
        "add+LN 2": lambda: F.layer_norm(f + a, (h,), L.norm2.weight, L.norm2.bias, L.norm2.eps),
        "whole layer": lambda: L(x.view(b, s, h)),
    }
    nnz = {"qkv": L.qkv.sparse_weight.nnz, "out": L.out.sparse_weight.nnz,
           "ffn": L.ffn_in.sparse_weight.nnz + L.ffn_out.sparse_weight.nnz}
    times = {k: [] for k in steps}
    with torch.inference_mode():
        for _ in range(args.rounds):
            for k, fn in steps.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
    print(f"{cpu_model()}, isa={cpu.isa_label()}, {args.threads} threads; BERT 2x768 layer 0, {args.sparsity:.0%} "
          f"unstructured, batch {b} ({b * s} rows), medians of {args.rounds} rounds")
    print("| step | ms | GFLOP/s on stored weights |\n|---|---|---|")
    for k, v in times.items():
        ms = statistics.median(v) * 1e3
        rate = f"{2 * nnz[k] * b * s / ms / 1e6:.1f}" if k in nnz else ""
        print(f"| {k} | {ms:.3f} | {rate} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
