"""LoRA parity against peft on a tiny Llama, adapter files both ways, merge, bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch
from llama_pairs import llama_pair, ours_llama, token_batch
from safetensors.torch import load_file
from torch import nn

from mlatlas.llm.llama import Llama, next_token_loss
from mlatlas.peft.lora import (
    LoraConfig,
    LoraEmbedding,
    LoraLinear,
    apply_lora,
    lora_layers,
    merge_lora,
    unload_lora,
    unmerge_lora,
)
from mlatlas.peft.peft_format import load_adapter, lora_state_dict, save_adapter

ATOL = RTOL = 1e-5  # fp32 CPU
# non-default targets: an attention, an MLP and the embedding (peft's LoRA Embedding)
TARGETS = ["k_proj", "v_proj", "down_proj", "embed_tokens"]


def peft_key(own_name: str) -> str:
    """Our Llama parameter name → the key peft saves (HF name, ``base_model.model.``)."""
    hf = own_name if own_name.startswith("lm_head") else "model." + own_name
    return "base_model.model." + hf


def peft_lora(peft, hf, **kw):
    cfg = peft.LoraConfig(task_type="CAUSAL_LM", **kw)
    return peft.get_peft_model(hf, cfg)


def copy_lora_from_peft(peft, pm, ours: Llama) -> None:
    """Copy peft's LoRA tensors into ours by the explicit key map (no missing/unexpected)."""
    theirs = peft.get_peft_model_state_dict(pm, save_embedding_layers=False)
    mine = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    key_map = {peft_key(n): n for n in mine}
    assert set(key_map) == set(theirs), (sorted(set(key_map) ^ set(theirs)))
    with torch.no_grad():
        for key, name in key_map.items():
            mine[name].copy_(theirs[key])


def nonzero_pair(transformers, peft, **kw):
    """ours + hf with the same base, peft LoRA with random (non-zero) A and B, copied."""
    ours, hf = llama_pair(transformers)
    pm = peft_lora(peft, hf, init_lora_weights=False, **kw)
    apply_lora(ours, LoraConfig(**{k: v for k, v in kw.items()
                                   if k in ("r", "lora_alpha", "target_modules", "use_rslora",
                                            "bias", "lora_dropout", "exclude_modules")}))
    copy_lora_from_peft(peft, pm, ours)
    return ours, pm


def test_logits_and_lora_grads_match_peft(reference):
    transformers, peft = reference("transformers"), reference("peft")
    ours, pm = nonzero_pair(transformers, peft, r=3, lora_alpha=7, target_modules=TARGETS)
    assert {"model." + n for n in lora_layers(ours)} == set(pm.base_model.targeted_module_names)
    ids = token_batch(3, 11)
    logits = ours(ids)
    ref = pm(input_ids=ids).logits
    base = ours_llama()(ids)
    assert (logits - base).abs().max() > 1e-3, "B must be non-zero for the test to mean much"
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=RTOL)
    next_token_loss(logits, ids).backward()
    pm(input_ids=ids, labels=ids).loss.backward()
    theirs = {n.replace(".default", ""): p for n, p in pm.named_parameters() if p.requires_grad}
    mine = {peft_key(n): p for n, p in ours.named_parameters() if p.requires_grad}
    assert set(mine) == set(theirs), "same trainable parameters"
    for key, p in mine.items():
        torch.testing.assert_close(p.grad, theirs[key].grad, atol=ATOL, rtol=RTOL,
                                   msg=lambda m, k=key: f"grad of {k}: {m}")


def test_rslora_scaling_matches_peft(reference):
    transformers, peft = reference("transformers"), reference("peft")
    ours, pm = nonzero_pair(transformers, peft, r=4, lora_alpha=6, use_rslora=True,
                            target_modules=["q_proj", "up_proj"])
    layer = ours.layers[0].self_attn.q_proj
    assert layer.scaling == pytest.approx(6 / math.sqrt(4))
    peft_layer = pm.base_model.model.model.layers[0].self_attn.q_proj
    assert peft_layer.scaling["default"] == pytest.approx(layer.scaling)
    ids = token_batch(2, 9)
    torch.testing.assert_close(ours(ids), pm(input_ids=ids).logits, atol=ATOL, rtol=RTOL)


def test_regex_and_exclude_select_what_peft_selects(reference):
    transformers, peft = reference("transformers"), reference("peft")
    regex = r".*\.layers\.1\.(self_attn|mlp)\.(q|v|gate)_proj"
    ours, pm = nonzero_pair(transformers, peft, r=2, lora_alpha=3, target_modules=regex)
    peft_names = set(pm.base_model.targeted_module_names)
    assert {"model." + n for n in lora_layers(ours)} == peft_names
    assert len(peft_names) == 3
    ours2, pm2 = nonzero_pair(transformers, peft, r=2, lora_alpha=3,
                              target_modules=["q_proj", "v_proj"], exclude_modules=["v_proj"])
    assert {"model." + n for n in lora_layers(ours2)} == set(pm2.base_model.targeted_module_names)
    ids = token_batch(2, 5)
    torch.testing.assert_close(ours2(ids), pm2(input_ids=ids).logits, atol=ATOL, rtol=RTOL)


def test_peft_saved_adapter_loads_into_ours(reference, tmp_path):
    transformers, peft = reference("transformers"), reference("peft")
    _, hf = llama_pair(transformers)
    pm = peft_lora(peft, hf, r=3, lora_alpha=7, target_modules=TARGETS, init_lora_weights=False)
    pm.save_pretrained(tmp_path)
    ours = ours_llama()
    config = load_adapter(ours, tmp_path)
    assert (config.r, config.lora_alpha) == (3, 7)
    ids = token_batch(2, 13)
    torch.testing.assert_close(ours(ids), pm(input_ids=ids).logits, atol=ATOL, rtol=RTOL)
    # only the LoRA factors train after loading
    assert all(("lora_" in n) == p.requires_grad for n, p in ours.named_parameters())


def test_our_adapter_loads_with_peft_from_pretrained(reference, tmp_path):
    transformers, peft = reference("transformers"), reference("peft")
    ours, hf = llama_pair(transformers)
    apply_lora(ours, LoraConfig(r=3, lora_alpha=7, target_modules=TARGETS, init="zeros"))
    with torch.no_grad():  # as if trained: every factor non-zero
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.2, generator=torch.Generator().manual_seed(len(n)))
    save_adapter(ours, tmp_path)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["adapter_config.json", "adapter_model.safetensors"]
    assert set(load_file(tmp_path / "adapter_model.safetensors")) == set(lora_state_dict(ours))
    pm = peft.PeftModel.from_pretrained(hf, tmp_path)
    assert isinstance(pm, peft.PeftModelForCausalLM)
    ids = token_batch(2, 13)
    torch.testing.assert_close(pm(input_ids=ids).logits, ours(ids), atol=ATOL, rtol=RTOL)


def test_merge_equals_unmerged_and_unmerge_restores_base():
    ours = ours_llama()
    base_state = {k: v.clone() for k, v in ours.state_dict().items()}
    apply_lora(ours, LoraConfig(r=5, lora_alpha=11, target_modules=TARGETS + ["lm_head"],
                                init="zeros"))
    with torch.no_grad():
        for n, p in ours.named_parameters():
            if "lora_" in n:
                p.normal_(std=0.1)
    ids = token_batch(2, 10)
    unmerged = ours(ids)
    merge_lora(ours)
    torch.testing.assert_close(ours(ids), unmerged, atol=ATOL, rtol=RTOL)
    with pytest.raises(ValueError, match="already merged"):
        merge_lora(ours)
    unmerge_lora(ours)
    torch.testing.assert_close(ours(ids), unmerged, atol=ATOL, rtol=RTOL)
    layer = ours.layers[1].mlp.down_proj
    torch.testing.assert_close(layer.base_layer.weight, base_state["layers.1.mlp.down_proj.weight"],
                               atol=1e-6, rtol=0)
    # merge-and-unload: a plain Llama again, same outputs, same state-dict keys as the base
    unload_lora(ours, merge=True)
    assert not lora_layers(ours) and set(ours.state_dict()) == set(base_state)
    torch.testing.assert_close(ours(ids), unmerged, atol=ATOL, rtol=RTOL)


def test_inits_dropout_and_trainable_parameters():
    model = ours_llama()
    ids = token_batch(2, 6)
    base = model(ids)
    for init in ("kaiming", "gaussian", "zeros"):
        m = ours_llama()
        apply_lora(m, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "embed_tokens"],
                                 init=init))
        torch.testing.assert_close(m(ids), base, atol=0, rtol=0)  # identity at the start
        q = m.layers[0].self_attn.q_proj
        assert isinstance(q, LoraLinear) and isinstance(m.embed_tokens, LoraEmbedding)
        a, b = q.lora_A.weight, q.lora_B.weight
        if init == "zeros":
            assert not a.any() and b.any()
        else:
            assert a.any() and not b.any()
        if init == "gaussian":
            assert a.std().item() == pytest.approx(1 / 4, rel=0.2)
        trainable = {n for n, p in m.named_parameters() if p.requires_grad}
        assert trainable == {n for n, _ in m.named_parameters() if "lora_" in n}
    m = ours_llama()
    apply_lora(m, LoraConfig(r=4, target_modules=["q_proj"], lora_dropout=0.5))
    with torch.no_grad():
        m.layers[0].self_attn.q_proj.lora_B.weight.normal_()
    m.train()
    assert not torch.equal(m(ids), m(ids)), "dropout acts in training mode"
    m.eval()
    assert torch.equal(m(ids), m(ids))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)
        self.norm = nn.LayerNorm(3)

    def forward(self, x):
        return self.norm(self.fc2(self.act(self.fc1(x))))


@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_any_module_and_bias_modes_match_peft(reference, bias, tmp_path):
    peft = reference("peft")
    torch.manual_seed(0)
    ours = Mlp()
    theirs = Mlp()
    base_state = {k: v.clone() for k, v in ours.state_dict().items()}
    theirs.load_state_dict(base_state)
    pm = peft.get_peft_model(theirs, peft.LoraConfig(r=2, lora_alpha=5, target_modules=["fc1"],
                                                     bias=bias, init_lora_weights=False))
    apply_lora(ours, LoraConfig(r=2, lora_alpha=5, target_modules=["fc1"], bias=bias))
    saved = peft.get_peft_model_state_dict(pm)
    mine = lora_state_dict(ours)
    assert set(mine) == set(saved), "same tensors in the adapter file"
    trainable = {n.replace(".default", "") for n, p in pm.named_parameters() if p.requires_grad}
    assert {"base_model.model." + n for n, p in ours.named_parameters() if p.requires_grad} \
        == trainable
    pm.save_pretrained(tmp_path)
    fresh = Mlp()
    fresh.load_state_dict(base_state)
    load_adapter(fresh, tmp_path)
    x = torch.randn(4, 5)
    torch.testing.assert_close(fresh(x), pm(x), atol=ATOL, rtol=RTOL)


# ------------------------------------------------------------------------ bad input
def test_bad_rank_and_config_values():
    for r in (0, -2):
        with pytest.raises(ValueError, match=rf"LoraConfig.r must be a positive int, got {r}"):
            LoraConfig(r=r)
    with pytest.raises(ValueError, match="LoraConfig.r must be a positive int, got 2.5"):
        LoraConfig(r=2.5)
    with pytest.raises(ValueError, match="lora_dropout must be in"):
        LoraConfig(lora_dropout=1.0)
    with pytest.raises(ValueError, match="bias must be one of"):
        LoraConfig(bias="some")
    with pytest.raises(ValueError, match="init must be one of"):
        LoraConfig(init="pissa")
    with pytest.raises(ValueError, match="not a valid regular expression"):
        LoraConfig(target_modules="q_proj(")
    with pytest.raises(TypeError, match="target_modules must be a regex string or a list"):
        LoraConfig(target_modules=[3])
    with pytest.raises(TypeError, match="config must be a LoraConfig"):
        apply_lora(ours_llama(), {"r": 2})


def test_target_that_matches_nothing_names_the_closest_modules():
    model = ours_llama()
    with pytest.raises(ValueError, match=r"entry 'q_prj' matches no module.*'model\.layers\.0"
                                         r"\.self_attn\.q_proj'"):
        apply_lora(model, LoraConfig(target_modules=["q_prj", "v_proj"]))
    with pytest.raises(ValueError, match=r"matches no module.*closest"):
        apply_lora(model, LoraConfig(target_modules=r"layers\.0\.self_attn\.q_proj"))
    with pytest.raises(ValueError, match=r"excludes every module target_modules selects"):
        apply_lora(model, LoraConfig(target_modules=["q_proj"], exclude_modules=r".*q_proj"))
    with pytest.raises(ValueError, match=r"selects 'model.norm', a RMSNorm"):
        apply_lora(model, LoraConfig(target_modules=["norm"]))
    assert not lora_layers(model), "a failed apply changes nothing"
    assert all(p.requires_grad for p in model.parameters())
    apply_lora(model, LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="already has LoRA layers"):
        apply_lora(model, LoraConfig(target_modules=["v_proj"]))
    with pytest.raises(ValueError, match="not merged"):
        unmerge_lora(model)


def test_merge_refuses_tied_weights():
    model = ours_llama(tie_word_embeddings=True)
    apply_lora(model, LoraConfig(target_modules=["embed_tokens"]))
    with pytest.raises(ValueError, match=r"shared with \['lm_head'\]"):
        merge_lora(model)


def test_adapter_for_another_base_names_each_mismatched_tensor(reference, tmp_path):
    transformers, peft = reference("transformers"), reference("peft")
    _, hf = llama_pair(transformers)
    peft_lora(peft, hf, r=3, lora_alpha=7, target_modules=["q_proj", "down_proj"]
              ).save_pretrained(tmp_path)
    other = ours_llama(intermediate_size=40)  # the MLP is narrower: down_proj's A differs
    before = {n: p.requires_grad for n, p in other.named_parameters()}
    with pytest.raises(ValueError) as err:
        load_adapter(other, tmp_path)
    msg = str(err.value)
    for i in (0, 1):
        assert (f"base_model.model.model.layers.{i}.mlp.down_proj.lora_A.weight: file (3, 44), "
                "model (3, 40)") in msg
    assert "q_proj" not in msg
    assert not lora_layers(other), "a failed load leaves the model unchanged"
    assert before == {n: p.requires_grad for n, p in other.named_parameters()}


def _rewrite_config(folder, **changes):
    path = folder / "adapter_config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


def test_wrong_type_newer_format_and_pickle_are_refused(tmp_path):
    src = ours_llama()
    apply_lora(src, LoraConfig(r=2, target_modules=["q_proj"]))
    save_adapter(src, tmp_path)
    _rewrite_config(tmp_path, peft_type="PREFIX_TUNING")
    with pytest.raises(ValueError, match="peft_type must be 'LORA'.*got 'PREFIX_TUNING'"):
        load_adapter(ours_llama(), tmp_path)
    _rewrite_config(tmp_path, peft_type="LORA", use_dora=True)
    with pytest.raises(ValueError, match=r"does not implement: \{'use_dora': True\}"):
        load_adapter(ours_llama(), tmp_path)
    _rewrite_config(tmp_path, use_dora=False, peft_version="9.0.0", lora_spectral_rank={"k": 4},
                    lora_unused_future_flag=None)
    with pytest.raises(ValueError, match=r"peft 9\.0\.0.*unknown.*newer.*lora_spectral_rank"):
        load_adapter(ours_llama(), tmp_path)
    _rewrite_config(tmp_path, lora_spectral_rank=None)  # unset new options are fine
    load_adapter(ours_llama(), tmp_path)
    (tmp_path / "adapter_model.safetensors").rename(tmp_path / "adapter_model.bin")
    with pytest.raises(FileNotFoundError, match="adapter_model.bin is pickle"):
        load_adapter(ours_llama(), tmp_path)
    with pytest.raises(FileNotFoundError, match="holds no adapter_config.json"):
        load_adapter(ours_llama(), tmp_path / "nowhere")
    with pytest.raises(ValueError, match="has no LoRA"):
        save_adapter(ours_llama(), tmp_path / "x")
