"""`sparse-engine bench --peers` (also bench/peers.py): whole pruned models, this engine against its peers.

The issue-12 grid: a 784-4096-4096-10 MLP (ReLU; batch 1 and 64) and a BERT encoder (2 layers x 768,
12 heads, FFN 3072, GELU, post-LN, seq 128; batch 1 and 8), every linear layer pruned by L1
magnitude, unstructured, to 80 / 90 / 95 % (random weights: speed does not depend on training).
Each model is exported to ONNX once; on the same inputs, interleaved round by round, run

- dense torch fp32 (the baseline every speedup is against) and dense torch bf16 (`.to(bfloat16)`),
- ONNX Runtime on the ONNX file (fp32; it keeps the zeros),
- this engine: `engine.sparsify(model, batch=B)`, its own format choice,
- DeepSparse on the same ONNX file, when a DeepSparse interpreter is found (below).

DeepSparse 1.8.0 is its last real release and pins Python 3.11, numpy 1.26 and onnx 1.14.1, so it
lives in its own venv and runs in a child process (engine/peer_worker.py) that times its calls
itself; the parent waits idle meanwhile, so the two never share the cores. Install it with

    python3.11 -m venv ~/.venvs/deepsparse
    ~/.venvs/deepsparse/bin/pip install deepsparse==1.8.0 numpy==1.26.4 onnx==1.14.1

and pass `--deepsparse-python ~/.venvs/deepsparse/bin/python` (or set SPARSE_ENGINE_DEEPSPARSE_PYTHON).
ONNX export and ONNX Runtime need this project's `onnx` extra. Every provider's output is checked
against dense torch fp32 before it is timed. Writes a markdown table, the raw medians (JSON) and a
PNG (speedup vs sparsity, one line per engine, one panel per model and batch) to `-o` (default
bench/results/peers.*).
"""
from __future__ import annotations

import copy
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .timing import calls_timer, time_rounds

BERT_2X768 = dict(vocab_size=30522, hidden_size=768, num_hidden_layers=2, num_attention_heads=12,
                  intermediate_size=3072, hidden_act="gelu", max_position_embeddings=512, type_vocab_size=2,
                  layer_norm_eps=1e-12, pad_token_id=0)
SEQ = 128
GRID = {"mlp": (1, 64), "bert": (1, 8)}  # model -> batches
SPARSITIES = (0.8, 0.9, 0.95)
DS_ENV = "SPARSE_ENGINE_DEEPSPARSE_PYTHON"
DS_INSTALL = ("python3.11 -m venv ~/.venvs/deepsparse && ~/.venvs/deepsparse/bin/pip install "
              "deepsparse==1.8.0 numpy==1.26.4 onnx==1.14.1")


# ---- models -------------------------------------------------------------------------------------

def l1_prune_(model: nn.Module, sparsity: float, prefix: str = "encoder.") -> None:
    """Per linear layer under `prefix`: zero the `sparsity` share of weights with the smallest |w|."""
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, nn.Linear) and name.startswith(prefix):
                w = m.weight
                k = int(round(sparsity * w.numel()))
                w.view(-1)[w.abs().view(-1).argsort()[:k]] = 0


class IdsOnly(nn.Module):
    """The BERT encoder called with token ids only (no padding): one input for every peer."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids):
        return self.encoder(input_ids)


def pruned_mlp(sparsity: float, sizes=(784, 4096, 4096, 10), seed: int = 0) -> nn.Sequential:
    """The issue-7 whole-model case: an MLP (ReLU) with every layer magnitude-pruned, unstructured,
    to `sparsity` (random weights: the speed does not depend on training)."""
    g = torch.Generator().manual_seed(seed)
    layers: list = []
    for a, b in zip(sizes, sizes[1:]):
        lin = nn.Linear(a, b)
        with torch.no_grad():
            lin.weight.copy_(torch.randn(b, a, generator=g) / a ** 0.5)
            k = int(sparsity * lin.weight.numel())
            if k:
                thr = lin.weight.abs().flatten().kthvalue(k).values
                lin.weight.mul_(lin.weight.abs() > thr)
        layers += [lin, nn.ReLU()]
    return nn.Sequential(*layers[:-1]).eval()


def _bert(sparsity: float) -> nn.Module:
    from .models import bert
    torch.manual_seed(0)
    model = bert.build(BERT_2X768).eval()
    l1_prune_(model, sparsity)
    return IdsOnly(model).eval()


def _features(batch: int, g: torch.Generator) -> torch.Tensor:
    return torch.randn(batch, 784, generator=g)


def _token_ids(batch: int, g: torch.Generator) -> torch.Tensor:
    return torch.randint(1000, BERT_2X768["vocab_size"], (batch, SEQ), generator=g)


# name -> (pruned model at a sparsity, its input at a batch)
MODELS = {"mlp": (pruned_mlp, _features), "bert": (_bert, _token_ids)}


def _model(name: str):
    if name not in MODELS:
        raise ValueError(f"bench --peers: unknown model {name!r}; expected one of {sorted(MODELS)}")
    return MODELS[name]


def pruned_model(name: str, sparsity: float) -> nn.Module:
    return _model(name)[0](sparsity)


def example_input(name: str, batch: int) -> torch.Tensor:
    return _model(name)[1](batch, torch.Generator().manual_seed(batch))


def export_onnx(model: nn.Module, x: torch.Tensor, path: Path) -> None:
    """One ONNX file per model (batch axis dynamic); opset 14 (the first with attention exported), which
    DeepSparse 1.8 and ONNX Runtime both read."""
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on the encoder's input checks
        torch.onnx.export(model, (x,), str(path), input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, opset_version=14, dynamo=False)


# ---- peers --------------------------------------------------------------------------------------

def find_deepsparse(python: str | None) -> tuple[str | None, str]:
    """(interpreter, its deepsparse version) or (None, why not): --deepsparse-python, then $DS_ENV."""
    python = python or os.environ.get(DS_ENV)
    if not python:
        return None, f"not configured (--deepsparse-python or ${DS_ENV}; install: {DS_INSTALL})"
    try:
        r = subprocess.run([python, "-c", "import deepsparse; print(deepsparse.__version__)"],
                           capture_output=True, text=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"{python} cannot run ({e})"
    if r.returncode:
        return None, f"{python} cannot import deepsparse ({r.stderr.strip().splitlines()[-1:]})"
    return python, r.stdout.strip().splitlines()[-1]


class DeepSparse:
    """A DeepSparse child process (engine/peer_worker.py) holding one compiled model."""

    def __init__(self, python: str, threads: int):
        self.threads = threads
        self.proc = subprocess.Popen([python, str(Path(__file__).with_name("peer_worker.py"))],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def ask(self, **req):
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise RuntimeError(f"DeepSparse worker exited (code {self.proc.wait()}); its stderr says why")
        out = json.loads(line)
        if not out["ok"]:
            raise RuntimeError(f"DeepSparse worker: {out['error']}")
        return out

    def load(self, onnx_path: Path, x: np.ndarray) -> None:
        npz = onnx_path.with_name(f"{onnx_path.stem}-b{len(x)}.npz")
        np.savez(npz, in0=x)
        self.ask(op="load", onnx=str(onnx_path), inputs=str(npz), threads=self.threads)

    def run(self) -> np.ndarray:
        with np.load(self.ask(op="run")["outputs"]) as z:
            return z["arr_0"]

    def timed(self, n: int) -> float:
        return self.ask(op="time", n=n)["seconds"]

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(timeout=60)


def ort_session(path: Path, threads: int):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])


# ---- the grid -----------------------------------------------------------------------------------

def measure_cell(name: str, sparsity: float, batch: int, dense: nn.Module, onnx_path: Path, ds: DeepSparse | None,
                 threads: int, min_time: float) -> dict:
    """{provider: {"ms": median, "min_ms": minimum, "max_diff": vs dense fp32}} for one grid cell."""
    import engine
    x = example_input(name, batch)
    sparse = engine.sparsify(copy.deepcopy(dense), batch=batch)
    bf16 = copy.deepcopy(dense).to(torch.bfloat16)
    x16 = x.to(torch.bfloat16) if x.is_floating_point() else x
    sess = ort_session(onnx_path, threads)
    xn = x.numpy()
    fns = {"dense torch fp32": lambda: dense(x), "dense torch bf16": lambda: bf16(x16),
           "onnxruntime": lambda: sess.run(None, {"x": xn})[0], "engine": lambda: sparse(x)}
    with torch.inference_mode():
        ref = dense(x).numpy()
        outs = {k: np.asarray(torch.as_tensor(fn()).float()) for k, fn in fns.items()}
    timers = {k: calls_timer(fn) for k, fn in fns.items()}
    if ds is not None:
        ds.load(onnx_path, xn)
        outs["deepsparse"] = ds.run()
        timers["deepsparse"] = ds.timed
    diffs = {k: float(np.abs(o - ref).max()) if o.size else 0.0 for k, o in outs.items()}
    scale = float(np.abs(ref).max()) or 1.0
    for k, d in diffs.items():
        # Every fp32 provider must compute the same function; bf16 rounds (8 bits of mantissa).
        tol = 0.1 if k.endswith("bf16") else 1e-3
        if d > tol * scale:
            raise RuntimeError(f"{name} {sparsity:.0%} batch {batch}: {k} differs from dense torch by {d:.3g} "
                                 f"(|y| up to {scale:.3g})")
    with torch.inference_mode():
        # Four thread pools (torch's and the engine's OpenMP, ONNX Runtime's, DeepSparse's): each slot
        # starts on idle cores, not beside the previous provider's spinning workers.
        samples = time_rounds(timers, min_time, idle_after=set(timers))
    return {k: {"ms": statistics.median(v) * 1e3, "min_ms": min(v) * 1e3, "max_diff": diffs[k]}
            for k, v in samples.items()}


def run(models: list[str], sparsities: list[float], batches: dict[str, tuple[int, ...]], threads: int,
        min_time: float, ds_python: str | None, out: Path) -> int:
    from . import cpu
    from .timing import cpu_model
    torch.set_num_threads(threads)
    try:
        import onnxruntime
    except ImportError:
        print("sparse-engine bench --peers: needs onnx and onnxruntime (pip install 'sparse-engine[onnx]')")
        return 1
    python, ds_version = find_deepsparse(ds_python)
    machine = (f"{cpu_model()}, kernels isa={cpu.isa_label()}, {threads} threads, torch {torch.__version__}, "
               f"onnxruntime {onnxruntime.__version__}, DeepSparse {ds_version if python else '-'}")
    print(f"# {machine}")
    if python is None:
        print(f"# DeepSparse: {ds_version}; timing the other peers only")
    results = []
    ds = DeepSparse(python, threads) if python else None
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for name in models:
                for s in sparsities:
                    dense = pruned_model(name, s)
                    onnx_path = Path(tmp) / f"{name}-{round(s * 100)}.onnx"
                    export_onnx(dense, example_input(name, 1), onnx_path)
                    for b in batches[name]:
                        cell = measure_cell(name, s, b, dense, onnx_path, ds, threads, min_time)
                        results.append({"model": name, "sparsity": s, "batch": b, "providers": cell})
                        print(row(results[-1]), flush=True)
    finally:
        if ds is not None:
            ds.close()
    write(results, machine, out)
    return 0


def row(r: dict) -> str:
    p = r["providers"]
    base = p["dense torch fp32"]["ms"]
    cells = [f"{k} {base / v['ms']:.2f}x" for k, v in p.items() if k != "dense torch fp32"]
    return f"{r['model']} {r['sparsity']:.0%} batch {r['batch']}: dense {base:.2f} ms; " + ", ".join(cells)


def table(results: list[dict]) -> list[str]:
    names = list(results[0]["providers"])
    peers = [n for n in names if n != "dense torch fp32"]
    ds = "deepsparse" in names
    head = ["model", "sparsity", "batch", "dense fp32 ms"] + [f"{n} (x)" for n in peers] + (
        ["engine / DeepSparse"] if ds else [])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        p = r["providers"]
        base = p["dense torch fp32"]["ms"]
        cells = [r["model"], f"{r['sparsity']:.0%}", str(r["batch"]), f"{base:.2f}"]
        cells += [f"{base / p[n]['ms']:.2f}" for n in peers]
        if ds:
            cells.append(f"{p['deepsparse']['ms'] / p['engine']['ms']:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write(results: list[dict], machine: str, out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    date = datetime.date.today().isoformat()
    command = " ".join(["sparse-engine bench --peers", *(a for a in sys.argv[1:] if a not in ("bench", "--peers"))])
    lines = [f"# Whole-model speed against peers ({date})", "", f"{machine}.", "",
             f"Command: `{command}`. Speedup = median t(dense torch fp32) / median t(provider), interleaved "
             "rounds in one run; every layer L1-magnitude pruned, unstructured; MLP 784-4096-4096-10 (ReLU), "
             f"BERT 2 layers x 768 (12 heads, FFN 3072, GELU, post-LN), seq {SEQ}. 'engine / DeepSparse' "
             "> 1 means the engine is faster.", ""] + table(results)
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    out.with_suffix(".json").write_text(json.dumps({"machine": machine, "date": date, "results": results}, indent=1))
    plot(results, machine, out.with_suffix(".png"))
    print("\n".join(table(results)))
    print(f"# wrote {out.with_suffix('.md')}, .json, .png")


def plot(results: list[dict], machine: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    panels = sorted({(r["model"], r["batch"]) for r in results})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (model, batch) in zip(axes[0], panels):
        rs = sorted((r for r in results if (r["model"], r["batch"]) == (model, batch)), key=lambda r: r["sparsity"])
        for name in rs[0]["providers"]:
            ys = [r["providers"]["dense torch fp32"]["ms"] / r["providers"][name]["ms"] for r in rs]
            ax.plot([r["sparsity"] * 100 for r in rs], ys, marker="o", label=name)
        ax.set_title(f"{model}, batch {batch}")
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("speedup vs dense torch fp32")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.suptitle(machine, fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
