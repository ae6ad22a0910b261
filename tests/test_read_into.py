"""ShardReader.read_into / ShardSet.read_into: a record copied straight into the caller's arrays (issue 23).

The trainer's loader copies every record it reads into its batch buffers; read_into does that without
building a Record of seven views. It must copy exactly what the Record holds, check exactly what reading
the Record checks (the checksum on every read of a verifying reader), and fail with the same errors,
naming the shard and the record.
"""

import shutil
import struct

import lmdb
import numpy as np
import pytest
import torch
from helpers import random_record
from train_synth import write_dataset

from regionbert.data import CorruptRecordError, ShardError, ShardReader, ShardSet, ShardWriter
from regionbert.data import reader as reader_module
from regionbert.data.format import decode_record, encode_record
from regionbert.data.synth import COCO_CLASSES, write_synthetic_shard
from regionbert.train.data import PairDataset, Pairs, collate
from regionbert.train.text import Text

SENTINEL = 7.0  # what the caller's arrays hold before: rows past the record's must keep it


def _buffers(rows: int, dim: int, classes: int, loc: int = 7):
    return (np.full((rows, dim), SENTINEL, np.float16), np.full((rows, loc), SENTINEL, np.float32),
            np.full((rows, classes), SENTINEL, np.float16))


@pytest.fixture(scope="module")
def two_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("shards")
    paths = [str(root / f"shard-{i}") for i in range(2)]
    for i, p in enumerate(paths):
        write_synthetic_shard(p, 12, feature_dim=24, min_boxes=0, max_boxes=9, id_prefix=f"s{i}")
    return paths


@pytest.mark.parametrize("loc", ["loc7", "loc5"])
@pytest.mark.parametrize("rows", [9, 4])  # room for every box, or fewer rows than some records have
def test_read_into_copies_what_the_record_holds(two_shards, loc, rows, monkeypatch):
    shards = ShardSet(two_shards)
    C = len(shards.meta["class_names"])
    decoded = []  # records decoded into a Record by read_into: none, for good records
    monkeypatch.setattr(reader_module, "decode_record", lambda *a: decoded.append(a) or decode_record(*a))
    for i in list(range(len(shards))) + [-1, -13]:
        rec = shards[i]
        feats, locs, probs = _buffers(rows, 24, C, 7 if loc == "loc7" else 5)
        decoded.clear()
        n, name = shards.read_into(i, feats, locs, probs, loc=loc)
        assert not decoded
        k = min(rec.num_boxes, rows)
        assert (n, name) == (rec.num_boxes, rec.id)
        np.testing.assert_array_equal(feats[:k], rec.features[:k])
        np.testing.assert_array_equal(locs[:k], getattr(rec, loc)[:k])
        np.testing.assert_array_equal(probs[:k], rec.class_probs[:k])
        for a in (feats, locs, probs):
            assert (a[k:] == SENTINEL).all()  # nothing written past the record's rows
    with pytest.raises(ValueError, match="loc must be"):
        shards.read_into(0, feats, locs, probs, loc="boxes")


def test_read_into_zeroes_class_probs_a_shard_does_not_store(tmp_path):
    rng = np.random.default_rng(0)
    with ShardWriter(tmp_path / "s", feature_dim=8, class_names=None) as w:
        w.add("a", **{**random_record(rng, n=3, dim=8), "class_probs": None})
    feats, locs, probs = _buffers(5, 8, 4)
    assert ShardReader(tmp_path / "s").read_into(0, feats, locs, probs) == (3, "a")
    assert (probs[:3] == 0).all() and (probs[3:] == SENTINEL).all()
    assert ShardReader(tmp_path / "s").read_into(0, feats, locs) == (3, "a")  # no class_probs array: fine


def test_read_into_reads_an_incomplete_shard(tmp_path):
    rng = np.random.default_rng(1)
    with pytest.raises(RuntimeError), ShardWriter(tmp_path / "s", feature_dim=8, class_names=COCO_CLASSES) as w:
        for i in range(3):
            w.add(str(i), **random_record(rng, n=2 + i, dim=8))
        raise RuntimeError("job died")
    with pytest.warns(UserWarning, match="incomplete"):
        r = ShardReader(tmp_path / "s")
    for i in range(3):
        feats, locs, probs = _buffers(6, 8, len(COCO_CLASSES))
        assert r.read_into(i, feats, locs, probs) == (2 + i, str(i))
        np.testing.assert_array_equal(feats[:2 + i], r[i].features)


def _put(shard: str, write) -> None:
    """Change a shard's LMDB tables in place, bypassing the writer: write(txn, records, order)."""
    env = lmdb.open(shard, subdir=True, max_dbs=3)
    try:
        records, order = env.open_db(b"records"), env.open_db(b"order")
        with env.begin(write=True) as txn:
            write(txn, records, order)
    finally:
        env.close()


def _edit_value(index: int, edit):
    def write(txn, records, order):
        key = bytes(txn.get(struct.pack(">Q", index), db=order))
        txn.put(key, edit(key, bytearray(txn.get(key, db=records))), db=records)
    return write


def _flip(at):
    def edit(key, v):
        v[at(v)] ^= 0x10
        return bytes(v)
    return edit


def _more_boxes(key, v):  # a well-formed record (valid checksum) with more boxes than the table says
    args = random_record(np.random.default_rng(5), n=11, dim=24)
    return encode_record(key, args["width"], args["height"], args["boxes"].astype(np.float32),
                         args["features"].astype(np.float16), args["class_probs"].astype(np.float16))


DAMAGE = {
    "a feature byte flipped": _edit_value(3, _flip(lambda v: len(v) // 2)),
    "the checksum flipped": _edit_value(3, _flip(lambda v: len(v) - 3)),
    "bad magic": _edit_value(3, _flip(lambda v: 0)),
    "header D changed": _edit_value(3, _flip(lambda v: 24)),
    "truncated": _edit_value(3, lambda key, v: bytes(v[:len(v) - 20])),
    "shorter than a header": _edit_value(3, lambda key, v: bytes(v[:30])),
    "more boxes than the table says": _edit_value(3, _more_boxes),
    "order entry names no record": lambda txn, records, order: txn.put(struct.pack(">Q", 3), b"nobody", db=order),
    "order entry too long": lambda txn, records, order: txn.put(struct.pack(">Q", 3), b"x" * 600, db=order),
}


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_read_into_fails_as_reading_the_record_fails(tmp_path, damage):
    path = str(tmp_path / "shard")
    write_synthetic_shard(path, 6, feature_dim=24, min_boxes=4, max_boxes=9, seed=2)
    _put(path, DAMAGE[damage])
    reader = ShardReader(path)
    reader.box_counts()  # the trainer's readers compare every record with the box-count table
    with pytest.raises(ShardError) as expected:
        reader[3]
    feats, locs, probs = _buffers(9, 24, len(COCO_CLASSES))
    with pytest.raises(ShardError) as got:
        reader.read_into(3, feats, locs, probs)
    assert type(got.value) is type(expected.value) and str(got.value) == str(expected.value)
    assert path in str(got.value)
    if damage != "order entry too long":  # (that names the order entry)
        assert "synth/00000003" in str(got.value) or "nobody" in str(got.value)
    for i in (0, 5):  # the other records still read
        assert reader.read_into(i, feats, locs, probs)[1] == reader[i].id


def test_a_verifying_reader_checks_every_read_and_only_it_may_skip(tmp_path):
    path = str(tmp_path / "shard")
    write_synthetic_shard(path, 6, feature_dim=24, min_boxes=4, max_boxes=9, seed=2)
    _put(path, DAMAGE["a feature byte flipped"])
    feats, locs, probs = _buffers(9, 24, len(COCO_CLASSES))
    reader = ShardReader(path)
    for _ in range(2):  # every read, not the first only
        with pytest.raises(CorruptRecordError, match="record 'synth/00000003': checksum mismatch"):
            reader.read_into(3, feats, locs, probs)
    unverified = ShardReader(path, verify=False)  # a reader told not to verify copies what is there
    n = unverified[3].num_boxes
    assert unverified.read_into(3, feats, locs, probs) == (n, "synth/00000003")
    np.testing.assert_array_equal(feats[:n], unverified[3].features)


def _trainer(data: dict):
    text = Text(data["tokenizer"], max_len=24)
    shards = ShardSet(data["shards"])
    pairs = Pairs(shards, data["captions"], text, "train")
    return PairDataset(shards, pairs, text), pairs


def test_the_trainer_reads_checked_images_straight_into_its_batch(tmp_path, monkeypatch):
    """Once an image's record has passed the record rules (its first read, a Record: the rules need its boxes),
    the trainer's batches read it with read_into: no Record is built, and the batch is the same."""
    data = write_dataset(str(tmp_path / "data"), 8, 0, feature_dim=16, min_boxes=3, max_boxes=12)
    ds, pairs = _trainer(data)
    decoded = []
    monkeypatch.setattr(reader_module, "decode_record", lambda *a: decoded.append(a) or decode_record(*a))
    for task in ("mlm", "mrfr", "itm"):
        keys = [(task, p, -1 if p % 3 else int(pairs.image[p] + 1) % 8, (0, 0, 0, p)) for p in range(len(pairs))]
        decoded.clear()
        first = collate(ds.__getitems__(keys))
        assert len(decoded) == (len(keys) if task == "mlm" else 0)  # rows of images not checked yet: 1st batch
        decoded.clear()
        again = collate(ds.__getitems__(keys))
        assert not decoded
        assert first.keys() == again.keys()
        for k, v in first.items():
            assert torch.equal(v, again[k]) if torch.is_tensor(v) else v == again[k], k


def test_the_trainer_still_verifies_every_read(tmp_path):
    data = write_dataset(str(tmp_path / "data"), 8, 0, feature_dim=16, min_boxes=3, max_boxes=12)
    data["shards"] = shutil.copytree(data["shards"], str(tmp_path / "damaged"))  # (not open in this process)
    _put(data["shards"], DAMAGE["a feature byte flipped"])  # record 3's checksum no longer matches
    ds, pairs = _trainer(data)
    ds._checked[:] = True  # as on a later pass: every image's rules checked, so every read is read_into's
    keys = [("mlm", p, -1, (0, 0, 0, p)) for p in range(len(pairs))]
    for _ in range(2):
        with pytest.raises(CorruptRecordError, match=f"^{data['shards']}: record 'synth/00000003': checksum mismatch"):
            ds.__getitems__(keys)


def test_collate_measures_edited_samples_itself(tmp_path):
    """collate takes a batch's lengths from PairDataset only for samples it finds unedited: a sample given a
    shorter text or fewer regions is padded by its own lengths."""
    data = write_dataset(str(tmp_path / "data"), 8, 0, feature_dim=16, min_boxes=3, max_boxes=12)
    ds, pairs = _trainer(data)
    for task in ("mlm", "mrfr", "itm"):
        samples = ds.__getitems__([(task, p, -1, (0, 0, 0, p)) for p in range(len(pairs))])
        whole = collate(samples)
        assert whole["text_lens"].tolist() == [len(s["input_ids"]) for s in samples]
        assert whole["region_lens"].tolist() == [len(s["features"]) for s in samples]
        edited = [dict(s) for s in samples]
        edited[0]["input_ids"], edited[0]["mlm_labels"] = edited[0]["input_ids"][:2], edited[0]["mlm_labels"][:2]
        for k in ("features", "locations", "class_probs", "region_mask"):
            edited[1][k] = edited[1][k][:1]
        batch = collate(edited)
        assert batch["text_lens"][0] == 2 and batch["region_lens"][1] == 1
        assert (batch["input_ids"][0, 2:] == 0).all() and (batch["features"][1, 1:] == 0).all()
        assert not batch["region_mask"][1, 1:].any()
        assert torch.equal(batch["input_ids"][2:], whole["input_ids"][2:, :batch["input_ids"].shape[1]])
