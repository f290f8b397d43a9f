"""Houlsby / Pfeiffer bottleneck adapters against an independent reference, and bad input.

Reference: the ``adapters`` package (AdapterHub) cannot be installed beside the pinned
transformers (adapters 1.3.0 requires transformers~=4.57; we pin 5.23 — checked with
``pip install --dry-run adapters``), so the reference is written here from the papers'
equations: forward hooks on a transformers ``LlamaForCausalLM`` that replace each adapted
sub-layer output ``y`` by ``y + W_up σ(W_down y + b_down) + b_up`` (Houlsby et al. 2019 §2.1;
Pfeiffer et al. 2021: after the FFN only), with the adapter weights as plain tensors.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from llama_pairs import llama_pair, ours_llama, token_batch
from torch import nn

from mlatlas.llm.hf_format import hf_key_map
from mlatlas.llm.llama import next_token_loss
from mlatlas.peft.adapter import (
    AdaptedLinear,
    AdapterConfig,
    adapter_layers,
    apply_adapters,
    remove_adapters,
)

ATOL = RTOL = 1e-5  # fp32 CPU
ACT = {"silu": F.silu, "relu": F.relu}


def reference_hooks(hf, weights: dict[str, dict[str, torch.Tensor]], activation: str):
    """Hook ``y ↦ y + W_up σ(W_down y + b_down) + b_up`` onto each named HF module."""
    act = ACT[activation]
    handles = []
    for name, w in weights.items():
        def hook(module, args, y, w=w):
            return y + act(y @ w["down.weight"].T + w["down.bias"]) @ w["up.weight"].T \
                + w["up.bias"]
        handles.append(hf.get_submodule(name).register_forward_hook(hook))
    return handles


@pytest.mark.parametrize("kind,places", [("houlsby", {"o_proj", "down_proj"}),
                                         ("pfeiffer", {"down_proj"})])
def test_logits_and_grads_match_the_papers_equations(reference, kind, places):
    transformers = reference("transformers")
    ours, hf = llama_pair(transformers)
    adapted = apply_adapters(ours, AdapterConfig(kind=kind, bottleneck=7, init_std=0.3))
    assert {n.rsplit(".", 1)[-1] for n in adapted} == places
    assert len(adapted) == len(places) * ours.config.num_layers
    # explicit key map: our adapter parameters → (HF module, tensor name), every one used
    mine = {n: p for n, p in ours.named_parameters() if ".adapter." in n}
    weights: dict[str, dict[str, torch.Tensor]] = {}
    for name, p in mine.items():
        module, tensor = name.split(".adapter.")
        hf_module = "model." + module.removesuffix(".base_layer")
        weights.setdefault(hf_module, {})[tensor] = p.detach().clone().requires_grad_(True)
    assert set(weights) == {"model." + n for n in adapter_layers(ours)}
    assert all(set(w) == {"down.weight", "down.bias", "up.weight", "up.bias"}
               for w in weights.values())
    activation = AdapterConfig(kind=kind).activation
    reference_hooks(hf, weights, activation)
    ids = token_batch(3, 11)
    logits = ours(ids)
    ref = hf(ids).logits
    torch.testing.assert_close(logits, ref, atol=ATOL, rtol=RTOL)
    assert (logits - ours_llama()(ids)).abs().max() > 1e-3, "the adapters must matter"
    next_token_loss(logits, ids).backward()
    hf(ids, labels=ids).loss.backward()
    for name, p in mine.items():
        module, tensor = name.split(".adapter.")
        want = weights["model." + module.removesuffix(".base_layer")][tensor].grad
        torch.testing.assert_close(p.grad, want, atol=ATOL, rtol=RTOL,
                                   msg=lambda m, n=name: f"grad of {n}: {m}")
    # Houlsby also trains the norms; their gradients match HF's through the key map
    key_map = hf_key_map(ours.config)
    hf_params = dict(hf.named_parameters())
    trainable = {n for n, p in ours.named_parameters() if p.requires_grad}
    norms = {n for n in key_map if "norm" in n}
    assert trainable == set(mine) | (norms if kind == "houlsby" else set())
    if kind == "houlsby":
        for n in norms:
            got = dict(ours.named_parameters())[n].grad
            torch.testing.assert_close(got, hf_params[key_map[n]].grad, atol=ATOL, rtol=RTOL)


def test_near_identity_start_and_parameter_count():
    base = ours_llama()
    ids = token_batch(2, 8)
    want = base(ids)
    model = ours_llama()
    apply_adapters(model, AdapterConfig(kind="houlsby", bottleneck=4, init_std=0.0))
    torch.testing.assert_close(model(ids), want, atol=0, rtol=0)  # σ₀ = 0: exactly the base
    model = ours_llama()
    apply_adapters(model, AdapterConfig(kind="pfeiffer", reduction_factor=6))
    got = model(ids)
    assert 0 < (got - want).abs().max() < 1e-2 * want.abs().max(), "near the identity"
    # 2md + m + d per adapter; d = 30, m = 30 // 6 = 5, one per layer
    adapters = sum(p.numel() for n, p in model.named_parameters() if ".adapter." in n)
    assert adapters == 2 * (2 * 5 * 30 + 5 + 30)
    remove_adapters(model)
    assert not adapter_layers(model)
    torch.testing.assert_close(model(ids), want, atol=0, rtol=0)


def test_any_module():
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Linear(5, 9), nn.ReLU(), nn.Linear(9, 11))
    apply_adapters(mlp, AdapterConfig(kind="pfeiffer", target_modules=["2"], bottleneck=3))
    assert isinstance(mlp[2], AdaptedLinear)
    assert mlp(torch.randn(4, 5)).shape == (4, 11)


# ------------------------------------------------------------------------ bad input
def test_bad_input():
    with pytest.raises(ValueError, match="kind must be one of.*got 'lora'"):
        AdapterConfig(kind="lora")
    for m in (0, -1):
        with pytest.raises(ValueError, match=f"bottleneck must be a positive int, got {m}"):
            AdapterConfig(bottleneck=m)
    with pytest.raises(ValueError, match="activation must be one of"):
        AdapterConfig(activation="swishy")
    with pytest.raises(ValueError, match="init_std must be >= 0"):
        AdapterConfig(init_std=-1.0)
    model = ours_llama()
    with pytest.raises(ValueError, match=r"bottleneck m must be in \(0, 30\).*got 30"):
        apply_adapters(model, AdapterConfig(bottleneck=30))
    with pytest.raises(ValueError, match=r"entry 'down_prj' matches no module.*down_proj"):
        apply_adapters(model, AdapterConfig(target_modules=["down_prj"]))
    with pytest.raises(ValueError, match="selects 'model.layers.0.mlp', a GatedFeedForward"):
        apply_adapters(model, AdapterConfig(target_modules=["mlp"]))
    with pytest.raises(TypeError, match="config must be an AdapterConfig"):
        apply_adapters(model, "houlsby")
    assert not adapter_layers(model) and all(p.requires_grad for p in model.parameters())
    apply_adapters(model, AdapterConfig())
    with pytest.raises(ValueError, match="already has adapters"):
        apply_adapters(model, AdapterConfig())
    with pytest.raises(ValueError, match="has no adapters"):
        remove_adapters(ours_llama())
