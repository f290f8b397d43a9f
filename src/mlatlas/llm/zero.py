"""ZeRO: the memory of data-parallel training, and the strategies that shard it.

Data parallelism replicates the *model states* — parameters, gradients and optimizer state —
on every rank. With mixed-precision Adam a parameter costs 2 bytes (fp16 weight) + 2 (fp16
gradient) + K = 12 (fp32 master weight, momentum and variance): 16Ψ bytes for Ψ parameters,
120 GB for a 7.5B model, on *every* GPU. ZeRO (Rajbhandari, Rasley, Ruwase, He 2020, "ZeRO:
Memory Optimizations Toward Training Trillion Parameter Models", arXiv:1910.02054, §5 and
Fig. 1) partitions them over the ``N`` data-parallel ranks in three cumulative stages:
optimizer states (``P_os``, stage 1), + gradients (``P_os+g``, stage 2), + parameters
(``P_os+g+p``, stage 3), at the communication cost of a reduce-scatter and an all-gather.

Here: :func:`model_state_bytes` is the paper's per-rank memory model with the byte counts as
arguments (fp32 training with Adam is ``param_bytes=4, grad_bytes=4, optim_bytes=8``);
:func:`held_state_bytes` measures what a rank really holds (the storages of its parameters,
gradients and optimizer state); :func:`distribute` prepares a model for one strategy —
``ddp`` (stage 0, ``DistributedDataParallel``), ``zero1``/``zero2`` (our
:class:`~mlatlas.llm.zero_optimizer.ZeroOptimizer`) or ``fsdp2`` (stage 3, PyTorch's
``fully_shard``) — behind one training-loop interface, :class:`Distributed`.

=============  ==================================================================
``Ψ``          number of (trainable) parameters;  ``N`` data-parallel ranks
``p, g, K``    bytes per parameter of the weights, the gradients, the optimizer state
``M_s``        per-rank model-state bytes at stage ``s``
=============  ==================================================================

Memory model (paper Fig. 1, with ``p = g = 2``, ``K = 12``)::

    M_0 = (p + g + K) Ψ          M_1 = (p + g) Ψ + K Ψ / N
    M_2 = p Ψ + (g + K) Ψ / N    M_3 = (p + g + K) Ψ / N
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from mlatlas.llm.zero_optimizer import ZeroOptimizer

__all__ = ["STAGES", "STRATEGIES", "Distributed", "StateBytes", "distribute",
           "held_state_bytes", "model_state_bytes", "model_state_parts"]

#: The strategies of :func:`distribute` and their ZeRO stage.
STAGES: dict[str, int] = {"ddp": 0, "zero1": 1, "zero2": 2, "fsdp2": 3}
STRATEGIES: tuple[str, ...] = tuple(STAGES)


def _positive_int(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def model_state_parts(num_params: int, stage: int, world_size: int, *, param_bytes: float = 2,
                      grad_bytes: float = 2, optim_bytes: float = 12) -> dict[str, float]:
    """Per-rank bytes of parameters, gradients and optimizer state at a ZeRO stage.

    Args:
        num_params: ``Ψ``.
        stage: 0 (DDP), 1 (``P_os``), 2 (``P_os+g``) or 3 (``P_os+g+p``).
        world_size: ``N``.
        param_bytes: ``p``, bytes per parameter of the weights (2: fp16/bf16, 4: fp32).
        grad_bytes: ``g``, bytes per gradient element.
        optim_bytes: ``K``, bytes of optimizer state per parameter (12: mixed-precision Adam's
            fp32 master weight, momentum and variance; 8: fp32 Adam).

    Returns:
        ``{"params": …, "grads": …, "optimizer": …}`` in bytes (exact, not rounded: ``Ψ/N``
        need not be an integer).

    Raises:
        ValueError: a non-positive ``num_params``/``world_size``, a stage outside 0–3 or a
            negative byte count (each named).
    """
    _positive_int(num_params, "num_params")
    _positive_int(world_size, "world_size")
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise ValueError(f"stage must be 0, 1, 2 or 3, got {stage!r}")
    for name, v in (("param_bytes", param_bytes), ("grad_bytes", grad_bytes),
                    ("optim_bytes", optim_bytes)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v >= 0:
            raise ValueError(f"{name} must be a non-negative number, got {v!r}")
    psi, n = num_params, world_size
    return {"params": param_bytes * psi / (n if stage >= 3 else 1),  # p Ψ, or p Ψ / N
            "grads": grad_bytes * psi / (n if stage >= 2 else 1),  # g Ψ, or g Ψ / N
            "optimizer": optim_bytes * psi / (n if stage >= 1 else 1)}  # K Ψ, or K Ψ / N


def model_state_bytes(num_params: int, stage: int, world_size: int, *, param_bytes: float = 2,
                      grad_bytes: float = 2, optim_bytes: float = 12) -> float:
    """Per-rank model-state bytes ``M_stage`` (see :func:`model_state_parts`).

    Example: Ψ = 7.5·10⁹, N = 64 → 120 GB (stage 0), 31.4 GB (1), 16.6 GB (2), 1.9 GB (3),
    the paper's Fig. 1.
    """
    return sum(model_state_parts(num_params, stage, world_size, param_bytes=param_bytes,
                                 grad_bytes=grad_bytes, optim_bytes=optim_bytes).values())


@dataclass(frozen=True)
class StateBytes:
    """Bytes a rank holds in model states (each storage counted once, in this order).

    Attributes:
        params: Storages of the parameters (FSDP2: the local shards).
        grads: Storages of the gradients (DDP: its buckets; ZeRO-2: the reduced shards).
        optimizer: Storages of the optimizer state (moments, step counters).
    """

    params: int
    grads: int
    optimizer: int

    @property
    def total(self) -> int:
        """All model-state bytes."""
        return self.params + self.grads + self.optimizer


def _local(t: Tensor) -> Tensor:
    from torch.distributed.tensor import DTensor

    return t.to_local() if isinstance(t, DTensor) else t


def held_state_bytes(model: nn.Module, optimizer: Any) -> StateBytes:
    """Measure the model-state bytes this rank holds, from the tensors themselves.

    Every parameter of ``model`` and of ``optimizer.param_groups``, their ``.grad`` and every
    tensor of ``optimizer.state`` is reduced to its untyped storage (a ``DTensor`` to its
    local shard); each storage is counted once, in the category where it is met first
    (parameters, then gradients, then optimizer state), with its full size — a view into a
    flat buffer counts the buffer, padding included. Measure after ``optimizer.step()`` and
    before ``zero_grad()``, when all three exist.

    Args:
        model: The model (a DDP wrapper or FSDP2 module works too).
        optimizer: A ``torch.optim.Optimizer`` or :class:`ZeroOptimizer`.
    """
    seen: set[tuple[str, int]] = set()

    def count(tensors: Iterable[Tensor]) -> int:
        total = 0
        for t in tensors:
            if t is None or not torch.is_tensor(t):
                continue
            storage = _local(t).untyped_storage()
            key = (str(storage.device), storage.data_ptr())
            if storage.nbytes() == 0 or key in seen:
                continue
            seen.add(key)
            total += storage.nbytes()
        return total

    opt_params = [p for g in optimizer.param_groups for p in g["params"]]
    params = [*model.parameters(), *opt_params]
    params_b = count(params)
    grads_b = count(p.grad for p in params)
    optim_b = count(v for state in optimizer.state.values() for v in state.values())
    return StateBytes(params_b, grads_b, optim_b)


@dataclass
class Distributed:
    """A model and its optimizer prepared for one data-parallel strategy.

    The training loop is the same for every strategy::

        loss = loss_fn(d.model(x)); loss.backward()
        d.clip_grad_norm_(1.0); d.step(); d.zero_grad()

    Attributes:
        strategy: One of :data:`STRATEGIES`.
        model: What to call forward on (the DDP wrapper, or the module itself).
        module: The user's model (under FSDP2 its parameters are sharded ``DTensor``s).
        optimizer: A ``torch.optim.Optimizer`` (ddp, fsdp2) or :class:`ZeroOptimizer`.
        group: The process group.
        mesh: A 1-D ``DeviceMesh`` over ``group`` (sharded checkpoints).
    """

    strategy: str
    model: nn.Module
    module: nn.Module
    optimizer: Any
    group: dist.ProcessGroup
    mesh: Any

    @property
    def stage(self) -> int:
        """The ZeRO stage of :attr:`strategy`."""
        return STAGES[self.strategy]

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the averaged gradients to a global L2 norm; returns the norm before."""
        if isinstance(self.optimizer, ZeroOptimizer):
            return self.optimizer.clip_grad_norm_(max_norm)
        total = torch.nn.utils.clip_grad_norm_(
            [p for p in self.module.parameters() if p.grad is not None], max_norm)
        return float(total.full_tensor() if hasattr(total, "full_tensor") else total)

    def step(self) -> None:
        """One optimizer step (ZeRO: update the shards, all-gather the parameters)."""
        self.optimizer.step()

    def zero_grad(self) -> None:
        """Drop the gradients."""
        if isinstance(self.optimizer, ZeroOptimizer):
            self.optimizer.zero_grad()
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def state_bytes(self) -> StateBytes:
        """:func:`held_state_bytes` of this rank."""
        return held_state_bytes(self.module, self.optimizer)

    def full_state_dict(self) -> dict[str, Tensor]:
        """Every tensor of the model, full size, on every rank (collective under FSDP2)."""
        if self.strategy == "fsdp2":
            from torch.distributed.checkpoint.state_dict import (
                StateDictOptions,
                get_model_state_dict,
            )

            return get_model_state_dict(self.module,
                                        options=StateDictOptions(full_state_dict=True))
        return {k: v.detach() for k, v in self.module.state_dict().items()}

    def sharded_state_dict(self) -> dict[str, Any]:
        """``{"model": …, "optim": …}`` for ``torch.distributed.checkpoint`` save and load.

        Loading writes into these tensors in place; then call :meth:`load_sharded_state_dict`.
        DDP and FSDP2 use ``torch.distributed.checkpoint.state_dict`` (FSDP2's are DTensors);
        ZeRO-1/2 save the (replicated) model and the optimizer shards as 1-D DTensors
        (:meth:`ZeroOptimizer.sharded_state_dict`). Either way the checkpoint reloads on
        another world size.
        """
        if isinstance(self.optimizer, ZeroOptimizer):
            self.optimizer.init_state()
            return {"model": self.module.state_dict(),
                    "optim": self.optimizer.sharded_state_dict(self.mesh)}
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.module, self.optimizer)
        return {"model": model_sd, "optim": optim_sd}

    def load_sharded_state_dict(self, state: dict[str, Any]) -> None:
        """Apply a :meth:`sharded_state_dict` that ``dcp.load`` filled."""
        if isinstance(self.optimizer, ZeroOptimizer):
            return  # loaded in place: views of the parameters and of the optimizer state
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.module, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])


def distribute(model: nn.Module, make_optimizer: Callable[[nn.Module], torch.optim.Optimizer],
               strategy: str, *, group: dist.ProcessGroup | None = None,
               bucket_numel: int = 2**23) -> Distributed:
    """Prepare ``model`` for data-parallel training with one strategy.

    * ``ddp`` — ``DistributedDataParallel`` (gradients all-reduced into buckets that the
      ``.grad`` tensors view), then the optimizer as usual;
    * ``zero1`` / ``zero2`` — the optimizer wrapped in :class:`ZeroOptimizer` (stage 1 / 2);
    * ``fsdp2`` — ``torch.distributed.fsdp.fully_shard`` on every decoder layer and the root
      (stage 3), then the optimizer on the sharded parameters. When the model recomputes
      its layers (a ``layer_runner``, :mod:`mlatlas.llm.gradient_checkpointing`) only the
      root is sharded: the recompute takes the layer parameters as explicit inputs, so they
      must already be gathered when the layer stack starts (one FSDP unit keeps them so
      through forward and backward; at rest everything is still sharded).

    Args:
        model: A model on its device, identical on every rank.
        make_optimizer: Builds the optimizer for a module (e.g.
            ``lambda m: adamw_for(m, schedule)``); called after sharding.
        strategy: One of :data:`STRATEGIES`.
        group: The process group (default: the world).
        bucket_numel: ZeRO bucket size in elements.

    Raises:
        ValueError: an unknown strategy, or no initialised process group.
    """
    if strategy not in STAGES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if not dist.is_initialized():
        raise ValueError("distribute needs an initialised process group "
                         "(torch.distributed.init_process_group)")
    from torch.distributed.device_mesh import DeviceMesh

    group = group or dist.group.WORLD
    device = next(model.parameters()).device
    mesh = DeviceMesh.from_group(group, device.type)
    if strategy == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        ddp = DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            process_group=group, gradient_as_bucket_view=True)
        return Distributed(strategy, ddp, model, make_optimizer(model), group, mesh)
    if strategy in ("zero1", "zero2"):
        opt = ZeroOptimizer(make_optimizer(model), stage=STAGES[strategy], group=group,
                            bucket_numel=bucket_numel)
        return Distributed(strategy, model, model, opt, group, mesh)
    from torch.distributed.fsdp import fully_shard

    if getattr(model, "layer_runner", None) is None:
        for layer in getattr(model, "layers", ()):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return Distributed(strategy, model, model, make_optimizer(model), group, mesh)
