"""LoRA: a frozen weight plus a trainable low-rank update, ``W₀ + (α/r)·B·A``.

Fine-tuning changes a pretrained weight by an update of low intrinsic rank, so LoRA freezes
``W₀`` and learns only the factors ``B A`` of rank ``r ≪ min(d_in, d_out)``; ``B = 0`` at the
start, so training starts exactly at the pretrained model, and after training ``B A`` can be
merged into ``W₀`` (no extra inference cost). Hu et al. 2021, "LoRA: Low-Rank Adaptation of
Large Language Models", arXiv:2106.09685; rank-stabilised scaling ``α/√r``: Kalajdzievski
2023, "A Rank Stabilization Scaling Factor for Fine-Tuning with LoRA", arXiv:2312.03732.

=============  =================================================================
``W₀``         frozen base weight ``[d_out, d_in]`` (``nn.Linear``) or table ``[V, d]``
``A``          ``lora_A.weight [r, d_in]`` (embedding: ``lora_embedding_A [r, V]``)
``B``          ``lora_B.weight [d_out, r]`` (embedding: ``lora_embedding_B [d, r]``)
``r, α``       rank, ``lora_alpha``;  scaling ``s = α/r`` (rsLoRA: ``α/√r``)
=============  =================================================================

The layers, names and scaling are those of the ``peft`` library, so adapters move both ways:
:func:`mlatlas.peft.peft_format.save_adapter` writes what ``PeftModel.from_pretrained``
reads, and :func:`~mlatlas.peft.peft_format.load_adapter` reads what peft saved. Modules
are chosen by peft's name matching (:mod:`mlatlas.peft.targets`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mlatlas.peft.targets import (
    Target,
    TargetModules,
    check_target_modules,
    find_targets,
    set_submodule,
)

__all__ = ["BIASES", "INITS", "LoraConfig", "LoraEmbedding", "LoraLinear", "apply_lora",
           "lora_config_of", "lora_layers", "lora_targets", "merge_lora", "unload_lora", "unmerge_lora"]

#: Initialisations: ``kaiming`` — A Kaiming-uniform, B = 0 (the paper; peft's default);
#: ``gaussian`` — A ~ N(0, 1/r), B = 0 (peft ``"gaussian"``); ``zeros`` — A = 0, B ~ N(0, 1)
#: (the mirrored identity start, peft's own for embeddings; Hayou et al. 2024,
#: arXiv:2406.08447 "Init[B]").
INITS = ("kaiming", "gaussian", "zeros")
#: Which biases train: ``none``; ``all`` (every bias of the model); ``lora_only`` (the biases of
#: the adapted layers) — peft's ``bias`` option.
BIASES = ("none", "all", "lora_only")


@dataclass
class LoraConfig:
    """What LoRA adapts and how (peft's ``LoraConfig`` fields of the same names).

    Attributes:
        r: Rank ``r`` (> 0).
        lora_alpha: ``α``; the update is scaled by ``α/r`` (``α/√r`` with ``use_rslora``).
        lora_dropout: Dropout on the LoRA branch's input (``nn.Linear`` only, as in peft).
        target_modules: Module names (exact or ``.``-suffix) or one full-match regex.
        bias: ``"none"``, ``"all"`` or ``"lora_only"`` (see :data:`BIASES`).
        use_rslora: Rank-stabilised scaling ``α/√r``.
        init: ``"kaiming"``, ``"gaussian"`` or ``"zeros"`` (see :data:`INITS`; embeddings
            always start as peft's: A = 0, B ~ N(0, 1)).
        exclude_modules: Modules left out, same matching rule; ``None`` excludes nothing.
    """

    r: int = 8
    lora_alpha: float = 8.0
    lora_dropout: float = 0.0
    target_modules: TargetModules = field(default_factory=lambda: ["q_proj", "v_proj"])
    bias: str = "none"
    use_rslora: bool = False
    init: str = "kaiming"
    exclude_modules: TargetModules | None = None

    def __post_init__(self) -> None:
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r <= 0:
            raise ValueError(f"LoraConfig.r must be a positive int, got {self.r!r}")
        if isinstance(self.lora_alpha, bool) or not isinstance(self.lora_alpha, (int, float)) \
                or not math.isfinite(self.lora_alpha):
            raise TypeError(f"LoraConfig.lora_alpha must be a finite number, got "
                            f"{self.lora_alpha!r}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"LoraConfig.lora_dropout must be in [0, 1), got "
                             f"{self.lora_dropout!r}")
        self.target_modules = check_target_modules(self.target_modules)
        if self.exclude_modules is not None:
            self.exclude_modules = check_target_modules(self.exclude_modules, "exclude_modules")
        if self.bias not in BIASES:
            raise ValueError(f"LoraConfig.bias must be one of {BIASES}, got {self.bias!r}")
        if self.init not in INITS:
            raise ValueError(f"LoraConfig.init must be one of {INITS}, got {self.init!r}")

    @property
    def scaling(self) -> float:
        """``s = α/r``, or ``α/√r`` with rsLoRA (rsLoRA eq. (5))."""
        return self.lora_alpha / (math.sqrt(self.r) if self.use_rslora else self.r)


class LoraLinear(nn.Module):
    """``nn.Linear`` plus a low-rank update: ``y = W₀x + b + s·B·A·dropout(x)``.

    Args:
        base_layer: The frozen layer (kept as ``base_layer``).
        config: Rank, scaling, dropout and init.

    Shapes:
        ``x [..., d_in]`` → ``[..., d_out]``.
    """

    def __init__(self, base_layer: nn.Linear, config: LoraConfig):
        super().__init__()
        if not isinstance(base_layer, nn.Linear):
            raise TypeError(f"base_layer must be an nn.Linear, got {type(base_layer).__name__}")
        w = base_layer.weight
        self.base_layer = base_layer
        self.r, self.scaling = config.r, config.scaling
        self.lora_dropout = (nn.Dropout(config.lora_dropout) if config.lora_dropout > 0
                             else nn.Identity())
        self.lora_A = nn.Linear(base_layer.in_features, config.r, bias=False,
                                device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(config.r, base_layer.out_features, bias=False,
                                device=w.device, dtype=w.dtype)
        self.merged = False
        with torch.no_grad():
            if config.init == "kaiming":
                nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
                nn.init.zeros_(self.lora_B.weight)
            elif config.init == "gaussian":
                nn.init.normal_(self.lora_A.weight, std=1.0 / config.r)
                nn.init.zeros_(self.lora_B.weight)
            else:
                nn.init.zeros_(self.lora_A.weight)
                nn.init.normal_(self.lora_B.weight)

    def delta_weight(self) -> Tensor:
        """``ΔW = s·B·A`` ``[d_out, d_in]``."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        """``x [..., d_in]`` → ``[..., d_out]``."""
        out = self.base_layer(x)
        if self.merged:
            return out
        # eq. (3): h = W₀x + ΔWx = W₀x + s·B·A·x
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling


class LoraEmbedding(nn.Module):
    """``nn.Embedding`` plus a low-rank update of the table: ``E₀[i] + s·(B·A)ᵀ[i]``.

    Args:
        base_layer: The frozen embedding (kept as ``base_layer``).
        config: Rank and scaling (dropout is not applied to embeddings, as in peft).

    Shapes:
        ``ids [...]`` (int) → ``[..., d]``.
    """

    def __init__(self, base_layer: nn.Embedding, config: LoraConfig):
        super().__init__()
        if not isinstance(base_layer, nn.Embedding):
            raise TypeError(f"base_layer must be an nn.Embedding, got "
                            f"{type(base_layer).__name__}")
        w = base_layer.weight
        V, d = base_layer.num_embeddings, base_layer.embedding_dim
        self.base_layer = base_layer
        self.r, self.scaling = config.r, config.scaling
        # peft's embedding start: A = 0, B ~ N(0, 1), so ΔE = 0 and A gets the first gradient
        self.lora_embedding_A = nn.Parameter(torch.zeros(config.r, V, device=w.device,
                                                         dtype=w.dtype))
        self.lora_embedding_B = nn.Parameter(torch.randn(d, config.r, device=w.device,
                                                         dtype=w.dtype))
        self.merged = False

    def delta_weight(self) -> Tensor:
        """``ΔE = s·(B·A)ᵀ`` ``[V, d]``."""
        return (self.lora_embedding_B @ self.lora_embedding_A).T * self.scaling

    def forward(self, ids: Tensor) -> Tensor:
        """``ids [...]`` → ``[..., d]``."""
        out = self.base_layer(ids)
        if self.merged:
            return out
        base = self.base_layer
        # row i of Aᵀ, then times Bᵀ: (s·(B A)ᵀ)[i] without forming the V×d table
        after_a = F.embedding(ids, self.lora_embedding_A.T, base.padding_idx, base.max_norm,
                              base.norm_type, base.scale_grad_by_freq, base.sparse)
        return out + (after_a @ self.lora_embedding_B.T) * self.scaling


LoraLayer = LoraLinear | LoraEmbedding


def _wrap(target: Target, config: LoraConfig) -> LoraLayer:
    if isinstance(target.module, nn.Embedding):
        return LoraEmbedding(target.module, config)
    return LoraLinear(target.module, config)


def lora_targets(model: nn.Module, config: LoraConfig) -> list[Target]:
    """The layers ``config`` selects in ``model`` (nothing is changed).

    Raises:
        ValueError: as :func:`mlatlas.peft.targets.find_targets`, or ``model`` already has
            LoRA layers.
    """
    if lora_layers(model):
        raise ValueError("model already has LoRA layers; unload_lora(model) before applying "
                         "another LoRA config")
    return find_targets(model, config.target_modules, (nn.Linear, nn.Embedding),
                        exclude_modules=config.exclude_modules,
                        skip_inside=(LoraLinear, LoraEmbedding))


def apply_lora(model: nn.Module, config: LoraConfig) -> list[str]:
    """Wrap the selected layers of ``model`` in place and freeze everything else.

    Afterwards only the LoRA factors (and the biases ``config.bias`` names) require grad, and
    ``model.lora_config`` holds ``config`` (read by
    :func:`mlatlas.peft.peft_format.save_adapter`).

    Args:
        model: Any module; our :class:`~mlatlas.llm.llama.Llama` is matched by its Hugging
            Face names (``model.layers.0.self_attn.q_proj``).
        config: A :class:`LoraConfig`.

    Returns:
        The public (peft) names of the adapted modules.

    Raises:
        TypeError: ``config`` is not a :class:`LoraConfig`.
        ValueError: a target that matches nothing (closest names given), a target of
            another type, or a model that already has LoRA.
    """
    if not isinstance(config, LoraConfig):
        raise TypeError(f"config must be a LoraConfig, got {type(config).__name__}")
    targets = lora_targets(model, config)
    for p in model.parameters():
        p.requires_grad_(False)
    for target in targets:
        layer = _wrap(target, config)
        set_submodule(model, target.name, layer)
        if config.bias == "lora_only" and getattr(target.module, "bias", None) is not None:
            target.module.bias.requires_grad_(True)
    if config.bias == "all":
        for name, p in model.named_parameters():
            if name.rsplit(".", 1)[-1] == "bias":
                p.requires_grad_(True)
    model.lora_config = config
    return [t.public_name for t in targets]


def lora_layers(model: nn.Module) -> dict[str, LoraLayer]:
    """Own module name → LoRA layer, for every LoRA layer of ``model``."""
    return {name: m for name, m in model.named_modules()
            if isinstance(m, (LoraLinear, LoraEmbedding))}


def _require_lora(model: nn.Module) -> dict[str, LoraLayer]:
    layers = lora_layers(model)
    if not layers:
        raise ValueError(f"model ({type(model).__name__}) has no LoRA layers; call "
                         "apply_lora(model, config) first")
    return layers


def merge_lora(model: nn.Module) -> None:
    """Fold every update into its base weight: ``W₀ ← W₀ + ΔW`` (outputs unchanged).

    Raises:
        ValueError: no LoRA layers, already merged, or a base weight shared with another
            module (tied embeddings: merging would change both).
    """
    layers = _require_lora(model)
    owners: dict[int, list[str]] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        w = getattr(module, "weight", None)
        if isinstance(w, nn.Parameter) and not name.endswith(("lora_A", "lora_B")):
            owners.setdefault(id(w), []).append(name)
    for name, layer in layers.items():
        if layer.merged:
            raise ValueError(f"LoRA layer {name!r} is already merged")
        shared = [n for n in owners[id(layer.base_layer.weight)] if n != f"{name}.base_layer"]
        if shared:
            raise ValueError(f"cannot merge LoRA into {name!r}: its base weight is shared with "
                             f"{shared} (tied weights); unload without merging instead")
    with torch.no_grad():
        for layer in layers.values():
            layer.base_layer.weight += layer.delta_weight().to(layer.base_layer.weight.dtype)
            layer.merged = True


def unmerge_lora(model: nn.Module) -> None:
    """Undo :func:`merge_lora`: ``W₀ ← W₀ − ΔW`` (up to float rounding).

    Raises:
        ValueError: no LoRA layers, or a layer that is not merged.
    """
    layers = _require_lora(model)
    for name, layer in layers.items():
        if not layer.merged:
            raise ValueError(f"LoRA layer {name!r} is not merged; nothing to unmerge")
    with torch.no_grad():
        for layer in layers.values():
            layer.base_layer.weight -= layer.delta_weight().to(layer.base_layer.weight.dtype)
            layer.merged = False


def unload_lora(model: nn.Module, merge: bool = True) -> None:
    """Put the base layers back (merged first when ``merge``); the model is plain again.

    With ``merge=True`` the result is a model with no LoRA and the fine-tuned weights (save it
    with :meth:`mlatlas.llm.llama.Llama.save_pretrained`); ``merge=False`` restores the base.
    Parameters keep their ``requires_grad`` flags.
    """
    layers = _require_lora(model)
    if merge and not all(layer.merged for layer in layers.values()):
        merge_lora(model)
    elif not merge and any(layer.merged for layer in layers.values()):
        unmerge_lora(model)
    for name, layer in layers.items():
        set_submodule(model, name, layer.base_layer)
    if "lora_config" in vars(model):
        del model.lora_config


def lora_config_of(model: nn.Module) -> LoraConfig:
    """The :class:`LoraConfig` :func:`apply_lora` stored on ``model``.

    Raises:
        ValueError: the model has no LoRA applied by :func:`apply_lora`.
    """
    config = getattr(model, "lora_config", None)
    if not isinstance(config, LoraConfig) or not lora_layers(model):
        raise ValueError(f"model ({type(model).__name__}) has no LoRA applied by apply_lora")
    return config
