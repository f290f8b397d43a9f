"""LLaMA / Llama 3 parity against transformers.LlamaForCausalLM, KV cache, HF folders, errors."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlatlas.llm.hf_format import config_from_hf, config_to_hf, hf_key_map
from mlatlas.llm.llama import KVCache, Llama, LlamaConfig, next_token_loss

ATOL = RTOL = 1e-5  # fp32 CPU

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 200}

# Llama-1 style: multi-head attention, default RoPE, untied head.
# Llama-3 style: GQA (6 query heads share 2 kv heads), head_dim 10 ≠ d/n_h, large theta,
# llama3 RoPE scaling (original context chosen so all three frequency bands occur), tied head.
CONFIGS = {
    "llama1": dict(ours=dict(vocab_size=97, hidden_size=48, intermediate_size=88, num_layers=3,
                             num_heads=6, rms_norm_eps=1e-6, max_position_embeddings=64),
                   hf=dict(vocab_size=97, hidden_size=48, intermediate_size=88,
                           num_hidden_layers=3, num_attention_heads=6, rms_norm_eps=1e-6,
                           max_position_embeddings=64)),
    "llama3": dict(ours=dict(vocab_size=97, hidden_size=48, intermediate_size=88, num_layers=3,
                             num_heads=6, num_kv_heads=2, head_dim=10, rope_theta=500000.0,
                             rope_scaling=LLAMA3_SCALING, rms_norm_eps=1e-5,
                             max_position_embeddings=64, tie_word_embeddings=True),
                   hf=dict(vocab_size=97, hidden_size=48, intermediate_size=88,
                           num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                           head_dim=10, rms_norm_eps=1e-5, max_position_embeddings=64,
                           rope_parameters={**LLAMA3_SCALING, "rope_theta": 500000.0},
                           tie_word_embeddings=True)),
}


def _pair(transformers, name: str, attn: str = "sdpa"):
    """Our model and an HF model holding the same (random) weights, copied by hf_key_map."""
    torch.manual_seed(0)
    ours = Llama(LlamaConfig(**CONFIGS[name]["ours"]))
    with torch.no_grad():  # perturb the RMSNorm gains so they matter
        for n, p in ours.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    hf_cfg = transformers.LlamaConfig(**CONFIGS[name]["hf"])
    hf_cfg._attn_implementation = attn
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    key_map = hf_key_map(ours.config)
    state = ours.state_dict()
    assert set(key_map) | ({"lm_head.weight"} if ours.config.tie_word_embeddings else set()) \
        == set(state), "key map must cover our whole state dict"
    hf_state = hf.state_dict()
    assert set(key_map.values()) | ({"lm_head.weight"} if ours.config.tie_word_embeddings
                                    else set()) == set(hf_state)
    missing, unexpected = hf.load_state_dict({key_map[k]: state[k] for k in key_map},
                                             strict=False)
    assert unexpected == []
    assert missing == (["lm_head.weight"] if ours.config.tie_word_embeddings else [])
    if ours.config.tie_word_embeddings:
        assert hf.lm_head.weight is hf.model.embed_tokens.weight
    return ours, hf


@pytest.mark.parametrize("name,attn", [("llama1", "sdpa"), ("llama3", "sdpa"),
                                       ("llama3", "eager")])
def test_logits_and_grads_match_transformers(reference, name, attn):
    transformers = reference("transformers")
    ours, hf = _pair(transformers, name, attn)
    ids = torch.randint(0, 97, (3, 37), generator=torch.Generator().manual_seed(1))
    logits = ours(ids)
    ref = hf(ids).logits
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=RTOL)
    # loss gradients, compared parameter by parameter through the key map
    loss = next_token_loss(logits, ids)
    ref_loss = hf(ids, labels=ids).loss
    torch.testing.assert_close(loss, ref_loss, atol=ATOL, rtol=RTOL)
    loss.backward()
    ref_loss.backward()
    hf_params = dict(hf.named_parameters())
    for ours_name, hf_name in hf_key_map(ours.config).items():
        got = dict(ours.named_parameters())[ours_name].grad
        torch.testing.assert_close(got, hf_params[hf_name].grad, atol=ATOL, rtol=RTOL,
                                   msg=lambda m, n=ours_name: f"grad of {n}: {m}")


def test_left_padded_batch_matches_transformers(reference):
    transformers = reference("transformers")
    ours, hf = _pair(transformers, "llama3")
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, 97, (2, 23), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :7] = 0  # row 0 is left-padded by 7
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    got = ours(ids, pos, attention_mask=mask)
    ref = hf(ids, attention_mask=mask, position_ids=pos).logits
    real = mask.bool()
    torch.testing.assert_close(got[real], ref[real], atol=ATOL, rtol=RTOL)
    # and the padded row equals the same prompt run alone without padding
    alone = ours(ids[:1, 7:])
    torch.testing.assert_close(got[0, 7:], alone[0], atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", ["llama1", "llama3"])
def test_kv_cache_equals_full_recompute(name):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**CONFIGS[name]["ours"])).eval()
    ids = torch.randint(0, 97, (2, 29), generator=torch.Generator().manual_seed(3))
    full = model(ids)
    cache = model.new_cache()
    # prefill 11, then one token, then a 5-token chunk (needs the offset causal mask), then 1s
    chunks, start = [11, 1, 5] + [1] * 12, 0
    pieces = []
    for n in chunks:
        pieces.append(model(ids[:, start:start + n], cache=cache))
        start += n
    assert start == 29 and cache.seq_len == 29
    torch.testing.assert_close(torch.cat(pieces, 1), full, atol=ATOL, rtol=RTOL)
    cache.crop(17)  # roll back and re-decode
    assert cache.seq_len == 17
    torch.testing.assert_close(model(ids[:, 17:], cache=cache), full[:, 17:], atol=ATOL,
                               rtol=RTOL)


def test_generate_greedy_matches_transformers_and_cache(reference):
    transformers = reference("transformers")
    ours, hf = _pair(transformers, "llama3")
    prompt = torch.randint(0, 97, (2, 5), generator=torch.Generator().manual_seed(4))
    cached = ours.generate(prompt, 12)
    uncached = ours.generate(prompt, 12, use_cache=False)
    ref = hf.generate(prompt, max_new_tokens=12, do_sample=False, attention_mask=torch.ones_like(
        prompt), pad_token_id=0, eos_token_id=None)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, ref)


def test_generate_eos_sampling_and_left_padding():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**CONFIGS["llama3"]["ours"])).eval()
    prompt = torch.randint(0, 97, (3, 6), generator=torch.Generator().manual_seed(5))
    greedy = model.generate(prompt, 10)
    eos = int(greedy[0, 8])  # a token row 0 emits at step 3
    stopped = model.generate(prompt, 10, eos_token_id=eos)
    first = (stopped[0, 6:] == eos).nonzero()[0, 0]
    assert torch.equal(stopped[0, 6:6 + first + 1], greedy[0, 6:6 + first + 1])
    assert bool((stopped[0, 6 + first:] == eos).all())  # filled with eos once stopped
    # seeded sampling is reproducible; top_k=1 and a tiny top_p are greedy
    kw = dict(temperature=1.3, top_k=20, top_p=0.9)
    a = model.generate(prompt, 10, generator=torch.Generator().manual_seed(7), **kw)
    b = model.generate(prompt, 10, generator=torch.Generator().manual_seed(7), **kw)
    c = model.generate(prompt, 10, generator=torch.Generator().manual_seed(7), use_cache=False,
                       **kw)
    assert torch.equal(a, b) and torch.equal(a, c)
    assert torch.equal(model.generate(prompt, 10, temperature=1.0, top_k=1), greedy)
    assert torch.equal(model.generate(prompt, 10, temperature=1.0, top_p=1e-6,
                                      generator=torch.Generator().manual_seed(0)), greedy)
    # a left-padded batch continues each row as if it were alone
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), prompt[1:2, 3:]], 1)
    mask = torch.tensor([[0, 0, 0, 1, 1, 1]])
    out = model.generate(torch.cat([prompt[:1], padded]), 8,
                         attention_mask=torch.cat([torch.ones(1, 6, dtype=torch.long), mask]))
    alone = model.generate(prompt[1:2, 3:], 8)
    assert torch.equal(out[1, 6:], alone[0, 3:])
    assert torch.equal(out[0], model.generate(prompt[:1], 8)[0])


def test_filters_match_transformers_warpers(reference):
    transformers = reference("transformers")
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    from mlatlas.llm.generation import filter_logits

    logits = torch.randn(4, 97, generator=torch.Generator().manual_seed(6))
    assert transformers is not None
    for k in (1, 7, 50):
        ref = TopKLogitsWarper(k)(None, logits.clone())
        assert torch.equal(filter_logits(logits, top_k=k).isinf(), ref.isinf())
    for p in (0.05, 0.5, 0.9):
        ref = TopPLogitsWarper(p)(None, logits.clone())
        assert torch.equal(filter_logits(logits, top_p=p).isinf(), ref.isinf())


@pytest.mark.parametrize("name", ["llama1", "llama3"])
def test_save_pretrained_loads_in_transformers_and_back(reference, tmp_path, name):
    transformers = reference("transformers")
    torch.manual_seed(0)
    ours = Llama(LlamaConfig(**CONFIGS[name]["ours"])).eval()
    ids = torch.randint(0, 97, (2, 19), generator=torch.Generator().manual_seed(8))
    ours.save_pretrained(tmp_path / "ours")
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "ours").eval()
    torch.testing.assert_close(hf(ids).logits, ours(ids), atol=ATOL, rtol=RTOL)
    # and a folder written by transformers loads into ours
    hf.save_pretrained(tmp_path / "hf")
    back = Llama.from_pretrained(tmp_path / "hf")
    assert back.config == ours.config
    torch.testing.assert_close(back(ids), ours(ids), atol=0, rtol=0)


def test_llama3_scaling_covers_all_three_bands():
    from mlatlas.nn.rope import rope_inv_freq

    plain = rope_inv_freq(10, 500000.0)
    scaled = rope_inv_freq(10, 500000.0, LLAMA3_SCALING)
    ratio = plain / scaled
    assert ratio[0] == 1  # high frequency: kept
    assert bool((ratio[2:] == 8).all())  # low frequencies: divided by factor
    assert 1 < ratio[1] < 8  # in between: smoothly interpolated


def test_config_json_round_trip_and_legacy_rope_keys():
    cfg = LlamaConfig(**CONFIGS["llama3"]["ours"])
    assert config_from_hf(config_to_hf(cfg)) == cfg
    legacy = {k: v for k, v in config_to_hf(cfg).items() if k != "rope_parameters"}
    # transformers 4.x: rope_theta + rope_scaling
    assert config_from_hf(legacy) == cfg
    legacy["rope_scaling"] = {k: v for k, v in LLAMA3_SCALING.items() if k != "rope_type"}
    legacy["rope_scaling"]["type"] = "llama3"  # the oldest spelling
    assert config_from_hf(legacy) == cfg


def test_from_pretrained_errors(tmp_path):
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**CONFIGS["llama1"]["ours"]))
    folder = model.save_pretrained(tmp_path / "m")
    tensors = load_file(str(folder / "model.safetensors"))
    # missing tensor
    broken = dict(tensors)
    del broken["model.layers.1.mlp.up_proj.weight"]
    save_file(broken, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing tensors \['model.layers.1.mlp.up_proj"):
        Llama.from_pretrained(folder)
    # unexpected tensor
    save_file({**tensors, "model.extra.weight": torch.zeros(2)}, str(folder /
              "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected \['model.extra.weight'\]"):
        Llama.from_pretrained(folder)
    # wrong shape
    bad = {**tensors, "model.norm.weight": torch.ones(47)}
    save_file(bad, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model.norm.weight: expected shape \(48,\), got \(47,"):
        Llama.from_pretrained(folder)
    # only a pickled checkpoint: refused, never unpickled
    (folder / "model.safetensors").unlink()
    torch.save(tensors, folder / "pytorch_model.bin")
    with pytest.raises(FileNotFoundError, match=r"holds no model.safetensors or "
                                                r"model.safetensors.index.json"):
        Llama.from_pretrained(folder)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        Llama.from_pretrained(tmp_path / "nothing")
    cfg = json.loads((folder / "config.json").read_text())
    with pytest.raises(ValueError, match="model_type must be one of .* got 'gpt2'"):
        config_from_hf({**cfg, "model_type": "gpt2"})
    with pytest.raises(ValueError, match="attention_dropout=0.1 is not supported"):
        config_from_hf({**cfg, "attention_dropout": 0.1})
    with pytest.raises(ValueError, match=r"missing required keys \['num_hidden_layers'\]"):
        config_from_hf({k: v for k, v in cfg.items() if k != "num_hidden_layers"})


def test_config_errors():
    base = CONFIGS["llama1"]["ours"]
    with pytest.raises(ValueError, match=r"num_heads \(6\) must be divisible by num_kv_heads "
                                         r"\(4\)"):
        LlamaConfig(**{**base, "num_kv_heads": 4})
    with pytest.raises(ValueError, match="head_dim must be even"):
        LlamaConfig(**{**base, "head_dim": 9})
    with pytest.raises(ValueError, match=r"hidden_size \(50\) must be divisible by num_heads"):
        LlamaConfig(**{**base, "hidden_size": 50})
    with pytest.raises(ValueError, match="num_layers must be a positive int, got 0"):
        LlamaConfig(**{**base, "num_layers": 0})
    with pytest.raises(ValueError, match="rope_scaling type must be one of"):
        LlamaConfig(**{**base, "rope_scaling": {"rope_type": "ntk", "factor": 2.0}})
    with pytest.raises(ValueError, match=r"missing \['high_freq_factor'"):
        LlamaConfig(**{**base, "rope_scaling": {"rope_type": "llama3", "factor": 8.0,
                                                "low_freq_factor": 1.0}})
    with pytest.raises(TypeError, match="config must be a LlamaConfig"):
        Llama(base)


def test_forward_errors():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**CONFIGS["llama1"]["ours"]))
    ids = torch.randint(0, 97, (2, 9))
    with pytest.raises(ValueError, match=r"int64/int32 tensor \[B, T\], got torch.float32"):
        model(ids.float())
    with pytest.raises(ValueError, match=r"\[B, T\], got torch.int64 \(9,\)"):
        model(ids[0])
    with pytest.raises(ValueError, match=r"must lie in \[0, 97\) \(vocab_size\), got values in "
                                         r"\[3, 97\]"):
        model(torch.tensor([[3, 5, 97]]))
    with pytest.warns(UserWarning, match=r"sequence length 65 exceeds max_position_embeddings "
                                         r"\(64\)"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"must lie in \[0, 97\) \(vocab_size\), got values in "
                                         r"\[-1, 4\]"):
        model(torch.tensor([[-1, 4]]))
    with pytest.raises(ValueError, match=r"position_ids must be an integer tensor \[2 or 1, 9\]"):
        model(ids, torch.arange(8)[None])
    with pytest.raises(ValueError, match=r"attention_mask must be \[B=2, P\+T=9\], got \(2, 8\)"):
        model(ids, attention_mask=torch.ones(2, 8))
    with pytest.raises(TypeError, match="input_ids must be a torch.Tensor, got list"):
        model([[1, 2, 3]])
    with pytest.raises(ValueError, match="cannot be combined with cache"):
        model(ids, cache=model.new_cache(), cu_seqlens=torch.tensor([0, 18]))
    with pytest.raises(ValueError, match=r"length must be in \[0, 0\], got 3"):
        KVCache(3).crop(3)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0, got -1"):
        model.generate(ids, -1)
    with pytest.raises(ValueError, match="temperature must be >= 0, got -0.5"):
        model.generate(ids, 2, temperature=-0.5)
    with pytest.raises(ValueError, match=r"top_p must be in \(0, 1\], got 0.0"):
        model.generate(ids, 2, temperature=1.0, top_p=0.0)
    with pytest.raises(ValueError, match=r"top_k must be an int >= 0 \(0: no limit\), got -1"):
        model.generate(ids, 2, temperature=1.0, top_k=-1)
    with pytest.raises(ValueError, match=r"attention_mask must be \[B, T\] = \(2, 9\), got "
                                         r"\(2, 8\)"):
        model.generate(ids, 2, attention_mask=torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids must be non-empty, got shape \(2, 0\)"):
        model(ids[:, :0])
    with pytest.raises(ValueError, match=r"position_ids must be an integer tensor \[2 or 1, 9\], "
                                         r"got torch.float32 \(1, 9\)"):
        model(ids, torch.arange(9)[None].float())
    cache = model.new_cache()
    model(torch.zeros(1, 60, dtype=torch.long), cache=cache)
    with pytest.warns(UserWarning, match=r"sequence length 65 exceeds max_position_embeddings"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)  # 60 cached + 5 new
    with pytest.raises(ValueError, match=r"logits \[B, T, V\] and input_ids \[B, T\] must agree, "
                                         r"got \(2, 9, 97\) and \(2, 8\)"):
        next_token_loss(torch.zeros(2, 9, 97), ids[:, :8])


def test_layer_runner_hook_and_state_dict():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**CONFIGS["llama3"]["ours"]))
    keys = set(model.state_dict())
    ids = torch.randint(0, 97, (2, 13))
    ref = model(ids)
    seen = []

    def runner(layers, hidden, **layer_kwargs):
        seen.append(sorted(layer_kwargs))
        for layer in layers:
            hidden = layer(hidden, **layer_kwargs)
        return hidden

    model.layer_runner = runner
    torch.testing.assert_close(model(ids), ref, atol=0, rtol=0)
    assert seen == [["cos", "mask", "sin"]]
    assert set(model.state_dict()) == keys
    cache = model.new_cache()
    model(ids, cache=cache)  # the runner is not used with a cache
    assert len(seen) == 1
    # tied: one parameter, shared
    assert model.lm_head.weight is model.embed_tokens.weight
    assert sum(p.numel() for p in model.parameters()) == sum(
        t.numel() for k, t in model.state_dict().items() if k != "lm_head.weight")


def test_attn_mask_replaces_the_causal_mask_tree_verification_over_a_cache():
    torch.manual_seed(0)
    model = Llama(LlamaConfig(**CONFIGS["llama3"]["ours"])).eval()
    g = torch.Generator().manual_seed(9)
    ids = torch.randint(0, 97, (2, 11), generator=g)
    causal = torch.ones(11, 11, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(model(ids, attn_mask=causal), model(ids), atol=ATOL, rtol=RTOL)
    # a token tree after a cached prompt of 6: root r, children a, b of r, child c of a
    # (Medusa / speculative verification): each node sees the prompt and its ancestors only
    prompt, tree = ids[:, :6], torch.randint(0, 97, (2, 4), generator=g)
    parent = [-1, 0, 0, 1]
    depth = torch.tensor([0, 1, 1, 2])
    sees = torch.zeros(4, 4, dtype=torch.bool)
    for i in range(4):
        j = i
        while j >= 0:
            sees[i, j], j = True, parent[j]
    attn = torch.cat([torch.ones(4, 6, dtype=torch.bool), sees], 1)[None, None]  # [1, 1, 4, 10]
    cache = model.new_cache()
    model(prompt, cache=cache)
    got = model(tree, (6 + depth)[None], cache, attn_mask=attn)
    for i, path in enumerate([[0], [0, 1], [0, 2], [0, 1, 3]]):
        alone = model(torch.cat([prompt, tree[:, path]], 1))[:, -1]
        torch.testing.assert_close(got[:, i], alone, atol=ATOL, rtol=RTOL)
    # combined with HF-style padding: row 0 left-padded by 2
    pad = torch.ones(2, 11, dtype=torch.long)
    pad[0, :2] = 0
    pos = (pad.cumsum(-1) - 1).clamp(min=0)
    torch.testing.assert_close(model(ids, pos, attention_mask=pad, attn_mask=causal)[pad.bool()],
                               model(ids, pos, attention_mask=pad)[pad.bool()], atol=ATOL,
                               rtol=RTOL)
    with pytest.raises(TypeError, match="attn_mask must be a bool tensor .* got torch.float32"):
        model(ids, attn_mask=causal.float())
    with pytest.raises(ValueError, match=r"attn_mask must be \[B=2 or 1, 1, T=11, P\+T=11\], got "
                                         r"\(1, 11, 11\)"):
        model(ids, attn_mask=causal[0])


@pytest.mark.parametrize("backend", ["math", "flash", "flash_triton"])
def test_attention_backends_agree(backend):
    interpreted = backend == "flash_triton"  # Triton's CPU interpreter: keep it tiny
    cfg = {**CONFIGS["llama3"]["ours"], "num_layers": 1 if interpreted else 2}
    torch.manual_seed(0)
    ref = Llama(LlamaConfig(**cfg))
    model = Llama(LlamaConfig(**cfg, attn_backend=backend))
    model.load_state_dict(ref.state_dict())
    assert model.layers[0].self_attn.backend == backend
    ids = torch.randint(0, 97, (2, 7 if interpreted else 13),
                        generator=torch.Generator().manual_seed(10))
    out, want = model(ids), ref(ids)
    torch.testing.assert_close(out, want, atol=ATOL, rtol=RTOL)
    grads = torch.autograd.grad(out.square().mean(), list(model.parameters()))
    want_grads = torch.autograd.grad(want.square().mean(), list(ref.parameters()))
    for (name, _), a, b in zip(model.named_parameters(), grads, want_grads):
        torch.testing.assert_close(a, b, atol=ATOL, rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")
    if not interpreted:
        assert torch.equal(model.generate(ids[:, :5], 6), ref.generate(ids[:, :5], 6))
    with pytest.raises(ValueError, match="attn_backend must be one of"):
        LlamaConfig(**cfg, attn_backend="xformers")
