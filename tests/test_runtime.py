"""Run-time switches: seeding, thread pinning, device choice, progress, machine info."""

from __future__ import annotations

import pytest
import torch

from mlatlas import runtime


def test_seed_everything_is_reproducible_and_validates():
    runtime.seed_everything(5)
    a = torch.rand(3)
    runtime.seed_everything(5)
    torch.testing.assert_close(torch.rand(3), a, atol=0, rtol=0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="seed must be a non-negative int"):
            runtime.seed_everything(bad)


def test_torch_threads_pins_and_restores():
    before = torch.get_num_threads()
    with runtime.torch_threads(1):
        assert torch.get_num_threads() == 1
        torch.set_num_threads(2)  # whatever happens inside …
    assert torch.get_num_threads() == before  # … the old count comes back
    with runtime.torch_threads(0):
        assert torch.get_num_threads() == before


def test_runner_restores_threads_after_an_experiment(fake_method, tmp_path, monkeypatch):
    import fake_experiment

    from mlatlas import runner

    def pinning_run(cfg, out):
        torch.set_num_threads(1)
        return fake_experiment.run(cfg, out)

    monkeypatch.setattr(runner.load_experiment("fake-method"), "run", pinning_run)
    before = torch.get_num_threads()
    with runtime.torch_threads(2):
        runner.run_method("fake-method", out=tmp_path)
        assert torch.get_num_threads() == 2
    assert torch.get_num_threads() == before


def test_progress_disabled_yields_items(monkeypatch):
    assert list(runtime.progress(range(4), enabled=False)) == [0, 1, 2, 3]
    monkeypatch.setenv("MLATLAS_NO_PROGRESS", "1")
    assert runtime.progress_enabled() is False


def test_machine_info_and_versions():
    info = runtime.machine_info()
    assert info["cpu_count"] >= 1 and info["python"]
    assert "torch" in runtime.versions()


def test_deterministic_algorithms_restores_every_switch():
    before = (torch.are_deterministic_algorithms_enabled(),
              torch.is_deterministic_algorithms_warn_only_enabled())
    with runtime.deterministic_algorithms(True):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.is_deterministic_algorithms_warn_only_enabled()
        with runtime.deterministic_algorithms(False):
            assert not torch.are_deterministic_algorithms_enabled()
        assert torch.are_deterministic_algorithms_enabled()
    assert (torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled()) == before


def test_an_unneeded_switch_costs_nothing():
    import subprocess
    import sys

    code = ("import sys, torch; from mlatlas import runtime\n"
            "with runtime.deterministic_algorithms(False): pass\n"
            "print('torch._inductor.config' in sys.modules, runtime.needs_deterministic_switch())")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    # nothing to change → torch's switch (and its inductor import) is not touched
    assert out.stdout.split()[0] == "False"
    assert out.stdout.split()[1] == str(torch.cuda.is_available())


def test_runner_restores_the_deterministic_switch(fake_method, tmp_path):
    from mlatlas import runner

    torch.use_deterministic_algorithms(False)
    runner.run_method("fake-method", out=tmp_path)
    assert not torch.are_deterministic_algorithms_enabled()
