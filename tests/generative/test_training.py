"""The shared training loop: resuming from its checkpoint reproduces an uninterrupted run."""

from __future__ import annotations

import pytest
import torch

from mlatlas.datasets import toy2d
from mlatlas.generative.networks import MLPDenoiser
from mlatlas.generative.noise_schedule import NoiseSchedule, epsilon_loss
from mlatlas.generative.training import lr_at, train_denoiser
from mlatlas.runtime import torch_threads


def _train(steps, ckpt=None, tag="", crash_at=None):
    torch.manual_seed(0)
    model = MLPDenoiser(hidden=16, depth=2, time_dim=8)
    sched = NoiseSchedule(100)
    calls = []

    def data(n, g):
        calls.append(1)
        if crash_at is not None and len(calls) > crash_at:
            raise KeyboardInterrupt  # the run dies mid-way
        return toy2d.sample("8gaussians", n, g)

    res = train_denoiser(model, lambda m, x, g: epsilon_loss(m, x, sched, g), data, steps,
                         1e-2, batch_size=37, generator=torch.Generator().manual_seed(1),
                         warmup=3, schedule="cosine", ema_decay=0.9, checkpoint=ckpt,
                         checkpoint_every=5, tag=tag)
    return model, res


def test_resume_matches_uninterrupted(tmp_path):
    full_model, full = _train(12)
    ckpt = tmp_path / "run.safetensors"
    with pytest.raises(KeyboardInterrupt):
        _train(12, ckpt, crash_at=7)  # dies in step 8; the checkpoint holds step 5
    model, res = _train(12, ckpt)  # resumed
    assert res.resumed_from == 5 and res.steps == 12 and len(res.losses) == 12
    assert res.losses == full.losses
    for a, b in zip(model.state_dict().values(), full_model.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    for a, b in zip(res.ema.state_dict().values(), full.ema.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    with pytest.raises(ValueError, match="written for tag ''"):
        _train(12, ckpt, tag="other")
    # another architecture under another tag: the tag error comes before any weight loading
    other = MLPDenoiser(hidden=8, depth=2, time_dim=8)
    with pytest.raises(ValueError, match="written for tag ''"):
        train_denoiser(other, lambda m, x, g: x.sum(), lambda n, g: torch.zeros(n, 2), 12, 1e-2,
                       checkpoint=ckpt, tag="other-arch")


def test_lr_schedule_and_threads():
    assert lr_at(0, 100, 1.0, warmup=10) == pytest.approx(0.1)
    assert lr_at(10, 100, 1.0, warmup=10, schedule="cosine") == pytest.approx(1.0)
    assert lr_at(100, 100, 1.0, warmup=10, schedule="cosine") == pytest.approx(0.1)
    assert lr_at(50, 100, 1.0) == 1.0
    old = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == old


def test_bad_input():
    model = MLPDenoiser(hidden=8, depth=1, time_dim=8)
    with pytest.raises(ValueError, match="lr must be > 0"):
        train_denoiser(model, None, None, 3, 0.0)
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\)"):
        train_denoiser(model, None, None, 3, 1e-3, ema_decay=1.0)
    with pytest.raises(ValueError, match="schedule must be 'constant' or 'cosine'"):
        lr_at(0, 10, 1.0, schedule="linear")
