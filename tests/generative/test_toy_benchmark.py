"""The 2-D set-up the diffusion experiments share: trainer, settings and subset SW₂ score."""

from __future__ import annotations

import math

import pytest
import torch

from mlatlas.datasets import toy2d
from mlatlas.generative import metrics
from mlatlas.generative.noise_schedule import NoiseSchedule, epsilon_loss
from mlatlas.generative.toy_benchmark import (
    ToyDenoiserSettings,
    ToyDensityScore,
    toy_model,
    train_toy_denoiser,
)
from mlatlas.generative.training import train_denoiser

SETTINGS = ToyDenoiserSettings(density="8gaussians", steps=7, batch_size=33, lr=5e-3,
                               hidden=12, depth=2, ema_decay=0.9, seed=3)


def test_trainer_is_train_denoiser_with_the_settings_spelled_out():
    schedule = NoiseSchedule(50)
    res = train_toy_denoiser(SETTINGS, schedule)
    torch.manual_seed(3)
    model = toy_model(12, 2)
    ref = train_denoiser(model, lambda m, x0, g: epsilon_loss(m, x0, schedule, g),
                         lambda n, g: toy2d.sample("8gaussians", n, g), 7, 5e-3,
                         batch_size=33, generator=torch.Generator().manual_seed(3), warmup=0,
                         schedule="cosine", ema_decay=0.9)
    assert res.losses == ref.losses and len(res.losses) == 7
    for a, b in zip(res.ema.state_dict().values(), ref.ema.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_checkpoint_of_another_beta_schedule_is_refused(tmp_path):
    ckpt = tmp_path / "toy.safetensors"
    first = train_toy_denoiser(SETTINGS, NoiseSchedule(50), checkpoint=ckpt)
    again = train_toy_denoiser(SETTINGS, NoiseSchedule(50), checkpoint=ckpt)  # resumes: done
    assert again.resumed_from == 7 and again.losses == first.losses
    with pytest.raises(ValueError, match="written for tag"):
        train_toy_denoiser(SETTINGS, NoiseSchedule(50, beta_schedule="squaredcos_cap_v2"),
                           checkpoint=ckpt)


def test_conditional_toy_model_has_a_null_label():
    model = toy_model(10, 1, num_classes=3)
    assert model.class_embed.num_embeddings == 4
    assert model(torch.zeros(5, 2), torch.rand(5), torch.tensor([0, 1, 2, 3, 3])).shape == (5, 2)


def test_score_is_the_mean_over_subsets_with_its_standard_error():
    score = ToyDensityScore("8gaussians", n_sub=50, n_reference=700, repeats=3, seed=1)
    x = toy2d.sample("8gaussians", 157, torch.Generator().manual_seed(5))  # 3 subsets + 7 left
    ref = toy2d.sample("8gaussians", 700, torch.Generator().manual_seed(10_001))
    torch.testing.assert_close(score.reference, ref, atol=0, rtol=0)
    sw = [metrics.sliced_wasserstein(x[i * 50:(i + 1) * 50], ref, 256,
                                     generator=torch.Generator().manual_seed(1))
          for i in range(3)]
    got = score(x)
    mean = sum(sw) / 3
    se = math.sqrt(sum((v - mean) ** 2 for v in sw) / 2) / math.sqrt(3)
    assert got.mean == pytest.approx(mean, rel=1e-9) and got.se == pytest.approx(se, rel=1e-9)
    assert 0 < score.floor and score.floor_se == pytest.approx(score.floor_std / math.sqrt(3))
    assert math.isnan(score(x[:60]).se)  # one subset: no spread
    with pytest.raises(ValueError, match="x must hold at least n_sub=50 points, got 49"):
        score(x[:49])
