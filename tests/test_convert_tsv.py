"""bottom-up-attention and LXMERT TSV: round trips, malformed rows (stop and skip), kill -9 and resume."""

import base64
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from regionbert.data import ShardReader
from regionbert.data.cli import main
from regionbert.data.errors import ShardError
from regionbert.data.reader import _handle


def b64(a, dtype) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=dtype).tobytes()).decode()


def butd_rows(n_images, dim=16, seed=0, boxes=(0, 12)):
    """Rows of a bottom-up-attention TSV, written the way generate_tsv.py writes them (float32 base64)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_images):
        w, h, n = int(rng.integers(50, 900)), int(rng.integers(50, 900)), int(rng.integers(*boxes))
        x1, y1 = rng.uniform(0, w - 1, n), rng.uniform(0, h - 1, n)
        bx = np.stack([x1, y1, rng.uniform(x1, w), rng.uniform(y1, h)], 1).astype(np.float32)
        f = rng.gamma(1.0, 1.0, (n, dim)).astype(np.float32)
        rows.append({"id": str(1000 + i), "w": w, "h": h, "n": n, "boxes": bx, "features": f})
    return rows


def butd_line(r) -> str:
    return "\t".join([r["id"], str(r["w"]), str(r["h"]), str(r["n"]), b64(r["boxes"], "<f4"),
                      b64(r["features"], "<f4")])


def write_tsv(path, lines):
    path.write_text("".join(line + "\n" for line in lines))
    return str(path)


def test_butd_tsv_import_keeps_every_array_and_says_it_has_no_classes(tmp_path):
    rows = butd_rows(30)
    tsv = write_tsv(tmp_path / "feats.tsv", [butd_line(r) for r in rows])
    shard = str(tmp_path / "shard")
    assert main(["import", tsv, "-o", shard, "-q", "--dtype", "float32", "--chunk-rows", "7", "-j", "2"]) == 0
    reader = ShardReader(shard)
    assert reader.state["complete"] and list(reader.keys()) == [r["id"] for r in rows]
    meta = reader.meta
    assert meta["class_names"] is None and meta["feature_dim"] == 16  # inferred from the first row
    assert meta["extractor"]["source_format"] == "butd_tsv" and meta["extractor"]["job"]["source_files"] == [tsv]
    for i, r in enumerate(rows):
        rec = reader.get(r["id"])
        assert (rec.width, rec.height) == (r["w"], r["h"]) and rec.class_probs is None
        assert np.array_equal(rec.boxes, r["boxes"]) and np.array_equal(rec.features, r["features"])
        assert rec.extra == {"source_file": "feats.tsv", "source_row": i + 1}


def test_butd_round_trip_through_export(small_shard, tmp_path):
    """shard -> BUTD TSV -> shard: same boxes, sizes, float16 features; the class distribution is not kept,
    and the ids become the numbers they end with (synth/00000007 -> 7), listed in OUT.ids.csv."""
    tsv = str(tmp_path / "out.tsv")
    assert main(["export", small_shard, "--to", "butd_tsv", "-o", tsv, "-q"]) == 0
    back = str(tmp_path / "back")
    assert main(["import", tsv, "-o", back, "-q"]) == 0  # auto-detected from the field count
    a, b = ShardReader(small_shard), ShardReader(back)
    number = {k: str(int(k.rsplit("/", 1)[1])) for k in a.keys()}
    assert list(b.keys()) == list(number.values()) and b.meta["extractor"]["source_format"] == "butd_tsv"
    ids = open(tsv + ".ids.csv").read().splitlines()
    assert ids[0] == "image_id,original_id" and ids[8] == f"7,{list(a.keys())[7]}"
    for key in a.keys():
        x, y = a.get(key), b.get(number[key])
        assert (x.width, x.height) == (y.width, y.height)
        assert np.array_equal(x.boxes, y.boxes) and np.array_equal(x.features, y.features)
        assert np.array_equal(x.loc7, y.loc7) and y.class_probs is None


def test_lxmert_round_trip_keeps_the_hard_labels_exactly(small_shard, tmp_path):
    tsv = str(tmp_path / "lx.tsv")
    assert main(["export", small_shard, "--to", "lxmert_tsv", "-o", tsv, "-q"]) == 0
    first = open(tsv).readline().rstrip("\n").split("\t")
    rec0 = ShardReader(small_shard)[0]
    assert len(first) == 10 and first[0] == rec0.id and (int(first[1]), int(first[2])) == (rec0.height, rec0.width)
    back = str(tmp_path / "back")
    assert main(["import", tsv, "-o", back, "-q"]) == 0
    a, b = ShardReader(small_shard), ShardReader(back)
    assert b.meta["class_names"] is None and b.meta["extractor"]["source_format"] == "lxmert_tsv"
    for key in a.keys():
        x, y = a.get(key), b.get(key)
        assert np.array_equal(x.boxes, y.boxes) and np.array_equal(x.features, y.features)
        p = np.asarray(x.class_probs, np.float32)[:, 1:]  # objects: argmax over the non-background classes
        assert y.extra["objects_id"] == p.argmax(1).tolist()
        assert np.array_equal(np.float32(y.extra["objects_conf"]), p.max(1))
        assert y.extra["attrs_conf"] == [0.0] * x.num_boxes  # no attributes in the shard: confidence 0
    again = str(tmp_path / "again.tsv")  # the labels kept in extra export unchanged: the same bytes
    subprocess.run([sys.executable, "-m", "regionbert.data.cli", "export", back, "--to", "lxmert_tsv", "-o", again,
                    "-q"], check=True, capture_output=True)
    assert open(again).read() == open(tsv).read()


def test_lxmert_export_refuses_a_shard_with_no_labels(tmp_path, capsys):
    tsv = write_tsv(tmp_path / "f.tsv", [butd_line(r) for r in butd_rows(3)])
    assert main(["import", tsv, "-o", str(tmp_path / "s"), "-q"]) == 0
    assert main(["export", str(tmp_path / "s"), "--to", "lxmert_tsv", "-o", str(tmp_path / "x.tsv"), "-q"]) == 2
    assert "no class distribution" in capsys.readouterr().err and not (tmp_path / "x.tsv").exists()


def _break(kind: str, r: dict) -> str:
    line = butd_line(r)
    parts = line.split("\t")
    if kind == "bad base64":
        parts[5] = parts[5][:10] + "!!" + parts[5][12:]
    elif kind == "wrong field count":
        parts = parts[:5]
    elif kind == "shape mismatch":
        parts[3] = str(r["n"] + 1)
    elif kind == "box outside the image":
        b = r["boxes"].copy()
        b[0, 2] = r["w"] + 50
        parts[4] = b64(b, "<f4")
    elif kind == "not a number":
        parts[1] = "wide"
    return "\t".join(parts)


REASONS = {"bad base64": "field features is not valid base64", "wrong field count": "5 tab-separated fields",
           "shape mismatch": "field boxes holds", "box outside the image": "box 0 [",
           "not a number": "field image_w is 'wide'"}


def _tsv_with_bad_row(tmp_path, kind: str, row: int) -> tuple[str, str, list]:
    """An 8-row TSV whose row at 0-based `row` is broken as `kind`, the shard path to import it to, and
    the rows as generated."""
    rows = butd_rows(8, boxes=(2, 6))
    lines = [butd_line(r) for r in rows]
    lines[row] = _break(kind, rows[row])
    return write_tsv(tmp_path / "in.tsv", lines), str(tmp_path / "s"), rows


@pytest.mark.parametrize("kind", REASONS)
def test_malformed_row_stops_the_import_naming_file_and_row(tmp_path, capsys, kind):
    tsv, shard, _ = _tsv_with_bad_row(tmp_path, kind, 4)
    assert main(["import", tsv, "-o", shard, "-q", "--commit-every", "2"]) == 2
    err = capsys.readouterr().err
    assert f"{tsv} row 5: {REASONS[kind]}" in err
    assert kind != "box outside the image" or "lies outside the" in err
    h = _handle(shard, refresh=True)
    assert not h.complete and h.count <= 4  # never marked complete; nothing past the bad row


@pytest.mark.parametrize("kind", REASONS)
def test_malformed_row_skip_and_report(tmp_path, capsys, kind):
    tsv, shard, rows = _tsv_with_bad_row(tmp_path, kind, 2)
    assert main(["import", tsv, "-o", shard, "-q", "--on-error", "skip"]) == 1
    assert f"row 3: {REASONS[kind]}" in capsys.readouterr().out
    report = [json.loads(x) for x in open(shard + ".import-errors.jsonl")]
    assert len(report) == 1 and report[0]["file"] == tsv and report[0]["row"] == 3
    assert REASONS[kind] in report[0]["reason"]
    reader = ShardReader(shard)
    assert reader.state["complete"] and list(reader.keys()) == [r["id"] for i, r in enumerate(rows) if i != 2]


def test_not_a_tsv_and_wrong_dims_are_clear(tmp_path, capsys):
    (tmp_path / "x.txt").write_text("a,b,c\n")
    assert main(["import", str(tmp_path / "x.txt"), "-o", str(tmp_path / "s"), "-q"]) == 2
    assert "x.txt" in capsys.readouterr().err
    lines = [butd_line(r) for r in butd_rows(3, dim=16, boxes=(1, 4))] + \
        [butd_line(butd_rows(1, dim=8, boxes=(2, 3), seed=5)[0])]
    tsv = write_tsv(tmp_path / "dims.tsv", lines)
    assert main(["import", tsv, "-o", str(tmp_path / "s2"), "-q"]) == 2
    assert "row 4: features have 8 values per box; this shard's feature dim is 16" in capsys.readouterr().err


def test_kill_9_midway_leaves_an_incomplete_shard_and_rerun_finishes_it(tmp_path):
    rows = butd_rows(600, dim=256, boxes=(20, 40), seed=3)
    tsv = write_tsv(tmp_path / "big.tsv", [butd_line(r) for r in rows])
    shard = str(tmp_path / "s")
    cmd = [sys.executable, "-m", "regionbert.data.cli", "import", tsv, "-o", shard, "-q", "-j", "1",
           "--commit-every", "8", "--chunk-rows", "8"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900  # a guard against a hang, not a speed bound
    count = 0
    while time.time() < deadline and proc.poll() is None:
        try:
            count = _handle(shard, refresh=True).count
        except ShardError:
            count = 0
        if count >= 16:
            break
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    h = _handle(shard, refresh=True)
    done = h.count
    assert 16 <= done < len(rows) and not h.complete
    r = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert f"{done} already there" in r.stdout
    reader = ShardReader(shard)
    assert reader.state["complete"] and list(reader.keys()) == [r["id"] for r in rows]
    for i in (0, done - 1, done, len(rows) - 1):
        assert np.array_equal(reader.get(rows[i]["id"]).features, rows[i]["features"].astype(np.float16))
