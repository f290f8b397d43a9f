"""DDPM: step-by-step parity with diffusers.DDPMScheduler, forward process, ε-loss, sampling."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from mlatlas.datasets import toy2d
from mlatlas.generative.ddpm import DDPMScheduler, denoise, mixture_epsilon
from mlatlas.generative.noise_schedule import (
    NoiseSchedule,
    epsilon_loss,
    inference_timesteps,
    make_betas,
)
from mlatlas.runtime import torch_threads

ATOL = 1e-6  # fp32; in practice the two implementations agree bit for bit


def _fake_eps(x: torch.Tensor, t) -> torch.Tensor:
    """A deterministic stand-in for a network: smooth in x, varies with t."""
    return torch.sin(3.0 * x + 0.013 * float(t)) * 0.9


def _run_both(ours, ref, shape, n_inference, seed=0, grad=False):
    if n_inference is not None:
        ours.set_timesteps(n_inference)
        ref.set_timesteps(n_inference)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, atol=0, rtol=0)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1.3
    xr = x.clone()
    ga, gb = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    for t in ref.timesteps:
        eps = _fake_eps(x, t)
        a = ours.step(eps, t, x, generator=ga)
        b = ref.step(eps.clone(), t, xr, generator=gb)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=ATOL, rtol=0)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample,
                                   atol=ATOL, rtol=0)
        x, xr = a.prev_sample, b.prev_sample


@pytest.mark.parametrize("schedule,variance,clip", list(itertools.product(
    ["linear", "squaredcos_cap_v2"], ["fixed_small", "fixed_small_log", "fixed_large"],
    [True, False])))
def test_step_parity_full_chain(reference, schedule, variance, clip):
    diffusers = reference("diffusers")
    kw = dict(beta_schedule=schedule, variance_type=variance, clip_sample=clip)
    # a short full chain (T = 60, every timestep) on a non-power-of-two shape
    ours = DDPMScheduler(60, beta_start=1e-3, beta_end=0.2, **kw)
    ref = diffusers.DDPMScheduler(60, beta_start=1e-3, beta_end=0.2, **kw)
    _run_both(ours, ref, (3, 5), None)


@pytest.mark.parametrize("spacing,n", [("leading", 37), ("trailing", 37), ("linspace", 23),
                                       ("leading", 50)])
def test_step_parity_shortened_chain(reference, spacing, n):
    diffusers = reference("diffusers")
    kw = dict(beta_schedule="squaredcos_cap_v2", timestep_spacing=spacing,
              steps_offset=1 if spacing == "leading" else 0, clip_sample=True)
    _run_both(DDPMScheduler(1000, **kw), diffusers.DDPMScheduler(1000, **kw), (2, 1, 6, 6), n)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_step_parity_prediction_types(reference, prediction_type):
    diffusers = reference("diffusers")
    kw = dict(prediction_type=prediction_type, clip_sample=False)
    _run_both(DDPMScheduler(1000, **kw), diffusers.DDPMScheduler(1000, **kw), (4, 3), 25)


def test_step_gradients_match(reference):
    diffusers = reference("diffusers")
    ours = DDPMScheduler(1000, clip_sample=False)
    ref = diffusers.DDPMScheduler(1000, clip_sample=False)
    grads = []
    for sched in (ours, ref):
        sched.set_timesteps(20)
        x = torch.randn(3, 7, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        e = torch.randn(3, 7, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        out = sched.step(e, sched.timesteps[3], x, generator=torch.Generator().manual_seed(2))
        (out.prev_sample.square().sum() + out.pred_original_sample.sum()).backward()
        grads.append((x.grad, e.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-6, rtol=0)
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-6, rtol=0)


def test_betas_timesteps_and_add_noise_match(reference):
    diffusers = reference("diffusers")
    for schedule in ("linear", "scaled_linear", "squaredcos_cap_v2"):
        ref = diffusers.DDPMScheduler(1000, beta_schedule=schedule)
        torch.testing.assert_close(make_betas(1000, schedule), ref.betas, atol=0, rtol=0)
        torch.testing.assert_close(NoiseSchedule(1000, schedule).alphas_cumprod,
                                   ref.alphas_cumprod, atol=0, rtol=0)
    for spacing, n, off in [("leading", 30, 1), ("trailing", 30, 0), ("linspace", 7, 0),
                            ("trailing", 1000, 0), ("leading", 1, 0)]:
        ref = diffusers.DDPMScheduler(1000, timestep_spacing=spacing, steps_offset=off)
        ref.set_timesteps(n)
        torch.testing.assert_close(inference_timesteps(1000, n, spacing, off), ref.timesteps,
                                   atol=0, rtol=0)
    ours, ref = DDPMScheduler(1000), diffusers.DDPMScheduler(1000)
    x0 = torch.randn(5, 2, 3, 3)
    noise = torch.randn(5, 2, 3, 3)
    t = torch.tensor([0, 1, 499, 998, 999])
    torch.testing.assert_close(ours.add_noise(x0, noise, t), ref.add_noise(x0, noise, t),
                               atol=1e-7, rtol=0)


def test_epsilon_loss_is_the_simple_objective():
    sched = NoiseSchedule(100)
    x0 = torch.randn(9, 2)

    class Net(torch.nn.Module):
        def forward(self, x, t):
            return x * t[:, None]

    loss = epsilon_loss(Net(), x0, sched, torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same draws, by hand
    t = torch.randint(0, 100, (9,), generator=g)
    eps = torch.randn(9, 2, generator=g)
    ab = sched.alphas_cumprod[t][:, None]
    xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
    torch.testing.assert_close(loss, ((xt * (t[:, None] / 100) - eps) ** 2).mean(),
                               atol=1e-6, rtol=0)


def test_mixture_epsilon_is_the_scaled_score():
    means = toy2d.gaussian_centers().double()
    x = torch.randn(11, 2, dtype=torch.float64) * 2
    ab = torch.rand(11, dtype=torch.float64) * 0.98 + 0.01
    var = ab * 0.25**2 + 1 - ab
    # reference: autograd of the exact log-density of the noisy mixture
    xg = x.clone().requires_grad_(True)
    comp = -((xg[:, None] - ab.sqrt()[:, None, None] * means) ** 2).sum(-1) / (2 * var[:, None])
    comp = comp - torch.log(2 * math.pi * var)[:, None]
    (score,) = torch.autograd.grad(torch.logsumexp(comp, 1).sum(), xg)
    torch.testing.assert_close(mixture_epsilon(x, ab, means, 0.25),
                               -(1 - ab).sqrt()[:, None] * score, atol=1e-10, rtol=0)


def test_ancestral_sampling_with_exact_eps_recovers_the_mixture():
    sched = DDPMScheduler(1000, clip_sample=False)
    means = toy2d.gaussian_centers()

    def fn(x, t):
        return mixture_epsilon(x, sched.alphas_cumprod[int(t)], means, 0.25)

    g = torch.Generator().manual_seed(0)
    with torch_threads(1):  # 1000 tiny steps: thread synchronisation would dominate
        x = denoise(fn, sched, torch.randn(1200, 2, generator=g), generator=g)
    k = toy2d.classify("8gaussians", x)
    counts = torch.bincount(k, minlength=8).float()
    assert float(counts.min()) > 100 and float(counts.max()) < 200  # 150 ± 4.5σ
    resid = x - means[k]
    assert float(resid.std(0).mean()) == pytest.approx(0.25, abs=0.02)


def test_bad_input():
    sched = DDPMScheduler(1000)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"timestep must lie in \[0, 1000\), got 1000"):
        sched.step(x, 1000, x)
    with pytest.raises(ValueError, match=r"model_output must have the shape of sample \(2, 3\)"):
        sched.step(torch.zeros(2, 4), 10, x)
    with pytest.raises(TypeError, match="sample must be a floating-point tensor"):
        sched.step(x, 10, torch.zeros(2, 3, dtype=torch.long))
    sched.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 5 is not in the schedule"):
        sched.step(x, 5, x)
    with pytest.raises(ValueError, match="num_inference_steps=1001 cannot exceed"):
        sched.set_timesteps(1001)
    with pytest.raises(ValueError, match="num_inference_steps must be a positive int"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        DDPMScheduler(beta_schedule="quadratic")
    with pytest.raises(ValueError, match="variance_type must be one of"):
        DDPMScheduler(variance_type="learned_log")
    with pytest.raises(TypeError, match="timesteps must be integers"):
        sched.add_noise(x, x, torch.tensor([0.5, 0.1]))
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 1000\)"):
        sched.add_noise(x, x, torch.tensor([0, 1000]))
    with pytest.raises(ValueError, match="noise must have the shape"):
        sched.add_noise(x, torch.zeros(2, 2), torch.tensor([0, 1]))


def test_more_bad_input():
    sched = DDPMScheduler(1000)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"timestep must lie in \[0, 1000\), got -1"):
        sched.step(x, -1, x)
    with pytest.raises(TypeError, match="timestep must be an integer, got 10.5"):
        sched.step(x, 10.5, x)
    with pytest.raises(ValueError, match="timestep must be one integer"):
        sched.step(x, torch.tensor([10, 20]), x)
    # "leading" with n = T puts the last timestep at T − 1; an offset pushes it out
    with pytest.raises(ValueError, match=r"steps_offset=1 pushes timesteps outside \[0, 1000\)"):
        DDPMScheduler(1000, steps_offset=1).set_timesteps(1000)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        DDPMScheduler(prediction_type="score")
    with pytest.raises(ValueError, match="timestep_spacing must be one of"):
        DDPMScheduler(timestep_spacing="karras")
    with pytest.raises(ValueError, match="num_train_timesteps must be a positive int"):
        make_betas(0)
