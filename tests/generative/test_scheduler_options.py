"""Scheduler options real checkpoints use, step by step against diffusers: dynamic
thresholding, zero terminal SNR, trained/sigmoid/laplace betas, learned(-range) variance,
custom timesteps, flow-matching dynamic shifting and Karras/exponential sigmas; refusals by name."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlatlas.generative.ddim import DDIMInverseScheduler, DDIMScheduler
from mlatlas.generative.ddpm import DDPMScheduler
from mlatlas.generative.flow_match_scheduler import FlowMatchEulerDiscreteScheduler
from mlatlas.generative.noise_schedule import dynamic_threshold

ATOL = 1e-6  # fp32, the same ops; rescaled/zero-SNR chains divide by small ᾱ: 1e-5 there
SHAPE = (3, 2, 5, 7)  # [B, C, H, W], not powers of two
T = 120
TRAINED = (np.linspace(1e-3, 0.05, T) ** 1.3).tolist()


def _model(x: torch.Tensor, t, channels_out: int | None = None) -> torch.Tensor:
    """A deterministic stand-in network; large outputs so that x̂_0 leaves [−1, 1]."""
    out = 2.5 * torch.sin(2.0 * x + 0.017 * float(t))
    if channels_out is None:
        return out
    var = torch.tanh(x + 0.01 * float(t))  # v ∈ (−1, 1) for learned_range
    return torch.cat([out, var if channels_out == 1 else 0.02 * torch.sigmoid(var)], dim=1)


def _chain(ours, ref, set_kw, step_kw=None, atol=ATOL, variance=None, seed=0):
    step_kw = step_kw or {}
    ours.set_timesteps(**set_kw)
    ref.set_timesteps(**set_kw)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, atol=0, rtol=0)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))
    xr = x.clone()
    ga, gb = torch.Generator().manual_seed(seed + 1), torch.Generator().manual_seed(seed + 1)
    for t in ref.timesteps:
        out = _model(x, t, variance)
        a = ours.step(out, t, x, generator=ga, **step_kw)
        b = ref.step(out.clone(), t, xr, generator=gb, **step_kw)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=atol, rtol=atol)
        torch.testing.assert_close(a.pred_original_sample, b.pred_original_sample, atol=atol,
                                   rtol=atol)
        x, xr = a.prev_sample, b.prev_sample
    assert torch.isfinite(x).all()


DDPM_CASES = {
    "thresholding": dict(thresholding=True, sample_max_value=1.7,
                         dynamic_thresholding_ratio=0.9),
    "zero-snr-v": dict(rescale_betas_zero_snr=True, prediction_type="v_prediction",
                       timestep_spacing="trailing"),
    "trained-betas": dict(trained_betas=TRAINED, clip_sample=False),
    "sigmoid": dict(beta_schedule="sigmoid", beta_start=1e-3, beta_end=0.04),
    "laplace": dict(beta_schedule="laplace", prediction_type="sample"),
    "learned-range": dict(variance_type="learned_range"),
    "learned": dict(variance_type="learned", clip_sample=False),
}


@pytest.mark.parametrize("name", list(DDPM_CASES))
def test_ddpm_option_parity(reference, name):
    diffusers = reference("diffusers")
    kw = DDPM_CASES[name]
    ours, ref = DDPMScheduler(T, **kw), diffusers.DDPMScheduler(T, **kw)
    torch.testing.assert_close(ours.betas, ref.betas, atol=0, rtol=0)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=0, rtol=0)
    variance = {"learned_range": 1, "learned": 2}.get(kw.get("variance_type"))
    _chain(ours, ref, {"num_inference_steps": 12}, variance=variance,
           atol=1e-5 if "rescale_betas_zero_snr" in kw else ATOL)


def test_get_velocity_for_training_loops(reference):
    diffusers = reference("diffusers")
    kw = DDPM_CASES["zero-snr-v"]
    ours, ref = DDPMScheduler(T, **kw), diffusers.DDPMScheduler(T, **kw)
    g = torch.Generator().manual_seed(9)
    x0, eps = torch.randn(SHAPE, generator=g), torch.randn(SHAPE, generator=g)
    t = torch.tensor([0, 57, T - 1])
    torch.testing.assert_close(ours.get_velocity(x0, eps, t), ref.get_velocity(x0, eps, t),
                               atol=ATOL, rtol=0)
    torch.testing.assert_close(ours.add_noise(x0, eps, t), ref.add_noise(x0, eps, t),
                               atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match="noise must have the shape of sample"):
        ours.get_velocity(x0, eps[:1], t)
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 120\)"):
        ours.get_velocity(x0, eps, torch.tensor([0, 1, T]))


def test_ddpm_custom_timesteps(reference):
    diffusers = reference("diffusers")
    ts = [117, 90, 64, 63, 31, 7, 2, 0]
    ours, ref = DDPMScheduler(T, thresholding=True), diffusers.DDPMScheduler(T, thresholding=True)
    _chain(ours, ref, {"timesteps": ts})
    assert ours.custom_timesteps and ours.previous_timestep(63) == 31


@pytest.mark.parametrize("name", ["thresholding", "zero-snr-v", "trained-betas"])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_option_parity(reference, name, eta):
    diffusers = reference("diffusers")
    kw = DDPM_CASES[name]
    ours, ref = DDIMScheduler(T, **kw), diffusers.DDIMScheduler(T, **kw)
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=0, rtol=0)
    _chain(ours, ref, {"num_inference_steps": 12}, {"eta": eta},
           atol=1e-5 if "rescale_betas_zero_snr" in kw else ATOL)


def test_ddim_custom_timesteps_follow_the_list(reference):
    """diffusers' DDIM has no custom timesteps; a custom list equal to the "leading" chain
    reproduces diffusers' n-step chain, and an uneven list lands on each next entry."""
    diffusers = reference("diffusers")
    ref = diffusers.DDIMScheduler(T)
    ref.set_timesteps(8)
    ours = DDIMScheduler(T)
    ours.set_timesteps(timesteps=ref.timesteps.tolist())
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(5))
    xr = x.clone()
    for t in ref.timesteps:
        x = ours.step(_model(x, t), t, x).prev_sample
        xr = ref.step(_model(xr, t), t, xr).prev_sample
        torch.testing.assert_close(x, xr, atol=ATOL, rtol=0)
    ours.set_timesteps(timesteps=[100, 37, 5])
    assert [ours.previous_timestep(t) for t in (100, 37, 5)] == [37, 5, -1]


@pytest.mark.parametrize("kw", [dict(trained_betas=TRAINED),
                                dict(rescale_betas_zero_snr=True, timestep_spacing="trailing",
                                     set_alpha_to_one=False)], ids=["trained", "zero-snr"])
def test_ddim_inverse_option_parity(reference, kw):
    diffusers = reference("diffusers")
    ours, ref = DDIMInverseScheduler(T, **kw), diffusers.DDIMInverseScheduler(T, **kw)
    ours.set_timesteps(10)
    ref.set_timesteps(10)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(6)) * 0.3
    for t in ref.timesteps[:-1]:  # the last zero-SNR level has ᾱ = 0 (x̂_0 undefined)
        a = ours.step(_model(x, t) * 0.2, t, x)
        b = ref.step(_model(x, t) * 0.2, t, x)
        torch.testing.assert_close(a.prev_sample, b.prev_sample, atol=1e-5, rtol=1e-5)
        x = a.prev_sample


def test_dynamic_threshold_matches_diffusers_and_shapes(reference):
    diffusers = reference("diffusers")
    ref = diffusers.DDPMScheduler(thresholding=True, sample_max_value=2.0)
    x = torch.randn(4, 3, 6, 5, generator=torch.Generator().manual_seed(7)) * 2
    torch.testing.assert_close(dynamic_threshold(x, 0.995, 2.0), ref._threshold_sample(x),
                               atol=0, rtol=0)
    half = dynamic_threshold(x.half(), 0.995, 2.0)
    assert half.dtype == torch.float16
    with pytest.raises(ValueError, match=r"thresholding needs a sample \[B, C, ...\]"):
        dynamic_threshold(torch.ones(5))


FLOW_CASES = {
    "dynamic-exp": (dict(use_dynamic_shifting=True), dict(num_inference_steps=9, mu=0.8)),
    "dynamic-linear": (dict(use_dynamic_shifting=True, time_shift_type="linear"),
                       dict(num_inference_steps=9, mu=1.3)),
    "karras": (dict(use_karras_sigmas=True, shift=3.0), dict(num_inference_steps=9)),
    "exponential": (dict(use_exponential_sigmas=True), dict(num_inference_steps=9)),
    "terminal": (dict(shift=2.0, shift_terminal=0.05), dict(num_inference_steps=9)),
    "inverted": (dict(invert_sigmas=True), dict(num_inference_steps=9)),
    "karras-dynamic-sigmas": (dict(use_dynamic_shifting=True, use_karras_sigmas=True),
                              dict(sigmas=np.linspace(1.0, 1 / 9, 9).tolist(), mu=0.6)),
    "custom-timesteps": (dict(shift=3.0), dict(timesteps=[950.0, 700.5, 400.0, 120.0, 5.0])),
    "sigmas-and-timesteps": (dict(), dict(sigmas=[1.0, 0.6, 0.3, 0.1],
                                          timesteps=[999.0, 600.0, 300.0, 100.0])),
}


@pytest.mark.parametrize("name", list(FLOW_CASES))
def test_flow_match_option_parity(reference, name):
    diffusers = reference("diffusers")
    init_kw, set_kw = FLOW_CASES[name]
    ours = FlowMatchEulerDiscreteScheduler(**init_kw)
    ref = diffusers.FlowMatchEulerDiscreteScheduler(**init_kw)
    ours.set_timesteps(**set_kw)
    ref.set_timesteps(**set_kw)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, atol=0, rtol=0)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, atol=0, rtol=0)
    x = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    xr = x.clone()
    for t in ref.timesteps:
        x = ours.step(_model(x, t) * 0.3, t, x).prev_sample
        xr = ref.step(_model(xr, t) * 0.3, t, xr).prev_sample
        torch.testing.assert_close(x, xr, atol=ATOL, rtol=0)


def test_set_shift_like_diffusers(reference):
    diffusers = reference("diffusers")
    ours, ref = FlowMatchEulerDiscreteScheduler(), diffusers.FlowMatchEulerDiscreteScheduler()
    for s in (ours, ref):
        s.set_shift(2.5)
        s.set_timesteps(7)
    assert ours.shift == ref.shift == 2.5
    torch.testing.assert_close(ours.sigmas, ref.sigmas, atol=0, rtol=0)


def test_refused_options_name_themselves():
    with pytest.raises(ValueError, match="variance_type='fixed_large_log' is not supported"):
        DDPMScheduler(variance_type="fixed_large_log")
    with pytest.raises(ValueError, match="use_beta_sigmas=True is not supported"):
        FlowMatchEulerDiscreteScheduler(use_beta_sigmas=True)
    with pytest.raises(ValueError, match="use_beta_sigmas=True is not supported"):
        FlowMatchEulerDiscreteScheduler.from_config({"use_beta_sigmas": True})
    with pytest.raises(ValueError, match="use_karras_sigmas and use_exponential_sigmas"):
        FlowMatchEulerDiscreteScheduler(use_karras_sigmas=True, use_exponential_sigmas=True)
    with pytest.raises(ValueError, match="time_shift_type must be"):
        FlowMatchEulerDiscreteScheduler(time_shift_type="cubic")
    fm = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    with pytest.raises(ValueError, match="mu must be passed"):
        fm.set_timesteps(5)
    fm.set_timesteps(5, mu=0.5)
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="per_token_timesteps is not supported"):
        fm.step(x, fm.timesteps[0], x, per_token_timesteps=torch.ones(2, 3))
    with pytest.raises(ValueError, match="sigmas and timesteps must have the same length"):
        fm.set_timesteps(sigmas=[1.0, 0.5], timesteps=[900.0], mu=0.5)


def test_bad_option_input():
    with pytest.raises(ValueError, match=r"trained_betas must hold num_train_timesteps=120"):
        DDPMScheduler(T, trained_betas=[0.01] * 7)
    sched = DDPMScheduler(T, variance_type="learned_range")
    x = torch.zeros(2, 3, 4, 4)
    sched.set_timesteps(5)
    with pytest.raises(ValueError, match=r"needs a model_output with 2×3 channels"):
        sched.step(x, sched.timesteps[0], x)
    for bad, msg in (([5, 9, 2], "strictly descending"), ([130, 5], r"lie in \[0, 120\)"),
                     ([], "non-empty list of ints"), ([5.5, 2.0], "non-empty list of ints")):
        for s in (DDPMScheduler(T), DDIMScheduler(T)):
            with pytest.raises(ValueError, match=msg):
                s.set_timesteps(timesteps=bad)
    with pytest.raises(ValueError, match="pass exactly one of num_inference_steps and timesteps"):
        DDPMScheduler(T).set_timesteps(4, timesteps=[3, 2])
    with pytest.raises(ValueError, match="pass exactly one of num_inference_steps and timesteps"):
        DDIMScheduler(T).set_timesteps()
    with pytest.raises(ValueError, match="beta_schedule must be one of"):
        DDPMScheduler(beta_schedule="quadratic")
    # diffusers' "trailing" spacing yields timestep −1 here (float arange); we refuse
    with pytest.raises(ValueError, match=r"timestep_spacing='trailing', num_inference_steps=13: "
                                         r"got \[-1, 119\]"):
        DDPMScheduler(T, timestep_spacing="trailing").set_timesteps(13)
    with pytest.raises(ValueError, match=r"generator must be one generator or a list of 2"):
        DDPMScheduler(T).step(x[:, :1].repeat(1, 3, 1, 1), 3, x,
                              generator=[torch.Generator()] * 3)
