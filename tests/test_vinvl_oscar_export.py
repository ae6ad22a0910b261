"""`regionbert-shards export --to oscar_tsv` (data/convert/oscar.py, issue 25 item 1's 2054-d layout): the
feature / label TSV pair Oscar+ and VinVL's downstream code read, checked with their own reading code
(json + base64 + np.frombuffer(..., np.float32).reshape((num_boxes, -1)), seeks through .lineidx)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from regionbert.data import ShardWriter
from regionbert.data.cli import main

CLASSES = ["__background__", "dog", "frisbee", "grass"]


def _shard(path, dim=2048, records=None):
    rng = np.random.default_rng(0)
    records = records or {"COCO_val2014_000000000042": ([[10, 20, 110, 220], [0, 0, 640, 480]], 640, 480),
                          "img 2": ([[5.5, 6.25, 30, 40]], 50, 60)}
    with ShardWriter(str(path), feature_dim=dim, class_names=CLASSES, feature_dtype="float32") as w:
        for image_id, (boxes, width, height) in records.items():
            n = len(boxes)
            probs = rng.dirichlet(np.ones(len(CLASSES)), n).astype(np.float32) if n else np.zeros((0, 4), np.float32)
            w.add(image_id, width=width, height=height, boxes=np.array(boxes, np.float32).reshape(n, 4),
                  features=rng.standard_normal((n, dim)).astype(np.float32), class_probs=probs)
    return path


def _oscar_read(prefix, row_index, kind):
    """Oscar's TSVFile.seek(i) + get_image_features / get_od_labels, by hand."""
    offsets = [int(x) for x in (prefix.parent / f"{prefix.name}.{kind}.lineidx").read_text().split()]
    with open(prefix.parent / f"{prefix.name}.{kind}.tsv", "rb") as f:
        f.seek(offsets[row_index])
        key, value = f.readline().decode().rstrip("\n").split("\t")
    info = json.loads(value)
    if kind == "label":
        return key, info
    return key, np.frombuffer(base64.b64decode(info["features"]), np.float32).reshape((info["num_boxes"], -1))


def test_oscar_tsv_rows_are_2048_plus_6(tmp_path, capsys):
    shard = _shard(tmp_path / "shard")
    prefix = tmp_path / "train"
    assert main(["export", str(shard), "--to", "oscar_tsv", "-o", str(prefix), "-q"]) == 0
    from regionbert.data import ShardReader

    r = ShardReader(str(shard))
    for i, image_id in enumerate(["COCO_val2014_000000000042", "img 2"]):  # the shard's (sorted) order
        rec = r.get(image_id)
        key, feats = _oscar_read(prefix, i, "feature")
        assert key == image_id and feats.shape == (rec.num_boxes, 2054)
        np.testing.assert_array_equal(feats[:, :2048], rec.features)
        b, W, H = rec.boxes.astype(np.float64), rec.width, rec.height
        want = np.stack([b[:, 0] / W, b[:, 1] / H, b[:, 2] / W, b[:, 3] / H, (b[:, 2] - b[:, 0]) / W,
                         (b[:, 3] - b[:, 1]) / H], 1).astype(np.float32)
        np.testing.assert_array_equal(feats[:, 2048:], want)
        key, labels = _oscar_read(prefix, i, "label")
        assert key == image_id and len(labels) == rec.num_boxes
        probs = rec.class_probs.astype(np.float32)
        for j, lab in enumerate(labels):
            best = int(probs[j, 1:].argmax()) + 1
            assert lab["class"] == CLASSES[best] and lab["conf"] == pytest.approx(float(probs[j, best]))
            assert lab["rect"] == [float(v) for v in rec.boxes[j]]
    # the whole image is [0, 0, 1, 1, 1, 1]
    _, feats = _oscar_read(prefix, 0, "feature")
    assert feats[1, 2048:].tolist() == [0, 0, 1, 1, 1, 1]
    assert not list(tmp_path.glob("*.partial"))


def test_warnings_for_other_dims_and_empty_records(tmp_path, capsys):
    shard = _shard(tmp_path / "shard", dim=16, records={"a1": ([[1, 2, 3, 4]], 10, 10), "b2": ([], 10, 10)})
    assert main(["export", str(shard), "--to", "oscar_tsv", "-o", str(tmp_path / "x"), "-q"]) == 0
    err = capsys.readouterr().err
    assert "16-d, so rows are 16+6" in err and "1 records have no boxes" in err
    _, feats = _oscar_read(tmp_path / "x", 0, "feature")
    assert feats.shape == (1, 22)


def test_a_missing_folder_is_an_error_and_nothing_is_left(tmp_path, capsys):
    shard = _shard(tmp_path / "shard")
    assert main(["export", str(shard), "--to", "oscar_tsv", "-o", str(tmp_path / "nope" / "train"), "-q"]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert not (tmp_path / "nope").exists()
