"""TFRecord files: framing, writer, verified reader — without TensorFlow.

A TFRecord file is a plain concatenation of records, each framed as a little-endian
``uint64`` payload length, the masked CRC32C of those 8 length bytes, the payload, and the
masked CRC32C of the payload. The two checksums let a reader tell a damaged length from a
damaged payload, so corruption is detected instead of turning into a wrong record. Files may
be wrapped whole in a gzip (or zlib) stream. Format of TensorFlow (Abadi et al. 2016,
arXiv:1603.04467), documented in its "TFRecord and tf.train.Example" guide; this is an
independent implementation. CRC32C (Castagnoli) comes from ``google-crc32c``'s C code.

=============  ====================================================================
notation       meaning
=============  ====================================================================
``n``          payload length in bytes (``uint64``, little endian)
``crc(x)``     CRC32C of the bytes ``x``
``mask(c)``    ``((c >> 15) | (c << 17)) + 0xA282EAD8  (mod 2**32)``
record         ``n | mask(crc(n)) | payload | mask(crc(payload))`` = ``12 + n + 4`` bytes
offset         byte position of a record's first length byte (in the uncompressed stream)
=============  ====================================================================
"""

from __future__ import annotations

import io
import os
import struct
import zlib
from collections.abc import Iterator
from typing import BinaryIO

import google_crc32c

__all__ = [
    "RECORD_HEADER",
    "CorruptRecordError",
    "RecordReader",
    "TFRecordWriter",
    "frame_record",
    "masked_crc32c",
    "read_records",
]

_MASK_DELTA = 0xA282EAD8
#: A record header: uint64 payload length, uint32 masked CRC32C of those 8 bytes.
RECORD_HEADER = struct.Struct("<QI")
_FOOTER = struct.Struct("<I")
_CHUNK = 1 << 20  # bytes read from the underlying stream at a time
_WBITS = {"gzip": 31, "zlib": 15}  # zlib window bits: 16 + 15 = gzip wrapper


def masked_crc32c(data: bytes) -> int:
    """The masked CRC32C TFRecord stores (``mask(crc(data))``); ``data`` must be ``bytes``."""
    crc = google_crc32c.value(data)  # crc(x), Castagnoli polynomial
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF  # mask(c), mod 2**32


def frame_record(data: bytes) -> bytes:
    """One framed record: ``n | mask(crc(n)) | data | mask(crc(data))``."""
    length = struct.pack("<Q", len(data))  # n as little-endian uint64
    return (length + _FOOTER.pack(masked_crc32c(length)) + data
            + _FOOTER.pack(masked_crc32c(data)))


class CorruptRecordError(ValueError):
    """A record failed its checks: names the file, the record number and the byte offset.

    Attributes:
        path: The file (or stream name).
        record: 0-based number of the record in the file.
        offset: Byte offset of its header (in the uncompressed stream for gzip/zlib files).
        reason: What was wrong.
    """

    def __init__(self, path: str, record: int, offset: int, reason: str):
        self.path, self.record, self.offset, self.reason = path, record, offset, reason
        super().__init__(f"{path}: corrupt TFRecord: record {record} at byte offset "
                         f"{offset}: {reason}")

    def __reduce__(self):  # keep it picklable across DataLoader worker processes
        return (type(self), (self.path, self.record, self.offset, self.reason))


def _compression(compression: str | None) -> str | None:
    if compression is None or compression == "" or str(compression).lower() == "none":
        return None
    if not isinstance(compression, str) or compression.lower() not in _WBITS:
        raise ValueError(f"compression must be None, 'gzip' or 'zlib', got {compression!r}")
    return compression.lower()


class TFRecordWriter:
    """Write records to a TFRecord file, byte-identical to ``tf.io.TFRecordWriter``.

    Args:
        path: Output file (created or truncated).
        compression: ``None`` (plain), ``"gzip"`` or ``"zlib"``; compressed streams use
            TensorFlow's zlib settings (default level, ``memLevel=9``).

    Example::

        with TFRecordWriter("train-00000.tfrecord") as w:
            w.write(encode_example({"x": [1.0, 2.0]}))
    """

    def __init__(self, path: str | os.PathLike, compression: str | None = None):
        self.path = str(path)
        self.compression = _compression(compression)
        self._file: BinaryIO | None = open(self.path, "wb")  # noqa: SIM115 - closed in close()
        self._deflate = (zlib.compressobj(zlib.Z_DEFAULT_COMPRESSION, zlib.DEFLATED,
                                          _WBITS[self.compression], 9)
                         if self.compression else None)

    def write(self, record: bytes | bytearray | memoryview) -> None:
        """Append one record (any bytes-like payload)."""
        if not isinstance(record, (bytes, bytearray, memoryview)):
            raise TypeError(f"record must be bytes-like, got {type(record).__name__}")
        if self._file is None:
            raise ValueError(f"TFRecordWriter for {self.path} is closed")
        framed = frame_record(bytes(record))
        self._file.write(self._deflate.compress(framed) if self._deflate else framed)

    def flush(self) -> None:
        """Flush to the OS (a compressed stream gets zlib's partial flush, as in TensorFlow)."""
        if self._file is None:
            return
        if self._deflate:
            self._file.write(self._deflate.flush(zlib.Z_PARTIAL_FLUSH))
        self._file.flush()

    def close(self) -> None:
        """Finish the stream and close the file (idempotent)."""
        if self._file is None:
            return
        if self._deflate:
            self._file.write(self._deflate.flush(zlib.Z_FINISH))
        self._file.close()
        self._file = None

    def __enter__(self) -> TFRecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _StreamError(Exception):
    """The compressed stream itself is damaged (raised by :class:`_Inflate`)."""


class _Inflate(io.RawIOBase):
    """Minimal streaming gzip/zlib decoder with bounded output per read (no zip bombs)."""

    def __init__(self, raw: BinaryIO, wbits: int):
        self._raw, self._wbits = raw, wbits
        self._d = zlib.decompressobj(wbits)
        self._pending = b""
        self._started = False

    def read(self, n: int = -1) -> bytes:
        n = _CHUNK if n is None or n < 0 else n
        while True:
            data = self._d.unconsumed_tail or self._pending or self._raw.read(_CHUNK)
            self._pending = b""
            if not data:
                if self._started and not self._d.eof:
                    raise _StreamError("compressed stream ends before its end marker")
                return b""
            if self._d.eof:  # a further gzip member (concatenated streams) follows
                self._d = zlib.decompressobj(self._wbits)
            self._started = True
            try:
                out = self._d.decompress(data, n)
            except zlib.error as exc:
                raise _StreamError(f"compressed stream is damaged ({exc})") from None
            if self._d.eof:
                self._pending = self._d.unused_data
            if out:
                return out


class _Buffer:
    """A sliding window over a byte stream: ``buf[pos]`` is at stream offset ``base + pos``."""

    __slots__ = ("stream", "buf", "pos", "base", "eof")

    def __init__(self, stream: BinaryIO, base: int):
        self.stream, self.buf, self.pos, self.base, self.eof = stream, b"", 0, base, False

    def fill(self, need: int) -> bool:
        """Make ``buf[pos:]`` at least ``need`` bytes long; False when the stream ends first."""
        parts, have = [self.buf[self.pos:]], len(self.buf) - self.pos
        while have < need and not self.eof:
            chunk = self.stream.read(max(_CHUNK, min(need - have, 1 << 26)))
            self.eof = not chunk
            parts.append(chunk)
            have += len(chunk)
        self.base, self.buf, self.pos = self.base + self.pos, b"".join(parts), 0
        return have >= need

    def resync(self) -> bool:
        """Scan forward from ``pos`` to the next 12 bytes whose length checksum holds."""
        while True:
            buf, p, last = self.buf, self.pos, len(self.buf) - 12
            while p <= last:
                if masked_crc32c(buf[p:p + 8]) == _FOOTER.unpack_from(buf, p + 8)[0]:
                    self.pos = p
                    return True
                p += 1
            self.pos = p
            if not self.fill(12):
                self.pos = len(self.buf)
                return False


class RecordReader:
    """Iterate over the records of one file, verifying both checksums.

    Made by :func:`read_records`; ``skipped`` counts corrupt records passed over when
    ``on_error="skip"`` (their errors are kept in ``errors``). The keyword-only arguments
    read part of a file: from ``start_offset`` (a record header, numbered ``first_record``)
    until ``max_records`` were returned or the next header would start at ``end_offset``.
    """

    def __init__(self, path: str | os.PathLike | BinaryIO, *, verify_crc: bool = True,
                 on_error: str = "raise", compression: str | None = None,
                 start_offset: int = 0, first_record: int = 0, max_records: int | None = None,
                 end_offset: int | None = None):
        if on_error not in ("raise", "skip"):
            raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
        if start_offset < 0 or first_record < 0 or (max_records is not None and max_records < 0):
            raise ValueError("start_offset, first_record and max_records must be >= 0, got "
                             f"{start_offset}, {first_record}, {max_records}")
        self.path = path
        self.name = (str(path) if isinstance(path, (str, os.PathLike))
                     else str(getattr(path, "name", "<stream>")))
        self.verify_crc, self.on_error = verify_crc, on_error
        self.compression = _compression(compression)
        if self.compression and start_offset:
            raise ValueError("start_offset needs an uncompressed file (cannot seek in a "
                             f"{self.compression} stream)")
        self.start_offset, self.first_record = start_offset, first_record
        self.max_records, self.end_offset = max_records, end_offset
        self.skipped = 0
        self.errors: list[CorruptRecordError] = []
        self._it = self._records()

    def __iter__(self) -> Iterator[bytes]:
        return self

    def __next__(self) -> bytes:
        return next(self._it)

    def _open(self) -> tuple[BinaryIO, BinaryIO, int, int | None, bool]:
        """(stream, raw file, start offset, end offset when known, whether we own it)."""
        own = isinstance(self.path, (str, os.PathLike))
        raw: BinaryIO = open(self.path, "rb", buffering=0) if own else self.path  # noqa: SIM115
        start, size = 0, None
        if raw.seekable():
            start = raw.tell()
            size = raw.seek(0, io.SEEK_END)
            start = raw.seek(self.start_offset if self.start_offset else start)
        if self.compression:
            return _Inflate(raw, _WBITS[self.compression]), raw, 0, None, own
        return raw, raw, start, size, own

    def _fail(self, record: int, offset: int, reason: str) -> None:
        err = CorruptRecordError(self.name, record, offset, reason)
        if self.on_error == "raise":
            raise err
        self.skipped += 1
        self.errors.append(err)

    def _records(self) -> Iterator[bytes]:
        stream, raw, start, size, own = self._open()
        b = _Buffer(stream, start)
        number, emitted, verify = self.first_record, 0, self.verify_crc
        try:
            limit = self.max_records if self.max_records is not None else -1
            end = self.end_offset
            while emitted != limit and (end is None or b.base + b.pos < end):
                if len(b.buf) - b.pos < 12 and not b.fill(12):
                    if len(b.buf) - b.pos:
                        self._fail(number, b.base + b.pos, "file ends inside a record header "
                                   f"({len(b.buf) - b.pos} of 12 bytes): truncated")
                    return
                buf, pos = b.buf, b.pos
                length, length_crc = RECORD_HEADER.unpack_from(buf, pos)
                if verify and masked_crc32c(buf[pos:pos + 8]) != length_crc:
                    self._fail(number, b.base + pos, "length checksum mismatch (damaged length)")
                    b.pos += 1
                    if not b.resync():
                        return
                    number += 1
                    continue
                total = 16 + length
                if size is not None and b.base + pos + total > size:
                    self._fail(number, b.base + pos, f"record of {length} payload bytes runs "
                               f"past the end of the file ({size} bytes): truncated")
                    return
                if len(buf) - pos < total:
                    if not b.fill(total):
                        self._fail(number, b.base + b.pos, f"stream ends inside a record of "
                                   f"{length} payload bytes: truncated")
                        return
                    buf, pos = b.buf, b.pos
                data = buf[pos + 12:pos + 12 + length]
                if verify and masked_crc32c(data) != _FOOTER.unpack_from(buf, pos + 12 + length)[0]:
                    self._fail(number, b.base + pos, "payload checksum mismatch (damaged data)")
                else:
                    emitted += 1
                    yield data
                b.pos = pos + total
                number += 1
        except _StreamError as exc:
            self._fail(number, b.base + b.pos, str(exc))
        finally:
            if own:
                raw.close()


def read_records(path: str | os.PathLike | BinaryIO, verify_crc: bool = True,
                 on_error: str = "raise", compression: str | None = None) -> RecordReader:
    """Iterate over the payloads of a TFRecord file.

    Args:
        path: File path, or an open binary stream (``io.BytesIO`` …).
        verify_crc: Check both masked CRC32Cs of every record (default). With ``False`` a
            damaged payload is returned as is; truncation is still detected.
        on_error: ``"raise"`` a :class:`CorruptRecordError` at the first damaged record, or
            ``"skip"`` it, count it in ``reader.skipped`` and go on (after a damaged length the
            reader scans forward to the next header whose checksum holds; a damaged
            compressed stream ends the file).
        compression: ``None``, ``"gzip"`` or ``"zlib"``.

    Returns:
        A :class:`RecordReader`: an iterator of ``bytes`` with ``skipped``/``errors``.

    Raises:
        CorruptRecordError: (while iterating, ``on_error="raise"``) names file, record
            number and byte offset.
    """
    return RecordReader(path, verify_crc=verify_crc, on_error=on_error,
                        compression=compression)
