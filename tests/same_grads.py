"""Shared test check: two differentiable computations give the same gradients.

Test files import it as ``from same_grads import assert_same_grads`` (``tests/`` is on the
pytest path, like ``fake_experiment``).
"""

from __future__ import annotations

import torch
from torch import nn


def assert_same_grads(out: torch.Tensor, ref: torch.Tensor, x: torch.Tensor, module: nn.Module,
                      *, atol: float, rtol: float, seed: int = 2) -> None:
    """Gradients of ``out`` and ``ref`` w.r.t. the input ``x`` and every parameter of ``module``
    agree, for one random cotangent (so no term can cancel as it might under ``.sum()``).

    The failure message names the tensor (``x`` or the parameter name).
    """
    named = {"x": x, **dict(module.named_parameters())}
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed), dtype=out.dtype)
    got = torch.autograd.grad(out, list(named.values()), cot, retain_graph=True)
    want = torch.autograd.grad(ref, list(named.values()), cot, retain_graph=True)
    for name, a, b in zip(named, got, want, strict=True):
        torch.testing.assert_close(a, b, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
