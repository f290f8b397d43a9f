"""Prefix tuning parity against peft's PrefixTuningConfig on a tiny Llama, files, bad input."""

from __future__ import annotations

import json

import pytest
import torch
from llama_pairs import llama_pair, ours_llama, token_batch

from mlatlas.llm.llama import next_token_loss
from mlatlas.peft.prefix import (
    PrefixConfig,
    PrefixEncoder,
    PrefixTunedLM,
    load_prefix,
    save_prefix,
)

ATOL = RTOL = 1e-5  # fp32 CPU
P = 5  # virtual tokens


def pair(transformers, peft, projection: bool):
    """peft prefix tuning on HF, ours on the same base; peft's prompt encoder copied."""
    ours, hf = llama_pair(transformers)
    pm = peft.get_peft_model(hf, peft.PrefixTuningConfig(
        task_type="CAUSAL_LM", num_virtual_tokens=P, prefix_projection=projection,
        encoder_hidden_size=13))
    tuned = PrefixTunedLM(ours, PrefixConfig(num_virtual_tokens=P, prefix_projection=projection,
                                             encoder_hidden_size=13))
    theirs = pm.prompt_encoder["default"].state_dict()
    mine = tuned.prefix.state_dict()
    key_map = {"embedding.weight": "embedding.weight"}
    if projection:
        key_map.update({f"transform.{i}.{w}": f"transform.{i}.{w}"
                        for i in (0, 2) for w in ("weight", "bias")})
    assert set(key_map) == set(mine) and set(key_map.values()) == set(theirs)
    tuned.prefix.load_state_dict({k: theirs[v] for k, v in key_map.items()}, strict=True)
    return tuned, pm


@pytest.mark.parametrize("projection", [False, True])
def test_logits_and_prefix_grads_match_peft(reference, projection):
    transformers, peft = reference("transformers"), reference("peft")
    tuned, pm = pair(transformers, peft, projection)
    ids = token_batch(3, 9)
    logits = tuned(ids)
    ref = pm(input_ids=ids).logits
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=RTOL)
    base = ours_llama()(ids)
    assert (logits - base).abs().max() > 1e-2, "the prefix must change the output"
    # with an all-ones attention mask too (peft prepends ones for the prefix)
    mask = torch.ones_like(ids)
    torch.testing.assert_close(tuned(ids, attention_mask=mask),
                               pm(input_ids=ids, attention_mask=mask).logits,
                               atol=ATOL, rtol=RTOL)
    next_token_loss(logits, ids).backward()
    pm(input_ids=ids, labels=ids).loss.backward()
    theirs = dict(pm.prompt_encoder["default"].named_parameters())
    for name, p in tuned.prefix.named_parameters():
        torch.testing.assert_close(p.grad, theirs[name].grad, atol=ATOL, rtol=RTOL,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")
    assert all(p.grad is None for p in tuned.base.parameters()), "the base stays frozen"


def test_generate_with_cache_equals_recompute_and_right_padding():
    tuned = PrefixTunedLM(ours_llama(), PrefixConfig(num_virtual_tokens=3,
                                                     prefix_projection=True))
    prompt = token_batch(2, 4)
    cached = tuned.generate(prompt, 6)
    assert torch.equal(cached, tuned.generate(prompt, 6, use_cache=False))
    # a right-padded row's real tokens equal the row run alone
    ids = token_batch(2, 8, seed=5)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    got = tuned(ids, attention_mask=mask)
    torch.testing.assert_close(got[1, :6], tuned(ids[1:, :6])[0], atol=ATOL, rtol=RTOL)
    # incremental decoding over a prefix-filled cache equals one full pass
    cache = tuned.new_cache()
    parts = [tuned(ids[:, :5], cache=cache), tuned(ids[:, 5:6], cache=cache),
             tuned(ids[:, 6:], cache=cache)]
    assert cache.seq_len == 3 + 8
    torch.testing.assert_close(torch.cat(parts, 1), tuned(ids), atol=ATOL, rtol=RTOL)


def test_zero_init_and_trainable_share():
    base = ours_llama()
    ids = token_batch(2, 6)
    tuned = PrefixTunedLM(ours_llama(), PrefixConfig(num_virtual_tokens=4, init="zero"))
    zero_kv = tuned(ids)
    # zero keys/values: every prefix slot scores 0 and adds nothing but softmax mass
    assert not torch.allclose(zero_kv, base(ids))
    trainable = [n for n, p in tuned.named_parameters() if p.requires_grad]
    assert trainable == ["prefix.embedding.weight"]
    assert tuned.prefix.embedding.weight.shape == (4, 2 * 2 * 10)  # L·2·n_kv·D


def test_peft_folder_round_trip(reference, tmp_path):
    transformers, peft = reference("transformers"), reference("peft")
    tuned, pm = pair(transformers, peft, projection=True)
    ids = token_batch(2, 7)
    want = pm(input_ids=ids).logits
    save_prefix(tuned, tmp_path / "ours")
    # peft reads ours
    _, hf = llama_pair(transformers)
    loaded = peft.PeftModel.from_pretrained(hf, tmp_path / "ours")
    torch.testing.assert_close(loaded(input_ids=ids).logits, want, atol=ATOL, rtol=RTOL)
    # we read peft's
    pm.save_pretrained(tmp_path / "peft")
    ours = load_prefix(ours_llama(), tmp_path / "peft")
    torch.testing.assert_close(ours(ids), want, atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------ bad input
def test_bad_input(tmp_path):
    for value in (0, -3, 1.5):
        with pytest.raises(ValueError, match="num_virtual_tokens must be a positive int"):
            PrefixConfig(num_virtual_tokens=value)
    with pytest.raises(ValueError, match="init must be one of"):
        PrefixConfig(init="xavier")
    with pytest.raises(TypeError, match="base must be a Llama"):
        PrefixTunedLM(torch.nn.Linear(2, 2), PrefixConfig())
    with pytest.raises(ValueError, match=r"must be \(2, 1, 10\) for this base, got \(3, 1, 10\)"):
        PrefixTunedLM(ours_llama(), PrefixEncoder(PrefixConfig(), 3, 1, 10))
    tuned = PrefixTunedLM(ours_llama(), PrefixConfig(num_virtual_tokens=2))
    save_prefix(tuned, tmp_path)
    with pytest.raises(ValueError, match=r"does not fit this base: \{'num_layers': 'file 2, "
                                         r"model 3'\}"):
        load_prefix(ours_llama(num_layers=3), tmp_path)
    cfg = json.loads((tmp_path / "adapter_config.json").read_text())
    (tmp_path / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "LORA"}))
    with pytest.raises(ValueError, match="peft_type must be 'PREFIX_TUNING'"):
        load_prefix(ours_llama(), tmp_path)
