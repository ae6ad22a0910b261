"""regionbert-detector finetune: COCO json -> a detector that regionbert-extract loads, resumable after kill -9;
random (--weights none) detectors give features that differ between boxes and images."""

import json
import os
import signal
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
import torch

from regionbert.data import ShardReader
from regionbert.extract.detector import DetectorSpec
from regionbert.extract.families import build_detector
from regionbert.extract.finetune import FinetuneConfig, Sample, build_trainable, evaluate, finetune, read_coco
from regionbert.extract.images import to_tensor
from regionbert.extract.policies import BoxPolicy
from regionbert.extract.torchvision_rcnn import BUILDERS, RegionExtractor, preprocess
from regionbert.quickstart.sample_data import class_names, write_sample_data


@pytest.fixture(scope="module")
def shapes(tmp_path_factory):
    """12 sample images (9 train, 3 held out) with COCO boxes."""
    return write_sample_data(str(tmp_path_factory.mktemp("shapes")), 12)


def _state(path):
    return torch.load(path, map_location="cpu", weights_only=True)


def test_finetune_cli_then_extract_uses_its_classes(shapes, tmp_path):
    out = tmp_path / "det"
    r = subprocess.run(["regionbert-detector", "finetune", shapes["boxes_train"], "--val", shapes["boxes_val"],
                        "--images", shapes["images"], "-o", str(out), "--detector", "tiny_shapes", "--weights",
                        "none", "--epochs", "2", "--batch-size", "4", "--workers", "0"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "held-out: recall@0.5" in r.stdout and "mAP@0.5" in r.stdout
    ck = _state(out / "detector.pt")
    assert ck["format"] == "regionbert.detector" and ck["arch"] == "tiny_shapes"
    assert ck["class_names"] == ["__background__", *class_names()] and "optimizer" not in ck
    assert set(ck["heldout"]) >= {"recall50", "map50"} and ck["heldout"]["images"] == 3
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert any("loss" in rec for rec in log) and any("eval" in rec for rec in log)
    full = _state(out / "checkpoint.pt")  # resumable: model, optimizer, step, RNG
    assert full["step"] == 4 and {"model", "optimizer", "rng"} <= set(full)

    shards = tmp_path / "shards"
    r = subprocess.run(["regionbert-extract", shapes["images"], "-o", str(shards), "--weights",
                        str(out / "detector.pt"), "--workers", "0", "-q", "--min-boxes", "2"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    reader = ShardReader(str(shards / "shard-00000-of-00001"))
    assert reader.meta["class_names"] == ["__background__", *class_names()]  # the fine-tuned classes
    ext = reader.meta["extractor"]
    assert ext["detector"] == "torchvision.fasterrcnn_tiny_shapes" and ext["weights"].endswith("detector.pt")
    assert (ext["min_size"], ext["max_size"]) == (ck["min_size"], ck["max_size"])  # the sizes it was trained at
    rec = reader[0]
    assert rec.features.shape[1] == 256 and rec.class_probs.shape[1] == 19


def test_resume_after_kill_gives_the_uninterrupted_weights(shapes, tmp_path):
    args = [sys.executable, "-m", "regionbert.extract.detector_cli", "finetune", shapes["boxes_train"],
            "--images", shapes["images"], "--detector", "tiny_shapes", "--weights", "none", "--epochs", "3",
            "--batch-size", "2", "--val-fraction", "0", "--workers", "0", "--checkpoint-every", "1", "-q",
            "--optimizer", "adamw"]  # AdamW's moments resume too (the quickstart's optimizer)
    straight = tmp_path / "straight"
    r = subprocess.run([*args, "-o", str(straight)], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]

    killed = tmp_path / "killed"
    p = subprocess.Popen([*args, "-o", str(killed)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = killed / "checkpoint.pt"
    deadline = time.monotonic() + 600
    while p.poll() is None and time.monotonic() < deadline:
        if ckpt.exists() and _state(ckpt)["step"] >= 3:
            break
        time.sleep(0.05)
    p.send_signal(signal.SIGKILL)
    p.wait()
    at = _state(ckpt)["step"]
    assert 3 <= at < 12, at  # stopped in the middle (12 steps in all)
    again = subprocess.run([*args, "-o", str(killed)], capture_output=True, text=True)
    assert again.returncode == 2 and "--resume" in again.stderr  # never silently starts over
    other = subprocess.run([*args[:-2], "--optimizer", "sgd", "-o", str(killed), "--resume"], capture_output=True,
                           text=True)
    assert other.returncode == 2 and "optimizer was 'adamw', now 'sgd'" in other.stderr
    r = subprocess.run([*args, "-o", str(killed), "--resume"], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming {ckpt} at step {at}" in r.stdout
    a, b = _state(straight / "detector.pt")["model"], _state(killed / "detector.pt")["model"]
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_standard_builder_from_coco_shaped_weights_gets_a_new_head(shapes, tmp_path):
    """COCO weights as the start (here: a seeded random 91-class state dict, as no download is allowed):
    the box predictor is replaced for the 18 shape classes and the result extracts."""
    torch.manual_seed(0)
    coco = BUILDERS["mobilenet_v3_large_320_fpn"][0](weights=None, weights_backbone=None)
    start = tmp_path / "coco_like.pt"
    torch.save(coco.state_dict(), start)
    cfg = FinetuneConfig(annotations=shapes["boxes_train"], images=shapes["images"], out=str(tmp_path / "ft"),
                         detector="mobilenet_v3_large_320_fpn", weights=str(start), epochs=1, batch_size=4,
                         val_annotations=shapes["boxes_val"], workers=0, progress=False)
    model, source = build_trainable(cfg, 19)
    assert source == str(start)
    key = "backbone.fpn.layer_blocks.0.0.weight"
    assert torch.equal(model.state_dict()[key], coco.state_dict()[key])  # the trunk comes from the start
    r = finetune(cfg)
    ck = _state(r.detector_file)
    assert ck["model"]["roi_heads.box_predictor.cls_score.weight"].shape == (19, 1024)  # a head for 18 + background
    model, names, info = build_detector(DetectorSpec("resnet50_fpn_v2", r.detector_file))  # the file decides
    assert info["detector"] == "torchvision.fasterrcnn_mobilenet_v3_large_320_fpn" and len(names) == 19


def test_random_weights_give_distinct_region_features(shapes):
    """--weights none: features must differ between boxes and between images (they were all one vector)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _, _ = build_detector(DetectorSpec("mobilenet_v3_large_320_fpn", "none", 224, 320))
    ex = RegionExtractor(model, BoxPolicy("butd", min_boxes=10, max_boxes=10))
    from PIL import Image
    feats = []
    for name in sorted(os.listdir(shapes["images"]))[:2]:
        rgb = np.array(Image.open(os.path.join(shapes["images"], name)).convert("RGB"))
        feats.append(ex([preprocess(model.transform, to_tensor(rgb))], [rgb.shape[:2]])[0]["features"])
    f = torch.nn.functional.normalize(torch.cat(feats).float(), dim=1)
    cos = f @ f.T
    off = cos[~torch.eye(len(f), dtype=torch.bool)]
    assert off.mean() < 0.95 and off.min() < 0.9, (off.mean(), off.min())
    assert (feats[0].mean(0) - feats[1].mean(0)).abs().max() > 1e-3  # images differ too


class _Fixed(torch.nn.Module):
    """Returns given detections, to check the metric arithmetic."""

    def __init__(self, outputs):
        super().__init__()
        self.outputs = outputs

    def forward(self, images):
        return [self.outputs.pop(0) for _ in images]


def test_heldout_recall_and_map_arithmetic(shapes):
    samples, _ = read_coco(shapes["boxes_val"], shapes["images"])
    perfect = [{"boxes": torch.from_numpy(s.boxes), "labels": torch.from_numpy(s.labels),
                "scores": torch.ones(len(s.labels))} for s in samples]
    m = evaluate(_Fixed(perfect), samples, "cpu")
    assert m["recall50"] == 1.0 and m["map50"] == 1.0 and m["boxes"] == sum(len(s.labels) for s in samples)
    s = Sample(0, samples[0].path, samples[0].width, samples[0].height,
               np.array([[10, 10, 50, 50], [100, 50, 160, 110]], np.float32), np.array([1, 2]))
    # one right (IoU 1), one with the wrong class, plus a false positive of class 1 scored higher
    out = {"boxes": torch.tensor([[120.0, 0, 150, 30], [10, 10, 50, 50], [100, 50, 160, 110]]),
           "labels": torch.tensor([1, 1, 3]), "scores": torch.tensor([0.9, 0.8, 0.7])}
    m = evaluate(_Fixed([out]), [s], "cpu")
    assert m["recall50"] == 0.5
    assert m["map50"] == pytest.approx((0.5 + 0.0) / 2)  # class 1: AP 0.5 (hit ranked second); class 2: 0


def test_bad_annotations_name_the_problem(shapes, tmp_path):
    coco = json.loads(open(shapes["boxes_train"]).read())
    coco["annotations"][1]["bbox"] = [1, 2, 3]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(coco))
    with pytest.raises(ValueError, match=f"annotation {coco['annotations'][1]['id']}: bbox"):
        read_coco(str(bad), shapes["images"])
    coco = json.loads(open(shapes["boxes_train"]).read())
    coco["images"][0]["file_name"] = "missing.jpg"
    bad.write_text(json.dumps(coco))
    r = subprocess.run(["regionbert-detector", "finetune", str(bad), "--images", shapes["images"], "-o",
                        str(tmp_path / "x"), "--detector", "tiny_shapes", "--weights", "none", "--epochs", "1",
                        "--batch-size", "9", "--val-fraction", "0", "--workers", "0", "-q"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 2 and "missing.jpg" in r.stderr, r.stderr[-2000:]
