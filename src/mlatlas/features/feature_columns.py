"""Feature columns: declarative raw-feature → model-input transforms, TensorFlow-compatible.

A feature column names a raw feature and says how it becomes numbers: numeric columns pass
values through (optionally normalised), bucketized columns cut them at boundaries,
categorical columns map strings or integers to ids (identity, vocabulary list or file with
out-of-vocabulary buckets, FarmHash buckets, hashed crosses of several features), and
indicator/embedding columns turn those ids into dense multi-hot counts or combined
embeddings. This is the input side of Wide & Deep (Cheng et al. 2016, arXiv:1606.07792) as
TensorFlow's ``tf.feature_column`` defines it; :class:`FeatureLayer` concatenates the dense
columns, sorted by name, like ``tf.compat.v1.feature_column.input_layer``. The categorical
columns live in :mod:`mlatlas.features.categorical_columns` and are re-exported here.

==============  ==================================================================
notation        meaning
==============  ==================================================================
``B``           batch size
ids             a ragged batch: per example, a variable number of int64 ids
``nb``          ``len(boundaries) + 1`` buckets per numeric element
``V``           vocabulary size; ids ``>= V`` are out-of-vocabulary buckets
``fp(s)``       FarmHash Fingerprint64 (:mod:`mlatlas.features.fingerprint`)
ignore value    ``""`` (text) / ``-1`` (ints) cells of a dense input mean "missing"
==============  ==================================================================
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mlatlas.features.categorical_columns import (
    CategoricalColumn,
    CrossedColumn,
    DenseColumn,
    FeatureColumn,
    HashedColumn,
    IdentityColumn,
    VocabularyColumn,
    categorical_column_with_hash_bucket,
    categorical_column_with_identity,
    categorical_column_with_vocabulary_file,
    categorical_column_with_vocabulary_list,
    check_dtype,
    crossed_column,
    raw,
)
from mlatlas.features.example import FixedLenFeature
from mlatlas.features.ragged import Ragged, numeric_tensor

__all__ = [
    "BucketizedColumn", "CategoricalColumn", "CrossedColumn", "DenseColumn", "EmbeddingColumn",
    "FeatureColumn", "FeatureLayer", "HashedColumn", "IdentityColumn", "IndicatorColumn", "NumericColumn",
    "VocabularyColumn", "bucketized_column", "categorical_column_with_hash_bucket",
    "categorical_column_with_identity", "categorical_column_with_vocabulary_file",
    "categorical_column_with_vocabulary_list", "crossed_column", "embedding_column",
    "indicator_column", "make_parse_schema", "numeric_column",
]

_COMBINERS = ("mean", "sum", "sqrtn")


# ------------------------------------------------------------------------------ columns
@dataclass(frozen=True, eq=False)
class NumericColumn(DenseColumn):
    """See :func:`numeric_column`."""

    key: str
    shape: tuple[int, ...] = (1,)
    default_value: Any = None
    dtype: str = "float32"
    normalizer_fn: Callable | None = None

    @property
    def name(self) -> str:
        return self.key

    @property
    def output_dim(self) -> int:
        return math.prod(self.shape)

    def parse_schema(self):
        return {self.key: FixedLenFeature(self.shape, self.dtype, self.default_value)}

    def dense(self, features, cache):
        if self not in cache:
            x = numeric_tensor(raw(features, self.key, self.name), self.name, self.shape,
                               self.default_value)
            if self.normalizer_fn is not None:
                x = self.normalizer_fn(x)  # normalise first, then cast (as TF)
            x = x.to(torch.float32)
            n = x.shape[0] if x.dim() else 0
            if x.dim() == 0 or x.numel() != n * self.output_dim:
                raise ValueError(f"column {self.name!r}: expected [B, *{self.shape}] values, "
                                 f"got shape {tuple(x.shape)}")
            cache[self] = x.reshape(n, self.output_dim)
        return cache[self]


@dataclass(frozen=True, eq=False)
class BucketizedColumn(DenseColumn, CategoricalColumn):
    """See :func:`bucketized_column`."""

    source_column: NumericColumn
    boundaries: tuple[float, ...]

    @property
    def name(self) -> str:
        return f"{self.source_column.name}_bucketized"

    @property
    def num_buckets(self) -> int:
        return (len(self.boundaries) + 1) * self.source_column.output_dim

    @property
    def output_dim(self) -> int:
        return self.num_buckets

    def parse_schema(self):
        return self.source_column.parse_schema()

    def bucket(self, x: torch.Tensor) -> torch.Tensor:
        """Bucket of each element of the ``float32`` tensor ``x``: ``#{boundaries <= x}``."""
        edges = torch.tensor(self.boundaries, dtype=torch.float32, device=x.device)
        return torch.bucketize(x, edges, right=True)  # b[i-1] <= x < b[i]  ->  i

    def dense(self, features, cache):
        b = self.bucket(self.source_column.dense(features, cache).detach())
        one_hot = torch.nn.functional.one_hot(b, len(self.boundaries) + 1)
        return one_hot.to(torch.float32).reshape(b.shape[0], self.output_dim)

    def _ids(self, features, cache):
        b = self.bucket(self.source_column.dense(features, cache).detach()).cpu()
        n, k = b.shape  # element j of the source lands in ids [j*nb, (j+1)*nb)
        offs = np.arange(k, dtype=np.int64) * (len(self.boundaries) + 1)
        return Ragged((b.numpy().astype(np.int64) + offs).reshape(-1),
                      np.arange(n + 1, dtype=np.int64) * k)


@dataclass(frozen=True, eq=False)
class IndicatorColumn(DenseColumn):
    """See :func:`indicator_column`."""

    categorical_column: CategoricalColumn

    @property
    def name(self) -> str:
        return f"{self.categorical_column.name}_indicator"

    @property
    def output_dim(self) -> int:
        return self.categorical_column.num_buckets

    def parse_schema(self):
        return self.categorical_column.parse_schema()

    def dense(self, features, cache):
        r = self.categorical_column.ids(features, cache)
        out = np.zeros((r.batch_size, self.output_dim), dtype=np.float32)
        ok = (r.values >= 0) & (r.values < self.output_dim)  # -1 (dropped) adds nothing
        np.add.at(out, (r.row_ids()[ok], r.values[ok]), 1.0)  # multi-hot counts
        return torch.from_numpy(out)


@dataclass(frozen=True, eq=False)
class EmbeddingColumn(DenseColumn):
    """See :func:`embedding_column`."""

    categorical_column: CategoricalColumn
    dimension: int
    combiner: str = "mean"
    initializer: Callable | None = None
    max_norm: float | None = None

    @property
    def name(self) -> str:
        return f"{self.categorical_column.name}_embedding"

    @property
    def output_dim(self) -> int:
        return self.dimension

    def parse_schema(self):
        return self.categorical_column.parse_schema()


# ------------------------------------------------------------------------------ constructors
def numeric_column(key: str, shape: int | Sequence[int] = (1,), default_value: Any = None,
                   dtype: str = "float32", normalizer_fn: Callable | None = None,
                   ) -> NumericColumn:
    """Real values of shape ``shape`` → ``[B, prod(shape)]`` floats.

    Args:
        key: Raw feature name.
        shape: Per-example shape.
        default_value: Fills missing values (``None`` entries of list input; absent
            features at parse time); ``None`` makes the feature required.
        dtype: ``"float32"`` or ``"int64"`` (the parse type; the output is float32).
        normalizer_fn: Applied to the input tensor before the cast to float32.
    """
    shape = (shape,) if isinstance(shape, int) else tuple(shape)
    if not shape or any(not isinstance(d, int) or d < 1 for d in shape):
        raise ValueError(f"column {key!r}: shape must be positive ints, got {shape}")
    if normalizer_fn is not None and not callable(normalizer_fn):
        raise TypeError(f"column {key!r}: normalizer_fn must be callable, got "
                        f"{type(normalizer_fn).__name__}")
    dtype = check_dtype(dtype, key, ("float32", "int64"))
    if default_value is not None:  # TF's form: a nested tuple of the column's shape
        try:
            full = np.broadcast_to(np.asarray(default_value, dtype=np.float64), shape)
        except (ValueError, TypeError):
            raise ValueError(f"column {key!r}: default_value {default_value!r} does not fit "
                             f"shape {shape}") from None
        if dtype == "int64" and not np.array_equal(full, np.round(full)):
            raise TypeError(f"column {key!r}: default_value must be integer for dtype int64")
        full = full.astype(np.int64 if dtype == "int64" else np.float64)
        default_value = _nested_tuple(full.tolist())
    return NumericColumn(key, shape, default_value, dtype, normalizer_fn)


def _nested_tuple(x: Any) -> Any:
    return tuple(_nested_tuple(v) for v in x) if isinstance(x, list) else x


def bucketized_column(source_column: NumericColumn, boundaries: Sequence[float],
                      ) -> BucketizedColumn:
    """Bucket a 1-D numeric column at strictly increasing ``boundaries``: dense one-hot
    ``[B, n * nb]``, or categorical ids ``j * nb + bucket_j`` for element ``j``."""
    if not isinstance(source_column, NumericColumn):
        raise TypeError(f"bucketized_column: source_column must be a numeric_column, got "
                        f"{type(source_column).__name__}")
    name = f"{source_column.name}_bucketized"
    if len(source_column.shape) != 1:
        raise ValueError(f"column {name!r}: source_column must be one-dimensional, got shape "
                         f"{source_column.shape}")
    b = tuple(float(x) for x in boundaries)
    if not b or any(b[i] >= b[i + 1] for i in range(len(b) - 1)):
        raise ValueError(f"column {name!r}: boundaries must be a non-empty, strictly "
                         f"increasing list, got {list(boundaries)}")
    return BucketizedColumn(source_column, b)


def indicator_column(categorical_column: CategoricalColumn) -> IndicatorColumn:
    """Multi-hot counts ``[B, num_buckets]`` of a categorical column (ids < 0 ignored)."""
    if not isinstance(categorical_column, CategoricalColumn):
        raise TypeError("indicator_column: categorical_column must be categorical, got "
                        f"{type(categorical_column).__name__}")
    return IndicatorColumn(categorical_column)


def embedding_column(categorical_column: CategoricalColumn, dimension: int,
                     combiner: str = "mean", initializer: Callable | None = None,
                     max_norm: float | None = None) -> EmbeddingColumn:
    """Combine the embeddings of an example's ids: ``[B, dimension]``.

    Args:
        categorical_column: The ids.
        dimension: Embedding width.
        combiner: ``"sum"``, ``"mean"`` (sum / n) or ``"sqrtn"`` (sum / sqrt(n)).
        initializer: ``f(tensor) -> None`` filling the ``[num_buckets, dimension]`` table in
            place; default truncated normal, std ``1/sqrt(dimension)`` (TF's default).
        max_norm: Clip each looked-up embedding to this L2 norm.
    """
    name = f"{getattr(categorical_column, 'name', '?')}_embedding"
    if not isinstance(categorical_column, CategoricalColumn):
        raise TypeError(f"column {name!r}: categorical_column must be categorical, got "
                        f"{type(categorical_column).__name__}")
    if dimension is None or dimension < 1:
        raise ValueError(f"column {name!r}: dimension must be >= 1, got {dimension}")
    if combiner not in _COMBINERS:
        raise ValueError(f"column {name!r}: combiner must be one of {_COMBINERS}, got "
                         f"{combiner!r}")
    if initializer is not None and not callable(initializer):
        raise TypeError(f"column {name!r}: initializer must be callable")
    return EmbeddingColumn(categorical_column, int(dimension), combiner, initializer, max_norm)


def make_parse_schema(columns: Sequence[FeatureColumn]) -> dict[str, Any]:
    """The decode schema (``tf.feature_column.make_parse_example_spec``) of ``columns``."""
    out: dict[str, Any] = {}
    for col in columns:
        if not isinstance(col, FeatureColumn):
            raise TypeError(f"make_parse_schema: expected feature columns, got {col!r}")
        for key, spec in col.parse_schema().items():
            if key in out and out[key] != spec:
                raise ValueError(f"feature {key!r} parsed two ways: {out[key]} vs {spec}")
            out[key] = spec
    return out


# ------------------------------------------------------------------------------ the layer
class FeatureLayer(nn.Module):
    """Raw feature dict → one dense ``float32 [B, output_dim]`` tensor.

    The dense columns (numeric, bucketized, indicator, embedding) are evaluated in order of
    their names and concatenated, as ``tf.compat.v1.feature_column.input_layer`` does; the
    only parameters are the embedding tables, ``embeddings[<column name>]`` of shape
    ``[num_buckets, dimension]`` (TF: ``input_layer/<column name>/embedding_weights``).

    Args:
        columns: Dense feature columns with distinct names.

    Inputs of ``forward``: ``{feature name: batch}``; a batch is a tensor/array ``[B, ...]``,
    a list of ``B`` per-example values (``None`` = missing; lists for variable length), or a
    :class:`~mlatlas.features.ragged.Ragged`. Extra features are ignored.
    """

    def __init__(self, columns: Sequence[DenseColumn]):
        super().__init__()
        cols = list(columns)
        if not cols:
            raise ValueError("columns must hold at least one dense feature column, got none")
        for c in cols:
            if not isinstance(c, DenseColumn):
                raise TypeError(f"column {getattr(c, 'name', c)!r}: FeatureLayer takes dense "
                                "columns; wrap a categorical column in indicator_column or "
                                "embedding_column")
        names = [c.name for c in cols]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"columns: duplicate column names {dup}")
        self.columns = sorted(cols, key=lambda c: c.name)  # TF's order: sorted by name
        self.embeddings = nn.ParameterDict()
        for c in self.columns:
            if isinstance(c, EmbeddingColumn):
                w = torch.empty(c.categorical_column.num_buckets, c.dimension)
                if c.initializer is None:  # TF default: truncated normal, std 1/sqrt(dim)
                    std = 1.0 / math.sqrt(c.dimension)
                    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)
                else:
                    c.initializer(w)
                self.embeddings[c.name] = nn.Parameter(w)

    @property
    def output_dim(self) -> int:
        """Width of the output: the sum of the columns' ``output_dim``."""
        return sum(c.output_dim for c in self.columns)

    def slices(self) -> dict[str, slice]:
        """Where each column's block sits in the output."""
        out, at = {}, 0
        for c in self.columns:
            out[c.name] = slice(at, at + c.output_dim)
            at += c.output_dim
        return out

    def prepare(self, features: dict[str, Any]) -> dict:
        """Everything but the embedding lookups (numeric tensors, ragged ids), for reuse:
        ``layer(layer.prepare(batch))`` equals ``layer(batch)``."""
        cache: dict = {_PREPARED: True}
        for c in self.columns:
            if isinstance(c, EmbeddingColumn):
                c.categorical_column.ids(features, cache)
            else:
                cache[("dense", c)] = c.dense(features, cache)
        return cache

    def forward(self, features: dict[str, Any]) -> torch.Tensor:
        """Raw batch (or :meth:`prepare`'s result) → ``float32 [B, output_dim]``.

        Raises:
            ValueError: a feature a column needs is absent; missing values without a
                default; ids out of range; columns disagreeing on ``B``.
            TypeError: a feature of the wrong kind for its column (text for a numeric
                column, ints for a text vocabulary …).
        """
        if not isinstance(features, dict):
            raise TypeError(f"features must be a dict name -> batch, got "
                            f"{type(features).__name__}")
        cache = features if features.get(_PREPARED) else {}
        raw_features = {} if cache is features else features
        outs = []
        for c in self.columns:
            if isinstance(c, EmbeddingColumn):
                out = self._embed(c, c.categorical_column.ids(raw_features, cache))
            else:
                out = cache.get(("dense", c))
                out = c.dense(raw_features, cache) if out is None else out
            outs.append(out)
        sizes = {c.name: o.shape[0] for c, o in zip(self.columns, outs)}
        if len(set(sizes.values())) > 1:
            raise ValueError(f"features: columns see different batch sizes {sizes}")
        device = next(iter(self.parameters()), outs[0]).device
        return torch.cat([o.to(device) for o in outs], dim=1)

    def _embed(self, c: EmbeddingColumn, r: Ragged) -> torch.Tensor:
        w = self.embeddings[c.name]
        keep = r.values >= 0  # ids < 0 (dropped / out of vocabulary) are pruned, as in TF
        ids = torch.from_numpy(r.values[keep]).to(w.device)
        rows = torch.from_numpy(r.row_ids()[keep]).to(w.device)
        if ids.numel() and int(ids.max()) >= w.shape[0]:
            raise ValueError(f"column {c.name!r}: id {int(ids.max())} >= num_buckets "
                             f"{w.shape[0]}")
        e = w.index_select(0, ids)
        if c.max_norm is not None:  # clip_by_norm: e * m / max(||e||, m)
            norm = e.norm(dim=1, keepdim=True)
            e = e * c.max_norm / torch.clamp(norm, min=c.max_norm)
        n = r.batch_size
        out = torch.zeros(n, c.dimension, dtype=w.dtype, device=w.device)
        out = out.index_add(0, rows, e)  # sum_i e_i over each example's ids
        count = torch.bincount(rows, minlength=n).clamp(min=1).to(w.dtype).unsqueeze(1)
        if c.combiner == "mean":
            out = out / count  # mean = sum / n
        elif c.combiner == "sqrtn":
            out = out / count.sqrt()  # sqrtn = sum / sqrt(n)
        return out


_PREPARED = "__mlatlas_prepared__"
