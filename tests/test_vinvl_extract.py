"""`regionbert-extract --detector vinvl_x152c4` (extract/vinvl.py, extract/vinvl_weights.py): the checkpoint read
safely and checked name by name, the label map checked against it, real shards with 2048-d features,
1595-wide class distributions (background at 0) and 524-wide attribute distributions, and images of one
resized shape sharing a backbone pass. The parity kit's small generator (1/1/2 backbone blocks, 1 res5
block, heads at full width) and tiny images keep it fast; the numbers are checked in test_vinvl_parity.py."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from regionbert.data import ShardReader
from regionbert.extract import families, vinvl
from regionbert.extract.cli import main
from regionbert.extract.detector import DetectorSpec

KIT = Path(__file__).parent / "vinvl_kit"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """The kit's small seed-0 checkpoint ({"model": ...}, as the original's Checkpointer saves)."""
    path = tmp_path_factory.mktemp("vinvl_small") / "small.pth"
    subprocess.run([sys.executable, str(KIT / "make_weights.py"), "--out", str(path), "--small"], check=True,
                   capture_output=True, timeout=300)
    return path


@pytest.fixture(scope="module")
def small_sd(small):
    return torch.load(small, weights_only=True)["model"]


def _images(folder, sizes=((48, 64), (48, 64), (64, 40))):
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate(sizes):
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"im{i}.png")
    return folder


def _labelmap(path, classes=1594, attrs=524):
    path.write_text(json.dumps({"label_to_idx": {f"obj{i}": i for i in range(1, classes + 1)},
                                "attribute_to_idx": {f"attr{i}": i for i in range(1, attrs + 1)},
                                "predicate_to_idx": {"on": 1}}))
    return path


def _extract(images, out, weights, *extra):
    argv = [str(images), "-o", str(out), "--detector", "vinvl_x152c4", "--weights", str(weights), "--min-size", "48",
            "--max-size", "64", "--workers", "0", "-q", "--feature-dtype", "float32", *extra]
    assert main(argv) == 0
    return ShardReader(out / "shard-00000-of-00001")


def test_resize_rule_truncates_as_the_original():
    # spec section 1: 500x333 -> 900x600 (BUTD rounds to 901); the max-size case rounds half to even
    assert vinvl.resized_wh(500, 333) == (900, 600)
    assert vinvl.resized_wh(500, 375) == (800, 600)
    assert vinvl.resized_wh(1000, 500) == (1000, 500)  # round(500.0) is already the shorter side: unchanged
    assert vinvl.resized_wh(333, 500) == (600, 900)
    # the max-size case: shorter side round(333.3) = 333, longer int(333 * 3000 / 1000) = 999, not 1000
    assert vinvl.resized_wh(3000, 1000) == (999, 333)


def test_anchors_are_the_checkpoint_buffer(small_sd):
    assert torch.equal(vinvl.cell_anchors(), small_sd["rpn.anchor_generator.cell_anchors.0"])


def test_the_network_has_the_released_names_and_shapes():
    doc = json.loads((KIT / "param_shapes.json").read_text())
    # (torchvision's Bottleneck registers its downsample last: the same names, another state_dict order)
    assert vinvl.reference_shapes() == {k: tuple(s) for k, s in doc["params"]}
    assert len(vinvl.reference_shapes()) == 841


def test_checkpoint_variants_load_the_same(tmp_path, small, small_sd):
    """{"model": sd} as the Checkpointer saves, a bare state_dict, DDP's module. names: one network."""
    bare, ddp = tmp_path / "bare.pth", tmp_path / "ddp.pth"
    torch.save(dict(small_sd), bare)
    torch.save({"model": {"module." + k: v for k, v in small_sd.items()}, "iteration": 5}, ddp)
    digests = []
    for path in (small, bare, ddp):
        model, names, info = families.build_detector(DetectorSpec("vinvl_x152c4", str(path)))
        assert len(names) == 1595 and names[0] == "__background__" and info["depths"] == [1, 1, 2, 1]
        assert len(model.attribute_names) == 524
        digests.append(info["weights_digest"])
    assert digests[0] == digests[1] == digests[2]
    import hashlib
    assert info["weights_file_sha256"] == hashlib.sha256(ddp.read_bytes()).hexdigest()
    sd = model.state_dict()
    assert all(torch.equal(sd[k], small_sd[k]) for k in small_sd)


def _broken(sd, what):
    sd = dict(sd)
    if what == "missing":
        del sd["rpn.head.conv.bias"]
        return sd, "missing 1 (e.g. rpn.head.conv.bias)"
    if what == "unexpected":
        sd["roi_heads.mask.predictor.weight"] = torch.zeros(3)
        return sd, "unexpected 1 (e.g. roi_heads.mask.predictor.weight)"
    if what == "shape":
        sd["roi_heads.box.predictor.cls_score.weight"] = torch.zeros(1601, 2048)
        return sd, "roi_heads.box.predictor.cls_score.weight has shape (1601, 2048), expected (1595, 2048)"
    if what == "res5_copies":
        k = "attribute.feature_extractor.head.layer4.0.conv1.weight"
        sd[k] = sd[k].clone() + 1
        return sd, "attribute.feature_extractor.head.layer4.0.conv1.weight differs from roi_heads.box"
    if what == "nan":
        t = sd["attribute.predictor.attr_score.bias"].clone()
        t[3] = float("nan")
        sd["attribute.predictor.attr_score.bias"] = t
        return sd, "attribute.predictor.attr_score.bias holds NaN"
    if what == "dtype":
        sd["rpn.head.conv.bias"] = torch.zeros(1024, dtype=torch.int64)
        return sd, "rpn.head.conv.bias has dtype torch.int64"
    if what == "other_model":  # a ResNet-50 C4 maskrcnn_benchmark checkpoint: no groups, other widths
        return {"backbone.body.stem.conv1.weight": torch.zeros(64, 3, 7, 7),
                "backbone.body.layer1.0.conv1.weight": torch.zeros(64, 64, 1, 1)}, "no backbone.body.layer2"
    raise AssertionError(what)


@pytest.mark.parametrize("what", ["missing", "unexpected", "shape", "res5_copies", "nan", "dtype", "other_model"])
def test_bad_checkpoints_are_refused_naming_file_and_entry(tmp_path, small_sd, what):
    sd, message = _broken(small_sd, what)
    path = tmp_path / "bad.pth"
    torch.save({"model": sd}, path)
    with pytest.raises(ValueError, match=re.escape(message)) as e:
        families.build_detector(DetectorSpec("vinvl_x152c4", str(path)))
    assert str(path) in str(e.value)


def test_not_a_checkpoint_and_not_a_file(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="junk.pth: not a torch checkpoint"):
        vinvl.load_weights(str(junk))
    with pytest.raises(ValueError, match="needs the released checkpoint as a local file"):
        families.build_detector(DetectorSpec("vinvl_x152c4", str(tmp_path / "absent.pth")))
    listy = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listy)
    with pytest.raises(ValueError, match="list.pth: expected a torch checkpoint holding"):
        vinvl.load_weights(str(listy))


@pytest.mark.parametrize("classes, attrs, message", [
    (1600, 524, "label_to_idx\\[.obj1595.\\] = 1595; the checkpoint has 1594"),
    (1593, 524, "label_to_idx has 1593 entries, but the checkpoint has 1594"),
    (1594, 400, "attribute_to_idx has 400 entries, but the checkpoint has 524"),
])
def test_a_label_map_of_another_model_is_refused(tmp_path, small, classes, attrs, message):
    lm = _labelmap(tmp_path / "VG-SGG-dicts.json", classes, attrs)
    with pytest.raises(ValueError, match=message) as e:
        families.build_detector(DetectorSpec("vinvl_x152c4", str(small), labelmap=str(lm)))
    assert str(lm) in str(e.value)
    bad = tmp_path / "bad.json"
    bad.write_text("[1, 2")
    with pytest.raises(ValueError, match="bad.json: not a JSON label map"):
        families.build_detector(DetectorSpec("vinvl_x152c4", str(small), labelmap=str(bad)))


def test_cli_shards_with_label_map_names(tmp_path, small):
    images = _images(tmp_path / "img")
    lm = _labelmap(tmp_path / "VG-SGG-dicts-vgoi6-clipped.json")
    r = _extract(images, tmp_path / "out", small, "--labelmap", str(lm))
    meta = r.meta
    assert meta["feature_dim"] == 2048 and len(meta["class_names"]) == 1595 and len(meta["attribute_names"]) == 524
    assert meta["class_names"][:3] == ["__background__", "obj1", "obj2"] and meta["attribute_names"][0] == "attr1"
    ex = meta["extractor"]
    assert ex["box_policy"] == "butd" and "NMS_FILTER 1" in ex["selection"] and ex["depths"] == [1, 1, 2, 1]
    assert ex["labelmap"] == str(lm) and len(ex["labelmap_sha256"]) == 64 and ex["amp"] == "none"
    import hashlib
    assert ex["weights_file_sha256"] == hashlib.sha256(small.read_bytes()).hexdigest()
    for i, (h, w) in enumerate(((48, 64), (48, 64), (64, 40))):
        rec = r.get(f"im{i}")
        k = len(rec.boxes)
        assert 10 <= k <= 100 or k == rec.features.shape[0] < 10  # fewer only if fewer proposals score at all
        assert rec.features.shape == (k, 2048)
        assert rec.class_probs.shape == (k, 1595) and rec.attr_probs.shape == (k, 524)
        np.testing.assert_allclose(rec.class_probs.astype(np.float64).sum(1), 1, atol=6e-4)  # float16 rows
        np.testing.assert_allclose(rec.attr_probs.astype(np.float64).sum(1), 1, atol=6e-4)
        assert (rec.boxes >= 0).all() and (rec.boxes[:, 2] <= w).all() and (rec.boxes[:, 3] <= h).all()


def test_cli_refuses_a_label_map_for_other_detectors(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([str(tmp_path), "-o", str(tmp_path / "o"), "--detector", "butd_r101_vg", "--weights", "none",
              "--labelmap", "x.json"])
    assert "--labelmap belongs to --detector vinvl_x152c4" in capsys.readouterr().err


def test_a_bad_label_map_is_exit_2_before_any_image(tmp_path, small, capsys):
    images = _images(tmp_path / "img")
    lm = _labelmap(tmp_path / "lm.json", 1600)
    out = tmp_path / "out"
    assert main([str(images), "-o", str(out), "--detector", "vinvl_x152c4", "--weights", str(small),
                 "--labelmap", str(lm), "--workers", "0", "-q"]) == 2
    err = capsys.readouterr().err
    assert "lm.json" in err and "Traceback" not in err
    shard = out / "shard-00000-of-00001"  # only the writer lock the pipeline takes first, no data
    assert not shard.exists() or [p.name for p in shard.iterdir()] == ["writer.lock"]


def test_given_boxes_and_same_shape_batching(tmp_path, small):
    """Given boxes: features of each box as given; --batch-size 1 or 2 give the same shard. Two images of one
    resized shape stacked into one backbone pass (CUDA's default): the same numbers as one at a time,
    within float32 rounding."""
    images = _images(tmp_path / "img")
    boxes = tmp_path / "boxes.jsonl"
    rows = {"im0": [[0, 0, 64, 48], [5, 6, 30, 40]], "im1": [[1, 2, 60, 39]], "im2": [[0, 0, 40, 64]]}
    boxes.write_text("".join(json.dumps({"id": k, "boxes": v}) + "\n" for k, v in rows.items()))
    one = _extract(images, tmp_path / "one", small, "--policy", "given", "--boxes", str(boxes), "--batch-size", "1")
    two = _extract(images, tmp_path / "two", small, "--policy", "given", "--boxes", str(boxes), "--batch-size", "2")
    for k, v in rows.items():
        a, b = one.get(k), two.get(k)
        assert a.boxes.tolist() == v
        np.testing.assert_allclose(a.features, b.features, atol=3e-4)
        np.testing.assert_allclose(a.class_probs, b.class_probs, atol=1e-3)
        np.testing.assert_allclose(a.attr_probs, b.attr_probs, atol=1e-3)
    # the batch really held both images: the extractor stacks same-shape inputs into one res4 pass
    model, _, _ = families.build_detector(DetectorSpec("vinvl_x152c4", str(small), 48, 64))
    calls = []
    model.backbone.body.stem.register_forward_hook(lambda m, i, o: calls.append(tuple(i[0].shape)))
    rgb = [np.asarray(Image.open(images / f"im{i}.png").convert("RGB")) for i in range(3)]
    xs = [model.transform.prepare(x) for x in rgb]
    given = [torch.tensor(rows[f"im{i}"], dtype=torch.float32) for i in range(3)]
    stacked = vinvl.VinVLExtractor(model, vinvl.VinVLPolicy("given"), stack=True)(xs, [x.shape[:2] for x in rgb], given)
    assert sorted(calls) == [(1, 3, 64, 40), (2, 3, 48, 64)] and len(stacked) == 3
    # the default on the CPU: one image per pass (a stack was slower there), the same numbers within rounding
    calls.clear()
    alone = vinvl.VinVLExtractor(model, vinvl.VinVLPolicy("given"))(xs, [x.shape[:2] for x in rgb], given)
    assert sorted(calls) == [(1, 3, 48, 64), (1, 3, 48, 64), (1, 3, 64, 40)]
    for a, b in zip(stacked, alone, strict=True):
        assert torch.allclose(a["features"], b["features"], atol=3e-4)
        assert torch.equal(a["boxes"], b["boxes"])


@pytest.mark.parametrize("policy", ["regressed", "nms_filter0", "nms_filter2", "fixed"])
def test_other_selection_modes(tmp_path, small, policy):
    model, _, _ = families.build_detector(DetectorSpec("vinvl_x152c4", str(small), 48, 64))
    lo, hi = (5, 5) if policy == "fixed" else (3, 20)
    pol = families.family_of("vinvl_x152c4").box_policy(policy, 0.3, 0.2, lo, hi, None)
    rgb = np.random.default_rng(1).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    r = vinvl.VinVLExtractor(model, pol)([model.transform.prepare(rgb)], [(48, 64)])[0]
    k = len(r["boxes"])
    assert (k == 5) if policy == "fixed" else (k <= 20)
    assert r["features"].shape == (k, 2048) and r["attr_probs"].shape == (k, 524)
    assert (r["labels"] >= 1).all() and torch.equal(r["class_probs"][torch.arange(k), r["labels"]], r["scores"])
    if policy == "nms_filter2":  # one box per proposal, best first
        assert (r["scores"][:-1] >= r["scores"][1:]).all()
    d = pol.describe(model)
    assert d["box_policy"] == policy and d["thresholds"]["nms_thresh"] == (0.5 if policy.startswith("nms") else 0.3)


def test_policy_checks():
    fam = families.family_of("vinvl_x152c4")
    with pytest.raises(ValueError, match="does not apply to vinvl_x152c4"):
        fam.box_policy("torchvision")
    with pytest.raises(ValueError, match="min_boxes <= max_boxes"):
        fam.box_policy("nms_filter0", 0.3, 0.2, 10, 5)
    with pytest.raises(ValueError, match="--score-thresh"):
        fam.box_policy("regressed", 0.3, 0.2, 10, 100, 0.5)


def test_random_weights_are_seeded_and_finite():
    """--weights none (dry runs): a seeded init, the same for the same seed, finite outputs (small depths)."""
    a, b, c = (vinvl.random_detector(seed, depths=(1, 1, 1, 1)) for seed in (0, 0, 1))
    sa, sb, sc = a.state_dict(), b.state_dict(), c.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa) and not torch.equal(sa["rpn.head.conv.weight"],
                                                                          sc["rpn.head.conv.weight"])
    assert torch.equal(a.anchor_buffer(), vinvl.cell_anchors())
    rgb = np.random.default_rng(2).integers(0, 256, (48, 64, 3), dtype=np.uint8)
    a.transform = vinvl.VinVLTransform(48, 64)
    r = vinvl.VinVLExtractor(a, vinvl.VinVLPolicy("butd"))([a.transform.prepare(rgb)], [(48, 64)])[0]
    assert len(r["boxes"]) >= 10 and all(bool(torch.isfinite(v).all()) for v in r.values())
    assert float(r["features"].std(0).mean()) > 1e-3  # region features differ
