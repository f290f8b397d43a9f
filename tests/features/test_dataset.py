"""TFRecordDataset: every record reaches exactly one (rank, worker); decoding; shuffling."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from mlatlas.features.dataset import TFRecordDataset, collate_examples
from mlatlas.features.example import FixedLenFeature, VarLenFeature, encode_example
from mlatlas.features.tfrecord import TFRecordWriter

pytestmark = pytest.mark.filterwarnings("ignore:This DataLoader will create:UserWarning")

SIZES = (5, 0, 8)  # record counts of the shards: uneven, one empty


def _shards(tmp_path, compression=None, sizes=SIZES) -> tuple[list[str], int]:
    paths, uid = [], 0
    for s, n in enumerate(sizes):
        path = tmp_path / f"part-{s:05d}.tfrecord{'.gz' if compression else ''}"
        with TFRecordWriter(path, compression) as w:
            for _ in range(n):
                w.write(encode_example({"uid": uid, "tok": np.arange(uid % 3, dtype=np.int64)}))
                uid += 1
        paths.append(str(path))
    return paths, uid


SCHEMA = {"uid": FixedLenFeature((), "int64"), "tok": VarLenFeature("int64")}


def _uids(ds, num_workers: int) -> list[int]:
    loader = DataLoader(ds, batch_size=None, num_workers=num_workers,
                        multiprocessing_context="fork" if num_workers else None)
    return [int(ex["uid"]) for ex in loader]


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_exactly_once_over_ranks_and_workers(tmp_path, world_size):
    """Union over ranks x DataLoader workers (0..3) = every record exactly once; 3 ranks x 3
    workers = 9 consumers for 13 records in 2 non-empty shards."""
    paths, total = _shards(tmp_path)
    for num_workers in (0, 1, 2, 3):
        seen = collections.Counter()
        for rank in range(world_size):
            ds = TFRecordDataset(paths, SCHEMA, rank=rank, world_size=world_size)
            seen.update(_uids(ds, num_workers))
        assert sorted(seen) == list(range(total)), (world_size, num_workers)
        assert set(seen.values()) == {1}, (world_size, num_workers)


@pytest.mark.parametrize("split,compression", [("shard", "gzip"), ("shard", None),
                                               ("record", None)])
def test_plan_covers_every_record_once(tmp_path, split, compression):
    paths, total = _shards(tmp_path, compression, sizes=(4, 7, 1, 0, 3))
    for shuffle in (False, True):
        ds = TFRecordDataset(paths, SCHEMA, shuffle, seed=3, split=split,
                             compression=compression, rank=0, world_size=1)
        for consumers in (1, 2, 3, 4, 6, 9):
            seen = collections.Counter()
            for c in range(consumers):
                for path, start, stop in ds.plan(c, consumers):
                    stop = {p: n for p, n in zip(paths, (4, 7, 1, 0, 3))}[path] if stop < 0 \
                        else stop
                    seen.update(f"{path}:{i}" for i in range(start, stop))
            assert len(seen) == total and set(seen.values()) == {1}
    # and for real, through DataLoader workers of two ranks
    seen = collections.Counter()
    for rank in range(2):
        ds = TFRecordDataset(paths, SCHEMA, True, seed=1, split=split, compression=compression,
                             rank=rank, world_size=2)
        seen.update(_uids(ds, 3))
    assert sorted(seen) == list(range(total)) and set(seen.values()) == {1}


def test_shuffle_is_seeded_and_follows_the_epoch(tmp_path):
    paths, _ = _shards(tmp_path, sizes=(1,) * 12)
    a = TFRecordDataset(paths, shuffle_shards=True, seed=5)
    b = TFRecordDataset(paths, shuffle_shards=True, seed=5)
    assert a.shard_order() == b.shard_order() != paths
    first = a.shard_order()
    a.set_epoch(1)
    assert a.shard_order() != first and sorted(a.shard_order()) == sorted(paths)
    assert TFRecordDataset(paths).shard_order() == paths


def test_distributed_rank_is_read_from_torch_distributed(tmp_path, monkeypatch):
    paths, total = _shards(tmp_path)
    dist = torch.distributed
    monkeypatch.setattr(dist, "is_available", lambda: True)
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    got = []
    for rank in range(2):
        monkeypatch.setattr(dist, "get_rank", lambda rank=rank: rank)
        got.append([int(ex["uid"]) for ex in TFRecordDataset(paths, SCHEMA)])
    assert got[0] == list(range(total // 2)) and got[1] == list(range(total // 2, total))


def test_decoding_collation_and_raw_bytes(tmp_path):
    paths, total = _shards(tmp_path)
    ds = TFRecordDataset(paths, SCHEMA, backend="torch")
    assert len(ds) == total
    batch = next(iter(DataLoader(ds, batch_size=4, collate_fn=collate_examples)))
    assert torch.equal(batch["uid"], torch.arange(4))
    assert [t.tolist() for t in batch["tok"]] == [[], [0], [0, 1], []]
    raw = list(TFRecordDataset(paths))
    assert len(raw) == total and isinstance(raw[0], bytes)


def test_bad_arguments(tmp_path):
    paths, _ = _shards(tmp_path)
    with pytest.raises(FileNotFoundError, match="no such TFRecord"):
        TFRecordDataset([str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="split must be"):
        TFRecordDataset(paths, split="rows")
    with pytest.raises(ValueError, match="needs uncompressed"):
        TFRecordDataset(paths, split="record", compression="gzip")
    with pytest.raises(ValueError, match="rank must be in"):
        TFRecordDataset(paths, rank=2, world_size=2)
    with pytest.raises(ValueError, match="at least one"):
        TFRecordDataset([])
    with pytest.raises(ValueError, match="pass both rank and world_size, or neither"):
        TFRecordDataset(paths, rank=0)
    with pytest.raises(ValueError, match=r"consumer must be in \[0, 3\), got 3"):
        TFRecordDataset(paths).plan(3, 3)
    (tmp_path / "gz").mkdir()
    gz, _ = _shards(tmp_path / "gz", "gzip")
    with pytest.raises(TypeError, match=r"len\(\) of a compressed TFRecordDataset"):
        len(TFRecordDataset(gz, compression="gzip"))
