"""Our schedulers as drop-ins for diffusers': config, from_config, scheduler_config.json,
output objects, and diffusers pipelines (DDPM, DDIM, score-SDE VE) plus a flow-matching loop
giving the same images with our scheduler as with diffusers'."""

from __future__ import annotations

import json

import pytest
import torch

from mlatlas.generative.ddim import DDIMInverseScheduler, DDIMScheduler
from mlatlas.generative.ddpm import DDPMScheduler
from mlatlas.generative.flow_match_scheduler import FlowMatchEulerDiscreteScheduler
from mlatlas.generative.noise_schedule import SchedulerOutput
from mlatlas.generative.scheduler_config import FrozenConfig
from mlatlas.generative.sde_ve_scheduler import ScoreSdeVeScheduler
from mlatlas.runtime import torch_threads

OURS = [DDPMScheduler, DDIMScheduler, DDIMInverseScheduler, FlowMatchEulerDiscreteScheduler,
        ScoreSdeVeScheduler]
IMAGE_ATOL = 1e-6  # pixels in [0, 1], fp32: the same ops in the same order


def _tiny_unet(diffusers, seed=0):
    """A random UNet2DModel for 3×8×8 images (two levels, 8/16 channels)."""
    torch.manual_seed(seed)
    return diffusers.UNet2DModel(
        sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=(8, 16), norm_num_groups=4,
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D")).eval()


def _images(pipe, seed=0, **kwargs):
    with torch_threads(1):
        out = pipe(batch_size=2, generator=torch.Generator().manual_seed(seed),
                   output_type="np", **kwargs)
    return torch.from_numpy(out.images)


@pytest.mark.parametrize("cls", OURS, ids=lambda c: c.__name__)
def test_interface_and_config_roundtrip(reference, tmp_path, cls):
    diffusers = reference("diffusers")
    ref_cls = getattr(diffusers, cls.__name__)
    ours = cls()
    assert ours.order == ref_cls.order == 1
    assert isinstance(ours.config, FrozenConfig)
    for key, value in ref_cls().config.items():  # every diffusers option, same default
        if not key.startswith("_"):
            assert ours.config[key] == value, key
            assert getattr(ours.config, key) == value, key
    # diffusers config → ours → diffusers, and scheduler_config.json both ways
    ref = ref_cls(num_train_timesteps=500)
    mine = cls.from_config(ref.config)
    assert mine.config.num_train_timesteps == 500
    back = ref_cls.from_config(mine.config)
    assert back.config.num_train_timesteps == 500
    mine.save_pretrained(tmp_path / "ours")
    saved = json.loads((tmp_path / "ours" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == cls.__name__ and saved["num_train_timesteps"] == 500
    assert ref_cls.from_pretrained(tmp_path / "ours").config.num_train_timesteps == 500
    ref.save_pretrained(tmp_path / "ref")
    assert cls.from_pretrained(tmp_path / "ref").config.num_train_timesteps == 500
    assert cls.from_pretrained(tmp_path / "ref", num_train_timesteps=300).config[
        "num_train_timesteps"] == 300


def test_from_config_ignores_other_schedulers_keys_and_uses_own_defaults(reference):
    diffusers = reference("diffusers")
    ddpm = diffusers.DDPMScheduler(beta_schedule="squaredcos_cap_v2", variance_type="fixed_large")
    ours, unused = DDIMScheduler.from_config(ddpm.config, return_unused_kwargs=True)
    ref = diffusers.DDIMScheduler.from_config(ddpm.config)
    assert ours.config.beta_schedule == "squaredcos_cap_v2"
    assert unused == {"variance_type": "fixed_large"}
    assert ours.config.variance_type == ref.config.variance_type == "fixed_large"  # kept
    torch.testing.assert_close(ours.alphas_cumprod, ref.alphas_cumprod, atol=0, rtol=0)
    # a key the class never saw set falls back to this class's default, as in diffusers
    assert ours.config.clip_sample is ref.config.clip_sample is True


def test_config_is_frozen_and_names_missing_keys():
    cfg = DDPMScheduler().config
    for mutate in (lambda: cfg.__setitem__("beta_end", 1.0), lambda: setattr(cfg, "x", 1),
                   lambda: cfg.update(a=1), lambda: cfg.pop("beta_end")):
        with pytest.raises(TypeError, match="config is frozen"):
            mutate()
    with pytest.raises(AttributeError, match="no key 'betaend'"):
        cfg.betaend  # noqa: B018
    with pytest.raises(TypeError, match="config must be a mapping"):
        DDPMScheduler.from_config("google/ddpm-cat-256")
    with pytest.raises(FileNotFoundError, match="scheduler_config.json"):
        DDPMScheduler.from_pretrained("/nonexistent/folder")


def test_outputs_unpack_like_diffusers(reference):
    diffusers = reference("diffusers")
    x = torch.randn(2, 3, 5, 7, generator=torch.Generator().manual_seed(0))
    pairs = [(DDPMScheduler(100), diffusers.DDPMScheduler(100), {}),
             (DDIMScheduler(100), diffusers.DDIMScheduler(100), {"eta": 0.0})]
    for ours, ref, kw in pairs:
        ours.set_timesteps(10)
        ref.set_timesteps(10)
        t = ref.timesteps[0]
        a = ours.step(x * 0.5, t, x, generator=torch.Generator().manual_seed(1),
                      return_dict=False, **kw)
        b = ref.step(x * 0.5, t, x, generator=torch.Generator().manual_seed(1),
                     return_dict=False, **kw)
        assert type(a) is tuple and len(a) == len(b) == 2
        for u, v in zip(a, b, strict=True):
            torch.testing.assert_close(u, v, atol=1e-6, rtol=0)
        out = ours.step(x * 0.5, t, x, generator=torch.Generator().manual_seed(1), **kw)
        prev, x0 = out  # unpacks like a tuple
        assert out[0] is out.prev_sample is prev and out["pred_original_sample"] is x0
    fm, fr = FlowMatchEulerDiscreteScheduler(), diffusers.FlowMatchEulerDiscreteScheduler()
    fm.set_timesteps(4)
    fr.set_timesteps(4)
    a = fm.step(x, fm.timesteps[0], x, return_dict=False)
    b = fr.step(x, fr.timesteps[0], x, return_dict=False)
    assert len(a) == len(b) == 1
    torch.testing.assert_close(a[0], b[0], atol=0, rtol=0)
    out = fm.step(x, fm.timesteps[1], x)
    assert isinstance(out, SchedulerOutput) and out.pred_original_sample is None
    assert len(out) == 1
    sm, sr = ScoreSdeVeScheduler(sigma_max=5.0), diffusers.ScoreSdeVeScheduler(sigma_max=5.0)
    for s in (sm, sr):
        s.set_timesteps(5)
        s.set_sigmas(5)
    a = sm.step_correct(x, x, generator=torch.Generator().manual_seed(2), return_dict=False)
    b = sr.step_correct(x, x, generator=torch.Generator().manual_seed(2), return_dict=False)
    assert len(a) == len(b) == 1
    torch.testing.assert_close(a[0], b[0], atol=1e-6, rtol=1e-6)
    a = sm.step_pred(x, sm.timesteps[1], x, generator=torch.Generator().manual_seed(3),
                     return_dict=False)
    b = sr.step_pred(x, sr.timesteps[1], x, generator=torch.Generator().manual_seed(3),
                     return_dict=False)
    assert type(a) is tuple and len(a) == len(b) == 2
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("kw", [
    {},
    {"beta_schedule": "squaredcos_cap_v2", "variance_type": "fixed_large", "clip_sample": False},
    {"thresholding": True, "sample_max_value": 1.5, "timestep_spacing": "trailing"},
], ids=["default", "cosine-large", "thresholding"])
def test_ddpm_pipeline_same_images(reference, kw):
    diffusers = reference("diffusers")
    pipe = diffusers.DDPMPipeline(unet=_tiny_unet(diffusers),
                                  scheduler=diffusers.DDPMScheduler(num_train_timesteps=60, **kw))
    pipe.set_progress_bar_config(disable=True)
    want = _images(pipe, num_inference_steps=12)
    pipe.scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    assert type(pipe.scheduler) is DDPMScheduler
    got = _images(pipe, num_inference_steps=12)
    assert want.shape == (2, 8, 8, 3)
    torch.testing.assert_close(got, want, atol=IMAGE_ATOL, rtol=0)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_pipeline_same_images(reference, eta):
    diffusers = reference("diffusers")
    sched = diffusers.DDPMScheduler(num_train_timesteps=60, beta_schedule="scaled_linear",
                                    beta_start=0.001, beta_end=0.03)
    pipe = diffusers.DDIMPipeline(unet=_tiny_unet(diffusers, seed=1), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    want = _images(pipe, num_inference_steps=7, eta=eta)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    got = _images(pipe, num_inference_steps=7, eta=eta)
    torch.testing.assert_close(got, want, atol=IMAGE_ATOL, rtol=0)
    with_clip = _images(pipe, num_inference_steps=7, eta=eta, use_clipped_model_output=True)
    pipe.scheduler = diffusers.DDIMScheduler.from_config(pipe.scheduler.config)
    ref_clip = _images(pipe, num_inference_steps=7, eta=eta, use_clipped_model_output=True)
    torch.testing.assert_close(with_clip, ref_clip, atol=IMAGE_ATOL, rtol=0)


def test_score_sde_ve_pipeline_same_images(reference):
    diffusers = reference("diffusers")
    sched = diffusers.ScoreSdeVeScheduler(sigma_max=3.0, sigma_min=0.02, snr=0.1)
    pipe = diffusers.ScoreSdeVePipeline(unet=_tiny_unet(diffusers, seed=2), scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    want = _images(pipe, num_inference_steps=5)
    pipe.scheduler = ScoreSdeVeScheduler.from_config(pipe.scheduler.config)
    got = _images(pipe, num_inference_steps=5)
    assert 0 < float(want.std())
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)  # σ² differences → 1e-5


@pytest.mark.parametrize("kw", [
    {"shift": 3.0},
    {"use_dynamic_shifting": True},
    {"use_dynamic_shifting": True, "time_shift_type": "linear", "shift_terminal": 0.1},
    {"use_karras_sigmas": True, "shift": 2.0},
    {"stochastic_sampling": True},
], ids=["shift", "dynamic", "dynamic-linear-terminal", "karras", "stochastic"])
def test_flow_match_loop_same_images(reference, kw):
    """An SD3/Flux-style loop: μ from the image size, scaled model input, step(...).prev_sample."""
    diffusers = reference("diffusers")
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    unet = _tiny_unet(diffusers, seed=3)

    def loop(scheduler):
        cfg = scheduler.config
        mu = calculate_shift(8 * 8, cfg.base_image_seq_len, cfg.max_image_seq_len,
                             cfg.base_shift, cfg.max_shift)
        scheduler.set_timesteps(6, mu=mu if cfg.use_dynamic_shifting else None)
        gen = torch.Generator().manual_seed(4)
        x = torch.randn(2, 3, 8, 8, generator=gen)
        with torch.no_grad(), torch_threads(1):
            for t in scheduler.timesteps:
                v = unet(scheduler.scale_model_input(x, t) if hasattr(scheduler,
                         "scale_model_input") else x, t.expand(2)).sample
                x = scheduler.step(v, t, x, generator=gen).prev_sample
        return x

    ref = diffusers.FlowMatchEulerDiscreteScheduler(num_train_timesteps=100, **kw)
    want = loop(ref)
    got = loop(FlowMatchEulerDiscreteScheduler.from_config(ref.config))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
