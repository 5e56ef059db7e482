"""One loaded model behind the server: per-request checks that need the model (vocabulary, tokens),
and `run_batch`, which merges validated requests into one forward pass and splits the outputs back.

MLP and custom models: inputs are concatenated along the batch dimension. BERT family: token ids of
different lengths are right-padded to the longest in the batch with attention_mask 0, and each
request gets its own rows cut back to its own length. Raw text (the BYTES input "text") is tokenized
here with the model's tokenizer; its "embedding" output comes from `model.encode(texts)`.
"""
from __future__ import annotations

import logging

import numpy as np
import torch
from torch import nn

from .protocol import InferRequest, RequestError

log = logging.getLogger("engine.server")


class InferenceError(Exception):
    """The model failed on a valid request (answered 500); the message says how."""


class ModelRunner:
    def __init__(self, model: nn.Module, name: str | None = None, device: str = "cpu"):
        spec = dict(model.spec)
        if name:
            spec["name"] = name
        self.model, self.spec, self.device = model, spec, torch.device(device)
        self.name = spec["name"]
        self.family = spec.get("family", "custom")
        self.tokenizer = getattr(model, "tokenizer", None)
        self.input_names = [t["name"] for t in spec["inputs"] if t["datatype"] != "BYTES"]
        self.vocab_size = _vocab_size(model) if self.family == "bert" else None
        self.ready = False

    # -- on the event loop, per request ------------------------------------------------------
    def prepare(self, request: InferRequest) -> None:
        """Checks that need the model; tokenizes text. Raises RequestError (4xx)."""
        ids = request.inputs.get("input_ids")
        if ids is not None and self.vocab_size is not None and ids.size and ids.max() >= self.vocab_size:
            raise RequestError(400, f"input 'input_ids': token id {int(ids.max())} is outside the "
                                    f"vocabulary (0..{self.vocab_size - 1})")
        if request.mode != "text":
            return
        if self.tokenizer is None:
            raise RequestError(400, f"model '{self.name}' has no tokenizer; send 'input_ids'")
        max_len = self.spec.get("max_seq_len")
        encodings = self.tokenizer.encode_batch(request.inputs["text"])
        for i, enc in enumerate(encodings):
            if enc.overflowing or (max_len and len(enc.ids) > max_len):
                raise RequestError(400, f"input 'text': string {i} is longer than the model's "
                                        f"{max_len} tokens; split it or shorten it")
        if "last_hidden_state" in request.outputs:
            request.extra["input_ids"], request.extra["attention_mask"] = _pad(
                [np.asarray([e.ids], dtype=np.int64) for e in encodings],
                [np.asarray([e.attention_mask], dtype=np.int64) for e in encodings])

    # -- on the batch thread ------------------------------------------------------------------
    def run_batch(self, requests: list[InferRequest]) -> list:
        """One result per request: {output name: np.ndarray} or an InferenceError."""
        try:
            return self._run(requests)
        except Exception as exc:
            if len(requests) == 1:
                log.exception("model '%s' failed on a request", self.name)
                return [_as_inference_error(exc)]
        # One bad request must not fail its neighbours: retry them one by one.
        log.warning("model '%s' failed on a batch of %d requests; retrying them one by one",
                    self.name, len(requests))
        return [self.run_batch([r])[0] for r in requests]

    def _run(self, requests: list[InferRequest]) -> list[dict]:
        results: list = [None] * len(requests)
        text = [i for i, r in enumerate(requests) if r.mode == "text"]
        tensor = [i for i, r in enumerate(requests) if r.mode != "text"]
        with torch.inference_mode():
            if tensor:
                for i, out in zip(tensor, self._run_tensor([requests[i] for i in tensor])):
                    results[i] = out
            if text:
                for i, out in zip(text, self._run_text([requests[i] for i in text])):
                    results[i] = out
        for request, out in zip(requests, results):
            for name in request.outputs:
                if name not in out:
                    raise InferenceError(f"the model returned no output '{name}'")
                if not np.isfinite(out[name]).all():
                    raise InferenceError(f"the model produced NaN or Inf in output '{name}'")
        return [{name: out[name] for name in r.outputs} for r, out in zip(requests, results)]

    def _run_tensor(self, requests: list[InferRequest]) -> list[dict]:
        if self.family == "bert":
            ids = [r.inputs["input_ids"] for r in requests]
            masks = [r.inputs.get("attention_mask", np.ones_like(r.inputs["input_ids"])) for r in requests]
            return [{"last_hidden_state": h} for h in self._run_ids(ids, masks)]
        merged = [self._tensor(np.concatenate([r.inputs[n] for r in requests])) for n in self.input_names]
        names = [t["name"] for t in self.spec["outputs"]]
        outputs = _named_outputs(self.model(*merged), names)
        return _split(outputs, [r.rows for r in requests])

    def _run_text(self, requests: list[InferRequest]) -> list[dict]:
        results = [{} for _ in requests]
        want = lambda name: [i for i, r in enumerate(requests) if name in r.outputs]
        if want("embedding"):
            chosen = want("embedding")
            texts = [t for i in chosen for t in requests[i].inputs["text"]]
            embedding = _numpy(self.model.encode(texts))
            for i, part in zip(chosen, _split({"embedding": embedding}, [requests[i].rows for i in chosen])):
                results[i].update(part)
        if want("last_hidden_state"):
            chosen = want("last_hidden_state")
            states = self._run_ids([requests[i].extra["input_ids"] for i in chosen],
                                   [requests[i].extra["attention_mask"] for i in chosen])
            for i, h in zip(chosen, states):
                results[i]["last_hidden_state"] = h
        return results

    def _run_ids(self, ids: list[np.ndarray], masks: list[np.ndarray]) -> list[np.ndarray]:
        """(n_i, L_i) id/mask arrays -> per request (n_i, L_i, hidden), run as one padded batch."""
        merged_ids, merged_mask = _pad(ids, masks)
        hidden = self.model(self._tensor(merged_ids), attention_mask=self._tensor(merged_mask))
        hidden = _numpy(_named_outputs(hidden, ["last_hidden_state"])["last_hidden_state"])
        out, start = [], 0
        for a in ids:
            out.append(hidden[start:start + a.shape[0], :a.shape[1]])
            start += a.shape[0]
        return out

    def _tensor(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def warmup(self, max_batch: int) -> None:
        """Run the model once at batch 1 and once at max_batch so first requests are not slow."""
        for rows in sorted({1, max(1, max_batch)}):
            inputs = {}
            for t in self.spec["inputs"]:
                if t["datatype"] == "BYTES":
                    continue
                shape = [rows] + [d if d >= 0 else 8 for d in t["shape"][1:]]
                dtype = np.float32 if t["datatype"].startswith("FP") else np.int64
                inputs[t["name"]] = (np.ones(shape, dtype) if t["name"] == "attention_mask"
                                     else np.zeros(shape, dtype))
            outputs = [t["name"] for t in self.spec["outputs"] if t["name"] != "embedding"]
            results = self.run_batch([InferRequest(inputs=inputs, outputs=outputs, rows=rows)])
            if isinstance(results[0], Exception):
                raise results[0]
        if self.tokenizer is not None and hasattr(self.model, "encode"):
            with torch.inference_mode():
                self.model.encode(["warm up"])
        self.ready = True


def _pad(ids: list[np.ndarray], masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad (n_i, L_i) arrays to the longest L with id 0 / mask 0 and stack them."""
    length = max(a.shape[1] for a in ids)
    rows = sum(a.shape[0] for a in ids)
    merged_ids = np.zeros((rows, length), dtype=np.int64)
    merged_mask = np.zeros((rows, length), dtype=np.int64)
    start = 0
    for a, m in zip(ids, masks):
        merged_ids[start:start + a.shape[0], :a.shape[1]] = a
        merged_mask[start:start + a.shape[0], :a.shape[1]] = m
        start += a.shape[0]
    return merged_ids, merged_mask


def _named_outputs(result, names: list[str]) -> dict:
    """A model's return value (tensor, tuple, dict or object with attributes) -> {name: value}."""
    if isinstance(result, torch.Tensor):
        return {names[0]: result}
    if isinstance(result, dict):
        return {n: result[n] for n in names if n in result}
    if isinstance(result, (tuple, list)):
        return dict(zip(names, result))
    return {n: getattr(result, n) for n in names if hasattr(result, n)}


def _split(outputs: dict, rows: list[int]) -> list[dict]:
    arrays = {name: _numpy(value) for name, value in outputs.items()}
    for name, a in arrays.items():
        if a.shape[0] != sum(rows):
            raise InferenceError(f"output '{name}' has {a.shape[0]} rows for {sum(rows)} input rows")
    parts, start = [], 0
    for n in rows:
        parts.append({name: a[start:start + n] for name, a in arrays.items()})
        start += n
    return parts


def _numpy(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", torch.float32).numpy()
    return np.asarray(value, dtype=np.float32)


def _vocab_size(model: nn.Module) -> int | None:
    # The first embedding table of a BERT-style encoder is the word embedding; its size, not the
    # tokenizer's, bounds the ids the model accepts.
    embedding = next((m for m in model.modules() if isinstance(m, nn.Embedding)), None)
    return embedding.num_embeddings if embedding is not None else None


def _as_inference_error(exc: Exception) -> InferenceError:
    if isinstance(exc, InferenceError):
        return exc
    return InferenceError(f"{type(exc).__name__}: {exc}")
