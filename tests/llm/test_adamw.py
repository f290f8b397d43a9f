"""Parity of mlatlas.optim.Adam / AdamW with torch.optim.Adam / AdamW over 1000 steps."""

from __future__ import annotations

import copy

import pytest
import torch

from mlatlas.optim import Adam, AdamW

TOL = {torch.float64: dict(atol=1e-12, rtol=0.0), torch.float32: dict(atol=1e-6, rtol=0.0)}
PAIRS = {"adam": (Adam, torch.optim.Adam), "adamw": (AdamW, torch.optim.AdamW)}


def _model(dtype: torch.dtype) -> torch.nn.Module:
    torch.manual_seed(0)  # sizes that are not powers of two
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(),
                               torch.nn.Linear(13, 3)).to(dtype)


def _train(model: torch.nn.Module, opt: torch.optim.Optimizer, steps: int, start: int = 0,
           sign: float = 1.0) -> None:
    dtype = next(model.parameters()).dtype
    for i in range(start, start + steps):
        g = torch.Generator().manual_seed(1000 + i)  # batch i is the same whatever the split
        x = torch.randn(11, 7, generator=g, dtype=dtype)
        y = torch.randn(11, 3, generator=g, dtype=dtype)
        loss = sign * (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def _flat(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _tanh_regressions(dtype: torch.dtype, steps: int, copies: int):
    """``copies`` independent small models ``y = tanh(W [x; 1])`` (bias folded into ``W``) fit by
    least squares, the gradient in closed form and batched over the copies: the 1000-step parity
    runs time the optimizers, not autograd."""
    g = torch.Generator().manual_seed(0)
    ws = [torch.nn.Parameter(torch.randn(5, 7, generator=g, dtype=dtype)) for _ in range(copies)]
    xs = torch.randn(steps, copies, 11, 7, generator=g, dtype=dtype)
    xs[..., -1] = 1.0
    ys = torch.randn(steps, copies, 11, 5, generator=g, dtype=dtype)

    def set_grads(i: int) -> None:
        with torch.no_grad():
            h = torch.tanh(xs[i] @ torch.stack(ws).transpose(1, 2))  # [copies, 11, 5]
            d = (h - ys[i]) * (1 - h * h) * (2.0 / h[0].numel())  # dL/d(pre-activation)
            for w, gw in zip(ws, (d.transpose(1, 2) @ xs[i]).unbind(0)):  # dL/dW
                w.grad = gw

    return ws, set_grads


# every (dtype, amsgrad, foreach) combination in one optimizer: one parameter group each,
# each group owning its own copy of the problem (torch honours per-group amsgrad/foreach too)
COMBOS = [(False, False), (False, True), (True, False), (True, True)]
DTYPES = [torch.float64, torch.float32]


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_1000_steps_match_torch_float64_float32_amsgrad_both_paths(name):
    ours_cls, ref_cls = PAIRS[name]
    runs = []
    for cls in (ours_cls, ref_cls):
        problems = [_tanh_regressions(dtype, 1000, len(COMBOS)) for dtype in DTYPES]
        groups = [{"params": [w], "amsgrad": ams, "foreach": fe}
                  for ws, _ in problems for w, (ams, fe) in zip(ws, COMBOS)]
        opt = cls(groups, lr=3e-3, betas=(0.85, 0.99), eps=1e-7, weight_decay=0.05)
        for i in range(1000):
            for _, set_grads in problems:
                set_grads(i)
            opt.step()
        runs.append(([w.detach().clone() for ws, _ in problems for w in ws],
                     opt.state_dict()["state"]))
    (ws, state), (ws_ref, state_ref) = runs
    labels = [(dtype, *combo) for dtype in DTYPES for combo in COMBOS]
    for (dtype, ams, fe), w, w_ref in zip(labels, ws, ws_ref, strict=True):
        assert w.dtype == dtype
        torch.testing.assert_close(w, w_ref, **TOL[dtype],
                                   msg=lambda m, c=(dtype, ams, fe): f"{c}: {m}")
    assert state.keys() == state_ref.keys() == set(range(len(labels)))
    for k, (dtype, ams, _) in enumerate(labels):
        assert state[k].keys() == state_ref[k].keys()
        assert ("max_exp_avg_sq" in state[k]) == ams
        for key in state[k]:
            torch.testing.assert_close(state[k][key], state_ref[k][key], **TOL[dtype])


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_maximize_groups_and_params_without_grad_match_torch(name, foreach):
    ours_cls, ref_cls = PAIRS[name]
    finals = []
    for cls in (ours_cls, ref_cls):
        model = _model(torch.float64)
        frozen = torch.nn.Parameter(torch.ones(5, dtype=torch.float64))  # never gets a grad
        groups = [{"params": list(model[0].parameters()) + [frozen], "lr": 1e-2},
                  {"params": model[2].parameters(), "weight_decay": 0.3, "betas": (0.5, 0.9)}]
        opt = cls(groups, lr=1e-3, weight_decay=0.01, maximize=True, foreach=foreach)
        _train(model, opt, 100, sign=-1.0)
        assert frozen not in opt.state and torch.equal(frozen, torch.ones_like(frozen))
        finals.append(_flat(model))
    torch.testing.assert_close(finals[0], finals[1], **TOL[torch.float64])


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_state_dict_round_trip_resumes_exactly(name):
    ours_cls, ref_cls = PAIRS[name]
    kw = dict(lr=1e-2, weight_decay=0.1, amsgrad=True)
    full = _model(torch.float64)
    _train(full, ours_cls(full.parameters(), **kw), 60)
    # split run: 30 steps, state dicts out, fresh objects in, 30 more
    half = _model(torch.float64)
    opt = ours_cls(half.parameters(), **kw)
    _train(half, opt, 30)
    model_sd, opt_sd = half.state_dict(), opt.state_dict()
    resumed = _model(torch.float64)
    resumed.load_state_dict(model_sd)
    opt2 = ours_cls(resumed.parameters(), **kw)
    opt2.load_state_dict(copy.deepcopy(opt_sd))
    _train(resumed, opt2, 30, start=30)
    torch.testing.assert_close(_flat(resumed), _flat(full), atol=0, rtol=0)
    # torch's state dict loads into ours (same keys) and continues on the same trajectory
    ref_model = _model(torch.float64)
    ref_opt = ref_cls(ref_model.parameters(), **kw)
    _train(ref_model, ref_opt, 30)
    ours_model = _model(torch.float64)
    ours_model.load_state_dict(ref_model.state_dict())
    ours_opt = ours_cls(ours_model.parameters(), **kw)
    ours_opt.load_state_dict(copy.deepcopy(ref_opt.state_dict()))  # (it holds live tensors)
    _train(ours_model, ours_opt, 30, start=30)
    _train(ref_model, ref_opt, 30, start=30)
    torch.testing.assert_close(_flat(ours_model), _flat(ref_model), **TOL[torch.float64])


def test_l2_and_decoupled_decay_differ_only_when_decay_is_on():
    finals = {}
    for wd in (0.0, 0.1):
        for cls in (Adam, AdamW):
            model = _model(torch.float64)
            _train(model, cls(model.parameters(), lr=1e-2, weight_decay=wd), 100)
            finals[cls.__name__, wd] = _flat(model)
    torch.testing.assert_close(finals["Adam", 0.0], finals["AdamW", 0.0], atol=0, rtol=0)
    assert (finals["Adam", 0.1] - finals["AdamW", 0.1]).abs().max() > 1e-3


def test_closure_returns_loss():
    p = torch.nn.Parameter(torch.tensor([1.0, -2.0]))
    opt = AdamW([p], lr=0.1)

    def closure():
        opt.zero_grad()
        loss = p.pow(2).sum()
        loss.backward()
        return loss

    assert opt.step(closure).item() == pytest.approx(5.0)
    assert p.abs().max() < 2.0


def test_bad_arguments():
    params = [torch.nn.Parameter(torch.zeros(3))]
    with pytest.raises(ValueError, match="lr must be a non-negative float, got -0.1"):
        Adam(params, lr=-0.1)
    with pytest.raises(ValueError, match=r"betas must be two floats in \[0, 1\), got \(0.9, 1.0\)"):
        AdamW(params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="weight_decay must be a non-negative float, got -1"):
        AdamW(params, weight_decay=-1)
    with pytest.raises(ValueError, match="eps must be a non-negative float"):
        Adam(params, eps=-1e-8)
    emb = torch.nn.Embedding(5, 3, sparse=True)
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(TypeError, match="sparse gradients"):
        Adam(emb.parameters()).step()
