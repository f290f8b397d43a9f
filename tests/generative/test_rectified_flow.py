"""Rectified flow: diffusers FlowMatchEulerDiscreteScheduler parity, exact flows, bad input.

Gaussian data ``N(μ, s² I)`` gives closed-form rectified flows: the 1-RF velocity
``E[x1 − x0 | x_t]`` and, after reflow on its coupling ``x1 = μ + s x0``, a 2-RF whose paths
are exactly straight — so straightness and few-step sampling are checked against exact values.
"""

from __future__ import annotations

import pytest
import torch

from mlatlas.generative.rectified_flow import (
    FlowMatchEulerDiscreteScheduler,
    interpolate,
    rectified_flow_loss,
    reflow_couplings,
    sample_euler,
    sample_heun,
    sample_with_scheduler,
    straightness,
)

# ------------------------------------------------------------------ diffusers parity


def _field(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return torch.sin(1.3 * x) - 0.4 * x + sigma


@pytest.mark.parametrize("shift", [1.0, 3.0])
@pytest.mark.parametrize("n_steps", [1, 7, 50])
@pytest.mark.parametrize("stochastic", [False, True])
def test_flow_match_euler_matches_diffusers_step_by_step(reference, shift, n_steps, stochastic):
    diffusers = reference("diffusers")
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift, stochastic_sampling=stochastic)
    ours = FlowMatchEulerDiscreteScheduler(shift=shift, stochastic_sampling=stochastic)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, atol=0, rtol=0)
    ref.set_timesteps(n_steps)
    ours.set_timesteps(n_steps)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, atol=0, rtol=0)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, atol=0, rtol=0)
    x = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))
    xr, xo = x.clone(), x.clone()
    gr, go = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for i, t in enumerate(ref.timesteps):
        sigma = ref.sigmas[i]
        # fp32: the same float32 operations in the same order; 1e-6 covers reassociation
        a = ref.step(_field(xr, sigma), t, xr, generator=gr).prev_sample
        b = ours.step(_field(xo, sigma), t, xo, generator=go)[0]
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
        xr, xo = a, b
    assert ours.step_index == ref.step_index == n_steps


@pytest.mark.parametrize("shift", [1.0, 2.5])
def test_flow_match_scale_noise_and_custom_sigmas_match_diffusers(reference, shift):
    diffusers = reference("diffusers")
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ours = FlowMatchEulerDiscreteScheduler(shift=shift)
    sigmas = [1.0, 0.83, 0.5, 0.21, 0.05]
    ref.set_timesteps(sigmas=sigmas)
    ours.set_timesteps(sigmas=sigmas)
    torch.testing.assert_close(ours.sigmas, ref.sigmas, atol=0, rtol=0)
    torch.testing.assert_close(ours.timesteps, ref.timesteps, atol=0, rtol=0)
    gen = torch.Generator().manual_seed(0)
    x, z = torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen)
    ts = ref.timesteps[[0, 2, 4]]
    torch.testing.assert_close(ours.scale_noise(x, ts, z), ref.scale_noise(x, ts, z),
                               atol=1e-6, rtol=1e-6)


def test_flow_match_gradients_match_diffusers(reference):
    diffusers = reference("diffusers")
    grads = []
    for sched in (diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0),
                  FlowMatchEulerDiscreteScheduler(shift=3.0)):
        sched.set_timesteps(6)
        x = torch.linspace(-1, 1, 15).reshape(3, 5).requires_grad_(True)
        m = torch.linspace(0.5, -0.5, 15).reshape(3, 5).requires_grad_(True)
        out = x
        for t in sched.timesteps[:3]:
            out = sched.step(m * out, t, out)[0]
        (out**2).sum().backward()
        grads.append((x.grad, m.grad))
    torch.testing.assert_close(grads[1][0], grads[0][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grads[1][1], grads[0][1], atol=1e-6, rtol=1e-6)


def test_sampling_loop_runs_unchanged_on_diffusers_scheduler(reference):
    diffusers = reference("diffusers")
    model = _rf1(torch.tensor([1.5, -0.5]), 0.4)
    x0 = torch.randn(64, 2, generator=torch.Generator().manual_seed(0))
    for steps, shift in ((1, 1.0), (9, 1.0), (9, 3.0)):
        a = sample_with_scheduler(model, diffusers.FlowMatchEulerDiscreteScheduler(shift=shift),
                                  x0, steps)
        b = sample_with_scheduler(model, FlowMatchEulerDiscreteScheduler(shift=shift), x0, steps)
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-6)
    # a one-step diffusers schedule (σ: 1 → 0) is exactly one Euler step of rectified flow
    torch.testing.assert_close(
        sample_with_scheduler(model, FlowMatchEulerDiscreteScheduler(), x0, 1),
        sample_euler(model, x0, 1), atol=1e-6, rtol=1e-6)


# ------------------------------------------------------------------ exact flows


def _rf1(mu: torch.Tensor, s: float):
    """Exact 1-RF velocity for x0 ~ N(0, I), x1 ~ N(μ, s² I) independent:
    v(x, t) = μ + (t s² − (1 − t)) / (t² s² + (1 − t)²) (x − t μ)."""

    def v(x, t):
        t = t[:, None].to(x)
        return mu + (t * s**2 - (1 - t)) / (t**2 * s**2 + (1 - t) ** 2) * (x - t * mu)

    return v


def _rf2(mu: torch.Tensor, s: float):
    """Exact 2-RF velocity after reflow on the 1-RF coupling x1 = μ + s x0:
    v(x, t) = μ + (s − 1)(x − t μ) / (t s + 1 − t)."""

    def v(x, t):
        t = t[:, None].to(x)
        return mu + (s - 1) * (x - t * mu) / (t * s + 1 - t)

    return v


def test_interpolate_and_loss_follow_the_definitions():
    g = torch.Generator().manual_seed(0)
    x0, x1 = torch.randn(5, 3, generator=g), torch.randn(5, 3, generator=g)
    t = torch.tensor([0.0, 0.25, 0.5, 0.9, 1.0])
    xt = interpolate(x0, x1, t)
    torch.testing.assert_close(xt[0], x0[0], atol=0, rtol=0)
    torch.testing.assert_close(xt[-1], x1[-1], atol=1e-7, rtol=0)
    torch.testing.assert_close(xt[1], 0.25 * x1[1] + 0.75 * x0[1], atol=1e-7, rtol=0)
    # a model that returns the exact displacement has zero loss on its own coupling
    target = x1 - x0
    loss = rectified_flow_loss(lambda x, tt: target, x1, x0, generator=g)
    assert float(loss) == 0.0


def test_exact_1rf_transports_the_gaussian_and_its_coupling_is_straightened_by_reflow():
    mu, s = torch.tensor([1.5, -0.5], dtype=torch.float64), 0.4
    v1, v2 = _rf1(mu, s), _rf2(mu, s)
    x0 = torch.randn(4000, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    x1 = sample_heun(v1, x0, 200)
    # the exact 1-RF ODE maps x0 to μ + s x0 (a monotone Gaussian coupling); Heun error O(h²)
    torch.testing.assert_close(x1, mu + s * x0, atol=1e-4, rtol=0)
    _, xr = reflow_couplings(v1, x0, n_steps=200, solver="heun")
    torch.testing.assert_close(xr, x1, atol=0, rtol=0)
    # 2-RF paths are straight: one Euler step is exact and the straightness is 0
    torch.testing.assert_close(sample_euler(v2, x0, 1), mu + s * x0, atol=1e-12, rtol=0)
    s2, _ = straightness(v2, x0, 50)
    assert s2 < 1e-20
    # 1-RF straightness: S = D ∫ (s − 1 − a'(t))² dt with a(t) = sqrt(t² s² + (1 − t)²)
    tq = torch.linspace(0, 1, 20001, dtype=torch.float64)
    da = (tq * s**2 - (1 - tq)) / torch.sqrt(tq**2 * s**2 + (1 - tq) ** 2)
    exact = 2 * torch.trapezoid((s - 1 - da) ** 2, tq)
    s1, curve = straightness(v1, x0, 2000)
    assert curve.shape == (2000,)
    # Euler paths + Riemann sum: O(1/n) error, and the Monte-Carlo error of E‖x0‖² ≈ 2 %
    assert abs(s1 - float(exact)) < 0.05 * float(exact)
    # the bent 1-RF needs many steps; its one-step sample is far off, the 2-RF one exact
    err1 = float((sample_euler(v1, x0, 1) - (mu + s * x0)).norm(dim=1).mean())
    assert err1 > 0.3


def test_euler_and_heun_orders():
    mu, s = torch.tensor([1.0, 2.0], dtype=torch.float64), 0.5
    v1 = _rf1(mu, s)
    x0 = torch.randn(200, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    exact = mu + s * x0
    e_euler = [float((sample_euler(v1, x0, n) - exact).abs().max()) for n in (20, 40)]
    e_heun = [float((sample_heun(v1, x0, n) - exact).abs().max()) for n in (20, 40)]
    assert 1.6 < e_euler[0] / e_euler[1] < 2.4  # first order
    assert 3.2 < e_heun[0] / e_heun[1] < 4.8  # second order


# ------------------------------------------------------------------ bad input


def test_bad_input_raises_clear_errors():
    x = torch.zeros(4, 2)
    with pytest.raises(ValueError, match=r"t must lie in \[0, 1\]"):
        interpolate(x, x, torch.tensor([0.0, 0.5, 1.2, 0.1]))
    with pytest.raises(ValueError, match=r"t must be a tensor of shape \[4\]"):
        interpolate(x, x, torch.zeros(3))
    with pytest.raises(ValueError, match="x0 and x1 must have the same shape"):
        interpolate(x, torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="x0 must have the shape of x1"):
        rectified_flow_loss(lambda a, t: a, x, torch.zeros(3, 2))
    with pytest.raises(ValueError, match=r"model output must have the shape of x1 \(4, 2\)"):
        rectified_flow_loss(lambda a, t: a[:, :1], x)
    with pytest.raises(ValueError, match="n_steps must be a positive int, got 0"):
        sample_euler(lambda a, t: a, x, 0)
    with pytest.raises(ValueError, match="n_steps must be a positive int, got -2"):
        sample_heun(lambda a, t: a, x, -2)
    with pytest.raises(ValueError, match=r"model output must have the shape of x \(4, 2\)"):
        sample_euler(lambda a, t: a[:, :1], x, 3)
    with pytest.raises(TypeError, match="x0 must be a float tensor"):
        sample_euler(lambda a, t: a, torch.zeros(4, 2, dtype=torch.long), 3)
    with pytest.raises(ValueError, match="solver must be 'euler' or 'heun'"):
        reflow_couplings(lambda a, t: a, x, solver="rk45")
    sched = FlowMatchEulerDiscreteScheduler()
    with pytest.raises(ValueError, match="call set_timesteps"):
        sched.step(x, torch.tensor(1000.0), x)
    with pytest.raises(ValueError, match="num_inference_steps must be a positive int, got 0"):
        sched.set_timesteps(0)
    with pytest.raises(ValueError, match="num_inference_steps=1001 exceeds num_train_timesteps"):
        sched.set_timesteps(1001)
    sched.set_timesteps(4)
    with pytest.raises(ValueError, match="not an integer index"):
        sched.step(x, 3, x)
    with pytest.raises(ValueError, match=r"model_output must have the shape of sample"):
        sched.step(torch.zeros(4, 3), sched.timesteps[0], x)
    with pytest.raises(ValueError, match="is not in the schedule"):
        sched.step(x, torch.tensor(123.5), x)
    with pytest.raises(ValueError, match="shift must be positive"):
        FlowMatchEulerDiscreteScheduler(shift=0.0)


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_match_partial_sampling_with_begin_index_matches_diffusers(reference, shift):
    # img2img-style: noise data to the 4th sigma with scale_noise, then step from there
    diffusers = reference("diffusers")
    ref = diffusers.FlowMatchEulerDiscreteScheduler(shift=shift)
    ours = FlowMatchEulerDiscreteScheduler(shift=shift)
    gen = torch.Generator().manual_seed(2)
    data, z = torch.randn(3, 7, generator=gen), torch.randn(3, 7, generator=gen)
    outs = []
    for sched in (ref, ours):
        sched.set_timesteps(11)
        sched.set_begin_index(3)
        x = sched.scale_noise(data, sched.timesteps[3:4].repeat(3), z)
        first = x.clone()
        for t in sched.timesteps[3:]:
            x = sched.step(_field(x, t / 1000), t, x)[0]
        outs.append((first, x, sched.step_index))
    torch.testing.assert_close(outs[1][0], outs[0][0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(outs[1][1], outs[0][1], atol=1e-5, rtol=1e-5)
    assert outs[1][2] == outs[0][2] == 11


def test_flow_match_schedule_bookkeeping_errors():
    x = torch.zeros(2, 3)
    sched = FlowMatchEulerDiscreteScheduler()
    sched.set_timesteps(2)
    for t in sched.timesteps:
        sched.step(x, t, x)
    with pytest.raises(ValueError, match=r"step\(\) called 3 times for 2 timesteps"):
        sched.step(x, sched.timesteps[-1], x)
    sched.set_timesteps(2)  # a new schedule resets the step index
    assert sched.step_index is None
    with pytest.raises(ValueError, match="sigmas must have num_inference_steps=3 entries, got 2"):
        sched.set_timesteps(3, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match=r"noise must have the shape of sample \(2, 3\)"):
        sched.scale_noise(x, sched.timesteps[:2], torch.zeros(2, 4))
    with pytest.raises(ValueError, match="num_train_timesteps must be a positive int"):
        FlowMatchEulerDiscreteScheduler(num_train_timesteps=0)
