"""Extraction keeps what it promises: torchvision labels and scores, batch-independent features, the
settings in the metadata, the detector's own default sizes in --help, random weights named on `show`."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from regionbert.data import ShardReader
from regionbert.data.cli import main as shards_main
from regionbert.data.show import box_labels
from regionbert.extract.cli import DEFAULT_SIZES, main
from regionbert.extract.detector import DetectorSpec
from regionbert.extract.families import build_detector
from regionbert.extract.images import decode_image, to_tensor
from regionbert.extract.pipeline import ShapeBatcher
from regionbert.extract.torchvision_rcnn import BUILDERS

pytestmark = pytest.mark.filterwarnings("ignore:detector .* has RANDOM weights")
FAST = ["--weights", "none", "--detector", "mobilenet_v3_large_320_fpn", "--min-size", "96", "--max-size", "160",
        "--workers", "0", "-q"]
SIZES = [(64, 80), (120, 60), (64, 80), (50, 50), (64, 80), (120, 60), (64, 80), (90, 70)]  # (h, w)


def _folder(tmp_path, sizes=SIZES):
    rng = np.random.default_rng(3)
    root = tmp_path / "imgs"
    root.mkdir()
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(root / f"img{i:02d}.png")
    return root


def _shard(out):
    return ShardReader(out / "shard-00000-of-00001")


def assert_same_detections(labels, scores, boxes, ref, what="", rtol=1e-4, atol=1e-7, box_atol=1e-3):
    """The stored detections are the model's own, as a set: each is paired with a different detection of
    `ref` (what the model returned) that has the same label, a score equal up to float rounding and a box
    within box_atol px. The order is not compared: a batch and a lone image round differently, and with
    random weights many scores tie exactly or nearly (img00's label-80 boxes along the left edge), so tied
    detections come out in either order."""
    ref_labels, ref_scores, ref_boxes = (ref[k].numpy() for k in ("labels", "scores", "boxes"))
    assert len(labels) == len(scores) == len(boxes) == len(ref_labels), what
    ok = ((labels[:, None] == ref_labels[None, :])
          & (np.abs(scores[:, None] - ref_scores[None, :]) <= atol + rtol * np.abs(ref_scores[None, :]))
          & (np.abs(boxes[:, None, :] - ref_boxes[None, :, :]).max(-1) <= box_atol))
    owner = [-1] * len(ref_labels)  # one to one: Kuhn's augmenting paths

    def pair(i, seen):
        for j in np.flatnonzero(ok[i]):
            if not seen[j]:
                seen[j] = True
                if owner[j] < 0 or pair(owner[j], seen):
                    owner[j] = i
                    return True
        return False

    unpaired = [i for i in range(len(labels)) if not pair(i, [False] * len(ref_labels))]
    assert not unpaired, (f"{what}: {len(unpaired)} stored detections are not the model's, e.g. #{unpaired[0]}: "
                          f"label {labels[unpaired[0]]}, score {scores[unpaired[0]]}, box {boxes[unpaired[0]]}")


def test_torchvision_policy_stores_model_labels_and_scores_and_show_uses_them(tmp_path, capsys):
    root = _folder(tmp_path, SIZES[:4])
    out = tmp_path / "out"
    assert main([str(root), "-o", str(out), "--policy", "torchvision", "--score-thresh", "0.001", "--seed", "1",
                 "--batch-size", "2", *FAST]) == 0
    shard = _shard(out)
    ex = shard.meta["extractor"]
    assert ex["thresholds"]["score_thresh"] == 0.001 and ex["features_from"].startswith("the proposal")
    model, names, _ = build_detector(DetectorSpec("mobilenet_v3_large_320_fpn", "none", 96, 160, seed=1),
                                     box_score_thresh=0.001)
    for i in range(4):
        rec = shard.get(f"img{i:02d}")
        image = to_tensor(decode_image(str(root / f"img{i:02d}.png"), 10**8))
        with torch.no_grad():
            ref = model([image])[0]  # what model(images) returns for this image alone
        assert rec.num_boxes == len(ref["labels"]) > 5
        stored = np.asarray(rec.extra["labels"]), np.float32(rec.extra["scores"])
        # equal up to float rounding and the order of ties: img00 and img02 share a batch here, ref runs each alone
        assert_same_detections(*stored, rec.boxes, ref, f"img{i:02d}")
        assert (np.diff(stored[1]) <= 0).all()  # best first, as the model returns them
        labels, scores = box_labels(rec)  # what `show` draws: the stored labels and scores themselves
        assert labels.tolist() == rec.extra["labels"] and np.array_equal(scores, stored[1])
    png = tmp_path / "show.png"
    assert shards_main(["show", str(out / "shard-00000-of-00001"), "--id", "img00", "-o", str(png)]) == 0
    assert "RANDOM weights" in capsys.readouterr().out
    with Image.open(png) as im:
        r, g, b = np.asarray(im.convert("RGB"))[3, 3]
    assert r > 150 and g < 60 and b < 60  # the red banner across the top


def test_score_thresh_belongs_to_the_torchvision_policy():
    from regionbert.extract.policies import BoxPolicy

    with pytest.raises(ValueError, match="belongs to the torchvision policy"):
        BoxPolicy("butd", score_thresh=0.1)
    assert BoxPolicy("torchvision", score_thresh=0.1).score_thresh == 0.1


def test_show_has_no_banner_for_a_shard_with_real_weights(tmp_path, capsys):
    from regionbert.data import ShardWriter

    Image.new("RGB", (200, 100), (255, 255, 255)).save(tmp_path / "img.png")
    with ShardWriter(tmp_path / "s", feature_dim=8, class_names=None, extractor={"weights": "COCO_V1"}) as w:
        w.add("img", width=200, height=100, boxes=[[150, 60, 190, 90]], features=np.zeros((1, 8)))
    out = tmp_path / "show.png"
    assert shards_main(["show", str(tmp_path / "s"), "--id", "img", "--image", str(tmp_path / "img.png"),
                        "-o", str(out)]) == 0
    assert "RANDOM" not in capsys.readouterr().out
    with Image.open(out) as im:
        assert tuple(np.asarray(im.convert("RGB"))[3, 3]) == (255, 255, 255)


def test_shape_batcher_batches_one_shape_keeps_everything_and_bounds_the_wait():
    b = ShapeBatcher(batch_size=3, window=4)
    keys = ["a", "b", "a", "c", "a", "b", "d", "d", "e", "a"]
    batches = []
    for seq, k in enumerate(keys):
        batches += b.add(seq, k, k)
        assert b.waiting <= 4
    batches += b.flush()
    assert all(len({item for _, item in batch}) == 1 for batch in batches)  # one shape per batch
    assert all(len(batch) <= 3 for batch in batches)
    assert sorted(seq for batch in batches for seq, _ in batch) == list(range(len(keys)))
    assert [seq for seq, _ in batches[0]] == [0, 2, 4]  # full: goes at once


def random_checkpoint(path, arch="mobilenet_v3_large_320_fpn", seed=0) -> str:
    """Seeded random weights whose biases and batch-norm means are random too. torchvision initialises
    those to 0, which makes zero padding invisible to the network; trained weights are not like that."""
    model, _, _ = build_detector(DetectorSpec(arch, "none", seed=seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith(("running_mean", ".bias")) and t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    torch.save(model.state_dict(), path)
    return str(path)


def test_features_do_not_depend_on_the_batch(tmp_path):
    """The same boxes in batches of 1 and of 4: images of different sizes used to be padded to the batch's
    largest, which moved the features by up to 31% of their maximum (bench/README.md)."""
    root = _folder(tmp_path)
    rows = [{"id": f"img{i:02d}", "boxes": [[0, 0, w, h], [2, 3, w // 2, h // 2], [w // 3, h // 3, w - 1, h - 1]]}
            for i, (h, w) in enumerate(SIZES)]
    (tmp_path / "boxes.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    weights = random_checkpoint(tmp_path / "w.pt")
    args = ["--policy", "given", "--boxes", str(tmp_path / "boxes.jsonl"), *FAST, "--weights", weights]
    for bs in ("1", "4"):
        assert main([str(root), "-o", str(tmp_path / f"b{bs}"), "--batch-size", bs, *args]) == 0
    one, four = _shard(tmp_path / "b1"), _shard(tmp_path / "b4")
    assert list(four.keys()) == list(one.keys()) == [r["id"] for r in rows]  # written in input order
    ex = four.meta["extractor"]
    assert ex["batch_grouping"].startswith("same padded shape") and ex["job"]["batch_size"] == 4
    assert one.meta["extractor"]["job"]["batch_size"] == 1
    for key in one.keys():
        a, b = one.get(key).features.astype(np.float32), four.get(key).features.astype(np.float32)
        assert np.abs(a - b).max() <= 1e-3 * max(np.abs(a).max(), 1e-6), key


def test_metadata_records_the_rpn_settings(tmp_path):
    root = _folder(tmp_path, SIZES[:1])
    assert main([str(root), "-o", str(tmp_path / "out"), *FAST]) == 0
    ex = _shard(tmp_path / "out").meta["extractor"]
    # the 320 model's own RPN settings (torchvision builder defaults)
    assert ex["rpn_pre_nms_top_n"] == 150 and ex["rpn_post_nms_top_n"] == 150
    assert ex["rpn_score_thresh"] == 0.05 and ex["rpn_nms_thresh"] == 0.7
    assert ex["boxes"] == "proposals" and ex["features_from"] == "the stored box (the proposal)"


def test_help_shows_each_detectors_own_default_sizes(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "320 for mobilenet_v3_large_320_fpn" in text and "640 for mobilenet_v3_large_320_fpn" in text
    assert "800 for resnet50_fpn_v2" in text and "1333 for resnet50_fpn_v2" in text
    from regionbert.extract.butd import NAME as BUTD
    from regionbert.extract.butd import BUTDTransform

    assert (BUTDTransform().min_size, BUTDTransform().max_size) == DEFAULT_SIZES[BUTD]
    for arch, (lo, hi) in DEFAULT_SIZES.items():  # the table says what the builders do
        if arch not in BUILDERS:
            continue
        builder = BUILDERS[arch][0]
        model = builder(weights=None, weights_backbone=None, num_classes=2)
        assert (model.transform.min_size[-1], model.transform.max_size) == (lo, hi), arch
