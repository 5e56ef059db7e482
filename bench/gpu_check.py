"""GPU check for the Triton sparse-linear kernels: correctness on fresh inputs, then a timing table.

For each (shape O×I, batch N, sparsity s, dtype) it
  1. checks the Triton kernels (through engine.gpu, the adapter engine.sparse_linear uses: BSR with
     the tuned parameters, and split-K at N <= 16; CSR) against an fp32 reference on fresh random
     inputs, into an output poisoned with NaN first (every element must be written);
  2. times, with triton.testing.do_bench medians after warm-up (L2 flushed between calls) and
     inputs and weights rotated among several copies: cuBLAS dense F.linear, our BSR kernel,
     torch.sparse's own BSR Triton kernel (bsr_dense_mm), our CSR kernel on unstructured sparsity,
     and 2:4 semi-structured F.linear where the card supports it;
  3. reports speedup over dense, the DESIGN §5 target, and achieved GB/s and TFLOP/s against
     ceilings measured at start (a large device copy, a large dense bf16 matmul).

    PYTHONPATH=. python3 bench/gpu_check.py --tune --out gpu.txt          # full grid on a GPU (~2 min on an H200)
    PYTHONPATH=. python3 bench/gpu_check.py --tune --timing graph         # GPU time alone (CUDA graphs)
    PYTHONPATH=. python3 bench/gpu_check.py --shapes 4096x4096 --batches 1,256 --sparsities 0.9
    TRITON_INTERPRET=1 PYTHONPATH=. python bench/gpu_check.py --tiny      # CPU, interpreter, end to end
"""
from __future__ import annotations

import argparse
import copy
import itertools
import math
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import engine  # noqa: E402
import engine.ops  # noqa: E402
from engine import gpu  # noqa: E402
from engine.formats import BSR, CSR  # noqa: E402
from kernels import tuning  # noqa: E402
from kernels.bsr_linear import bsr_linear_configs  # noqa: E402
from kernels.csr_linear import csr_linear_configs  # noqa: E402

DT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
REL_TOL = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float32: 1e-4}  # ‖y − ref‖ / ‖ref‖


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default="4096x4096,11008x4096,4096x11008", help="O×I list (out×in features)")
    ap.add_argument("--batches", default="1,16,256,4096")
    ap.add_argument("--sparsities", default="0.5,0.7,0.9,0.95")
    ap.add_argument("--dtypes", default="fp16,bf16")
    ap.add_argument("--block", default="64x64", help="BSR block R×C (R, C powers of two >= 16 for torch's kernel)")
    ap.add_argument("--formats", default="bsr,csr,torch_bsr,semi", help="which columns besides dense")
    ap.add_argument("--csr-sparsities", default="0.9", help="sparsities that also time the CSR kernel")
    ap.add_argument("--csr-max-batch", type=int, default=256, help="largest batch that times the CSR kernel")
    ap.add_argument("--tune", action="store_true", help="time each kernel config per batch class first")
    ap.add_argument("--max-configs", type=int, default=0, help="tune at most this many configs per class")
    ap.add_argument("--timing", choices=("eager", "graph"), default="eager",
                    help="eager (default, the mode bench/RESULTS.md used): do_bench, L2 flushed, launch "
                         "overhead included; graph: GPU time of CUDA-graph replays (not yet run on a GPU)")
    ap.add_argument("--warmup-ms", type=float, default=10.0)
    ap.add_argument("--rep-ms", type=float, default=40.0)
    ap.add_argument("--budget-s", type=float, default=0.0,
                    help="start no new cell once the script has run this many seconds")
    ap.add_argument("--out", default=None, help="write the full table here (rows appended as they finish)")
    ap.add_argument("--tiny", action="store_true", help="tiny grid that also runs under TRITON_INTERPRET=1")
    a = ap.parse_args(argv)
    if a.tiny:
        a.shapes, a.batches, a.sparsities, a.block = "64x96", "1,5", "0.75", "32x32"
        a.tune, a.max_configs = True, max(1, a.max_configs or 1)
    a.shapes = [tuple(int(v) for v in s.split("x")) for s in a.shapes.split(",")]
    a.batches = [int(v) for v in a.batches.split(",")]
    a.sparsities = [float(v) for v in a.sparsities.split(",")]
    a.csr_sparsities = [float(v) for v in a.csr_sparsities.split(",")] if not a.tiny else a.sparsities
    a.dtypes = [DT[d] for d in a.dtypes.split(",")]
    a.block = tuple(int(v) for v in a.block.split("x"))
    a.formats = set(a.formats.split(","))
    return a


# --- timing ---------------------------------------------------------------------------------------

class Timer:
    """Median time of one call in microseconds.

    CUDA, mode "graph": the rotating calls are captured in a CUDA graph and its replays
    timed with events, so the figure is GPU time alone (no Python launch gaps, which otherwise
    swamp 5-20 us kernels) while each call still reads weights and inputs that are not in L2.
    CUDA, mode "eager" (default): triton.testing.do_bench (L2 flushed before each call, launch overhead
    included: 5-20 us kernels then read high and noisy, by whether Python launched before the flush ended).
    CPU (interpreter): one wall-clock call after a warm-up; it proves the path, not the speed.
    """

    def __init__(self, cuda: bool, warmup_ms: float, rep_ms: float, mode: str = "eager"):
        self.cuda, self.warmup, self.rep, self.mode = cuda, warmup_ms, rep_ms, mode

    def __call__(self, fn, pool: int = 1) -> float:
        if not self.cuda:
            fn()
            t0 = time.perf_counter()
            fn()
            return 1e6 * (time.perf_counter() - t0)
        from triton.testing import do_bench
        if self.mode == "eager":
            return 1e3 * do_bench(fn, warmup=self.warmup, rep=self.rep, return_mode="median")
        try:
            return self._graph(fn, pool)
        except Exception as e:  # noqa: BLE001 - an op that cannot be captured is timed eagerly
            print(f"  (graph capture failed: {type(e).__name__}: {str(e)[:80]}; timing eagerly)", flush=True)
            torch.cuda.synchronize()
            return 1e3 * do_bench(fn, warmup=self.warmup, rep=self.rep, return_mode="median")

    def _graph(self, fn, pool: int) -> float:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(side):
            fn()  # compile, fill the launch path's caches, warm the allocator
            t0.record()
            fn()
            t1.record()
        torch.cuda.synchronize()
        est_us = max(1.0, 1e3 * t0.elapsed_time(t1))
        # one replay: the whole rotation (capped at ~50 ms for slow ops, where L2 cannot flatter anyway),
        # and at least ~rep/10 ms of work for fast ones
        calls = max(min(pool, 1 + int(50e3 / est_us)), min(2000, int(self.rep * 1e3 / 10 / est_us)))
        with torch.cuda.stream(side):
            for _ in range(min(calls, pool) - 2):
                fn()
        torch.cuda.synchronize()
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g, stream=side):
            for _ in range(calls):
                fn()
        g.replay()
        torch.cuda.synchronize()
        times = []
        for _ in range(7):
            t0.record()
            g.replay()
            t1.record()
            torch.cuda.synchronize()
            times.append(1e3 * t0.elapsed_time(t1) / calls)
        del g
        return statistics.median(times)


def pool_size(nbytes_each: int, cuda: bool) -> int:
    """Copies of an operand so that cycling through them streams from memory, not from L2."""
    return 1 if not cuda else max(2, min(128, math.ceil(3 * l2_bytes() / max(1, nbytes_each))))


def clone_weight(w):
    """A copy with its own buffers (copy.copy skips the O(nnz) validation of the constructor)."""
    c = copy.copy(w)
    c.crow_indices, c.col_indices, c.values = (t.clone() for t in (w.crow_indices, w.col_indices, w.values))
    return c


def cycling(fn, *pools):
    """fn(pool0[i], pool1[i], ...) with i advancing on every call (inputs rotate, caches do not flatter)."""
    k = itertools.count()

    def call():
        i = next(k)
        return fn(*(p[i % len(p)] for p in pools))
    return call


def l2_bytes() -> int:
    try:
        return int(torch.cuda.get_device_properties(0).L2_cache_size)
    except Exception:  # noqa: BLE001 - attribute name differs across torch versions
        return 64 << 20


def ceilings(dev, timer) -> tuple[float, float]:
    """(copy GB/s counting read + write, dense bf16 matmul TFLOP/s), measured on random data."""
    if dev.type != "cuda":
        return float("nan"), float("nan")
    src = torch.randn(1 << 29, device=dev, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    t = timer(lambda: dst.copy_(src), 1)
    gbs = 2 * src.numel() * 2 / (t * 1e-6) / 1e9
    del src, dst
    a = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    t = timer(lambda: a @ b, 1)
    return gbs, 2 * 8192 ** 3 / (t * 1e-6) / 1e12


# --- inputs ---------------------------------------------------------------------------------------

def block_mask(o, i, block, sparsity, gen, dev):
    r, c = block
    nb = (o // r) * (i // c)
    keep = torch.zeros(nb, dtype=torch.bool)
    keep[torch.randperm(nb, generator=gen)[: round((1 - sparsity) * nb)]] = True
    keep = keep.reshape(o // r, i // c).repeat_interleave(r, 0).repeat_interleave(c, 1)
    return keep.to(dev)


def x_el(dtype) -> int:
    return torch.tensor([], dtype=dtype).element_size()


def bytes_bsr(w: BSR, n, dtype) -> int:
    o, i = w.shape
    el = torch.tensor([], dtype=dtype).element_size()
    return w.nbytes + n * (i + o) * el


# --- tuning ---------------------------------------------------------------------------------------

def tune(args, dev, timer, log):
    """Per batch class: time each candidate config on a representative cell, keep the best."""
    name = tuning.device_name(torch.empty(0, device=dev))
    o, i = args.shapes[0]
    dtype = args.dtypes[0]
    gen = torch.Generator().manual_seed(0)
    s = 0.9 if 0.9 in args.sparsities else args.sparsities[0]
    wd = (torch.randn(o, i, generator=gen) * 0.05).to(dev, dtype)
    bsr = BSR.from_dense(wd, block_mask(o, i, args.block, s, gen, dev), args.block)
    csr = CSR.from_dense(wd * (torch.rand(o, i, generator=gen) >= s).to(dev))
    classes = {}
    for n in args.batches:
        classes.setdefault(tuning.shape_class(n), n)
    for op, w, launch, configs in (("bsr_linear", bsr, gpu.bsr_linear_triton, bsr_linear_configs),
                                   ("csr_linear", csr, gpu.csr_linear_triton, csr_linear_configs)):
        if op.split("_")[0] not in args.formats:
            continue
        for cls, n in classes.items():
            if op == "csr_linear" and n > args.csr_max_batch:
                continue
            npool = pool_size(w.nbytes + n * i * x_el(dtype), dev.type == "cuda")
            ws = [w] + [clone_weight(w) for _ in range(npool - 1)]
            xp = [torch.randn(n, i, generator=gen).to(dev, dtype) for _ in range(npool)]
            cands = configs(cls)[: args.max_configs or None]
            best = None
            for p in cands:
                t0 = time.time()
                try:
                    t = timer(cycling(lambda x_, w_: launch(x_, w_, None, "none", params=p), xp, ws), npool)
                except Exception as e:  # noqa: BLE001 - a config the compiler refuses is skipped
                    log(f"  tune {op} {cls} {p}: failed {type(e).__name__}: {str(e)[:120]}")
                    continue
                log(f"  tune {op} {cls} n={n} {p}: {t:9.1f} us  ({time.time() - t0:.1f} s incl. compile)")
                if best is None or t < best[0]:
                    best = (t, p)
            if best:
                key = (op, name, cls, tuning.block_key(getattr(w, "blocksize", None)), tuning.dtype_key(dtype))
                tuning.TUNED[key] = dict(best[1])
                log(f"TUNED[{key!r}] = {best[1]!r}")


# --- the grid -------------------------------------------------------------------------------------

HEADER = ("shape       N    s    dtype  dense_us  bsr_us  S_bsr  target  torchbsr_us  vs_torch  "
          "csr_us  S_csr  semi24_us  bsr_GB/s  %copy  bsr_TF/s  %mm   err     ok")


def fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) and not math.isnan(v) else "n/a".rjust(
        int("".join(ch for ch in spec.split(".")[0] if ch.isdigit()) or 0))


def run_grid(args, dev, timer, ceil, log, row_out, t_start):
    gen = torch.Generator().manual_seed(1234)
    cuda = dev.type == "cuda"
    failures, rows = 0, []
    for dtype, (o, i) in itertools.product(args.dtypes, args.shapes):
        el = torch.tensor([], dtype=dtype).element_size()
        w_full = [(torch.randn(o, i, generator=gen) * 0.05).to(dev, dtype) for _ in range(2 if cuda else 1)]
        semi_ws = semi_weights(w_full, dtype, args) if "semi" in args.formats else None
        for n in args.batches:
            xs = [torch.randn(n, i, generator=gen).to(dev, dtype) for _ in range(pool_size(n * i * el, cuda))]
            nd = pool_size(o * i * el, cuda)
            dense_ws = w_full + [w_full[j % len(w_full)].clone() for j in range(len(w_full), nd)]
            t_dense = timer(cycling(F.linear, xs, dense_ws), max(len(xs), nd))
            del dense_ws
            t_semi = float("nan")
            if semi_ws:
                try:
                    t_semi = timer(cycling(F.linear, xs, semi_ws), max(len(xs), len(semi_ws)))
                except Exception as e:  # noqa: BLE001
                    log(f"  2:4 F.linear failed at N={n}: {type(e).__name__}: {str(e)[:100]}")
            for s in args.sparsities:
                if args.budget_s and time.time() - t_start > args.budget_s:
                    log(f"budget of {args.budget_s:.0f} s spent: stopping before {o}x{i} N={n} s={s}")
                    return rows, failures
                row, bad = one_cell(args, dev, timer, ceil, gen, o, i, n, s, dtype, xs, w_full,
                                    t_dense, t_semi, log)
                failures += bad
                rows.append(row)
                row_out(row)
    return rows, failures


def semi_weights(w_full, dtype, args):
    if w_full[0].device.type != "cuda" or dtype == torch.float32:
        return None
    try:
        from torch.sparse import to_sparse_semi_structured
        m = torch.tensor([1, 1, 0, 0], dtype=w_full[0].dtype, device=w_full[0].device)
        m = m.repeat(w_full[0].shape[0], w_full[0].shape[1] // 4)
        n = pool_size(w_full[0].numel() * w_full[0].element_size() // 2, True)
        return [to_sparse_semi_structured(w_full[j % len(w_full)] * m) for j in range(n)]
    except Exception as e:  # noqa: BLE001 - not every card / build has 2:4 kernels
        print(f"  2:4 semi-structured unavailable: {type(e).__name__}: {str(e)[:100]}", flush=True)
        return None


def one_cell(args, dev, timer, ceil, gen, o, i, n, s, dtype, xs, w_full, t_dense, t_semi, log):
    cuda = dev.type == "cuda"
    block = args.block
    bsrs = [BSR.from_dense(w, block_mask(o, i, block, s, gen, dev), block) for w in w_full]
    bsr_bytes = bytes_bsr(bsrs[0], n, dtype)
    nnz = bsrs[0].nnz
    nw = pool_size(bsrs[0].nbytes, cuda)
    bsrs += [clone_weight(bsrs[j % 2]) for j in range(len(bsrs), nw)]
    # correctness first: fresh input, NaN-poisoned output, fp32 reference on the same operands
    x = torch.randn(n, i, generator=gen).to(dev, dtype)
    bias = torch.randn(o, generator=gen).to(dev, dtype)
    y = torch.full((n, o), float("nan"), dtype=dtype, device=dev)
    gpu.bsr_linear_triton(x, bsrs[0], bias, "gelu", out=y)
    ref = F.gelu(F.linear(x.float(), bsrs[0].to_dense(torch.float32), bias.float()))
    err = ((y.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item() if y.numel() else 0.0
    ok = bool(torch.isfinite(y).all()) and err <= REL_TOL[dtype]
    if n <= 16:  # split-K on top of the tuned parameters (whatever the table picks for speed)
        ys = torch.full((n, o), float("nan"), dtype=dtype, device=dev)
        p = tuning.launch_params("bsr_linear", tuning.device_name(x), tuning.shape_class(n),
                                 tuning.block_key(block), tuning.dtype_key(dtype))
        gpu.bsr_linear_triton(x, bsrs[0], bias, "gelu", params={**p, "SPLIT_K": 3}, out=ys)
        errs = ((ys.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item() if ys.numel() else 0.0
        if not (bool(torch.isfinite(ys).all()) and errs <= REL_TOL[dtype]):
            log(f"  SPLIT-K MISMATCH {o}x{i} N={n} s={s} {dtype}: rel err {errs:.2e}")
            ok = False
        err = max(err, errs)
    before = engine.ops.calls[("triton", "bsr")]
    y2 = engine.sparse_linear(x, bsrs[0], bias, activation="gelu", backend="triton")
    ok = ok and engine.ops.calls[("triton", "bsr")] == before + 1 and torch.equal(y2, y)

    t_bsr = timer(cycling(gpu.bsr_linear_triton, xs, bsrs), max(len(xs), len(bsrs)))

    t_torch = float("nan")
    if "torch_bsr" in args.formats:
        t_torch = time_torch_bsr(dev, timer, w_full, bsrs, xs, n, block, log)

    t_csr = float("nan")
    if "csr" in args.formats and s in args.csr_sparsities and n <= args.csr_max_batch:
        csrs = [CSR.from_dense(w * (torch.rand(o, i, generator=gen) >= s).to(dev)) for w in w_full]
        xc = torch.randn(n, i, generator=gen).to(dev, dtype)
        yc = torch.full((n, o), float("nan"), dtype=dtype, device=dev)
        gpu.csr_linear_triton(xc, csrs[0], None, "relu", out=yc)
        refc = F.relu(F.linear(xc.float(), csrs[0].to_dense(torch.float32)))
        errc = ((yc.float() - refc).norm() / refc.norm().clamp_min(1e-30)).item()
        okc = bool(torch.isfinite(yc).all()) and errc <= REL_TOL[dtype]
        if not okc:
            log(f"  CSR MISMATCH {o}x{i} N={n} s={s} {dtype}: rel err {errc:.2e}")
        ok, err = ok and okc, max(err, errc)
        csrs += [clone_weight(csrs[j % 2]) for j in range(len(csrs), pool_size(csrs[0].nbytes, cuda))]
        t_csr = timer(cycling(gpu.csr_linear_triton, xs, csrs), max(len(xs), len(csrs)))
        del csrs

    gbs = bsr_bytes / (t_bsr * 1e-6) / 1e9
    tfs = 2 * n * nnz / (t_bsr * 1e-6) / 1e12
    target = (0.7 if n <= 16 else 0.5 if n >= 256 else float("nan")) / (1 - s)
    row = dict(shape=f"{o}x{i}", n=n, s=s, dtype=str(dtype).replace("torch.", ""), dense=t_dense, bsr=t_bsr,
               S=t_dense / t_bsr, target=target, torch_bsr=t_torch, vs_torch=t_torch / t_bsr, csr=t_csr,
               S_csr=t_dense / t_csr, semi=t_semi, gbs=gbs, pct_copy=100 * gbs / ceil[0], tfs=tfs,
               pct_mm=100 * tfs / ceil[1], err=err, ok=ok)
    return row, (0 if ok else 1)


def time_torch_bsr(dev, timer, w_full, bsrs, xs, n, block, log):
    """torch.sparse's BSR kernel: bsr_dense_mm(W_bsr, xᵀ) on CUDA (N padded to its multiple of 16)."""
    try:
        tb = [torch.sparse_bsr_tensor(b.crow_indices, b.col_indices, b.values, size=b.shape) for b in bsrs]
        if dev.type == "cuda":
            from torch.sparse._triton_ops import bsr_dense_mm
            npad = max(16, -(-n // 16) * 16)
            xts = [F.pad(x, (0, 0, 0, npad - n)).t().contiguous() for x in xs]
            fn = bsr_dense_mm
        else:
            xts, fn = [x.t().contiguous() for x in xs], torch.sparse.mm
        fn(tb[0], xts[0])
        return timer(cycling(fn, tb, xts), max(len(tb), len(xts)))
    except Exception as e:  # noqa: BLE001 - e.g. dtypes torch's CPU BSR matmul lacks
        log(f"  torch.sparse BSR failed at N={n}: {type(e).__name__}: {str(e)[:100]}")
        return float("nan")


def format_row(r) -> str:
    return (f"{r['shape']:<11} {r['n']:>4} {r['s']:>4.2f} {r['dtype']:<6} {fmt(r['dense'], '8.1f')} "
            f"{fmt(r['bsr'], '7.1f')} {fmt(r['S'], '6.2f')} {fmt(r['target'], '6.2f')}  "
            f"{fmt(r['torch_bsr'], '11.1f')} {fmt(r['vs_torch'], '8.2f')}  {fmt(r['csr'], '6.1f')} "
            f"{fmt(r['S_csr'], '6.2f')} {fmt(r['semi'], '9.1f')}  {fmt(r['gbs'], '8.0f')} "
            f"{fmt(r['pct_copy'], '5.0f')}  {fmt(r['tfs'], '8.1f')} {fmt(r['pct_mm'], '4.0f')}  "
            f"{r['err']:.1e} {'ok' if r['ok'] else 'FAIL'}")


def main(argv=None) -> int:
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message="Sparse BSR tensor support is in beta")
    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1":
        print("gpu_check: no CUDA device; set TRITON_INTERPRET=1 (with --tiny) to run on CPU", file=sys.stderr)
        return 2
    dev = torch.device("cuda" if cuda else "cpu")
    out = open(args.out, "w") if args.out else None

    def log(line):
        print(line, flush=True)
        if out:
            out.write(line + "\n")
            out.flush()

    timer = Timer(cuda, args.warmup_ms, args.rep_ms, args.timing)
    name = tuning.device_name(torch.empty(0, device=dev))
    import triton
    log(f"# gpu_check  device: {name}  torch {torch.__version__}  triton {triton.__version__}  "
        f"date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    log(f"# command: {' '.join(sys.argv)}")
    log(f"# block {args.block[0]}x{args.block[1]}; times in us: medians of "
        + ("CUDA-graph replays (GPU time; weights and inputs rotated past L2)" if args.timing == "graph"
           else "do_bench (L2 flushed, launch overhead included)") + "; S = dense / ours")
    t0 = time.time()
    ceil = ceilings(dev, timer)
    log(f"# ceilings: device copy {ceil[0]:.0f} GB/s (read + write), dense bf16 matmul {ceil[1]:.0f} TFLOP/s")
    if args.tune:
        tune(args, dev, timer, log)
        log(f"# tuning took {time.time() - t0:.0f} s")
    log(HEADER)
    rows, failures = run_grid(args, dev, timer, ceil, log, lambda r: log(format_row(r)), t0)
    if out:
        out.close()
    # the short table last: the reply of a remote run carries only the end of the output
    print("\nsummary (S = speedup over dense; target per DESIGN §5 at batch <= 16 / >= 256):", flush=True)
    print(HEADER)
    for r in rows:
        if r["s"] == 0.9 or len(rows) <= 16:
            print(format_row(r))
    verdict = "all" if failures == 0 else f"{failures} FAILED of"
    print(f"correctness: {verdict} {len(rows)} cells checked against the fp32 reference "
          f"({time.time() - t0:.0f} s)", flush=True)
    return 0 if failures == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
