"""ZeRO stages 1 and 2: an optimizer whose state (and, at stage 2, gradients) is sharded.

Data-parallel training keeps a full copy of the optimizer state on every rank. ZeRO
(Rajbhandari, Rasley, Ruwase, He 2020, "ZeRO: Memory Optimizations Toward Training Trillion
Parameter Models", arXiv:1910.02054, §5) partitions it instead: rank ``r`` owns ``1/N`` of the
flattened parameters and keeps the optimizer state of that shard only (stage 1, ``P_os``).
After the backward pass the gradients are **reduce-scattered** — each rank receives the
average gradient of its own shard —, each rank updates its shard, and the updated shards are
**all-gathered** back into every rank's full parameters. Stage 2 (``P_os+g``) also drops the
gradients a rank does not own: they are reduce-scattered bucket by bucket *during* the
backward pass, as soon as a bucket's gradients are complete, and the full gradients freed.

Layout. The trainable parameters of each param group are packed, in reverse order (the order
gradients become ready), into buckets of at most ``bucket_numel`` elements; each bucket is one
flat tensor, zero-padded to a multiple of ``N`` (so any world size works), and every
parameter becomes a view into it. Rank ``r`` owns the contiguous slice ``[r·c, (r+1)·c)`` of
every bucket, ``c = ⌈n_b / N⌉`` — the chunking of ``torch.chunk`` and of a
``DTensor`` sharded on dim 0, which is how :meth:`ZeroOptimizer.sharded_state_dict` saves the
state, so a checkpoint reloads on another world size. The wrapped optimizer (AdamW …) runs
unchanged on the shards: its update is elementwise, so updating a shard equals updating the
same elements of the full parameters.

=============  ====================================================================
``Ψ``          trainable parameters (elements);  ``N`` world size, ``r`` rank
``n_b``        elements of bucket ``b``;  ``c_b = ⌈n_b / N⌉`` the shard length
``g_b^(i)``    rank ``i``'s local gradient of bucket ``b`` (flat, padded to ``N·c_b``)
``ḡ_b[r]``     ``1/N Σ_i g_b^(i)[r·c_b : (r+1)·c_b]`` — the reduce-scattered shard
=============  ====================================================================

Per rank this holds, with fp32 parameters and Adam: parameters ``4Ψ``, gradients ``4Ψ``
(stage 1) or ``4Ψ/N`` (stage 2), optimizer state ``8Ψ/N`` — see
:func:`mlatlas.llm.zero.model_state_bytes`.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["ELEMENTWISE_OPTIMIZERS", "ZeroOptimizer"]

# torch >= 2.10 names them *_single (the *_tensor names still work, with a FutureWarning)
_reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor
_all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

#: Optimizers whose update is elementwise, so that it can run on shards of a flat vector.
ELEMENTWISE_OPTIMIZERS: tuple[type[torch.optim.Optimizer], ...] = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW)


@dataclass
class _Bucket:
    """One flat bucket: its parameters, their offsets, the padded data and this rank's shard."""

    params: list[Tensor]
    offsets: list[int]
    numel: int  # n_b, unpadded
    shard_len: int  # c_b
    flat: Tensor  # [N · c_b] parameters; every param is a view into it
    shard: Tensor  # flat[r·c_b : (r+1)·c_b], what the wrapped optimizer updates
    grad: Tensor | None = None  # stage 1: [N · c_b] local gradients (param .grad are views)
    grad_shard: Tensor | None = None  # stage 2: [c_b] reduced gradient shard
    pending: Tensor | None = None  # stage 2: [N · c_b] gradients collected during backward
    ready: set[int] = field(default_factory=set)  # stage 2: params whose grad arrived


class ZeroOptimizer:
    """Shard a data-parallel optimizer's state (stage 1) and gradients (stage 2) over ranks.

    Wraps a freshly built optimizer: its param groups (with their hyper-parameters) are
    flattened into buckets and sharded, and its class runs on this rank's shards. Call
    ``loss.backward()``, then :meth:`clip_grad_norm_` (optional), :meth:`step` and
    :meth:`zero_grad` — the same loop as a local optimizer, with the model *not* wrapped in
    DDP (the gradient averaging happens here). ``param_groups`` are the wrapped optimizer's,
    so a learning-rate schedule sets ``group["lr"]`` as usual.

    Args:
        optimizer: An optimizer of a class in :data:`ELEMENTWISE_OPTIMIZERS` that has not
            stepped yet; every parameter it holds must require grad, be dense and live on one
            device. Its parameters' storage is replaced by views into the flat buckets.
        stage: 1 (optimizer state sharded) or 2 (gradients too).
        group: The process group (default: the world).
        bucket_numel: Largest bucket in elements (a parameter larger than this gets a bucket
            of its own).

    Raises:
        TypeError: an optimizer that is not elementwise, or not an optimizer.
        ValueError: ``stage`` not 1 or 2, an optimizer that already has state, a frozen or
            sparse parameter, a non-positive ``bucket_numel``, or no process group.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, *, stage: int = 1,
                 group: dist.ProcessGroup | None = None, bucket_numel: int = 2**23):
        if not isinstance(optimizer, ELEMENTWISE_OPTIMIZERS):
            raise TypeError(f"optimizer must be one of "
                            f"{[c.__name__ for c in ELEMENTWISE_OPTIMIZERS]} (an elementwise "
                            f"update), got {type(optimizer).__name__}")
        if stage not in (1, 2):
            raise ValueError(f"stage must be 1 or 2 (stage 3 is FSDP2's fully_shard), got "
                             f"{stage!r}")
        if optimizer.state:
            raise ValueError("optimizer must not have stepped yet (it already holds state)")
        if isinstance(bucket_numel, bool) or not isinstance(bucket_numel, int) or \
                bucket_numel < 1:
            raise ValueError(f"bucket_numel must be a positive int, got {bucket_numel!r}")
        if not dist.is_initialized():
            raise ValueError("ZeroOptimizer needs an initialised process group "
                             "(torch.distributed.init_process_group)")
        self.stage, self.group = stage, group or dist.group.WORLD
        self.world, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self._inplace_gather = dist.get_backend(self.group) == "nccl"
        self.buckets: list[list[_Bucket]] = []  # per param group
        inner_groups = []
        for g in optimizer.param_groups:
            buckets = self._build_buckets(g["params"], bucket_numel)
            self.buckets.append(buckets)
            inner_groups.append({**{k: v for k, v in g.items() if k != "params"},
                                 "params": [b.shard for b in buckets]})
        # the wrapped class, same hyper-parameters, on this rank's shards
        self.optimizer = type(optimizer)(inner_groups)  # groups carry every option
        self._hooks = []
        self._reduced = False
        self._next = 0  # stage 2: next bucket to reduce, in a fixed order on every rank
        self._callback_queued = False
        if stage == 2:
            # the hooks hold the optimizer weakly: a cycle parameter → hook → optimizer would
            # keep it and its process group alive past destroy_process_group, until a garbage
            # collection that may come only at interpreter exit (where gloo aborts)
            owner = weakref.ref(self)
            for buckets in self.buckets:
                for b in buckets:
                    for i, p in enumerate(b.params):
                        self._hooks.append(p.register_post_accumulate_grad_hook(
                            _grad_ready_hook(owner, b, i)))
            weakref.finalize(self, _remove, self._hooks)  # optimizer dropped → hooks removed
        self.zero_grad()

    # ---------------------------------------------------------------------------- layout
    def _build_buckets(self, params: list[Tensor], bucket_numel: int) -> list[_Bucket]:
        for p in params:
            if not p.requires_grad or p.is_sparse:
                raise ValueError(f"every parameter must require grad and be dense, got one of "
                                 f"shape {tuple(p.shape)} with requires_grad={p.requires_grad}")
        groups: list[list[Tensor]] = []
        size = 0
        for p in reversed(params):  # gradients become ready roughly in reverse order
            if (not groups or size + p.numel() > bucket_numel
                    or (p.dtype, p.device) != (groups[-1][0].dtype, groups[-1][0].device)):
                groups.append([])
                size = 0
            groups[-1].append(p)
            size += p.numel()
        return [self._make_bucket(ps) for ps in groups]

    def _make_bucket(self, params: list[Tensor]) -> _Bucket:
        offsets = [0]
        for p in params:
            offsets.append(offsets[-1] + p.numel())
        numel = offsets.pop()
        c = math.ceil(numel / self.world)  # c_b = ⌈n_b / N⌉: zero padding to N·c_b
        ref = params[0]
        flat = torch.zeros(self.world * c, dtype=ref.dtype, device=ref.device)
        with torch.no_grad():
            for p, off in zip(params, offsets):
                flat[off:off + p.numel()].copy_(p.detach().reshape(-1))
                p.data = flat[off:off + p.numel()].view_as(p)  # the param is a view now
        # every rank starts from group rank 0's values, as DDP does
        dist.broadcast(flat, src=dist.get_global_rank(self.group, 0), group=self.group)
        b = _Bucket(params, offsets, numel, c, flat, flat[self.rank * c:(self.rank + 1) * c])
        if self.stage == 1:
            b.grad = torch.zeros_like(flat)
        else:
            b.grad_shard = torch.zeros(c, dtype=ref.dtype, device=ref.device)
        return b

    def _all_buckets(self) -> Iterator[_Bucket]:
        for buckets in self.buckets:
            yield from buckets

    # ---------------------------------------------------------------------------- gradients
    def _order(self) -> list[_Bucket]:
        return list(self._all_buckets())

    def _reduce_ready(self, force: bool = False) -> None:
        order = self._order()
        while self._next < len(order):
            b = order[self._next]
            if not force and len(b.ready) < len(b.params):
                return  # buckets are reduced in one fixed order, the same on every rank
            if b.pending is None:
                b.pending = torch.zeros_like(b.flat)
            # ḡ_b[r] = 1/N Σ_i g_b^(i)[r·c_b:(r+1)·c_b], added to the kept shard
            b.grad_shard.add_(self._reduce_scatter(b.pending))
            b.pending = None
            b.ready.clear()
            self._next += 1

    def _flush(self) -> None:
        self._reduce_ready(force=True)
        self._next = 0
        self._callback_queued = False

    def _reduce_scatter(self, flat: Tensor) -> Tensor:
        out = torch.empty(flat.numel() // self.world, dtype=flat.dtype, device=flat.device)
        _reduce_scatter(out, flat, op=dist.ReduceOp.AVG, group=self.group)
        return out

    def reduce_gradients(self) -> None:
        """Average this rank's gradient shards over the ranks (done once per step).

        Stage 1 reduce-scatters the full local gradients now; stage 2 did it during the
        backward pass. :meth:`clip_grad_norm_` and :meth:`step` call this themselves.
        """
        if self._reduced:
            return
        for b in self._all_buckets():
            if self.stage == 1:
                for p, off in zip(b.params, b.offsets):  # re-attach a .grad autograd replaced
                    view = b.grad[off:off + p.numel()].view_as(p)
                    if p.grad is not None and p.grad.data_ptr() != view.data_ptr():
                        view.add_(p.grad)
                    p.grad = view
                c = b.shard_len
                b.grad[self.rank * c:(self.rank + 1) * c].copy_(self._reduce_scatter(b.grad))
                b.shard.grad = b.grad[self.rank * c:(self.rank + 1) * c]
            else:
                b.shard.grad = b.grad_shard
        self._reduced = True

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Scale the reduced gradients so that their global L2 norm is at most ``max_norm``.

        ``‖g‖ = √(Σ_r Σ_b ‖ḡ_b[r]‖²)`` (all-reduced; padding is zero), then ``g ← g · min(1,
        max_norm / (‖g‖ + 10⁻⁶))`` as ``torch.nn.utils.clip_grad_norm_``.

        Returns:
            The total norm before clipping.
        """
        self.reduce_gradients()
        grads = [b.shard.grad for b in self._all_buckets()]
        sq = torch.zeros((), dtype=torch.float32, device=grads[0].device)
        for g in grads:
            sq += g.float().pow(2).sum()
        dist.all_reduce(sq, group=self.group)
        total = sq.sqrt()
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        for g in grads:
            g.mul_(coef.to(g.dtype))
        return float(total)

    # ---------------------------------------------------------------------------- step
    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimizer's param groups (their ``params`` are this rank's shards)."""
        return self.optimizer.param_groups

    @property
    def state(self) -> dict[Tensor, dict[str, Any]]:
        """The wrapped optimizer's state: this rank's shard only."""
        return self.optimizer.state

    @torch.no_grad()
    def step(self) -> None:
        """Update this rank's shards, then all-gather them into every rank's parameters."""
        self.reduce_gradients()
        self.optimizer.step()
        for b in self._all_buckets():
            src = b.shard if self._inplace_gather else b.shard.clone()
            _all_gather(b.flat, src, group=self.group)

    def zero_grad(self) -> None:
        """Zero the gradients (stage 1: the flat buffers the params' ``.grad`` view)."""
        for b in self._all_buckets():
            b.shard.grad = None
            if self.stage == 1:
                b.grad.zero_()
                for p, off in zip(b.params, b.offsets):
                    p.grad = b.grad[off:off + p.numel()].view_as(p)
            else:
                b.grad_shard.zero_()
                for p in b.params:
                    p.grad = None
        self._reduced = False

    # ---------------------------------------------------------------------------- checkpoint
    def sharded_state_dict(self, mesh: Any) -> dict[str, Any]:
        """The optimizer state as 1-D ``DTensor`` shards, for ``torch.distributed.checkpoint``.

        The tensors are views of the state itself: ``dcp.save`` reads them and ``dcp.load``
        writes into them in place (call :meth:`init_state` first on a fresh optimizer).

        Key ``"<group>.<bucket>.<name>"``; a tensor of the shard's length becomes a ``DTensor``
        of global shape ``[n_b]`` (padding dropped) sharded on dim 0 over ``mesh`` — the same
        chunking on any world size, so the checkpoint reloads on another one; scalars
        (``step``) are saved as they are (equal on every rank).

        Args:
            mesh: A 1-D ``DeviceMesh`` over this optimizer's process group.
        """
        from torch.distributed.tensor import DTensor, Shard

        out: dict[str, Any] = {}
        for gi, buckets in enumerate(self.buckets):
            for bi, b in enumerate(buckets):
                n = max(0, min(b.shard_len, b.numel - self.rank * b.shard_len))
                for name, value in self.optimizer.state.get(b.shard, {}).items():
                    key = f"{gi}.{bi}.{name}"
                    if torch.is_tensor(value) and value.dim() == 1 and \
                            value.numel() == b.shard_len:
                        out[key] = DTensor.from_local(value[:n], mesh, [Shard(0)],
                                                      run_check=False, shape=(b.numel,),
                                                      stride=(1,))
                    else:
                        out[key] = value
        return out

    @torch.no_grad()
    def init_state(self) -> None:
        """Create the wrapped optimizer's state (zeros) before loading a checkpoint into it.

        One step of the wrapped optimizer with zero gradients and a learning rate of 0 makes
        every state tensor exist with its shape and dtype (what
        ``torch.distributed.checkpoint.state_dict`` does for local optimizers); the loaded
        values then overwrite all of it. No-op when the state exists.
        """
        shards = [b.shard for b in self._all_buckets() if b.shard not in self.optimizer.state]
        if not shards:
            return
        lrs = [g["lr"] for g in self.optimizer.param_groups]
        for g in self.optimizer.param_groups:
            g["lr"] = 0.0
        for s in shards:
            s.grad = torch.zeros_like(s)
        saved = [s.detach().clone() for s in shards]
        self.optimizer.step()
        for s, before in zip(shards, saved):
            s.copy_(before)  # AdamW's decay θ(1 − 0·λ) is exact, but be certain
            s.grad = None
        for g, lr in zip(self.optimizer.param_groups, lrs):
            g["lr"] = lr

    def remove_hooks(self) -> None:
        """Remove the stage-2 gradient hooks from the parameters."""
        _remove(self._hooks)


def _grad_ready_hook(owner: weakref.ref[ZeroOptimizer], bucket: _Bucket, index: int):
    """Stage 2's hook on parameter ``index`` of ``bucket``: it runs when ``p.grad`` has been
    accumulated (the hooks are removed when the optimizer dies, so ``owner()`` is alive)."""
    def hook(p: Tensor) -> None:
        zero = owner()
        if bucket.pending is None:
            bucket.pending = torch.zeros_like(bucket.flat)
        off = bucket.offsets[index]
        bucket.pending[off:off + p.numel()].add_(p.grad.reshape(-1))
        p.grad = None  # the full gradient is not kept (P_os+g)
        bucket.ready.add(index)
        if not zero._callback_queued:  # flush buckets with unused parameters at the end
            zero._callback_queued = True
            torch.autograd.Variable._execution_engine.queue_callback(zero._flush)
        zero._reduce_ready()
    return hook


def _remove(hooks: list[torch.utils.hooks.RemovableHandle]) -> None:
    for h in hooks:
        h.remove()
    hooks.clear()
