"""Text in, measurements out, for encoders: token batches from a tokenizer.json, and how close a
pruned model's sentence embeddings stay to the dense model's."""
from __future__ import annotations

import torch


def tokenizer(text: str, seq_len: int | None = None):
    """A tokenizers.Tokenizer from tokenizer.json text; with `seq_len`, truncating and padding."""
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(text)
    if seq_len is not None:
        tok.enable_truncation(max_length=seq_len)
        tok.enable_padding()
    return tok


def token_batches(tok, texts: list[str], batch: int = 16) -> list[tuple]:
    """(input_ids, attention_mask) batches of `texts`; `tok` from `tokenizer(json, seq_len)`."""
    out = []
    for i in range(0, len(texts), batch):
        enc = tok.encode_batch(texts[i:i + batch])
        out.append((torch.tensor([e.ids for e in enc]), torch.tensor([e.attention_mask for e in enc])))
    return out


def fidelity(dense: torch.Tensor, pruned: torch.Tensor) -> dict:
    """Mean / min cosine of L2-normalised embeddings to dense, and nearest-neighbour agreement: how
    often a sentence's nearest other sentence is the same under both models."""
    d = torch.nn.functional.normalize(dense.float(), dim=-1)
    p = torch.nn.functional.normalize(pruned.float(), dim=-1)
    cos = (d * p).sum(-1)

    def nearest(e):
        sim = e @ e.T
        sim.fill_diagonal_(float("-inf"))
        return sim.argmax(-1)
    return {"cosine_mean": float(cos.mean()), "cosine_min": float(cos.min()),
            "nn_agreement": float((nearest(d) == nearest(p)).float().mean())}
