"""The single-pass extractor: torchvision equality, butd selection, one backbone pass, given boxes."""

import pytest
import torch
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import nms

from regionbert.extract.detector import DetectorSpec
from regionbert.extract.families import build_detector
from regionbert.extract.policies import BoxPolicy, butd_select
from regionbert.extract.torchvision_rcnn import RegionExtractor, preprocess

pytestmark = pytest.mark.filterwarnings("ignore:detector .* has RANDOM weights")


def _images(seed=0, sizes=((180, 240), (300, 200), (96, 96))):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(3, h, w, generator=g) for h, w in sizes]


def _run(model, policy, images, given=None):
    ex = RegionExtractor(model, policy)
    return ex([preprocess(model.transform, im) for im in images], [tuple(im.shape[-2:]) for im in images], given)


@pytest.fixture(scope="module")
def mobilenet():
    model, names, _ = build_detector(DetectorSpec("mobilenet_v3_large_320_fpn", "none", seed=0), box_score_thresh=0.0)
    return model


@pytest.mark.parametrize("arch", ["mobilenet_v3_large_320_fpn", "resnet50_fpn_v2"])
def test_torchvision_policy_equals_model_output(arch):
    # random weights score every class ~1/91: lower the score threshold so detections exist
    model, names, _ = build_detector(DetectorSpec(arch, "none", min_size=160, max_size=256, seed=1),
                                     box_score_thresh=0.001)
    images = _images()
    ref = model(images)
    ours = _run(model, BoxPolicy("torchvision"), images)
    for r, o in zip(ref, ours, strict=True):
        assert len(r["boxes"]) > 10
        assert torch.equal(o["boxes"], r["boxes"])
        assert torch.equal(o["scores"], r["scores"]) and torch.equal(o["labels"], r["labels"])
        assert o["features"].shape == (len(r["boxes"]), 1024)
        assert o["class_probs"].shape == (len(r["boxes"]), len(names)) == (len(r["boxes"]), 91)
        # each detection's score is its class's probability in the stored distribution
        assert torch.equal(o["class_probs"][torch.arange(len(r["labels"])), r["labels"]], r["scores"])


def _butd_reference(boxes, probs, policy):
    """bottom-up-attention's loop, transcribed: NMS per class, max surviving score per proposal."""
    max_conf = torch.zeros(len(boxes))
    for c in range(1, probs.shape[1]):
        keep = nms(boxes, probs[:, c], policy.nms_thresh)
        max_conf[keep] = torch.maximum(max_conf[keep], probs[keep, c])
    keep = torch.where(max_conf >= policy.conf_thresh)[0]
    order = torch.argsort(max_conf, descending=True, stable=True)
    if len(keep) < policy.min_boxes:
        return order[:policy.min_boxes]
    return order[:min(len(keep), policy.max_boxes)]


@pytest.mark.parametrize("peak", [0.0, 4.0, 9.0])  # few, some and many confident proposals
def test_butd_selection_matches_the_reference_loop(peak):
    g = torch.Generator().manual_seed(int(peak))
    n, c = 300, 21
    xy = torch.rand(n, 2, generator=g) * 200
    boxes = torch.cat([xy, xy + 10 + torch.rand(n, 2, generator=g) * 80], 1)
    logits = torch.randn(n, c, generator=g)
    logits[torch.arange(n), torch.randint(1, c, (n,), generator=g)] += peak * torch.rand(n, generator=g)
    probs = logits.softmax(-1)
    policies = (BoxPolicy("butd"), BoxPolicy("butd", min_boxes=50, max_boxes=60), BoxPolicy("fixed", 0.3, 0.2, 36, 36))
    for policy in policies:
        ours = butd_select(boxes, probs, policy)
        ref = _butd_reference(boxes, probs, policy)
        assert torch.equal(ours, ref), policy
        assert len(set(ours.tolist())) == len(ours)  # each proposal once
        assert policy.min_boxes <= len(ours) <= policy.max_boxes


def test_butd_keeps_proposals_with_their_own_features(mobilenet):
    images = _images(3)
    out = _run(mobilenet, BoxPolicy("butd"), images)
    calls = []
    handle = mobilenet.backbone.register_forward_hook(lambda *a: calls.append(1))
    try:
        _run(mobilenet, BoxPolicy("butd"), images)
    finally:
        handle.remove()
    assert len(calls) == 1  # one backbone pass for the whole batch
    # the naive way: run the backbone again and pool the kept boxes; same features
    t = mobilenet.transform
    prepped = [preprocess(t, im) for im in images]
    sizes = [tuple(p.shape[-2:]) for p in prepped]
    batch = t.batch_images(prepped, size_divisible=t.size_divisible)
    with torch.no_grad():
        feats = mobilenet.backbone(batch)
        for i, o in enumerate(out):
            assert 10 <= len(o["boxes"]) <= 100
            assert torch.allclose(o["class_probs"].sum(1), torch.ones(len(o["boxes"])), atol=1e-5)
            boxes = resize_boxes(o["boxes"], tuple(images[i].shape[-2:]), sizes[i])
            pooled = mobilenet.roi_heads.box_roi_pool({k: v[i:i + 1] for k, v in feats.items()}, [boxes], [sizes[i]])
            naive = mobilenet.roi_heads.box_head(pooled)
            assert torch.allclose(naive, o["features"], atol=1e-4)


def test_given_boxes_are_kept_exactly(mobilenet):
    images = _images(4, sizes=((120, 160), (90, 90)))
    given = [torch.tensor([[0.0, 0.0, 160.0, 120.0], [10.5, 20.25, 50.0, 60.0]]), torch.tensor([[1.0, 2.0, 3.0, 4.0]])]
    out = _run(mobilenet, BoxPolicy("given"), images, given)
    for g, o in zip(given, out, strict=True):
        assert torch.equal(o["boxes"], g)
        assert o["features"].shape == (len(g), 1024) and o["class_probs"].shape == (len(g), 91)
    with pytest.raises(ValueError, match="one"):
        _run(mobilenet, BoxPolicy("given"), images)


def test_policy_validation():
    with pytest.raises(ValueError, match="unknown box policy"):
        BoxPolicy("maskrcnn")
    with pytest.raises(ValueError, match="exactly K"):
        BoxPolicy("fixed", min_boxes=10, max_boxes=36)
    with pytest.raises(ValueError, match="not 'none', not a file"):
        build_detector(DetectorSpec("mobilenet_v3_large_320_fpn", "NO_SUCH_WEIGHTS"))


def test_local_checkpoint_and_digest(tmp_path):
    a, _, info_a = build_detector(DetectorSpec("mobilenet_v3_large_320_fpn", "none", seed=5))
    path = tmp_path / "det.pth"
    torch.save({"model": a.state_dict()}, path)  # torchvision references layout
    b, _, info_b = build_detector(DetectorSpec("mobilenet_v3_large_320_fpn", str(path)))
    assert info_a["weights_digest"] == info_b["weights_digest"] and info_b["weights"] == str(path)
    _, _, info_c = build_detector(DetectorSpec("mobilenet_v3_large_320_fpn", "none", seed=6))
    assert info_c["weights_digest"] != info_a["weights_digest"]
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="junk.pth|pickle|Weights only|invalid"):
        build_detector(DetectorSpec("mobilenet_v3_large_320_fpn", str(tmp_path / "junk.pth")))
