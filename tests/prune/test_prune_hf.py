"""`prune --hf`: a tiny random Hugging Face BERT folder pruned on a small text file, written as a
folder that convert, engine.load and transformers read; distillation keeps the masks; bad input
fails with a clear error and writes nothing."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import engine
from engine.cli import main as cli
from engine.convert import convert
from engine.prune import PruneError
from engine.prune.hf import REPORT_JSON, REPORT_PNG, load_folder, prune_folder
from tests.models.test_bert import WORDS, tiny_tokenizer

CONFIG = dict(vocab_size=48, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
              max_position_embeddings=40, type_vocab_size=2, hidden_act="gelu", layer_norm_eps=1e-12, pad_token_id=0)
quiet = dict(log=lambda *_: None)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from transformers import BertConfig, BertModel
    torch.manual_seed(7)
    path = tmp_path_factory.mktemp("hf") / "tiny"
    BertModel(BertConfig(**CONFIG), add_pooling_layer=False).save_pretrained(path, safe_serialization=True)
    tiny_tokenizer().save(str(path / "tokenizer.json"))
    return path


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    g = torch.Generator().manual_seed(3)
    lines = [" ".join(WORDS[i] for i in torch.randint(0, len(WORDS), (int(n),), generator=g)) + "."
             for n in torch.randint(4, 14, (200,), generator=g)]
    path = tmp_path_factory.mktemp("text") / "text.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _run(folder, text_file, out, **kw):
    args = dict(method="sparsegpt", sparsity=0.5, text=str(text_file), calib_samples=8, seq_len=24, val_sentences=16)
    args.update(kw)
    return prune_folder(folder, out, **args, **quiet)


@pytest.mark.parametrize("method,gran", [("sparsegpt", "unstructured"), ("wanda", "nm:2:4"),
                                         ("sparsegpt", "block:8x8")])
def test_folder_round_trips_through_convert_and_load(folder, text, tmp_path, method, gran):
    out = tmp_path / "pruned"
    report = _run(folder, text, out, method=method, granularity=gran)
    assert {"config.json", "model.safetensors", "tokenizer.json", REPORT_JSON, REPORT_PNG} <= {p.name for p in out.iterdir()}
    assert json.loads((out / REPORT_JSON).read_text())["method"] == method
    assert abs(report["measured_sparsity"] - 0.5) < 0.02
    tensors = load_file(str(out / "model.safetensors"))
    masks = {k[:-5]: v.bool() for k, v in tensors.items() if k.endswith("_mask")}
    assert len(masks) == 6 * CONFIG["num_hidden_layers"]
    for key, keep in masks.items():
        assert (tensors[key][~keep] == 0).all() and (tensors[key][keep] != 0).all()
    # convert reads the folder; the artifact's embeddings equal the pruned model's in torch
    convert(out, tmp_path / "m.sparse", **quiet)
    sparse = engine.load(tmp_path / "m.sparse")
    pruned = load_folder(out).model
    sentences = ["the cat sat on the mat.", "sparse kernels run fast", "prune the model weights in block"]
    torch.testing.assert_close(sparse.encode(sentences), pruned.encode(sentences), atol=1e-5, rtol=1e-4)
    # and transformers still loads it, with the pruned weights
    from transformers import BertModel
    hf = BertModel.from_pretrained(out)
    key = "encoder.layer.0.attention.self.query.weight"
    assert torch.equal(hf.state_dict()[key], tensors[key])


def test_masks_hold_through_distillation(folder, text, tmp_path):
    out = tmp_path / "distilled"
    report = _run(folder, text, out, sparsity=0.7, distill_steps=6,
                  distill=dict(eval_every=3, batch=4, lr=1e-3))
    assert [s["step"] for s in report["steps"]] == [0, 3, 6]
    tensors = load_file(str(out / "model.safetensors"))
    original = load_file(str(folder / "model.safetensors"))
    changed = 0
    for key, mask in ((k[:-5], v.bool()) for k, v in tensors.items() if k.endswith("_mask")):
        assert (tensors[key][~mask] == 0).all()
        assert abs(1 - float(mask.float().mean()) - 0.7) < 0.02
        changed += int(not torch.equal(tensors[key], original[key] * mask))
    assert changed > 0  # training moved the kept weights


def test_gradual_schedule_reaches_the_target(folder, text, tmp_path):
    report = _run(folder, text, tmp_path / "g", method="wanda", sparsity=0.6, distill_steps=8, schedule="gradual",
                  distill=dict(eval_every=4, batch=4))
    assert report["steps"][0]["step"] == 0
    assert abs(report["measured_sparsity"] - 0.6) < 0.02


def test_gradual_from_an_initial_sparsity_prunes_on_time_under_a_budget(folder, text, tmp_path):
    """--initial-sparsity 0.5 -> 0.7 in 2 re-prunings; 10**6 steps never come: the ramp follows the clock."""
    logged = []
    report = prune_folder(folder, tmp_path / "g", method="wanda", sparsity=0.7, text=str(text), calib_samples=8,
                          seq_len=24, val_sentences=16, distill_steps=10 ** 6, schedule="gradual",
                          initial_sparsity=0.5, prune_steps=2, log=logged.append,
                          distill=dict(eval_every=10 ** 6, batch=4, time_budget=4.0))
    assert report["initial_sparsity"] == 0.5 and report["prune_steps"] == 2
    assert abs(report["measured_sparsity"] - 0.7) < 0.02
    pruned = [float(m.split("pruned to ")[1]) for m in logged if "pruned to" in m]
    assert len(pruned) == 2 and pruned[0] < 0.7 and pruned[-1] == pytest.approx(0.7)
    assert report["steps"][-1]["seconds"] < 4.0 + 30 and report["steps"][-1]["step"] < 10 ** 6


@pytest.mark.parametrize("kw,message", [
    (dict(schedule="gradual", initial_sparsity=0.7), r"--initial-sparsity must lie in \[0, --sparsity 0.6\)"),
    (dict(schedule="gradual", prune_steps=0), "--prune-steps must be >= 1"),
    (dict(initial_sparsity=0.3), "add --schedule gradual"),
])
def test_gradual_options_are_checked(folder, text, tmp_path, kw, message):
    with pytest.raises(PruneError, match=message):
        _run(folder, text, tmp_path / "bad", sparsity=0.6, distill_steps=4, **kw)


def _broken(folder, tmp_path, what):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    if what == "gpt2":
        cfg = json.loads((bad / "config.json").read_text())
        (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    else:
        (bad / "tokenizer.json").unlink()
    return bad


@pytest.mark.parametrize("case,message", [
    ("gpt2", "model_type 'gpt2', which no registered model family recognises"),
    ("no-tokenizer", "no tokenizer.json"),
    ("empty-text", "holds 0 non-empty line"),
    ("latin1-text", "not UTF-8 text"),
    ("sparsity", r"sparsity must be in \[0, 1\), got 1.0"),
    ("not-a-folder", "not a Hugging Face model folder"),
    ("skip", "--skip 'decoder.*' matches no prunable layer"),
])
def test_bad_input_fails_clearly_and_writes_nothing(folder, text, tmp_path, case, message):
    src, kw = folder, {}
    if case in ("gpt2", "no-tokenizer"):
        src = _broken(folder, tmp_path, case)
    elif case == "empty-text":
        (tmp_path / "e.txt").write_text("\n  \n")
        kw["text"] = str(tmp_path / "e.txt")
    elif case == "latin1-text":
        (tmp_path / "l.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1") * 5)
        kw["text"] = str(tmp_path / "l.txt")
    elif case == "sparsity":
        kw["sparsity"] = 1.0
    elif case == "not-a-folder":
        src = tmp_path / "nothing"
    elif case == "skip":
        kw["skip"] = ["decoder.*"]
    out = tmp_path / "out"
    with pytest.raises(PruneError, match=message):
        _run(src, text, out, **kw)
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]


def test_cli_prune_hf(folder, text, tmp_path, capsys):
    out = tmp_path / "cli"
    rc = cli(["prune", "--hf", str(folder), "--method", "wanda", "--granularity", "nm:2:4", "--sparsity", "0.5",
              "--text", str(text), "--calib-samples", "4", "--seq-len", "16", "--val-sentences", "8",
              "--skip", "encoder.layer.1.output.*", "-o", str(out), "--quiet"])
    assert rc == 0
    report = json.loads((out / REPORT_JSON).read_text())
    assert report["skip"] == ["encoder.layer.1.output.dense"] and "encoder.layer.1.output.dense" not in report["layers"]
    rc = cli(["prune", "--hf", str(folder), "--method", "snip", "--sparsity", "0.5", "-o", str(tmp_path / "x")])
    assert rc == 2 and "folders are pruned with magnitude, wanda, sparsegpt, taylor" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
