"""Normalizing flows, CNFs and flow matching: log-det = logdet of the autograd Jacobian,
exact inverses, exact likelihoods of closed-form flows, and bad input.

The reference for a flow's log-determinant is ``torch.logdet`` of the Jacobian that
``torch.autograd.functional.jacobian`` computes sample by sample.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd.functional import jacobian

from mlatlas.generative.cnf import (
    CNF,
    divergence,
    flow_matching_loss,
    log_likelihood,
    odeint,
    odeint_rk4,
    ot_path,
    standard_normal_log_prob,
)
from mlatlas.generative.flows import (
    ActNorm,
    AffineCoupling,
    InvertibleLinear,
    Permutation,
    RealNVP,
    coupling_mask,
)


def _perturb(module: torch.nn.Module, seed: int, scale: float = 0.3) -> torch.nn.Module:
    """Move every parameter off its (identity) initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return module


def _jacobian_logdets(f, x: torch.Tensor) -> torch.Tensor:
    out = []
    for i in range(x.shape[0]):
        jac = jacobian(lambda u: f(u[None])[0][0], x[i])
        out.append(torch.logdet(jac) if torch.det(jac) > 0 else torch.linalg.slogdet(jac)[1])
    return torch.stack(out)


def _layers(dim: int):
    g = torch.Generator().manual_seed(dim)
    yield "actnorm", ActNorm(dim)
    yield "coupling-checkerboard", _perturb(AffineCoupling(dim, coupling_mask(dim), 16), 1)
    yield "coupling-half", _perturb(AffineCoupling(dim, coupling_mask(dim, "half", 1), 16), 2)
    yield "linear", _perturb(InvertibleLinear(dim, g), 3, 0.1)
    yield "permutation", Permutation(dim, "random", g)
    yield "realnvp", _perturb(RealNVP(dim, 4, 16, mixing="linear", generator=g), 4, 0.1)


@pytest.mark.parametrize("dim", [2, 5])
def test_logdet_equals_logdet_of_autograd_jacobian(dim):
    x = torch.randn(6, dim, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 2
    for name, layer in _layers(dim):
        layer = layer.double()
        layer(x)  # data-dependent ActNorm initialisation
        _perturb(layer, 7, 0.05)  # ActNorm parameters away from the init too
        _, logdet = layer(x)
        # float64: both sides are exact up to round-off
        torch.testing.assert_close(logdet, _jacobian_logdets(layer, x), atol=1e-10, rtol=1e-10,
                                   msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("dim", [2, 3, 7])
def test_inverse_of_forward_is_identity_in_float32(dim):
    x = torch.randn(33, dim, generator=torch.Generator().manual_seed(1)) * 3
    for name, layer in _layers(dim):
        y, _ = layer(x)
        # fp32, couplings with exp(±s), |s| ≤ 1.3: a few ulps of |x| ≈ 10
        torch.testing.assert_close(layer.inverse(y), x, atol=1e-5, rtol=1e-5,
                                   msg=lambda m, name=name: f"{name}: {m}")


def test_realnvp_gradients_of_log_prob_match_jacobian_reference():
    flow = _perturb(RealNVP(3, 3, 8, mixing="reverse"), 0, 0.2).double()
    x = torch.randn(4, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    flow(x)
    # reference log-likelihood: log N(f(x)) + logdet(autograd Jacobian), differentiated by
    # double backward through torch.autograd.functional.jacobian(create_graph=True)
    ref = []
    for i in range(4):
        jac = jacobian(lambda u: flow(u[None])[0][0], x[i], create_graph=True)
        z = flow(x[i:i + 1])[0]
        # slogdet: the reverse permutation of 3 features has det −1 (logdet would be nan)
        ref.append(standard_normal_log_prob(z)[0] + torch.linalg.slogdet(jac)[1])
    params = [p for p in flow.parameters() if p.requires_grad]
    g_ref = torch.autograd.grad(torch.stack(ref).sum(), params)
    g_ours = torch.autograd.grad(flow.log_prob(x).sum(), params)
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-8)


def test_actnorm_data_dependent_init_and_state():
    x = 3 + 2 * torch.randn(500, 3, generator=torch.Generator().manual_seed(0))
    norm = ActNorm(3)
    y, _ = norm(x)
    torch.testing.assert_close(y.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    torch.testing.assert_close(y.std(0), torch.ones(3), atol=1e-5, rtol=0)
    fresh = ActNorm(3)
    fresh.load_state_dict(norm.state_dict())
    assert bool(fresh.initialized)  # the init flag travels with the checkpoint
    y2, _ = fresh(x[:7] * 10)  # no re-initialisation on a later batch
    torch.testing.assert_close(y2, norm(x[:7] * 10)[0], atol=0, rtol=0)


def test_realnvp_density_integrates_to_one():
    flow = _perturb(RealNVP(2, 4, 16), 3, 0.2)
    flow(torch.randn(256, 2, generator=torch.Generator().manual_seed(0)))
    grid = torch.linspace(-9, 9, 361)
    xx, yy = torch.meshgrid(grid, grid, indexing="ij")
    pts = torch.stack([xx.reshape(-1), yy.reshape(-1)], 1).double()
    with torch.no_grad():
        mass = flow.double().log_prob(pts).exp().sum() * (grid[1] - grid[0]) ** 2
    # Riemann sum on a 0.05 grid over [-9, 9]²: the tails beyond are < 1e-6
    assert abs(float(mass) - 1.0) < 5e-3


# ------------------------------------------------------------------ continuous flows


def _linear_field(a: torch.Tensor):
    return lambda x, t: x @ a.T


def test_cnf_likelihood_of_a_linear_flow_is_exact():
    # dz/dt = A z from the prior N(0, I) at t = 0 to the data at t = 1: x = e^A z, so
    # p_1 = N(0, e^A e^Aᵀ) and log p_1(x) = log N(e^{-A} x; 0, I) − tr A.
    a = torch.tensor([[0.3, -0.8], [0.5, 0.1]], dtype=torch.float64)
    x = torch.randn(9, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ea = torch.linalg.matrix_exp(a)
    true = torch.distributions.MultivariateNormal(torch.zeros(2, dtype=torch.float64),
                                                  ea @ ea.T).log_prob(x)
    lp, z, nfe = log_likelihood(_linear_field(a), x, t_data=1.0, t_prior=0.0, rtol=1e-10,
                                atol=1e-10)
    torch.testing.assert_close(lp, true, atol=1e-8, rtol=0)
    torch.testing.assert_close(z, x @ torch.linalg.inv(ea).T, atol=1e-8, rtol=0)
    assert nfe > 0
    lp4, _, _ = log_likelihood(_linear_field(a), x, t_data=1.0, t_prior=0.0, solver="rk4",
                               n_steps=16)
    torch.testing.assert_close(lp4, true, atol=1e-5, rtol=0)  # RK4 error O(h⁴)
    cnf = CNF(lambda x, t: x @ a.T)
    torch.testing.assert_close(cnf.sample(z, rtol=1e-10, atol=1e-10), x, atol=1e-8, rtol=0)


def test_rk4_likelihood_gradient_matches_the_closed_form():
    a0 = torch.tensor([[0.2, -0.4, 0.1], [0.3, -0.1, 0.0], [0.0, 0.5, 0.1]], dtype=torch.float64)
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    a = a0.clone().requires_grad_(True)
    lp, _, _ = log_likelihood(lambda z, t: z @ a.T, x, t_data=1.0, t_prior=0.0, solver="rk4",
                              n_steps=20)
    (g_ours,) = torch.autograd.grad(lp.sum(), a)
    b = a0.clone().requires_grad_(True)
    true = standard_normal_log_prob(x @ torch.linalg.matrix_exp(-b).T) - torch.trace(b)
    (g_true,) = torch.autograd.grad(true.sum(), b)
    torch.testing.assert_close(g_ours, g_true, atol=1e-5, rtol=1e-5)  # RK4 error O(h⁴)


def test_divergence_matches_jacobian_trace_and_hutchinson_is_unbiased():
    net = torch.nn.Sequential(torch.nn.Linear(4, 12), torch.nn.SiLU(), torch.nn.Linear(12, 4))
    net = net.double()
    fn = lambda x, t: net(x) * (1 + t[:, None])  # noqa: E731
    x = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)
    tr = torch.stack([torch.trace(jacobian(lambda u, i=i: fn(u[None], t[i:i + 1])[0], x[i]))
                      for i in range(3)])
    torch.testing.assert_close(divergence(fn, x, t, method="exact")[1], tr, atol=1e-10,
                               rtol=1e-10)
    probes = torch.randn(2000, 3, 4, generator=torch.Generator().manual_seed(1),
                         dtype=torch.float64)
    _, est = divergence(fn, x, t, method="hutchinson", probes=probes)
    # one Gaussian-probe estimate has std sqrt(2) ‖J‖_F; averaged over 2000 probes the
    # standard error is sqrt(2/2000) ‖J‖_F — the bound below is 5 of those
    frob = torch.stack([jacobian(lambda u, i=i: fn(u[None], t[i:i + 1])[0], x[i]).norm()
                        for i in range(3)])
    assert bool(((est - tr).abs() < 5 * (2 / 2000) ** 0.5 * frob).all())


def test_scipy_odeint_and_rk4_agree_on_a_nonlinear_field():
    fn = lambda x, t: torch.sin(x) * torch.cos(3 * t)[:, None] - 0.2 * x  # noqa: E731
    x = torch.randn(7, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a, _ = odeint(fn, x, 0.0, 1.0, rtol=1e-10, atol=1e-10)
    b = odeint_rk4(fn, x, 0.0, 1.0, 64)
    torch.testing.assert_close(a, b, atol=1e-7, rtol=0)
    back, _ = odeint(fn, a, 1.0, 0.0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(back, x, atol=1e-8, rtol=0)


def test_ot_path_velocity_is_the_time_derivative():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g,
                                                                             dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64).requires_grad_(True)
    sigma_min = 0.05
    xt, ut = ot_path(x0, x1, t, sigma_min)
    dx = torch.stack([torch.autograd.grad(xt[:, j].sum(), t, retain_graph=True)[0]
                      for j in range(3)], 1)
    torch.testing.assert_close(dx, ut, atol=1e-12, rtol=0)
    x_end, _ = ot_path(x0, x1, torch.ones(6, dtype=torch.float64), sigma_min)
    torch.testing.assert_close(x_end, x1 + sigma_min * x0, atol=1e-12, rtol=0)
    x_start, _ = ot_path(x0, x1, torch.zeros(6, dtype=torch.float64), sigma_min)
    torch.testing.assert_close(x_start, x0, atol=0, rtol=0)
    # the conditional velocity itself has zero loss only on its own pair; as a check of the
    # estimator: the loss of the marginal-optimal field for a point mass data x1 = c
    c = torch.tensor([[1.0, -2.0, 0.5]], dtype=torch.float64)
    opt = lambda x, tt: (c - (1 - sigma_min) * x) / (1 - (1 - sigma_min) * tt[:, None])  # noqa
    loss = flow_matching_loss(opt, c.expand(64, 3), sigma_min=sigma_min, generator=g)
    assert float(loss) < 1e-20


# ------------------------------------------------------------------ bad input


def test_bad_input_raises_clear_errors():
    flow = RealNVP(2, 2, 8)
    with pytest.raises(ValueError, match=r"x must have shape \[B, 2\], got \(4, 3\)"):
        flow(torch.zeros(4, 3))
    with pytest.raises(TypeError, match="x must be a float tensor"):
        flow(torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"z must have shape \[B, 2\]"):
        flow.inverse(torch.zeros(2))
    with pytest.raises(ValueError, match="n must be a positive int"):
        flow.sample(0)
    with pytest.raises(ValueError, match="kind must be 'checkerboard' or 'half'"):
        coupling_mask(4, "stripes")
    with pytest.raises(ValueError, match=r"mask must be a binary tensor of shape \[3\]"):
        AffineCoupling(3, torch.ones(2))
    with pytest.raises(ValueError, match="ActNorm needs a batch of at least 2"):
        ActNorm(2)(torch.zeros(1, 2))
    with pytest.raises(ValueError, match="mixing must be"):
        RealNVP(2, mixing="shuffle")
    with pytest.raises(ValueError, match="n_steps must be a positive int, got 0"):
        odeint_rk4(lambda x, t: x, torch.zeros(2, 2), 0.0, 1.0, 0)
    with pytest.raises(ValueError, match="rtol must be a positive float"):
        odeint(lambda x, t: x, torch.zeros(2, 2), 0.0, 1.0, rtol=0.0)
    with pytest.raises(ValueError, match=r"velocity fn must return the shape of x \(2, 2\)"):
        log_likelihood(lambda x, t: x[:, :1], torch.zeros(2, 2), t_data=1.0, t_prior=0.0)
    with pytest.raises(ValueError, match="trace must be one of"):
        log_likelihood(lambda x, t: x, torch.zeros(2, 2), t_data=1, t_prior=0, trace="fast")
    with pytest.raises(ValueError, match="method='hutchinson' needs probes"):
        divergence(lambda x, t: x, torch.zeros(2, 2), torch.zeros(2), method="hutchinson")
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        ot_path(torch.zeros(2, 2), torch.zeros(2, 2), torch.tensor([0.5, 1.5]))
    with pytest.raises(ValueError, match="x0 and x1 must have the same shape"):
        ot_path(torch.zeros(2, 2), torch.zeros(2, 3), torch.zeros(2))
    with pytest.raises(ValueError, match="x must be batched"):
        odeint(lambda x, t: x, torch.zeros(3), 0.0, 1.0)
    with pytest.raises(ValueError, match="t_data and t_prior must differ"):
        CNF(torch.nn.Identity(), 0.5, 0.5)
    assert math.isfinite(float(standard_normal_log_prob(torch.zeros(1, 2))[0]))
