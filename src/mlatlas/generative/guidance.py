"""Guidance — classifier guidance and classifier-free guidance for diffusion models.

Both steer a diffusion sampler towards a class y by sampling from a sharpened conditional
p(x | y) p(y | x)^s. *Classifier guidance* (Dhariwal & Nichol 2021, "Diffusion Models Beat GANs
on Image Synthesis", arXiv:2105.05233) trains a separate classifier p_φ(y | x_t, t) on noisy
samples and adds the gradient of its log-probability to the denoiser's score. *Classifier-free
guidance* (Ho & Salimans 2022, arXiv:2207.12598) trains one network both conditionally and
unconditionally (the label is dropped to a null token with probability p_uncond) and
extrapolates from the unconditional towards the conditional prediction. Larger scales trade
sample diversity for class fidelity.

=========================  ==============================================================
ε_θ(x_t, y), ε_θ(x_t, ∅)   conditional / unconditional noise prediction (∅ = null label)
p_φ(y | x_t, t)            noise-aware classifier, trained with cross-entropy on x_t
classifier guidance        ε̂ = ε_θ(x_t) − s √(1−ᾱ_t) ∇_{x_t} log p_φ(y | x_t)   (D&N Alg. 2)
classifier-free guidance   ε̂ = (1 + w) ε_θ(x_t, y) − w ε_θ(x_t, ∅)              (H&S eq. 6)
=========================  ==============================================================

Both return a ``model_fn(x, timestep)`` that any scheduler loop with the diffusers interface
(:func:`mlatlas.generative.ddpm.denoise`) can run, for DDPM and DDIM alike.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from mlatlas.generative.networks import SinusoidalTimeEmbedding
from mlatlas.generative.noise_schedule import NoiseSchedule, randn_like_diffusers

__all__ = [
    "NoisyClassifier",
    "cfg_loss",
    "classifier_free_guidance",
    "classifier_guidance",
    "drop_labels",
    "noisy_classifier_loss",
]


class NoisyClassifier(nn.Module):
    """Time-conditioned MLP classifier ``p_φ(y | x_t, t)`` (inputs are flattened).

    Args:
        in_features: Number of input features (2 for points, 64 for 8×8 images).
        num_classes: Number of classes K.
        hidden: Hidden width.
        depth: Number of hidden layers.
        time_dim: Size of the sinusoidal time embedding.
    """

    def __init__(self, in_features: int, num_classes: int, hidden: int = 128, depth: int = 3,
                 time_dim: int = 64):
        super().__init__()
        if depth < 1 or num_classes < 2:
            raise ValueError(f"need depth >= 1 and num_classes >= 2, got depth={depth}, "
                             f"num_classes={num_classes}")
        self.in_features = in_features
        self.num_classes = num_classes
        self.time_embed = SinusoidalTimeEmbedding(time_dim)
        layers: list[nn.Module] = [nn.Linear(in_features + time_dim, hidden), nn.SiLU()]
        for _ in range(depth - 1):
            layers += [nn.Linear(hidden, hidden), nn.SiLU()]
        self.net = nn.Sequential(*layers, nn.Linear(hidden, num_classes))

    def forward(self, x: Tensor, t: Tensor) -> Tensor:
        """``x`` ``[B, ...]`` (``in_features`` values each), ``t`` ``[B]`` in [0, 1] → ``[B, K]``."""
        flat = x.reshape(x.shape[0], -1)
        if flat.shape[1] != self.in_features:
            raise ValueError(f"x must have {self.in_features} features per sample, got "
                             f"shape {tuple(x.shape)}")
        if t.shape != (x.shape[0],):
            raise ValueError(f"t must have shape [{x.shape[0]}], got {tuple(t.shape)}")
        return self.net(torch.cat([flat, self.time_embed(t).to(flat.dtype)], dim=1))


def noisy_classifier_loss(classifier: nn.Module, x0: Tensor, y: Tensor, schedule: NoiseSchedule,
                          generator: torch.Generator | None = None) -> Tensor:
    """Cross-entropy of ``p_φ(y | x_t, t)`` on x_t ~ q(x_t | x_0), t uniform (D&N sec. 4).

    Args:
        classifier: ``classifier(x_t, t/T)`` → ``[B, K]`` logits.
        x0: ``[B, ...]`` clean data.
        y: ``[B]`` int64 labels.
        schedule: The forward process the diffusion model was trained with.
        generator: Source of t and ε.
    """
    t = schedule.sample_timesteps(x0.shape[0], generator).to(x0.device)
    x_t = schedule.add_noise(x0, randn_like_diffusers(x0.shape, generator, x0), t)
    return nn.functional.cross_entropy(classifier(x_t, schedule.normalized(t)), y)


def drop_labels(y: Tensor, p_uncond: float, null_label: int,
                generator: torch.Generator | None = None) -> Tensor:
    """Replace each label by ``null_label`` with probability ``p_uncond`` (H&S Algorithm 1).

    Raises:
        ValueError: for ``p_uncond`` outside [0, 1].
    """
    if not 0.0 <= p_uncond <= 1.0:
        raise ValueError(f"p_uncond must lie in [0, 1], got {p_uncond}")
    drop = torch.rand(y.shape, generator=generator).to(y.device) < p_uncond
    return torch.where(drop, torch.full_like(y, null_label), y)


def cfg_loss(model: nn.Module, x0: Tensor, y: Tensor, schedule: NoiseSchedule,
             generator: torch.Generator | None = None, p_uncond: float = 0.1) -> Tensor:
    """ε-prediction loss with conditioning dropout: one network learns ε(x, y) and ε(x, ∅).

    Args:
        model: ``model(x_t, t/T, y)`` with a null label ``model.num_classes``.
        x0: ``[B, ...]`` clean data.
        y: ``[B]`` int64 labels in ``[0, num_classes)``.
        schedule: The forward process.
        generator: Source of dropout, t and ε.
        p_uncond: Probability of training a sample unconditionally.
    """
    y_in = drop_labels(y, p_uncond, model.num_classes, generator)
    t = schedule.sample_timesteps(x0.shape[0], generator).to(x0.device)
    eps = randn_like_diffusers(x0.shape, generator, x0)
    x_t = schedule.add_noise(x0, eps, t)
    return nn.functional.mse_loss(model(x_t, schedule.normalized(t), y_in), eps)


def _check_labels(y: Tensor, num_classes: int) -> None:
    if not isinstance(y, Tensor) or y.dtype != torch.long or y.ndim != 1:
        raise TypeError(f"y must be a 1-D int64 tensor of labels, got "
                        f"{getattr(y, 'dtype', type(y).__name__)} "
                        f"{tuple(getattr(y, 'shape', ()))}")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"y must hold labels in [0, {num_classes}), got "
                         f"[{int(y.min())}, {int(y.max())}]")


def _check_scale(name: str, value: float) -> None:
    if not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{name} must be a number >= 0, got {value!r}")


def classifier_free_guidance(model: nn.Module, y: Tensor, guidance_scale: float,
                             num_train_timesteps: int) -> Callable[[Tensor, Tensor], Tensor]:
    """``model_fn(x_t, t)`` returning ``(1 + w) ε(x_t, y) − w ε(x_t, ∅)`` (H&S eq. 6).

    The conditional and unconditional passes run as one batch of ``2B``. ``w = 0`` is the
    plain conditional model; note that diffusers' ``guidance_scale`` is ``1 + w``.

    Args:
        model: Conditional network with ``num_classes`` and a null label ``num_classes``.
        y: ``[B]`` int64 target classes.
        guidance_scale: w ≥ 0.
        num_train_timesteps: T (the network takes ``t / T``).

    Raises:
        ValueError: for w < 0 or labels outside ``[0, num_classes)``.
    """
    _check_scale("guidance_scale", guidance_scale)
    k = getattr(model, "num_classes", None)
    if k is None:
        raise ValueError("model must be class-conditional (num_classes set) for "
                         "classifier-free guidance")
    _check_labels(y, k)
    w = float(guidance_scale)
    y2 = torch.cat([y, torch.full_like(y, k)])

    def fn(x: Tensor, timestep: Tensor) -> Tensor:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has batch {x.shape[0]} but y has {y.shape[0]} labels")
        b = x.shape[0]
        t = torch.full((2 * b,), float(timestep) / num_train_timesteps, device=x.device)
        eps = model(torch.cat([x, x]), t, y2.to(x.device))
        cond, uncond = eps[:b], eps[b:]
        return (1 + w) * cond - w * uncond  # eq. (6) of Ho & Salimans

    return fn


def classifier_guidance(model_fn: Callable[[Tensor, Tensor], Tensor], classifier: nn.Module,
                        y: Tensor, scale: float, schedule: NoiseSchedule
                        ) -> Callable[[Tensor, Tensor], Tensor]:
    """``model_fn(x_t, t)`` returning ``ε(x_t) − s √(1−ᾱ_t) ∇ log p_φ(y | x_t, t)``.

    Subtracting √(1−ᾱ_t)·s∇ log p_φ from ε̂ adds s∇ log p_φ to the score
    ∇ log p(x_t) = −ε̂/√(1−ᾱ_t) (Dhariwal & Nichol Algorithm 2; with a DDPM scheduler this is
    their Algorithm 1 up to the choice of variance).

    Args:
        model_fn: Unguided ``(x_t, timestep) → ε̂`` (e.g. the unconditional model).
        classifier: ``classifier(x_t, t/T)`` → ``[B, K]`` logits, trained on noisy data.
        y: ``[B]`` int64 target classes.
        scale: s ≥ 0.
        schedule: The forward process (for ᾱ_t and T).

    Raises:
        ValueError: for s < 0 or labels outside ``[0, K)``; the returned function for a
            batch that does not match ``y`` or a timestep outside ``[0, T)``.
    """
    _check_scale("scale", scale)
    k = getattr(classifier, "num_classes", None)
    if k is not None:
        _check_labels(y, k)
    s = float(scale)
    T = schedule.num_train_timesteps

    def fn(x: Tensor, timestep: Tensor) -> Tensor:
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"x has batch {x.shape[0]} but y has {y.shape[0]} labels")
        steps = schedule.check_timesteps(timestep)  # integer, inside [0, T)
        if steps.numel() != 1:
            raise ValueError(f"timestep must be one integer, got {steps.numel()} values")
        eps = model_fn(x, timestep)
        if s == 0:
            return eps
        t_int = int(steps)
        t = torch.full((x.shape[0],), t_int / T, device=x.device)
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            logp = classifier(xg, t).log_softmax(dim=1)
            picked = logp.gather(1, y.to(x.device)[:, None]).sum()
            (grad,) = torch.autograd.grad(picked, xg)  # ∇_{x_t} log p_φ(y | x_t)
        sigma = (1 - schedule.alphas_cumprod[t_int]).sqrt().to(x)
        return eps - s * sigma * grad  # D&N sec. 4.2, Alg. 2: ε̂ = ε − s√(1−ᾱ_t)∇ log p_φ

    return fn
