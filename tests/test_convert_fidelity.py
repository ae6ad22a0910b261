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
    assert os.listdir(tmp_path) == ["s"]  # no x.tsv, no x.tsv.partial, no id list


def test_butd_export_ids_are_integers_for_bottom_up_attentions_reader(tmp_path):
    shard = _shard(str(tmp_path / "s"), ["COCO_train2014_000000132417", "42"])
    out = str(tmp_path / "x.tsv")
    assert main(["export", shard, "--to", "butd_tsv", "-o", out, "-q"]) == 0
    assert [int(line.split("\t")[0]) for line in open(out)] == [132417, 42]  # what read_tsv.py does
    assert open(out + ".ids.csv").read() == "image_id,original_id\n132417,COCO_train2014_000000132417\n42,42\n"


def test_refused_lxmert_export_leaves_no_partial_file(tmp_path, capsys):
    shard = _shard(str(tmp_path / "s"), ["1", "2"])
    assert main(["export", shard, "--to", "lxmert_tsv", "-o", str(tmp_path / "x.tsv"), "-q"]) == 2
    assert "no class distribution" in capsys.readouterr().err and os.listdir(tmp_path) == ["s"]


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
