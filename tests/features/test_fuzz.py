"""Fuzzing the TFRecord reader and the Example decoder: typed errors only, never a wrong record.

Random and mutated inputs (bit flips, byte overwrites, truncation, insertion, deletion).
The reader either returns original records or raises ``CorruptRecordError``; the decoder
returns a dict or raises ``ExampleDecodeError``. Nothing else escapes, nothing hangs
(``deadline`` bounds every example).
"""

from __future__ import annotations

import io

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mlatlas.features.example import (
    ExampleDecodeError,
    FixedLenFeature,
    VarLenFeature,
    decode_example,
    decode_sequence_example,
    encode_example,
)
from mlatlas.features.tfrecord import CorruptRecordError, frame_record, read_records

FUZZ = settings(max_examples=150, deadline=2000, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow])

payloads = st.lists(st.binary(max_size=64), min_size=1, max_size=6)


@st.composite
def mutated(draw):
    """(original records, damaged file bytes, whether the damage keeps byte positions).

    A cut exactly between two records is not damage a reader can see (TFRecord has no
    trailer; TensorFlow reads such a file as a valid shorter one), so truncation cuts
    inside a record.
    """
    recs = draw(payloads)
    data = bytearray(b"".join(frame_record(r) for r in recs))
    kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "delete"]))
    at = draw(st.integers(0, len(data) - 1))
    if kind == "flip":
        data[at] ^= 1 << draw(st.integers(0, 7))
    elif kind == "overwrite":
        chunk = draw(st.binary(min_size=1, max_size=8))
        data[at:at + len(chunk)] = chunk[:len(data) - at]
    elif kind == "truncate":
        bounds = set(np.cumsum([16 + len(r) for r in recs]).tolist()) | {0}
        if at in bounds:
            at += 1
        del data[at:]
    elif kind == "insert":
        data[at:at] = draw(st.binary(min_size=1, max_size=8))
    else:
        del data[at:at + draw(st.integers(1, 8))]
    return recs, bytes(data), kind in ("flip", "overwrite", "truncate")


def _read(data: bytes, **kw):
    reader = read_records(io.BytesIO(data), **kw)
    out, err = [], None
    try:
        for r in reader:
            out.append(r)
    except CorruptRecordError as exc:
        err = exc
    return out, err, reader


def _is_subsequence(small: list, big: list) -> bool:
    it = iter(big)
    return all(any(x == y for y in it) for x in small)


@FUZZ
@given(st.binary(max_size=300))
def test_reader_on_random_bytes(data):
    for on_error in ("raise", "skip"):
        out, err, reader = _read(data, on_error=on_error)
        assert err is None or on_error == "raise"
        for r in out:  # anything returned passed both checksums: its framing is in the data
            assert isinstance(r, bytes) and frame_record(r) in data
        if on_error == "skip":
            assert len(reader.errors) == reader.skipped


@FUZZ
@given(mutated())
def test_reader_on_damaged_files(case):
    recs, data, in_place = case
    out, err, _ = _read(data)
    assert _is_subsequence(out, recs)  # never a record that was not written
    if in_place:  # same positions: what came out is a prefix, and a loss is announced
        assert out == recs[:len(out)]
        assert len(out) == len(recs) or err is not None
        if err is not None:
            assert err.record == len(out) and "corrupt TFRecord" in str(err)
    out, err, reader = _read(data, on_error="skip")
    assert err is None and _is_subsequence(out, recs)
    if in_place and len(out) < len(recs):
        assert reader.skipped >= 1


@FUZZ
@given(payloads, st.sampled_from(["gzip", "zlib"]))
def test_reader_on_damaged_compressed_streams(recs, compression):
    import zlib

    level = zlib.compressobj(6, zlib.DEFLATED, 31 if compression == "gzip" else 15, 9)
    packed = bytearray(level.compress(b"".join(frame_record(r) for r in recs)) + level.flush())
    at = len(packed) // 2
    packed[at] ^= 0x5A
    for data in (bytes(packed), bytes(packed[:at])):
        out, err, _ = _read(data, compression=compression)
        assert _is_subsequence(out, recs)


SCHEMA = {"a": FixedLenFeature((2,), "int64", default_value=[0, 0]),
          "b": VarLenFeature("float32"), "c": VarLenFeature("bytes")}


@FUZZ
@given(st.binary(max_size=200))
def test_decoder_on_random_bytes(data):
    for schema in (None, SCHEMA):
        try:
            out = decode_example(data, schema)
            assert isinstance(out, dict)
        except ExampleDecodeError:
            pass
    try:
        decode_sequence_example(data)
    except ExampleDecodeError:
        pass


@FUZZ
@given(st.lists(st.integers(-2**63, 2**63 - 1), max_size=4),
       st.lists(st.floats(width=32, allow_nan=False), max_size=4),
       st.lists(st.binary(max_size=8), max_size=3), st.data())
def test_decoder_on_mutated_examples(ints, floats, blobs, data):
    feats = {"a": np.array(ints, np.int64), "b": np.array(floats, np.float32),
             "c": np.array(blobs, dtype=object) if blobs else np.array([], "S1")}
    good = bytearray(encode_example(feats))
    got = decode_example(bytes(good))
    np.testing.assert_array_equal(got["a"], feats["a"])
    np.testing.assert_array_equal(got["b"], feats["b"])
    assert list(got["c"]) == blobs
    if good:
        at = data.draw(st.integers(0, len(good) - 1))
        good[at] ^= 1 << data.draw(st.integers(0, 7))
    for schema in (None, SCHEMA):
        try:
            decode_example(bytes(good), schema)
        except ExampleDecodeError:
            pass
