"""Bottleneck adapters: small residual MLPs inserted after sub-layers of a frozen model.

An adapter projects a sub-layer's ``d``-dimensional output down to ``m ≪ d``, applies a
non-linearity, projects back up and adds its input: ``A(y) = y + W_up σ(W_down y + b_down) +
b_up``. Initialised near zero, it starts as (almost) the identity, so training starts from
the pretrained model; only ``2md + m + d`` parameters per adapter train. Houlsby et al. place
one after the attention and one after the feed-forward sub-layer of every block (and train the
layer norms too); Pfeiffer et al. find one after the feed-forward sub-layer enough.
Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for NLP", arXiv:1902.00751;
Pfeiffer et al. 2021, "AdapterFusion: Non-Destructive Task Composition for Transfer
Learning", arXiv:2005.00247.

=============  ====================================================================
``y``          a sub-layer's output ``[..., d]``, before the block's residual add
``m``          bottleneck width (``bottleneck``, or ``d // reduction_factor``)
``σ``          non-linearity (Houlsby: any, here SiLU; Pfeiffer: ReLU)
``W_down``     ``adapter.down.weight [m, d]``;  ``W_up`` ``adapter.up.weight [d, m]``
=============  ====================================================================

In a pre-norm decoder (our :class:`~mlatlas.llm.llama.Llama`) a sub-layer's output is the
output of its last projection — ``self_attn.o_proj`` and ``mlp.down_proj`` — so an adapter
wraps that projection: ``x + A(Attn(Norm(x)))`` and ``h + A(FFN(Norm(h)))``. Placement is
peft-style module-name matching (:mod:`mlatlas.peft.targets`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from mlatlas.nn.norms import RMSNorm
from mlatlas.peft.targets import TargetModules, check_target_modules, find_targets, set_submodule

__all__ = ["KINDS", "AdaptedLinear", "AdapterConfig", "BottleneckAdapter", "adapter_layers",
           "apply_adapters", "remove_adapters"]

#: Placement → (default target modules, default non-linearity, train the norms).
KINDS: dict[str, tuple[list[str], str, bool]] = {
    "houlsby": (["o_proj", "down_proj"], "silu", True),
    "pfeiffer": (["down_proj"], "relu", False),
}
_ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "silu": nn.SiLU, "tanh": nn.Tanh}


@dataclass
class AdapterConfig:
    """Which adapter, where, and how wide.

    Attributes:
        kind: ``"houlsby"`` (after attention and FFN, norms trained) or ``"pfeiffer"``
            (after the FFN only).
        bottleneck: ``m``; ``None`` → ``d // reduction_factor``.
        reduction_factor: ``d / m`` when ``bottleneck`` is ``None``.
        activation: ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``; ``None`` → the kind's.
        init_std: ``σ₀`` of the near-identity start (Houlsby et al. §2.1): weights ~
            N(0, σ₀²) truncated at ``±2σ₀``, biases 0 (their §3.6: robust for σ₀ ≤ 1e-2).
        target_modules: The projections to wrap; ``None`` → the kind's (see :data:`KINDS`).
        train_norms: Also train every norm's gain; ``None`` → the kind's.
    """

    kind: str = "houlsby"
    bottleneck: int | None = None
    reduction_factor: int = 16
    activation: str | None = None
    init_std: float = 1e-2
    target_modules: TargetModules | None = None
    train_norms: bool | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"AdapterConfig.kind must be one of {sorted(KINDS)}, got "
                             f"{self.kind!r}")
        targets, activation, norms = KINDS[self.kind]
        for name in ("bottleneck", "reduction_factor"):
            value = getattr(self, name)
            if value is None and name == "bottleneck":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ValueError(f"AdapterConfig.{name} must be a positive int, got {value!r}")
        self.activation = activation if self.activation is None else self.activation
        if self.activation not in _ACTIVATIONS:
            raise ValueError(f"AdapterConfig.activation must be one of {sorted(_ACTIVATIONS)}, "
                             f"got {self.activation!r}")
        if not self.init_std >= 0:
            raise ValueError(f"AdapterConfig.init_std must be >= 0, got {self.init_std!r}")
        self.target_modules = check_target_modules(
            targets if self.target_modules is None else self.target_modules)
        self.train_norms = norms if self.train_norms is None else bool(self.train_norms)


class BottleneckAdapter(nn.Module):
    """``A(y) = y + W_up σ(W_down y + b_down) + b_up``.

    Args:
        dim: ``d``.
        bottleneck: ``m``.
        activation: Key of the non-linearity (``"relu"``, ``"gelu"``, ``"silu"``, ``"tanh"``).
        init_std: Near-identity start (see :class:`AdapterConfig`).

    Shapes:
        ``y [..., d]`` → ``[..., d]``.
    """

    def __init__(self, dim: int, bottleneck: int, activation: str = "relu",
                 init_std: float = 1e-2, *, device: torch.device | None = None,
                 dtype: torch.dtype | None = None):
        super().__init__()
        self.down = nn.Linear(dim, bottleneck, device=device, dtype=dtype)
        self.act = _ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, dim, device=device, dtype=dtype)
        with torch.no_grad():
            for layer in (self.down, self.up):
                if init_std > 0:
                    nn.init.trunc_normal_(layer.weight, std=init_std, a=-2 * init_std,
                                          b=2 * init_std)
                else:
                    nn.init.zeros_(layer.weight)
                nn.init.zeros_(layer.bias)

    def forward(self, y: Tensor) -> Tensor:
        """``y [..., d]`` → ``[..., d]``."""
        # Houlsby §2.1, Fig. 2: A(y) = y + W_up σ(W_down y)   (the adapter's own skip connection)
        return y + self.up(self.act(self.down(y)))


class AdaptedLinear(nn.Module):
    """A frozen projection followed by an adapter: ``A(W x + b)``.

    Args:
        base_layer: The projection (kept as ``base_layer``).
        adapter: The :class:`BottleneckAdapter` (kept as ``adapter``).
    """

    def __init__(self, base_layer: nn.Linear, adapter: BottleneckAdapter):
        super().__init__()
        self.base_layer, self.adapter = base_layer, adapter

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., d_in]`` → ``[..., d_out]``."""
        return self.adapter(self.base_layer(x))


def apply_adapters(model: nn.Module, config: AdapterConfig) -> list[str]:
    """Insert adapters after the selected projections, in place; freeze everything else.

    Afterwards the adapters (and, with ``train_norms``, every :class:`RMSNorm` /
    ``nn.LayerNorm`` parameter) require grad; nothing else does.

    Args:
        model: Any module; our :class:`~mlatlas.llm.llama.Llama` is matched by its Hugging
            Face names.
        config: An :class:`AdapterConfig`.

    Returns:
        The public names of the wrapped projections.

    Raises:
        TypeError: ``config`` is not an :class:`AdapterConfig`.
        ValueError: a target that matches nothing (closest names given) or is not an
            ``nn.Linear``, a bottleneck ≥ the width it adapts, or a model that already has
            adapters.
    """
    if not isinstance(config, AdapterConfig):
        raise TypeError(f"config must be an AdapterConfig, got {type(config).__name__}")
    if adapter_layers(model):
        raise ValueError("model already has adapters; remove_adapters(model) first")
    targets = find_targets(model, config.target_modules, (nn.Linear,),
                           skip_inside=(AdaptedLinear,))
    widths = {}
    for t in targets:
        d = t.module.out_features
        m = config.bottleneck or d // config.reduction_factor
        if not 0 < m < d:
            raise ValueError(f"adapter bottleneck m must be in (0, {d}) for {t.public_name!r} "
                             f"(out_features {d}), got {m}")
        widths[t.name] = m
    for p in model.parameters():
        p.requires_grad_(False)
    for t in targets:
        w = t.module.weight
        adapter = BottleneckAdapter(t.module.out_features, widths[t.name], config.activation,
                                    config.init_std, device=w.device, dtype=w.dtype)
        set_submodule(model, t.name, AdaptedLinear(t.module, adapter))
    if config.train_norms:
        for module in model.modules():
            if isinstance(module, (RMSNorm, nn.LayerNorm)):
                module.requires_grad_(True)
    return [t.public_name for t in targets]


def adapter_layers(model: nn.Module) -> dict[str, AdaptedLinear]:
    """Own module name → adapted projection, for every adapter in ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, AdaptedLinear)}


def remove_adapters(model: nn.Module) -> None:
    """Put the plain projections back (the base model again; ``requires_grad`` unchanged).

    Raises:
        ValueError: the model has no adapters.
    """
    layers = adapter_layers(model)
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no adapters")
    for name, layer in layers.items():
        set_submodule(model, name, layer.base_layer)
