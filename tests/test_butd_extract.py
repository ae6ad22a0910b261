"""`regionbert-extract --detector butd_r101_vg`: real shards with 2048-d features, 1601-way class
distributions (background at 0), 400-way attribute distributions and the Visual Genome names.
Random weights (--weights none) on tiny images keep it fast; the numbers are checked in test_butd_parity."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from regionbert.data import ShardReader
from regionbert.extract import butd
from regionbert.extract.cli import main, parse_args


def _images(folder, sizes=((32, 48), (40, 32))):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def _extract(tmp_path, images, out, *extra):
    argv = [str(images), "-o", str(out), "--detector", "butd_r101_vg", "--weights", "none", "--min-size", "32",
            "--max-size", "48", "--workers", "0", "-q", "--feature-dtype", "float32", *extra]
    with pytest.warns(UserWarning, match="RANDOM weights"):
        assert main(argv) == 0
    return ShardReader(out / "shard-00000-of-00001")


def test_given_boxes_and_max_conf_shards(tmp_path):
    images = _images(tmp_path / "img")
    boxes = tmp_path / "boxes.jsonl"
    boxes.write_text(json.dumps({"id": "im0", "boxes": [[0, 0, 48, 32], [5, 6, 20, 30]]}) + "\n"
                     + json.dumps({"id": "im1", "boxes": [[1, 2, 30, 39]]}) + "\n")
    r = _extract(tmp_path, images, tmp_path / "given", "--policy", "given", "--boxes", str(boxes))
    meta = r.meta
    assert meta["feature_dim"] == 2048 and len(meta["class_names"]) == 1601 and len(meta["attribute_names"]) == 400
    assert meta["class_names"][:3] == ["__background__", "yolk", "goal"]  # first synonym of each vocabulary line
    assert meta["attribute_names"][:2] == ["gray", "multi colored"]
    ex = meta["extractor"]
    assert ex["weights"] == "none" and ex["weights_digest"].startswith("sha256:") and ex["box_policy"] == "given"
    assert (ex["min_size"], ex["max_size"], ex["amp"]) == (32, 48, "none")
    rec = r.get("im0")
    assert rec.boxes.tolist() == [[0, 0, 48, 32], [5, 6, 20, 30]]
    assert rec.features.shape == (2, 2048) and rec.class_probs.shape == (2, 1601) and rec.attr_probs.shape == (2, 400)
    np.testing.assert_allclose(rec.class_probs.astype(np.float64).sum(1), 1, atol=3e-3)
    np.testing.assert_allclose(rec.attr_probs.astype(np.float64).sum(1), 1, atol=3e-3)

    # the same image through the model by hand: stored features are its features, background moved to 0
    model = butd.random_detector(0)
    model.transform = butd.BUTDTransform(32, 48)
    rgb = np.asarray(Image.open(images / "im0.png").convert("RGB"))
    x = model.transform.prepare(rgb)
    with torch.inference_mode():
        res4 = model.backbone(x[None])
        b = butd.scale_boxes(torch.tensor(rec.boxes.tolist()), x.shape[2] / 48, x.shape[1] / 32)
        out = model.regions(res4, b)
    np.testing.assert_allclose(rec.features, out.features.numpy(), atol=1e-4)
    np.testing.assert_allclose(rec.class_probs[:, 0], out.class_probs[:, 1600].numpy(), atol=1e-3)
    np.testing.assert_allclose(rec.class_probs[:, 1:], out.class_probs[:, :1600].numpy(), atol=1e-3)

    r = _extract(tmp_path, images, tmp_path / "mc", "--min-boxes", "3", "--max-boxes", "5")
    assert r.meta["extractor"]["box_policy"] == "butd" and len(r) == 2
    for rec in r:
        assert 3 <= len(rec.boxes) <= 5 and rec.attr_probs.shape == (len(rec.boxes), 400)
        assert (rec.boxes[:, 2] <= rec.width + 1e-3).all() and (rec.boxes[:, 3] <= rec.height + 1e-3).all()


def test_cli_refuses_what_does_not_apply(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["x", "-o", "y", "--policy", "notebook"])  # a torchvision detector
    assert "butd_r101_vg" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["x", "-o", "y", "--detector", "butd_r101_vg", "--policy", "torchvision"])
    cfg = parse_args(["x", "-o", "y", "--detector", "butd_r101_vg", "--policy", "notebook"])
    assert (cfg.policy.name, cfg.policy.max_boxes) == ("notebook", 36)
    assert cfg.policy.describe()["boxes"] == "class_regressed"
    cfg = parse_args(["x", "-o", "y", "--detector", "butd_r101_vg", "--boxes-per-image", "36"])
    assert (cfg.policy.name, cfg.policy.min_boxes, cfg.policy.max_boxes) == ("fixed", 36, 36)
    images = _images(tmp_path / "img", sizes=((32, 32),))
    assert main([str(images), "-o", str(tmp_path / "o"), "--detector", "butd_r101_vg", "-q"]) == 2  # no --weights
    err = capsys.readouterr().err
    assert "faster_rcnn_from_caffe_attr.pkl" in err and "nlp1.cs.unc.edu" in err
