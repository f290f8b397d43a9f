"""``TFRecordDataset``: stream TFRecord shards into PyTorch, split exactly once over workers.

Training reads many shards from many processes: ``world_size`` distributed ranks, each with
``num_workers`` DataLoader workers. Every record must reach exactly one of those
``C = world_size * max(num_workers, 1)`` consumers — none twice, none dropped. With a record
index (uncompressed files) the global record sequence is cut into ``C`` contiguous, nearly
equal ranges; for compressed files whole shards are dealt round-robin. Both follow the same
(optionally shuffled, seed + epoch) shard order on every rank. The files are TensorFlow's
(Abadi et al. 2016, arXiv:1603.04467); the split plays the role of ``tf.data``'s
``shard(num_shards, index)`` and of ``torch.utils.data.DistributedSampler``.

=============  ===================================================================
notation       meaning
=============  ===================================================================
``C``          consumers: ``world_size * max(num_workers, 1)``
``c``          this consumer: ``rank * max(num_workers, 1) + worker_id``
``N``          records in all shards (known from the index)
range of c     global records ``[c * N // C, (c + 1) * N // C)``
=============  ===================================================================
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from mlatlas.features.example import Schema, decode_example
from mlatlas.features.tfrecord import RecordReader
from mlatlas.features.tfrecord_index import RecordIndex

__all__ = ["TFRecordDataset", "collate_examples"]

Plan = list[tuple[str, int, int]]  # (path, first record, stop record or -1 for "to the end")


class TFRecordDataset(IterableDataset):
    """Records (decoded when a schema is given) of TFRecord shards, split across consumers.

    Args:
        paths: One path or a sequence of shard paths.
        schema: ``{name: FixedLenFeature | VarLenFeature}`` → yields decoded dicts
            (see :func:`~mlatlas.features.example.decode_example`); ``None`` yields raw
            record ``bytes``.
        shuffle_shards: Permute the shard order each epoch (same order on every rank).
        seed: Seed of that permutation (combined with the epoch, see :meth:`set_epoch`).
        split: ``"record"`` (contiguous record ranges via the index; uncompressed files),
            ``"shard"`` (whole shards round-robin) or ``"auto"`` (record when possible).
            Building the index fails on a damaged length field; use ``"shard"`` with
            ``on_error="skip"`` to read past such damage.
        compression: ``None``, ``"gzip"`` or ``"zlib"`` for every shard.
        verify_crc: Check the record checksums.
        on_error: ``"raise"`` or ``"skip"`` corrupt records (see ``read_records``).
        backend: ``"numpy"`` or ``"torch"`` arrays in decoded examples.
        transform: Optional callable applied to each yielded item.
        rank: This process's rank; default from ``torch.distributed`` when initialised,
            else 0.
        world_size: Number of ranks; default from ``torch.distributed``, else 1.

    Example::

        ds = TFRecordDataset(sorted(glob("train-*.tfrecord")), schema)
        loader = DataLoader(ds, batch_size=64, num_workers=2, collate_fn=collate_examples)
    """

    def __init__(self, paths: str | os.PathLike | Sequence[str | os.PathLike],
                 schema: Schema | None = None, shuffle_shards: bool = False, seed: int = 0, *,
                 split: str = "auto", compression: str | None = None, verify_crc: bool = True,
                 on_error: str = "raise", backend: str = "numpy",
                 transform: Callable[[Any], Any] | None = None, rank: int | None = None,
                 world_size: int | None = None):
        self.paths = [str(paths)] if isinstance(paths, (str, os.PathLike)) else [
            str(p) for p in paths]
        if not self.paths:
            raise ValueError("paths must name at least one TFRecord file, got none")
        missing = [p for p in self.paths if not os.path.exists(p)]
        if missing:
            raise FileNotFoundError(f"paths: no such TFRecord file(s): {missing[:3]}")
        if split not in ("auto", "record", "shard"):
            raise ValueError(f"split must be 'auto', 'record' or 'shard', got {split!r}")
        if split == "record" and compression:
            raise ValueError("split='record' needs uncompressed files (an index cannot seek "
                             f"into a {compression} stream); use split='shard'")
        if (rank is None) != (world_size is None):
            raise ValueError("pass both rank and world_size, or neither")
        if world_size is not None and not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.schema, self.shuffle_shards, self.seed = schema, shuffle_shards, seed
        self.split = ("shard" if compression else "record") if split == "auto" else split
        self.compression, self.verify_crc, self.on_error = compression, verify_crc, on_error
        self.backend, self.transform = backend, transform
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._index: dict[str, RecordIndex] | None = None

    def set_epoch(self, epoch: int) -> None:
        """Select the shard permutation of ``epoch`` (call on every rank, before iterating)."""
        self.epoch = int(epoch)

    def shard_order(self) -> list[str]:
        """The shard paths in this epoch's order."""
        if not self.shuffle_shards:
            return list(self.paths)
        perm = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.paths))
        return [self.paths[i] for i in perm]

    def index(self) -> dict[str, RecordIndex]:
        """Record index of every shard (built once, on first use)."""
        if self._index is None:
            self._index = {p: RecordIndex.build(p, verify_crc=self.verify_crc)
                           for p in self.paths}
        return self._index

    def __len__(self) -> int:
        """Total number of records (needs an uncompressed index)."""
        if self.compression:
            raise TypeError("len() of a compressed TFRecordDataset is unknown without "
                            "decompressing every shard")
        return sum(len(ix) for ix in self.index().values())

    def plan(self, consumer: int, num_consumers: int) -> Plan:
        """The ``(path, start, stop)`` pieces consumer ``consumer`` of ``num_consumers`` reads.

        ``stop == -1`` means "to the end of the shard".
        """
        if not 0 <= consumer < num_consumers:
            raise ValueError(f"consumer must be in [0, {num_consumers}), got {consumer}")
        order = self.shard_order()
        if self.split == "shard":
            return [(p, 0, -1) for p in order[consumer::num_consumers]]
        counts = np.array([len(self.index()[p]) for p in order], dtype=np.int64)
        starts = np.concatenate([[0], np.cumsum(counts)])  # global id of each shard's first
        total = int(starts[-1])
        # range of c: [c N // C, (c + 1) N // C) — disjoint, covering, sizes differ by <= 1
        lo, hi = consumer * total // num_consumers, (consumer + 1) * total // num_consumers
        pieces = []
        for path, s, e in zip(order, starts[:-1], starts[1:]):
            a, b = max(lo, int(s)), min(hi, int(e))
            if a < b:
                pieces.append((path, a - int(s), b - int(s)))
        return pieces

    def _consumer(self) -> tuple[int, int]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = self.rank, self.world_size
        if rank is None:
            dist = torch.distributed
            if dist.is_available() and dist.is_initialized():
                rank, world = dist.get_rank(), dist.get_world_size()
            else:
                rank, world = 0, 1
        return rank * nw + wid, world * nw

    def __iter__(self) -> Iterator[Any]:
        consumer, total = self._consumer()
        for path, start, stop in self.plan(consumer, total):
            if self.split == "record":
                ix = self.index()[path]
                if start >= stop:
                    continue
                end = (int(ix.offsets[stop]) if stop < len(ix)
                       else int(ix.offsets[-1] + 16 + ix.lengths[-1]))
                reader = RecordReader(path, verify_crc=self.verify_crc, on_error=self.on_error,
                                      start_offset=int(ix.offsets[start]), first_record=start,
                                      end_offset=end)
            else:
                reader = RecordReader(path, verify_crc=self.verify_crc, on_error=self.on_error,
                                      compression=self.compression)
            for record in reader:
                item = (record if self.schema is None
                        else decode_example(record, self.schema, backend=self.backend))
                yield self.transform(item) if self.transform is not None else item


def collate_examples(batch: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch decoded examples: equal-shape numeric values are stacked into a tensor
    ``[B, *shape]``; variable-length or ``bytes`` values stay a list of ``B`` items."""
    if not batch:
        return {}
    out: dict[str, Any] = {}
    for name in batch[0]:
        vals = [ex[name] for ex in batch]
        first = vals[0]
        numeric = all(
            (isinstance(v, torch.Tensor)
             or (isinstance(v, np.ndarray) and v.dtype != object)) for v in vals)
        if numeric and all(tuple(v.shape) == tuple(first.shape) for v in vals):
            out[name] = torch.stack([torch.as_tensor(v) for v in vals])
        else:
            out[name] = vals
    return out
