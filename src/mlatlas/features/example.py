"""``tf.train.Example`` and ``SequenceExample`` to and from numpy/torch, without TensorFlow.

An Example is a map from feature name to one of three flat lists — ``bytes``, ``float32`` or
``int64`` — serialized as a protocol buffer; it is what TFRecord files usually hold. A
SequenceExample adds per-step lists (``FeatureLists``) next to per-record context features.
Encoding infers the list kind from the value; decoding either returns what is there, or
checks it against a schema of :class:`FixedLenFeature`/:class:`VarLenFeature` specs with
the semantics of ``tf.io.parse_single_example``. Format of TensorFlow (Abadi et al. 2016,
arXiv:1603.04467), ``core/example/{example,feature}.proto``; the messages are restated in
:mod:`mlatlas.features.proto`.

==================  =================================================================
notation            meaning
==================  =================================================================
kind                ``bytes`` | ``float32`` | ``int64``: the list type of a feature
FixedLenFeature     exactly ``prod(shape)`` values, reshaped; ``default_value`` if absent
VarLenFeature       any number of values, returned flat (1-D)
schema              ``{name: FixedLenFeature | VarLenFeature}``
==================  =================================================================
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from google.protobuf.message import DecodeError

from mlatlas.features.proto import example_pb2, feature_pb2

__all__ = [
    "ExampleDecodeError",
    "FixedLenFeature",
    "Schema",
    "VarLenFeature",
    "decode_example",
    "decode_sequence_example",
    "encode_example",
    "encode_sequence_example",
]

_KINDS = {"int64": "int64_list", "float32": "float_list", "bytes": "bytes_list"}
_ALIASES = {"int64": "int64", "int": "int64", "float32": "float32", "float": "float32",
            "bytes": "bytes", "string": "bytes", "str": "bytes"}
_NP = {"int64": np.int64, "float32": np.float32, "bytes": object}


def _kind(dtype: Any, what: str) -> str:
    key = getattr(dtype, "name", dtype)  # accepts np.dtype / torch dtype names too
    key = str(key).replace("torch.", "")
    if key not in _ALIASES:
        raise ValueError(f"{what}: dtype must be one of 'int64', 'float32', 'bytes', got "
                         f"{dtype!r}")
    return _ALIASES[key]


@dataclass(frozen=True)
class FixedLenFeature:
    """A feature with exactly ``prod(shape)`` values, like ``tf.io.FixedLenFeature``.

    Args:
        shape: Shape of the decoded value (``()`` for a scalar).
        dtype: ``"int64"``, ``"float32"`` or ``"bytes"``.
        default_value: Used when the feature is absent (a scalar is broadcast); ``None``
            makes the feature required.
    """

    shape: tuple[int, ...] = ()
    dtype: str = "float32"
    default_value: Any = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))
        object.__setattr__(self, "dtype", _kind(self.dtype, "FixedLenFeature"))
        if any(d < 0 for d in self.shape):
            raise ValueError(f"FixedLenFeature: shape must be non-negative, got {self.shape}")


@dataclass(frozen=True)
class VarLenFeature:
    """A feature with any number of values, decoded flat, like ``tf.io.VarLenFeature``."""

    dtype: str = "float32"

    def __post_init__(self) -> None:
        object.__setattr__(self, "dtype", _kind(self.dtype, "VarLenFeature"))


Schema = Mapping[str, FixedLenFeature | VarLenFeature]


class ExampleDecodeError(ValueError):
    """Bytes that are not a valid Example, or an Example that does not fit the schema."""


# ------------------------------------------------------------------------------ encoding
def _values(name: str, value: Any) -> tuple[str, Any]:
    """(kind, flat values) of one feature value; numpy, torch, lists and scalars accepted."""
    t = type(value)  # fast paths for plain Python scalars
    if t is int:
        if not -(2**63) <= value < 2**63:
            raise ValueError(f"feature {name!r}: {value} is outside the int64 range")
        return "int64", [value]
    if t is float:
        return "float32", [value]
    if t is str:
        return "bytes", [value.encode()]
    if t is bytes:
        return "bytes", [value]
    if hasattr(value, "detach") and hasattr(value, "numpy"):  # torch.Tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, (bytes, str)):
        value = [value]
    arr = value if isinstance(value, np.ndarray) else None
    if arr is None:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if not items:
            raise ValueError(f"feature {name!r}: cannot infer the kind of an empty list; pass "
                             "a typed numpy array (e.g. np.zeros(0, np.int64))")
        if all(isinstance(v, (bytes, str)) for v in items):
            return "bytes", [v.encode() if isinstance(v, str) else v for v in items]
        if any(isinstance(v, (bytes, str)) for v in items):
            raise TypeError(f"feature {name!r}: mixes text and numbers")
        try:
            arr = np.asarray(items)
        except (ValueError, TypeError) as exc:
            raise TypeError(f"feature {name!r}: cannot convert {type(value).__name__} to a "
                            f"flat list ({exc})") from None
    flat = arr.reshape(-1)
    if arr.dtype.kind in "biu":
        if arr.dtype.kind == "u" and flat.size and flat.max() > np.iinfo(np.int64).max:
            raise ValueError(f"feature {name!r}: unsigned value exceeds the int64 range")
        return "int64", flat.astype(np.int64)
    if arr.dtype.kind == "f":
        return "float32", flat.astype(np.float32)
    if arr.dtype.kind in "SU" or (arr.dtype.kind == "O" and all(
            isinstance(v, (bytes, str)) for v in flat)):
        return "bytes", [v.encode() if isinstance(v, str) else bytes(v) for v in flat]
    raise TypeError(f"feature {name!r}: expected numbers, bytes or str, got dtype {arr.dtype}")


def _fill(name: str, value: Any, feature: feature_pb2.Feature) -> None:
    kind, flat = _values(name, value)
    getattr(feature, _KINDS[kind]).value.extend(
        flat.tolist() if isinstance(flat, np.ndarray) else flat)


def _fill_features(features: Mapping[str, Any], msg: feature_pb2.Features, what: str) -> None:
    if not isinstance(features, Mapping):
        raise TypeError(f"{what} must be a mapping name -> value, got {type(features).__name__}")
    for name, value in features.items():
        if not isinstance(name, str):
            raise TypeError(f"{what}: feature names must be str, got {name!r}")
        if value is not None:  # None = missing feature
            _fill(name, value, msg.feature[name])


def encode_example(features: Mapping[str, Any]) -> bytes:
    """Serialize ``{name: value}`` as a ``tf.train.Example``.

    Args:
        features: Values are scalars, lists, numpy arrays or torch tensors (flattened
            row-major): integers/bools → ``int64_list``, floats → ``float_list`` (float32),
            ``bytes``/``str`` (UTF-8) → ``bytes_list``. ``None`` leaves the feature out.

    Returns:
        The serialized Example (map entries in sorted key order, deterministic).
    """
    ex = example_pb2.Example()
    _fill_features(features, ex.features, "features")
    return ex.SerializeToString(deterministic=True)


def encode_sequence_example(context: Mapping[str, Any],
                            feature_lists: Mapping[str, Sequence[Any]]) -> bytes:
    """Serialize a ``tf.train.SequenceExample``.

    Args:
        context: Per-record features, as in :func:`encode_example`.
        feature_lists: ``{name: [value at step 0, value at step 1, ...]}``; a 2-D array
            gives one step per row.
    """
    ex = example_pb2.SequenceExample()
    _fill_features(context, ex.context, "context")
    if not isinstance(feature_lists, Mapping):
        raise TypeError("feature_lists must be a mapping name -> steps, got "
                        f"{type(feature_lists).__name__}")
    for name, steps in feature_lists.items():
        flist = ex.feature_lists.feature_list[name]
        for t, step in enumerate(steps):
            _fill(f"{name}[{t}]", step, flist.feature.add())
    return ex.SerializeToString(deterministic=True)


# ------------------------------------------------------------------------------ decoding
def _parse(cls: type, data: bytes) -> Any:
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"data must be bytes, got {type(data).__name__}")
    try:
        return cls.FromString(bytes(data))
    except DecodeError as exc:
        raise ExampleDecodeError(f"not a valid {cls.__name__} ({exc})") from None


def _read(feature: feature_pb2.Feature) -> tuple[str | None, Any]:
    kind = feature.WhichOneof("kind")
    if kind == "int64_list":
        return "int64", np.array(feature.int64_list.value, dtype=np.int64)
    if kind == "float_list":
        return "float32", np.array(feature.float_list.value, dtype=np.float32)
    if kind == "bytes_list":
        out = np.empty(len(feature.bytes_list.value), dtype=object)
        out[:] = list(feature.bytes_list.value)
        return "bytes", out
    return None, None  # a Feature with no list set: treated as missing


def _apply(name: str, spec: Any, kind: str | None, values: Any) -> Any:
    if isinstance(spec, VarLenFeature):
        if kind is None:
            return np.zeros(0, dtype=_NP[spec.dtype])
        if kind != spec.dtype:
            raise ExampleDecodeError(f"feature {name!r}: schema says {spec.dtype}, the data "
                                     f"holds {kind}")
        return values
    if not isinstance(spec, FixedLenFeature):
        raise TypeError(f"schema[{name!r}] must be a FixedLenFeature or VarLenFeature, got "
                        f"{type(spec).__name__}")
    count = math.prod(spec.shape)
    if kind is None:  # absent, or a Feature with no list set
        if spec.default_value is None:
            raise ExampleDecodeError(f"feature {name!r} is required (FixedLenFeature without "
                                     "default_value) but missing")
        default = np.asarray(spec.default_value, dtype=_NP[spec.dtype])
        try:
            return np.broadcast_to(default, spec.shape).copy()
        except ValueError:
            raise ValueError(f"feature {name!r}: default_value of shape {default.shape} does "
                             f"not fit shape {spec.shape}") from None
    if kind != spec.dtype:
        raise ExampleDecodeError(f"feature {name!r}: schema says {spec.dtype}, the data holds "
                                 f"{kind}")
    if len(values) != count:
        raise ExampleDecodeError(f"feature {name!r}: {len(values)} values, expected {count} "
                                 f"for shape {spec.shape}")
    return values.reshape(spec.shape)


def _to_backend(value: Any, backend: str) -> Any:
    if backend == "torch" and isinstance(value, np.ndarray) and value.dtype != object:
        import torch

        return torch.from_numpy(value)
    return value


def _check_backend(backend: str) -> None:
    if backend not in ("numpy", "torch"):
        raise ValueError(f"backend must be 'numpy' or 'torch', got {backend!r}")


def _decode_features(msg: feature_pb2.Features, schema: Schema | None, backend: str,
                     ) -> dict[str, Any]:
    if schema is None:
        out = {}
        for name in sorted(msg.feature):
            kind, values = _read(msg.feature[name])
            out[name] = _to_backend(values if kind else np.zeros(0, np.float32), backend)
        return out
    if not isinstance(schema, Mapping):
        raise TypeError(f"schema must be a mapping name -> spec, got {type(schema).__name__}")
    out = {}
    for name, spec in schema.items():
        kind, values = _read(msg.feature[name]) if name in msg.feature else (None, None)
        out[name] = _to_backend(_apply(name, spec, kind, values), backend)
    return out


def decode_example(data: bytes, schema: Schema | None = None, *,
                   backend: str = "numpy") -> dict[str, Any]:
    """Parse a serialized ``tf.train.Example``.

    Args:
        data: The serialized message.
        schema: ``None`` returns every feature flat (``int64``/``float32`` arrays,
            ``object`` arrays of ``bytes``; an empty Feature as an empty float32 array).
            With a schema, only its features, checked and shaped like
            ``tf.io.parse_single_example`` (extra features are ignored).
        backend: ``"numpy"`` or ``"torch"`` (numeric arrays become tensors; bytes stay
            numpy ``object`` arrays).

    Returns:
        ``{name: value}``; FixedLenFeature values have shape ``spec.shape``, VarLenFeature
        values shape ``[n]``.

    Raises:
        ExampleDecodeError: invalid bytes, a missing required feature, a kind or size that
            contradicts the schema.
    """
    _check_backend(backend)
    ex = _parse(example_pb2.Example, data)
    return _decode_features(ex.features, schema, backend)


def decode_sequence_example(data: bytes, context_schema: Schema | None = None,
                            sequence_schema: Schema | None = None, *,
                            backend: str = "numpy") -> tuple[dict[str, Any], dict[str, Any]]:
    """Parse a serialized ``tf.train.SequenceExample``.

    Args:
        data: The serialized message.
        context_schema: As ``schema`` of :func:`decode_example`, for the context.
        sequence_schema: Per-step specs: a :class:`FixedLenFeature` stacks the steps into
            ``[T, *shape]``; a :class:`VarLenFeature` gives a list of ``T`` flat arrays. A
            feature list absent from the data has ``T = 0``. ``None`` returns every feature
            list as a list of flat per-step arrays.
        backend: ``"numpy"`` or ``"torch"``.

    Returns:
        ``(context, sequences)``.

    Raises:
        ExampleDecodeError: as :func:`decode_example`.
    """
    _check_backend(backend)
    ex = _parse(example_pb2.SequenceExample, data)
    context = _decode_features(ex.context, context_schema, backend)
    lists = ex.feature_lists.feature_list
    if sequence_schema is None:
        return context, {name: [_to_backend(v if k else np.zeros(0, np.float32), backend)
                                for k, v in map(_read, lists[name].feature)]
                         for name in sorted(lists)}
    seqs: dict[str, Any] = {}
    for name, spec in sequence_schema.items():
        steps = lists[name].feature if name in lists else []
        vals = [_apply(f"{name}[{t}]", spec, *_read(f)) for t, f in enumerate(steps)]
        if isinstance(spec, FixedLenFeature):
            stacked = (np.stack(vals) if vals
                       else np.zeros((0, *spec.shape), dtype=_NP[spec.dtype]))
            seqs[name] = _to_backend(stacked, backend)
        else:
            seqs[name] = [_to_backend(v, backend) for v in vals]
    return context, seqs
