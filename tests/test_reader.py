"""Readers: integer and key access, many shards as one, DataLoader workers, flat memory."""

import json
import os

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

from regionbert.data import ShardError, ShardMismatchError, ShardReader, ShardSet, build_index
from regionbert.data.synth import write_synthetic_shard


@pytest.fixture
def shard_folder(tmp_path):
    root = tmp_path / "shards"
    for i, n in enumerate([30, 0, 25]):  # an empty shard in the middle is legal
        write_synthetic_shard(str(root / f"shard-{i:03d}"), n, feature_dim=64, max_boxes=20, seed=7,
                              id_prefix=f"job{i}")
    return root


def test_index_and_key_access_agree(small_shard):
    r = ShardReader(small_shard)
    keys = list(r.keys())
    assert len(keys) == len(r) == 40 and len(set(keys)) == 40
    for i in (0, 17, 39, -1):
        assert r[i].id == keys[i]
        assert np.array_equal(r[i].features, r.get(keys[i]).features)
    assert keys[5] in r and "nope" not in r
    with pytest.raises(IndexError):
        r[40]
    with pytest.raises(KeyError, match="nope"):
        r.get("nope")


def test_shardset_over_folder_index_and_list(shard_folder, tmp_path):
    by_folder = ShardSet(shard_folder)
    assert len(by_folder) == 55
    idx = tmp_path / "index.json"
    build_index(str(shard_folder), str(idx))
    by_index = ShardSet(str(idx))
    by_list = ShardSet([str(shard_folder / "shard-002"), str(shard_folder / "shard-000")])
    assert list(by_index.keys()) == list(by_folder.keys())
    assert [by_index[i].id for i in range(55)] == list(by_folder.keys())
    assert by_folder[30].id == "job2/00000000" and by_folder[-1].id == "job2/00000024"
    assert by_list[0].id == "job2/00000000" and len(by_list) == 55
    assert np.array_equal(by_folder.get("job2/00000003").boxes, by_folder[33].boxes)
    with pytest.raises(KeyError):
        by_folder.get("job1/00000000")


def test_index_survives_moving_the_folder(shard_folder, tmp_path):
    build_index(str(shard_folder), str(shard_folder / "index.json"))
    moved = tmp_path / "published"
    os.rename(shard_folder, moved)
    assert len(ShardSet(str(moved / "index.json"))) == 55


def test_shardset_refuses_mixed_settings(shard_folder):
    write_synthetic_shard(str(shard_folder / "shard-009"), 3, feature_dim=32, seed=7)
    with pytest.raises(ShardMismatchError, match="feature_dim"):
        ShardSet(shard_folder)
    assert len(ShardSet(shard_folder, check_settings=False)) == 58


def test_shardset_refuses_stale_index(shard_folder, tmp_path):
    idx = tmp_path / "index.json"
    build_index(str(shard_folder), str(idx))
    data = json.loads(idx.read_text())
    data["shards"][0]["count"] += 1
    idx.write_text(json.dumps(data))
    with pytest.raises(ShardError, match="changed since they were indexed"):
        ShardSet(str(idx))


def test_not_a_shard(tmp_path):
    with pytest.raises(ShardError, match="no such shard"):
        ShardSet(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ShardError, match="no shards found"):
        ShardSet(str(tmp_path / "empty"))
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ShardError, match="cannot read index"):
        ShardSet(str(tmp_path / "junk.json"))


class RegionDataset(Dataset):
    def __init__(self, shards):
        self.shards = shards

    def __len__(self):
        return len(self.shards)

    def __getitem__(self, i):
        rec = self.shards[i]
        return {"id": rec.id, "pid": os.getpid(), "n": rec.num_boxes,
                "feat_sum": float(rec.features.astype(np.float64).sum()),
                "probs": torch.from_numpy(rec.class_probs.astype(np.float32))}


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_dataloader_workers_read_one_shard_set(shard_folder, context):
    shards = ShardSet(shard_folder)
    len(shards), shards[0]  # the parent has an open handle before the workers start
    loader = DataLoader(RegionDataset(shards), batch_size=None, num_workers=2, multiprocessing_context=context,
                        shuffle=False)
    seen = list(loader)
    assert [s["id"] for s in seen] == list(shards.keys())
    assert {s["pid"] for s in seen} - {os.getpid()} and os.getpid() not in {s["pid"] for s in seen}
    for s in seen[::7]:
        rec = shards.get(s["id"])
        assert s["feat_sum"] == float(rec.features.astype(np.float64).sum())
        assert torch.equal(s["probs"], torch.from_numpy(rec.class_probs.astype(np.float32)))


def _rss_anon_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("RssAnon:"))


def test_memory_stays_flat_while_reading(tmp_path):
    path = str(tmp_path / "big")
    write_synthetic_shard(path, 400, feature_dim=1024, min_boxes=50, max_boxes=100, seed=0)  # ~75 MB
    r = ShardReader(path)
    for i in range(0, 400, 50):  # warm up allocators
        r[i].features.astype(np.float32).sum()
    before = _rss_anon_kib()
    total = 0.0
    for _ in range(3):
        for i in np.random.default_rng(0).permutation(len(r)):
            total += float(r[int(i)].features[0, 0])
    grown = _rss_anon_kib() - before
    assert grown < 16 * 1024, f"anonymous memory grew by {grown} KiB reading a 75 MB shard three times"


def test_a_shard_written_anew_at_the_same_path_is_read_anew(tmp_path):
    import shutil

    path = str(tmp_path / "s")
    write_synthetic_shard(path, 3, feature_dim=16, max_boxes=11, seed=1)
    old = ShardReader(path)[0]
    shutil.rmtree(path)
    write_synthetic_shard(path, 5, feature_dim=16, max_boxes=11, seed=2)
    r = ShardReader(path)
    assert len(r) == 5 and not np.array_equal(r[0].features, old.features)
    assert old.features.sum() == old.features.sum()  # the old view still reads its (deleted) file
    assert ShardSet([path])[np.int64(4)].id == "synth/00000004"  # numpy integers index too
