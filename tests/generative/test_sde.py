"""Score SDEs: diffusers ScoreSdeVeScheduler parity, SDE algebra, PF-ODE likelihood, bad input.

The SDE tests use Gaussian data, whose every marginal and score is known in closed form, so
the samplers and the likelihood are checked against exact answers, not against a run.
"""

from __future__ import annotations

import math

import pytest
import torch

from mlatlas.generative.sde import (
    VESDE,
    VPSDE,
    denoising_score_loss,
    pf_ode_log_likelihood,
    pf_ode_sample,
    probability_flow_drift,
    reverse_sde_sample,
    score_from_eps,
)
from mlatlas.generative.sde_ve_scheduler import ScoreSdeVeScheduler

# ------------------------------------------------------------------ diffusers parity


def _toy_score(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Score of N(0.3, 1 + σ²) with a non-linear wiggle, so steps are not trivially linear."""
    s = sigma.reshape(-1, *([1] * (x.ndim - 1)))
    return -(x - 0.3) / (1 + s**2) + 0.05 * torch.sin(x)


@pytest.mark.parametrize("n_steps", [1, 7, 50])
@pytest.mark.parametrize("shape", [(3, 5), (2, 3, 5, 7)])
def test_score_sde_ve_matches_diffusers_step_by_step(reference, n_steps, shape):
    diffusers = reference("diffusers")
    kw = dict(snr=0.17, sigma_min=0.02, sigma_max=37.0, sampling_eps=1e-3)
    ref, ours = diffusers.ScoreSdeVeScheduler(**kw), ScoreSdeVeScheduler(**kw)
    for s in (ref, ours):
        s.set_timesteps(n_steps)
        s.set_sigmas(n_steps)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, atol=0, rtol=0)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(ours.discrete_sigmas, ref.discrete_sigmas, atol=1e-6, rtol=1e-6)
    x = 37.0 * torch.randn(shape, generator=torch.Generator().manual_seed(0))
    xr, xo = x.clone(), x.clone()
    gr, go = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for i, t in enumerate(ref.timesteps):
        sig = ref.sigmas[i] * torch.ones(shape[0])
        # corrector then predictor, as diffusers' ScoreSdeVePipeline does; fp32: the two are
        # the same float32 operations, so 1e-6 relative covers any reassociation
        a = ref.step_correct(_toy_score(xr, sig), xr, generator=gr).prev_sample
        b = ours.step_correct(_toy_score(xo, sig), xo, generator=go).prev_sample
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-6)
        out_r = ref.step_pred(_toy_score(a, sig), t, a, generator=gr)
        out_o = ours.step_pred(_toy_score(b, sig), t, b, generator=go)
        torch.testing.assert_close(out_o.prev_sample, out_r.prev_sample, atol=1e-5, rtol=1e-6)
        torch.testing.assert_close(out_o.prev_sample_mean, out_r.prev_sample_mean, atol=1e-5,
                                   rtol=1e-6)
        xr, xo = out_r.prev_sample, out_o.prev_sample


def test_score_sde_ve_gradients_match_diffusers(reference):
    diffusers = reference("diffusers")
    ref, ours = diffusers.ScoreSdeVeScheduler(sigma_max=20.0), ScoreSdeVeScheduler(sigma_max=20.0)
    for s in (ref, ours):
        s.set_timesteps(9)
        s.set_sigmas(9)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(4, 6, generator=gen)
    m0 = torch.randn(4, 6, generator=gen)
    grads = []
    for sched in (ref, ours):
        x, m = x0.clone().requires_grad_(True), m0.clone().requires_grad_(True)
        g = torch.Generator().manual_seed(5)
        y = sched.step_correct(m, x, generator=g).prev_sample
        y = sched.step_pred(m * 0.5, sched.timesteps[3], y, generator=g).prev_sample
        (y * torch.linspace(-1, 1, 6)).sum().backward()
        grads.append((x.grad, m.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-5, rtol=1e-6)


def test_score_sde_ve_add_noise_matches_diffusers(reference):
    diffusers = reference("diffusers")
    ref, ours = diffusers.ScoreSdeVeScheduler(), ScoreSdeVeScheduler()
    gen = torch.Generator().manual_seed(0)
    x, z = torch.randn(3, 1, 5, 3, generator=gen), torch.randn(3, 1, 5, 3, generator=gen)
    idx = torch.tensor([0, 17, 1999])
    torch.testing.assert_close(ours.add_noise(x, z, idx), ref.add_noise(x, z, idx),
                               atol=1e-5, rtol=1e-6)


# ------------------------------------------------------------------ SDE algebra


def _dt(fn, t):
    t = t.clone().requires_grad_(True)
    y = fn(t)
    if not y.requires_grad:  # constant in t (the VE mean coefficient)
        return torch.zeros_like(t)
    (g,) = torch.autograd.grad(y.sum(), t)
    return g


@pytest.mark.parametrize("sde", [VPSDE(0.1, 20.0), VPSDE(0.5, 7.0), VESDE(0.01, 50.0)])
def test_marginals_solve_the_moment_odes(sde):
    # For dx = f dt + g dw with linear f = a(t) x: dm/dt = a m, d(s²)/dt = 2 a s² + g².
    t = torch.linspace(0.01, 1.0, 37, dtype=torch.float64)
    x = torch.ones(37, 1, dtype=torch.float64)
    a = sde.drift(x, t)[:, 0]  # f(1, t) = a(t)
    g2 = sde.diffusion(t) ** 2
    dm = _dt(lambda u: sde.marginal_coeffs(u)[0], t)
    dv = _dt(lambda u: sde.marginal_coeffs(u)[1] ** 2, t)
    m, s = sde.marginal_coeffs(t)
    torch.testing.assert_close(dm, a * m, atol=1e-9, rtol=1e-9)
    # the VE marginal std is σ(t) (data carries σ_min noise), so s² and ∫g² differ by σ_min²
    torch.testing.assert_close(dv, 2 * a * s**2 + g2, atol=1e-9, rtol=1e-9)


def test_vp_sde_is_the_limit_of_diffusers_ddpm_linear_schedule(reference):
    diffusers = reference("diffusers")
    n = 1000
    ddpm = diffusers.DDPMScheduler(num_train_timesteps=n, beta_start=0.1 / n, beta_end=20.0 / n,
                                   beta_schedule="linear")
    sde = VPSDE(0.1, 20.0)
    i = torch.tensor([0, 10, 100, 500, 999])
    m, s = sde.marginal_coeffs((i + 1).double() / n)
    abar = ddpm.alphas_cumprod[i].double()
    # discretisation error O(1/N): β_i = β(t_i)/N, so Π(1-β_i) = exp(-∫β) (1 + O(1/N))
    torch.testing.assert_close(m, abar.sqrt(), atol=2e-3, rtol=0)
    torch.testing.assert_close(s, (1 - abar).sqrt(), atol=2e-3, rtol=0)


class GaussianData:
    """Data ``N(μ, Σ)``: every marginal is Gaussian and the exact ε / score are closed form."""

    def __init__(self, sde, mu, cov):
        self.sde, self.mu, self.cov = sde, mu, cov

    def marginal(self, t):
        m, s = self.sde.marginal_coeffs(t)
        eye = torch.eye(len(self.mu), dtype=self.mu.dtype)
        return m[:, None] * self.mu, m[:, None, None] ** 2 * self.cov + s[:, None, None] ** 2 * eye

    def eps(self, x, t):
        mean, cov = self.marginal(t)
        _, s = self.sde.marginal_coeffs(t)
        # ε = -s(t) ∇log p_t = s(t) Σ_t⁻¹ (x - m μ)
        return s[:, None] * torch.linalg.solve(cov, (x - mean)[..., None])[..., 0]

    def log_prob(self, x, t):
        mean, cov = self.marginal(t)
        return torch.distributions.MultivariateNormal(mean, cov).log_prob(x)


def _gaussian(sde, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    return GaussianData(sde, torch.randn(d, generator=g, dtype=torch.float64),
                        0.3 * a @ a.T / d + 0.2 * torch.eye(d, dtype=torch.float64))


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(0.01, 20.0)])
def test_score_from_eps_is_the_exact_score(sde):
    data = _gaussian(sde)
    x = torch.randn(9, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    t = torch.linspace(0.05, 1, 9, dtype=torch.float64)
    score = score_from_eps(data.eps, sde)(x, t)
    xg = x.clone().requires_grad_(True)
    (auto,) = torch.autograd.grad(data.log_prob(xg, t).sum(), xg)  # samples are independent
    torch.testing.assert_close(score, auto, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(0.01, 20.0)])
def test_pf_ode_likelihood_equals_the_exact_log_density(sde):
    data = _gaussian(sde)
    eps = 1e-3
    x = data.mu + torch.randn(11, 2, dtype=torch.float64,
                              generator=torch.Generator().manual_seed(2)) @ torch.linalg.cholesky(data.cov).T
    score = score_from_eps(data.eps, sde)
    p_T = lambda z: data.log_prob(z, torch.ones(z.shape[0], dtype=z.dtype))  # noqa: E731
    lp, nfe = pf_ode_log_likelihood(score, sde, x, eps=eps, rtol=1e-9, atol=1e-9,
                                    prior_log_prob=p_T)
    true = data.log_prob(x, torch.full((11,), eps, dtype=torch.float64))
    # with the exact score and the exact p_T the PF-ODE likelihood is exact: what remains is
    # the solver tolerance (1e-9 on the augmented state)
    torch.testing.assert_close(lp, true, atol=1e-6, rtol=0)
    assert nfe > 10
    # with the SDE's Gaussian prior in place of p_T the error is the prior mismatch only
    lp_prior, _ = pf_ode_log_likelihood(score, sde, x, eps=eps, rtol=1e-6, atol=1e-6)
    assert float((lp_prior - true).abs().max()) < 0.2


def test_pf_ode_likelihood_hutchinson_is_unbiased_in_higher_dims():
    sde = VPSDE()
    data = _gaussian(sde, d=4, seed=4)
    x = data.mu + 0.5 * torch.randn(5, 4, dtype=torch.float64,
                                    generator=torch.Generator().manual_seed(3))
    score = score_from_eps(data.eps, sde)
    exact, _ = pf_ode_log_likelihood(score, sde, x, trace="exact", rtol=1e-5, atol=1e-5)
    k = 6
    est = torch.stack([pf_ode_log_likelihood(score, sde, x, trace="hutchinson", n_probes=1,
                                             generator=torch.Generator().manual_seed(i),
                                             rtol=1e-5, atol=1e-5)[0] for i in range(k)])
    # unbiased: the mean of k independent estimates is within 4 standard errors of the exact
    # value (a z-test that fails with probability ≈ 1e-4 per point for a correct estimator)
    stderr = est.std(0) / k**0.5
    assert bool(((est.mean(0) - exact).abs() < 4 * stderr + 1e-3).all())
    assert float(est.std(0).max()) > 0  # it is a stochastic estimate, not the exact trace


@pytest.mark.parametrize("sde", [VPSDE(), VESDE(0.01, 50.0)])
def test_reverse_sde_and_pf_ode_sample_the_data_distribution(sde):
    data = _gaussian(sde)
    score = score_from_eps(lambda x, t: data.eps(x.double(), t.double()).float(), sde)
    g = torch.Generator().manual_seed(0)
    n = 2000
    xt = sde.prior_sample((n, 2), g)
    em = reverse_sde_sample(score, sde, xt, 200, generator=g)
    pc = reverse_sde_sample(score, sde, xt, 50, corrector_steps=1, generator=g)
    ode, _ = pf_ode_sample(score, sde, xt[:500], rtol=1e-4, atol=1e-4)
    for samples in (em, pc, ode):
        m = samples.double().mean(0)
        c = torch.cov(samples.double().T)
        # Monte-Carlo error of the mean ≈ sqrt(0.7/500) ≈ 0.04; the prior mismatch (VE:
        # N(0, σ_max²) instead of N(μ, Σ + σ_max²)) shifts the mean by ≈ ‖μ‖/σ_max ≤ 0.05
        torch.testing.assert_close(m, data.mu, atol=0.15, rtol=0)
        torch.testing.assert_close(c, data.cov, atol=0.15, rtol=0)


def test_denoising_loss_is_minimised_by_the_true_eps():
    sde = VPSDE()
    data = _gaussian(sde)
    g = torch.Generator().manual_seed(0)
    x0 = (data.mu + torch.randn(4000, 2, generator=g, dtype=torch.float64) @ torch.linalg.cholesky(data.cov).T)
    true = denoising_score_loss(data.eps, sde, x0, generator=torch.Generator().manual_seed(1))
    worse = denoising_score_loss(lambda x, t: 0.9 * data.eps(x, t), sde, x0,
                                 generator=torch.Generator().manual_seed(1))
    assert float(true) < float(worse)
    for mode in ("log-uniform", "mixed"):  # every weighting is minimised by the true ε
        a = denoising_score_loss(data.eps, sde, x0, t_sampling=mode,
                                 generator=torch.Generator().manual_seed(2))
        b = denoising_score_loss(lambda x, t: 1.1 * data.eps(x, t), sde, x0, t_sampling=mode,
                                 generator=torch.Generator().manual_seed(2))
        assert float(a) < float(b)


# ------------------------------------------------------------------ bad input


def test_bad_input_raises_clear_errors():
    sde = VPSDE()
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1.0\]"):
        sde.marginal(x, torch.full((4,), 1.5))
    with pytest.raises(ValueError, match=r"t must have shape \[4\]"):
        sde.drift(x, torch.zeros(3))
    with pytest.raises(TypeError, match="t must be a float tensor"):
        sde.drift(x, torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="noise must have the shape of x0"):
        sde.perturb(x, torch.zeros(4), torch.zeros(4, 3))
    with pytest.raises(ValueError, match="n_steps must be a positive int, got 0"):
        reverse_sde_sample(lambda x, t: x, sde, x, 0)
    with pytest.raises(ValueError, match="eps must be in"):
        pf_ode_sample(lambda x, t: x, sde, x, eps=0.0)
    with pytest.raises(ValueError, match=r"score_fn output must have the shape of x \(4, 2\)"):
        pf_ode_log_likelihood(lambda x, t: x[:, :1], sde, x)
    with pytest.raises(ValueError, match=r"eps_model output must have the shape of x"):
        score_from_eps(lambda x, t: x[:, :1], sde)(x, torch.full((4,), 0.5))
    with pytest.raises(ValueError, match="need 0 < beta_min < beta_max"):
        VPSDE(1.0, 0.5)
    with pytest.raises(ValueError, match="need 0 < sigma_min < sigma_max"):
        VESDE(5.0, 1.0)
    with pytest.raises(ValueError, match="x_T must be a float tensor"):
        reverse_sde_sample(lambda x, t: x, sde, torch.zeros(4), 10)
    with pytest.raises(ValueError, match="t_sampling must be 'uniform', 'log-uniform' or"):
        denoising_score_loss(lambda x, t: x, sde, x, t_sampling="cubic")
    field = probability_flow_drift(lambda x, t: x, sde)
    with pytest.raises(ValueError, match=r"t must lie in"):
        field(x, torch.full((4,), -0.1))
    sched = ScoreSdeVeScheduler()
    sched.timesteps = None
    with pytest.raises(ValueError, match="call set_timesteps"):
        sched.step_pred(x, 0.5, x)
    sched.set_timesteps(10)
    sched.set_sigmas(10)
    with pytest.raises(ValueError, match=r"model_output must have the shape of sample \(4, 2\)"):
        sched.step_pred(torch.zeros(4, 3), 0.5, x)
    with pytest.raises(ValueError, match="timestep must be a continuous time in"):
        sched.step_pred(x, 1.5, x)
    with pytest.raises(ValueError, match="num_inference_steps must be a positive int"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 9\]"):
        sched.add_noise(x, x, torch.tensor([0, 1, 2, 10]))
    assert math.isfinite(float(sched.sigmas[0]))


def test_more_bad_input():
    sched = ScoreSdeVeScheduler()
    sched.set_timesteps(10)
    sched.set_sigmas(10)
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"model_output must have the shape of sample \(4, 2\)"):
        sched.step_correct(torch.zeros(4, 3), x)
    with pytest.raises(TypeError, match="sample must be a float tensor"):
        sched.step_correct(x, torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"timesteps must be an int tensor \[4\]"):
        sched.add_noise(x, x, torch.tensor([0.5, 0.1, 0.2, 0.3]))
    with pytest.raises(ValueError, match=r"noise must have the shape of original_samples"):
        sched.add_noise(x, torch.zeros(4, 3), torch.tensor([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="snr must be positive"):
        ScoreSdeVeScheduler(snr=0.0)
    with pytest.raises(ValueError, match=r"sampling_eps must be in \(0, 1\)"):
        ScoreSdeVeScheduler(sampling_eps=1.0)
    with pytest.raises(ValueError, match="corrector_steps must be a non-negative int"):
        reverse_sde_sample(lambda a, t: a, VPSDE(), x, 3, corrector_steps=-1)
    with pytest.raises(ValueError, match=r"score_fn output must have the shape of x \(4, 2\)"):
        reverse_sde_sample(lambda a, t: a[:, :1], VPSDE(), x, 3)
