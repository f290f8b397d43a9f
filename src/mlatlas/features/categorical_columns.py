"""Categorical feature columns: raw text or integers → ragged ids, TensorFlow-compatible.

A categorical column maps each example's values (any number of them) to integer ids in
``[0, num_buckets)``: as they are (identity), by position in a vocabulary list or file with
out-of-vocabulary hash buckets, by FarmHash bucket, or — for a crossed column — by hashing
the cartesian product of several features' values into one id space, the "wide" part of
Wide & Deep (Cheng et al. 2016, arXiv:1606.07792). Ids are consumed by indicator and
embedding columns (:mod:`mlatlas.features.feature_columns`). Semantics follow TensorFlow's
``tf.feature_column`` so that ids — and so trained weights — agree bit for bit.

==============  ==================================================================
notation        meaning
==============  ==================================================================
ids             a ragged batch: per example, a variable number of int64 ids
``V``           vocabulary size; ids ``>= V`` are out-of-vocabulary buckets
``fp(s)``       FarmHash Fingerprint64 (:mod:`mlatlas.features.fingerprint`)
ignore value    ``""`` (text) / ``-1`` (ints) cells of a dense input mean "missing"
``cat``         FingerprintCat64, chaining the hashes of one crossed tuple
==============  ==================================================================
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from mlatlas.features.example import FixedLenFeature, VarLenFeature
from mlatlas.features.fingerprint import DEFAULT_CROSS_KEY, cross_hash, fingerprint64
from mlatlas.features.ragged import Ragged, as_ragged

__all__ = [
    "CategoricalColumn", "CrossedColumn", "DenseColumn", "FeatureColumn", "HashedColumn",
    "IdentityColumn", "VocabularyColumn", "categorical_column_with_hash_bucket",
    "categorical_column_with_identity", "categorical_column_with_vocabulary_file",
    "categorical_column_with_vocabulary_list", "check_dtype", "crossed_column", "raw",
]


def check_dtype(dtype: Any, col: str, allowed: tuple[str, ...]) -> str:
    """Canonical dtype name (``"string"``, ``"int64"``, ``"float32"``) or a ValueError."""
    name = {"str": "string", "bytes": "string", "int": "int64", "float": "float32",
            "float64": "float32", "int32": "int64"}.get(str(dtype), str(dtype))
    if name not in allowed:
        raise ValueError(f"column {col!r}: dtype must be one of {allowed}, got {dtype!r}")
    return name


class FeatureColumn:
    """Base of every column: a ``name`` (TF's naming) and the raw features it parses."""

    name: str

    def parse_schema(self) -> dict[str, FixedLenFeature | VarLenFeature]:
        raise NotImplementedError


class DenseColumn(FeatureColumn):
    """A column with a fixed-width dense output of ``output_dim`` floats per example."""

    output_dim: int

    def dense(self, features: dict[str, Any], cache: dict) -> torch.Tensor:
        """``float32 [B, output_dim]`` (embedding columns are computed by FeatureLayer)."""
        raise NotImplementedError


class CategoricalColumn(FeatureColumn):
    """A column that maps raw values to ragged ids in ``[0, num_buckets)`` (-1 = dropped)."""

    num_buckets: int

    def ids(self, features: dict[str, Any], cache: dict) -> Ragged:
        """Ragged ``int64`` ids of a batch (memoised in ``cache``)."""
        if self not in cache:
            cache[self] = self._ids(features, cache)
        return cache[self]

    def _ids(self, features: dict[str, Any], cache: dict) -> Ragged:
        raise NotImplementedError


def raw(features: dict[str, Any], key: str, column: str) -> Any:
    """``features[key]``, or a ``ValueError`` naming the column that needs it."""
    if key not in features:
        raise ValueError(f"column {column!r} needs feature {key!r}, which is not in the input "
                         f"(got {sorted(features)})")
    return features[key]


def _check_kind(col: str, got: str, want: str) -> None:
    if got not in (want, "empty"):
        raise TypeError(f"column {col!r}: expected {want} input, got {got} values")


# ------------------------------------------------------------------------------ columns
@dataclass(frozen=True, eq=False)
class IdentityColumn(CategoricalColumn):
    """See :func:`categorical_column_with_identity`."""

    key: str
    num_buckets: int
    default_value: int | None = None

    @property
    def name(self) -> str:
        return self.key

    def parse_schema(self):
        return {self.key: VarLenFeature("int64")}

    def _ids(self, features, cache):
        r, kind = as_ragged(raw(features, self.key, self.name), self.name)
        _check_kind(self.name, kind, "int")
        v = r.values.astype(np.int64)
        bad = (v < 0) | (v >= self.num_buckets)
        if bad.any():
            if self.default_value is None:
                raise ValueError(f"column {self.name!r}: id {int(v[bad][0])} outside [0, "
                                 f"{self.num_buckets}) and no default_value")
            v = np.where(bad, self.default_value, v)
        return Ragged(v, r.splits)


@dataclass(frozen=True, eq=False)
class VocabularyColumn(CategoricalColumn):
    """See :func:`categorical_column_with_vocabulary_list` / ``..._file``."""

    key: str
    vocabulary: tuple
    dtype: str = "string"
    default_value: int = -1
    num_oov_buckets: int = 0
    vocabulary_file: str | None = None
    _table: dict = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self._table.update({v: i for i, v in enumerate(self.vocabulary)})

    @property
    def name(self) -> str:
        return self.key

    @property
    def num_buckets(self) -> int:
        return len(self.vocabulary) + self.num_oov_buckets

    def parse_schema(self):
        return {self.key: VarLenFeature("bytes" if self.dtype == "string" else "int64")}

    def _ids(self, features, cache):
        r, kind = as_ragged(raw(features, self.key, self.name), self.name)
        _check_kind(self.name, kind, "str" if self.dtype == "string" else "int")
        vals = r.values if kind == "str" else r.values.astype(np.int64).tolist()
        ids = np.fromiter((self._table.get(v, -1) for v in vals), np.int64, len(r.values))
        oov = ids < 0
        if oov.any():
            if self.num_oov_buckets:  # V + fp(value as text) mod oov
                text = [v if kind == "str" else str(v).encode() for v in np.asarray(
                    vals, dtype=object)[oov]]
                ids[oov] = len(self.vocabulary) + (
                    fingerprint64(text) % np.uint64(self.num_oov_buckets)).astype(np.int64)
            else:
                ids[oov] = self.default_value
        return Ragged(ids, r.splits)


@dataclass(frozen=True, eq=False)
class HashedColumn(CategoricalColumn):
    """See :func:`categorical_column_with_hash_bucket`."""

    key: str
    hash_bucket_size: int
    dtype: str = "string"

    @property
    def name(self) -> str:
        return self.key

    @property
    def num_buckets(self) -> int:
        return self.hash_bucket_size

    def parse_schema(self):
        return {self.key: VarLenFeature("bytes" if self.dtype == "string" else "int64")}

    def _ids(self, features, cache):
        r, kind = as_ragged(raw(features, self.key, self.name), self.name)
        _check_kind(self.name, kind, "str" if self.dtype == "string" else "int")
        text = r.values if kind == "str" else [str(int(v)).encode() for v in r.values]
        ids = fingerprint64(text) % np.uint64(self.hash_bucket_size)  # fp(s) mod n
        return Ragged(ids.astype(np.int64), r.splits)


@dataclass(frozen=True, eq=False)
class CrossedColumn(CategoricalColumn):
    """See :func:`crossed_column`."""

    keys: tuple
    hash_bucket_size: int
    hash_key: int | None = None

    def leaves(self) -> list[str | CategoricalColumn]:
        """The crossed features, nested crosses flattened (TF's leaf-level keys)."""
        out: list = []
        for k in self.keys:
            out.extend(k.leaves() if isinstance(k, CrossedColumn) else [k])
        return out

    @property
    def name(self) -> str:
        return "_X_".join(sorted(k if isinstance(k, str) else k.name for k in self.leaves()))

    @property
    def num_buckets(self) -> int:
        return self.hash_bucket_size

    def parse_schema(self):
        out: dict = {}
        for k in self.keys:
            out.update({k: VarLenFeature("bytes")} if isinstance(k, str) else k.parse_schema())
        return out

    def _ids(self, features, cache):
        parts = []  # (ragged, uint64 hash of each value)
        for leaf in self.leaves():
            if isinstance(leaf, str):  # a raw feature: every cell counts, none is ignored
                r, kind = as_ragged(raw(features, leaf, self.name), self.name,
                                    drop_ignore=False)
                if kind not in ("str", "int", "empty"):
                    raise TypeError(f"column {self.name!r}: crossed feature {leaf!r} must be "
                                    f"text or integers, got {kind} values")
                h = (fingerprint64(r.values) if kind == "str"
                     else r.values.astype(np.int64).view(np.uint64))
            else:
                r = leaf.ids(features, cache)
                h = r.values.astype(np.int64).view(np.uint64)  # ints enter as themselves
            parts.append((r, h))
        n = len(parts[0][0].splits) - 1
        if any(len(r.splits) - 1 != n for r, _ in parts):
            raise ValueError(f"column {self.name!r}: crossed features have different batch "
                             "sizes")
        counts = [np.diff(r.splits) for r, _ in parts]
        per_row = np.prod(np.stack(counts), axis=0)  # cartesian product size of each row
        splits = np.concatenate([[0], np.cumsum(per_row)]).astype(np.int64)
        row = np.repeat(np.arange(n), per_row)
        rest = np.arange(splits[-1]) - splits[:-1][row]  # position inside the row's product
        picked = [None] * len(parts)
        for i in range(len(parts) - 1, -1, -1):  # last feature varies fastest, as in TF
            c = counts[i][row]
            picked[i] = parts[i][1][parts[i][0].splits[:-1][row] + rest % np.maximum(c, 1)]
            rest = rest // np.maximum(c, 1)
        key = DEFAULT_CROSS_KEY if self.hash_key is None else self.hash_key
        return Ragged(cross_hash(picked, self.hash_bucket_size, key), splits)


# ------------------------------------------------------------------------------ constructors
def categorical_column_with_identity(key: str, num_buckets: int,
                                     default_value: int | None = None) -> IdentityColumn:
    """Integer ids used as they are; out-of-range ids become ``default_value`` (or raise)."""
    if num_buckets < 1:
        raise ValueError(f"column {key!r}: num_buckets must be >= 1, got {num_buckets}")
    if default_value is not None and not 0 <= default_value < num_buckets:
        raise ValueError(f"column {key!r}: default_value must be in [0, {num_buckets}), got "
                         f"{default_value}")
    return IdentityColumn(key, int(num_buckets), default_value)


def categorical_column_with_vocabulary_list(key: str, vocabulary_list: Sequence[Any],
                                            dtype: str | None = None, default_value: int = -1,
                                            num_oov_buckets: int = 0) -> VocabularyColumn:
    """Value → its position in ``vocabulary_list``; unknown values → ``default_value``
    (-1: dropped) or, with ``num_oov_buckets``, ``V + fp(value) mod num_oov_buckets``."""
    vocab = list(vocabulary_list or [])
    if not vocab:
        raise ValueError(f"column {key!r}: vocabulary_list must not be empty")
    is_text = all(isinstance(v, (str, bytes)) for v in vocab)
    if not is_text and not all(isinstance(v, (int, np.integer)) for v in vocab):
        raise TypeError(f"column {key!r}: vocabulary_list must hold only text or only ints")
    inferred = "string" if is_text else "int64"
    dtype = inferred if dtype is None else check_dtype(dtype, key, ("string", "int64"))
    if dtype != inferred:
        raise TypeError(f"column {key!r}: dtype {dtype} does not match the {inferred} "
                        "vocabulary")
    vocab = [v.encode() if isinstance(v, str) else (int(v) if not is_text else v)
             for v in vocab]
    if len(set(vocab)) != len(vocab):
        raise ValueError(f"column {key!r}: vocabulary_list has duplicate entries")
    return _vocab_column(key, vocab, dtype, default_value, num_oov_buckets, None)


def categorical_column_with_vocabulary_file(key: str, vocabulary_file: str | os.PathLike,
                                            vocabulary_size: int | None = None,
                                            num_oov_buckets: int = 0,
                                            default_value: int | None = None,
                                            dtype: str = "string") -> VocabularyColumn:
    """As the list version, the vocabulary being the lines of a text file (newline removed,
    nothing else stripped); ``vocabulary_size`` keeps the first lines."""
    dtype = check_dtype(dtype, key, ("string", "int64"))
    if not vocabulary_file or not os.path.isfile(vocabulary_file):
        raise FileNotFoundError(f"column {key!r}: vocabulary_file {vocabulary_file!r} does "
                                "not exist")
    with open(vocabulary_file, "rb") as f:
        lines = f.read().split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if vocabulary_size is not None:
        if not 1 <= vocabulary_size <= len(lines):
            raise ValueError(f"column {key!r}: vocabulary_size must be in [1, {len(lines)}] "
                             f"(lines of {vocabulary_file}), got {vocabulary_size}")
        lines = lines[:vocabulary_size]
    if dtype == "int64":
        try:
            lines = [int(x) for x in lines]
        except ValueError:
            raise ValueError(f"column {key!r}: vocabulary_file {vocabulary_file} has a line "
                             "that is not an integer") from None
    if not lines or len(set(lines)) != len(lines):
        raise ValueError(f"column {key!r}: vocabulary_file {vocabulary_file} is empty or has "
                         "duplicate lines")
    if num_oov_buckets and default_value is not None:
        raise ValueError(f"column {key!r}: give num_oov_buckets or default_value, not both")
    return _vocab_column(key, lines, dtype, -1 if default_value is None else default_value,
                         num_oov_buckets, str(vocabulary_file))


def _vocab_column(key, vocab, dtype, default_value, num_oov_buckets, path) -> VocabularyColumn:
    if num_oov_buckets < 0:
        raise ValueError(f"column {key!r}: num_oov_buckets must be >= 0, got {num_oov_buckets}")
    if num_oov_buckets and default_value != -1:
        raise ValueError(f"column {key!r}: give num_oov_buckets or default_value, not both")
    return VocabularyColumn(key, tuple(vocab), dtype, default_value, num_oov_buckets, path)


def categorical_column_with_hash_bucket(key: str, hash_bucket_size: int,
                                        dtype: str = "string") -> HashedColumn:
    """Value → ``fp(value) mod hash_bucket_size`` (ints hashed as their decimal text)."""
    if hash_bucket_size is None or hash_bucket_size < 1:
        raise ValueError(f"column {key!r}: hash_bucket_size must be >= 1, got "
                         f"{hash_bucket_size}")
    dtype = check_dtype(dtype, key, ("string", "int64"))
    return HashedColumn(key, int(hash_bucket_size), dtype)


def crossed_column(keys: Sequence[str | CategoricalColumn], hash_bucket_size: int,
                   hash_key: int | None = None) -> CrossedColumn:
    """Hashed cartesian product of ≥ 2 features (raw keys or categorical, non-hashed
    columns): ``cat``-chained fingerprints mod ``hash_bucket_size``."""
    keys = tuple(keys)
    label = "_X_".join(k if isinstance(k, str) else getattr(k, "name", "?") for k in keys)
    if hash_bucket_size is None or hash_bucket_size < 1:
        raise ValueError(f"column {label!r}: hash_bucket_size must be >= 1, got "
                         f"{hash_bucket_size}")
    if len(keys) < 2:
        raise ValueError(f"column {label!r}: crossed_column needs at least 2 keys, got "
                         f"{len(keys)}")
    for k in keys:
        if isinstance(k, HashedColumn) or not isinstance(k, (str, CategoricalColumn)):
            raise TypeError(f"column {label!r}: keys must be feature names or non-hashed "
                            f"categorical columns, got {k!r}")
    return CrossedColumn(keys, int(hash_bucket_size), hash_key)
