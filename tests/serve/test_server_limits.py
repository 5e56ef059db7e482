"""The server's aggregate bounds, against real `sparse-engine serve` processes: a large answer does not
stall other clients, slow and idle connections are closed, connections and buffered bytes are capped
(503 + Retry-After), deep JSON is a 400, versioned routes answer tritonclient, and a server given a
verify key refuses an unsigned artifact. Two server processes, shared by the tests of each part."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

import httpx
import numpy as np
import pytest
import torch

import engine
from tests.serve.test_server import (MLP_SIZES, PYTHONPATH, ROOT, Server, _prune, _tiny_bert_folder, fp32,
                                     int64, output)

pytestmark = pytest.mark.timeout(300)
LONG_SEQ, HIDDEN = 512, 32  # the issue's [64, 512] request: a ~1M-value answer from this tiny BERT
HEADER_TIMEOUT_S = 1.0
MAX_CONNECTIONS = 6


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) for line in fh if line.startswith("VmRSS:")) / 1024


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from engine.convert import convert
    from engine.examples import mlp

    tmp = tmp_path_factory.mktemp("limits")
    gen = torch.Generator().manual_seed(16)
    torch.save(_prune(mlp(MLP_SIZES).state_dict(), 0.8, gen), tmp / "mlp.pt")
    convert(tmp / "mlp.pt", tmp / "mlp.spz", arch="mlp:relu", log=lambda *a, **k: None)
    _overflowing_artifact(tmp / "overflow.spz", gen)
    _tiny_bert_folder(tmp / "bert_hf", gen, max_seq=LONG_SEQ, hidden=HIDDEN)
    convert(tmp / "bert_hf", tmp / "bert.spz", arch="bert", log=lambda *a, **k: None)
    return tmp


def _overflowing_artifact(path, gen) -> None:
    """One dense layer of weights +-1e37 (both signs in every row): finite for inputs of 1 (the
    warm-up's), NaN for inputs of 50 (each product overflows to +-inf, and inf - inf is NaN)."""
    from engine import artifact as artifact_io
    weight = torch.where(torch.rand(4, 8, generator=gen) < 0.5, -1e37, 1e37)
    weight[:, 0], weight[:, 1] = 1e37, -1e37
    artifact_io.write(path, {"0.weight": weight, "0.bias": torch.zeros(4)}, {
        "arch": {"family": "mlp", "config": {"sizes": [8, 4], "activation": "relu"}}, "tokenizer": None,
        "layers": {"0": {"format": "dense", "block": None, "dtype": "fp32", "shape": [4, 8]}}})


@pytest.fixture(scope="module")
def tight(artifacts):
    """An MLP server with small limits: 1 s to send headers or a body, 6 connections, 1 MiB buffered."""
    srv = Server([str(artifacts / "mlp.spz"), str(artifacts / "overflow.spz"), "--header-timeout-s", str(HEADER_TIMEOUT_S),
                  "--body-timeout-s", "1", "--max-connections", str(MAX_CONNECTIONS),
                  "--max-buffered-mb", "1", "--max-body-mb", "0.75"])
    yield srv
    assert srv.stop() == 0, srv.log()


def _connect(srv) -> socket.socket:
    return socket.create_connection(("127.0.0.1", srv.port), timeout=10)


def _closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the server closes `sock` (reads until EOF); fails past `seconds`."""
    start = time.monotonic()
    sock.settimeout(seconds)
    try:
        while sock.recv(4096):
            pass
    except ConnectionResetError:
        pass
    except socket.timeout:
        pytest.fail(f"connection still open after {seconds} s")
    return time.monotonic() - start


def test_idle_and_slow_header_connections_are_closed(tight):
    idle = _connect(tight)
    slow = _connect(tight)
    request = b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 40
    start = time.monotonic()
    try:
        for i, byte in enumerate(request):  # one byte every 50 ms: never a complete header
            slow.sendall(bytes([byte]))
            time.sleep(0.05)
            if time.monotonic() - start > 3 * HEADER_TIMEOUT_S:
                break
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed while trickling: what should happen
    assert time.monotonic() - start < 3 * HEADER_TIMEOUT_S + 1, "the slow client was never cut off"
    _closed_within(slow, 2 * HEADER_TIMEOUT_S)
    _closed_within(idle, 2 * HEADER_TIMEOUT_S)
    assert httpx.get(f"{tight.url}/v2/health/live").status_code == 200  # and the server still serves


def test_slow_body_gets_408(tight):
    sock = _connect(tight)
    sock.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: 500\r\n\r\n{\"inputs\": ")
    sock.settimeout(10)
    answer = b""
    while chunk := sock.recv(65536):
        answer += chunk
    assert answer.startswith(b"HTTP/1.1 408") and b"not received within 1 s" in answer, answer


def test_connection_cap_answers_503_then_recovers(tight):
    held = [_connect(tight) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.1)  # let the server register them
        extra = _connect(tight)
        extra.settimeout(5)
        answer = extra.recv(65536)
        assert answer.startswith(b"HTTP/1.1 503") and b"retry-after: 1" in answer.lower(), answer
        assert b"too many open connections" in answer
        extra.close()
    finally:
        for sock in held:
            sock.close()
    time.sleep(0.2)
    assert httpx.get(f"{tight.url}/v2/health/live").status_code == 200


def test_buffered_bytes_cap_answers_503_with_retry_after(tight):
    # One client declares a 700 kB body and sends it slowly; while it holds its bytes, another 400 kB
    # body would pass the 1 MiB of buffered bytes the server allows.
    holder = _connect(tight)
    holder.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nHost: x\r\nContent-Length: 700000\r\n\r\n{")
    time.sleep(0.1)
    body = b'{"inputs": [' + b" " * 400_000 + b"]}"
    r = httpx.post(f"{tight.url}/v2/models/mlp/infer", content=body)
    assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
    assert "--max-buffered-mb" in r.json()["error"]
    holder.close()
    time.sleep(1.2)  # the holder's request ends (client gone / body timeout): its bytes come back
    x = np.random.default_rng(3).normal(size=(2, MLP_SIZES[0])).astype(np.float32)
    r = httpx.post(f"{tight.url}/v2/models/mlp/infer", json={"inputs": [fp32("input", x)]})
    assert r.status_code == 200, r.text
    metrics = httpx.get(f"{tight.url}/metrics").text
    assert "sparse_engine_buffered_bytes 0.0" in metrics


def test_deeply_nested_json_is_a_400_logged_once(tight):
    seen = len(tight.log())
    for depth in (5000, 20000):
        body = b'{"inputs": [{"name": "input", "shape": [1, 37], "datatype": "FP32", "data": ' + b"[" * depth
        r = httpx.post(f"{tight.url}/v2/models/mlp/infer", content=body)
        assert r.status_code == 400 and "nested too deeply" in r.json()["error"], r.text
    log = tight.log()[seen:]
    assert log.count("nested too deeply") == 1 and "Traceback" not in log, log


def test_versioned_routes_with_tritonclient(tight, artifacts):
    tritonclient_http = pytest.importorskip("tritonclient.http", reason="tritonclient[http] (test extra) missing")
    client = tritonclient_http.InferenceServerClient(url=f"127.0.0.1:{tight.port}")
    try:
        meta = client.get_model_metadata("mlp", model_version="1")
        assert meta["name"] == "mlp" and meta["versions"] == ["1"]
        assert meta["inputs"][0]["shape"] == [-1, MLP_SIZES[0]]
        assert client.is_model_ready("mlp", model_version="1")
        assert not client.is_model_ready("mlp", model_version="2")
        x = np.random.default_rng(4).normal(size=(3, MLP_SIZES[0])).astype(np.float32)
        given = tritonclient_http.InferInput("input", list(x.shape), "FP32")
        given.set_data_from_numpy(x, binary_data=False)
        wanted = tritonclient_http.InferRequestedOutput("output", binary_data=False)
        result = client.infer("mlp", [given], model_version="1", outputs=[wanted])
        model = engine.load(artifacts / "mlp.spz")
        with torch.inference_mode():
            want = model(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(result.as_numpy("output"), want, rtol=1e-5, atol=1e-5)
    finally:
        client.close()
    r = httpx.get(f"{tight.url}/v2/models/mlp/versions/2")
    assert r.status_code == 404 and "no version '2'" in r.json()["error"]


def test_non_finite_output_is_a_500_that_says_so(tight, artifacts):
    model = engine.load(artifacts / "overflow.spz")
    x = np.full((1, 8), 50.0, np.float32)
    with torch.inference_mode():
        assert torch.isnan(model(torch.from_numpy(x))).any()  # the oracle: this input gives NaN
    r = httpx.post(f"{tight.url}/v2/models/overflow/infer", json={"inputs": [fp32("input", x)]})
    assert r.status_code == 500 and "NaN or Inf" in r.json()["error"], r.text
    ones = np.ones((2, 8), np.float32)
    r = httpx.post(f"{tight.url}/v2/models/overflow/infer", json={"inputs": [fp32("input", ones)]})
    assert r.status_code == 200, r.text
    with torch.inference_mode():
        np.testing.assert_allclose(output(r.json(), "output"), model(torch.from_numpy(ones)).numpy(), rtol=1e-6)


# -- large answers ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def large(artifacts):
    """A BERT server admitting the [64, 512] request (a ~20 MiB answer, predicted ~26 MiB) and
    refusing [96, 512] (predicted ~39 MiB) by --max-response-mb 32."""
    srv = Server([str(artifacts / "bert.spz"), "--name", "bert", "--max-rows", "128", "--max-response-mb", "32"])
    yield srv
    assert srv.stop() == 0, srv.log()


def _batches(srv) -> float:
    text = httpx.get(f"{srv.url}/metrics").text
    return float(next(line.split()[-1] for line in text.splitlines()
                      if line.startswith('sparse_engine_batch_size_count{model="bert"}')))


BIG_CLIENT = """
import sys, httpx
url, body, answer = sys.argv[1:]
r = httpx.post(url, content=open(body, "rb").read(), headers={"Content-Type": "application/json"}, timeout=120)
assert r.status_code == 200, r.text[:500]
open(answer, "wb").write(r.content)
"""


def test_large_answer_does_not_stall_health_probes(large, artifacts, tmp_path):
    tmp = tmp_path
    rng = np.random.default_rng(5)
    ids = rng.integers(4, 20, size=(64, LONG_SEQ))
    body = json.dumps({"inputs": [int64("input_ids", ids)]}).encode()
    assert len(body) < 200_000  # the issue's ~196 kB request
    (tmp / "big.json").write_bytes(body)
    with httpx.Client(base_url=large.url, timeout=10) as probe:
        idle = []
        for _ in range(30):
            t0 = time.perf_counter()
            probe.get("/v2/health/live")
            idle.append(time.perf_counter() - t0)
    if max(idle) > 0.05:
        pytest.skip(f"this machine is too loaded to time a 100 ms bound: an idle server's probe already "
                    f"took {max(idle) * 1000:.0f} ms")
    rss_before = _rss_mb(large.proc.pid)
    # The big request comes from another process, so reading its answer does not slow the probes'
    # client (one GIL) and the probes time the server alone.
    client = subprocess.Popen([sys.executable, "-c", BIG_CLIENT, f"{large.url}/v2/models/bert/infer",
                               str(tmp / "big.json"), str(tmp / "answer.json")])
    probes = []
    with httpx.Client(base_url=large.url, timeout=10) as probe:
        while client.poll() is None:
            t0 = time.perf_counter()
            assert probe.get("/v2/health/live").status_code == 200
            probes.append(time.perf_counter() - t0)
            time.sleep(0.01)
    assert client.wait() == 0
    rss_after = _rss_mb(large.proc.pid)
    got = output(json.loads((tmp / "answer.json").read_bytes()), "last_hidden_state")
    assert got.shape == (64, LONG_SEQ, HIDDEN)
    model = engine.load(artifacts / "bert.spz")
    with torch.inference_mode():
        want = model(torch.from_numpy(ids[:2])).numpy()
    np.testing.assert_allclose(got[:2], want, rtol=1e-4, atol=1e-4)
    print(f"[64, {LONG_SEQ}] request: {len(probes)} probes, max {max(probes) * 1000:.1f} ms, median "
          f"{sorted(probes)[len(probes) // 2] * 1000:.1f} ms; RSS {rss_before:.0f} -> {rss_after:.0f} MiB")
    assert len(probes) >= 5, "the request finished before the probes could measure anything"
    assert max(probes) < 0.1, f"a health probe waited {max(probes) * 1000:.0f} ms (probes: {len(probes)})"
    # The answer is ~20 MiB of JSON; the server grew ~4x the answer (Python floats and one
    # big string). What remains after it is answered must stay well under that.
    assert rss_after - rss_before < 150, f"RSS grew {rss_after - rss_before:.0f} MiB"


def test_answer_above_max_response_is_413_before_the_model_runs(large):
    before = _batches(large)
    ids = np.full((96, LONG_SEQ), 5)
    start = time.perf_counter()
    r = httpx.post(f"{large.url}/v2/models/bert/infer", json={"inputs": [int64("input_ids", ids)]}, timeout=60)
    assert r.status_code == 413, r.text
    assert "--max-response-mb" in r.json()["error"] and "MiB" in r.json()["error"]
    assert time.perf_counter() - start < 5
    assert _batches(large) == before  # refused before any batch ran


def test_server_with_verify_key_serves_signed_and_refuses_unsigned(artifacts):
    pytest.importorskip("cryptography", reason="signing needs the 'cryptography' package (serve extra)")
    from engine import artifact as artifact_io
    from engine.signing import keygen
    private, public = keygen(artifacts / "ops")
    r = subprocess.run([sys.executable, "-m", "engine", "serve", str(artifacts / "mlp.spz"), "--port", "0",
                        "--verify-key", str(public)], cwd=ROOT, env=dict(os.environ, PYTHONPATH=PYTHONPATH),
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "sparse-engine serve:" in r.stderr and "not signed" in r.stderr, r.stderr
    meta, tensors = artifact_io.read(artifacts / "mlp.spz")
    artifact_io.write(artifacts / "signed.spz", {k: v.clone() for k, v in tensors.items()}, meta, sign_key=private)
    srv = Server([str(artifacts / "signed.spz"), "--verify-key", str(public)])
    try:
        x = np.random.default_rng(6).normal(size=(2, MLP_SIZES[0])).astype(np.float32)
        r = httpx.post(f"{srv.url}/v2/models/signed/infer", json={"inputs": [fp32("input", x)]})
        assert r.status_code == 200, r.text
        model = engine.load(artifacts / "mlp.spz")
        with torch.inference_mode():
            np.testing.assert_allclose(output(r.json(), "output"), model(torch.from_numpy(x)).numpy(),
                                       rtol=1e-5, atol=1e-5)
    finally:
        assert srv.stop() == 0, srv.log()
