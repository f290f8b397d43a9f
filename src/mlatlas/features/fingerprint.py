"""TensorFlow's string fingerprints: ``Fingerprint64`` buckets and ``FingerprintCat64`` crosses.

Hashed feature columns must land in the same bucket as TensorFlow's or a model trained there
means nothing here. TensorFlow hashes a string with FarmHash ``Fingerprint64`` (a stable,
platform-independent 64-bit hash; ``tf.strings.to_hash_bucket_fast`` = fingerprint mod
``n``) and combines the per-feature hashes of a feature cross with ``FingerprintCat64``
(``tensorflow/core/platform/fingerprint.h``), starting from a fixed key; integer features
enter a cross as their own two's-complement value. FarmHash itself comes from ``pyfarmhash``
(Google's C++ code, verified bit for bit against TensorFlow in the tests); the cat step is
three multiply-shift rounds, vectorised here in numpy ``uint64``.

=====================  ==============================================================
notation               meaning
=====================  ==============================================================
``fp(s)``              FarmHash Fingerprint64 of the bytes ``s`` (UTF-8 for ``str``)
``K``                  ``0xC6A4A7935BD1E995`` (the MurmurHash2 multiplier)
``mix(v)``             ``v ^ (v >> 47)``
``cat(a, b)``          ``mix(mix(((a ^ K) ^ mix(b K) K) K) K)`` (products mod 2**64)
cross of ``x1..xk``    ``cat(...cat(cat(key, h(x1)), h(x2))..., h(xk)) mod n``
``key``                ``0xDECAFCAFFE`` (``crossed_column``'s default ``hash_key``)
=====================  ==============================================================
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np

__all__ = [
    "DEFAULT_CROSS_KEY",
    "cross_hash",
    "fingerprint64",
    "fingerprint_cat64",
    "hash_bucket",
]

DEFAULT_CROSS_KEY = 0xDECAFCAFFE
_K = np.uint64(0xC6A4A7935BD1E995)
_S47 = np.uint64(47)


def _farmhash():
    try:
        import farmhash
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("hashed feature columns need pyfarmhash (pip install pyfarmhash) "
                          "for TensorFlow's Fingerprint64") from exc
    return farmhash


def fingerprint64(values: Iterable[bytes | str]) -> np.ndarray:
    """FarmHash ``Fingerprint64`` of each value, as TensorFlow computes it.

    Args:
        values: ``bytes`` or ``str`` (hashed as UTF-8) items.

    Returns:
        ``uint64 [n]``.
    """
    fp = _farmhash().fingerprint64
    items = list(values)
    out = np.empty(len(items), dtype=np.uint64)
    cache: dict[bytes, int] = {}
    for i, v in enumerate(items):
        b = v.encode() if isinstance(v, str) else bytes(v)
        h = cache.get(b)
        if h is None:
            h = cache[b] = fp(b)
        out[i] = h
    return out


def hash_bucket(values: Iterable[bytes | str], num_buckets: int) -> np.ndarray:
    """``tf.strings.to_hash_bucket_fast``: ``fp(s) mod num_buckets`` as ``int64 [n]``."""
    if num_buckets < 1:
        raise ValueError(f"num_buckets must be >= 1, got {num_buckets}")
    return (fingerprint64(values) % np.uint64(num_buckets)).astype(np.int64)


def _mix(v: np.ndarray) -> np.ndarray:
    return v ^ (v >> _S47)  # mix(v) = v ^ (v >> 47)


def fingerprint_cat64(fp1: np.ndarray, fp2: np.ndarray) -> np.ndarray:
    """TensorFlow's ``FingerprintCat64(fp1, fp2)``, element-wise on ``uint64`` arrays."""
    a = np.asarray(fp1, dtype=np.uint64)
    b = np.asarray(fp2, dtype=np.uint64)
    with np.errstate(over="ignore"):
        r = a ^ _K                      # r = a ^ K
        r = r ^ (_mix(b * _K) * _K)     # r ^= mix(b K) K
        r = r * _K                      # r = r K
        r = _mix(r) * _K                # r = mix(r) K
        return _mix(r)                  # cat(a, b) = mix(r)


def cross_hash(parts: list[np.ndarray], num_buckets: int,
               key: int = DEFAULT_CROSS_KEY) -> np.ndarray:
    """Hashed cross of aligned per-feature hashes (``tf.sparse.cross_hashed``'s combine).

    Args:
        parts: ``k`` arrays ``uint64 [m]``: the hashes of the 1st … k-th feature of each
            of ``m`` crossed tuples (``fp(s)`` for strings, the value itself for ints).
        num_buckets: ``n``; ``0`` means mod ``2**63 - 1`` (no bucketing).
        key: Start value of the chain (``hash_key``).

    Returns:
        ``int64 [m]`` bucket ids.
    """
    if not parts:
        raise ValueError("parts must hold at least one feature's hashes")
    h = np.full(len(parts[0]), key, dtype=np.uint64)
    for p in parts:
        h = fingerprint_cat64(h, p)  # eq.: h <- cat(h, h(x_i))
    mod = np.uint64(num_buckets if num_buckets > 0 else 2**63 - 1)
    return (h % mod).astype(np.int64)
