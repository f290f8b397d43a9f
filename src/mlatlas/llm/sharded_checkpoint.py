"""Sharded training checkpoints that resume on any world size (torch.distributed.checkpoint).

Under ZeRO-3/FSDP2 no rank holds the whole model, and under ZeRO-1/2 none holds the whole
optimizer state, so a checkpoint cannot be one file written by rank 0. Each rank writes its
own shards with ``torch.distributed.checkpoint`` (DCP) — every tensor is saved with the
global offsets of the part this rank holds (``DTensor`` shards; replicated tensors once) —
and loading reads, on each rank, the parts its *current* shards cover, so a run saved on
``N`` ranks resumes on ``M``. Next to the shards, ``meta.json`` (written by rank 0 once every
rank has finished) records the step and what the state belongs to: the model's config, the
LoRA config and the strategy. It is checked on every rank *before* any collective, so a
checkpoint of another model is refused with the same clear error everywhere, instead of
one rank failing inside a collective while the others wait.

Layout: ``<folder>/step-000120/`` holds ``.metadata``, ``__<rank>_0.distcp`` and
``meta.json``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from mlatlas.llm.zero import Distributed

__all__ = ["FORMAT", "check_compatible", "latest_checkpoint", "load_sharded", "read_meta",
           "save_sharded"]

FORMAT = "mlatlas-sharded-checkpoint-v1"
#: Strategies whose checkpoints share a layout (ZeRO-1 and -2 shard the same buckets).
_FAMILY = {"ddp": "ddp", "zero1": "zero", "zero2": "zero", "fsdp2": "fsdp2"}


def save_sharded(d: Distributed, folder: str | Path, step: int,
                 meta: dict[str, Any]) -> Path:
    """Write this rank's shards of model and optimizer to ``folder/step-<step>/``.

    Collective: every rank of ``d.group`` calls it.

    Args:
        d: The :class:`~mlatlas.llm.zero.Distributed` model.
        folder: Checkpoints folder, on a file system every rank sees.
        step: Completed optimizer steps.
        meta: JSON-ready description of the state (``model``, ``lora`` …; see
            :func:`check_compatible`) plus anything the run wants back (loss history).

    Returns:
        The checkpoint folder.
    """
    path = Path(folder) / f"step-{step:06d}"
    dcp.save(d.sharded_state_dict(), checkpoint_id=path, process_group=d.group)
    dist.barrier(group=d.group)
    if dist.get_rank(d.group) == 0:
        data = {**meta, "format": FORMAT, "step": int(step), "strategy": d.strategy,
                "world_size": dist.get_world_size(d.group)}
        tmp = path / "meta.json.tmp"
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, path / "meta.json")  # the checkpoint is complete once this exists
    dist.barrier(group=d.group)
    return path


def latest_checkpoint(folder: str | Path) -> Path | None:
    """The complete checkpoint (with ``meta.json``) of the highest step, or None."""
    done = sorted(p for p in Path(folder).glob("step-*") if (p / "meta.json").is_file())
    return done[-1] if done else None


def read_meta(path: str | Path) -> dict[str, Any]:
    """``meta.json`` of a checkpoint.

    Raises:
        FileNotFoundError: no complete checkpoint at ``path``.
        ValueError: not a checkpoint of this format.
    """
    file = Path(path) / "meta.json"
    if not file.is_file():
        raise FileNotFoundError(f"no complete checkpoint at {path} (meta.json is missing)")
    meta = json.loads(file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path}: expected a checkpoint of format {FORMAT!r}, got "
                         f"{meta.get('format')!r}")
    return meta


def check_compatible(meta: dict[str, Any], expected: dict[str, Any], strategy: str,
                     path: str | Path) -> None:
    """Refuse a checkpoint whose state does not fit this run, naming what differs.

    Args:
        meta: :func:`read_meta` of the checkpoint.
        expected: This run's ``{"model": config dict, "lora": …}`` (the keys compared).
        strategy: This run's strategy (its checkpoint layout must match: ZeRO-1 and -2 share
            one).
        path: For the message.

    Raises:
        ValueError: another checkpoint layout (strategy family), or another value of a key
            of ``expected`` (model config, LoRA config, ZeRO bucket size).
    """
    saved = meta.get("strategy")
    if _FAMILY.get(saved) != _FAMILY[strategy]:
        raise ValueError(f"checkpoint {path} was written by --strategy {saved}; its sharded "
                         f"state does not load into --strategy {strategy} (resume with "
                         f"--strategy {saved}, on any number of processes)")
    for key, ours in expected.items():
        theirs = meta.get(key)
        if theirs == ours:
            continue
        if isinstance(ours, dict) and isinstance(theirs, dict):
            diff = [f"{k}={theirs.get(k)!r} (checkpoint) vs {ours.get(k)!r} (this run)"
                    for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]
        else:
            diff = [f"{theirs!r} (checkpoint) vs {ours!r} (this run)"]
        raise ValueError(f"checkpoint {path} was written for another {key}: "
                         f"{'; '.join(diff)}")


def load_sharded(d: Distributed, path: str | Path) -> dict[str, Any]:
    """Load a :func:`save_sharded` checkpoint into ``d`` (any world size); returns its meta.

    Collective. Check :func:`check_compatible` first.
    """
    meta = read_meta(path)
    state = d.sharded_state_dict()
    dcp.load(state, checkpoint_id=Path(path), process_group=d.group)
    d.load_sharded_state_dict(state)
    return meta
