"""The Llama family in one class vs transformers: every option of LlamaForCausalLM (biases,
every RoPE scaling, head_dim ≠ d/n_h, tied embeddings, activations, padding index),
MistralForCausalLM (sliding window) and Qwen2ForCausalLM (q/k/v biases, per-layer windows).

Each case: transformers builds a tiny random model and saves it; ours loads that folder; logits
and every gradient agree at fp32 (≤ 1e-5) on a sequence longer than the sliding window and
than the RoPE scaling's original length; greedy decoding is token-identical; the folder ours
writes loads in transformers (right ``architectures``/``model_type``) with the same logits.
"""

from __future__ import annotations

import copy
import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file

from mlatlas.llm.hf_format import config_from_hf, config_to_hf, hf_key_map
from mlatlas.llm.llama import Llama, next_token_loss
from mlatlas.llm.llama_config import LlamaConfig

ATOL = RTOL = 1e-5  # fp32 CPU
V = 97
BASE = dict(vocab_size=V, hidden_size=48, intermediate_size=40, num_hidden_layers=2,
            num_attention_heads=6, num_key_value_heads=2, max_position_embeddings=64,
            initializer_range=0.12, rms_norm_eps=1e-5)
SHORT = [1.0, 1.1, 1.3, 1.6]  # longrope factors, head_dim 8 → 4 frequencies
LONG = [1.0, 2.0, 4.5, 9.0]

# name → (transformers class, config.json keys, sequence length, greedy tokens after a prompt
# of 6: past the window of 5 and the original lengths of 16)
CASES = {
    "llama": ("LlamaForCausalLM", {}, 23, 12),
    "llama-bias-headdim-tied": ("LlamaForCausalLM", dict(
        attention_bias=True, mlp_bias=True, head_dim=10, tie_word_embeddings=True), 23, 12),
    "llama-gelu-tanh-pad": ("LlamaForCausalLM", dict(
        hidden_act="gelu_pytorch_tanh", pad_token_id=3), 23, 12),
    "rope-linear": ("LlamaForCausalLM", dict(
        rope_parameters={"rope_type": "linear", "factor": 2.5, "rope_theta": 500.0}), 23, 12),
    "rope-dynamic": ("LlamaForCausalLM", dict(
        max_position_embeddings=16,
        rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 100.0}), 29, 12),
    "rope-yarn": ("LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "rope_theta": 100.0, "beta_fast": 8.0, "beta_slow": 2.0}), 29, 12),
    "rope-yarn-mscale": ("LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
        "rope_theta": 100.0, "mscale": 0.8, "mscale_all_dim": 0.5, "truncate": False}), 29, 12),
    "rope-longrope": ("LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "longrope", "short_factor": SHORT, "long_factor": LONG,
        "original_max_position_embeddings": 16, "rope_theta": 100.0}), 29, 14),
    "rope-llama3": ("LlamaForCausalLM", dict(rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16, "rope_theta": 100.0}), 29, 12),
    "mistral": ("MistralForCausalLM", dict(sliding_window=5), 23, 14),
    "qwen2": ("Qwen2ForCausalLM", dict(use_sliding_window=True, sliding_window=5,
                                      max_window_layers=1), 23, 14),
    "qwen2-full": ("Qwen2ForCausalLM", dict(tie_word_embeddings=True), 23, 12),
}


def _hf_folder(transformers, name, tmp_path):
    """A random transformers model of case ``name``, saved; returns (model, folder)."""
    cls_name, extra, _, _ = CASES[name]
    cls = getattr(transformers, cls_name)
    torch.manual_seed(0)
    hf = cls(cls.config_class(**{**BASE, **extra})).eval()
    with torch.no_grad():  # make the norm gains and biases matter
        for n, p in hf.named_parameters():
            if "norm" in n or n.endswith("bias"):
                p.add_(0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    return hf, tmp_path / "hf"


def _grads(model, ids, names):
    model.zero_grad(set_to_none=True)
    out = model(ids)
    logits = out if isinstance(out, torch.Tensor) else out.logits
    next_token_loss(logits, ids).backward()
    params = dict(model.named_parameters())
    return logits.detach(), {n: params[n].grad for n in names}


@pytest.mark.parametrize("name", list(CASES))
def test_family_parity_with_transformers(reference, tmp_path, name):
    transformers = reference("transformers")
    hf, folder = _hf_folder(transformers, name, tmp_path)
    ours = Llama.from_pretrained(folder).eval()
    assert ours.config.model_type == hf.config.model_type
    _, _, T, n_new = CASES[name]
    ids = torch.randint(0, V, (2, T), generator=torch.Generator().manual_seed(1))
    key_map = hf_key_map(ours.config)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # past max_position_embeddings (dynamic): warned
        got, got_grads = _grads(ours, ids, list(key_map))
        want, want_grads = _grads(hf, ids, list(key_map.values()))
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    for ours_name, hf_name in key_map.items():
        torch.testing.assert_close(got_grads[ours_name], want_grads[hf_name], atol=ATOL,
                                   rtol=RTOL, msg=lambda m, n=ours_name: f"grad of {n}: {m}")
    if n_new:  # greedy decoding with a KV cache, past the window / the original length
        prompt = ids[:, :6]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            mine = ours.generate(prompt, n_new)
            ref = hf.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False,
                              max_new_tokens=n_new, eos_token_id=None, pad_token_id=0)
        assert torch.equal(mine, ref)
    # and the folder we write loads in transformers, as the right class
    ours.save_pretrained(tmp_path / "ours")
    written = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert written["architectures"] == [CASES[name][0]]
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(back).__name__ == CASES[name][0]
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.testing.assert_close(back(ids).logits, got, atol=ATOL, rtol=RTOL)


def test_sliding_window_is_what_it_says():
    # Mistral-style: the logits at position i do not depend on tokens at positions ≤ i − W·L
    # (L layers, window W), but do on closer ones
    cfg = LlamaConfig(vocab_size=V, hidden_size=24, intermediate_size=32, num_layers=2,
                      num_heads=4, num_kv_heads=2, sliding_window=3, model_type="mistral")
    torch.manual_seed(0)
    model = Llama(cfg).eval()
    ids = torch.randint(0, V, (1, 12), generator=torch.Generator().manual_seed(2))
    moved = ids.clone()
    moved[0, 4] = (moved[0, 4] + 1) % V
    a, b = model(ids), model(moved)
    # receptive field of position i: keys > i - 2·(W - 1) after 2 layers
    torch.testing.assert_close(a[0, 9:], b[0, 9:], atol=0, rtol=0)
    assert (a[0, 4:9] - b[0, 4:9]).abs().max() > 1e-4
    # cached decoding equals the full forward with the window
    cache = model.new_cache()
    steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache)
                                                for t in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), a, atol=ATOL, rtol=RTOL)


def test_longrope_switches_factors_at_the_original_length(reference, tmp_path):
    transformers = reference("transformers")
    hf, folder = _hf_folder(transformers, "rope-longrope", tmp_path)
    ours = Llama.from_pretrained(folder).eval()
    for T in (9, 16, 17):  # short factors up to L_orig = 16, long beyond
        ids = torch.randint(0, V, (1, T), generator=torch.Generator().manual_seed(T))
        with torch.no_grad():
            torch.testing.assert_close(ours(ids), hf(ids).logits, atol=ATOL, rtol=RTOL)


def test_sharded_any_dtype_and_old_rope_buffers(reference, tmp_path):
    transformers = reference("transformers")
    hf, folder = _hf_folder(transformers, "qwen2", tmp_path)
    ids = torch.randint(0, V, (2, 11), generator=torch.Generator().manual_seed(3))
    # a bf16 checkpoint in several shards (index json), loaded as fp32 by both
    copy.deepcopy(hf).to(torch.bfloat16).save_pretrained(tmp_path / "sharded",
                                                         max_shard_size="20KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    ours = Llama.from_pretrained(tmp_path / "sharded")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "sharded",
                                                            dtype=torch.float32).eval()
    assert ours.embed_tokens.weight.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), ref(ids).logits, atol=ATOL, rtol=RTOL)
    assert Llama.from_pretrained(tmp_path / "sharded", dtype=torch.bfloat16).embed_tokens \
        .weight.dtype == torch.bfloat16
    # our shards load in transformers
    ours.save_pretrained(tmp_path / "ours-sharded", max_shard_bytes=30_000)
    assert len(list((tmp_path / "ours-sharded").glob("model-*-of-*.safetensors"))) > 1
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours-sharded").eval()
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ours(ids), atol=ATOL, rtol=RTOL)
    # older exports carry the non-persistent RoPE buffers: skipped, as transformers does
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(4)
    tensors["model.rotary_emb.inv_freq"] = torch.ones(4)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with torch.no_grad():
        torch.testing.assert_close(Llama.from_pretrained(folder)(ids), hf(ids).logits,
                                   atol=ATOL, rtol=RTOL)


def test_config_json_as_transformers_reads_it(reference):
    transformers = reference("transformers")
    # old {"type": ...} spelling, rope_scaling over rope_parameters, top-level rope_theta
    hf = {**BASE, "num_hidden_layers": 2, "rope_theta": 300.0,
          "rope_scaling": {"type": "linear", "factor": 3.0},
          "rope_parameters": {"rope_type": "dynamic", "factor": 9.0}}
    ours = config_from_hf(hf)
    ref = transformers.LlamaConfig(**hf)
    assert ours.rope_scaling == {"rope_type": "linear", "factor": 3.0}
    assert ref.rope_parameters["rope_type"] == "linear" and ours.rope_theta == 300.0 == \
        ref.rope_parameters["rope_theta"]
    # defaults of each family for keys a file omits (transformers' config classes)
    for kind, cls in (("mistral", transformers.MistralConfig),
                      ("qwen2", transformers.Qwen2Config)):
        minimal = dict(vocab_size=V, hidden_size=64, intermediate_size=40, num_hidden_layers=2,
                       num_attention_heads=32)  # 32 heads: the families' default kv heads fit
        ours, ref = config_from_hf({**minimal, "model_type": kind}), cls(**minimal)
        assert ours.num_kv_heads == ref.num_key_value_heads
        assert ours.max_position_embeddings == ref.max_position_embeddings
        assert ours.sliding_window == ref.sliding_window
    qwen = {**BASE, "model_type": "qwen2", "num_hidden_layers": 4, "use_sliding_window": True,
            "sliding_window": 7, "max_window_layers": 2}
    assert config_from_hf(qwen).layer_types == transformers.Qwen2Config(**qwen).layer_types
    explicit = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]
    assert config_from_hf({**qwen, "layer_types": explicit}).layer_types == explicit
    assert config_from_hf({**qwen, "use_sliding_window": False}).sliding_window is None
    # Mistral's layer_types are ignored by transformers (a warning): one window everywhere
    mistral = config_from_hf({**BASE, "model_type": "mistral", "sliding_window": 6,
                              "layer_types": ["full_attention"] * 2})
    assert [mistral.window(i) for i in range(2)] == [6, 6]
    # round trips
    for cfg in (mistral, config_from_hf(qwen), config_from_hf(hf)):
        assert config_from_hf(config_to_hf(cfg)) == cfg


@pytest.mark.parametrize("change, match", [
    ({"model_type": "gemma"}, "model_type must be one of"),
    ({"quantization_config": {"quant_method": "bitsandbytes"}}, "quantization_config="),
    ({"attention_dropout": 0.1}, "attention_dropout=0.1 is not supported"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
    ({"hidden_act": "quick_gelu"}, "hidden_act must be one of .* got 'quick_gelu'"),
    ({"rope_scaling": {"rope_type": "proportional", "factor": 2.0}},
     "rope_scaling type must be one of .* got 'proportional'"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 2.0, "alpha": 1.0}},
     r"rope_scaling of type 'yarn': unsupported keys \['alpha'\]"),
    ({"rope_scaling": {"rope_type": "longrope", "short_factor": [1.0], "long_factor": [1.0]}},
     "short_factor must hold head_dim/2 = 4 factors, got 1"),
    ({"rope_scaling": {"rope_type": "linear"}}, r"needs keys \['factor'\], missing"),
    ({"model_type": "qwen2", "layer_types": ["sliding_attention", "full_attention"]},
     "layer_types has sliding_attention layers but use_sliding_window is false"),
    ({"num_hidden_layers": None, "drop": "num_hidden_layers"}, "missing required keys"),
])
def test_refused_options_are_named(change, match):
    hf = {**BASE, **change}
    if "drop" in change:
        hf = {k: v for k, v in hf.items() if k not in (change["drop"], "drop")}
    with pytest.raises(ValueError, match=match):
        config_from_hf(hf)


def test_what_a_family_cannot_express_is_refused_on_save(tmp_path):
    small = dict(vocab_size=V, hidden_size=24, intermediate_size=32, num_layers=2, num_heads=4)
    for fields, match in (
            (dict(model_type="llama", sliding_window=4), "'llama' .* cannot express sliding"),
            (dict(model_type="llama", qkv_bias=True), "qkv_bias without attention_bias"),
            (dict(model_type="mistral", mlp_bias=True), "'mistral' .* cannot express mlp_bias"),
            (dict(model_type="mistral", sliding_window=4,
                  layer_types=["sliding_attention", "full_attention"]), "layer_types"),
            (dict(model_type="qwen2"), r"qkv_bias=False \(Qwen2 always has")):
        with pytest.raises(ValueError, match=match):
            Llama(LlamaConfig(**small, **fields)).save_pretrained(tmp_path / "x")
    with pytest.raises(ValueError, match="layer_types has sliding_attention layers but "
                                         "sliding_window is None"):
        LlamaConfig(**small, layer_types=["sliding_attention", "full_attention"])
    with pytest.raises(ValueError, match="layer_types must list one of"):
        LlamaConfig(**small, layer_types=["full_attention"])


def test_beyond_max_position_embeddings_is_a_warning():
    cfg = LlamaConfig(vocab_size=V, hidden_size=24, intermediate_size=32, num_layers=1,
                      num_heads=4, max_position_embeddings=8)
    model = Llama(cfg)
    with pytest.warns(UserWarning, match=r"sequence length 9 exceeds max_position_embeddings "
                                         r"\(8\)"):
        out = model(torch.zeros(1, 9, dtype=torch.long))
    assert out.shape == (1, 9, V)
