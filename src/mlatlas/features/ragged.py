"""Raw feature batches for feature columns: ragged id lists and dense numeric tensors.

A batch of a raw feature arrives in whatever form the pipeline produced it: a dense tensor
or array ``[B]``/``[B, k]`` (TensorFlow's convention: ``""`` and ``-1`` cells mean
"missing" for categorical features), a list of ``B`` per-example values (``None``, a
scalar, or a list/array of any length — what ``collate_examples`` yields for variable-length
features), or a :class:`Ragged` batch. This module turns them into the two forms columns
compute on: flat values with row splits, and ``[B, ...]`` float tensors.

=============  ====================================================================
notation       meaning
=============  ====================================================================
``values``     all examples' values, concatenated (``int64``, ``float`` or ``bytes``)
``splits``     ``int64 [B + 1]``; example ``b`` owns ``values[splits[b]:splits[b+1]]``
kind           ``"str"`` | ``"int"`` | ``"float"`` | ``"empty"`` (no value at all)
=============  ====================================================================
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch

__all__ = ["Ragged", "as_ragged", "numeric_tensor"]


class Ragged(NamedTuple):
    """A batch of variable-length value lists: ``values`` and ``splits`` (``[B + 1]``)."""

    values: np.ndarray
    splits: np.ndarray

    @property
    def batch_size(self) -> int:
        return len(self.splits) - 1

    def row_ids(self) -> np.ndarray:
        """``int64 [len(values)]``: the example each value belongs to."""
        return np.repeat(np.arange(self.batch_size, dtype=np.int64), np.diff(self.splits))


def _kind(arr: np.ndarray, col: str) -> str:
    if arr.size == 0:
        return "empty"
    k = arr.dtype.kind
    if k == "b" or (k == "O" and any(isinstance(v, (bool, np.bool_)) for v in arr.flat)):
        raise TypeError(f"column {col!r}: boolean values are not supported; cast to int")
    if k in "iu":
        return "int"
    if k == "f":
        return "float"
    if k in "SU":
        return "str"
    if k == "O":
        if all(isinstance(v, (bytes, str)) for v in arr.flat):
            return "str"
        if all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in arr.flat):
            return "int"
        if all(isinstance(v, (int, float, np.integer, np.floating)) for v in arr.flat):
            return "float"
    raise TypeError(f"column {col!r}: expected text, integer or float values, got "
                    f"{arr.dtype} ({type(arr.flat[0]).__name__})")


def _normalise(values: np.ndarray, kind: str) -> np.ndarray:
    if kind == "str":
        if values.dtype == object and all(type(v) is bytes for v in values):
            return values.reshape(-1)
        out = np.empty(values.size, dtype=object)
        out[:] = [v.encode() if isinstance(v, str) else bytes(v) for v in values.flat]
        return out
    if kind == "int":
        return values.reshape(-1).astype(np.int64)
    if kind == "float":
        return values.reshape(-1).astype(np.float64)
    return np.zeros(0, dtype=np.int64)


def as_ragged(x: Any, col: str, drop_ignore: bool = True) -> tuple[Ragged, str]:
    """A raw categorical batch as ``(Ragged, kind)``; text becomes UTF-8 ``bytes``.

    Args:
        x: Dense ``[B]``/``[B, k]`` tensor or array, list of ``B`` per-example values, or
            :class:`Ragged`.
        col: Column name, for error messages.
        drop_ignore: Drop ``""``/``-1`` cells of dense input (TF's missing-value marker).

    Raises:
        TypeError: booleans, mixed or unsupported value types.
        ValueError: dense input of rank 0 or above 2.
    """
    if isinstance(x, Ragged):
        return x, _kind(np.asarray(x.values), col)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if isinstance(x, np.ndarray) and (x.dtype != object or x.ndim == 2):
        if x.ndim not in (1, 2):
            raise ValueError(f"column {col!r}: dense input must be [B] or [B, k], got shape "
                             f"{x.shape}")
        grid = x.reshape(len(x), -1)
        kind = _kind(grid, col)
        if drop_ignore and kind == "int":
            keep = grid != -1
        elif drop_ignore and kind == "str":
            keep = np.array([len(v) > 0 for v in grid.flat], dtype=bool).reshape(grid.shape)
        else:
            keep = np.ones(grid.shape, dtype=bool)
        splits = np.concatenate([[0], np.cumsum(keep.sum(1))]).astype(np.int64)
        return Ragged(_normalise(grid[keep], kind), splits), kind
    if not isinstance(x, (list, tuple, np.ndarray)):
        raise TypeError(f"column {col!r}: expected a tensor, array or list of per-example "
                        f"values, got {type(x).__name__}")
    if len(x) and all(isinstance(v, np.ndarray) for v in x):  # fast path: decoded VarLen
        rows = [v.reshape(-1) for v in x]
        splits = np.concatenate([[0], np.cumsum([r.size for r in rows])]).astype(np.int64)
        values = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        kind = _kind(values, col)
        return Ragged(_normalise(values, kind), splits), kind
    rows = []
    for v in x:
        if v is None:
            rows.append(np.zeros(0, dtype=np.int64))
        elif isinstance(v, torch.Tensor):
            rows.append(v.detach().cpu().numpy().reshape(-1))
        elif isinstance(v, (str, bytes)) or np.ndim(v) == 0:
            rows.append(np.array([v], dtype=object if isinstance(v, (str, bytes)) else None))
        else:
            rows.append(np.asarray(v, dtype=object if any(
                isinstance(e, (str, bytes)) for e in v) else None).reshape(-1))
    splits = np.concatenate([[0], np.cumsum([len(r) for r in rows])]).astype(np.int64)
    nonempty = [r for r in rows if r.size]
    if not nonempty:
        return Ragged(np.zeros(0, dtype=np.int64), splits), "empty"
    kinds = {_kind(r, col) for r in nonempty}
    if len(kinds) > 1:
        if kinds != {"int", "float"}:
            raise TypeError(f"column {col!r}: mixed value types {sorted(kinds)} in one batch")
        kinds = {"float"}
    kind = kinds.pop()
    values = np.concatenate([_normalise(r, kind) for r in nonempty])
    return Ragged(values, splits), kind


def numeric_tensor(x: Any, col: str, shape: tuple[int, ...], default: Any) -> torch.Tensor:
    """A raw numeric batch as a tensor ``[B, *...]`` (dtype kept; gradients kept).

    ``None`` entries of list input (missing values) take ``default`` (broadcast to
    ``shape``); without a default they raise ``ValueError`` naming the column.
    """
    if isinstance(x, np.ndarray) and x.dtype.kind in "SU":
        raise TypeError(f"column {col!r}: expected numbers, got text of dtype {x.dtype}")
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, np.ndarray) and x.dtype != object:
        t = torch.from_numpy(x)
    elif isinstance(x, (list, tuple, np.ndarray)):
        rows = []
        for i, v in enumerate(x):
            if v is None:
                if default is None:
                    raise ValueError(f"column {col!r}: example {i} is missing and the column "
                                     "has no default_value")
                v = np.broadcast_to(np.asarray(default, dtype=np.float64), shape)
            if isinstance(v, torch.Tensor):
                v = v.detach().cpu().numpy()
            if isinstance(v, (str, bytes)) or (isinstance(v, np.ndarray) and v.dtype.kind
                                               in "SUO"):
                raise TypeError(f"column {col!r}: expected numbers, got text {v!r}")
            rows.append(np.asarray(v, dtype=np.float64).reshape(-1))
        if len({r.size for r in rows}) > 1:
            raise ValueError(f"column {col!r}: examples have different numbers of values "
                             f"({sorted({r.size for r in rows})}); expected shape {shape}")
        t = torch.from_numpy(np.stack(rows) if rows else np.zeros((0, *shape)))
    else:
        raise TypeError(f"column {col!r}: expected a tensor, array or list, got "
                        f"{type(x).__name__}")
    if t.dtype == torch.bool or t.is_complex():
        raise TypeError(f"column {col!r}: expected int or float values, got {t.dtype}")
    if t.dim() == 0:
        raise ValueError(f"column {col!r}: input must have a batch dimension, got a scalar")
    return t
