"""MoE layer: parity with transformers' DeepseekV3MoE and Qwen2MoeSparseMoeBlock (outputs and
every gradient, fp32 ≤ 1e-5), the classic auxiliary loss against ``load_balancing_loss_func``,
index dispatch (each token reaches exactly k experts), bias balancing, bad input."""

from __future__ import annotations

import pytest
import torch

from mlatlas.llm.moe import MoEConfig, MoELayer, load_balancing_loss, max_violation

ATOL = RTOL = 1e-5  # fp32 CPU
D, I_MOE, E = 20, 12, 6  # not powers of two


def _copy_from_hf(ours: MoELayer, hf: torch.nn.Module, shared: str) -> dict[str, str]:
    """Copy ``hf``'s weights into ``ours`` by an explicit key map; returns ours → hf source.

    transformers stores the routed experts as 3-D tensors ``experts.gate_up_proj [E, 2I, d]``
    (gate rows first, then up rows) and ``experts.down_proj [E, d, I]``; ours are modules.
    """
    hf_state = hf.state_dict()
    sources: dict[str, tuple[str, slice | int | None, slice | None]] = {
        "gate.weight": ("gate.weight", None, None),
        "gate.e_score_correction_bias": ("gate.e_score_correction_bias", None, None),
    }
    for e in range(ours.config.num_experts):
        sources[f"experts.{e}.gate_proj.weight"] = ("experts.gate_up_proj", e, slice(0, I_MOE))
        sources[f"experts.{e}.up_proj.weight"] = ("experts.gate_up_proj", e,
                                                  slice(I_MOE, 2 * I_MOE))
        sources[f"experts.{e}.down_proj.weight"] = ("experts.down_proj", e, None)
    for part in ("gate_proj", "up_proj", "down_proj"):
        sources[f"shared_experts.{part}.weight"] = (f"{shared}.{part}.weight", None, None)
    if ours.shared_expert_gate is not None:
        sources["shared_expert_gate.weight"] = ("shared_expert_gate.weight", None, None)
    ours_only = set()
    if "gate.e_score_correction_bias" not in hf_state:  # Qwen2-MoE has no balancing bias
        del sources["gate.e_score_correction_bias"]
        ours_only = {"gate.e_score_correction_bias"}  # ours stays zero
    state = ours.state_dict()
    assert set(sources) == set(state) - ours_only, \
        f"missing/unexpected: {set(state) ^ set(sources)}"
    used = {src for src, _, _ in sources.values()}
    assert used == set(hf_state), f"hf keys not mapped: {set(hf_state) - used}"
    for ours_key, (src, expert, rows) in sources.items():
        t = hf_state[src]
        t = t[expert] if expert is not None else t
        t = t[rows] if rows is not None else t
        state[ours_key] = t.clone()
    ours.load_state_dict(state, strict=True)
    return {k: v[0] for k, v in sources.items()}


def _grad_of(hf: torch.nn.Module, src: str, ours_key: str) -> torch.Tensor:
    g = dict(hf.named_parameters())[src].grad
    if src.startswith("experts."):
        e = int(ours_key.split(".")[1])
        g = g[e]
        if ours_key.endswith("gate_proj.weight"):
            g = g[:I_MOE]
        elif ours_key.endswith("up_proj.weight"):
            g = g[I_MOE:]
    return g


def _compare(ours: MoELayer, hf: torch.nn.Module, sources: dict[str, str]) -> None:
    x = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(1))
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ours, y_hf = ours(x1), hf(x2)
    torch.testing.assert_close(y_ours, y_hf, atol=ATOL, rtol=RTOL)
    w = torch.randn_like(y_ours) / y_ours.numel() ** 0.5  # O(1) gradients
    (y_ours * w).sum().backward()
    (y_hf * w).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=ATOL, rtol=RTOL)
    for name, p in ours.named_parameters():
        # an expert no token was routed to never ran: no gradient (transformers': zeros)
        grad = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(grad, _grad_of(hf, sources[name], name), atol=ATOL,
                                   rtol=RTOL, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (3, 2)])
def test_parity_deepseek_v3(reference, n_group, topk_group):
    tf = reference("transformers")
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    hf_cfg = tf.DeepseekV3Config(hidden_size=D, moe_intermediate_size=I_MOE, n_routed_experts=E,
                                 num_experts_per_tok=2, n_shared_experts=2, n_group=n_group,
                                 topk_group=topk_group, norm_topk_prob=True,
                                 routed_scaling_factor=2.5, hidden_act="silu")
    torch.manual_seed(0)
    hf = DeepseekV3MoE(hf_cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.15)
        hf.gate.e_score_correction_bias.copy_(torch.linspace(-0.2, 0.3, E))
    ours = MoELayer(MoEConfig(hidden_size=D, moe_intermediate_size=I_MOE, num_experts=E, top_k=2,
                              num_shared_experts=2, scoring="sigmoid", norm_topk_prob=True,
                              routed_scaling_factor=2.5, n_group=n_group, topk_group=topk_group,
                              bias_balancing=True))
    sources = _copy_from_hf(ours, hf, "shared_experts")
    _compare(ours, hf, sources)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
def test_parity_qwen2_moe(reference, norm_topk_prob):
    tf = reference("transformers")
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    hf_cfg = tf.Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=I_MOE, num_experts=E,
                               num_experts_per_tok=3, shared_expert_intermediate_size=14,
                               norm_topk_prob=norm_topk_prob, hidden_act="silu")
    torch.manual_seed(0)
    hf = Qwen2MoeSparseMoeBlock(hf_cfg)
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.15)
    ours = MoELayer(MoEConfig(hidden_size=D, moe_intermediate_size=I_MOE, num_experts=E, top_k=3,
                              shared_intermediate_size=14, shared_expert_gate=True,
                              scoring="softmax", norm_topk_prob=norm_topk_prob))
    # Qwen2-MoE's shared FFN is "shared_expert" (singular); no bias buffer
    hf_state_keys = set(hf.state_dict())
    assert "gate.e_score_correction_bias" not in hf_state_keys
    sources = _copy_from_hf(ours, hf, "shared_expert")
    _compare(ours, hf, sources)


def test_aux_loss_matches_transformers(reference):
    reference("transformers")
    from transformers.models.qwen2_moe.modeling_qwen2_moe import load_balancing_loss_func

    logits = torch.randn(29, E, generator=torch.Generator().manual_seed(2), requires_grad=True)
    probs = logits.softmax(-1)
    idx = probs.topk(2, dim=-1).indices
    ours = load_balancing_loss(probs, idx, E)
    ref = load_balancing_loss_func((logits,), num_experts=E, top_k=2)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=RTOL)
    g1, = torch.autograd.grad(ours, logits)
    g2, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g1, g2, atol=ATOL, rtol=RTOL)


def _layer(**over) -> MoELayer:
    torch.manual_seed(3)
    cfg = dict(hidden_size=D, moe_intermediate_size=I_MOE, num_experts=E, top_k=2)
    return MoELayer(MoEConfig(**{**cfg, **over}))


def test_each_token_reaches_exactly_k_experts_and_matches_dense():
    layer = _layer(num_shared_experts=0)
    seen: dict[int, int] = {}
    hooks = [ex.register_forward_hook(
        lambda m, inp, out, e=e: seen.__setitem__(e, seen.get(e, 0) + inp[0].shape[0]))
        for e, ex in enumerate(layer.experts)]
    x = torch.randn(41, D, generator=torch.Generator().manual_seed(4))
    y = layer(x)
    for h in hooks:
        h.remove()
    assert sum(seen.values()) == 2 * 41  # N·k rows in total, no expert ran on zero rows
    assert all(n > 0 for n in seen.values())
    assert seen == {e: int(c) for e, c in enumerate(layer.last_counts) if c > 0}
    # dense reference: every expert on every token, masked by the gates
    route = layer.gate(x)
    dense = torch.zeros_like(x)
    for e, ex in enumerate(layer.experts):
        g = (route.weights * (route.indices == e)).sum(-1, keepdim=True)
        dense = dense + g * ex(x)
    torch.testing.assert_close(y, dense, atol=ATOL, rtol=RTOL)


def test_bias_balancing_moves_bias_against_load_and_only_changes_choice():
    layer = _layer(bias_balancing=True, bias_update_rate=0.1, scoring="sigmoid").train()
    x = torch.randn(50, D, generator=torch.Generator().manual_seed(5))
    layer(x)
    counts = layer.update_bias()
    bias = layer.gate.e_score_correction_bias
    mean = counts.mean()
    assert torch.equal(torch.sign(bias), torch.sign(mean - counts) * (bias != 0))
    assert layer.pending_counts.sum() == 0
    # the bias picks experts but the gates are the unbiased scores
    route = layer.gate(x)
    s = route.logits.sigmoid().gather(1, route.indices)
    torch.testing.assert_close(route.weights, s / s.sum(-1, keepdim=True))
    # without bias_balancing nothing moves
    plain = _layer().train()
    plain(x)
    plain.update_bias()
    assert plain.gate.e_score_correction_bias.abs().sum() == 0


def test_aux_loss_recorded_with_graph_and_max_violation():
    layer = _layer(aux_loss_coef=0.01, scoring="softmax")
    layer(torch.randn(3, 5, D))
    assert layer.last_aux_loss is not None and layer.last_aux_loss.requires_grad
    assert max_violation(torch.tensor([5, 5, 5])) == 0.0
    assert max_violation(torch.tensor([10, 5, 0])) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="counts"):
        max_violation(torch.zeros(3))


@pytest.mark.parametrize("over,match", [
    (dict(top_k=7), "top_k must be <= num_experts=6, got top_k=7"),
    (dict(top_k=0), "top_k must be a positive int"),
    (dict(scoring="relu"), "scoring must be one of"),
    (dict(n_group=4), "divisible by n_group"),
    (dict(n_group=3, topk_group=4), "topk_group must be <= n_group"),
])
def test_bad_config(over, match):
    cfg = dict(hidden_size=D, moe_intermediate_size=I_MOE, num_experts=E, top_k=2)
    with pytest.raises(ValueError, match=match):
        MoEConfig(**{**cfg, **over})


def test_bad_input():
    layer = _layer()
    with pytest.raises(ValueError, match="hidden_size"):
        layer(torch.randn(4, D + 1))
    with pytest.raises(TypeError, match="floating-point"):
        layer(torch.ones(4, D, dtype=torch.long))
    with pytest.raises(TypeError, match="MoEConfig"):
        MoELayer({"hidden_size": D})
