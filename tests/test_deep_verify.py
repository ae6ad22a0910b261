"""Deep verify: records with valid checksums but impossible content are found by `verify` (naming shard,
key and rule) and refused by the writer; the rules' tolerances hold for what real producers write."""

import json
import struct

import lmdb
import numpy as np
import pytest
from helpers import random_record

from regionbert.data import ShardError, ShardWriter, verify_shard
from regionbert.data.checks import check_id, check_record, prob_sum_tolerance
from regionbert.data.cli import main
from regionbert.data.format import content_hash_of, decode_record, location_vectors, record_checksum
from regionbert.data.synth import COCO_CLASSES, write_synthetic_shard

ATTRS = ["red", "furry", "wet", "none"]


def _shard(path, n=6, attrs=False):
    rng = np.random.default_rng(0)
    with ShardWriter(path, feature_dim=8, class_names=COCO_CLASSES, attribute_names=ATTRS if attrs else None) as w:
        for i in range(n):
            w.add(f"img/{i}", **random_record(rng, n=4, dim=8, attrs=len(ATTRS) if attrs else 0))
    return str(path)


def forge(shard: str, index: int, mutate=None, new_key: bytes | None = None) -> bytes:
    """Rewrite record `index` in place, bypassing the writer, with a valid checksum (a hand-made hostile
    record). mutate(rec) edits writable views of the record's arrays. Returns the key it is stored under."""
    env = lmdb.open(shard, subdir=True, max_dbs=3)
    try:
        records, order = env.open_db(b"records"), env.open_db(b"order")
        with env.begin(write=True) as txn:
            pos = struct.pack(">Q", index)
            key = bytes(txn.get(pos, db=order))
            value = bytearray(txn.get(key, db=records))
            if mutate:
                mutate(decode_record(key, value, verify=False))  # views of `value`: writable
            if new_key is not None:
                txn.delete(key, db=records)
                txn.put(pos, new_key, db=order)
                key = new_key
            end = len(value) - 8
            struct.pack_into("<Q", value, end, record_checksum(key, memoryview(value)[:end]))
            txn.put(key, bytes(value), db=records)
        with env.begin(write=True) as txn:  # a thorough forger also fixes the stored content hash
            meta_db = env.open_db(b"meta", txn=txn)
            state = json.loads(bytes(txn.get(b"state", db=meta_db)))
            if "content_hash" in state:
                meta = json.loads(bytes(txn.get(b"shard", db=meta_db)))
                state["content_hash"] = content_hash_of(txn, records, order, meta, shard)
                txn.put(b"state", json.dumps(state).encode(), db=meta_db)
    finally:
        env.close()
    return key


def set_boxes(rec, boxes):
    """New boxes with their true location vectors (so only the box rules can complain)."""
    rec.boxes[:] = boxes
    rec.loc5[:], rec.loc7[:] = location_vectors(rec.boxes, rec.width, rec.height)


def _box0(rec, box):
    b = np.array(rec.boxes)
    b[0] = box(rec.width, rec.height)
    set_boxes(rec, b)


def _scale_loc5(rec):
    rec.loc5[:] = location_vectors(rec.boxes, rec.width * 2, rec.height)[0]  # another image's width


def _class_sum(rec, scale):
    rec.class_probs[1] = (np.asarray(rec.class_probs[1], np.float32) * scale).astype(np.float16)


def _negative(rec):
    p = np.asarray(rec.class_probs[2], np.float32)
    i, j = np.argsort(p)[-2:]
    p[j] += p[i] + 0.25  # still sums to 1
    p[i] = -0.25
    rec.class_probs[2] = p.astype(np.float16)


HOSTILE = {  # rule -> how to break it (on record 2 of the shard)
    "features-finite": lambda r: r.features.__setitem__((1, 3), np.nan),
    "boxes-finite": lambda r: r.boxes.__setitem__((0, 2), np.inf),
    "loc7-finite": lambda r: r.loc7.__setitem__((3, 6), np.nan),
    "box-order": lambda r: _box0(r, lambda W, H: [50, 10, 20, 40]),  # x1 > x2
    "box-inside": lambda r: _box0(r, lambda W, H: [10, 10, W + 5, 40]),  # 5 px past the right edge
    "loc5-matches-boxes": _scale_loc5,
    "loc7-matches-boxes": lambda r: r.loc7.__setitem__((0, 4), r.loc7[0, 4] + 1e-3),
    "class_probs-sum": lambda r: _class_sum(r, 0.99),  # 1% of the mass missing: the old writer let 2% pass
    "class_probs-nonnegative": _negative,
    "attr_probs-sum": lambda r: r.attr_probs.__setitem__((0, 0), r.attr_probs[0, 0] + np.float16(0.1)),
}


@pytest.mark.parametrize("rule", sorted(HOSTILE))
def test_verify_names_shard_key_and_rule_of_a_hostile_record(tmp_path, capsys, rule):
    shard = _shard(tmp_path / "s", attrs=rule.startswith("attr"))
    key = forge(shard, 2, HOSTILE[rule]).decode()
    assert main(["verify", "-q", shard]) == 1
    out = capsys.readouterr().out
    assert f"FAILED {shard}: 6/6 records checked, 1 bad" in out, out
    bad = [line for line in out.splitlines() if "bad record" in line]
    assert len(bad) == 1 and f"bad record {key!r}: rule {rule}:" in bad[0], out
    # the same through the API: the checksum is fine, the meaning is not
    r = verify_shard(shard)
    assert [k for k, _ in r.bad] == [key] and r.bad[0][1].startswith(f"rule {rule}:")


@pytest.mark.parametrize("new_key,rule", [(b"img/\x00nul", "id-nul"), (b"img/\xff\xfe", "id-utf8")])
def test_verify_names_bad_ids(tmp_path, capsys, new_key, rule):
    shard = _shard(tmp_path / "s")
    forge(shard, 4, new_key=new_key)
    assert main(["verify", "-q", shard]) == 1
    out = capsys.readouterr().out
    assert f"rule {rule}:" in out and "1 bad" in out, out


def test_a_box_within_one_pixel_of_the_image_passes(tmp_path, capsys):
    shard = _shard(tmp_path / "s")
    forge(shard, 1, lambda r: _box0(r, lambda W, H: [-0.75, -0.5, W + 0.9, H + 1.0]))
    assert main(["verify", "-q", shard]) == 0, capsys.readouterr().out


def test_writer_refuses_what_verify_would_flag(tmp_path):
    rng = np.random.default_rng(1)
    path = str(tmp_path / "s")
    with ShardWriter(path, feature_dim=8, class_names=COCO_CLASSES, attribute_names=ATTRS) as w:
        good = random_record(rng, n=3, dim=8, attrs=len(ATTRS))
        w.add("ok", **good)
        short = dict(good, class_probs=good["class_probs"] * 0.99)  # passed the old 2% tolerance
        with pytest.raises(ShardError, match=rf"{path}: record 'short'.*rule class_probs-sum"):
            w.add("short", **short)
        bad_attrs = dict(good, attr_probs=np.full((3, len(ATTRS)), 0.5))  # independent scores, not a distribution
        with pytest.raises(ShardError, match=r"record 'attrs'.*rule attr_probs-sum"):
            w.add("attrs", **bad_attrs)
        with pytest.raises(ShardError, match=r"NUL"):  # encode_key refuses it before the rules run
            w.add("a\x00b", **good)
    assert verify_shard(path).ok and verify_shard(path).count == 1


@pytest.mark.parametrize("c", [2, 4, 91, 1601])
def test_float16_rounding_stays_inside_the_sum_tolerance(c):
    """The tolerance is sound: float32 distributions of every shape (peaked, flat, with tiny and subnormal
    values) rounded to float16 sum to 1 within prob_sum_tolerance(C); losing 0.2% of the mass is caught."""
    rng = np.random.default_rng(c)
    worst = 0.0
    for scale in (0.1, 1.0, 5.0, 20.0, 60.0):
        logits = (rng.standard_normal((400, c)) * scale).astype(np.float32)
        p = np.exp(logits - logits.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        stored = p.astype(np.float16).astype(np.float64)
        worst = max(worst, float(np.abs(stored.sum(1) - 1).max()))
    assert worst <= prob_sum_tolerance(c)
    short = (p[:50] * np.float32(0.998)).astype(np.float16).astype(np.float64)
    assert (np.abs(short.sum(1) - 1) > prob_sum_tolerance(c)).all()


def test_check_id():
    assert check_id("coco/ü狗".encode()) == []
    assert check_id(b"a\x00b")[0].startswith("rule id-nul")
    assert check_id(b"\xc3")[0].startswith("rule id-utf8")


def test_producers_obey_the_rules(tmp_path):
    """Synthetic shards (float16 and float32), the tests' random records: every record passes every rule."""
    for dtype in ("float16", "float32"):
        path = str(tmp_path / dtype)
        write_synthetic_shard(path, 30, feature_dim=16, min_boxes=0, max_boxes=30, seed=3, feature_dtype=dtype)
        r = verify_shard(path)
        assert r.ok and r.checked == 30, r.bad
    rng = np.random.default_rng(5)
    from regionbert.data.format import encode_record

    for _ in range(50):
        a = random_record(rng, n=int(rng.integers(0, 20)), dim=4, attrs=3)
        value = encode_record(b"k", a["width"], a["height"], a["boxes"].astype(np.float32), a["features"],
                              a["class_probs"].astype(np.float16), a["attr_probs"].astype(np.float16))
        assert check_record(decode_record(b"k", value), b"k") == []


def test_npz_import_reports_a_row_that_breaks_a_rule(small_shard, tmp_path):
    """A foreign file whose class distribution does not sum to 1 is a bad row: skipped and listed, not stored."""
    folder = tmp_path / "npz"
    assert main(["export", small_shard, "--to", "uniter_npz", "-o", str(folder), "-q"]) == 0
    victim = next(p for p in sorted(folder.rglob("*.npz")) if np.load(p)["soft_labels"].shape[0] > 1)
    with np.load(victim, allow_pickle=False) as z:
        arrays = dict(z)
    arrays["soft_labels"][1] *= np.float16(0.99)  # the old writer let 2% pass
    np.savez(victim, **arrays)
    out = str(tmp_path / "s")
    assert main(["import", str(folder), "--sizes", str(folder / "image_sizes.csv"), "-o", out, "-q", "-j", "1",
                 "--on-error", "skip"]) == 1
    report = [json.loads(x) for x in open(out + ".import-errors.jsonl")]
    assert [r["file"] for r in report] == [str(victim)] and "rule class_probs-sum" in report[0]["reason"]
    assert verify_shard(out).ok
