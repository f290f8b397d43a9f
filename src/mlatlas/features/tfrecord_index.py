"""Random access into uncompressed TFRecord files: a record index and one-record reads.

Records have no fixed size, so reading record ``i`` without scanning from the start needs the
byte offset of each header. :class:`RecordIndex` finds them by reading only the 12-byte
headers (``n | mask(crc(n))``) and seeking past each payload; it is what shards a file across
data-loader workers (:mod:`mlatlas.features.dataset`). Its text form is the
``"offset size"``-per-line layout of NVIDIA DALI's ``tfrecord2idx``. Framing and notation:
:mod:`mlatlas.features.tfrecord`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mlatlas.features.tfrecord import RECORD_HEADER, CorruptRecordError, RecordReader, masked_crc32c

__all__ = ["RecordIndex", "read_record_at"]


@dataclass
class RecordIndex:
    """Byte offsets of the records of an uncompressed TFRecord file: random access, splits.

    Attributes:
        path: The indexed file.
        offsets: ``int64 [N]`` offset of each record's header.
        lengths: ``int64 [N]`` payload length of each record (the record spans
            ``offsets[i] .. offsets[i] + 16 + lengths[i]``).

    ``save``/``load`` use the plain-text ``"offset size"``-per-line layout of DALI's
    ``tfrecord2idx`` (size = whole framed record), so indexes interoperate.
    """

    path: str
    offsets: np.ndarray
    lengths: np.ndarray

    @classmethod
    def build(cls, path: str | os.PathLike, verify_crc: bool = True) -> RecordIndex:
        """Scan the record headers of ``path`` (payloads are skipped, not read).

        Raises:
            CorruptRecordError: damaged length or a truncated last record.
        """
        offsets, lengths = [], []
        name = str(path)
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            offset = 0
            while offset < size:
                head = f.read(12)
                n = len(offsets)
                if len(head) < 12:
                    raise CorruptRecordError(name, n, offset, "file ends inside a record "
                                             f"header ({len(head)} of 12 bytes): truncated")
                length, length_crc = RECORD_HEADER.unpack(head)
                if verify_crc and masked_crc32c(head[:8]) != length_crc:
                    raise CorruptRecordError(name, n, offset, "length checksum mismatch "
                                             "(damaged length)")
                if offset + 16 + length > size:
                    raise CorruptRecordError(name, n, offset, f"record of {length} payload "
                                             f"bytes runs past the end of the file ({size} "
                                             "bytes): truncated")
                offsets.append(offset)
                lengths.append(length)
                offset += 16 + length
                f.seek(offset)
        return cls(name, np.asarray(offsets, np.int64), np.asarray(lengths, np.int64))

    def __len__(self) -> int:
        return len(self.offsets)

    def read(self, i: int, verify_crc: bool = True) -> bytes:
        """Payload of record ``i`` (negative ``i`` counts from the end)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"record {i} out of range for {self.path} with {n} records")
        i %= n
        return read_record_at(self.path, int(self.offsets[i]), record=i, verify_crc=verify_crc)

    def save(self, path: str | os.PathLike) -> None:
        """Write ``"offset size"`` lines (DALI ``tfrecord2idx`` layout)."""
        sizes = self.lengths + 16
        Path(path).write_text("".join(f"{o} {s}\n" for o, s in zip(self.offsets, sizes)))

    @classmethod
    def load(cls, path: str | os.PathLike, tfrecord: str | os.PathLike) -> RecordIndex:
        """Read an index written by :meth:`save` (or DALI) for the file ``tfrecord``."""
        rows = [line.split() for line in Path(path).read_text().splitlines() if line.strip()]
        if any(len(r) != 2 for r in rows):
            raise ValueError(f"index {path}: expected 'offset size' per line")
        table = np.asarray(rows, np.int64).reshape(-1, 2)
        if (table[:, 1] < 16).any():
            raise ValueError(f"index {path}: a record size is below the 16-byte framing")
        return cls(str(tfrecord), table[:, 0].copy(), table[:, 1] - 16)


def read_record_at(path: str | os.PathLike, offset: int, *, record: int = -1,
                   verify_crc: bool = True) -> bytes:
    """Read the one record whose header starts at byte ``offset`` of an uncompressed file.

    Args:
        path: The file.
        offset: Header offset (from a :class:`RecordIndex`).
        record: Its record number, only for error messages.
        verify_crc: Check both checksums.

    Raises:
        CorruptRecordError: damaged or truncated record at ``offset``.
    """
    reader = RecordReader(path, verify_crc=verify_crc, start_offset=offset,
                          first_record=max(record, 0), max_records=1)
    out = list(reader)
    if not out:
        raise CorruptRecordError(str(path), record, offset, "no record starts here "
                                 "(offset at or past the end of the file)")
    return out[0]
