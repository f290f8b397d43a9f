"""Parity of mlatlas.nn.activations / feedforward with torch.nn.functional (values and grads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from same_grads import assert_same_grads

import mlatlas.nn.activations as A
from mlatlas.nn.activations import get_activation
from mlatlas.nn.feedforward import FeedForward, GatedFeedForward

# (ours, reference) for every parameter-free element-wise activation
PAIRS = {
    "sigmoid": (A.sigmoid, torch.sigmoid),
    "tanh": (A.tanh, torch.tanh),
    "relu": (A.relu, F.relu),
    "leaky_relu": (A.leaky_relu, F.leaky_relu),
    "leaky_relu_0.2": (lambda x: A.leaky_relu(x, 0.2), lambda x: F.leaky_relu(x, 0.2)),
    "elu": (A.elu, F.elu),
    "elu_0.5": (lambda x: A.elu(x, 0.5), lambda x: F.elu(x, 0.5)),
    "selu": (A.selu, F.selu),
    "gelu": (A.gelu, F.gelu),
    "gelu_tanh": (A.gelu_tanh, lambda x: F.gelu(x, approximate="tanh")),
    "silu": (A.silu, F.silu),
    "swish_1.7": (lambda x: A.swish(x, 1.7), lambda x: x * torch.sigmoid(1.7 * x)),
    "mish": (A.mish, F.mish),
    "softplus": (A.softplus, F.softplus),  # torch returns x for x > 20: within tolerance
}
# float64: the two sides differ only by rounding; float32: a few ulp of the output
TOL = {torch.float64: dict(atol=1e-12, rtol=1e-10), torch.float32: dict(atol=1e-6, rtol=1e-5)}


def _inputs(dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(7, 13, generator=g, dtype=dtype) * 4  # not powers of two
    edges = torch.tensor([0.0, -0.0, 1e-8, -1e-8, 1.0, -1.0, 15.0, -15.0, 19.9, -19.9,
                          1e-30, -1e-30, 3.0, -3.0], dtype=dtype)
    return torch.cat([x.flatten(), edges]).reshape(-1, 7)


def _value_and_grad(fn, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    y = fn(x)
    w = torch.linspace(-1, 2, y.numel(), dtype=x.dtype).reshape(y.shape)  # non-uniform dL/dy
    (g,) = torch.autograd.grad((y * w).sum(), x)
    return y.detach(), g


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", sorted(PAIRS))
def test_values_and_grads_match_torch(name, dtype):
    ours, ref = PAIRS[name]
    x = _inputs(dtype)
    y, g = _value_and_grad(ours, x)
    y_ref, g_ref = _value_and_grad(ref, x)
    assert y.dtype == dtype and y.shape == x.shape
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    torch.testing.assert_close(g, g_ref, **TOL[dtype])


@pytest.mark.parametrize("name", sorted(PAIRS))
def test_large_inputs_stay_finite_and_nan_propagates(name):
    ours, ref = PAIRS[name]
    for dtype, big in ((torch.float64, 700.0), (torch.float32, 80.0)):
        x = torch.tensor([-big, -50.0, 50.0, big], dtype=dtype)
        y, g = _value_and_grad(ours, x)
        assert torch.isfinite(y).all() and torch.isfinite(g).all(), (name, dtype, y, g)
        torch.testing.assert_close(y, ref(x), **TOL[dtype])
    y = ours(torch.tensor([float("nan"), 1.0], dtype=torch.float64))
    assert torch.isnan(y[0]) and not torch.isnan(y[1])


def test_step_is_the_heaviside_threshold_and_not_differentiable():
    x = _inputs(torch.float64)
    for th in (0.0, 0.7, -2.5):
        torch.testing.assert_close(A.step(x, th), torch.heaviside(x - th, torch.tensor(0.0,
                                   dtype=x.dtype)), atol=0, rtol=0)
    x.requires_grad_(True)
    assert not A.step(x).requires_grad  # derivative 0 a.e.: nothing to learn through it
    assert torch.isnan(A.step(torch.tensor([float("nan")]))).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("channels", [1, 5])
def test_prelu_matches_torch_including_weight_grad(dtype, channels):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 5, 7, generator=g, dtype=dtype)
    w0 = torch.rand(channels, generator=g, dtype=dtype)
    outs = []
    for fn in (A.prelu, F.prelu):
        xi, wi = x.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fn(xi, wi)
        y.pow(2).sum().backward()
        outs.append((y.detach(), xi.grad, wi.grad))
    for ours, ref in zip(*outs):
        torch.testing.assert_close(ours, ref, **TOL[dtype])
    m = A.PReLU(5, init=0.1)
    torch.testing.assert_close(m(x.float()), F.prelu(x.float(), m.weight), atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("dim", [-1, 1])
def test_glu_family_matches_torch(dtype, dim):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(3, 10, 6, generator=g, dtype=dtype)
    refs = {
        A.glu: lambda t: F.glu(t, dim),
        A.reglu: lambda t: t.chunk(2, dim)[0] * F.relu(t.chunk(2, dim)[1]),
        A.geglu: lambda t: t.chunk(2, dim)[0] * F.gelu(t.chunk(2, dim)[1]),
        A.swiglu: lambda t: t.chunk(2, dim)[0] * F.silu(t.chunk(2, dim)[1]),
    }
    for ours, ref in refs.items():
        y, gx = _value_and_grad(lambda t, f=ours: f(t, dim), x)
        y_ref, gx_ref = _value_and_grad(ref, x)
        assert y.shape == ((3, 5, 6) if dim == 1 else (3, 10, 3))
        torch.testing.assert_close(y, y_ref, **TOL[dtype])
        torch.testing.assert_close(gx, gx_ref, **TOL[dtype])


def test_swiglu_ffn_matches_transformers_llama_mlp(reference):
    transformers = reference("transformers")
    from transformers.models.llama.modeling_llama import LlamaMLP

    cfg = transformers.LlamaConfig(hidden_size=12, intermediate_size=20, hidden_act="silu",
                                    num_attention_heads=3, num_key_value_heads=3)
    torch.manual_seed(0)
    ref = LlamaMLP(cfg).double()
    ours = GatedFeedForward(12, 20, kind="swiglu").double()
    key_map = {"gate_proj.weight": "gate_proj.weight", "up_proj.weight": "up_proj.weight",
               "down_proj.weight": "down_proj.weight"}  # ours → HF
    ref_sd = ref.state_dict()
    assert set(key_map.values()) == set(ref_sd) and set(key_map) == set(ours.state_dict())
    missing, unexpected = ours.load_state_dict({k: ref_sd[v] for k, v in key_map.items()})
    assert not missing and not unexpected
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    y, gx = _value_and_grad(ours, x)
    y_ref, gx_ref = _value_and_grad(ref, x)
    torch.testing.assert_close(y, y_ref, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(gx, gx_ref, atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("kind,act", [("glu", torch.sigmoid), ("reglu", F.relu),
                                      ("geglu", F.gelu), ("swiglu", F.silu)])
def test_gated_ffn_formula_and_all_grads(kind, act):
    torch.manual_seed(3)
    m = GatedFeedForward(10, 14, kind=kind, bias=True)
    x = torch.randn(2, 3, 10, requires_grad=True)
    y = m(x)
    ref = F.linear(act(F.linear(x, m.gate_proj.weight, m.gate_proj.bias))
                   * F.linear(x, m.up_proj.weight, m.up_proj.bias),
                   m.down_proj.weight, m.down_proj.bias)
    torch.testing.assert_close(y, ref, atol=1e-6, rtol=1e-5)
    # backward: the input and every weight/bias of the three projections
    assert len(list(m.parameters())) == 6
    assert_same_grads(y, ref, x, m, atol=1e-5, rtol=1e-5, seed=7)


def test_plain_ffn_matches_sequential():
    torch.manual_seed(4)
    m = FeedForward(10, 30, activation="relu", bias=True)
    seq = torch.nn.Sequential(torch.nn.Linear(10, 30), torch.nn.ReLU(), torch.nn.Linear(30, 10))
    key_map = {"up_proj.weight": "0.weight", "up_proj.bias": "0.bias",
               "down_proj.weight": "2.weight", "down_proj.bias": "2.bias"}
    assert set(key_map) == set(m.state_dict()) and set(key_map.values()) == set(seq.state_dict())
    res = seq.load_state_dict({v: m.state_dict()[k] for k, v in key_map.items()})
    assert not res.missing_keys and not res.unexpected_keys
    x = torch.randn(4, 7, 10)
    y, gx = _value_and_grad(m, x)
    y_ref, gx_ref = _value_and_grad(seq, x)
    torch.testing.assert_close(y, y_ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gx, gx_ref, atol=1e-6, rtol=1e-5)
    # parameter gradients, compared through the key map
    m(x).square().sum().backward()
    seq(x).square().sum().backward()
    ours_p, seq_p = dict(m.named_parameters()), dict(seq.named_parameters())
    for k, v in key_map.items():
        torch.testing.assert_close(ours_p[k].grad, seq_p[v].grad, atol=1e-5, rtol=1e-5, msg=k)
    # parameter counts: a gated FFN with hidden ⅔·h has as many weights as a plain one with h
    gated = GatedFeedForward(12, 32)
    plain = FeedForward(12, 48)
    assert sum(p.numel() for p in gated.parameters()) == sum(p.numel() for p in plain.parameters())


def test_registry():
    assert get_activation("SiLU") is A.silu and get_activation("threshold") is A.step
    for name, fn in A.ACTIVATIONS.items():
        assert callable(fn), name
    with pytest.raises(ValueError, match=r"unknown activation 'relux'.*expected one of"):
        get_activation("relux")
    with pytest.raises(TypeError, match="activation name must be a str"):
        get_activation(3)


def test_bad_input():
    with pytest.raises(TypeError, match="floating-point tensor, got dtype torch.int64"):
        A.relu(torch.arange(3))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        A.gelu([1.0, 2.0])
    with pytest.raises(ValueError, match="even size along dim -1"):
        A.swiglu(torch.randn(2, 5))
    with pytest.raises(ValueError, match=r"weight has 3 slopes, expected 1 or x.shape\[1\]"):
        A.prelu(torch.randn(2, 4, 5), torch.ones(3))
    with pytest.raises(ValueError, match="kind must be one of .* got 'relu'"):
        GatedFeedForward(8, 16, kind="relu")
    with pytest.raises(ValueError, match="hidden must be a positive int, got 0"):
        GatedFeedForward(8, 0)
    with pytest.raises(ValueError, match=r"last dim 8 \(dim\), got shape \(2, 7\)"):
        GatedFeedForward(8, 16)(torch.randn(2, 7))
    with pytest.raises(ValueError, match="unknown activation 'foo'"):
        FeedForward(8, 16, activation="foo")
