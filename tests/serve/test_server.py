"""The inference server end to end: real `sparse-engine serve` processes on free loopback ports,
real artifacts (a pruned MLP and a tiny BERT with a tokenizer, converted here), spoken to over HTTP.

Every answer is compared with `engine.load(artifact)` run in this process; every bad input gets a
4xx whose message names the problem, and the server keeps serving afterwards.
"""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

import engine
from engine.serve.batching import Batcher, QueueFull

ROOT = Path(__file__).resolve().parents[2]
TOKEN = "s3cret-token-for-tests"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Server processes import this checkout first, and keep whatever else the caller's path holds.
PYTHONPATH = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
WORDS = "the cat dog sat on a mat ran fast slow red blue big small house tree bird sky sun moon".split()
MLP_SIZES = [37, 61, 23, 11]  # odd widths: nothing lines up with a vector or block size by luck
MAX_SEQ = 24
STARTUP_S = 120  # generous: the machine is shared; this only detects a hang

pytestmark = pytest.mark.timeout(300)


# -- artifacts ---------------------------------------------------------------------------------

def _prune(sd: dict, sparsity: float, gen: torch.Generator) -> dict:
    for k, v in sd.items():
        if v.dim() == 2 and "embeddings" not in k:
            v[torch.rand(v.shape, generator=gen) < sparsity] = 0
    return sd


def _tiny_bert_folder(folder: Path, gen: torch.Generator, max_seq: int = MAX_SEQ, hidden: int = 32) -> None:
    from safetensors.torch import save_file
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from tokenizers.processors import TemplateProcessing

    from engine.models import bert

    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    config = {"model_type": "bert", "vocab_size": len(vocab) + 5, "hidden_size": hidden,
              "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 48,
              "hidden_act": "gelu", "max_position_embeddings": max_seq, "type_vocab_size": 2,
              "layer_norm_eps": 1e-12, "pad_token_id": 0}
    model = bert.build(config)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(config))
    save_file(_prune({k: v.contiguous() for k, v in model.state_dict().items()}, 0.6, gen),
              str(folder / "model.safetensors"))
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    (folder / "tokenizer.json").write_text(tok.to_str())


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    from engine.convert import convert
    from engine.examples import mlp

    tmp = tmp_path_factory.mktemp("server")
    gen = torch.Generator().manual_seed(6)
    net = mlp(MLP_SIZES)
    torch.save(_prune(net.state_dict(), 0.8, gen), tmp / "mlp.pt")
    convert(tmp / "mlp.pt", tmp / "mlp.spz", arch="mlp:relu", log=lambda *a, **k: None)
    _tiny_bert_folder(tmp / "bert_hf", gen)
    convert(tmp / "bert_hf", tmp / "bert.spz", arch="bert", log=lambda *a, **k: None)
    (tmp / "token").write_text(TOKEN + "\n")
    return tmp


@pytest.fixture(scope="module")
def local(artifacts):
    """The same artifacts loaded in this process: the answers the server must give."""
    return {"mlp": engine.load(artifacts / "mlp.spz"), "bert": engine.load(artifacts / "bert.spz")}


# -- a server process --------------------------------------------------------------------------

class Server:
    def __init__(self, args: list[str], launcher: str | None = None):
        # A launcher (python code) may wrap engine.load for fault injection; it ends by running the CLI.
        code = (launcher or "") + "\nimport sys\nfrom engine.cli import main\nsys.exit(main(sys.argv[1:]))"
        env = dict(os.environ, PYTHONPATH=PYTHONPATH)
        self.proc = subprocess.Popen([sys.executable, "-c", code, "serve", *args, "--port", "0"],
                                     cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True)
        self.lines: list[str] = []
        self._port = threading.Event()
        self.port = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self._port.wait(STARTUP_S) or self.port is None:  # None: the output ended first
            self.stop()
            raise RuntimeError("server did not report its port:\n" + "".join(self.lines))
        self.url = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + STARTUP_S
        while httpx.get(self.url + "/v2/health/ready").status_code != 200:
            assert self.proc.poll() is None, "server exited during warm-up:\n" + "".join(self.lines)
            assert time.monotonic() < deadline, "server never became ready"
            time.sleep(0.1)

    def _read(self):
        for line in self.proc.stdout:
            self.lines.append(line)
            m = re.search(r"serving .* on http://127\.0\.0\.1:(\d+)", line)
            if m and self.port is None:
                self.port = int(m.group(1))
                self._port.set()
        self._port.set()

    def stop(self, sig=signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise

    def log(self) -> str:
        return "".join(self.lines)


@pytest.fixture(scope="module")
def server(artifacts):
    srv = Server([str(artifacts / "mlp.spz"), str(artifacts / "bert.spz"), "--token-file",
                  str(artifacts / "token"), "--max-batch", "16", "--max-delay-ms", "20",
                  "--max-body-mb", "1", "--max-rows", "64"])
    client = httpx.Client(base_url=srv.url, headers=AUTH, timeout=60)
    yield srv, client
    client.close()
    assert srv.stop() == 0, srv.log()


def fp32(name, array):
    array = np.asarray(array, dtype=np.float32)
    return {"name": name, "shape": list(array.shape), "datatype": "FP32", "data": array.reshape(-1).tolist()}


def int64(name, array):
    array = np.asarray(array, dtype=np.int64)
    return {"name": name, "shape": list(array.shape), "datatype": "INT64", "data": array.reshape(-1).tolist()}


def output(body: dict, name: str) -> np.ndarray:
    out = {o["name"]: o for o in body["outputs"]}[name]
    assert out["datatype"] == "FP32"
    return np.asarray(out["data"], dtype=np.float32).reshape(out["shape"])


def mlp_and_bert_artifacts(tmp: Path, bert_folder: Path, seed: int) -> tuple[Path, Path]:
    """A pruned MLP (MLP_SIZES) and the given BERT folder converted into `tmp`: (mlp.spz, bert.spz)."""
    from engine.convert import convert
    from engine.examples import mlp
    torch.save(_prune(mlp(MLP_SIZES).state_dict(), 0.8, torch.Generator().manual_seed(seed)), tmp / "mlp.pt")
    convert(tmp / "mlp.pt", tmp / "mlp.spz", arch="mlp:relu", log=lambda *a, **k: None)
    convert(bert_folder, tmp / "bert.spz", log=lambda *a, **k: None)
    return tmp / "mlp.spz", tmp / "bert.spz"


def expected_mlp(local, x) -> np.ndarray:
    with torch.inference_mode():
        return local["mlp"](torch.from_numpy(np.asarray(x, dtype=np.float32))).numpy()


def close(a, b):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


# -- metadata and health -----------------------------------------------------------------------

def test_health_and_metadata(server):
    srv, client = server
    assert httpx.get(srv.url + "/v2/health/live").json() == {"live": True}  # probes need no token
    assert httpx.get(srv.url + "/v2/health/ready").json() == {"ready": True}
    assert client.get("/v2").json()["models"] == ["mlp", "bert"]
    meta = client.get("/v2/models/mlp").json()
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, MLP_SIZES[0]]}]
    assert meta["outputs"] == [{"name": "output", "datatype": "FP32", "shape": [-1, MLP_SIZES[-1]]}]
    bert = client.get("/v2/models/bert").json()
    assert [i["name"] for i in bert["inputs"]] == ["input_ids", "attention_mask", "text"]
    assert [o["name"] for o in bert["outputs"]] == ["last_hidden_state", "embedding"]
    assert client.get("/v2/models/bert/ready").json() == {"name": "bert", "ready": True}
    for path in ("/v2/models/nope", "/v2/models/nope/ready"):
        r = client.get(path)
        assert r.status_code == 404 and "unknown model 'nope'" in r.json()["error"]
    r = client.post("/v2/models/nope/infer", json={"inputs": []})
    assert r.status_code == 404 and "'mlp'" in r.json()["error"]
    r = client.get("/v2/models/mlp/infer")
    assert r.status_code == 405 and "method GET not allowed" in r.json()["error"]
    r = client.get("/v3/models")
    assert r.status_code == 404 and "no route /v3/models" in r.json()["error"]


# -- correct answers ---------------------------------------------------------------------------

def test_mlp_infer_matches_local_model(server, local):
    _, client = server
    x = np.random.default_rng(1).normal(size=(5, MLP_SIZES[0])).astype(np.float32)
    r = client.post("/v2/models/mlp/infer", json={"id": "req-7", "inputs": [fp32("input", x)]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["id"] == "req-7" and body["model_name"] == "mlp"
    close(output(body, "output"), expected_mlp(local, x))
    # Nested data (row-major) and FP16 on the wire are accepted; FP16 is rounded like the client sent it.
    nested = {"name": "input", "shape": list(x.shape), "datatype": "FP16", "data": x.tolist()}
    r = client.post("/v2/models/mlp/infer", json={"inputs": [nested], "outputs": [{"name": "output"}]})
    assert r.status_code == 200, r.text
    close(output(r.json(), "output"), expected_mlp(local, x.astype(np.float16).astype(np.float32)))


def test_concurrent_clients_each_get_their_own_rows(server, local):
    srv, client = server
    before = _batch_histogram(client, "mlp")
    rng = np.random.default_rng(2)
    # Distinct inputs with 1..4 rows each, so a row handed to the wrong request would be caught.
    requests = [rng.normal(size=(int(rng.integers(1, 5)), MLP_SIZES[0])).astype(np.float32) for _ in range(96)]

    def call(x):
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as c:
            return c.post("/v2/models/mlp/infer", json={"inputs": [fp32("input", x)]})

    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(call, requests))
    for x, r in zip(requests, responses):
        assert r.status_code == 200, r.text
        got = output(r.json(), "output")
        assert got.shape == (len(x), MLP_SIZES[-1])
        close(got, expected_mlp(local, x))
    after = _batch_histogram(client, "mlp")
    batches = after["count"] - before["count"]
    rows = after["sum"] - before["sum"]
    assert rows == sum(len(x) for x in requests)  # every row ran exactly once
    assert batches < len(requests), "no two requests were ever merged into one batch"


def test_bert_ids_with_different_lengths_batch_like_alone(server, local):
    srv, _ = server
    rng = np.random.default_rng(3)
    vocab = local["bert"].config["vocab_size"]
    cases = []
    for i in range(12):
        rows, length = int(rng.integers(1, 4)), int(rng.integers(2, MAX_SEQ + 1))
        ids = rng.integers(0, vocab, size=(rows, length))
        mask = np.ones_like(ids)
        if length > 2:
            mask[0, length - 1:] = 0  # the client's own padding stays as it sent it
        cases.append((ids, mask))

    def call(case):
        ids, mask = case
        with httpx.Client(base_url=srv.url, headers=AUTH, timeout=60) as c:
            return c.post("/v2/models/bert/infer", json={"inputs": [int64("input_ids", ids), int64("attention_mask", mask)]})

    with ThreadPoolExecutor(12) as pool:
        responses = list(pool.map(call, cases))
    for (ids, mask), r in zip(cases, responses):
        assert r.status_code == 200, r.text
        with torch.inference_mode():
            want = local["bert"](torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).numpy()
        got = output(r.json(), "last_hidden_state")
        assert got.shape == want.shape
        # Padding inside a shared batch is masked out; only summation order may differ.
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_bert_text_is_tokenized_by_the_server(server, local):
    _, client = server
    texts = ["the cat sat on a mat", "blue sky", "a big red house and a small tree by the sun"]
    text = {"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": texts}
    r = client.post("/v2/models/bert/infer", json={"inputs": [text]})
    assert r.status_code == 200, r.text
    assert [o["name"] for o in r.json()["outputs"]] == ["embedding"]
    close(output(r.json(), "embedding"), local["bert"].encode(texts).numpy())
    r = client.post("/v2/models/bert/infer", json={"inputs": [text], "outputs": [{"name": "last_hidden_state"}]})
    assert r.status_code == 200, r.text
    tok = local["bert"].tokenizer.encode_batch(texts)
    ids = torch.tensor([e.ids for e in tok])
    mask = torch.tensor([e.attention_mask for e in tok])
    with torch.inference_mode():
        want = local["bert"](ids, attention_mask=mask).numpy()
    np.testing.assert_allclose(output(r.json(), "last_hidden_state"), want, rtol=1e-4, atol=1e-4)


# -- bad input: 4xx naming the problem, and the server keeps serving -----------------------------

X = [0.25] * MLP_SIZES[0]


def _mlp_input(**override):
    item = {"name": "input", "shape": [1, MLP_SIZES[0]], "datatype": "FP32", "data": X}
    item.update(override)
    return {"inputs": [item]}


BAD_MLP = [
    ("malformed JSON", b'{"inputs": [', "malformed JSON"),
    ("not an object", b"[1, 2]", "JSON object"),
    ("not UTF-8", b"\xff\xfe{}", "malformed JSON"),
    ("no inputs", {"id": "x"}, "missing field 'inputs'"),
    ("inputs empty", {"inputs": []}, "non-empty list"),
    ("input not object", {"inputs": [7]}, "inputs[0] must be an object"),
    ("missing name", {"inputs": [{"shape": [1, 37], "datatype": "FP32", "data": X}]}, "missing field 'name'"),
    ("missing data", {"inputs": [{"name": "input", "shape": [1, 37], "datatype": "FP32"}]}, "missing field 'data'"),
    ("missing shape", {"inputs": [{"name": "input", "datatype": "FP32", "data": X}]}, "missing field 'shape'"),
    ("unknown input", _mlp_input(name="pixels"), "unknown input 'pixels'"),
    ("duplicate input", {"inputs": _mlp_input()["inputs"] * 2}, "given twice"),
    ("wrong datatype", _mlp_input(datatype="INT64"), "datatype 'INT64' not accepted"),
    ("bogus datatype", _mlp_input(datatype="FLOAT"), "datatype 'FLOAT' not accepted"),
    ("wrong width", _mlp_input(shape=[1, 36], data=X[:36]), "does not match the model's [-1, 37]"),
    ("wrong rank", _mlp_input(shape=[37]), "does not match"),
    ("negative dim", _mlp_input(shape=[-1, 37]), "non-negative integers"),
    ("length mismatch", _mlp_input(shape=[2, 37]), "holds 37 values but shape [2, 37] needs 74"),
    ("ragged", _mlp_input(data=[X, X[:3]], shape=[2, 37]), "not a regular array"),
    ("strings", _mlp_input(data=["0.5"] * 37), "needs numbers"),
    ("NaN", b'{"inputs":[{"name":"input","shape":[1,37],"datatype":"FP32","data":[NaN' + b",1" * 36 + b"]}]}",
     "NaN or infinite"),
    ("Infinity", b'{"inputs":[{"name":"input","shape":[1,37],"datatype":"FP32","data":[1' + b",1" * 35
     + b',-Infinity]}]}', "index 36 is NaN or infinite"),
    ("overflows fp32", _mlp_input(data=[1e39] + X[1:]), "exceeds the range of FP32"),
    ("empty batch", _mlp_input(shape=[0, 37], data=[]), "empty batch"),
    ("too many rows", _mlp_input(shape=[65, 37], data=X * 65), "at most 64"),
    ("unknown output", dict(_mlp_input(), outputs=[{"name": "logits"}]), "unknown output 'logits'"),
    ("bad id", dict(_mlp_input(), id=5), "'id' must be a string"),
]


@pytest.mark.parametrize("case", BAD_MLP, ids=[c[0] for c in BAD_MLP])
def test_bad_mlp_input_is_a_4xx_naming_the_problem(server, case):
    _, client = server
    _, body, message = case
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    r = client.post("/v2/models/mlp/infer", content=content, headers={"Content-Type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert message in r.json()["error"], r.json()
    assert r.status_code == (413 if case[0] == "too many rows" else 400)


def _bert(ids=None, mask=None, text=None, **extra):
    inputs = []
    if ids is not None:
        inputs.append({"name": "input_ids", "shape": list(np.shape(ids)), "datatype": "INT64",
                       "data": np.asarray(ids).reshape(-1).tolist()})
    if mask is not None:
        inputs.append({"name": "attention_mask", "shape": list(np.shape(mask)), "datatype": "INT64",
                       "data": np.asarray(mask).reshape(-1).tolist()})
    if text is not None:
        inputs.append({"name": "text", "shape": [len(text)], "datatype": "BYTES", "data": text})
    return dict({"inputs": inputs}, **extra)


BAD_BERT = [
    ("id beyond vocab", _bert([[2, 900, 3]]), "outside the vocabulary"),
    ("negative id", _bert([[2, -4, 3]]), "negative value"),
    ("float ids", {"inputs": [{"name": "input_ids", "shape": [1, 2], "datatype": "INT64", "data": [1.5, 2]}]},
     "needs integers"),
    ("mask not 0/1", _bert([[2, 5, 3]], [[1, 2, 1]]), "values must be 0 or 1"),
    ("mask shape", _bert([[2, 5, 3]], [[1, 1]]), "differs from 'input_ids' shape"),
    ("too long", _bert([[5] * (MAX_SEQ + 1)]), f"outside 1..{MAX_SEQ}"),
    ("only mask", _bert(mask=[[1, 1]]), "missing input 'input_ids'"),
    ("text with ids", _bert([[2, 3]], text=["the cat"]), "cannot be combined"),
    ("text not strings", {"inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": ["a", 3]}]},
     "list of strings"),
    ("text too long", _bert(text=[" ".join(["cat"] * (MAX_SEQ * 2))]), "longer than the model's"),
    ("embedding from ids", _bert([[2, 5, 3]], outputs=[{"name": "embedding"}]), "needs the 'text' input"),
    ("empty text batch", {"inputs": [{"name": "text", "shape": [0], "datatype": "BYTES", "data": []}]},
     "empty batch"),
]


@pytest.mark.parametrize("case", BAD_BERT, ids=[c[0] for c in BAD_BERT])
def test_bad_bert_input_is_a_4xx_naming_the_problem(server, case):
    _, client = server
    _, body, message = case
    r = client.post("/v2/models/bert/infer", json=body)
    assert r.status_code == 400, r.text
    assert message in r.json()["error"], r.json()


def test_oversized_body_is_413_and_server_keeps_serving(server, local):
    _, client = server
    big = b'{"inputs": [' + b" " * (1 << 20) + b"]}"  # just over the 1 MiB limit
    r = client.post("/v2/models/mlp/infer", content=big)
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]
    # Without Content-Length (chunked upload) the limit holds while streaming.
    r = client.post("/v2/models/mlp/infer", content=iter([big[:600_000], big[600_000:]]))
    assert r.status_code == 413 and "exceeds the limit" in r.json()["error"]
    x = np.full((1, MLP_SIZES[0]), 0.5, np.float32)
    r = client.post("/v2/models/mlp/infer", json={"inputs": [fp32("input", x)]})
    assert r.status_code == 200
    close(output(r.json(), "output"), expected_mlp(local, x))


def test_bearer_token_is_required(server):
    srv, _ = server
    body = _mlp_input()
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"}):
        for method, path in (("POST", "/v2/models/mlp/infer"), ("GET", "/v2/models/mlp"), ("GET", "/metrics")):
            r = httpx.request(method, srv.url + path, json=body if method == "POST" else None, headers=headers)
            assert r.status_code == 401, (headers, path, r.text)
            assert "bearer token" in r.json()["error"] and r.headers["www-authenticate"] == "Bearer"
    r = httpx.post(srv.url + "/v2/models/mlp/infer", json=body, headers=AUTH)
    assert r.status_code == 200


def test_metrics_count_requests_batches_and_queue(server):
    _, client = server
    before = _counter(client.get("/metrics").text)
    assert client.post("/v2/models/mlp/infer", json=_mlp_input()).status_code == 200
    assert client.post("/v2/models/mlp/infer", json=_mlp_input(shape=[2, 37])).status_code == 400
    assert httpx.get(client.base_url.join("/v2/models/mlp")).status_code == 401
    text = client.get("/metrics").text
    after = _counter(text)
    key = lambda status, endpoint="infer": ("sparse_engine_requests_total", endpoint, "mlp", status)
    assert after[key("200")] == before.get(key("200"), 0) + 1
    assert after[key("400")] == before.get(key("400"), 0) + 1
    assert after[key("401", "model")] == before.get(key("401", "model"), 0) + 1
    assert re.search(r'sparse_engine_queue_depth\{model="mlp"\} 0\.0', text)
    assert re.search(r'sparse_engine_request_latency_seconds_count\{model="mlp"\} [1-9]', text)
    assert _batch_histogram(client, "mlp")["count"] >= 1


def _counter(text: str) -> dict:
    out = {}
    for m in re.finditer(r'^(sparse_engine_requests_total)\{endpoint="(\w+)",model="(\w*)",status="(\d+)"\} ([\d.e+]+)$',
                         text, re.M):
        out[m.groups()[:4]] = float(m.group(5))
    return out


def _batch_histogram(client, model: str) -> dict:
    text = client.get("/metrics").text
    get = lambda what: float(re.search(rf'sparse_engine_batch_size_{what}\{{model="{model}"\}} ([\d.e+]+)', text).group(1))
    return {"count": get("count"), "sum": get("sum")}


# -- failures inside the model -----------------------------------------------------------------

# Wraps the loaded model: an input whose first value is 13 raises inside forward, 55 gets NaN back
# (a kernel gone wrong), 77 sleeps past the request timeout. Everything else runs the real artifact.
FAULTY = """
import time, engine, engine.runtime
real_load = engine.runtime.load
def faulty_load(path, device="cpu", **kw):
    model = real_load(path, device, **kw)
    forward = model.forward
    def wrapped(x):
        if (x[:, 0] == 13).any():
            raise RuntimeError("kernel exploded on purpose")
        if (x[:, 0] == 55).any():
            return forward(x) * float("nan")
        if (x[:, 0] == 77).any():
            time.sleep(5)
        return forward(x)
    model.forward = wrapped
    return model
engine.load = faulty_load
"""


def test_model_failure_is_500_and_isolated(artifacts, local):
    srv = Server([str(artifacts / "mlp.spz"), "--max-delay-ms", "50", "--timeout-s", "2.5"], launcher=FAULTY)
    try:
        rng = np.random.default_rng(4)
        good = [rng.normal(size=(2, MLP_SIZES[0])).astype(np.float32) for _ in range(6)]
        bad = np.full((1, MLP_SIZES[0]), 13.0, np.float32)

        def call(x):
            return httpx.post(srv.url + "/v2/models/mlp/infer", json={"inputs": [fp32("input", x)]}, timeout=60)

        with ThreadPoolExecutor(7) as pool:  # the bad request likely shares a batch with good ones
            responses = list(pool.map(call, [*good[:3], bad, *good[3:]]))
        r_bad = responses[3]
        assert r_bad.status_code == 500 and "kernel exploded on purpose" in r_bad.json()["error"]
        for x, r in zip(good, responses[:3] + responses[4:]):
            assert r.status_code == 200, r.text
            close(output(r.json(), "output"), expected_mlp(local, x))
        # A NaN coming out of the model is never returned as an answer.
        r = call(np.full((1, MLP_SIZES[0]), 55.0, np.float32))
        assert r.status_code == 500 and "NaN or Inf" in r.json()["error"]
        r = call(np.full((1, MLP_SIZES[0]), 77.0, np.float32))
        assert r.status_code == 504 and "timed out" in r.json()["error"]
        assert srv.proc.poll() is None
        # The slow batch still holds the model for a moment; then service resumes, answers correct.
        x, deadline = good[0], time.monotonic() + 60
        while (r := call(x)).status_code == 504 and time.monotonic() < deadline:
            pass
        assert r.status_code == 200, r.text
        close(output(r.json(), "output"), expected_mlp(local, x))
        assert "kernel exploded on purpose" in srv.log()  # logged with its traceback
    finally:
        code = srv.stop(signal.SIGINT)
    assert code == 0, srv.log()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (run on the GPU machine)")
def test_serves_on_cuda(artifacts, local):
    srv = Server([str(artifacts / "mlp.spz"), str(artifacts / "bert.spz"), "--device", "cuda"])
    try:
        rng = np.random.default_rng(8)
        x = rng.normal(size=(3, MLP_SIZES[0])).astype(np.float32)
        r = httpx.post(srv.url + "/v2/models/mlp/infer", json={"inputs": [fp32("input", x)]}, timeout=60)
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(output(r.json(), "output"), expected_mlp(local, x), rtol=1e-3, atol=1e-3)
        texts = ["the cat sat", "a big red house by the tree"]
        r = httpx.post(srv.url + "/v2/models/bert/infer", timeout=60, json={"inputs": [
            {"name": "text", "shape": [2], "datatype": "BYTES", "data": texts}]})
        assert r.status_code == 200, r.text
        np.testing.assert_allclose(output(r.json(), "embedding"), local["bert"].encode(texts).numpy(),
                                   rtol=1e-3, atol=1e-3)
    finally:
        code = srv.stop()
    assert code == 0, srv.log()


# -- graceful shutdown -------------------------------------------------------------------------

def test_sigterm_drains_queued_requests_and_exits_0(artifacts, local):
    # A 10-minute batching delay, and a request whose body never finishes arriving, keep requests
    # queued until the signal arrives; only the drain on SIGTERM can answer them within the
    # clients' 60 s timeout.
    srv = Server([str(artifacts / "mlp.spz"), "--max-delay-ms", "600000", "--max-batch", "1000",
                  "--timeout-s", "300"])
    rng = np.random.default_rng(5)
    inputs = [rng.normal(size=(1, MLP_SIZES[0])).astype(np.float32) for _ in range(8)]
    host, port = srv.url.removeprefix("http://").split(":")
    arriving = socket.create_connection((host, int(port)))
    arriving.sendall(b"POST /v2/models/mlp/infer HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                     b"content-length: 1000\r\n\r\n{\"inputs\": ")
    try:
        with ThreadPoolExecutor(len(inputs)) as pool:
            futures = [pool.submit(httpx.post, srv.url + "/v2/models/mlp/infer",
                                   json={"inputs": [fp32("input", x)]}, timeout=60) for x in inputs]
            deadline = time.monotonic() + 60
            while _queue_depth(srv) < len(inputs):
                assert time.monotonic() < deadline, "requests never reached the queue"
                assert not any(f.done() for f in futures), [f.result().text for f in futures if f.done()]
                time.sleep(0.05)
            srv.proc.send_signal(signal.SIGTERM)
            responses = [f.result() for f in futures]
        arriving.close()  # its client gives up; the server has nothing left to wait for
        for x, r in zip(inputs, responses):
            assert r.status_code == 200, r.text
            close(output(r.json(), "output"), expected_mlp(local, x))
        assert srv.proc.wait(timeout=60) == 0, srv.log()
        assert "received SIGTERM" in srv.log()
        with pytest.raises(httpx.ConnectError):  # no longer accepting
            httpx.get(srv.url + "/v2/health/live")
    finally:
        arriving.close()
        srv.stop()


def _queue_depth(srv) -> float:
    text = httpx.get(srv.url + "/metrics").text
    return float(re.search(r'sparse_engine_queue_depth\{model="mlp"\} ([\d.]+)', text).group(1))


def test_bad_artifact_fails_fast_with_a_clear_error(tmp_path):
    missing = tmp_path / "nope.spz"
    r = subprocess.run([sys.executable, "-m", "engine", "serve", str(missing), "--port", "0"], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=PYTHONPATH), capture_output=True, text=True, timeout=120)
    assert r.returncode == 1
    assert "sparse-engine serve:" in r.stderr and "nope.spz" in r.stderr


def test_model_that_cannot_warm_up_exits_1(artifacts):
    broken = ("import engine, engine.runtime\nreal = engine.runtime.load\n"
              "def load(path, device='cpu', **kw):\n    m = real(path, device, **kw)\n"
              "    def fail(x):\n        raise RuntimeError('no kernel for this CPU')\n"
              "    m.forward = fail\n    return m\nengine.load = load\n"
              "import sys\nfrom engine.cli import main\nsys.exit(main(sys.argv[1:]))")
    r = subprocess.run([sys.executable, "-c", broken, "serve", str(artifacts / "mlp.spz"), "--port", "0"],
                       cwd=ROOT, env=dict(os.environ, PYTHONPATH=PYTHONPATH), capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 1, r.stderr
    assert "warm-up failed" in r.stderr and "no kernel for this CPU" in r.stderr


# -- the batcher on its own ----------------------------------------------------------------------

def test_batcher_splits_exactly_and_respects_max_batch():
    seen = []

    def run(items):
        seen.append(sum(n for _, n in items))
        return [f"{tag}x{n}" for tag, n in items]

    async def main():
        b = Batcher(run, max_batch=8, max_delay_s=0.05)
        b.start()
        sizes = [3, 1, 4, 1, 5, 9, 2, 6]
        out = await asyncio.gather(*(b.submit((f"r{i}", n), n) for i, n in enumerate(sizes)))
        await b.close()
        return sizes, out

    sizes, out = asyncio.run(main())
    assert out == [f"r{i}x{n}" for i, n in enumerate(sizes)]
    assert sum(seen) == sum(sizes)
    assert all(s <= 8 or s == 9 for s in seen)  # only the 9-row request runs above max_batch, alone
    assert len(seen) < len(sizes)


def test_batcher_errors_timeouts_and_queue_limit():
    def run(items):
        if "boom" in items:
            raise ValueError("boom")
        return [i.upper() for i in items]

    async def main():
        b = Batcher(run, max_batch=4, max_delay_s=0.2, max_queue=2)
        b.start()
        with b.arriving():  # a request on its way holds the partial batch (up to max_delay)
            first = asyncio.ensure_future(b.submit("a", 1))
            await asyncio.sleep(0)
            gone = asyncio.ensure_future(asyncio.wait_for(b.submit("b", 1), 0.01))  # gives up while queued
            await asyncio.sleep(0.05)
            with pytest.raises(asyncio.TimeoutError):
                await gone
            ok = asyncio.ensure_future(b.submit("c", 1))
            await asyncio.sleep(0)
            with pytest.raises(QueueFull):
                await b.submit("d", 1)
            assert [await first, await ok] == ["A", "C"]
        with pytest.raises(ValueError, match="boom"):
            await b.submit("boom", 1)
        assert await b.submit("e", 1) == "E"  # the worker survived the failed batch
        await b.close()
        with pytest.raises(QueueFull, match="shutting down"):
            await b.submit("f", 1)

    asyncio.run(main())


def test_batcher_runs_a_partial_batch_at_once_when_nobody_is_arriving():
    async def main():
        b = Batcher(lambda items: items, max_batch=32, max_delay_s=600)
        b.start()
        assert await asyncio.wait_for(b.submit("a", 1), 10) == "a"  # not held for the 600 s
        await b.close()

    asyncio.run(main())


def test_batcher_holds_a_partial_batch_only_for_arriving_requests():
    seen = []

    def run(items):
        seen.append(list(items))
        return items

    async def main():
        b = Batcher(run, max_batch=32, max_delay_s=600)
        b.start()
        with b.arriving() as late:
            first = asyncio.ensure_future(b.submit("a", 1))
            await asyncio.sleep(0.05)
            assert not first.done()  # waiting for `late`
            second = asyncio.ensure_future(b.submit("b", 1, late))
            assert await asyncio.wait_for(asyncio.gather(first, second), 10) == ["a", "b"]
        assert seen == [["a", "b"]]  # one batch
        with b.arriving():  # a request that never reaches submit (client gone, bad body) ...
            held = asyncio.ensure_future(b.submit("c", 1))
            await asyncio.sleep(0.05)
            assert not held.done()
        assert await asyncio.wait_for(held, 10) == "c"  # ... releases the batch when it ends
        await b.close()

        short = Batcher(run, max_batch=32, max_delay_s=0.05)
        short.start()
        with short.arriving():  # max_delay still bounds the wait for one that never comes
            assert await asyncio.wait_for(short.submit("d", 1), 10) == "d"
        await short.close()

    asyncio.run(main())
