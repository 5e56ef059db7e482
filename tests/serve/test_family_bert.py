"""The BERT family's serving limits, against a real server: text is limited by the tokenizer's
truncation length (sentence-transformers' max_seq_length), token ids by the position table, and a
refusal quotes the limit the input actually ran into (all-MiniLM-L6-v2: 256 tokens, not 512)."""
from __future__ import annotations

import json
import shutil

import httpx
import numpy as np
import pytest
import torch

import engine
from engine.convert import convert
from engine.models import InputError, get_family
from tests.models.test_bert import CONFIG, hf_bert  # noqa: F401  (fixture)
from tests.serve.test_server import Server, int64, output

TOKENIZER_LIMIT = 12  # below max_position_embeddings (40), as MiniLM's 256 is below its 512

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def limited(hf_bert, tmp_path_factory):  # noqa: F811
    folder, _ = hf_bert
    tmp = tmp_path_factory.mktemp("limited")
    shutil.copytree(folder, tmp / "bert")
    (tmp / "bert" / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": TOKENIZER_LIMIT}))
    convert(tmp / "bert", tmp / "bert.spz", log=lambda *_: None)
    return tmp / "bert.spz"


def _text(tokens: int) -> str:
    return " ".join(["cat"] * (tokens - 2))  # [CLS] and [SEP] make up the rest


def test_text_limit_is_the_tokenizers_and_ids_limit_the_position_table(limited):
    model = engine.load(limited)
    bert = get_family("bert")
    assert model.tokenizer.truncation["max_length"] == TOKENIZER_LIMIT
    item, outputs = bert.request(model, model.spec, {"text": [_text(TOKENIZER_LIMIT)]}, None)
    assert item.ids.shape == (1, TOKENIZER_LIMIT) and outputs == ["embedding"]
    h = CONFIG["hidden_size"]
    assert bert.output_shapes(model.spec, item, ["last_hidden_state", "embedding"]) == {
        "last_hidden_state": [1, TOKENIZER_LIMIT, h], "embedding": [1, h]}
    with pytest.raises(InputError, match=f"string 1 is longer than the model's {TOKENIZER_LIMIT} tokens"):
        bert.request(model, model.spec, {"text": ["a dog", _text(TOKENIZER_LIMIT + 1)]}, None)
    # Ids are not tokenized: the position table bounds them.
    ids = np.ones((1, CONFIG["max_position_embeddings"]), dtype=np.int64)
    bert.request(model, model.spec, {"input_ids": ids}, None)
    with pytest.raises(InputError, match=f"outside 1..{CONFIG['max_position_embeddings']}"):
        bert.request(model, model.spec, {"input_ids": np.ones((1, 41), dtype=np.int64)}, None)


def test_server_quotes_the_tokenizers_limit(limited):
    local = engine.load(limited)
    srv = Server([str(limited), "--name", "bert"])
    try:
        with httpx.Client(base_url=srv.url, timeout=60) as client:
            def text(*texts):
                return client.post("/v2/models/bert/infer", json={"inputs": [
                    {"name": "text", "shape": [len(texts)], "datatype": "BYTES", "data": list(texts)}]})

            r = text(_text(TOKENIZER_LIMIT + 1))
            assert r.status_code == 400, r.text
            message = r.json()["error"]
            assert f"longer than the model's {TOKENIZER_LIMIT} tokens" in message
            assert str(CONFIG["max_position_embeddings"]) not in message
            r = text(_text(TOKENIZER_LIMIT), "a dog")
            assert r.status_code == 200, r.text
            np.testing.assert_allclose(output(r.json(), "embedding"),
                                       local.encode([_text(TOKENIZER_LIMIT), "a dog"]).numpy(),
                                       rtol=1e-5, atol=1e-5)
            ids = np.ones((1, TOKENIZER_LIMIT + 5), dtype=np.int64)  # longer than text may be: fine
            r = client.post("/v2/models/bert/infer", json={"inputs": [int64("input_ids", ids)]})
            assert r.status_code == 200, r.text
    finally:
        assert srv.stop() == 0, srv.log()


def test_tokenizer_limit_never_exceeds_the_position_table(hf_bert, tmp_path):  # noqa: F811
    folder, _ = hf_bert
    shutil.copytree(folder, tmp_path / "bert")
    (tmp_path / "bert" / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 100}))
    convert(tmp_path / "bert", tmp_path / "bert.spz", log=lambda *_: None)
    model = engine.load(tmp_path / "bert.spz")
    assert model.tokenizer.truncation["max_length"] == CONFIG["max_position_embeddings"] == 40
    item, _ = get_family("bert").request(model, model.spec, {"text": [_text(40)]}, None)
    with torch.inference_mode():
        assert model(torch.from_numpy(item.ids)).shape == (1, 40, CONFIG["hidden_size"])
