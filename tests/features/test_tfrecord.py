"""TFRecord framing: byte parity with TensorFlow's writer, reading TF's files, corruption."""

from __future__ import annotations

import io
import os
import struct

import numpy as np
import pytest

from mlatlas.features.tfrecord import (
    CorruptRecordError,
    RecordReader,
    TFRecordWriter,
    frame_record,
    masked_crc32c,
    read_records,
)
from mlatlas.features.tfrecord_index import RecordIndex, read_record_at


@pytest.fixture(scope="module")
def tf():
    """TensorFlow, imported once per module (a missing TF fails under CI, see conftest)."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return pytest.importorskip("tensorflow")


def _records(n: int = 37, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = [b"", b"\x00", "ünïcødé ✓".encode()]
    for _ in range(n - 3):  # compressible but not trivial payloads of odd lengths
        out.append(rng.integers(0, 12, int(rng.integers(1, 3000))).astype(np.uint8).tobytes())
    return out


def _write(path, records, compression=None) -> bytes:
    with TFRecordWriter(path, compression) as w:
        for r in records:
            w.write(r)
    return open(path, "rb").read()


# ------------------------------------------------------------------------------ framing
def test_masked_crc_matches_the_definition():
    # CRC32C("123456789") = 0xE3069283 is the standard check value of the Castagnoli CRC.
    crc = 0xE3069283
    want = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    assert masked_crc32c(b"123456789") == want
    framed = frame_record(b"abc")
    assert len(framed) == 12 + 3 + 4
    assert struct.unpack("<Q", framed[:8])[0] == 3
    assert struct.unpack("<I", framed[8:12])[0] == masked_crc32c(framed[:8])
    assert struct.unpack("<I", framed[-4:])[0] == masked_crc32c(b"abc")


@pytest.mark.parametrize("compression", [None, "gzip", "zlib"])
def test_roundtrip_and_random_access(tmp_path, compression):
    recs = _records()
    path = tmp_path / "a.tfrecord"
    _write(path, recs, compression)
    assert list(read_records(path, compression=compression)) == recs
    assert list(read_records(io.BytesIO(path.read_bytes()), compression=compression)) == recs
    if compression is None:
        idx = RecordIndex.build(path)
        assert len(idx) == len(recs)
        for i in (0, 5, len(recs) - 1, -2):
            assert idx.read(i) == recs[i]
        assert read_record_at(path, int(idx.offsets[7])) == recs[7]
        idx.save(tmp_path / "a.idx")
        again = RecordIndex.load(tmp_path / "a.idx", path)
        np.testing.assert_array_equal(again.offsets, idx.offsets)
        np.testing.assert_array_equal(again.lengths, idx.lengths)
        with pytest.raises(IndexError, match="out of range"):
            idx.read(len(recs))


def test_index_matches_the_framing_and_dali_layout(tmp_path):
    recs = _records(23, seed=4)
    path = tmp_path / "d.tfrecord"
    _write(path, recs)
    idx = RecordIndex.build(path)
    # offsets/lengths from the framing rule (16 + n bytes per record), not from the reader
    np.testing.assert_array_equal(idx.offsets, _offsets(recs))
    np.testing.assert_array_equal(idx.lengths, [len(r) for r in recs])
    idx.save(tmp_path / "d.idx")
    want = "".join(f"{o} {16 + len(r)}\n" for o, r in zip(_offsets(recs), recs))
    assert (tmp_path / "d.idx").read_text() == want  # DALI tfrecord2idx: "offset size"
    assert [idx.read(i) for i in range(-len(recs), 0)] == recs


def test_index_and_reader_bad_input(tmp_path):
    path = tmp_path / "b.tfrecord"
    recs = _records(4)
    _write(path, recs)
    (tmp_path / "three.idx").write_text("0 16 7\n")
    with pytest.raises(ValueError, match="three.idx: expected 'offset size' per line"):
        RecordIndex.load(tmp_path / "three.idx", path)
    (tmp_path / "small.idx").write_text("0 15\n")
    with pytest.raises(ValueError, match="small.idx: a record size is below the 16-byte"):
        RecordIndex.load(tmp_path / "small.idx", path)
    with pytest.raises(IndexError, match=r"record -5 out of range for .*b\.tfrecord with 4"):
        RecordIndex.build(path).read(-5)
    size = path.stat().st_size
    with pytest.raises(CorruptRecordError, match=f"record 9 at byte offset {size}: no record "
                       "starts here"):
        read_record_at(path, size, record=9)
    with pytest.raises(CorruptRecordError, match="record 0 at byte offset 1: length checksum"):
        read_record_at(path, 1)  # not a header: its checksum does not hold
    with pytest.raises(ValueError, match="start_offset needs an uncompressed file"):
        list(RecordReader(path, compression="gzip", start_offset=16))
    with pytest.raises(ValueError, match="must be >= 0, got -1, 0, None"):
        RecordReader(path, start_offset=-1)
    w = TFRecordWriter(tmp_path / "c")
    w.close()
    w.close()  # idempotent
    with pytest.raises(ValueError, match="TFRecordWriter for .*c is closed"):
        w.write(b"x")


def test_empty_file_and_bad_arguments(tmp_path):
    path = tmp_path / "empty.tfrecord"
    _write(path, [])
    assert path.read_bytes() == b""
    assert list(read_records(path)) == []
    assert len(RecordIndex.build(path)) == 0
    with pytest.raises(ValueError, match="compression must be"):
        TFRecordWriter(tmp_path / "x", compression="lz4")
    with pytest.raises(ValueError, match="on_error must be"):
        read_records(path, on_error="ignore")
    with TFRecordWriter(tmp_path / "y") as w, pytest.raises(TypeError, match="bytes-like"):
        w.write("text")


# ------------------------------------------------------------------------------ parity
@pytest.mark.parametrize("compression", [None, "gzip", "zlib"])
def test_bytes_identical_to_tf_writer(tmp_path, tf, compression):
    recs = _records(60, seed=1)
    ours = _write(tmp_path / "ours", recs, compression)
    opts = tf.io.TFRecordOptions(compression_type=(compression or "").upper())
    with tf.io.TFRecordWriter(str(tmp_path / "tf"), opts) as w:
        for r in recs:
            w.write(r)
    theirs = (tmp_path / "tf").read_bytes()
    # Plain framing is deterministic; TF's gzip/zlib (zlib default level, memLevel 9) is
    # too, so compressed files are compared byte for byte as well, not after inflating.
    assert ours == theirs
    assert list(read_records(tmp_path / "tf", compression=compression)) == recs
    got = [x.numpy() for x in tf.data.TFRecordDataset(
        str(tmp_path / "ours"), compression_type=(compression or "").upper())]
    assert got == recs


@pytest.mark.parametrize("compression", ["gzip", "zlib"])
def test_flush_mid_stream_matches_tf(tmp_path, tf, compression):
    recs = _records(6, seed=2)
    opts = tf.io.TFRecordOptions(compression_type=compression.upper())
    with tf.io.TFRecordWriter(str(tmp_path / "tf"), opts) as theirs, \
            TFRecordWriter(tmp_path / "ours", compression) as ours:
        for i, r in enumerate(recs):
            for w in (theirs, ours):
                w.write(r)
                if i % 2:
                    w.flush()
    assert (tmp_path / "ours").read_bytes() == (tmp_path / "tf").read_bytes()
    assert list(read_records(tmp_path / "ours", compression=compression)) == recs


def test_tf_detects_what_we_detect(tmp_path, tf):
    """A payload flip is an error for TF's reader too, so 'corrupt' means the same thing."""
    data = bytearray(_write(tmp_path / "ok", _records(5)))
    data[30] ^= 0x10
    (tmp_path / "bad").write_bytes(bytes(data))
    with pytest.raises(tf.errors.DataLossError):
        list(tf.data.TFRecordDataset(str(tmp_path / "bad")))
    with pytest.raises(CorruptRecordError):
        list(read_records(tmp_path / "bad"))


# ------------------------------------------------------------------------------ reliability
def _offsets(recs: list[bytes]) -> list[int]:
    return list(np.concatenate([[0], np.cumsum([16 + len(r) for r in recs])[:-1]]))


def test_flipped_length_bit_names_file_record_offset(tmp_path):
    recs = _records(9)
    data = bytearray(_write(tmp_path / "f.tfrecord", recs))
    off = _offsets(recs)[4]
    data[off + 2] ^= 0x04  # inside record 4's length
    (tmp_path / "f.tfrecord").write_bytes(bytes(data))
    reader = read_records(tmp_path / "f.tfrecord")
    got = []
    with pytest.raises(CorruptRecordError, match=r"f\.tfrecord.*record 4 at byte offset "
                       rf"{off}.*length checksum") as exc:
        for r in reader:
            got.append(r)
    assert got == recs[:4]  # nothing wrong came out before the error
    assert (exc.value.record, exc.value.offset) == (4, off)
    with pytest.raises(CorruptRecordError, match="length checksum"):
        RecordIndex.build(tmp_path / "f.tfrecord")
    skip = read_records(tmp_path / "f.tfrecord", on_error="skip")
    assert list(skip) == recs[:4] + recs[5:]  # resynchronised on record 5's header
    assert skip.skipped == 1 and skip.errors[0].record == 4


def test_flipped_payload_bit_and_wrong_crc(tmp_path):
    recs = _records(9)
    clean = _write(tmp_path / "p", recs)
    off = _offsets(recs)
    for where, what in [(off[6] + 12 + 1, "payload"), (off[6] + 16 + len(recs[6]) - 2, "crc")]:
        data = bytearray(clean)
        data[where] ^= 0x80
        (tmp_path / "p").write_bytes(bytes(data))
        with pytest.raises(CorruptRecordError, match=f"record 6 at byte offset {off[6]}: "
                           "payload checksum"):
            list(read_records(tmp_path / "p"))
        skip = read_records(tmp_path / "p", on_error="skip")
        assert list(skip) == recs[:6] + recs[7:], what
        assert skip.skipped == 1
        unchecked = list(read_records(tmp_path / "p", verify_crc=False))
        assert len(unchecked) == len(recs) and unchecked[:6] == recs[:6]


@pytest.mark.parametrize("compression", [None, "gzip"])
def test_truncated_file(tmp_path, compression):
    recs = _records(9)
    clean = _write(tmp_path / "t", recs)
    cuts = [len(clean) - 1, len(clean) - 20, 5] if compression is None else [len(clean) - 9]
    for cut in cuts:
        (tmp_path / "t").write_bytes(clean[:cut])
        with pytest.raises(CorruptRecordError, match="truncated|ends before"):
            list(read_records(tmp_path / "t", compression=compression))
        skip = read_records(tmp_path / "t", compression=compression, on_error="skip")
        got = list(skip)
        assert got == recs[:len(got)] and skip.skipped == 1
    if compression is None:
        (tmp_path / "t").write_bytes(clean[:-3])
        with pytest.raises(CorruptRecordError, match=f"record {len(recs) - 1} at byte offset "
                           f"{_offsets(recs)[-1]}.*truncated"):
            RecordIndex.build(tmp_path / "t")


def test_huge_length_without_crc_check_does_not_allocate(tmp_path):
    data = bytearray(_write(tmp_path / "h", _records(3)))
    data[7] = 0x7F  # length becomes ~2**62 (and its checksum no longer matches)
    (tmp_path / "h").write_bytes(bytes(data))
    with pytest.raises(CorruptRecordError, match="runs past the end of the file"):
        list(read_records(tmp_path / "h", verify_crc=False))
    stream = io.BytesIO(bytes(data))
    with pytest.raises(CorruptRecordError, match="record 0 at byte offset 0"):
        list(read_records(stream))
