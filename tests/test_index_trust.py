"""Indexes stay inside their folder, and readers (ShardSet, the trainer) catch a shard replaced since it was
indexed, from the count and content hash the shard stores."""

import json
import os
import subprocess
import sys

import pytest
from train_synth import write_dataset

from regionbert.data import ShardError, ShardReader, ShardSet, build_index, load_index, verify_shard
from regionbert.data.cli import main as shards_main
from regionbert.data.synth import write_synthetic_shard
from regionbert.train.cli import main as train_main


@pytest.fixture
def indexed(tmp_path):
    """shards/a, shards/b and shards/index.json over both."""
    folder = tmp_path / "shards"
    for name in ("a", "b"):
        write_synthetic_shard(str(folder / name), 6, feature_dim=8, min_boxes=0, max_boxes=4, seed=1, id_prefix=name)
    index = str(folder / "index.json")
    build_index(str(folder), index)
    return folder, index


TAMPER = """
import json, sys, lmdb
env = lmdb.open(sys.argv[1], subdir=True, max_dbs=3)
with env.begin(write=True) as txn:
    db = env.open_db(b"meta", txn=txn, create=False)
    state = json.loads(bytes(txn.get(b"state", db=db)))
    if sys.argv[2] == "drop":
        del state["content_hash"]
    else:
        state["content_hash"] = sys.argv[2]
    txn.put(b"state", json.dumps(state).encode(), db=db)
"""


def _tamper_state(path: str, how: str) -> None:
    """Change a shard's stored content hash, from another process (this one holds the shard open)."""
    subprocess.run([sys.executable, "-c", TAMPER, path, how], check=True, cwd="/")


def _rewrite(index: str, **paths) -> None:
    data = json.loads(open(index).read())
    for i, p in paths.items():
        data["shards"][int(i[1:])]["path"] = p
    open(index, "w").write(json.dumps(data))


@pytest.mark.parametrize("how", ["absolute", "dotdot", "symlink"])
def test_index_entries_may_not_leave_the_index_folder(indexed, tmp_path, capsys, how):
    folder, index = indexed
    outside = tmp_path / "elsewhere"
    write_synthetic_shard(str(outside), 6, feature_dim=8, min_boxes=0, max_boxes=4, seed=1, id_prefix="c")
    entry = {"absolute": str(outside), "dotdot": "../elsewhere", "symlink": "link"}[how]
    if how == "symlink":
        os.symlink(outside, folder / "link")
    # the entry keeps b's count and hash: only where it points changed
    data = json.loads(open(index).read())
    data["shards"][1]["path"] = entry
    data["shards"][1]["content_hash"] = ShardReader(str(outside)).state["content_hash"]
    open(index, "w").write(json.dumps(data))
    reason = {"absolute": "is absolute", "dotdot": "climbs out", "symlink": "resolves through a symlink"}[how]
    with pytest.raises(ShardError, match=f"shard entry 1: shard path '{entry}' {reason}.*--allow-outside"):
        load_index(index)
    with pytest.raises(ShardError, match=reason):
        ShardSet(index)
    for cmd in (["verify", "-q", index], ["inspect", index], ["show", index, "-o", str(tmp_path / "x.png")]):
        assert shards_main(cmd) == 2
        assert reason in capsys.readouterr().err
    # explicitly allowed: read as before
    assert len(ShardSet(index, allow_outside=True)) == 12
    assert shards_main(["verify", "-q", "--allow-outside", index]) == 0


def test_build_index_refuses_shards_outside_its_folder(indexed, tmp_path):
    folder, _ = indexed
    out = tmp_path / "sub" / "index.json"
    out.parent.mkdir()
    with pytest.raises(ShardError, match="climbs out of the index's folder"):
        build_index(str(folder), str(out))
    assert not out.exists()
    build_index(str(folder), str(out), allow_outside=True)
    assert len(ShardSet(str(out), allow_outside=True)) == 12
    assert shards_main(["index", str(folder), "-o", str(out), "-q"]) == 2
    assert shards_main(["index", str(folder), "-o", str(out), "-q", "--allow-outside"]) == 0


def test_index_entries_carry_count_and_hash(indexed):
    folder, index = indexed
    data = json.loads(open(index).read())
    for e in data["shards"]:
        assert e["content_hash"] == ShardReader(str(folder / e["path"])).state["content_hash"]
    del data["shards"][0]["content_hash"]
    open(index, "w").write(json.dumps(data))
    with pytest.raises(ShardError, match="shard entry 0 .* has no content_hash"):
        load_index(index)


def test_replaced_shard_is_caught_at_open(indexed):
    folder, index = indexed
    import shutil

    shutil.rmtree(folder / "b")  # same name, same count, other records
    write_synthetic_shard(str(folder / "b"), 6, feature_dim=8, min_boxes=0, max_boxes=4, seed=1, id_prefix="c")
    with pytest.raises(ShardError, match=f"{folder / 'b'} .*listed in .*index.json.*replaced since it was indexed"):
        ShardSet(index)
    assert len(ShardSet(str(folder))) == 12  # the folder itself, without the index, is fine


def test_shard_without_stored_hash_is_checked_by_computing_it(indexed):
    folder, index = indexed
    _tamper_state(str(folder / "a"), "drop")  # a shard from before hashes were stored
    assert len(ShardSet(index)) == 12
    _rewrite(index, s0="b", s1="a")  # entries swapped: counts agree, hashes do not
    with pytest.raises(ShardError, match="replaced since it was indexed"):
        ShardSet(index)


def test_verify_catches_a_stored_hash_that_lies(indexed):
    folder, _ = indexed
    path = str(folder / "a")
    _tamper_state(path, "xxh3_128:" + "0" * 32)
    report = verify_shard(path)
    assert not report.ok and any("stored content hash" in p for p in report.problems)


def test_trainer_names_a_replaced_shard(tmp_path, capsys):
    d = write_dataset(str(tmp_path / "d"), n_train=12, n_val=4, feature_dim=8, min_boxes=1, max_boxes=4)
    index = str(tmp_path / "d" / "index.json")
    build_index(d["shards"], index)
    import shutil

    shutil.rmtree(d["shards"])
    write_synthetic_shard(d["shards"], 16, feature_dim=8, min_boxes=1, max_boxes=4, seed=0, id_prefix="other")
    args = [f"--set=data.shards={index}", f"--set=data.captions={d['captions']}",
            f"--set=data.tokenizer={d['tokenizer']}", "--set=optim.steps=1", "--out", str(tmp_path / "run")]
    assert train_main(args) == 2
    err = capsys.readouterr().err
    assert d["shards"] in err and "replaced since it was indexed" in err, err
