"""Open Inference Protocol (KServe v2) REST bodies: parse and validate an infer request against a
model's `spec`, and build the metadata and infer responses.

Both body forms of the protocol are read and written: plain JSON, and the binary tensor data
extension (what tritonclient sends by default): the JSON header first, its length in the
`Inference-Header-Content-Length` HTTP header, then the raw tensors in input order, each input
saying its byte count in `parameters.binary_data_size` (little-endian values; BYTES elements each
a 4-byte little-endian length and the UTF-8 bytes). An output asked for with
`parameters.binary_data` (or every output, with the request's `binary_data_output`) comes back the
same way.

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
    binary_outputs: frozenset = frozenset()  # output names to answer as raw bytes (binary extension)


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


class _Binary:
    """The raw-tensor part of a binary-extension body, read front to back by the inputs."""

    def __init__(self, data: memoryview):
        self.data, self.offset = data, 0

    def take(self, name: str, size) -> memoryview:
        if type(size) is not int or size < 0:
            raise RequestError(400, f"input '{name}': parameters.binary_data_size must be a non-negative "
                                    f"integer, got {size!r}")
        if self.offset + size > len(self.data):
            raise RequestError(400, f"input '{name}': binary_data_size {size} runs past the end of the body "
                                    f"({len(self.data) - self.offset} bytes of binary data left)")
        self.offset += size
        return self.data[self.offset - size:self.offset]


def parse_infer(body: bytes, spec: dict, *, max_rows: int, header_length: int | None = None) -> InferRequest:
    """Bytes of a POST /infer body -> a validated InferRequest (raises RequestError).
    header_length: the Inference-Header-Content-Length of a binary-extension body (None: all JSON)."""
    binary = None
    if header_length is not None:
        if header_length > len(body):
            raise RequestError(400, f"Inference-Header-Content-Length {header_length} is longer than the "
                                    f"body ({len(body)} bytes)")
        binary = _Binary(memoryview(body)[header_length:])
        body = body[:header_length]
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
    return request_from_doc(doc, spec, max_rows=max_rows, binary=binary)


def request_from_doc(doc: dict, spec: dict, *, max_rows: int, binary: _Binary | None = None) -> InferRequest:
    """A decoded v2 request ({"id", "inputs", "outputs", "parameters"}; the raw tensors in `binary`)
    -> a validated InferRequest. REST bodies and gRPC messages both come through here."""
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
        name, array = _parse_input(i, item, declared, spec, binary)
        if name in arrays:
            raise RequestError(400, f"input '{name}' is given twice")
        arrays[name] = array
    if binary is not None and binary.offset != len(binary.data):
        raise RequestError(400, f"the body holds {len(binary.data)} bytes of binary data but the inputs' "
                                f"binary_data_size add up to {binary.offset}")

    rows = _common_rows(arrays)
    if rows == 0:
        raise RequestError(400, "empty batch: the inputs have 0 rows")
    if rows > max_rows:
        raise RequestError(413, f"{rows} rows in one request; this server accepts at most {max_rows}")
    outputs, binary_outputs = _requested_outputs(doc.get("outputs"), doc.get("parameters"), spec)
    return InferRequest(inputs=arrays, outputs=outputs, rows=rows, id=request_id, binary_outputs=binary_outputs)


def _parse_input(i: int, item, declared: dict, spec: dict, binary: _Binary | None):
    if not isinstance(item, dict):
        raise RequestError(400, f"inputs[{i}] must be an object with name, shape, datatype, data")
    params = item.get("parameters") or {}
    if not isinstance(params, dict):
        raise RequestError(400, f"inputs[{i}]: 'parameters' must be an object")
    in_binary = "binary_data_size" in params
    for key in ("name", "shape", "datatype") + (() if in_binary else ("data",)):
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
    if in_binary:
        if "data" in item:
            raise RequestError(400, f"input '{name}': has both 'data' and parameters.binary_data_size; "
                                    f"send one")
        if binary is None:
            raise RequestError(400, f"input '{name}': parameters.binary_data_size needs a binary body "
                                    f"(the Inference-Header-Content-Length header is missing)")
        raw = binary.take(name, params["binary_data_size"])
        if want["datatype"] == "BYTES":
            return name, _binary_text(name, raw, count)
        return name, _binary_numbers(name, raw, shape, count, datatype, want["datatype"])
    if want["datatype"] == "BYTES":
        return name, _parse_text(name, item["data"], count)
    return name, _parse_numbers(name, item["data"], shape, count, datatype, want["datatype"])


def _binary_numbers(name, raw: memoryview, shape, count, wire: str, model_dtype: str) -> np.ndarray:
    wire_dtype = np.dtype(NUMPY[wire]).newbyteorder("<")
    if len(raw) != count * wire_dtype.itemsize:
        raise RequestError(400, f"input '{name}': binary_data_size {len(raw)} does not match shape {shape} "
                                f"of {wire} ({count} x {wire_dtype.itemsize} = {count * wire_dtype.itemsize} bytes)")
    return _checked_numbers(name, np.frombuffer(raw, dtype=wire_dtype), shape, count, wire, model_dtype)


def _binary_text(name, raw: memoryview, count) -> list[str]:
    """`count` BYTES elements: each a uint32 little-endian length, then that many UTF-8 bytes."""
    out, pos = [], 0
    for j in range(count):
        if pos + 4 > len(raw):
            raise RequestError(400, f"input '{name}': binary data ends inside element {j}'s length prefix")
        n = int.from_bytes(raw[pos:pos + 4], "little")
        if pos + 4 + n > len(raw):
            raise RequestError(400, f"input '{name}': element {j} says {n} bytes, but only "
                                    f"{len(raw) - pos - 4} remain")
        try:
            out.append(str(raw[pos + 4:pos + 4 + n], "utf-8"))
        except UnicodeDecodeError:
            raise RequestError(400, f"input '{name}': element {j} is not UTF-8 text") from None
        pos += 4 + n
    if pos != len(raw):
        raise RequestError(400, f"input '{name}': binary_data_size {len(raw)} holds more than the "
                                f"{count} elements its shape needs ({pos} bytes)")
    return out


def _parse_numbers(name, data, shape, count, wire: str, model_dtype: str) -> np.ndarray:
    if not isinstance(data, list):
        raise RequestError(400, f"input '{name}': 'data' must be a list of numbers")
    try:
        flat = np.asarray(data).reshape(-1)
    except (ValueError, OverflowError) as exc:  # ragged nesting, ints beyond 64 bits
        raise RequestError(400, f"input '{name}': 'data' is not a regular array of numbers ({exc})") from None
    return _checked_numbers(name, flat, shape, count, wire, model_dtype)


def _checked_numbers(name, flat: np.ndarray, shape, count, wire: str, model_dtype: str) -> np.ndarray:
    """The values of one input, from JSON or raw bytes, checked and cast to the model's dtype."""
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


def _requested_outputs(raw, parameters, spec: dict) -> tuple[list[str] | None, frozenset]:
    """-> (output names in the model's order, or None for the family's default; the ones to answer
    in binary). The request's parameters.binary_data_output makes every output binary."""
    names = [t["name"] for t in spec["outputs"]]
    if parameters is not None and not isinstance(parameters, dict):
        raise RequestError(400, "'parameters' must be an object")
    all_binary = _flag((parameters or {}).get("binary_data_output", False), "parameters.binary_data_output")
    if raw is None:
        return None, frozenset(names if all_binary else ())
    if not isinstance(raw, list) or not raw:
        raise RequestError(400, "'outputs' must be a non-empty list of {name}")
    wanted, binary = [], set(names if all_binary else ())
    for i, item in enumerate(raw):
        name = item.get("name") if isinstance(item, dict) else None
        if name not in names:
            raise RequestError(400, f"outputs[{i}]: unknown output {name!r}; model '{spec['name']}' "
                                    f"gives {', '.join(repr(n) for n in names)}")
        params = item.get("parameters") or {}
        if not isinstance(params, dict):
            raise RequestError(400, f"outputs[{i}]: 'parameters' must be an object")
        if _flag(params.get("binary_data", all_binary), f"outputs[{i}].parameters.binary_data"):
            binary.add(name)
        else:
            binary.discard(name)
        wanted.append(name)
    return [n for n in names if n in wanted], frozenset(binary)


def _flag(value, where: str) -> bool:
    if not isinstance(value, bool):
        raise RequestError(400, f"{where} must be true or false, got {value!r}")
    return value


def _log_depth_once() -> None:
    global _depth_logged
    if not _depth_logged:  # one line per process: a flood of such requests must not flood the log
        _depth_logged = True
        log.warning("refused a request body nested too deeply for the JSON parser (400); further "
                    "ones are refused without logging")


def predicted_response_bytes(shapes: dict, binary: frozenset = frozenset()) -> int | None:
    """Upper bound of the answer's size for {output: shape} (4 bytes a value for the outputs in
    `binary`, BYTES_PER_VALUE for JSON ones), or None if a shape is unknown."""
    if any(shape is None for shape in shapes.values()):
        return None
    return 256 + sum(128 + (4 if name in binary else BYTES_PER_VALUE) * math.prod(shape)
                     for name, shape in shapes.items())


def encode_infer_response(spec: dict, request: InferRequest, outputs: dict) -> tuple[bytes, int | None]:
    """POST /infer response body for one request, and the length of its JSON header when outputs
    are answered in binary (the Inference-Header-Content-Length; None: a plain JSON body).
    `outputs` maps name -> np.ndarray of finite values. JSON data is encoded a chunk of values at a
    time: run on a worker thread, it lets the event loop in between chunks, and it never holds every
    value as a Python float at once."""
    parts = [b'{"model_name":', json.dumps(spec["name"]).encode(), b',"model_version":"1"']
    if request.id is not None:
        parts += [b',"id":', json.dumps(request.id).encode()]
    parts.append(b',"outputs":[')
    raw = []
    for i, name in enumerate(request.outputs):
        flat = outputs[name].reshape(-1)
        head = (f'{"," if i else ""}{{"name":{json.dumps(name)},"datatype":"FP32","shape":'
                f'{json.dumps(list(outputs[name].shape))}')
        if name in request.binary_outputs:
            raw.append(flat.astype("<f4").tobytes())
            parts.append(f'{head},"parameters":{{"binary_data_size":{len(raw[-1])}}}}}'.encode())
            continue
        parts.append((head + ',"data":[').encode())
        for start in range(0, flat.size, ENCODE_CHUNK):
            chunk = json.dumps(flat[start:start + ENCODE_CHUNK].tolist(), allow_nan=False, separators=(",", ":"))
            parts.append(((',' if start else '') + chunk[1:-1]).encode())
        parts.append(b"]}")
    parts.append(b"]}")
    header = b"".join(parts)
    return (header + b"".join(raw), len(header)) if raw else (header, None)


# gRPC typed contents: the InferTensorContents field of each wire datatype (FP16 has none: raw only).
TYPED_CONTENTS = {"FP32": "fp32_contents", "INT64": "int64_contents", "INT32": "int_contents",
                  "BYTES": "bytes_contents"}


def request_from_grpc(msg, spec: dict, *, max_rows: int) -> InferRequest:
    """A gRPC ModelInferRequest (engine.serve.grpc_service) -> a validated InferRequest, through the
    checks a REST body gets. Inputs come as typed `contents` or, all of them, as
    `raw_input_contents` (what tritonclient sends); every output is answered raw."""
    raw = list(msg.raw_input_contents)
    if raw and len(raw) != len(msg.inputs):
        raise RequestError(400, f"raw_input_contents has {len(raw)} entries for {len(msg.inputs)} inputs; "
                                f"give one per input, or none and typed contents")
    inputs = []
    for i, tensor in enumerate(msg.inputs):
        item = {"name": tensor.name, "datatype": tensor.datatype, "shape": list(tensor.shape)}
        if raw:
            item["parameters"] = {"binary_data_size": len(raw[i])}
        else:
            item["data"] = _typed_contents(tensor)
        inputs.append(item)
    doc = {"inputs": inputs, "id": msg.id or None,
           "outputs": [{"name": o.name} for o in msg.outputs] or None}
    request = request_from_doc(doc, spec, max_rows=max_rows,
                               binary=_Binary(memoryview(b"".join(raw))) if raw else None)
    request.binary_outputs = frozenset(t["name"] for t in spec["outputs"])
    return request


def _typed_contents(tensor) -> list:
    field_name = TYPED_CONTENTS.get(tensor.datatype)
    if field_name is None:
        raise RequestError(400, f"input '{tensor.name}': datatype {tensor.datatype!r} has no typed contents "
                                f"field; send it in raw_input_contents")
    values = list(getattr(tensor.contents, field_name))
    if tensor.datatype != "BYTES":
        return values
    try:
        return [v.decode("utf-8") for v in values]
    except UnicodeDecodeError:
        raise RequestError(400, f"input '{tensor.name}': bytes_contents holds text that is not UTF-8") from None
