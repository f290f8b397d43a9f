"""DDIM: step-by-step parity with diffusers.DDIMScheduler / DDIMInverseScheduler, η=1 ↔ DDPM,
inversion round trips with the exact ε of a Gaussian mixture."""

from __future__ import annotations

import itertools

import pytest
import torch

from mlatlas.datasets import toy2d
from mlatlas.generative.ddim import (
    DDIMInverseScheduler,
    DDIMScheduler,
    ddim_invert,
    ddim_sample,
)
from mlatlas.generative.ddpm import DDPMScheduler, denoise, mixture_epsilon
from mlatlas.runtime import torch_threads

ATOL = 1e-6  # fp32; in practice the two implementations agree bit for bit


def _fake_eps(x: torch.Tensor, t) -> torch.Tensor:
    return torch.sin(3.0 * x + 0.013 * float(t)) * 0.9


def _parity(ours, ref, n, shape=(3, 5), **step_kw):
    ours.set_timesteps(n)
    ref.set_timesteps(n)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, atol=0, rtol=0)
    x = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 1.3
    xr = x.clone()
    ga, gb = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for t in ref.timesteps:
        eps = _fake_eps(x, t)
        kw = dict(step_kw)
        if kw.get("eta", 0) > 0:
            a = ours.step(eps, t, x, generator=ga, **kw)
            b = ref.step(eps.clone(), t, xr, generator=gb, **kw)
        else:
            a, b = ours.step(eps, t, x, **kw), ref.step(eps.clone(), t, xr, **kw)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=ATOL, rtol=0)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample,
                                   atol=ATOL, rtol=0)
        x, xr = a.prev_sample, b.prev_sample


@pytest.mark.parametrize("spacing,eta,clip", list(itertools.product(
    ["leading", "trailing", "linspace"], [0.0, 0.5, 1.0], [True, False])))
def test_step_parity(reference, spacing, eta, clip):
    diffusers = reference("diffusers")
    kw = dict(timestep_spacing=spacing, clip_sample=clip,
              steps_offset=1 if spacing == "leading" else 0)
    # 37 does not divide 1000: exercises diffusers' t − ⌊T/n⌋ rule off the grid too
    _parity(DDIMScheduler(1000, **kw), diffusers.DDIMScheduler(1000, **kw), 37, eta=eta)


@pytest.mark.parametrize("schedule,prediction,set_one", [
    ("squaredcos_cap_v2", "epsilon", False), ("linear", "v_prediction", True),
    ("scaled_linear", "sample", True)])
def test_step_parity_schedules_and_predictions(reference, schedule, prediction, set_one):
    diffusers = reference("diffusers")
    kw = dict(beta_schedule=schedule, prediction_type=prediction, set_alpha_to_one=set_one,
              timestep_spacing="trailing", clip_sample=True)
    _parity(DDIMScheduler(1000, **kw), diffusers.DDIMScheduler(1000, **kw), 50, (2, 1, 6, 6),
            eta=0.5, use_clipped_model_output=True)


def test_variance_noise_and_gradients_match(reference):
    diffusers = reference("diffusers")
    outs = []
    for cls in (DDIMScheduler, diffusers.DDIMScheduler):
        s = cls(1000, clip_sample=False, timestep_spacing="trailing")
        s.set_timesteps(20)
        x = torch.randn(3, 7, generator=torch.Generator().manual_seed(0)).requires_grad_(True)
        e = torch.randn(3, 7, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
        z = torch.randn(3, 7, generator=torch.Generator().manual_seed(2))
        out = s.step(e, s.timesteps[4], x, eta=0.7, variance_noise=z)
        (out.prev_sample.square().sum() + out.pred_original_sample.sum()).backward()
        outs.append((out.prev_sample.detach(), x.grad, e.grad))
    for a, b in zip(*outs, strict=True):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0)


@pytest.mark.parametrize("spacing", ["leading", "trailing"])
def test_inverse_parity(reference, spacing):
    diffusers = reference("diffusers")
    kw = dict(timestep_spacing=spacing, clip_sample=False,
              steps_offset=1 if spacing == "leading" else 0)
    ours, ref = DDIMInverseScheduler(1000, **kw), diffusers.DDIMInverseScheduler(1000, **kw)
    ours.set_timesteps(40)
    ref.set_timesteps(40)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, atol=0, rtol=0)
    x = torch.randn(3, 5)
    xr = x.clone()
    for t in ref.timesteps:
        eps = _fake_eps(x, t)
        a, b = ours.step(eps, t, x), ref.step(eps.clone(), t, xr)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=ATOL, rtol=0)
        x, xr = a.prev_sample, b.prev_sample


def test_eta_one_on_the_full_chain_is_ddpm():
    # σ_t(η=1)² = β̃_t: with every timestep, DDIM(η=1) is DDPM's ancestral step (fixed_small)
    ddim = DDIMScheduler(200, beta_start=1e-3, beta_end=0.1, clip_sample=True)
    ddpm = DDPMScheduler(200, beta_start=1e-3, beta_end=0.1, clip_sample=True)
    ddim.set_timesteps(200)
    x = torch.randn(4, 3, generator=torch.Generator().manual_seed(4))
    ga, gb = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    for t in ddpm.timesteps:  # step by step from the same x_t with the same noise
        eps = _fake_eps(x, t)
        # with clipping, the identity needs ε̂ re-derived from the clipped x̂_0 (DDPM's μ̃ uses
        # x_t itself): use_clipped_model_output=True
        a = ddim.step(eps, t, x, eta=1.0, generator=ga, use_clipped_model_output=True).prev_sample
        b = ddpm.step(eps, t, x, generator=gb).prev_sample
        # not bit-equal: the two formulas (eq. 12 vs eq. 7) round differently in fp32
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-6)
        x = b


def test_follow_schedule():
    s = DDIMScheduler(1000, timestep_spacing="linspace", follow_schedule=True)
    s.set_timesteps(10)
    ts = s.timesteps.tolist()
    assert [s.previous_timestep(t) for t in ts] == ts[1:] + [-1]
    d = DDIMScheduler(1000, timestep_spacing="linspace")
    d.set_timesteps(10)
    assert d.previous_timestep(ts[0]) == ts[0] - 100  # diffusers' rule


def _exact_fn(sched):
    means = toy2d.gaussian_centers()
    return lambda x, t: mixture_epsilon(x, sched.alphas_cumprod[int(t)], means, 0.25)


def test_ddim50_with_exact_eps_recovers_the_mixture():
    s = DDIMScheduler(1000, clip_sample=False, timestep_spacing="trailing")
    s.set_timesteps(50)
    with torch_threads(1):  # tiny steps: thread synchronisation would dominate
        x = ddim_sample(_exact_fn(s), s, torch.randn(2000, 2, generator=torch.Generator()
                                                     .manual_seed(0)))
    k = toy2d.classify("8gaussians", x)
    counts = torch.bincount(k, minlength=8).float()
    assert float(counts.min()) > 180 and float(counts.max()) < 320
    assert float((x - toy2d.gaussian_centers()[k]).std(0).mean()) == pytest.approx(0.25,
                                                                                    abs=0.015)


def test_inversion_round_trip():
    x0 = toy2d.sample("8gaussians", 500, torch.Generator().manual_seed(1))
    errors = []
    for n in (20, 100):
        kw = dict(clip_sample=False, timestep_spacing="trailing")
        inv, fwd = DDIMInverseScheduler(1000, **kw), DDIMScheduler(1000, **kw)
        inv.set_timesteps(n)
        fwd.set_timesteps(n)
        with torch_threads(1):
            z = ddim_invert(_exact_fn(fwd), inv, x0)
            back = ddim_sample(_exact_fn(fwd), fwd, z)
        errors.append(float((back - x0).square().mean().sqrt()))
    # the latents of the finer inversion look like N(0, I)
    assert abs(float(z.mean())) < 0.1 and float(z.std()) == pytest.approx(1.0, abs=0.1)
    assert errors[1] < 0.02 * float(x0.std()) and errors[1] < errors[0] / 2


def test_denoise_is_the_step_loop():
    s = DDIMScheduler(100, clip_sample=False)
    s.set_timesteps(10)
    z = torch.randn(3, 2)
    x = z
    for t in s.timesteps:
        x = s.step(_fake_eps(x, t), t, x).prev_sample
    torch.testing.assert_close(denoise(_fake_eps, s, z), x, atol=0, rtol=0)


def test_bad_input():
    s = DDIMScheduler(1000)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="call set_timesteps"):
        s.step(x, 999, x)
    s.set_timesteps(10)
    with pytest.raises(ValueError, match="eta must be a number >= 0"):
        s.step(x, 900, x, eta=-0.1)
    with pytest.raises(ValueError, match="timestep 901 is not in the schedule"):
        s.step(x, 901, x)
    with pytest.raises(ValueError, match=r"timestep must lie in \[0, 1000\), got -1"):
        s.step(x, -1, x)
    with pytest.raises(ValueError, match=r"model_output must have the shape of sample"):
        s.step(torch.zeros(3, 3), 900, x)
    with pytest.raises(ValueError, match="either generator or variance_noise"):
        s.step(x, 900, x, eta=0.5, generator=torch.Generator(), variance_noise=x)
    with pytest.raises(ValueError, match="num_inference_steps=2000 cannot exceed"):
        s.set_timesteps(2000)
    with pytest.raises(ValueError, match="timestep_spacing must be one of"):
        DDIMInverseScheduler(timestep_spacing="linspace")
    with pytest.raises(ValueError, match="eta must be >= 0"):
        ddim_sample(_fake_eps, s, x, eta=-1.0)


@pytest.mark.parametrize("spacing,prediction", [("leading", "v_prediction"),
                                                ("trailing", "sample")])
def test_inverse_parity_clipped_and_final_alpha(reference, spacing, prediction):
    # clip_sample=True, set_alpha_to_one=False (the first inversion step starts from ᾱ_0) and
    # the non-ε parametrisations, on a [2, 3, 5, 3] batch and a step count that divides nothing
    diffusers = reference("diffusers")
    kw = dict(timestep_spacing=spacing, clip_sample=True, set_alpha_to_one=False,
              prediction_type=prediction, steps_offset=1 if spacing == "leading" else 0)
    ours, ref = DDIMInverseScheduler(1000, **kw), diffusers.DDIMInverseScheduler(1000, **kw)
    ours.set_timesteps(27)
    ref.set_timesteps(27)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, atol=0, rtol=0)
    x = torch.randn(2, 3, 5, 3, generator=torch.Generator().manual_seed(3)) * 1.2
    xr = x.clone()
    for t in ref.timesteps:
        out = _fake_eps(x, t)
        a, b = ours.step(out, t, x), ref.step(out.clone(), t, xr)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=ATOL, rtol=1e-6)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample,
                                   atol=ATOL, rtol=1e-6)
        x, xr = a.prev_sample, b.prev_sample


def test_more_bad_input():
    s = DDIMScheduler(1000)
    s.set_timesteps(10)
    x = torch.zeros(2, 3)
    # σ_t(η)² > 1 − ᾱ_prev: diffusers would return NaN here, we refuse
    with pytest.raises(ValueError, match="eta=5.0 is too large at timestep 900"):
        s.step(x, 900, x, eta=5.0)
    with pytest.raises(ValueError, match=r"variance_noise must have the shape of sample \(2, 3\)"):
        s.step(x, 900, x, eta=0.5, variance_noise=torch.zeros(2, 4))
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        DDIMScheduler(prediction_type="score")
    inv = DDIMInverseScheduler(1000)
    with pytest.raises(ValueError, match="call set_timesteps"):
        inv.step(x, 99, x)
    inv.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep 99 is not in the schedule"):
        inv.step(x, 99, x)
    with pytest.raises(ValueError, match=r"model_output must have the shape of sample"):
        inv.step(torch.zeros(2, 4), 100, x)
