"""Load test of `sparse-engine serve` on loopback: dynamic batching off vs on.

    python bench/load_server.py [--artifact A.spz] [--clients 32] [--procs P] [--duration 10]
                                [--rows 1] [--max-batch 32] [--max-delay-ms 5] [--device cpu|cuda]
                                [--out bench/results/server.md]

For each mode it starts its own server on 127.0.0.1 (a free port), runs `--clients` concurrent
clients for `--duration` seconds (both bounded; the run stops by itself), and reports throughput,
p50/p99 latency and the mean batch size the server executed (from its /metrics). "off" is
--max-batch 1 --max-delay-ms 0: every request runs alone. Every answer is checked against the
artifact run in this process; the script fails if any request failed, was lost or came back wrong.

Without --artifact it builds one from the built-in example: the wide digits MLP (64-2048-1024-10),
90 % block-pruned (16x16 blocks, random weights: speed does not depend on training).
"""
from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import multiprocessing
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import this checkout's engine
MAX_CLIENTS, MAX_DURATION_S = 256, 120  # hard bounds, whatever the command line says


def build_example_artifact(folder: Path) -> Path:
    from engine.convert import convert
    from engine.examples import mlp_digits

    model = mlp_digits("wide", seed=0)
    gen = torch.Generator().manual_seed(0)
    sd = model.state_dict()
    for name, w in sd.items():
        if w.dim() == 2 and w.shape[0] % 16 == 0 and w.shape[1] % 16 == 0:
            keep = torch.rand(w.shape[0] // 16, w.shape[1] // 16, generator=gen) >= 0.9
            w.mul_(keep.repeat_interleave(16, 0).repeat_interleave(16, 1))
    torch.save(sd, folder / "digits_wide.pt")
    convert(folder / "digits_wide.pt", folder / "digits_wide.spz", arch="mlp:relu", log=lambda *a, **k: None)
    return folder / "digits_wide.spz"


class ServerProcess:
    def __init__(self, artifact: Path, extra: list[str], log_path: Path):
        cmd = [sys.executable, "-m", "engine", "serve", str(artifact), "--name", "model", "--host", "127.0.0.1",
               "--port", "0", *extra]
        self.log_path = log_path
        with open(log_path, "w") as log:  # a file, not a pipe: nobody has to keep draining it
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=dict(os.environ, PYTHONPATH=os.pathsep.join(
                p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)),
                                         stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        self.url = None
        while True:
            if self.url is None:
                m = re.search(r"serving .* on (http://127\.0\.0\.1:\d+)", log_path.read_text())
                self.url = m.group(1) if m else None
            if self.url and httpx.get(self.url + "/v2/health/ready").status_code == 200:
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                raise RuntimeError(f"server failed to start:\n{log_path.read_text()}")
            time.sleep(0.1)

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=60)


def metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([\d.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


class Answer:
    """An HTTP answer: status_code, headers (lower-case names), content."""

    def __init__(self, status_code: int, headers: dict[str, str], content: bytes):
        self.status_code, self.headers, self.content = status_code, headers, content

    @property
    def text(self) -> str:
        return self.content.decode("utf-8", "replace")


class Connection:
    """One keep-alive HTTP/1.1 connection that POSTs and reads answers (Content-Length or chunked).

    A load generator that shares the machine with the server under test should cost it little CPU:
    httpx's AsyncClient took 3.5-6.5 ms of CPU per request here (AMD EPYC, 2 vCPUs), more than the
    server itself (~1.5 ms), so the clients, not the servers, bounded throughput. This takes ~0.2 ms."""

    def __init__(self, url: str):
        host, _, port = url.removeprefix("http://").rstrip("/").partition(":")
        self.host, self.port = host, int(port or 80)
        self.reader = self.writer = None

    def request(self, path: str, body: bytes, headers: dict) -> bytes:
        """The bytes of one POST (build once, send many times)."""
        lines = [f"POST {path} HTTP/1.1", f"host: {self.host}:{self.port}", f"content-length: {len(body)}",
                 *(f"{k}: {v}" for k, v in headers.items())]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def send(self, raw: bytes) -> Answer:
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
            self.writer.get_extra_info("socket").setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.writer.write(raw)
            head = await self.reader.readuntil(b"\r\n\r\n")
            status_line, *lines = head[:-4].decode("latin-1").split("\r\n")
            status = int(status_line.split(" ", 2)[1])
            headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
            if "content-length" in headers:
                content = await self.reader.readexactly(int(headers["content-length"]))
            elif headers.get("transfer-encoding", "").lower() == "chunked":
                content = await self._chunked()
            else:
                raise httpx.RemoteProtocolError(f"answer with neither content-length nor chunked body: {head!r}")
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, IndexError) as exc:
            await self.close()
            raise httpx.RemoteProtocolError(f"{type(exc).__name__}: {exc}") from None
        if headers.get("connection", "").lower() == "close":
            await self.close()
        return Answer(status, headers, content)

    async def _chunked(self) -> bytes:
        parts = []
        while size := int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16):
            parts.append((await self.reader.readexactly(size + 2))[:-2])
        while await self.reader.readuntil(b"\r\n") != b"\r\n":  # trailers, then the blank line
            pass
        return b"".join(parts)

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.reader = self.writer = None


def decode_answer(r) -> np.ndarray:
    """The first output of a v2 answer (httpx.Response or Answer), JSON or binary (binary tensor data
    extension)."""
    n = r.headers.get("inference-header-content-length")
    header = json.loads(r.content[:int(n)] if n is not None else r.content)
    out = header["outputs"][0]
    if n is None:
        return np.asarray(out["data"], np.float32).reshape(out["shape"])
    size = out["parameters"]["binary_data_size"]
    return np.frombuffer(r.content[int(n):int(n) + size], np.float32).reshape(out["shape"])


async def run_load(url: str, path: str, requests: list[tuple[bytes, dict]], expected: list[np.ndarray], first: int,
                   clients: int, stride: int, duration: float):
    """`clients` concurrent clients (numbered first.., stepping through the requests, each (body,
    headers), by `stride`) POSTing to `path`, one keep-alive `Connection` each; every answer is
    checked against `expected`."""
    latencies, failures = [], []
    sent = ok = 0
    conns = [Connection(url) for _ in range(clients)]
    raw = [conns[0].request(path, body, headers) for body, headers in requests]

    async def post(conn: Connection, j: int) -> Answer | None:
        try:
            return await conn.send(raw[j])
        except httpx.HTTPError as exc:
            failures.append(f"{type(exc).__name__}: {exc}")

    # Every client opens its connection with one untimed request first: a percentile of a few
    # seconds' requests would otherwise be the cost of `clients` connection set-ups.
    warm = await asyncio.gather(*(post(conn, (first + k) % len(raw)) for k, conn in enumerate(conns)))
    failures += [f"warm-up: HTTP {w.status_code}: {w.text[:200]}" for w in warm if w is not None and w.status_code != 200]
    stop_at = time.monotonic() + duration

    async def worker(k: int):
        nonlocal sent, ok
        i = first + k
        while time.monotonic() < stop_at:
            j = i % len(raw)
            i += stride
            sent += 1
            t0 = time.perf_counter()
            r = await post(conns[k], j)
            if r is None:
                continue
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                failures.append(f"HTTP {r.status_code}: {r.text[:200]}")
                continue
            got = decode_answer(r)
            if got.shape != expected[j].shape or not np.allclose(got, expected[j], rtol=1e-4, atol=1e-4):
                failures.append(f"wrong answer for input {j}")
            else:
                ok += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(k) for k in range(clients)))
    elapsed = time.perf_counter() - started
    for conn in conns:
        await conn.close()
    return sent, ok, latencies, failures, elapsed


def _client_process(job) -> tuple:
    return asyncio.run(run_load(*job))


def drive(url: str, requests, expected, clients: int, procs: int, duration: float,
          path: str = "/v2/models/model/infer"):
    """Spread the clients over `procs` processes: one Python process alone cannot keep a server busy."""
    shares = [clients // procs + (p < clients % procs) for p in range(procs)]
    starts = [sum(shares[:p]) for p in range(procs)]
    jobs = [(url, path, requests, expected, start, share, clients, duration)
            for start, share in zip(starts, shares) if share]
    # fork: the children need only what is already in memory (bodies, expected answers), no torch.
    with multiprocessing.get_context("fork").Pool(len(jobs)) as pool:
        parts = pool.map(_client_process, jobs)
    return (sum(p[0] for p in parts), sum(p[1] for p in parts), [x for p in parts for x in p[2]],
            [x for p in parts for x in p[3]], max(p[4] for p in parts))


def run_mode(label: str, artifact: Path, server_args: list[str], bodies, expected, args, log_path) -> dict:
    server = ServerProcess(artifact, server_args, log_path)
    try:
        before = httpx.get(server.url + "/metrics").text
        sent, ok, latencies, failures, elapsed = drive(server.url, bodies, expected, args.clients, args.procs,
                                                       args.duration)
        after = httpx.get(server.url + "/metrics").text
    finally:
        code = server.stop()
    served = (metric(after, 'sparse_engine_requests_total{endpoint="infer",model="model",status="200"}')
              - metric(before, 'sparse_engine_requests_total{endpoint="infer",model="model",status="200"}'))
    batches = (metric(after, 'sparse_engine_batch_size_count{model="model"}')
               - metric(before, 'sparse_engine_batch_size_count{model="model"}'))
    rows = (metric(after, 'sparse_engine_batch_size_sum{model="model"}')
            - metric(before, 'sparse_engine_batch_size_sum{model="model"}'))
    lat = np.asarray(latencies) * 1000
    return {"mode": label, "server": " ".join(server_args), "sent": sent, "ok": ok, "failed": len(failures),
            "served": int(served), "exit": code, "elapsed": elapsed,
            "rps": len(latencies) / elapsed, "rows_per_s": len(latencies) * args.rows / elapsed,
            "p50": float(np.percentile(lat, 50)) if lat.size else float("nan"),
            "p99": float(np.percentile(lat, 99)) if lat.size else float("nan"),
            "mean_batch": rows / batches if batches else float("nan"), "failures": failures[:5]}


def machine() -> str:
    from engine.timing import cpu_model
    return (f"{cpu_model()}, {os.cpu_count()} logical CPUs visible, torch {torch.__version__} "
            f"({torch.get_num_threads()} intra-op threads), Python {platform.python_version()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--artifact", type=Path, help="artifact to serve (default: build the wide digits MLP)")
    parser.add_argument("--clients", type=int, default=32, help=f"concurrent clients (at most {MAX_CLIENTS})")
    parser.add_argument("--duration", type=float, default=10.0, help=f"seconds per mode (at most {MAX_DURATION_S})")
    parser.add_argument("--procs", type=int, default=max(1, min(8, (os.cpu_count() or 2) // 2)),
                        help="client processes the clients are spread over (default: half the CPUs, at most 8)")
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-delay-ms", type=float, default=5.0)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where the server runs the model")
    parser.add_argument("--out", type=Path, help="append the results table to this markdown file")
    args = parser.parse_args()
    if not 1 <= args.clients <= MAX_CLIENTS or not 0 < args.duration <= MAX_DURATION_S or args.rows < 1:
        parser.error(f"need 1 <= --clients <= {MAX_CLIENTS}, 0 < --duration <= {MAX_DURATION_S}, --rows >= 1")
    if not 1 <= args.procs <= args.clients:
        parser.error("need 1 <= --procs <= --clients")

    import engine
    with tempfile.TemporaryDirectory() as tmp:
        artifact = args.artifact or build_example_artifact(Path(tmp))
        model = engine.load(artifact)
        spec = model.spec["inputs"][0]
        if spec["datatype"] != "FP32" or len(spec["shape"]) != 2:
            parser.error("the load test drives models with one FP32 [-1, features] input (the MLP family)")
        rng = np.random.default_rng(0)
        inputs = [rng.random((args.rows, spec["shape"][1]), dtype=np.float32) for _ in range(256)]
        with torch.inference_mode():
            expected = [model(torch.from_numpy(x)).numpy() for x in inputs]
        bodies = [(json.dumps({"inputs": [{"name": spec["name"], "shape": list(x.shape), "datatype": "FP32",
                                           "data": x.reshape(-1).tolist()}]}).encode(),
                   {"Content-Type": "application/json"}) for x in inputs]
        device = ["--device", args.device]
        modes = [("off", ["--max-batch", "1", "--max-delay-ms", "0", *device]),
                 ("on", ["--max-batch", str(args.max_batch), "--max-delay-ms", f"{args.max_delay_ms:g}", *device])]
        results = [run_mode(label, artifact, extra, bodies, expected, args, Path(tmp) / f"server-{label}.log")
                   for label, extra in modes]

    table = ["| batching | server flags | requests ok | failed | throughput (req/s) | rows/s | p50 (ms) | "
             "p99 (ms) | mean batch (rows) |", "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        table.append(f"| {r['mode']} | `{r['server']}` | {r['ok']} | {r['failed']} | {r['rps']:.0f} | "
                     f"{r['rows_per_s']:.0f} | {r['p50']:.1f} | {r['p99']:.1f} | {r['mean_batch']:.2f} |")
    command = "python bench/load_server.py " + " ".join(sys.argv[1:])
    report = "\n".join([
        f"### {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
        "", f"- command: `{command.strip()}`",
        f"- model: {args.artifact or 'built-in wide digits MLP 64-2048-1024-10, 90 % block-sparse (16x16)'}, "
        f"{args.rows} row(s) per request; {args.clients} clients in {args.procs} processes, "
        f"{args.duration:g} s per mode, loopback",
        f"- machine: {machine()}; clients and server share it; server model on {args.device}"
        + (f" ({torch.cuda.get_device_name()})" if args.device == "cuda" else ""), "", *table, ""])
    print(report)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a") as f:
            f.write(report + "\n")

    problems = []
    for r in results:
        if r["failed"]:
            problems.append(f"{r['mode']}: {r['failed']} failed requests, e.g. {r['failures']}")
        if r["ok"] != r["sent"] or r["served"] != r["sent"]:
            problems.append(f"{r['mode']}: sent {r['sent']}, answered ok {r['ok']}, server counted {r['served']} "
                            f"(lost requests)")
        if r["exit"] != 0:
            problems.append(f"{r['mode']}: server exited {r['exit']} after SIGTERM")
    for p in problems:
        print("FAIL", p, file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
