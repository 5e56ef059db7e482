"""Soak test of `sparse-engine serve`: one real server process on loopback, a mix of clients at once.

    python bench/soak_server.py [--duration 120] [--rss-growth-mb 100] [--json out.json]

Clients (threads of this process, each looping until the duration ends):
  valid      3 threads: MLP requests of 1..8 random rows; every answer checked against the artifact
             run in this process. A 503 (busy) is retried after its Retry-After, up to 20 times; a
             request that never gets its correct answer is "lost".
  malformed  bad JSON, wrong shapes, NaN, unknown inputs, JSON nested 5,000 deep: must be 400.
  oversized  a body over --max-body-mb: must be 413 (or the connection closed mid-upload).
  slow       raw sockets trickling request headers a byte at a time, and idle sockets that send
             nothing: the server must close each within --header-timeout-s (+ slack).
The server's RSS is sampled every 0.5 s. At the end the server gets SIGTERM and must exit 0.

Passes (exit 0) when: 0 wrong answers, 0 lost valid requests, every malformed/oversized request got
its 4xx, every slow or idle connection was closed in time, the server's RSS at the end exceeds its
RSS once ready by at most --rss-growth-mb, and the server exited 0. Bounded: --duration is capped at 600 s; everything is on 127.0.0.1.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import httpx
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: import this checkout's engine
MAX_DURATION_S = 600
SIZES = [37, 61, 23, 11]
HEADER_TIMEOUT_S = 2.0
SERVER_FLAGS = ["--max-body-mb", "1", "--header-timeout-s", str(HEADER_TIMEOUT_S), "--body-timeout-s", "2",
                "--max-connections", "64", "--max-buffered-mb", "32", "--max-rows", "64", "--max-batch", "16",
                "--max-delay-ms", "2"]


def build_artifact(folder: Path) -> Path:
    from engine.convert import convert
    from engine.examples import mlp

    gen = torch.Generator().manual_seed(0)
    sd = mlp(SIZES).state_dict()
    for v in sd.values():
        if v.dim() == 2:
            v[torch.rand(v.shape, generator=gen) < 0.8] = 0
    torch.save(sd, folder / "mlp.pt")
    convert(folder / "mlp.pt", folder / "mlp.spz", arch="mlp:relu", log=lambda *a, **k: None)
    return folder / "mlp.spz"


def start_server(artifact: Path) -> tuple[subprocess.Popen, str, list]:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p))
    proc = subprocess.Popen([sys.executable, "-m", "engine", "serve", str(artifact), "--port", "0",
                             *SERVER_FLAGS], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    port = threading.Event()
    found = {}

    def read():
        for line in proc.stdout:
            lines.append(line)
            m = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)", line)
            if m and not found:
                found["url"] = f"http://127.0.0.1:{m.group(1)}"
                port.set()
        port.set()

    threading.Thread(target=read, daemon=True).start()
    if not port.wait(120) or "url" not in found:
        raise SystemExit("soak: the server did not report its port:\n" + "".join(lines))
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(found["url"] + "/v2/health/ready", timeout=5).status_code == 200:
                return proc, found["url"], lines
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("soak: the server did not become ready:\n" + "".join(lines))
        time.sleep(0.1)


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


class Soak:
    def __init__(self, url: str, model, duration: float):
        self.url, self.model, self.stop_at = url, model, time.monotonic() + duration
        self.counts: Counter = Counter()
        self.failures: list[str] = []
        self.latencies: list[float] = []
        self.lock = threading.Lock()

    def running(self) -> bool:
        return time.monotonic() < self.stop_at

    def note(self, key: str, failure: str | None = None) -> None:
        with self.lock:
            self.counts[key] += 1
            if failure and len(self.failures) < 20:
                self.failures.append(failure)

    def valid(self, seed: int) -> None:
        rng = np.random.default_rng(seed)
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while self.running():
                x = rng.normal(size=(int(rng.integers(1, 9)), SIZES[0])).astype(np.float32)
                with torch.inference_mode():
                    want = self.model(torch.from_numpy(x)).numpy()
                body = {"inputs": [{"name": "input", "shape": list(x.shape), "datatype": "FP32",
                                    "data": x.reshape(-1).tolist()}]}
                start = time.perf_counter()
                for attempt in range(20):
                    try:
                        r = client.post("/v2/models/mlp/infer", json=body)
                    except httpx.HTTPError as exc:
                        r = exc
                    if not isinstance(r, Exception) and r.status_code == 503:
                        self.note("valid_503_retried")
                        time.sleep(float(r.headers.get("retry-after", "1")) * random.random())
                        continue
                    break
                if isinstance(r, Exception) or r.status_code != 200:
                    self.note("valid_lost", f"valid request lost: {r if isinstance(r, Exception) else r.text[:200]}")
                    continue
                out = r.json()["outputs"][0]
                got = np.asarray(out["data"], np.float32).reshape(out["shape"])
                if got.shape != want.shape or not np.allclose(got, want, rtol=1e-5, atol=1e-5):
                    self.note("valid_wrong", f"wrong answer for rows {len(x)}")
                    continue
                self.note("valid_ok")
                with self.lock:
                    self.latencies.append(time.perf_counter() - start)

    MALFORMED = [b'{"inputs": [', b"[1, 2]", b'{"inputs": []}',
                 b'{"inputs":[{"name":"input","shape":[1,37],"datatype":"FP32","data":[NaN' + b",1" * 36 + b"]}]}",
                 b'{"inputs":[{"name":"pixels","shape":[1,1],"datatype":"FP32","data":[1]}]}',
                 b'{"inputs":[{"name":"input","shape":[2,37],"datatype":"FP32","data":[1]}]}',
                 b'{"inputs":[{"name":"input","shape":[1,37],"datatype":"FP32","data":' + b"[" * 5000]

    def malformed(self, seed: int) -> None:
        rng = random.Random(seed)
        with httpx.Client(base_url=self.url, timeout=30) as client:
            while self.running():
                body = rng.choice(self.MALFORMED)
                try:
                    r = client.post("/v2/models/mlp/infer", content=body, headers={"Content-Type": "application/json"})
                    ok = r.status_code == 400 and "error" in r.json()
                    self.note("malformed_400" if ok else "malformed_unexpected",
                              None if ok else f"malformed body got {r.status_code}: {r.text[:200]}")
                except httpx.HTTPError as exc:
                    self.note("malformed_unexpected", f"malformed body: {exc!r}")
                time.sleep(0.02)

    def oversized(self, seed: int) -> None:
        body = b'{"inputs": [' + b" " * (1 << 20) + b"]}"
        while self.running():
            try:
                r = httpx.post(self.url + "/v2/models/mlp/infer", content=body, timeout=30)
                ok = r.status_code == 413
                self.note("oversized_413" if ok else "oversized_unexpected",
                          None if ok else f"oversized body got {r.status_code}")
            except (httpx.WriteError, httpx.RemoteProtocolError, httpx.ReadError):
                self.note("oversized_closed")  # refused mid-upload: also a refusal
            time.sleep(0.2)

    def slow(self, seed: int) -> None:
        rng = random.Random(seed)
        request = b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: soak\r\nX-Slow: " + b"z" * 200
        while self.running():
            trickle = rng.random() < 0.5
            try:
                sock = socket.create_connection(("127.0.0.1", int(self.url.rsplit(":", 1)[1])), timeout=10)
            except OSError as exc:
                self.note("slow_connect_failed", f"slow client could not connect: {exc!r}")
                continue
            start = time.monotonic()
            closed = False
            try:
                sock.settimeout(0.1)
                for byte in request if trickle else b"":
                    sock.sendall(bytes([byte]))
                    try:
                        if sock.recv(4096) == b"":
                            closed = True
                            break
                    except socket.timeout:
                        pass
                    if time.monotonic() - start > HEADER_TIMEOUT_S + 5:
                        break
                if not closed:
                    sock.settimeout(HEADER_TIMEOUT_S + 5 - (time.monotonic() - start))
                    closed = _read_to_eof(sock)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            except socket.timeout:
                closed = False
            finally:
                sock.close()
            elapsed = time.monotonic() - start
            kind = "slow_trickle" if trickle else "slow_idle"
            in_time = closed and elapsed <= HEADER_TIMEOUT_S + 2
            self.note(f"{kind}_closed" if in_time else f"{kind}_not_closed",
                      None if in_time else f"{kind} connection open {elapsed:.1f} s")


def _read_to_eof(sock) -> bool:
    while True:
        try:
            if sock.recv(4096) == b"":
                return True
        except ConnectionResetError:
            return True


def main(argv=None) -> int:
    from engine.timing import cpu_model
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--duration", type=float, default=120.0, help=f"seconds of load (max {MAX_DURATION_S})")
    ap.add_argument("--rss-growth-mb", type=float, default=100.0,
                    help="largest growth of the server's RSS from ready to the end that passes (default 100)")
    ap.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = ap.parse_args(argv)
    duration = min(max(args.duration, 1.0), MAX_DURATION_S)

    import engine
    with tempfile.TemporaryDirectory(prefix="soak-") as tmp:
        artifact = build_artifact(Path(tmp))
        model = engine.load(artifact)
        proc, url, lines = start_server(artifact)
        try:
            rss = [rss_mb(proc.pid)]
            soak = Soak(url, model, duration)
            roles = [soak.valid] * 3 + [soak.malformed, soak.oversized, soak.slow, soak.slow]
            threads = [threading.Thread(target=role, args=(i,), daemon=True) for i, role in enumerate(roles)]
            started = time.monotonic()
            for t in threads:
                t.start()
            while any(t.is_alive() for t in threads):
                rss.append(rss_mb(proc.pid))
                time.sleep(0.5)
                if time.monotonic() - started > duration + 60:
                    soak.note("client_hung", "a client thread did not finish 60 s after the end")
                    break
            elapsed = time.monotonic() - started
            rss.append(rss_mb(proc.pid))
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = "killed"

    c = soak.counts
    lat = sorted(soak.latencies) or [float("nan")]
    figures = {
        "duration_s": round(elapsed, 1), "counts": dict(sorted(c.items())),
        "valid_per_s": round(c["valid_ok"] / elapsed, 1),
        "valid_latency_ms": {"p50": round(lat[len(lat) // 2] * 1e3, 2), "p99": round(lat[int(len(lat) * 0.99)] * 1e3, 2)},
        "rss_mb": {"start": round(rss[0], 1), "peak": round(max(rss), 1), "end": round(rss[-1], 1),
                   "growth_bound": args.rss_growth_mb},
        "server_exit": code, "failures": soak.failures,
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(),
                    "torch_threads": torch.get_num_threads()},
    }
    bad = [k for k in ("valid_wrong", "valid_lost", "malformed_unexpected", "oversized_unexpected",
                       "slow_trickle_not_closed", "slow_idle_not_closed", "slow_connect_failed", "client_hung")
           if c[k]]
    if c["valid_ok"] == 0:
        bad.append("no valid request answered")
    if rss[-1] - rss[0] > args.rss_growth_mb:
        bad.append(f"server RSS grew {rss[-1] - rss[0]:.0f} MiB, above {args.rss_growth_mb:g}")
    if code != 0:
        bad.append(f"server exit {code}")
    figures["passed"], figures["problems"] = not bad, bad
    print(json.dumps(figures, indent=1))
    if args.json:
        args.json.write_text(json.dumps(figures, indent=1))
    if bad:
        print("soak: FAILED: " + "; ".join(bad), file=sys.stderr)
        print("".join(lines[-50:]), file=sys.stderr)
    return 0 if not bad else 1


if __name__ == "__main__":
    sys.exit(main())
