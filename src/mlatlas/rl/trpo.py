"""TRPO: a natural-gradient policy step that stays inside a KL trust region.

Trust region policy optimisation maximises the importance-sampled surrogate advantage
``L(θ) = E[π_θ(a|s) / π_old(a|s) Â]`` subject to a bound ``D̄_KL(π_old ‖ π_θ) ≤ δ`` on the mean
KL divergence over the visited states (Schulman, Levine, Moritz, Jordan, Abbeel 2015,
arXiv:1502.05477, eq. 14). With ``L`` linearised (gradient ``g``) and the KL expanded to
second order (its Hessian at ``θ_old`` is the Fisher matrix ``F``) the step is the natural
gradient ``s = F⁻¹ g``: conjugate gradient solves ``F s = g`` from Fisher-vector products
alone (two backward passes through the KL, never ``F`` itself), the step length
``β = sqrt(2δ / sᵀ F s)`` puts the quadratic model of the KL exactly on ``δ``, and a
backtracking line search shrinks ``β s`` until the true KL is within ``δ`` and ``L`` improved
(appendix C). The value function ``V_φ`` that feeds GAE is fitted by regression on the
returns. Hyper-parameters and details (damping, advantage normalisation, Adam for ``V_φ``)
follow sb3-contrib's ``TRPO``.

================  ====================================================================
``π_θ, π_old``    current policy, the policy that sampled the batch
``Â``             advantage estimate (GAE, :mod:`mlatlas.rl.rollout`), normalised
``L(θ)``          surrogate ``mean(exp(log π_θ - log π_old) Â)``
``D̄_KL``          ``mean_s KL(π_old(.|s) ‖ π_θ(.|s))``;  ``δ`` its bound
``F, λ``          Fisher matrix (Hessian of ``D̄_KL`` at ``θ_old``), damping: ``(F + λI) v``
``s, β``          CG solution of ``(F + λI) s = g``, step scale ``sqrt(2δ / sᵀ(F + λI)s)``
``α``             backtracking factor: candidates ``θ_old + α^k β s``, ``k = 0..K-1``
================  ====================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from mlatlas.rl.policies import GaussianMLPPolicy
from mlatlas.rl.rollout import RolloutBatch

__all__ = ["ActionDistribution", "TRPO", "TRPOSettings", "TRPOUpdate", "action_distribution",
           "conjugate_gradient", "fisher_vector_product", "fit_value", "kl_divergence",
           "surrogate_advantage", "trpo_step"]


# ------------------------------------------------------------------ distributions and KL
@dataclass
class ActionDistribution:
    """The parameters of ``π(.|s)`` on a batch: softmax ``logits`` or Gaussian ``mean, log_std``.

    Attributes:
        logits: ``(B, A)`` for a categorical policy, else None.
        mean: ``(B, D)`` for a Gaussian policy, else None.
        log_std: ``(D,)`` for a Gaussian policy, else None.
    """

    logits: Tensor | None = None
    mean: Tensor | None = None
    log_std: Tensor | None = None

    def detach(self) -> ActionDistribution:
        return ActionDistribution(*(None if t is None else t.detach()
                                    for t in (self.logits, self.mean, self.log_std)))


def action_distribution(policy: nn.Module, obs: Tensor) -> ActionDistribution:
    """``π_θ(.|s)`` of a :mod:`mlatlas.rl.policies` policy on ``obs`` ``(B, obs_dim)``."""
    if isinstance(policy, GaussianMLPPolicy):
        return ActionDistribution(mean=policy.mean(obs), log_std=policy.log_std)
    if hasattr(policy, "logits"):
        return ActionDistribution(logits=policy.logits(obs))
    raise TypeError("policy must be a categorical (with .logits) or GaussianMLPPolicy, got "
                    f"{type(policy).__name__}")


def kl_divergence(p: ActionDistribution, q: ActionDistribution) -> Tensor:
    """``KL(p ‖ q)`` per state, ``(B,)``, for two distributions of the same family."""
    if p.logits is not None and q.logits is not None:
        log_p, log_q = F.log_softmax(p.logits, -1), F.log_softmax(q.logits, -1)
        return (log_p.exp() * (log_p - log_q)).sum(-1)  # sum_a p (log p - log q)
    if p.mean is not None and q.mean is not None:
        # sum_d log(σ_q/σ_p) + (σ_p² + (μ_p - μ_q)²) / (2 σ_q²) - 1/2
        var_p, var_q = (2 * p.log_std).exp(), (2 * q.log_std).exp()
        return (q.log_std - p.log_std + (var_p + (p.mean - q.mean).pow(2)) / (2 * var_q)
                - 0.5).sum(-1)
    raise TypeError("p and q must both be categorical (logits) or both Gaussian (mean, log_std)")


# ------------------------------------------------------------------ the natural gradient
def flat_grad(y: Tensor, params: Sequence[Tensor], **kwargs: bool) -> Tensor:
    """``∂y/∂params`` as one flat vector (``kwargs`` go to ``torch.autograd.grad``)."""
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(y, params, **kwargs)])


def conjugate_gradient(Avp: Callable[[Tensor], Tensor], b: Tensor, iters: int = 10,
                       tol: float = 1e-10) -> Tensor:
    """Solve ``A x = b`` for a symmetric positive-definite ``A`` known only through ``A v``.

    Starts at ``x = 0``; stops after ``iters`` iterations or once ``‖r‖² < tol``.

    Args:
        Avp: ``v (n,) -> A v (n,)``.
        b: ``(n,)`` right-hand side.
        iters: Most iterations (``n`` suffice in exact arithmetic).
        tol: Tolerance on the squared residual norm.

    Returns:
        ``(n,)`` the approximate solution ``x``.

    Raises:
        ValueError: ``b`` not 1-D, ``iters < 1`` or ``tol < 0``.
    """
    if b.dim() != 1:
        raise ValueError(f"b must be a vector (n,), got shape {tuple(b.shape)}")
    if iters < 1:
        raise ValueError(f"iters must be >= 1, got {iters}")
    if tol < 0:
        raise ValueError(f"tol must be >= 0, got {tol}")
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()  # r = b - A x = b at x = 0
    rr = r @ r
    for _ in range(iters):
        if rr < tol:
            break
        Ap = Avp(p)
        alpha = rr / (p @ Ap)  # exact line minimisation along the conjugate direction p
        x += alpha * p
        r -= alpha * Ap
        rr_new = r @ r
        p = r + (rr_new / rr) * p  # next direction, A-conjugate to the previous ones
        rr = rr_new
    return x


def fisher_vector_product(policy: nn.Module, obs: Tensor, damping: float = 0.0
                          ) -> Callable[[Tensor], Tensor]:
    """``v -> (F + λI) v`` at the current ``θ``, by double back-propagation through the KL.

    ``F = ∇²_θ D̄_KL(π_θold ‖ π_θ)`` at ``θ = θ_old``; ``F v = ∇_θ ((∇_θ D̄_KL) · v)``. The
    first gradient is taken once (with its graph); each product is one more backward pass.

    Args:
        policy: A categorical or Gaussian policy of :mod:`mlatlas.rl.policies`.
        obs: ``(B, obs_dim)`` states of the batch.
        damping: ``λ ≥ 0``.

    Returns:
        The product function on flat ``(n_params,)`` vectors.
    """
    if damping < 0:
        raise ValueError(f"damping must be >= 0, got {damping}")
    params = [p for p in policy.parameters() if p.requires_grad]
    new = action_distribution(policy, obs)
    kl = kl_divergence(new.detach(), new).mean()  # D̄_KL(π_old ‖ π_θ), zero at θ_old
    grad_kl = flat_grad(kl, params, create_graph=True)

    def fvp(v: Tensor) -> Tensor:
        return flat_grad(grad_kl @ v, params, retain_graph=True) + damping * v  # (F + λI) v

    return fvp


def surrogate_advantage(policy: nn.Module, obs: Tensor, actions: Tensor, old_log_probs: Tensor,
                        advantages: Tensor) -> Tensor:
    """``L(θ) = mean(exp(log π_θ(a|s) - log π_old(a|s)) Â)`` (eq. 14), a scalar."""
    return (torch.exp(policy.log_prob(obs, actions) - old_log_probs) * advantages).mean()


@dataclass
class TRPOUpdate:
    """What one policy step did.

    Attributes:
        surrogate_before: ``L(θ_old)``.
        surrogate_after: ``L`` at the accepted parameters (``= before`` if rejected).
        kl: ``D̄_KL(π_old ‖ π_new)`` at the accepted parameters (0 if rejected).
        step_scale: ``β`` of the quadratic KL model.
        step_fraction: ``α^k`` of the accepted candidate (0 if rejected).
        accepted: Whether a candidate met both tests.
        value_loss: Mean squared error of the value regression (filled by :class:`TRPO`).
    """

    surrogate_before: float
    surrogate_after: float
    kl: float
    step_scale: float
    step_fraction: float
    accepted: bool
    value_loss: float = float("nan")


def trpo_step(policy: nn.Module, obs: Tensor, actions: Tensor, old_log_probs: Tensor,
              advantages: Tensor, delta: float = 0.01, cg_iters: int = 15,
              cg_damping: float = 0.1, backtrack_coef: float = 0.8,
              backtrack_iters: int = 10) -> TRPOUpdate:
    """One TRPO policy step on a batch (changes ``policy``'s parameters in place).

    Args:
        policy: A categorical or Gaussian policy of :mod:`mlatlas.rl.policies`.
        obs: ``(B, obs_dim)`` states.
        actions: ``(B,)`` or ``(B, D)`` actions taken.
        old_log_probs: ``(B,)`` ``log π_old(a|s)``.
        advantages: ``(B,)`` advantages (normalise them first if wanted).
        delta: KL bound ``δ > 0``.
        cg_iters: Conjugate-gradient iterations.
        cg_damping: ``λ`` of ``(F + λI)``.
        backtrack_coef: ``α ∈ (0, 1)``.
        backtrack_iters: ``K ≥ 1`` candidates.

    Returns:
        The :class:`TRPOUpdate`.
    """
    if not delta > 0:
        raise ValueError(f"delta (the KL bound) must be > 0, got {delta}")
    B = obs.shape[0]
    if actions.shape[:1] != (B,):
        raise ValueError(f"actions must be ({B},) or ({B}, D) like obs, got {tuple(actions.shape)}")
    for name, t in (("old_log_probs", old_log_probs), ("advantages", advantages)):
        if t.shape != (B,):
            raise ValueError(f"{name} must have shape ({B},) like obs, got {tuple(t.shape)}")
    if not 0 < backtrack_coef < 1:
        raise ValueError(f"backtrack_coef must be in (0, 1), got {backtrack_coef}")
    if backtrack_iters < 1:
        raise ValueError(f"backtrack_iters must be >= 1, got {backtrack_iters}")
    params = [p for p in policy.parameters() if p.requires_grad]
    with torch.no_grad():
        old = action_distribution(policy, obs).detach()
    surr = surrogate_advantage(policy, obs, actions, old_log_probs, advantages)
    g = flat_grad(surr, params)
    Fvp = fisher_vector_product(policy, obs, cg_damping)
    s = conjugate_gradient(Fvp, g, cg_iters)  # s ≈ (F + λI)⁻¹ g
    sFs = float(s @ Fvp(s))
    before = float(surr.detach())
    if not (sFs > 0 and math.isfinite(sFs)):  # zero gradient: nothing to do
        return TRPOUpdate(before, before, 0.0, 0.0, 0.0, False)
    beta = math.sqrt(2 * delta / sFs)  # ½ (βs)ᵀ F (βs) = δ: the quadratic model's boundary
    theta_old = parameters_to_vector(params).detach()
    with torch.no_grad():
        for k in range(backtrack_iters):
            frac = backtrack_coef ** k
            vector_to_parameters(theta_old + frac * beta * s, params)
            kl = float(kl_divergence(old, action_distribution(policy, obs)).mean())
            after = float(surrogate_advantage(policy, obs, actions, old_log_probs, advantages))
            if kl <= delta and after > before:  # inside the trust region and L improved
                return TRPOUpdate(before, after, kl, beta, frac, True)
        vector_to_parameters(theta_old, params)  # no candidate passed: keep θ_old
    return TRPOUpdate(before, before, 0.0, beta, 0.0, False)


def fit_value(value: nn.Module, optimizer: torch.optim.Optimizer, obs: Tensor, returns: Tensor,
              epochs: int, batch_size: int, generator: torch.Generator | None = None) -> float:
    """Regress ``V_φ(s)`` on the returns: ``epochs`` passes of shuffled minibatch MSE steps.

    Returns:
        The mean minibatch loss.
    """
    n, losses = obs.shape[0], []
    for _ in range(epochs):
        perm = torch.randperm(n, generator=generator)
        for i in range(0, n, batch_size):
            idx = perm[i:i + batch_size]
            loss = F.mse_loss(value(obs[idx]), returns[idx])  # (V_φ(s) - R)²
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(loss.detach())
    return float(torch.stack(losses).mean())


# ------------------------------------------------------------------ the agent
@dataclass
class TRPOSettings:
    """TRPO's hyper-parameters (defaults: sb3-contrib's ``TRPO``).

    Attributes:
        delta: KL bound ``δ`` (sb3-contrib: ``target_kl``).
        n_steps: Steps per environment per update.
        gamma: Discount.
        lam: GAE ``λ``.
        cg_iters: Conjugate-gradient iterations.
        cg_damping: Fisher damping ``λ_F``.
        backtrack_coef: Line-search shrink factor.
        backtrack_iters: Line-search candidates.
        value_lr: Adam learning rate of ``V_φ``.
        value_epochs: Passes over the batch per update (``n_critic_updates``).
        value_batch_size: Minibatch size of the value regression.
        normalize_advantage: Standardise ``Â`` per batch.
    """

    delta: float = 0.01
    n_steps: int = 2048
    gamma: float = 0.99
    lam: float = 0.95
    cg_iters: int = 15
    cg_damping: float = 0.1
    backtrack_coef: float = 0.8
    backtrack_iters: int = 10
    value_lr: float = 1e-3
    value_epochs: int = 10
    value_batch_size: int = 128
    normalize_advantage: bool = True

    def __post_init__(self) -> None:
        if not self.delta > 0:
            raise ValueError(f"delta (the KL bound) must be > 0, got {self.delta}")
        for name in ("n_steps", "cg_iters", "backtrack_iters", "value_epochs",
                     "value_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")


class TRPO:
    """A policy, its value function, and the update that alternates the two.

    Args:
        policy: A :class:`~mlatlas.rl.policies.CategoricalMLPPolicy` or ``GaussianMLPPolicy``.
        value: ``V_φ(obs) -> (B,)`` (e.g. :class:`~mlatlas.rl.policies.ValueMLP`).
        settings: The hyper-parameters.
        generator: Draws actions and the value minibatches.
    """

    def __init__(self, policy: nn.Module, value: nn.Module, settings: TRPOSettings | None = None,
                 generator: torch.Generator | None = None) -> None:
        self.policy, self.value = policy, value
        self.settings = settings or TRPOSettings()
        self.generator = generator
        self.value_optimizer = torch.optim.Adam(value.parameters(), lr=self.settings.value_lr,
                                                eps=1e-5)

    def update(self, batch: RolloutBatch) -> TRPOUpdate:
        """One policy step (:func:`trpo_step`) then the value regression on ``batch``."""
        s = self.settings
        adv = batch.advantages
        if s.normalize_advantage:
            adv = (adv - adv.mean()) / (adv.std() + 1e-8)
        result = trpo_step(self.policy, batch.obs, batch.actions, batch.log_probs, adv, s.delta,
                           s.cg_iters, s.cg_damping, s.backtrack_coef, s.backtrack_iters)
        result.value_loss = fit_value(self.value, self.value_optimizer, batch.obs, batch.returns,
                                      s.value_epochs, s.value_batch_size, self.generator)
        return result
