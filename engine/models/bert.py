"""BERT-style encoder family (Hugging Face BERT config and parameter names), for embedding models
such as all-MiniLM-L6-v2: embeddings, post-LayerNorm self-attention and feed-forward blocks.

`forward(input_ids, attention_mask=None, token_type_ids=None)` -> last hidden states (B, S, H).
`encode(texts)` -> pooled sentence embeddings (B, H), pooling as sentence-transformers does
(mean over non-padding tokens for all-MiniLM-L6-v2), L2-normalised; needs the artifact's tokenizer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..transformer import add_norm
from . import ArchError, Family, InputError, register_family, split_rows

HF_KEYS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
           "hidden_act", "max_position_embeddings", "type_vocab_size", "layer_norm_eps", "pad_token_id")
HIDDEN_ACTS = {"gelu": ("gelu", dict()), "relu": ("relu", dict()),
               "gelu_new": ("gelu_tanh", dict(approximate="tanh")),
               "gelu_pytorch_tanh": ("gelu_tanh", dict(approximate="tanh"))}
POOLINGS = ("mean", "cls", "max")
# Parameters a BERT checkpoint may carry that this encoder does not use (heads, pooler, a buffer).
UNUSED_PREFIXES = ("pooler.", "cls.", "embeddings.position_ids")


def check_config(config: dict, fn: str = "bert") -> dict:
    missing = [k for k in HF_KEYS if k not in config and k != "pad_token_id"]
    if missing:
        raise ArchError(f"{fn}: config lacks {missing}")
    if config.get("hidden_act") not in HIDDEN_ACTS:
        raise ArchError(f"{fn}: hidden_act {config.get('hidden_act')!r} is not supported; expected one of "
                        f"{sorted(HIDDEN_ACTS)}")
    if config.get("position_embedding_type", "absolute") != "absolute":
        raise ArchError(f"{fn}: position_embedding_type {config['position_embedding_type']!r} is not "
                        "supported (only 'absolute')")
    if config["hidden_size"] % config["num_attention_heads"]:
        raise ArchError(f"{fn}: hidden_size {config['hidden_size']} is not a multiple of "
                        f"num_attention_heads {config['num_attention_heads']}")
    if config.get("pooling", "mean") not in POOLINGS:
        raise ArchError(f"{fn}: pooling {config.get('pooling')!r} is not supported; expected one of {POOLINGS}")
    return config


class SelfAttention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        h = c["hidden_size"]
        self.heads = c["num_attention_heads"]
        self.query, self.key, self.value = nn.Linear(h, h), nn.Linear(h, h), nn.Linear(h, h)

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b, s, h = x.shape
        # (B, S, H) -> (B, nh, S, hs)
        q, k, v = (lin(x).view(b, s, self.heads, h // self.heads).transpose(1, 2)
                   for lin in (self.query, self.key, self.value))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return ctx.transpose(1, 2).reshape(b, s, h)


class AddNorm(nn.Module):
    """dense -> residual add -> LayerNorm (HF's BertSelfOutput / BertOutput)."""

    def __init__(self, n_in: int, c: dict):
        super().__init__()
        self.dense = nn.Linear(n_in, c["hidden_size"])
        self.LayerNorm = nn.LayerNorm(c["hidden_size"], eps=c["layer_norm_eps"])

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dense(x) + residual)


class Attention(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.self = SelfAttention(c)
        self.output = AddNorm(c["hidden_size"], c)

    def forward(self, x, bias):
        return self.output(self.self(x, bias), x)


class Intermediate(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.dense = nn.Linear(c["hidden_size"], c["intermediate_size"])
        name, kw = HIDDEN_ACTS[c["hidden_act"]]
        self.act = nn.ReLU() if name == "relu" else nn.GELU(**kw)

    def forward(self, x):
        return self.act(self.dense(x))


class Layer(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.attention = Attention(c)
        self.intermediate = Intermediate(c)
        self.output = AddNorm(c["intermediate_size"], c)

    def forward(self, x, bias):
        x = self.attention(x, bias)
        return self.output(self.intermediate(x), x)


class Encoder(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        self.layer = nn.ModuleList(Layer(c) for _ in range(c["num_hidden_layers"]))


def _embedding(n: int, h: int, padding_idx: int | None = None) -> nn.Embedding:
    # Random init only off the meta device: meta's normal_ kernel costs seconds on first use, and
    # engine.load replaces every weight with assign=True anyway.
    weight = torch.empty(n, h)
    if not weight.is_meta:
        nn.init.normal_(weight, std=0.02)
    return nn.Embedding(n, h, padding_idx=padding_idx, _weight=weight)


class Embeddings(nn.Module):
    def __init__(self, c: dict):
        super().__init__()
        h = c["hidden_size"]
        self.word_embeddings = _embedding(c["vocab_size"], h, c.get("pad_token_id"))
        self.position_embeddings = _embedding(c["max_position_embeddings"], h)
        self.token_type_embeddings = _embedding(c["type_vocab_size"], h)
        self.LayerNorm = nn.LayerNorm(h, eps=c["layer_norm_eps"])

    def forward(self, input_ids, token_type_ids):
        pos = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word_embeddings(input_ids)
        r = self.token_type_embeddings(token_type_ids).add_(self.position_embeddings(pos))
        h = x.shape[-1]
        return add_norm(x.view(-1, h), r.view(-1, h), self.LayerNorm).view_as(x)  # LN(x + r), one pass


class BertEncoder(nn.Module):
    def __init__(self, config: dict):
        super().__init__()
        self.config = check_config(dict(config))
        self.embeddings = Embeddings(self.config)
        self.encoder = Encoder(self.config)
        self.tokenizer = None

    def _check(self, input_ids, attention_mask, token_type_ids):
        fn, c = "BertEncoder.forward", self.config
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
            raise ValueError(f"{fn}: input_ids must be an integer tensor (batch, seq), got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                             f"{tuple(getattr(input_ids, 'shape', ()))}")
        if input_ids.shape[1] > c["max_position_embeddings"]:
            raise ValueError(f"{fn}: sequence length {input_ids.shape[1]} exceeds max_position_embeddings "
                             f"{c['max_position_embeddings']}")
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= c["vocab_size"]):
            raise ValueError(f"{fn}: input_ids must lie in [0, {c['vocab_size']}), got "
                             f"{int(input_ids.min())}..{int(input_ids.max())}")
        for name, t in (("attention_mask", attention_mask), ("token_type_ids", token_type_ids)):
            if t is not None and tuple(t.shape) != tuple(input_ids.shape):
                raise ValueError(f"{fn}: {name} has shape {tuple(t.shape)}, expected {tuple(input_ids.shape)}")
        if token_type_ids is not None and token_type_ids.numel() and (
                int(token_type_ids.min()) < 0 or int(token_type_ids.max()) >= c["type_vocab_size"]):
            raise ValueError(f"{fn}: token_type_ids must lie in [0, {c['type_vocab_size']})")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        self._check(input_ids, attention_mask, token_type_ids)
        input_ids = input_ids.long()
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        x = self.embeddings(input_ids, token_type_ids.long())  # (B, S, H)
        bias = None
        # No padding (every key kept): no mask, so SDPA runs its unmasked kernel.
        if attention_mask is not None and not bool(attention_mask.all()):
            # Additive key mask (B, 1, 1, S): padded keys get the most negative float, as HF does.
            keep = attention_mask.to(device=x.device, dtype=x.dtype)[:, None, None, :]
            bias = (1.0 - keep) * torch.finfo(x.dtype).min
        for layer in self.encoder.layer:
            x = layer(x, bias)
        return x

    def pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        mode = self.config.get("pooling", "mean")
        m = attention_mask.to(hidden.dtype).unsqueeze(-1)  # (B, S, 1)
        if mode == "cls":
            out = hidden[:, 0]
        elif mode == "max":
            out = hidden.masked_fill(m == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
        else:
            out = (hidden * m).sum(dim=1) / m.sum(dim=1).clamp(min=1e-9)
        return F.normalize(out, p=2, dim=-1) if self.config.get("normalize", True) else out

    @torch.inference_mode()
    def encode(self, texts: list[str], batch_size: int = 32) -> torch.Tensor:
        """Sentence embeddings (len(texts), hidden), pooled and (by default) L2-normalised."""
        if self.tokenizer is None:
            raise RuntimeError("BertEncoder.encode: this artifact carries no tokenizer (convert a folder "
                               "with tokenizer.json); call forward(input_ids, attention_mask) instead")
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("BertEncoder.encode: texts must be a list of str")
        device = self.embeddings.word_embeddings.weight.device
        out = []
        for start in range(0, len(texts), batch_size):
            enc = self.tokenizer.encode_batch(list(texts[start:start + batch_size]))
            ids = torch.tensor([e.ids for e in enc], dtype=torch.long, device=device)
            mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.long, device=device)
            types = torch.tensor([e.type_ids for e in enc], dtype=torch.long, device=device)
            out.append(self.pool(self(ids, mask, types), mask))
        if not out:
            return torch.empty(0, self.config["hidden_size"])
        return torch.cat(out).float().cpu()


def build(config: dict) -> BertEncoder:
    return BertEncoder(config)


def from_checkpoint(ck, option: dict) -> tuple[dict, dict, dict]:
    fn = "convert(--arch bert)"
    if ck.hf_config is None:
        raise ArchError(f"{fn}: the bert family needs a Hugging Face folder (config.json + model.safetensors); "
                        f"got a {ck.kind} file")
    config = {k: ck.hf_config[k] for k in HF_KEYS if k in ck.hf_config}
    config["position_embedding_type"] = ck.hf_config.get("position_embedding_type", "absolute")
    pooling = ck.extras.get("pooling", "mean")
    if pooling not in POOLINGS:
        raise ArchError(f"{fn}: sentence-transformers pooling {pooling!r} is not supported; expected one of {POOLINGS}")
    config.update(pooling=pooling, normalize=bool(ck.extras.get("normalize", True)))
    check_config(config, fn)
    # The tokenizer truncates here; never past the position table, which bounds what forward takes.
    config["max_seq_length"] = min(int(ck.extras.get("max_seq_length") or config["max_position_embeddings"]),
                                   config["max_position_embeddings"])
    prefix = "bert." if any(k.startswith("bert.") for k in ck.tensors) else ""

    def canon(k):
        return k[len(prefix):] if prefix and k.startswith(prefix) else k
    sd = {canon(k): v for k, v in ck.tensors.items() if not canon(k).startswith(UNUSED_PREFIXES)}
    masks = {canon(k): v for k, v in ck.masks.items() if not canon(k).startswith(UNUSED_PREFIXES)}
    return config, sd, masks


@dataclass
class Tokens:
    """One request's work item: (n, L) ids and mask, and whether it wants pooled embeddings."""
    ids: np.ndarray
    mask: np.ndarray
    pooled: bool


def pad(ids: list[np.ndarray], masks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad (n_i, L_i) arrays to the longest L with id 0 / mask 0 and stack them."""
    length = max(a.shape[1] for a in ids)
    merged_ids = np.zeros((sum(a.shape[0] for a in ids), length), dtype=np.int64)
    merged_mask = np.zeros_like(merged_ids)
    start = 0
    for a, m in zip(ids, masks):
        merged_ids[start:start + a.shape[0], :a.shape[1]] = a
        merged_mask[start:start + a.shape[0], :a.shape[1]] = m
        start += a.shape[0]
    return merged_ids, merged_mask


class BertFamily(Family):
    """Served as `input_ids` (+ optional `attention_mask`) -> `last_hidden_state`, or, with a
    tokenizer, raw `text` -> `embedding` (and/or `last_hidden_state`). Requests of different lengths
    share one batch right-padded with mask 0; each gets its own rows cut back to its own length."""

    name = "bert"
    arch_help = "bert"
    verify_batch = 2

    def recognise(self, ck) -> dict | None:
        return {} if ck.kind == "hf" and (ck.hf_config or {}).get("model_type") == "bert" else None

    def from_checkpoint(self, ck, option: dict) -> tuple[dict, dict, dict]:
        return from_checkpoint(ck, option)

    def tokenizer_json(self, ck) -> str | None:
        return ck.tokenizer_json

    def build(self, config: dict) -> BertEncoder:
        return build(config)

    def prepare_runtime(self, model: BertEncoder, config: dict, fast_blocks: bool = True) -> None:
        """Each encoder layer becomes one engine.transformer.SparseEncoderLayer (Q/K/V stacked into
        one sparse matrix in the artifact's own layout, bias + activation in the kernel epilogue);
        fast_blocks=False keeps the layer-by-layer modules and only fuses the activation."""
        from ..modules import SparseLinear
        from ..transformer import from_bert_layer
        act = HIDDEN_ACTS[config["hidden_act"]][0]
        for i, layer in enumerate(model.encoder.layer):
            inter = layer.intermediate
            if isinstance(inter.dense, SparseLinear):
                inter.dense.activation = act
                inter.act = nn.Identity()
            if fast_blocks:
                # Linear layers the artifact kept as nn.Linear stay dense (layout "dense").
                opts = dict(format="dense", blocksize=None, dtype=None, min_sparsity=0.0, batch=8)
                model.encoder.layer[i] = from_bert_layer(layer, opts)

    def attach_tokenizer(self, model: BertEncoder, config: dict, tokenizer) -> None:
        if tokenizer is not None:
            # Configured once here, never per call, so concurrent encode() calls share no mutable state.
            tokenizer.enable_truncation(max_length=config["max_seq_length"])
            tokenizer.enable_padding(pad_id=config.get("pad_token_id") or 0)
        model.tokenizer = tokenizer

    def example_inputs(self, config: dict, batch: int, generator: torch.Generator, seq: int = 16) -> tuple:
        seq = min(seq, config["max_position_embeddings"])
        ids = torch.randint(0, config["vocab_size"], (batch, seq), generator=generator)
        mask = torch.ones(batch, seq, dtype=torch.long)
        mask[1:, seq * 2 // 3:] = 0  # padding in every sample but the first
        return ids, mask

    def spec(self, config: dict, name: str, model: BertEncoder) -> dict:
        h = config["hidden_size"]
        inputs = [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                  {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]}]
        outputs = [{"name": "last_hidden_state", "datatype": "FP32", "shape": [-1, -1, h]}]
        if model.tokenizer is not None:
            inputs.append({"name": "text", "datatype": "BYTES", "shape": [-1]})
            outputs.append({"name": "embedding", "datatype": "FP32", "shape": [-1, h]})
        return {"family": self.name, "name": name, "inputs": inputs, "outputs": outputs,
                "max_seq_len": config["max_position_embeddings"]}

    def request(self, model: BertEncoder, spec: dict, inputs: dict, outputs: list[str] | None):
        if "text" in inputs:
            if len(inputs) > 1:
                raise InputError(f"input 'text' cannot be combined with "
                                 f"{', '.join(repr(n) for n in inputs if n != 'text')}")
            ids, mask = self._tokenize(model, inputs["text"])
            outputs = outputs or ["embedding"]
        else:
            ids, mask = self._check_ids(model, inputs)
            outputs = outputs or ["last_hidden_state"]
            if "embedding" in outputs:
                raise InputError("output 'embedding' needs the 'text' input (send raw text)")
        return Tokens(ids, mask, "embedding" in outputs), outputs

    @staticmethod
    def _tokenize(model: BertEncoder, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        # The tokenizer truncates at its own limit (sentence-transformers' max_seq_length, often
        # below max_position_embeddings): quote that limit, the one the text ran into.
        limit = model.tokenizer.truncation["max_length"]
        encodings = model.tokenizer.encode_batch(texts)  # padded to the longest (enable_padding)
        for i, enc in enumerate(encodings):
            if enc.overflowing:
                raise InputError(f"input 'text': string {i} is longer than the model's {limit} tokens "
                                 "(its tokenizer's limit); split it or shorten it")
        return (np.asarray([e.ids for e in encodings], dtype=np.int64),
                np.asarray([e.attention_mask for e in encodings], dtype=np.int64))

    @staticmethod
    def _check_ids(model: BertEncoder, inputs: dict) -> tuple[np.ndarray, np.ndarray]:
        c = model.config
        if "input_ids" not in inputs:
            raise InputError("missing input 'input_ids'" + (" (or 'text')" if model.tokenizer else ""))
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask")  # missing: attend to every token
        mask = np.ones_like(ids) if mask is None else mask
        if mask.shape != ids.shape:
            raise InputError(f"'attention_mask' shape {list(mask.shape)} differs from 'input_ids' shape "
                             f"{list(ids.shape)}")
        if not 1 <= ids.shape[1] <= c["max_position_embeddings"]:
            raise InputError(f"input 'input_ids': sequence length {ids.shape[1]} is outside "
                             f"1..{c['max_position_embeddings']} (the model's max_seq_len)")
        for name, a in (("input_ids", ids), ("attention_mask", mask)):
            if a.size and a.min() < 0:
                raise InputError(f"input '{name}': negative value {int(a.min())}; token ids and masks "
                                 "are non-negative")
        if mask.size and mask.max() > 1:
            raise InputError(f"input 'attention_mask': values must be 0 or 1, got {int(mask.max())}")
        # The word-embedding table, not the tokenizer, bounds the ids the model accepts.
        if ids.size and ids.max() >= c["vocab_size"]:
            raise InputError(f"input 'input_ids': token id {int(ids.max())} is outside the vocabulary "
                             f"(0..{c['vocab_size'] - 1})")
        return ids, mask

    def run(self, model: BertEncoder, spec: dict, items: list[Tokens], device) -> list[dict]:
        ids, mask = (torch.from_numpy(a).to(device) for a in pad([t.ids for t in items], [t.mask for t in items]))
        hidden = model(ids, attention_mask=mask)  # (B, L, H)
        rows = [t.ids.shape[0] for t in items]
        outputs = {"last_hidden_state": hidden}
        if any(t.pooled for t in items):
            outputs["embedding"] = model.pool(hidden, mask)
        parts = split_rows(outputs, rows)
        for part, t in zip(parts, items):
            part["last_hidden_state"] = part["last_hidden_state"][:, :t.ids.shape[1]]
        return parts

    def output_shapes(self, spec: dict, item: Tokens, outputs: list[str]) -> dict:
        (n, length), h = item.ids.shape, spec["outputs"][0]["shape"][-1]
        return {name: [n, length, h] if name == "last_hidden_state" else [n, h] for name in outputs}

    def warmup_requests(self, model: BertEncoder, spec: dict, rows: int) -> list:
        text = [({"text": ["warm up"] * rows}, None)] if model.tokenizer is not None else []
        return super().warmup_requests(model, spec, rows) + text


FAMILY = register_family(BertFamily())
