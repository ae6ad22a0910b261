"""The VinVL parity kit's weight generator (tests/vinvl_kit/make_weights.py, docs/vinvl-spec.md section 9).

The generator must write, without torch, a checkpoint that torch reads with weights_only=True, whose
entries are exactly the released vinvl_vg_x152c4.pth's (names, shapes, order, shared res5 storages), and
whose bytes are the same on every run: the parity goldens are only meaningful for one fixed file.
Each generation runs in a real subprocess with `torch` made unimportable, which is what proves numpy-only.
"""
import hashlib
import json
import pickletools
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

KIT = Path(__file__).parent / "vinvl_kit"
BUTD_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "butd-kit" / "images"
IMAGES = ("000456", "COCO_train2014_000000132417")
GIVEN_FRACTIONS = [[.1, .1, .6, .7], [.3, .2, .95, .9], [0, 0, 1, 1], [.45, .45, .55, .6], [.213, .517, .411, .983]]
# the BUTD kit's float32 tolerances (../shared/butd-kit/SPEC.md section 12); the spec reference is in fact
# bit-identical to the original on this machine at one thread (docs/vinvl-spec.md section 12)
TOL = {"input": 1e-4, "res4": 1e-3, "rpn": 3e-3, "proposal_px": 0.1, "objectness": 1e-4, "features": 3e-4,
       "class_probs": 1e-3, "attr_logits": 2e-3, "regressed_px": 2e-2}
# sha256 of the whole file, seed 0 (recorded in tests/vinvl_kit/README.md)
FULL_SEED0_SHA256 = "76ea5a59151decc9baeefcd695542759e79f5ec4a2d5709ab2f57cd8a7e0cb82"
SMALL_SEED0_SHA256 = "a3a4108582d2fe1f4d052f5a5403d3788d3a981692ed803b91c2bd84dfbecd4f"
NO_TORCH = ("import runpy, sys; sys.modules['torch'] = None; sys.argv = ['make_weights.py'] + sys.argv[1:]; "
            f"runpy.run_path({str(KIT / 'make_weights.py')!r}, run_name='__main__')")


def generate(out, *args):
    """Run make_weights.py in a fresh interpreter where `import torch` raises; -> the file's sha256."""
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, "--out", str(out), *args],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return hashlib.sha256(out.read_bytes()).hexdigest()


def released_params():
    doc = json.loads((KIT / "param_shapes.json").read_text())
    assert doc["num_entries"] == len(doc["params"]) == 841
    return [(name, tuple(shape)) for name, shape in doc["params"]]


@pytest.fixture(scope="module")
def full_checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("vinvl") / "vinvl_seed0.pth"
    return path, generate(path)


def test_full_checkpoint_has_the_released_names_shapes_and_order(full_checkpoint):
    path, _ = full_checkpoint
    ckpt = torch.load(path, weights_only=True, mmap=True)
    assert list(ckpt) == ["model"]
    model = ckpt["model"]
    assert [(k, tuple(v.shape)) for k, v in model.items()] == released_params()
    assert all(v.dtype == torch.float32 and v.is_contiguous() for v in model.values())
    # the attribute head shares the box head's res5 (AttrRCNN.py:34-35): one storage, as torch.save writes it
    shared = [k for k in model if k.startswith("attribute.feature_extractor.")]
    assert len(shared) == 3 * 15 + 5
    for k in shared:
        twin = model["roi_heads.box.feature_extractor." + k[len("attribute.feature_extractor."):]]
        assert model[k].untyped_storage().data_ptr() == twin.untyped_storage().data_ptr()
    assert model._metadata[""] == {"version": 1}


def test_full_checkpoint_bytes_are_the_recorded_ones(full_checkpoint):
    _, sha = full_checkpoint
    assert sha == FULL_SEED0_SHA256


def test_generation_is_deterministic_and_seeded(tmp_path):
    a, b, c = tmp_path / "a.pth", tmp_path / "b.pth", tmp_path / "c.pth"
    assert generate(a, "--small") == generate(b, "--small") == SMALL_SEED0_SHA256
    assert a.read_bytes() == b.read_bytes()
    assert generate(c, "--small", "--seed", "1") != SMALL_SEED0_SHA256


def test_pickle_references_only_tensor_rebuilding_globals(tmp_path):
    path = tmp_path / "small.pth"
    generate(path, "--small")
    with zipfile.ZipFile(path) as zf:
        names = zf.namelist()
        data_pkl = zf.read("archive/data.pkl")
        assert all(zf.getinfo(n).compress_type == zipfile.ZIP_STORED for n in names)
        for n in names:  # storages start on 64-byte boundaries, as torch.save lays them out
            if n.startswith("archive/data/"):
                info = zf.getinfo(n)
                start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
                assert start % 64 == 0, n
    assert names[0] == "archive/data.pkl" and "archive/version" in names
    found = set()
    for op, arg, _ in pickletools.genops(data_pkl):
        if op.name == "GLOBAL":
            found.add(arg)
    assert found == {"collections OrderedDict", "torch._utils _rebuild_tensor_v2", "torch FloatStorage"}


def test_small_checkpoint_values_and_module_prefix(tmp_path):
    plain, prefixed = tmp_path / "plain.pth", tmp_path / "prefixed.pth"
    generate(plain, "--small")
    generate(prefixed, "--small", "--module-prefix")
    a = torch.load(plain, weights_only=True)["model"]
    b = torch.load(prefixed, weights_only=True)["model"]
    assert list(b) == ["module." + k for k in a]
    assert all(torch.equal(a[k], b["module." + k]) for k in a)
    # 1/1/2 backbone blocks + 1 res5 block, heads at full width
    assert "backbone.body.layer3.1.conv1.weight" in a and "backbone.body.layer3.2.conv1.weight" not in a
    assert a["roi_heads.box.predictor.cls_score.weight"].shape == (1595, 2048)
    # the anchors of the original's generate_anchors(16, (32, ..., 512), (0.5, 1, 2)): ratio-major, rounded
    anchors = a["rpn.anchor_generator.cell_anchors.0"]
    assert anchors.shape == (15, 4)
    assert anchors[5].tolist() == [-8.0, -8.0, 23.0, 23.0]     # ratio 1, size 32: a 32x32 box, '+1' convention
    assert anchors[9].tolist() == [-248.0, -248.0, 263.0, 263.0]
    # FrozenBN buffers are all non-trivial, so eps or a forgotten running_mean shows
    var = a["backbone.body.stem.bn1.running_var"]
    assert bool((var >= 0.5).all() and (var <= 2.0).all()) and float(var.std()) > 0.1
    assert float(a["backbone.body.stem.bn1.running_mean"].abs().mean()) > 0.1


def test_calibration_must_match_the_seed(tmp_path):
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, "--out", str(tmp_path / "x.pth"), "--seed", "3"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "does not match the calibration file" in proc.stderr
    assert not (tmp_path / "x.pth").exists()


@pytest.fixture(scope="module")
def spec_runs(full_checkpoint):
    """docs/vinvl-spec.md as plain torch (tests/vinvl_kit/spec_reference.py) on the two kit images."""
    if not BUTD_IMAGES.is_dir():
        pytest.skip(f"the BUTD kit's images are not at {BUTD_IMAGES}")
    sys.path.insert(0, str(KIT))
    try:
        import spec_reference
    finally:
        sys.path.remove(str(KIT))
    torch.set_num_threads(1)  # the goldens' setting; conftest restores the count after the test
    sd = torch.load(full_checkpoint[0], weights_only=True)["model"]
    return {name: spec_reference.run(sd, str(BUTD_IMAGES / f"{name}.jpg"), GIVEN_FRACTIONS) for name in IMAGES}


@pytest.mark.parametrize("name", IMAGES)
def test_spec_reference_matches_the_original_goldens(spec_runs, full_checkpoint, name):
    """The goldens are scene_graph_benchmark's own outputs (record_goldens.py in the CPU build of README.md)
    for this very checkpoint; the spec written as code reproduces every recorded stage."""
    g = dict(np.load(KIT / "golden" / f"{name}.npz", allow_pickle=False))
    ours = spec_runs[name]
    assert str(g["weights_sha256"]) == full_checkpoint[1] == FULL_SEED0_SHA256
    assert ours["input"].shape[1:] == tuple(g["resized_hw"])
    for stage, key, tol in (("input", "input", "input"), ("layer3", "layer3", "res4")):
        pos = tuple(g[key + "_sample_pos"].T)
        values = ours[stage][None][pos] if stage == "input" else ours[stage][pos]
        assert np.abs(values - g[key + "_sample_val"]).max() <= TOL[tol], stage
    assert np.abs(ours["rpn_logits_map"] - g["rpn_logits_map"]).max() <= TOL["rpn"]
    assert ours["proposals"].shape == g["proposals"].shape == (300, 4)
    assert np.abs(ours["proposals"] - g["proposals"]).max() <= TOL["proposal_px"]
    assert np.abs(ours["proposal_objectness"] - g["proposal_objectness"]).max() <= TOL["objectness"]
    assert np.abs(ours["first50_features"] - g["first50_features"]).max() <= TOL["features"]
    assert np.abs(ours["first50_class_probs"] - g["first50_class_probs"]).max() <= TOL["class_probs"]
    # NMS_FILTER 1 selection: same boxes, labels and order; 10 <= K <= 100
    assert 10 <= len(g["det_labels"]) <= 100
    np.testing.assert_array_equal(ours["det_labels"], g["det_labels"])
    assert np.abs(ours["det_boxes"] - g["det_boxes"]).max() <= TOL["proposal_px"]
    assert np.abs(ours["det_scores"] - g["det_scores"]).max() <= TOL["class_probs"]
    assert np.abs(ours["det_box_features"] - g["det_box_features"]).max() <= TOL["features"]
    assert np.abs(ours["det_scores_all"] - g["det_scores_all"]).max() <= TOL["class_probs"]
    assert np.abs(ours["det_attr_logits"] - g["det_attr_logits"]).max() <= TOL["attr_logits"]
    assert float(g["det_rerun_feature_maxdiff"]) == 0.0  # the attribute head's res5 re-run (spec section 7)
    # the same selection at 0.05 (100-box cap) and 0.9 (10-box floor)
    for tag, count in (("sel005_", 100), ("sel09_", 10)):
        assert len(g[tag + "labels"]) == count
        np.testing.assert_array_equal(ours[tag + "labels"], g[tag + "labels"])
        assert np.abs(ours[tag + "boxes"] - g[tag + "boxes"]).max() <= TOL["proposal_px"]
        assert np.abs(ours[tag + "scores"] - g[tag + "scores"]).max() <= TOL["class_probs"]
    # IGNORE_BOX_REGRESSION False: class-specific boxes, attributes from the regressed boxes
    assert np.abs(ours["rb_first10_bbox_deltas"] - g["rb_first10_bbox_deltas"]).max() <= TOL["attr_logits"]
    np.testing.assert_array_equal(ours["rb_det_labels"], g["rb_det_labels"])
    assert np.abs(ours["rb_det_boxes"] - g["rb_det_boxes"]).max() <= TOL["regressed_px"]
    assert np.abs(ours["rb_det_scores"] - g["rb_det_scores"]).max() <= TOL["class_probs"]
    assert np.abs(ours["rb_det_box_features16"] - g["rb_det_box_features16"]).max() <= TOL["features"]
    assert np.abs(ours["rb_det_attr_logits"] - g["rb_det_attr_logits"]).max() <= TOL["attr_logits"]
    # given boxes: features of the boxes as given, attributes of the boxes clipped to [0, w-1] x [0, h-1]
    np.testing.assert_array_equal(ours["gb_labels"], g["gb_labels"])
    assert np.abs(ours["gb_boxes"] - g["gb_boxes"]).max() <= 1e-3
    assert np.abs(ours["gb_box_features"] - g["gb_box_features"]).max() <= TOL["features"]
    assert np.abs(ours["gb_scores_all"] - g["gb_scores_all"]).max() <= TOL["class_probs"]
    assert np.abs(ours["gb_attr_logits"] - g["gb_attr_logits"]).max() <= TOL["attr_logits"]
