"""Open Inference Protocol (KServe v2) REST bodies: parse and validate an infer request against a
model's `spec`, and build the metadata and infer responses.

Everything the wire format lets a client get wrong (names, shapes, datatypes, values, sizes) is
checked here, once, and raised as `RequestError` with the HTTP status and a message that names the
input and the problem. What the inputs mean to the model (which are required, how they relate) is
the model family's, checked next by the runner. A model `spec` is `{"name", "family", "inputs":
[{"name", "datatype", "shape"}], "outputs": [...]}` with -1 for a free dimension, and any further
keys are model parameters (see engine.models).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field

import numpy as np

# Wire datatypes a client may send for an input the model declares as the key. FP16 is accepted for
# FP32 inputs (cast up); INT32 for INT64 ids. BYTES is text.
ACCEPTED = {"FP32": ("FP32", "FP16"), "FP16": ("FP16", "FP32"), "INT64": ("INT64", "INT32"),
            "INT32": ("INT32", "INT64"), "BYTES": ("BYTES",)}
NUMPY = {"FP32": np.float32, "FP16": np.float16, "INT64": np.int64, "INT32": np.int32}
WIRE_LIMITS = {"FP16": 65504.0, "FP32": float(np.finfo(np.float32).max), "INT32": 2**31 - 1, "INT64": 2**63 - 1}
SPEC_KEYS = ("name", "family", "inputs", "outputs")
# JSON bytes one FP32 value may take in an answer: the longest float repr ("-1.2345678901234567e-38")
# and its comma. An upper bound, so a size predicted from shapes is never below the real one.
BYTES_PER_VALUE = 25
ENCODE_CHUNK = 4096  # values encoded per call: each call holds the GIL about a millisecond
log = logging.getLogger("engine.server")
_depth_logged = False


class RequestError(Exception):
    """A client error: `status` is the HTTP status (4xx), the message names the problem."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class InferRequest:
    inputs: dict  # name -> np.ndarray in the model's dtype, or list[str] for BYTES
    outputs: list[str] | None  # output names to return, in the model's order; None: the model's
    rows: int  # batch dimension shared by every input     default (the runner fills it in)
    id: str | None = None
    extra: dict = field(default_factory=dict)  # per-request scratch for the runner


def model_metadata(spec: dict) -> dict:
    """GET /v2/models/{name} body."""
    tensors = lambda items: [{"name": t["name"], "datatype": t["datatype"], "shape": list(t["shape"])}
                             for t in items]
    body = {"name": spec["name"], "versions": ["1"], "platform": f"sparse-engine/{spec['family']}",
            "inputs": tensors(spec["inputs"]), "outputs": tensors(spec["outputs"])}
    parameters = {k: v for k, v in spec.items() if k not in SPEC_KEYS}
    if parameters:
        body["parameters"] = parameters
    return body


def parse_infer(body: bytes, spec: dict, *, max_rows: int) -> InferRequest:
    """Bytes of a POST /infer body -> a validated InferRequest (raises RequestError)."""
    try:
        # json accepts NaN/Infinity tokens; they are rejected per input below with a clear message.
        doc = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RequestError(400, f"malformed JSON body: {exc}") from None
    except RecursionError:  # the parser's depth bound (the interpreter's recursion limit)
        _log_depth_once()
        raise RequestError(400, "malformed JSON body: nested too deeply (a v2 request needs a few levels "
                                "plus one per tensor dimension)") from None
    if not isinstance(doc, dict):
        raise RequestError(400, f"request body must be a JSON object, got {type(doc).__name__}")
    request_id = doc.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(400, "'id' must be a string")
    raw_inputs = doc.get("inputs")
    if raw_inputs is None:
        raise RequestError(400, "missing field 'inputs' (a list of {name, shape, datatype, data})")
    if not isinstance(raw_inputs, list) or not raw_inputs:
        raise RequestError(400, "'inputs' must be a non-empty list of {name, shape, datatype, data}")

    declared = {t["name"]: t for t in spec["inputs"]}
    arrays: dict = {}
    for i, item in enumerate(raw_inputs):
        name, array = _parse_input(i, item, declared, spec)
        if name in arrays:
            raise RequestError(400, f"input '{name}' is given twice")
        arrays[name] = array

    rows = _common_rows(arrays)
    if rows == 0:
        raise RequestError(400, "empty batch: the inputs have 0 rows")
    if rows > max_rows:
        raise RequestError(413, f"{rows} rows in one request; this server accepts at most {max_rows}")
    outputs = _requested_outputs(doc.get("outputs"), spec)
    return InferRequest(inputs=arrays, outputs=outputs, rows=rows, id=request_id)


def _parse_input(i: int, item, declared: dict, spec: dict):
    if not isinstance(item, dict):
        raise RequestError(400, f"inputs[{i}] must be an object with name, shape, datatype, data")
    for key in ("name", "shape", "datatype", "data"):
        if key not in item:
            raise RequestError(400, f"inputs[{i}] is missing field '{key}'")
    name = item["name"]
    if not isinstance(name, str) or name not in declared:
        raise RequestError(400, f"inputs[{i}]: unknown input {name!r}; model '{spec['name']}' takes "
                                f"{', '.join(repr(n) for n in declared)}")
    want = declared[name]
    shape = item["shape"]
    if (not isinstance(shape, list) or not shape
            or any(type(d) is not int or d < 0 for d in shape)):
        raise RequestError(400, f"input '{name}': shape must be a non-empty list of non-negative "
                                f"integers, got {shape!r}")
    if len(shape) != len(want["shape"]) or any(w >= 0 and d != w for d, w in zip(shape, want["shape"])):
        raise RequestError(400, f"input '{name}': shape {shape} does not match the model's "
                                f"{list(want['shape'])} (-1 = any size)")
    datatype = item["datatype"]
    if datatype not in ACCEPTED.get(want["datatype"], (want["datatype"],)):
        raise RequestError(400, f"input '{name}': datatype {datatype!r} not accepted; the model "
                                f"takes {want['datatype']} (accepted: "
                                f"{', '.join(ACCEPTED.get(want['datatype'], ()))})")
    count = math.prod(shape)
    if want["datatype"] == "BYTES":
        return name, _parse_text(name, item["data"], count)
    return name, _parse_numbers(name, item["data"], shape, count, datatype, want["datatype"])


def _parse_numbers(name, data, shape, count, wire: str, model_dtype: str) -> np.ndarray:
    if not isinstance(data, list):
        raise RequestError(400, f"input '{name}': 'data' must be a list of numbers")
    try:
        flat = np.asarray(data).reshape(-1)
    except (ValueError, OverflowError) as exc:  # ragged nesting, ints beyond 64 bits
        raise RequestError(400, f"input '{name}': 'data' is not a regular array of numbers ({exc})") from None
    if flat.size != count:
        raise RequestError(400, f"input '{name}': data holds {flat.size} values but shape {shape} "
                                f"needs {count}")
    if count == 0:
        return np.zeros(shape, dtype=NUMPY[model_dtype])
    integral = model_dtype.startswith("INT")
    allowed = "iu" if integral else "iuf"
    if flat.dtype.kind not in allowed:
        what = "integers" if integral else "numbers"
        raise RequestError(400, f"input '{name}': datatype {wire} needs {what}, but data holds "
                                f"{_kind_name(flat.dtype)}")
    if not integral:
        bad = ~np.isfinite(flat)
        if bad.any():
            j = int(np.argmax(bad))
            raise RequestError(400, f"input '{name}': value {flat[j]} at flat index {j} is NaN or "
                                    f"infinite; the model would return garbage")
    limit = WIRE_LIMITS.get(wire)
    if limit is not None and flat.size and float(np.abs(flat).max()) > limit:
        raise RequestError(400, f"input '{name}': a value exceeds the range of {wire} (|x| <= {limit:g})")
    if wire == "FP16":  # round through half precision so the model sees what the client sent
        flat = flat.astype(np.float16)
    return flat.astype(NUMPY[model_dtype]).reshape(shape)


def _parse_text(name, data, count) -> list[str]:
    if not isinstance(data, list) or not all(isinstance(s, str) for s in data):
        raise RequestError(400, f"input '{name}': BYTES data must be a list of strings")
    if len(data) != count:
        raise RequestError(400, f"input '{name}': data holds {len(data)} strings but the shape needs {count}")
    return data


def _kind_name(dtype: np.dtype) -> str:
    return {"f": "non-integer numbers", "b": "booleans", "U": "strings", "O": "mixed or nested values"}.get(
        dtype.kind, str(dtype))


def _common_rows(arrays: dict) -> int:
    rows = {name: (len(a) if isinstance(a, list) else a.shape[0]) for name, a in arrays.items()}
    if len(set(rows.values())) > 1:
        raise RequestError(400, f"inputs disagree on the batch size (first dimension): {rows}")
    return next(iter(rows.values()))


def _requested_outputs(raw, spec: dict) -> list[str] | None:
    names = [t["name"] for t in spec["outputs"]]
    if raw is None:
        return None  # the model family's default
    if not isinstance(raw, list) or not raw:
        raise RequestError(400, "'outputs' must be a non-empty list of {name}")
    wanted = []
    for i, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        if name not in names:
            raise RequestError(400, f"outputs[{i}]: unknown output {name!r}; model '{spec['name']}' "
                                    f"gives {', '.join(repr(n) for n in names)}")
        wanted.append(name)
    return [n for n in names if n in wanted]


def _log_depth_once() -> None:
    global _depth_logged
    if not _depth_logged:  # one line per process: a flood of such requests must not flood the log
        _depth_logged = True
        log.warning("refused a request body nested too deeply for the JSON parser (400); further "
                    "ones are refused without logging")


def predicted_response_bytes(shapes: dict) -> int | None:
    """Upper bound of the JSON answer's size for {output: shape}, or None if a shape is unknown."""
    if any(shape is None for shape in shapes.values()):
        return None
    return 256 + sum(128 + BYTES_PER_VALUE * math.prod(shape) for shape in shapes.values())


def encode_infer_response(spec: dict, request: InferRequest, outputs: dict) -> bytes:
    """POST /infer response body (JSON bytes) for one request; `outputs` maps name -> np.ndarray of
    finite values. Encoded a chunk of values at a time: run on a worker thread, it lets the event loop
    in between chunks, and it never holds every value as a Python float at once."""
    parts = [b'{"model_name":', json.dumps(spec["name"]).encode(), b',"model_version":"1"']
    if request.id is not None:
        parts += [b',"id":', json.dumps(request.id).encode()]
    parts.append(b',"outputs":[')
    for i, name in enumerate(request.outputs):
        flat = outputs[name].reshape(-1)
        head = (f'{"," if i else ""}{{"name":{json.dumps(name)},"datatype":"FP32","shape":'
                f'{json.dumps(list(outputs[name].shape))},"data":[')
        parts.append(head.encode())
        for start in range(0, flat.size, ENCODE_CHUNK):
            chunk = json.dumps(flat[start:start + ENCODE_CHUNK].tolist(), allow_nan=False, separators=(",", ":"))
            parts.append(((',' if start else '') + chunk[1:-1]).encode())
        parts.append(b"]}")
    parts.append(b"]}")
    return b"".join(parts)
