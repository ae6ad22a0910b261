"""Hostile metadata and odd ids: hand-made shards with valid checksums but metadata of the wrong type or
absurd depth, empty or dangling order entries, ids that are not UTF-8 or hold NUL; `show --root` ids that
escape; folder-mode symlinks that leave the image root. Every one is a clean ShardError (or the commands'
exit code 2 with a message naming the shard), never a traceback."""

import json
import os

import lmdb
import numpy as np
import pytest
from helpers import random_record
from PIL import Image

from regionbert.data import ShardError, ShardReader, ShardSet, ShardWriter, verify_shard
from regionbert.data.cli import main as shards_main
from regionbert.data.format import encode_key, encode_record, make_meta, order_key
from regionbert.data.synth import COCO_CLASSES

META = make_meta(32, "float16", COCO_CLASSES, None, {"name": "hand-made"}, "2026-01-01T00:00:00Z")
STATE = {"count": 2, "complete": True, "updated": "2026-01-01T00:00:00Z"}


def _value(key: bytes, seed: int = 0) -> bytes:
    r = random_record(np.random.default_rng(seed))
    return encode_record(key, r["width"], r["height"], np.asarray(r["boxes"], np.float32),
                         r["features"].astype(np.float16), r["class_probs"].astype(np.float16))


def make_shard(path, meta=META, state=STATE, records=None, order=None) -> str:
    """A shard written byte by byte: meta/state as given (dict -> JSON, bytes as is), records {key: value},
    order [key, ...] (default: the records' keys)."""
    records = {b"a": _value(b"a"), b"b": _value(b"b", 1)} if records is None else records
    order = list(records) if order is None else order
    raw = lambda x: x if isinstance(x, bytes) else json.dumps(x).encode()  # noqa: E731
    env = lmdb.open(str(path), subdir=True, max_dbs=3, map_size=1 << 24)
    rec_db, order_db, meta_db = (env.open_db(n) for n in (b"records", b"order", b"meta"))
    with env.begin(write=True) as txn:
        for k, v in records.items():
            txn.put(k, v, db=rec_db)
        for i, k in enumerate(order):
            txn.put(order_key(i), k, db=order_db)
        txn.put(b"shard", raw(meta), db=meta_db)
        txn.put(b"state", raw(state), db=meta_db)
    env.close()
    return str(path)


def _deep(n: int) -> dict:
    d = {}
    for _ in range(n):
        d = {"x": d}
    return d


@pytest.mark.parametrize("meta,state,message", [
    (b"[1, 2]", STATE, "shard metadata must be a JSON object, got list"),
    (b"[" * 200_000 + b"]" * 200_000, STATE, "shard metadata is not valid UTF-8 JSON"),
    (b"\xff\xfe{}", STATE, "shard metadata is not valid UTF-8 JSON"),
    ({**META, "extractor": _deep(40)}, STATE, "shard metadata nests deeper than 32 levels"),
    ({**META, "extractor": ["detector"]}, STATE, "extractor must be a JSON object, got list"),
    ({**META, "extractor": {"job": 3}}, STATE, "extractor.job must be a JSON object"),
    ({**META, "feature_dim": True}, STATE, "bad feature_dim True"),
    ({**META, "class_names": "person"}, STATE, "class_names must be a list of strings"),
    (META, b'"complete"', "shard state must be a JSON object, got str"),
    (META, {**STATE, "count": "2"}, "shard state count must be a non-negative integer"),
    (META, {**STATE, "complete": "yes"}, "shard state complete must be true or false"),
    (META, {**STATE, "content_hash": 5}, "shard state content_hash must be a string"),
    (META, b"{" * 100_000, "shard state is not valid UTF-8 JSON"),
])
def test_hostile_metadata_is_a_clean_error(tmp_path, capsys, meta, state, message):
    path = make_shard(tmp_path / "s", meta=meta, state=state)
    with pytest.raises(ShardError, match=f"{path}: {message}"):
        ShardReader(path)
    with pytest.raises(ShardError, match=message):
        ShardSet(str(tmp_path))
    report = verify_shard(path)
    assert not report.ok and message in report.problems[0]
    for cmd in (["inspect", path], ["verify", "-q", path], ["index", path, "-o", str(tmp_path / "i.json")],
                ["show", path, "-o", str(tmp_path / "x.png")], ["export", path, "--to", "hdf5", "-q",
                                                                 "-o", str(tmp_path / "x.h5")]):
        assert shards_main(cmd) in (1, 2), cmd
        err = capsys.readouterr().err + capsys.readouterr().out
        assert "Traceback" not in err


def test_empty_and_dangling_order_entries(tmp_path, capsys):
    records = {b"a": _value(b"a"), b"b": _value(b"b", 1)}
    path = make_shard(tmp_path / "s", records=records, order=[b"a", b"", b"gone"],
                      state={**STATE, "count": 3})
    r = ShardReader(path)
    assert len(r) == 3 and r[0].id == "a"
    with pytest.raises(ShardError, match=f"{path}: order table entry 1 is 0 bytes, not an id"):
        r[1]
    with pytest.raises(ShardError, match=f"{path}: order table entry 2 names 'gone', which has no record"):
        r[2]
    report = verify_shard(path)
    assert not report.ok and ("#1", "order table entry is empty") in report.bad
    assert ("gone", "listed in the order table but missing") in report.bad
    assert shards_main(["verify", "-q", path]) == 1
    assert shards_main(["index", path, "-o", str(tmp_path / "i.json")]) == 2
    assert "order table entry 1 is empty" in capsys.readouterr().err


def test_ids_that_are_not_utf8_or_hold_nul(tmp_path, capsys):
    bad = b"img\xff\xfe"
    path = make_shard(tmp_path / "s", records={b"a": _value(b"a"), bad: _value(bad, 1)})
    r = ShardReader(path)
    assert r[1].features.shape == (7, 32)  # the record itself reads, under a readable name
    with pytest.raises(ShardError, match=r"order table entry 1: id b'img\\xff\\xfe' is not valid UTF-8"):
        list(r.keys())
    with pytest.raises(ShardError, match="is not valid UTF-8"):
        list(ShardSet(path).keys())
    assert "a\0b" not in r and "\udcff" not in r and 7 not in r  # lookups of impossible ids: simply absent
    assert shards_main(["inspect", path]) == 0
    capsys.readouterr()
    with pytest.raises(ShardError, match="contains a NUL character"):
        encode_key("a\0b")
    with pytest.raises(ShardError, match="is not valid Unicode"):
        encode_key("photo-\udce9")  # what os.walk gives for a Latin-1 file name
    with ShardWriter(tmp_path / "w", feature_dim=32, class_names=COCO_CLASSES) as w:
        with pytest.raises(ShardError, match="NUL"):
            w.add("a\0b", **random_record(np.random.default_rng(0)))
        assert w.add("fine", **random_record(np.random.default_rng(0)))


def test_show_root_ids_may_not_escape(tmp_path, capsys):
    root = tmp_path / "images"
    root.mkdir()
    rec = random_record(np.random.default_rng(0))
    secret = tmp_path / "secret.png"
    Image.new("RGB", (rec["width"], rec["height"])).save(secret)
    os.symlink(secret, root / "link.png")
    Image.new("RGB", (rec["width"], rec["height"])).save(root / "ok.png")
    shard = str(tmp_path / "s")
    with ShardWriter(shard, feature_dim=32, class_names=COCO_CLASSES) as w:
        for image_id in ("../secret", str(tmp_path / "secret"), "link", "ok"):
            w.add(image_id, **rec)
    for image_id, why in (("../secret", "leads outside the image folder"), (str(tmp_path / "secret"),
                          "is not a relative path"), ("link", "leads outside the image folder")):
        assert shards_main(["show", shard, "--id", image_id, "--root", str(root), "-o", str(tmp_path / "x.png")]) == 2
        assert why in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()
    assert shards_main(["show", shard, "--id", "ok", "--root", str(root), "-o", str(tmp_path / "x.png")]) == 0
    # the file itself, named by the user, is always allowed
    assert shards_main(["show", shard, "--id", "../secret", "--image", str(secret), "-o", str(tmp_path / "y.png")]) == 0


def test_folder_mode_symlinks_may_not_leave_the_image_root(tmp_path):
    from regionbert.extract.images import list_folder

    root = tmp_path / "images"
    (root / "sub").mkdir(parents=True)
    Image.new("RGB", (8, 8)).save(root / "sub" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "outside.png")
    os.symlink(root / "sub" / "a.png", root / "inside.png")  # a link within the root is fine
    assert [i.id for i in list_folder(str(root))] == ["inside", "sub/a"]
    os.symlink(tmp_path / "outside.png", root / "sub" / "evil.png")
    with pytest.raises(ValueError, match=r"sub/evil.png: a symlink to .*outside.png, outside the image root"):
        list_folder(str(root))
    assert [i.id for i in list_folder(str(root), allow_outside_root=True)] == ["inside", "sub/a", "sub/evil"]
