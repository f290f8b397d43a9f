"""Training checkpoints: a resumed run ends exactly where an uninterrupted one does."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch

from mlatlas.training_state import load_checkpoint, save_checkpoint


def _train(model, opt, gen, steps):
    for _ in range(steps):
        x = torch.randn(5, 3, generator=gen)
        noise = torch.randn(()) + np.random.randn() + random.random()  # every global RNG
        loss = ((model(x) - 1.0) ** 2).mean() + 0.0 * noise
        opt.zero_grad()
        loss.backward()
        opt.step()
    return [p.detach().clone() for p in model.parameters()]


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 7), torch.nn.Tanh(), torch.nn.Linear(7, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, amsgrad=True)
    gen = torch.Generator().manual_seed(seed + 1)
    return model, opt, gen


def test_resume_equals_uninterrupted(tmp_path):
    model, opt, gen = _setup()
    full = _train(model, opt, gen, 10)

    model, opt, gen = _setup()
    _train(model, opt, gen, 4)
    path = save_checkpoint(tmp_path / "ck.safetensors", model, opt, step=4,
                           generators={"data": gen}, extra={"note": "half"})
    model2, opt2, gen2 = _setup(seed=123)  # different init: everything must come from disk
    state = load_checkpoint(path, model2, opt2, generators={"data": gen2})
    assert state == {"step": 4, "extra": {"note": "half"}}
    resumed = _train(model2, opt2, gen2, 6)
    for a, b in zip(full, resumed):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_bad_checkpoints(tmp_path):
    model, opt, _ = _setup()
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "missing.safetensors", model)
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(ValueError, match="not an mlatlas checkpoint"):
        load_checkpoint(tmp_path / "plain.safetensors", model)
    path = save_checkpoint(tmp_path / "noopt.safetensors", model)
    with pytest.raises(ValueError, match="holds no optimizer state"):
        load_checkpoint(path, model, opt)
    with pytest.raises(RuntimeError, match="Missing key"):
        load_checkpoint(path, torch.nn.Linear(3, 1))


def test_checkpoint_info_reads_metadata_only(tmp_path):
    from mlatlas.training_state import checkpoint_info

    model, opt, _ = _setup()
    path = save_checkpoint(tmp_path / "ck.safetensors", model, opt, step=9, extra={"tag": "a"})
    assert checkpoint_info(path) == {"step": 9, "extra": {"tag": "a"}}
    with pytest.raises(FileNotFoundError):
        checkpoint_info(tmp_path / "nope.safetensors")
