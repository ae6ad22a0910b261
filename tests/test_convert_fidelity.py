"""Import and export keep what they promise: the right row for undecodable bytes, deterministic stop mode,
repeated ids, integer ids for bottom-up-attention, byte-identical TSV round trips, no leftovers."""

import json
import os

import numpy as np
import pytest

from regionbert.data import ShardReader, ShardWriter
from regionbert.data.cli import main
from regionbert.data.reader import _handle

from .test_convert_tsv import b64, butd_line, butd_rows, write_tsv


def _lines_with_bad_utf8(n: int, bad: int) -> list[bytes]:
    """n BUTD rows as bytes; the row at 0-based `bad` has a byte that is not UTF-8 in its image id."""
    lines = [butd_line(r).encode() for r in butd_rows(n, boxes=(1, 4))]
    lines[bad] = b"12\xff" + lines[bad][2:]
    return lines


@pytest.mark.filterwarnings("ignore:.*shard is incomplete")
def test_a_non_utf8_row_is_named_skipped_and_stops_after_every_good_row(tmp_path, capsys):
    tsv = tmp_path / "in.tsv"
    tsv.write_bytes(b"".join(line + b"\n" for line in _lines_with_bad_utf8(69, 59)))
    ids = [r["id"] for r in butd_rows(69, boxes=(1, 4))]
    for jobs in ("1", "3"):  # stop: rows 1..59 committed, whatever the number of workers
        shard = str(tmp_path / f"stop{jobs}")
        assert main(["import", str(tsv), "-o", shard, "-q", "-j", jobs, "--chunk-rows", "8",
                     "--commit-every", "8"]) == 2
        err = capsys.readouterr().err
        assert f"{tsv} row 60: not UTF-8 text: byte 0xff at column 3" in err
        h = _handle(shard, refresh=True)
        assert h.count == 59 and not h.complete
        assert list(ShardReader(shard).keys()) == ids[:59]
    shard = str(tmp_path / "skip")
    assert main(["import", str(tsv), "-o", shard, "-q", "-j", "2", "--chunk-rows", "8", "--on-error", "skip"]) == 1
    assert "row 60: not UTF-8" in capsys.readouterr().out
    report = [json.loads(x) for x in open(shard + ".import-errors.jsonl")]
    assert [(r["row"], r["image_id"]) for r in report] == [(60, "12\ufffd59")]
    reader = ShardReader(shard)
    assert reader.state["complete"] and list(reader.keys()) == ids[:59] + ids[60:]


def test_repeated_ids_identical_are_skipped_conflicting_are_reported(tmp_path, capsys):
    rows = butd_rows(6, boxes=(1, 4))
    same = dict(rows[1])
    changed = dict(rows[1], features=rows[1]["features"] + 1)
    tsv = write_tsv(tmp_path / "dup.tsv", [butd_line(r) for r in [*rows, same]])
    shard = str(tmp_path / "same")
    assert main(["import", tsv, "-o", shard, "-q", "--dtype", "float32"]) == 0
    assert "6 records added, 0 already there, 1 identical repeats skipped, 0 bad rows" in capsys.readouterr().out
    tsv = write_tsv(tmp_path / "conflict.tsv", [butd_line(r) for r in [*rows[:3], changed, *rows[3:]]])
    assert main(["import", tsv, "-o", str(tmp_path / "stop"), "-q", "--dtype", "float32"]) == 2
    assert (f"{tsv} row 4: image id '1001' was already imported from {tsv} row 2 with different data"
            in capsys.readouterr().err)
    shard = str(tmp_path / "skip")
    assert main(["import", tsv, "-o", shard, "-q", "--on-error", "skip", "--dtype", "float32"]) == 1
    report = [json.loads(x) for x in open(shard + ".import-errors.jsonl")]
    assert [(r["row"], r["image_id"]) for r in report] == [(4, "1001")] and "different data" in report[0]["reason"]
    kept = ShardReader(shard).get("1001")  # the first one
    assert np.array_equal(kept.features, rows[1]["features"])


def _shard(path, ids):
    with ShardWriter(path, feature_dim=4, class_names=None) as w:
        for i in ids:
            w.add(i, width=10, height=10, boxes=np.zeros((1, 4), np.float32), features=np.ones((1, 4)))
    return path


@pytest.mark.parametrize(("ids", "why"), [(["COCO_1", "photo"], "'photo' does not end in a number"),
                                          (["train/7", "val/007"], "'train/7' and 'val/007' both become 7")])
def test_butd_export_refuses_ids_that_cannot_be_integers_before_writing(tmp_path, capsys, ids, why):
    shard = _shard(str(tmp_path / "s"), ids)
    out = tmp_path / "x.tsv"
    assert main(["export", shard, "--to", "butd_tsv", "-o", str(out), "-q"]) == 2
    assert why in capsys.readouterr().err
    assert [p for p in os.listdir(tmp_path) if p.startswith("x.")] == []  # no x.tsv, .partial or id list


def test_butd_export_ids_are_integers_for_bottom_up_attentions_reader(tmp_path):
    shard = _shard(str(tmp_path / "s"), ["COCO_train2014_000000132417", "42"])
    out = str(tmp_path / "x.tsv")
    assert main(["export", shard, "--to", "butd_tsv", "-o", out, "-q"]) == 0
    assert [int(line.split("\t")[0]) for line in open(out)] == [132417, 42]  # what read_tsv.py does
    assert open(out + ".ids.csv").read() == "image_id,original_id\n132417,COCO_train2014_000000132417\n42,42\n"


def test_refused_lxmert_export_leaves_no_partial_file(tmp_path, capsys):
    shard = _shard(str(tmp_path / "s"), ["1", "2"])
    assert main(["export", shard, "--to", "lxmert_tsv", "-o", str(tmp_path / "x.tsv"), "-q"]) == 2
    assert "no class distribution" in capsys.readouterr().err
    assert [p for p in os.listdir(tmp_path) if p.startswith("x.")] == []  # no x.tsv, no x.tsv.partial


def _lxmert_line(r, rng) -> str:
    n = r["n"]
    labels = [b64(rng.integers(0, 1600, n), "<i8"), b64(rng.random(n), "<f4"), b64(rng.integers(0, 400, n), "<i8"),
              b64(rng.random(n), "<f4")]
    return "\t".join([r["id"], str(r["h"]), str(r["w"]), *labels, str(r["n"]), b64(r["boxes"], "<f4"),
                      b64(r["features"], "<f4")])


@pytest.mark.parametrize("fmt", ["butd_tsv", "lxmert_tsv"])
@pytest.mark.parametrize("eol", [b"\n", b"\r\n"])
def test_tsv_round_trip_is_byte_identical_with_float32(tmp_path, fmt, eol):
    rows = butd_rows(9, boxes=(0, 5))
    rng = np.random.default_rng(0)
    lines = [butd_line(r) if fmt == "butd_tsv" else _lxmert_line(r, rng) for r in rows]
    src = tmp_path / "in.tsv"
    src.write_bytes(b"".join(line.encode() + eol for line in lines))
    shard, out = str(tmp_path / "s"), str(tmp_path / "out.tsv")
    assert main(["import", str(src), "-o", shard, "-q", "--dtype", "float32", "--feature-dim", "16"]) == 0
    assert main(["export", shard, "--to", fmt, "-o", out, "-q"]) == 0
    assert open(out, "rb").read() == src.read_bytes()
    assert not os.path.exists(out + ".ids.csv")  # the ids were integers already


def _labelled_shard(path: str) -> str:
    """Records with a 5-way class distribution (background first) and a 3-way attribute distribution whose
    index 0 means 'no attribute', as the Visual Genome detector's 1601 / 401 outputs."""
    rng = np.random.default_rng(1)
    with ShardWriter(path, feature_dim=4, class_names=["__background__", "a", "b", "c", "d"],
                     attribute_names=["__no_attribute__", "red", "blue"]) as w:
        for i, n in enumerate((3, 1, 5)):
            cp = rng.dirichlet(np.ones(5), n)
            cp[:, 0] += 1.0  # background is the most likely class, and must still never be the label
            cp /= cp.sum(1, keepdims=True)
            ap = rng.dirichlet(np.ones(3), n)
            ap[:, 0] += 2.0
            ap /= ap.sum(1, keepdims=True)
            w.add(f"img{i}", width=20, height=10, boxes=np.tile([1, 1, 5, 5], (n, 1)), features=rng.random((n, 4)),
                  class_probs=cp, attr_probs=ap)
    return path


def load_obj_tsv(fname):
    """What LXMERT's src/utils.py load_obj_tsv does with a TSV (DictReader over ten named fields)."""
    import base64
    import csv
    import sys

    csv.field_size_limit(sys.maxsize)
    names = ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes",
             "boxes", "features"]
    out = []
    with open(fname) as f:
        for item in csv.DictReader(f, names, delimiter="\t"):
            for key in ("img_h", "img_w", "num_boxes"):
                item[key] = int(item[key])
            n = item["num_boxes"]
            for key, shape, dt in (("objects_id", (n,), np.int64), ("objects_conf", (n,), np.float32),
                                   ("attrs_id", (n,), np.int64), ("attrs_conf", (n,), np.float32),
                                   ("boxes", (n, 4), np.float32), ("features", (n, -1), np.float32)):
                item[key] = np.frombuffer(base64.b64decode(item[key]), dtype=dt).reshape(shape)
            out.append(item)
    return out


def test_exports_keep_lxmert_labels_background_and_no_attribute_excluded(tmp_path, capsys):
    import h5py

    shard = _labelled_shard(str(tmp_path / "s"))
    recs = list(ShardReader(shard))
    tsv = str(tmp_path / "lx.tsv")
    assert main(["export", shard, "--to", "lxmert_tsv", "-o", tsv, "-q"]) == 0
    items = load_obj_tsv(tsv)
    h5 = str(tmp_path / "p.h5")
    assert main(["export", shard, "--to", "padded_hdf5", "-o", h5, "-q"]) == 0
    with h5py.File(h5, "r") as f:
        padded = {k: f[k][:] for k in ("objects_id", "objects_conf", "attrs_id", "attrs_conf", "attr_probs")}
    for i, (rec, item) in enumerate(zip(recs, items, strict=True)):
        cp, ap = np.asarray(rec.class_probs, np.float32), np.asarray(rec.attr_probs, np.float32)
        want_obj, want_attr = cp[:, 1:].argmax(1), ap[:, 1:].argmax(1)  # id = class index - 1
        assert item["img_id"] == rec.id and (item["img_w"], item["img_h"]) == (20, 10)
        assert np.array_equal(item["objects_id"], want_obj) and np.array_equal(item["attrs_id"], want_attr)
        assert np.array_equal(item["objects_conf"], cp[:, 1:].max(1))
        assert np.array_equal(item["attrs_conf"], ap[:, 1:].max(1))
        n = rec.num_boxes
        assert np.array_equal(padded["objects_id"][i, :n], want_obj) and not padded["objects_id"][i, n:].any()
        assert np.array_equal(padded["attrs_id"][i, :n], want_attr)
        assert np.array_equal(padded["attrs_conf"][i, :n], ap[:, 1:].max(1))
        assert np.array_equal(padded["attr_probs"][i, :n], rec.attr_probs)
    assert max(int(x["objects_id"].max(initial=0)) for x in items) <= 3  # 4 object classes: ids 0..3
    capsys.readouterr()
    assert main(["export", shard, "--to", "butd_tsv", "-o", str(tmp_path / "b.tsv"), "-q"]) == 0
    err = capsys.readouterr().err
    assert "has no columns for class distributions (class_probs) and attribute distributions" in err
    assert "--to lxmert_tsv keeps" in err


def test_tsv_export_warns_about_records_the_original_readers_cannot_read(small_shard, tmp_path, capsys):
    empty = sum(r.num_boxes == 0 for r in ShardReader(small_shard))
    assert empty and main(["export", small_shard, "--to", "lxmert_tsv", "-o", str(tmp_path / "x.tsv"), "-q"]) == 0
    assert f"{empty} records have no boxes; the original readers" in capsys.readouterr().err


def test_uniter_npz_export_of_a_shard_without_classes_keeps_what_exists(tmp_path, capsys):
    rows = butd_rows(4, boxes=(1, 4))
    src = tmp_path / "in.tsv"
    src.write_text("".join(butd_line(r) + "\n" for r in rows))
    shard, folder = str(tmp_path / "s"), tmp_path / "npz"
    assert main(["import", str(src), "-o", shard, "-q"]) == 0
    assert main(["export", shard, "--to", "uniter_npz", "-o", str(folder), "-q"]) == 0
    err = capsys.readouterr().err
    assert "no class distribution" in err and "no soft_labels and conf" in err and "--keep_all" in err
    with np.load(folder / "1000.npz", allow_pickle=False) as z:
        assert sorted(z.files) == ["features", "norm_bb"]
        np.testing.assert_allclose(z["norm_bb"][:, 0] * rows[0]["w"], rows[0]["boxes"][:, 0], rtol=1e-5)
    back = str(tmp_path / "back")
    assert main(["import", str(folder), "-o", back, "-q"]) == 0
    b = ShardReader(back)
    assert b.meta["class_names"] is None and sorted(b.keys()) == sorted(r["id"] for r in rows)
    # from an LXMERT TSV: conf is its objects_conf
    lx = tmp_path / "lx.tsv"
    rng = np.random.default_rng(0)
    lx.write_text("".join(_lxmert_line(r, rng) + "\n" for r in rows))
    assert main(["import", str(lx), "-o", str(tmp_path / "s2"), "-q"]) == 0
    assert main(["export", str(tmp_path / "s2"), "--to", "uniter_npz", "-o", str(tmp_path / "npz2"), "-q"]) == 0
    assert "but no soft_labels:" in capsys.readouterr().err
    rec = ShardReader(str(tmp_path / "s2")).get("1000")
    with np.load(tmp_path / "npz2" / "1000.npz", allow_pickle=False) as z:
        assert np.array_equal(z["conf"], np.float32(rec.extra["objects_conf"]))
