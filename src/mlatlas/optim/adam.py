"""Adam with L2 regularisation and AdamW with decoupled weight decay.

Adam (Kingma & Ba 2015, arXiv:1412.6980) keeps exponential moving averages of the gradient and
of its square, corrects their bias towards zero and steps by their ratio. "Weight decay" in
Adam was long implemented as an L2 term added to the gradient, so the decay passes through the
adaptive denominator: coordinates with a large gradient variance (large ``v``) are decayed less.
AdamW (Loshchilov & Hutter 2019, "Decoupled Weight Decay Regularization", arXiv:1711.05101)
takes the decay out of the gradient and shrinks the weights directly, the same for every
coordinate. Both follow ``torch.optim.Adam``/``AdamW`` operation for operation, in a for-loop
path and a vectorised ``torch._foreach_*`` path, so trajectories match to rounding.

=========  =============================================================
``θ_t``    parameters after step ``t``
``g_t``    gradient ``∇L(θ_{t-1})`` (negated when ``maximize``)
``m, v``   first and second moment estimates (``exp_avg``, ``exp_avg_sq``)
``β₁, β₂`` their decay rates (``betas``)
``α``      learning rate (``lr``)
``λ``      weight decay (``weight_decay``)
``ε``      denominator offset (``eps``)
=========  =============================================================

The paper writes AdamW's decay as ``θ ← θ - η_t λ θ`` with a schedule multiplier ``η_t``;
like PyTorch, the decay here is scaled by the learning rate: ``θ ← θ (1 - α λ)``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor

__all__ = ["Adam", "AdamW"]


class _AdamBase(torch.optim.Optimizer):
    """Shared machinery; subclasses set ``decoupled`` (L2 in the gradient vs weight decay)."""

    decoupled: bool = False

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None):
        if not isinstance(lr, (int, float)) or lr < 0:
            raise ValueError(f"lr must be a non-negative float, got {lr!r}")
        if not isinstance(eps, (int, float)) or eps < 0:
            raise ValueError(f"eps must be a non-negative float, got {eps!r}")
        if (not isinstance(betas, (tuple, list)) or len(betas) != 2
                or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas)):
            raise ValueError(f"betas must be two floats in [0, 1), got {betas!r}")
        if not isinstance(weight_decay, (int, float)) or weight_decay < 0:
            raise ValueError(f"weight_decay must be a non-negative float, got {weight_decay!r}")
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                        amsgrad=amsgrad, maximize=maximize, foreach=foreach)
        super().__init__(params, defaults)

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("foreach", None)

    def _collect(self, group: dict[str, Any]) -> dict[str, list[Tensor]]:
        """Lists of the group's parameters that have a gradient, and their state (lazily made)."""
        out: dict[str, list[Tensor]] = {k: [] for k in ("p", "g", "m", "v", "vmax", "step")}
        for p in group["params"]:
            if p.grad is None:
                continue
            if p.grad.is_sparse:
                raise TypeError("Adam/AdamW do not support sparse gradients")
            if torch.is_complex(p):
                raise TypeError(f"parameters must be real, got dtype {p.dtype}")
            state = self.state[p]
            if not state:
                # same keys as torch.optim.Adam, so state dicts load across the two
                state["step"] = torch.tensor(0.0, dtype=torch.float32)
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                if group["amsgrad"]:
                    state["max_exp_avg_sq"] = torch.zeros_like(
                        p, memory_format=torch.preserve_format)
            out["p"].append(p)
            out["g"].append(p.grad)
            out["m"].append(state["exp_avg"])
            out["v"].append(state["exp_avg_sq"])
            out["step"].append(state["step"])
            if group["amsgrad"]:
                out["vmax"].append(state["max_exp_avg_sq"])
        return out

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor] | None = None) -> Tensor | None:
        """One optimisation step over every parameter that has a ``.grad``.

        Args:
            closure: Optional callable that re-evaluates the model and returns the loss.

        Returns:
            The closure's loss, or ``None``.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            t = self._collect(group)
            if not t["p"]:
                continue
            beta1, beta2 = group["betas"]
            kw = dict(lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                      weight_decay=group["weight_decay"], amsgrad=group["amsgrad"],
                      maximize=group["maximize"], decoupled=self.decoupled)
            foreach = group["foreach"]
            if foreach is None:  # like torch: vectorise when every tensor is on an accelerator
                foreach = all(p.device.type != "cpu" for p in t["p"])
            (_adam_foreach if foreach else _adam_loop)(t, **kw)
        return loss


def _adam_loop(t: dict[str, list[Tensor]], *, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float, amsgrad: bool, maximize: bool, decoupled: bool) -> None:
    """The for-loop path: one parameter at a time."""
    for i, p in enumerate(t["p"]):
        g = -t["g"][i] if maximize else t["g"][i]
        m, v, step_t = t["m"][i], t["v"][i], t["step"][i]
        step_t += 1
        if weight_decay != 0:
            if decoupled:
                # AdamW (Loshchilov & Hutter, Alg. 2, line 12): θ ← θ (1 - α λ)
                p.mul_(1 - lr * weight_decay)
            else:
                # Adam + L2 (Alg. 2, line 6): g ← g + λ θ, so λθ also enters m and v
                g = g.add(p, alpha=weight_decay)
        # m ← β₁ m + (1 - β₁) g   (written as m + (1 - β₁)(g - m))
        m.lerp_(g, 1 - beta1)
        # v ← β₂ v + (1 - β₂) g²
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        step = step_t.item()
        # bias corrections: m̂ = m / (1 - β₁ᵗ), v̂ = v / (1 - β₂ᵗ)
        bc1 = 1 - beta1 ** step
        bc2_sqrt = (1 - beta2 ** step) ** 0.5
        if amsgrad:
            # AMSGrad (Reddi et al. 2018): normalise by the running maximum of v
            torch.maximum(t["vmax"][i], v, out=t["vmax"][i])
            denom = (t["vmax"][i].sqrt() / bc2_sqrt).add_(eps)
        else:
            denom = (v.sqrt() / bc2_sqrt).add_(eps)
        # θ ← θ - α m̂ / (√v̂ + ε)
        p.addcdiv_(m, denom, value=-lr / bc1)


def _adam_foreach(t: dict[str, list[Tensor]], *, lr: float, beta1: float, beta2: float,
                  eps: float, weight_decay: float, amsgrad: bool, maximize: bool,
                  decoupled: bool) -> None:
    """The vectorised path: the same update as :func:`_adam_loop` with ``torch._foreach_*``."""
    buckets: dict[tuple[torch.device, torch.dtype], list[int]] = {}
    for i, p in enumerate(t["p"]):  # foreach kernels want one device and dtype per call
        buckets.setdefault((p.device, p.dtype), []).append(i)
    for idx in buckets.values():
        ps = [t["p"][i] for i in idx]
        gs = [t["g"][i] for i in idx]
        ms = [t["m"][i] for i in idx]
        vs = [t["v"][i] for i in idx]
        steps = [t["step"][i] for i in idx]
        if maximize:
            gs = torch._foreach_neg(gs)
        torch._foreach_add_(steps, 1)
        if weight_decay != 0:
            if decoupled:
                torch._foreach_mul_(ps, 1 - lr * weight_decay)  # θ ← θ (1 - α λ)
            elif maximize:
                torch._foreach_add_(gs, ps, alpha=weight_decay)  # g ← g + λ θ (own copy)
            else:
                gs = torch._foreach_add(gs, ps, alpha=weight_decay)  # g ← g + λ θ
        torch._foreach_lerp_(ms, gs, 1 - beta1)  # m ← β₁ m + (1 - β₁) g
        torch._foreach_mul_(vs, beta2)  # v ← β₂ v + (1 - β₂) g²
        torch._foreach_addcmul_(vs, gs, gs, 1 - beta2)
        counts = [s.item() for s in steps]
        step_sizes = [-lr / (1 - beta1 ** c) for c in counts]  # -α / (1 - β₁ᵗ)
        bc2_sqrt = [(1 - beta2 ** c) ** 0.5 for c in counts]  # √(1 - β₂ᵗ)
        if amsgrad:
            vmax = [t["vmax"][i] for i in idx]
            torch._foreach_maximum_(vmax, vs)
            denom = torch._foreach_sqrt(vmax)
        else:
            denom = torch._foreach_sqrt(vs)
        torch._foreach_div_(denom, bc2_sqrt)  # √v̂ + ε
        torch._foreach_add_(denom, eps)
        torch._foreach_addcdiv_(ps, ms, denom, step_sizes)  # θ ← θ - α m̂ / (√v̂ + ε)


class Adam(_AdamBase):
    """Adam; ``weight_decay`` is an L2 penalty added to the gradient (``g ← g + λ θ``).

    Args:
        params: Parameters or parameter groups, as for any ``torch.optim.Optimizer``.
        lr: Learning rate ``α``.
        betas: ``(β₁, β₂)``, each in ``[0, 1)``.
        eps: ``ε`` added to ``√v̂``.
        weight_decay: L2 coefficient ``λ`` (0 = none).
        amsgrad: Normalise by the running maximum of ``v̂`` (Reddi et al. 2018).
        maximize: Ascend instead of descend.
        foreach: ``True`` → ``torch._foreach_*`` path; ``False`` → for-loop; ``None`` → foreach
            when every parameter lives on an accelerator.

    Raises:
        ValueError: for a negative ``lr``/``eps``/``weight_decay`` or betas outside ``[0, 1)``.
    """

    decoupled = False


class AdamW(_AdamBase):
    """AdamW: Adam with decoupled weight decay ``θ ← θ (1 - α λ)`` applied before the step.

    Arguments as :class:`Adam`; ``weight_decay`` defaults to ``1e-2`` like ``torch.optim.AdamW``.
    """

    decoupled = True

    def __init__(self, params: Iterable[Any], lr: float = 1e-3,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None):
        super().__init__(params, lr, betas, eps, weight_decay, amsgrad, maximize=maximize,
                         foreach=foreach)
