"""Gradient checkpointing: keep only segment inputs in the forward, recompute in the backward.

Backpropagation normally keeps every intermediate activation of the forward pass until the
backward pass consumes it, so activation memory grows linearly with depth. Chen, Xu, Zhang and
Guestrin (2016, "Training Deep Nets with Sublinear Memory Cost", arXiv:1604.06174) split the
``n`` layers into segments, keep only each segment's input during the forward pass and re-run
a segment's forward just before its backward. With segments of ``√n`` layers the memory is
``O(√n)`` (``√n`` stored inputs + one segment's activations while it is recomputed) for the
price of one extra forward pass.

Here the recompute is a ``torch.autograd.Function`` (:func:`checkpoint`) whose forward runs
the segment without building a graph and saves only its inputs, and whose backward replays the
segment — with the CPU/CUDA random state of the forward restored, so dropout draws the same
mask — and differentiates it. :func:`enable_checkpointing` installs it on
:class:`mlatlas.llm.llama.Llama` through ``model.layer_runner`` (a plain callable, so the state
dict is unchanged). The memory it saves is measured with :class:`mlatlas.measure.PeakMemory`
(the experiment ``mlatlas.experiments.llm.gradient_checkpointing``).

=======  ==========================================================
``n``    number of layers (blocks)
``k``    layers per segment (``every_k``); ``round(√n)`` for ``sqrt``
``s``    number of segments ``⌈n / k⌉``
``A``    activation bytes of one layer; ``|x|``: bytes of a layer input
=======  ==========================================================

Saved bytes: no checkpointing ``≈ n·A``; checkpointing ``≈ s·|x|`` during the forward pass,
``+ k·A`` while one segment is recomputed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["checkpoint", "checkpoint_sequential", "disable_checkpointing",
           "enable_checkpointing", "segment_sizes"]


class _Recompute(torch.autograd.Function):
    """``apply(fn, preserve_rng, n_args, kw_keys, n_params, *flat)`` with
    ``flat = (*args, *kwargs.values(), *params)``; returns ``fn(*args, **kwargs)``."""

    @staticmethod
    def forward(ctx: Any, fn: Callable[..., Tensor], preserve_rng: bool, n_args: int,
                kw_keys: tuple[str, ...], n_params: int, *flat: Any) -> Tensor:
        inputs = flat[:len(flat) - n_params]
        ctx.fn, ctx.n_args, ctx.kw_keys, ctx.n_params = fn, n_args, kw_keys, n_params
        ctx.preserve_rng = preserve_rng
        if preserve_rng:
            # the RNG state *before* the segment, so the replay draws the same dropout masks
            ctx.cpu_rng = torch.get_rng_state()
            ctx.cuda_devices = sorted({x.device.index or 0 for x in inputs
                                       if isinstance(x, Tensor) and x.is_cuda})
            ctx.cuda_rng = [torch.cuda.get_rng_state(d) for d in ctx.cuda_devices]
        # keep only the segment inputs (tensors via save_for_backward; the rest on ctx)
        ctx.tensor_pos = [i for i, x in enumerate(inputs) if isinstance(x, Tensor)]
        ctx.others = {i: x for i, x in enumerate(inputs) if not isinstance(x, Tensor)}
        ctx.save_for_backward(*(inputs[i] for i in ctx.tensor_pos))
        ctx.params = flat[len(flat) - n_params:]  # held by the module anyway: not activations
        # Function.forward runs under no_grad: the segment's activations are freed right away
        out = fn(*inputs[:n_args], **dict(zip(kw_keys, inputs[n_args:])))
        if not isinstance(out, Tensor):
            raise TypeError(f"a checkpointed segment must return one Tensor, got "
                            f"{type(out).__name__}")
        return out

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor) -> tuple[Tensor | None, ...]:
        saved = ctx.saved_tensors
        n_inputs = len(ctx.tensor_pos) + len(ctx.others)
        inputs: list[Any] = [None] * n_inputs
        for i, x in ctx.others.items():
            inputs[i] = x
        for i, x in zip(ctx.tensor_pos, saved):
            # a fresh leaf per input, so the replayed graph ends here
            inputs[i] = x.detach().requires_grad_(x.requires_grad)
        devices = ctx.cuda_devices if ctx.preserve_rng else []
        with torch.random.fork_rng(devices=devices, enabled=ctx.preserve_rng):
            if ctx.preserve_rng:
                torch.set_rng_state(ctx.cpu_rng)
                for d, state in zip(devices, ctx.cuda_rng):
                    torch.cuda.set_rng_state(state, d)
            with torch.enable_grad():  # replay the segment's forward, building its graph
                out = ctx.fn(*inputs[:ctx.n_args],
                             **dict(zip(ctx.kw_keys, inputs[ctx.n_args:])))
        wrt = [x for x in inputs if isinstance(x, Tensor) and x.requires_grad]
        wrt += [p for p in ctx.params if p.requires_grad]
        grads = iter(torch.autograd.grad(out, wrt, grad_out, allow_unused=True)
                     if wrt and out.requires_grad else [None] * len(wrt))
        result: list[Tensor | None] = [None] * 5  # fn, preserve_rng, n_args, kw_keys, n_params
        result += [next(grads) if isinstance(x, Tensor) and x.requires_grad else None
                   for x in inputs]
        result += [next(grads) if p.requires_grad else None for p in ctx.params]
        return tuple(result)


def checkpoint(fn: Callable[..., Tensor], *args: Any, params: Iterable[Tensor] | None = None,
               preserve_rng_state: bool = True, **kwargs: Any) -> Tensor:
    """Run ``fn(*args, **kwargs)`` keeping only its inputs for backward; recompute it there.

    Args:
        fn: The segment. An ``nn.Module`` (its parameters receive gradients), or any callable
            whose trainable tensors are passed as ``params``.
        *args: Positional inputs (tensors or other values).
        params: Tensors ``fn`` uses besides its inputs (default: ``fn.parameters()`` for a
            module, none otherwise). Tensors that are neither here nor in the inputs get no
            gradient through the checkpoint.
        preserve_rng_state: Restore the CPU (and CUDA) RNG state of the forward pass before
            the recomputation, so random ops (dropout) repeat exactly.
        **kwargs: Keyword inputs.

    Returns:
        ``fn``'s output (one Tensor), differentiable w.r.t. the inputs and ``params``.

    Raises:
        TypeError: if ``fn`` is not callable or returns something other than one Tensor.
    """
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {type(fn).__name__}")
    if params is None:
        params = fn.parameters() if isinstance(fn, nn.Module) else ()
    params = tuple(params)
    flat = (*args, *kwargs.values(), *params)
    needs_grad = torch.is_grad_enabled() and any(
        isinstance(x, Tensor) and x.requires_grad for x in flat)
    if not needs_grad:  # inference or frozen segment: nothing to save, run it plainly
        return fn(*args, **kwargs)
    return _Recompute.apply(fn, preserve_rng_state, len(args), tuple(kwargs), len(params),
                            *flat)


class _Segment:
    """Consecutive blocks run one after another: ``x = block(x, **kwargs)``."""

    def __init__(self, blocks: Sequence[Callable[..., Tensor]]):
        self.blocks = list(blocks)

    def __call__(self, x: Tensor, **kwargs: Any) -> Tensor:
        for block in self.blocks:
            x = block(x, **kwargs)
        return x

    def parameters(self) -> list[Tensor]:
        seen: dict[int, Tensor] = {}
        for block in self.blocks:
            if isinstance(block, nn.Module):
                for p in block.parameters():
                    seen.setdefault(id(p), p)  # shared weights once
        return list(seen.values())


def _split(n: int, segments: int) -> list[int]:
    base, extra = divmod(n, segments)  # sizes differ by at most one, larger ones first
    return [base + 1] * extra + [base] * (segments - extra)


def checkpoint_sequential(blocks: Sequence[Callable[..., Tensor]], segments: int, x: Tensor, *,
                          preserve_rng_state: bool = True, **kwargs: Any) -> Tensor:
    """Run ``blocks`` in order, as ``segments`` contiguous checkpointed segments.

    Args:
        blocks: ``nn.Sequential``/``nn.ModuleList``/list of callables
            ``block(x, **kwargs) -> x``.
        segments: Number of segments ``s`` in ``[1, len(blocks)]``; sizes differ by at most 1.
        x: Input of the first block ``[...]``.
        preserve_rng_state: See :func:`checkpoint`.
        **kwargs: Passed to every block (e.g. RoPE ``cos``/``sin``, masks).

    Returns:
        The last block's output.

    Raises:
        ValueError: if ``segments`` is not an int in ``[1, len(blocks)]``.
    """
    blocks = list(blocks)
    if (not isinstance(segments, int) or isinstance(segments, bool)
            or not 1 <= segments <= max(1, len(blocks))):
        raise ValueError(f"segments must be an int in [1, {len(blocks)}] (len(blocks)), "
                         f"got {segments!r}")
    start = 0
    for size in _split(len(blocks), segments):
        seg = _Segment(blocks[start:start + size])
        start += size
        x = checkpoint(seg, x, params=seg.parameters(), preserve_rng_state=preserve_rng_state,
                       **kwargs)
    return x


def segment_sizes(n: int, policy: str = "sqrt", k: int | None = None) -> list[int]:
    """Layers per segment for ``n`` layers.

    Args:
        n: Number of layers.
        policy: ``"every_k"`` (segments of ``k`` layers, the last may be shorter) or
            ``"sqrt"`` (``⌈n / round(√n)⌉`` segments of about ``√n`` layers, Chen et al. §3).
        k: Segment length for ``"every_k"`` (ignored by ``"sqrt"``).

    Returns:
        Segment sizes summing to ``n``.
    """
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"n must be a positive int, got {n!r}")
    if policy == "every_k":
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ValueError(f"k must be a positive int for policy 'every_k', got {k!r}")
        return [min(k, n - i) for i in range(0, n, k)]
    if policy == "sqrt":
        return _split(n, math.ceil(n / max(1, round(math.sqrt(n)))))
    raise ValueError(f"policy must be 'every_k' or 'sqrt', got {policy!r}")


class _CheckpointRunner:
    """``runner(layers, hidden, **layer_kwargs)``: the ``Llama.layer_runner`` hook."""

    def __init__(self, sizes: list[int], preserve_rng_state: bool):
        self.sizes = sizes
        self.preserve_rng_state = preserve_rng_state

    def __call__(self, layers: Sequence[nn.Module], hidden: Tensor, **kwargs: Any) -> Tensor:
        if sum(self.sizes) != len(layers):
            raise ValueError(f"checkpointing was enabled for {sum(self.sizes)} layers, the "
                             f"model now has {len(layers)}; call enable_checkpointing again")
        return checkpoint_sequential(layers, len(self.sizes), hidden,
                                     preserve_rng_state=self.preserve_rng_state, **kwargs)

    def __repr__(self) -> str:
        return f"CheckpointRunner(segment_sizes={self.sizes})"


def enable_checkpointing(model: nn.Module, policy: str = "sqrt", k: int | None = None, *,
                         preserve_rng_state: bool = True) -> list[int]:
    """Checkpoint ``model.layers`` in segments (for :class:`~mlatlas.llm.llama.Llama`).

    Sets ``model.layer_runner`` to a plain callable (not a module: the state dict does not
    change). Decoding with a KV cache and ``torch.no_grad()`` forwards run unchanged.

    Args:
        model: A model with a ``layers`` sequence and a ``layer_runner`` attribute.
        policy: ``"every_k"`` or ``"sqrt"``, see :func:`segment_sizes`.
        k: Layers per segment for ``"every_k"``.
        preserve_rng_state: See :func:`checkpoint`.

    Returns:
        The segment sizes.

    Raises:
        TypeError: if ``model`` has no ``layers``/``layer_runner``.
    """
    if not hasattr(model, "layer_runner") or not hasattr(model, "layers"):
        raise TypeError(f"model must have `layers` and a `layer_runner` hook (like Llama), got "
                        f"{type(model).__name__}")
    sizes = segment_sizes(len(model.layers), policy, k)
    model.layer_runner = _CheckpointRunner(sizes, preserve_rng_state)
    return sizes


def disable_checkpointing(model: nn.Module) -> None:
    """Undo :func:`enable_checkpointing`: plain loop over the layers again."""
    model.layer_runner = None
