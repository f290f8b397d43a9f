"""Training checkpoints in safetensors: model, optimizer, step and RNG state.

Experiments that train write a checkpoint they can resume from, and a resumed run must end
at exactly the numbers of an uninterrupted one. That needs more than the weights: the
optimizer state (Adam moments, step counts), the step counter and every random generator the
loop draws from. All of it goes into one ``.safetensors`` file — tensors as tensors, the rest
as JSON in the file's metadata — so loading never unpickles anything.
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

__all__ = ["checkpoint_info", "load_checkpoint", "save_checkpoint"]

_FORMAT = "mlatlas-checkpoint-v1"


def save_checkpoint(path: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, step: int = 0,
                    generators: Mapping[str, torch.Generator] | None = None,
                    extra: Mapping[str, Any] | None = None) -> Path:
    """Save everything a training loop needs to resume bit-exactly.

    Args:
        path: Output ``.safetensors`` file (parents created).
        model: Its ``state_dict()`` is saved under ``model.<name>``.
        optimizer: Its tensor state is saved under ``optim.<param index>.<key>``; scalar
            state and ``param_groups`` go to the metadata.
        step: The number of completed training steps.
        generators: Named ``torch.Generator`` objects the loop draws from (data order,
            noise); the global torch, NumPy and Python generators are always saved.
        extra: JSON-serialisable values to keep (e.g. a running metric history).

    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors: dict[str, torch.Tensor] = {
        f"model.{k}": v.detach().contiguous().clone() for k, v in model.state_dict().items()
    }
    meta: dict[str, Any] = {"format": _FORMAT, "step": int(step), "extra": dict(extra or {})}
    if optimizer is not None:
        sd = optimizer.state_dict()
        scalars: dict[str, dict[str, Any]] = {}
        for idx, state in sd["state"].items():
            for key, value in state.items():
                if torch.is_tensor(value):
                    tensors[f"optim.{idx}.{key}"] = value.detach().contiguous().clone()
                else:
                    scalars.setdefault(str(idx), {})[key] = value
        meta["optim_scalars"] = scalars
        meta["optim_groups"] = sd["param_groups"]
    tensors["rng.torch"] = torch.get_rng_state()
    for name, gen in (generators or {}).items():
        tensors[f"rng.gen.{name}"] = gen.get_state()
    np_state = np.random.get_state()
    tensors["rng.numpy.keys"] = torch.from_numpy(np_state[1].astype(np.int64))
    meta["rng_numpy"] = [np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])]
    meta["rng_python"] = _py_state_to_json(random.getstate())
    save_file(tensors, str(path), metadata={"mlatlas": json.dumps(meta)})
    return path


def load_checkpoint(path: str | Path, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None,
                    generators: Mapping[str, torch.Generator] | None = None) -> dict[str, Any]:
    """Restore what :func:`save_checkpoint` wrote, in place.

    Args:
        path: A file written by :func:`save_checkpoint`.
        model: Receives the weights (strict: missing or unexpected keys raise).
        optimizer: Receives the optimizer state when given.
        generators: The same named generators that were saved.

    Returns:
        ``{"step": int, "extra": dict}``.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not an mlatlas checkpoint or lacks a requested part.
    """
    meta = _metadata(path)
    tensors = load_file(str(path))
    model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")},
                          strict=True)
    if optimizer is not None:
        if "optim_groups" not in meta:
            raise ValueError(f"{path} holds no optimizer state")
        state: dict[int, dict[str, Any]] = {}
        for key, value in tensors.items():
            if key.startswith("optim."):
                _, idx, name = key.split(".", 2)
                state.setdefault(int(idx), {})[name] = value
        for idx, scal in meta["optim_scalars"].items():
            state.setdefault(int(idx), {}).update(scal)
        optimizer.load_state_dict({"state": state, "param_groups": meta["optim_groups"]})
    torch.set_rng_state(tensors["rng.torch"])
    for name, gen in (generators or {}).items():
        key = f"rng.gen.{name}"
        if key not in tensors:
            raise ValueError(f"{path} holds no state for generator {name!r}")
        gen.set_state(tensors[key])
    kind, pos, has_gauss, cached = meta["rng_numpy"]
    np.random.set_state((kind, tensors["rng.numpy.keys"].numpy().astype(np.uint32), pos,
                         has_gauss, cached))
    random.setstate(_py_state_from_json(meta["rng_python"]))
    return {"step": int(meta["step"]), "extra": meta["extra"]}


def checkpoint_info(path: str | Path) -> dict[str, Any]:
    """``{"step": int, "extra": dict}`` of a checkpoint, read without loading any tensor.

    Lets a caller check that a checkpoint belongs to its run (e.g. a config tag kept in
    ``extra``) before :func:`load_checkpoint` touches the model.

    Raises:
        FileNotFoundError: if ``path`` does not exist.
        ValueError: if the file is not an mlatlas checkpoint.
    """
    meta = _metadata(path)
    return {"step": int(meta["step"]), "extra": meta["extra"]}


def _metadata(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        raw = (fh.metadata() or {}).get("mlatlas")
    if raw is None:
        raise ValueError(f"{path} is not an mlatlas checkpoint (no 'mlatlas' metadata)")
    meta = json.loads(raw)
    if meta.get("format") != _FORMAT:
        raise ValueError(f"{path}: expected format {_FORMAT!r}, got {meta.get('format')!r}")
    return meta


def _py_state_to_json(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _py_state_from_json(data: list) -> tuple:
    version, internal, gauss = data
    return (version, tuple(internal), gauss)
