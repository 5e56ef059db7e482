"""`sparse-engine bench`: one linear layer, dense torch vs torch.sparse vs this engine, as a table.

Every provider runs the same x (N, I) @ Wᵀ in one process, interleaved round by round so load
drifts hit all alike; the table reports median milliseconds of dense `F.linear` and each provider's
speedup over it, plus the engine's best against the best of torch.sparse. The providers and the
timer are shared with the pytest-benchmark suite (bench/test_bench_kernels.py).

    sparse-engine bench                      # --quick: 2 shapes x 2 batches x 2 sparsities, ~1 min
    sparse-engine bench --full               # the issue-7 grid (4 shapes x 4 batches x 5 sparsities)
    sparse-engine bench --shapes 4096x4096 --batch 1,128 --sparsity 0.9 --threads 2
    sparse-engine bench --peers              # whole pruned models vs ONNX Runtime and DeepSparse (engine/peers.py)
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F

from .formats import BSR, CSR
from .timing import measure_machine, time_interleaved

SHAPES = ((4096, 4096), (3072, 768), (768, 3072), (1536, 384))  # (O, I)
BATCHES = (1, 8, 32, 128)
SPARSITIES = (0.5, 0.7, 0.8, 0.9, 0.95)
BLOCKS = ((1, 8), (8, 8), (16, 16), (32, 32))
ONNX = "onnxruntime dense"  # provider name of ONNX Runtime's dense Gemm
QUICK = dict(shapes=((4096, 4096), (1536, 384)), batches=(1, 32), sparsities=(0.7, 0.9),
             blocks=((8, 8), (16, 16)))


# ---- weights and inputs -------------------------------------------------------------------------

def random_weight(shape, sparsity: float, block=(1, 1), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 W (O, I) with a fraction `sparsity` of its R×C blocks zero, and the keep mask."""
    g = torch.Generator().manual_seed(seed)
    o, i = shape
    r, c = block
    keep = torch.rand(o // r, i // c, generator=g) >= sparsity
    keep = keep.repeat_interleave(r, 0).repeat_interleave(c, 1)
    return torch.randn(o, i, generator=g) * keep, keep


def _onnx_dense(w: torch.Tensor, threads: int):
    """ONNX Runtime session for y = x @ Wᵀ (Gemm, transB) or None when onnxruntime is missing."""
    try:
        import numpy as np
        import onnx
        import onnxruntime as ort
        from onnx import TensorProto, helper, numpy_helper
    except ImportError:
        return None
    o, i = w.shape
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)], "linear",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", i])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", o])],
        [numpy_helper.from_array(w.numpy().astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.log_severity_level = 3
    # ORT's pool busy-waits between runs by default; in an interleaved benchmark that spinning
    # would steal the cores from the next provider.
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def providers(shape, sparsity: float, batch: int, *, blocks=BLOCKS, threads: int | None = None,
              torch_sparse: bool = True, onnx: bool = True, half: bool = True, seed: int = 0,
              only: set[str] | None = None) -> dict[str, dict]:
    """name -> {"fn": zero-arg callable, "stored": values kept, "fmt", "block", "value_bytes"}.

    Dense providers run the unstructured weight (their speed does not depend on the pattern);
    each BSR provider gets its own block-structured weight at the same sparsity.
    """
    from . import cpu
    threads = threads or torch.get_num_threads()
    o, i = shape
    x = torch.randn(batch, i, generator=torch.Generator().manual_seed(seed + 1))
    w, keep = random_weight(shape, sparsity, seed=seed)
    out: dict[str, dict] = {}

    def add(name, fn, fmt, stored, block=None, value_bytes=4):
        if only is None or name in only or name == "dense":
            out[name] = dict(fn=fn, fmt=fmt, stored=stored, block=block, value_bytes=value_bytes)

    add("dense", lambda: F.linear(x, w), "dense", o * i)
    nnz = int(keep.sum())
    xt = x.T
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.sparse "beta" notices
        if torch_sparse:
            w_csr = w.to_sparse_csr()
            add("torch.sparse csr", lambda: (w_csr @ xt).T, "csr", nnz)
    if onnx and (only is None or ONNX in only):
        sess = _onnx_dense(w, threads)
        if sess is not None:
            xn = x.numpy()
            add(ONNX, lambda: sess.run(None, {"x": xn}), "dense", o * i)
    wc = CSR.from_dense(w, mask=keep)
    cpu.prepare_weight(wc)
    add("engine csr", lambda: cpu.csr_linear_cpu(x, wc, None, "none"), "csr", nnz)
    if half:
        for dt, tag in ((torch.bfloat16, "bf16"), (torch.float16, "fp16")):
            w16 = cpu.prepare_weight(CSR.from_dense(w.to(dt), mask=keep))
            add(f"engine csr {tag}", (lambda w16=w16: cpu.csr_linear_cpu(x, w16, None, "none")), "csr",
                nnz, value_bytes=2)
    for r, c in blocks:
        if o % r or i % c:
            continue
        wb_dense, bkeep = random_weight(shape, sparsity, (r, c), seed=seed)
        wb = BSR.from_dense(wb_dense, mask=bkeep, blocksize=(r, c))
        stored = wb.nnz
        add(f"engine bsr {r}x{c}", (lambda wb=wb: cpu.bsr_linear_cpu(x, wb, None, "none")), "bsr", stored, (r, c))
        # torch's CPU BSR matmul (MKL) takes square blocks only.
        if torch_sparse and r == c and (only is None or f"torch.sparse bsr {r}x{c}" in only):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                tb = wb_dense.to_sparse_bsr((r, c))
            add(f"torch.sparse bsr {r}x{c}", (lambda tb=tb: (tb @ xt).T), "bsr", stored, (r, c))
        if half and (r, c) == (16, 16):
            wb16 = BSR.from_dense(wb_dense.to(torch.bfloat16), mask=bkeep, blocksize=(r, c))
            add(f"engine bsr {r}x{c} bf16", (lambda wb16=wb16: cpu.bsr_linear_cpu(x, wb16, None, "none")),
                "bsr", stored, (r, c), value_bytes=2)
    return out


def mlp_providers(sparsity: float, batch: int, fmt: str = "csr", seed: int = 0) -> dict[str, dict]:
    """dense torch vs engine.sparsify(model, format=fmt) on the pruned 784-4096-4096-10 MLP."""
    import copy

    from .modules import sparsify
    from .peers import pruned_mlp
    dense = pruned_mlp(sparsity, seed=seed)
    sparse = sparsify(copy.deepcopy(dense), format=fmt)
    x = torch.randn(batch, 784, generator=torch.Generator().manual_seed(seed + 1))
    with torch.inference_mode():
        torch.testing.assert_close(sparse(x), dense(x), rtol=1e-4, atol=1e-4)
    stored = sum(int((m.weight != 0).sum()) for m in dense if isinstance(m, torch.nn.Linear))
    full = sum(m.weight.numel() for m in dense if isinstance(m, torch.nn.Linear))
    return {"dense": dict(fn=lambda: dense(x), fmt="dense", stored=full, block=None, value_bytes=4),
            f"engine {fmt}": dict(fn=lambda: sparse(x), fmt=fmt, stored=stored, block=None, value_bytes=4)}


def bound_seconds(p: dict, shape, batch: int, bandwidth: float, peak: float) -> float:
    """Roofline lower bound for one provider: bytes that must move (values + indices + X + Y) over
    memory bandwidth, or FLOPs over FMA peak, whichever is larger."""
    o, i = shape
    stored, vb = p["stored"], p["value_bytes"]
    if p["fmt"] == "dense":
        w_bytes = stored * vb
    elif p["fmt"] == "csr":
        w_bytes = stored * (vb + (2 if i <= 65536 else 4)) + (o + 1) * 4
    else:
        r, c = p["block"]
        w_bytes = stored * vb + stored // (r * c) * 4 + (o // r + 1) * 4
    act_bytes = 4 * batch * (i + o)
    return max((w_bytes + act_bytes) / bandwidth, 2.0 * batch * stored / peak)


# ---- CLI ----------------------------------------------------------------------------------------

def _pairs(text: str) -> tuple[tuple[int, int], ...]:
    return tuple(tuple(int(v) for v in s.lower().split("x")) for s in text.split(",") if s)


def _nums(text: str, kind=int):
    return tuple(kind(v) for v in text.split(",") if v)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--full", action="store_true",
                        help="the whole issue-7 grid: 4 shapes x batch 1,8,32,128 x sparsity 0.5..0.95 "
                             "(tens of minutes); the default is a ~1 minute --quick subset")
    parser.add_argument("--quick", action="store_true", help="the short default grid (explicit)")
    parser.add_argument("--shapes", type=_pairs, help="weights O×I, e.g. 4096x4096,3072x768")
    parser.add_argument("--batch", type=_nums, help="batch sizes, e.g. 1,8,32,128")
    parser.add_argument("--sparsity", type=lambda s: _nums(s, float), help="e.g. 0.7,0.9,0.95")
    parser.add_argument("--blocks", type=_pairs, help="engine/torch BSR block sizes, e.g. 1x8,8x8,16x16")
    parser.add_argument("--threads", type=int, default=2, help="threads for every provider (default 2)")
    parser.add_argument("--no-half", action="store_true", help="skip the bf16/fp16 weight variants")
    parser.add_argument("--no-onnx", action="store_true", help="skip ONNX Runtime even when installed")
    parser.add_argument("--min-time", type=float,
                        help="seconds of timing per provider per cell (default 0.3; 2 with --peers)")
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with this thread's CPU time (needs --threads 1): steady on a shared, "
                             "loaded machine where wall-clock 2-thread runs are not")
    parser.add_argument("--mlp", action="store_true",
                        help="also time the whole pruned 784-4096-4096-10 MLP (ReLU, unstructured "
                             "90 %% and 95 %%) at batch 64: dense torch vs engine.sparsify(format='csr')")
    parser.add_argument("--model", metavar="ARTIFACT",
                        help="time a converted model instead: dense torch twin (fp32 and bf16) vs engine, "
                             "at --batch (default 1,32; BERT inputs use sequence --seq)")
    parser.add_argument("--seq", type=int, default=128, help="sequence length for --model on a BERT artifact")
    parser.add_argument("--peers", action="store_true",
                        help="whole pruned models (784-4096-4096-10 MLP at batch 1,64; BERT 2x768 seq 128 at "
                             "batch 1,8; 80/90/95 %% unstructured): dense torch fp32/bf16, ONNX Runtime, the "
                             "engine and DeepSparse (when found) on the same inputs; writes -o .md/.json/.png")
    parser.add_argument("--peer-models", type=lambda s: [v for v in s.split(",") if v], default=["mlp", "bert"],
                        help="models for --peers (default mlp,bert)")
    parser.add_argument("--deepsparse-python", metavar="PYTHON",
                        help="interpreter of a venv with deepsparse==1.8.0 (default: $SPARSE_ENGINE_DEEPSPARSE_PYTHON)")
    parser.add_argument("-o", "--out", default="bench/results/peers",
                        help="--peers output path without suffix (default bench/results/peers)")
    parser.add_argument("--bound", action="store_true",
                        help="measure bandwidth and FMA peak first and print each cell's roofline bound")


def _fmt_ms(s: float) -> str:
    return f"{s * 1e3:.3f}"


def main(args: argparse.Namespace) -> int:
    from . import cpu
    if not cpu.available():
        print(f"sparse-engine bench: the C++ extension is not built ({cpu.import_error()})")
        return 1
    if args.peers:
        from pathlib import Path

        from . import peers
        batches = {m: args.batch or peers.GRID.get(m, ()) for m in args.peer_models}
        unknown = [m for m in args.peer_models if m not in peers.GRID]
        if unknown:
            print(f"sparse-engine bench --peers: unknown model(s) {unknown}; expected {sorted(peers.GRID)}")
            return 2
        return peers.run(args.peer_models, args.sparsity or peers.SPARSITIES, batches, args.threads,
                         args.min_time or 2.0, args.deepsparse_python, Path(args.out))
    if args.min_time is None:
        args.min_time = 0.3
    if args.model:
        from .model_bench import run
        return run(args.model, args.batch or [1, 32], args.threads, seq=args.seq,
                   min_time=max(0.5, args.min_time))
    grid = dict(shapes=SHAPES, batches=BATCHES, sparsities=SPARSITIES, blocks=BLOCKS) if args.full else dict(QUICK)
    for key, val in (("shapes", args.shapes), ("batches", args.batch), ("sparsities", args.sparsity),
                     ("blocks", args.blocks)):
        if val:
            grid[key] = val
    if args.cpu_time and args.threads != 1:
        print("sparse-engine bench: --cpu-time counts the calling thread only; use it with --threads 1")
        return 2
    clock = time.thread_time if args.cpu_time else time.perf_counter
    torch.set_num_threads(args.threads)
    machine = measure_machine(args.threads, clock=clock) if args.bound else None
    print(f"# sparse-engine bench: {args.threads} threads, fp32 x, kernels isa={cpu.isa_label()}, "
          f"torch {torch.__version__}, {'CPU' if args.cpu_time else 'wall'} time; median ms of dense "
          "F.linear, speedup = t(dense)/t(provider)")
    if machine:
        print(f"# measured: read bandwidth {machine['bandwidth'] / 1e9:.1f} GB/s, "
              f"sgemm peak {machine['peak'] / 1e9:.0f} GFLOP/s")
    header = None
    for shape in grid["shapes"]:
        for batch in grid["batches"]:
            for s in grid["sparsities"]:
                ps = providers(shape, s, batch, blocks=grid["blocks"], threads=args.threads,
                               onnx=not args.no_onnx, half=not args.no_half)
                # ONNX Runtime's own thread pool: idle before its slot and after it (see SPIN_IDLE_S).
                order = list(ps)
                idle = {k for k, nxt in zip(order, order[1:] + order[:1]) if ONNX in (k, nxt)}
                t = time_interleaved({k: v["fn"] for k, v in ps.items()}, min_time=args.min_time, clock=clock,
                                     idle_after=idle)
                names = [k for k in ps if k != "dense"]
                if header is None:
                    header = names
                    cols = ["shape O×I", "batch", "sparsity", "dense ms"] + [f"{n}" for n in names] + [
                        "best engine", "vs dense", "vs torch.sparse"]
                    print("| " + " | ".join(cols) + " |")
                    print("|" + "---|" * len(cols))
                engine_best = min((k for k in ps if k.startswith("engine") and not k.endswith(("bf16", "fp16"))),
                                  key=lambda k: t[k])
                ts_names = [k for k in ps if k.startswith("torch.sparse")]
                torch_best = min((t[k] for k in ts_names), default=float("nan"))
                row = [f"{shape[0]}x{shape[1]}", str(batch), f"{s:.2f}", _fmt_ms(t["dense"])]
                for n in header:
                    row.append(f"{t['dense'] / t[n]:.2f}x" if n in t else "-")
                row += [engine_best, f"{t['dense'] / t[engine_best]:.2f}x",
                        f"{torch_best / t[engine_best]:.2f}x" if ts_names else "-"]
                print("| " + " | ".join(row) + " |", flush=True)
                if machine:
                    b = {k: bound_seconds(ps[k], shape, batch, machine["bandwidth"], machine["peak"]) for k in ps}
                    print(f"|   bound (ms) | | | {_fmt_ms(b['dense'])} | "
                          + " | ".join(_fmt_ms(b[n]) if n in b else "-" for n in header) + " | | | |")
    print("# bsr speedups use a block-structured weight at the same sparsity; 'best engine' excludes "
          "16-bit variants (fp32 weights only)")
    if args.mlp:
        print("\n| whole model (784-4096-4096-10 MLP, ReLU) | batch | sparsity | dense ms | engine ms | speedup |")
        print("|---|---|---|---|---|---|")
        for s in (0.9, 0.95):
            ps = mlp_providers(s, 64)
            t = time_interleaved({k: v["fn"] for k, v in ps.items()}, min_time=max(1.0, args.min_time),
                                 clock=clock)
            print(f"| unstructured, engine csr | 64 | {s:.2f} | {_fmt_ms(t['dense'])} | "
                  f"{_fmt_ms(t['engine csr'])} | {t['dense'] / t['engine csr']:.2f}x |", flush=True)
    return 0


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="sparse-engine bench")
    configure(p)
    raise SystemExit(main(p.parse_args()))
