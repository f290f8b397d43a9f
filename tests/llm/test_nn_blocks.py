"""RMSNorm and RoPE (mlatlas.nn.norms / mlatlas.nn.rope) against transformers' Llama pieces.

Each block on its own, forward and backward: ``LlamaRMSNorm`` and ``torch.nn.functional.rms_norm``
for the norm; ``LlamaRotaryEmbedding`` (default and ``llama3`` frequencies) and
``apply_rotary_pos_emb`` for RoPE. Shapes are not powers of two (d = 13, head_dim = 10).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mlatlas.nn.norms import RMSNorm, rms_norm
from mlatlas.nn.rope import (
    apply_rope,
    check_rope_scaling,
    rope_attention_factor,
    rope_cos_sin,
    rope_inv_freq,
    rotate_half,
)

LLAMA3_SCALING = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                  "high_freq_factor": 4.0, "original_max_position_embeddings": 200}


def _grads(fn, *inputs, seed=0):
    """``fn(*inputs)`` and the gradients of a weighted sum of it w.r.t. every input."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out.dtype)
    return (out.detach(), *torch.autograd.grad((out * w).sum(), leaves))


# ------------------------------------------------------------------------------ RMSNorm
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_matches_llama_rms_norm_values_and_grads(reference, dtype):
    reference("transformers")
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    g = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 7, 13, generator=g) * 3).to(dtype)
    gain = 1 + 0.3 * torch.randn(13, generator=g)  # float32 gain, as in a loaded model
    ours, ref = RMSNorm(13, eps=1e-5), LlamaRMSNorm(13, eps=1e-5)
    key_map = {"weight": "weight"}  # ours → HF
    assert set(key_map) == set(ours.state_dict()) and set(key_map.values()) == set(
        ref.state_dict())
    with torch.no_grad():
        ours.weight.copy_(gain)
        ref.weight.copy_(gain)

    def run(module):
        module.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        y = module(xi)
        w = torch.linspace(-1, 2, y.numel()).reshape(y.shape).to(y.dtype)
        (y * w).sum().backward()
        return y.detach(), xi.grad, module.weight.grad

    got, want = run(ours), run(ref)
    assert got[0].dtype == want[0].dtype  # weight * x.to(dtype): promoted like HF
    tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    for name, a, b in zip(("out", "dx", "dweight"), got, want, strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_rms_norm_matches_torch_functional_float64():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(5, 11, generator=g, dtype=torch.float64)
    gain = torch.rand(11, generator=g, dtype=torch.float64) + 0.5
    # ours computes in float32 (like HF) and casts back: fp32-level agreement with fp64 torch
    got = _grads(lambda a, w: rms_norm(a, w, 1e-6), x, gain)
    want = _grads(lambda a, w: F.rms_norm(a, (11,), w, 1e-6), x, gain)
    for a, b in zip(got, want, strict=True):
        assert a.dtype == torch.float64
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_rms_norm_edge_cases():
    w = torch.ones(13)
    zeros = torch.zeros(2, 13)
    assert torch.equal(rms_norm(zeros, w), zeros)  # 0 / sqrt(0 + eps) = 0, not NaN
    scaled = torch.randn(4, 13, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(rms_norm(scaled * 1e3, w), rms_norm(scaled, w), atol=1e-5,
                               rtol=1e-5)  # scale invariant (up to eps)
    one = rms_norm(torch.tensor([[-4.0]]), torch.ones(1))  # d = 1: x / |x|
    torch.testing.assert_close(one, torch.tensor([[-1.0]]), atol=1e-6, rtol=0)


def test_rms_norm_bad_input():
    w = torch.ones(13)
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got torch.int64"):
        rms_norm(torch.ones(2, 13, dtype=torch.long), w)
    with pytest.raises(TypeError, match="x must be a floating-point tensor, got list"):
        rms_norm([1.0] * 13, w)
    with pytest.raises(ValueError, match=r"x must have last dim 13, got shape \(2, 12\)"):
        rms_norm(torch.ones(2, 12), w)
    with pytest.raises(ValueError, match=r"x must have last dim 13, got shape \(\)"):
        rms_norm(torch.tensor(1.0), w)
    with pytest.raises(ValueError, match="dim must be a positive int, got 0"):
        RMSNorm(0)
    with pytest.raises(ValueError, match="dim must be a positive int, got True"):
        RMSNorm(True)
    with pytest.raises(ValueError, match="eps must be > 0, got 0"):
        RMSNorm(8, eps=0)


# ------------------------------------------------------------------------------ RoPE
def _hf_rotary(transformers, head_dim, theta, scaling):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    rope = {"rope_type": "default", "rope_theta": theta} if scaling is None else {
        **scaling, "rope_theta": theta}
    cfg = transformers.LlamaConfig(hidden_size=6 * head_dim, num_attention_heads=6,
                                   head_dim=head_dim, max_position_embeddings=4096,
                                   rope_parameters=rope)
    return LlamaRotaryEmbedding(cfg)


@pytest.mark.parametrize("theta,scaling", [(10000.0, None), (500000.0, LLAMA3_SCALING),
                                           (10000.0, {**LLAMA3_SCALING, "factor": 4.0,
                                                      "original_max_position_embeddings": 100})])
def test_inv_freq_and_cos_sin_match_llama_rotary_embedding(reference, theta, scaling):
    transformers = reference("transformers")
    hf = _hf_rotary(transformers, 10, theta, scaling)
    inv = rope_inv_freq(10, theta, scaling)
    assert inv.dtype == torch.float32 and inv.shape == (5,)
    torch.testing.assert_close(inv, hf.inv_freq, atol=0, rtol=1e-6)
    pos = torch.tensor([[0, 1, 2, 3, 4, 5, 6], [3, 17, 250, 999, 1, 0, 2047]])
    x = torch.zeros(2, 7, 10)
    cos, sin = rope_cos_sin(pos, inv)
    cos_ref, sin_ref = hf(x, pos)
    assert cos.shape == cos_ref.shape == (2, 7, 10)
    torch.testing.assert_close(cos, cos_ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sin, sin_ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_apply_rope_matches_apply_rotary_pos_emb_values_and_grads(reference, dtype):
    reference("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    g = torch.Generator().manual_seed(2)
    q = torch.randn(2, 3, 7, 10, generator=g, dtype=dtype)
    k = torch.randn(2, 3, 7, 10, generator=g, dtype=dtype)
    pos = torch.randint(0, 300, (2, 7), generator=g)
    cos, sin = rope_cos_sin(pos, rope_inv_freq(10, 500000.0, LLAMA3_SCALING), dtype)

    def ours(a, b, c, s):
        return torch.stack([apply_rope(a, c, s), apply_rope(b, c, s)])

    def ref(a, b, c, s):
        return torch.stack(apply_rotary_pos_emb(a, b, c, s))

    got, want = _grads(ours, q, k, cos, sin), _grads(ref, q, k, cos, sin)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-12, rtol=0)
    for name, a, b in zip(("out", "dq", "dk", "dcos", "dsin"), got, want, strict=True):
        torch.testing.assert_close(a, b, **tol, msg=lambda m, n=name: f"{n}: {m}")


def test_rope_properties():
    # a rotation: norms are kept, and q·k depends only on the position difference
    g = torch.Generator().manual_seed(3)
    inv = rope_inv_freq(10)
    q = torch.randn(1, 1, 1, 10, generator=g, dtype=torch.float64)
    k = torch.randn(1, 1, 1, 10, generator=g, dtype=torch.float64)

    def rot(x, m):
        c, s = rope_cos_sin(torch.tensor([[m]]), inv, torch.float64)
        return apply_rope(x, c, s)

    torch.testing.assert_close(rot(q, 41).norm(), q.norm(), atol=1e-6, rtol=1e-6)
    dots = [float((rot(q, m + 5) * rot(k, m)).sum()) for m in (0, 9, 123)]
    assert max(dots) - min(dots) < 1e-5
    assert abs(float((rot(q, 5) * rot(k, 0)).sum()) - float((rot(q, 6) * rot(k, 0)).sum())) > 1e-4
    # position 0 is the identity; rotate_half pairs channel i with i + D/2
    torch.testing.assert_close(rot(q, 0), q, atol=0, rtol=0)
    x = torch.arange(1.0, 11.0)
    assert rotate_half(x).tolist() == [-6.0, -7.0, -8.0, -9.0, -10.0, 1.0, 2.0, 3.0, 4.0, 5.0]


SCALED = {
    "linear": {"rope_type": "linear", "factor": 2.5},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 40},
    "yarn-options": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 40,
                     "beta_fast": 16, "beta_slow": 2, "mscale": 0.9, "mscale_all_dim": 0.6,
                     "truncate": False},
    "yarn-attention-factor": {"rope_type": "yarn", "factor": 2.0, "attention_factor": 1.5,
                              "original_max_position_embeddings": 40},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0],
                 "long_factor": [1.0, 2.0, 4.0, 6.0, 9.0], "original_max_position_embeddings": 40},
    "longrope-factor": {"rope_type": "longrope", "short_factor": [1.0] * 5,
                        "long_factor": [1.0, 2.0, 4.0, 6.0, 9.0], "factor": 3.0,
                        "original_max_position_embeddings": 40},
}


@pytest.mark.parametrize("name", list(SCALED))
@pytest.mark.parametrize("length", [30, 64, 99])
def test_scaled_rope_matches_transformers(reference, name, length):
    # below and beyond L_orig = 40 and L_max = 64: cos/sin (attention factor included) equal
    transformers = reference("transformers")
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = transformers.LlamaConfig(hidden_size=60, num_attention_heads=6, head_dim=10,
                                   max_position_embeddings=64,
                                   rope_parameters={**SCALED[name], "rope_theta": 500.0})
    hf = LlamaRotaryEmbedding(cfg)
    pos = torch.stack([torch.arange(length), torch.arange(length).flip(0)])
    cos_ref, sin_ref = hf(torch.zeros(1, length, 10), pos)
    inv = rope_inv_freq(10, 500.0, SCALED[name], max_position_embeddings=64, seq_len=length)
    cos, sin = rope_cos_sin(pos, inv, torch.float32,
                            rope_attention_factor(check_rope_scaling(SCALED[name], 10, 64), 64))
    torch.testing.assert_close(cos, cos_ref, atol=0, rtol=0)
    torch.testing.assert_close(sin, sin_ref, atol=0, rtol=0)


def test_rope_bad_input():
    with pytest.raises(ValueError, match="head_dim must be a positive even int, got 9"):
        rope_inv_freq(9)
    with pytest.raises(ValueError, match="head_dim must be a positive even int, got 0"):
        rope_inv_freq(0)
    with pytest.raises(ValueError, match="rope_theta must be > 0, got 0.0"):
        rope_inv_freq(10, 0.0)
    with pytest.raises(ValueError, match="rope_scaling type must be one of .* got 'ntk'"):
        rope_inv_freq(10, 1e4, {"rope_type": "ntk", "factor": 2.0})
    with pytest.raises(ValueError, match="'dynamic' needs max_position_embeddings"):
        rope_inv_freq(10, 1e4, {"rope_type": "dynamic", "factor": 2.0})
    with pytest.raises(ValueError, match="rope_scaling factor must be > 0, got -2.0"):
        rope_inv_freq(10, 1e4, {"type": "linear", "factor": -2.0})
    with pytest.raises(ValueError, match=r"missing \['original_max_position_embeddings'\]"):
        rope_inv_freq(10, 1e4, {k: v for k, v in LLAMA3_SCALING.items()
                                if k != "original_max_position_embeddings"})
    with pytest.raises(ValueError, match=r"factor >= 1 and 0 < low_freq_factor < "
                                         r"high_freq_factor, got factor=0.5"):
        rope_inv_freq(10, 1e4, {**LLAMA3_SCALING, "factor": 0.5})
    with pytest.raises(ValueError, match="low=4.0, high=1.0"):
        rope_inv_freq(10, 1e4, {**LLAMA3_SCALING, "low_freq_factor": 4.0,
                                "high_freq_factor": 1.0})
    inv = rope_inv_freq(10)
    with pytest.raises(ValueError, match=r"position_ids must be an integer tensor \[B, T\], got "
                                         r"torch.float32 \(1, 7\)"):
        rope_cos_sin(torch.zeros(1, 7), inv)
    with pytest.raises(ValueError, match=r"position_ids must be an integer tensor \[B, T\], got "
                                         r"torch.int64 \(7,\)"):
        rope_cos_sin(torch.arange(7), inv)
    cos, sin = rope_cos_sin(torch.arange(7)[None], inv)
    with pytest.raises(ValueError, match=r"cos/sin must be \[B, T=6, D=10\], got \(1, 7, 10\)"):
        apply_rope(torch.zeros(1, 2, 6, 10), cos, sin)
