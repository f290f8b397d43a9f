"""The shared pretrained-model zoo: content-addressed, cached, verified, rebuilt when stale."""

from __future__ import annotations

import json
import warnings
from dataclasses import replace

import pytest
import torch

from mlatlas.llm import zoo
from mlatlas.llm.zoo import TinyLlamaRecipe, tiny_llama

MICRO = TinyLlamaRecipe(hidden_size=32, intermediate_size=64, num_layers=1, num_heads=2,
                        num_kv_heads=1, max_position_embeddings=64, steps=2, batch=2,
                        seq_len=16, warmup=1)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MLATLAS_CACHE", str(tmp_path))
    return tmp_path / "zoo"


def test_key_addresses_the_content():
    assert MICRO.key() == replace(MICRO).key()
    assert MICRO.key() != replace(MICRO, seed=1).key()
    assert MICRO.key() != replace(MICRO, steps=3).key()
    assert TinyLlamaRecipe().key().startswith("tiny-llama-")


def test_builds_once_then_loads_fresh_copies(cache, monkeypatch):
    lm = tiny_llama(MICRO)
    assert lm.folder == cache / MICRO.key() and lm.val_loss > 0
    assert lm.config.hidden_size == 32 and not lm.model.training
    manifest = json.loads((lm.folder / "zoo.json").read_text())
    assert manifest["key"] == MICRO.key() and set(manifest["sha256"]) == set(zoo._FILES)

    def no_build(*a, **k):
        raise AssertionError("a valid cached model must not be rebuilt")

    monkeypatch.setattr(zoo, "build_tiny_llama", no_build)
    again = tiny_llama(MICRO)
    for (name, a), b in zip(lm.model.state_dict().items(), again.model.state_dict().values()):
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
    with torch.no_grad():
        again.model.embed_tokens.weight.zero_()  # fine-tuning one copy …
    third = tiny_llama(MICRO)
    assert third.model.embed_tokens.weight.abs().sum() > 0  # … leaves the next one intact
    text = "Return the number of items."
    assert lm.tokenizer.encode(text) == zoo.load_corpus("bpe", 512).tokenizer.encode(text)


def test_corrupt_or_stale_cache_is_detected_and_rebuilt(cache):
    folder = tiny_llama(MICRO).folder
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"\0" * 8)  # flip the last bytes
    with pytest.warns(UserWarning, match=r"checksum mismatch in \['model.safetensors'\]"):
        lm = tiny_llama(MICRO)
    assert zoo._verify(lm.folder, MICRO.key(), warn=False)
    manifest = json.loads((folder / "zoo.json").read_text())
    (folder / "zoo.json").write_text(json.dumps({**manifest, "key": "tiny-llama-old"}))
    with pytest.warns(UserWarning, match="stale"):
        tiny_llama(MICRO)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_llama(MICRO)  # rebuilt: no warning any more


def test_the_folder_is_a_transformers_checkpoint(cache, reference):
    transformers = reference("transformers")
    lm = tiny_llama(MICRO)
    hf = transformers.LlamaForCausalLM.from_pretrained(lm.folder).eval()
    ids = torch.tensor([lm.tokenizer.encode("def f(x): return x")])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids), hf(ids).logits, atol=1e-5, rtol=1e-5)


def test_bad_recipe():
    with pytest.raises(TypeError, match="recipe must be a TinyLlamaRecipe, got dict"):
        tiny_llama({"steps": 3})


def test_the_default_model_is_pretrained(reference):
    from mlatlas.datasets.corpus import load_corpus, unigram_entropy

    lm = tiny_llama()
    corpus = load_corpus("bpe", lm.recipe.vocab_size)
    # it uses context: validation loss well below the best context-free predictor's
    assert lm.val_loss < unigram_entropy(corpus.val, lm.tokenizer.vocab_size) - 1.0
