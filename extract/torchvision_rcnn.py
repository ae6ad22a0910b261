"""The torchvision family: torchvision's Faster R-CNN builders (and tiny.py's tiny_shapes), their weights
(a torchvision name, a local checkpoint read with weights_only=True, or none), and the region extractor:
one forward pass that returns region features with the boxes.

backbone, RPN and the box head run once per batch. Every feature is the box head's output (1024-d) for
one box pooled from the feature maps (RoIAlign), and its class distribution is the softmax over all
classes, background included, from that same pass: nothing is pooled twice and no backbone runs twice.
Which boxes an image keeps: extract/policies.py.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from dataclasses import dataclass

import torch
import torch.nn.functional as F
import torchvision
from torch import Tensor
from torchvision.models import detection
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops

from .detector import DetectorSpec, Family, ImageInput, UnknownDetector, warn_random_weights, weights_digest
from .images import to_tensor
from .policies import POLICIES, BoxPolicy, butd_select
from .tiny import fasterrcnn_tiny_shapes

NAME = "torchvision"
BUILDERS = {
    "resnet50_fpn_v2": (detection.fasterrcnn_resnet50_fpn_v2, detection.FasterRCNN_ResNet50_FPN_V2_Weights),
    "resnet50_fpn": (detection.fasterrcnn_resnet50_fpn, detection.FasterRCNN_ResNet50_FPN_Weights),
    "mobilenet_v3_large_fpn": (detection.fasterrcnn_mobilenet_v3_large_fpn,
                               detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights),
    "mobilenet_v3_large_320_fpn": (detection.fasterrcnn_mobilenet_v3_large_320_fpn,
                                   detection.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights),
    "tiny_shapes": (fasterrcnn_tiny_shapes, None),  # no pretrained weights: fine-tune it (the quickstart does)
}
CHECKPOINT_FORMAT = "regionbert.detector"  # a self-describing checkpoint: regionbert-detector finetune writes it


def _torchvision_weights(enum, name: str):
    """'DEFAULT', 'COCO_V1' or 'FasterRCNN_..._Weights.COCO_V1' -> a weights enum member, or None."""
    if enum is None:  # a builder without pretrained weights
        return None
    short = name.split(".", 1)[1] if name.startswith(enum.__name__ + ".") else name
    if short == "DEFAULT":
        return enum.DEFAULT
    return getattr(enum, short, None) if short.isidentifier() else None


def read_checkpoint(path: str) -> tuple[dict, dict | None]:
    """A weights file -> (state dict, the self-description or None).

    Accepts a bare state dict, torchvision references/detection checkpoints ({"model": ...}) and
    `regionbert-detector finetune` checkpoints ({"format": "regionbert.detector", "arch", "class_names",
    "min_size", "max_size", "model", ...}). Loaded with weights_only=True: nothing is unpickled."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - torch raises many kinds for a file that is not a checkpoint
        raise ValueError(f"{path}: not a weights-only torch checkpoint ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:200]})") from None
    meta = None
    if isinstance(state, dict) and state.get("format") == CHECKPOINT_FORMAT:
        meta = {k: state.get(k) for k in ("arch", "class_names", "min_size", "max_size")}
        names = meta["class_names"]
        if meta["arch"] not in BUILDERS:
            raise ValueError(f"{path}: detector {meta['arch']!r} is not one of {', '.join(BUILDERS)}")
        if not (isinstance(names, list) and len(names) >= 2 and all(isinstance(n, str) for n in names)):
            raise ValueError(f"{path}: class_names must be a list of at least 2 names (background first)")
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # torchvision references/detection checkpoints, and ours
    return state, meta


def _calibrate_random_norms(model: torch.nn.Module, seed: int) -> None:
    """Random init leaves BatchNorm running stats at mean 0, var 1; through a deep randomly initialised
    backbone (MobileNet-v3) activations then shrink to ~1e-8 and every region gets the same feature.
    Set the running stats from two seeded noise images instead (cumulative batch statistics), so that
    random features stay distinct between boxes and images. Deterministic: the digest records it."""
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    g = torch.Generator().manual_seed(seed)
    images = [torch.rand(3, 240, 320, generator=g), torch.rand(3, 320, 240, generator=g)]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over the calibration batches
        m.train()
    with torch.no_grad():
        model(images)
    for m in norms:
        m.momentum = 0.1
        m.eval()


def build(spec: DetectorSpec, **overrides) -> tuple[torch.nn.Module, list[str], dict]:
    """The model in eval mode, its class names (background first), and what to record about it.

    overrides go to the torchvision builder (e.g. box_score_thresh, box_nms_thresh, rpn settings).
    A `regionbert-detector finetune` checkpoint brings its own builder, class names and sizes (explicit
    min_size / max_size in spec still win)."""
    arch, source = spec.arch, spec.weights
    state, meta = (None, None)
    if source.lower() != "none" and os.path.exists(source):
        state, meta = read_checkpoint(source)
        if meta is not None:
            arch = meta["arch"]
    if arch not in BUILDERS:
        # families.build_detector says it with every family's names
        raise UnknownDetector(f"unknown detector {arch!r}; choose one of {', '.join(BUILDERS)}")
    builder, enum = BUILDERS[arch]
    kwargs = dict(overrides)
    if meta is not None:
        kwargs["num_classes"] = len(meta["class_names"])
        kwargs.update({k: int(meta[k]) for k in ("min_size", "max_size") if meta.get(k)})
    if spec.min_size is not None:
        kwargs["min_size"] = spec.min_size
    if spec.max_size is not None:
        kwargs["max_size"] = spec.max_size
    tv_weights = None if state is not None or source.lower() == "none" else _torchvision_weights(enum, source)
    if tv_weights is not None:  # downloaded into the torch cache when online
        model = builder(weights=tv_weights, **kwargs)
        source = f"{enum.__name__}.{tv_weights.name}"
        categories = list(tv_weights.meta["categories"])
    else:
        torch.manual_seed(spec.seed)
        model = builder(weights=None, weights_backbone=None, **kwargs)
        num_classes = model.roi_heads.box_predictor.cls_score.out_features
        categories = (list(meta["class_names"]) if meta is not None
                      else list(enum.DEFAULT.meta["categories"]) if enum is not None
                      else ["__background__", *(f"class_{i}" for i in range(1, num_classes))])
        if source.lower() == "none":
            source = "none"
            _calibrate_random_norms(model, spec.seed)
            warn_random_weights(arch, spec.seed)
        elif state is not None:
            try:
                model.load_state_dict(state)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"{source}: not a state dict for {arch}: {e}") from None
            source = os.path.abspath(source)
        else:
            names = ", ".join(["DEFAULT", *enum.__members__]) if enum is not None else "none"
            raise ValueError(f"--weights {spec.weights!r}: not 'none', not a file, and not a weights name of "
                             f"{arch} ({names})")
    model.eval()
    t = model.transform
    info = {
        "detector": f"torchvision.fasterrcnn_{arch}",
        "torchvision": torchvision.__version__,
        "weights": source,
        "weights_digest": weights_digest(model),
        "min_size": int(t.min_size[-1]),
        "max_size": int(t.max_size),
        "image_mean": [float(x) for x in t.image_mean],
        "image_std": [float(x) for x in t.image_std],
        "rpn_post_nms_top_n": int(model.rpn._post_nms_top_n["testing"]),
        "rpn_nms_thresh": float(model.rpn.nms_thresh),
    }
    if len(categories) != model.roi_heads.box_predictor.cls_score.out_features:
        raise ValueError(f"{source}: {len(categories)} class names for a detector with "
                         f"{model.roi_heads.box_predictor.cls_score.out_features} classes")
    return model, categories, info


# ----------------------------------------------------------------------------- regions
def preprocess(transform, image: Tensor) -> Tensor:
    """(3, H, W) float in [0, 1] -> normalized and resized exactly as model(images) does it."""
    image, _ = transform.resize(transform.normalize(image))
    return image


def torchvision_select(roi_heads, class_logits, box_regression, proposals, image_shape):
    """roi_heads.postprocess_detections for one image, step for step, also returning each detection's
    proposal index (which torchvision throws away)."""
    boxes = roi_heads.box_coder.decode(box_regression, [proposals])  # (P, C, 4)
    scores = F.softmax(class_logits, -1)
    boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
    num_props, num_classes = scores.shape
    labels = torch.arange(num_classes, device=scores.device).view(1, -1).expand_as(scores)
    props = torch.arange(num_props, device=scores.device).view(-1, 1).expand_as(scores)
    boxes, scores, labels, props = boxes[:, 1:], scores[:, 1:], labels[:, 1:], props[:, 1:]
    boxes, scores = boxes.reshape(-1, 4), scores.reshape(-1)
    labels, props = labels.reshape(-1), props.reshape(-1)
    inds = torch.where(scores > roi_heads.score_thresh)[0]
    boxes, scores, labels, props = boxes[inds], scores[inds], labels[inds], props[inds]
    keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
    boxes, scores, labels, props = boxes[keep], scores[keep], labels[keep], props[keep]
    keep = box_ops.batched_nms(boxes, scores, labels, roi_heads.nms_thresh)[: roi_heads.detections_per_img]
    return boxes[keep], scores[keep], labels[keep], props[keep]


class RegionExtractor:
    """Faster R-CNN + box policy -> per-image boxes, features and class distributions."""

    def __init__(self, model, policy: BoxPolicy):
        self.model, self.policy = model.eval(), policy

    @torch.inference_mode()
    def __call__(self, images: list[Tensor], original_sizes: list[tuple[int, int]],
                 given_boxes: list[Tensor] | None = None) -> list[dict[str, Tensor]]:
        """images: preprocessed (3, h, w) tensors on the model's device (see `preprocess`).
        original_sizes: (H, W) of each image before resizing. Returns per image, on the same device:
        boxes (N, 4) in original pixels, features (N, D), class_probs (N, C), scores (N,), labels (N,)."""
        m, policy = self.model, self.policy
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        batch = ImageList(m.transform.batch_images(images, size_divisible=m.transform.size_divisible), sizes)
        feats = m.backbone(batch.tensors)
        if isinstance(feats, Tensor):
            feats = OrderedDict([("0", feats)])
        if policy.name == "given":
            if given_boxes is None or len(given_boxes) != len(images):
                raise ValueError("the 'given' policy needs one (N, 4) box tensor per image")
            proposals = [resize_boxes(b.to(batch.tensors.device, torch.float32), o, s)
                         for b, o, s in zip(given_boxes, original_sizes, sizes, strict=True)]
        else:
            proposals, _ = m.rpn(batch, feats)
        rh = m.roi_heads
        x = rh.box_head(rh.box_roi_pool(feats, proposals, sizes))  # (sum P, D): one row per proposal
        class_logits, box_regression = rh.box_predictor(x)  # (sum P, C), (sum P, 4C)
        counts = [len(p) for p in proposals]
        out = []
        for i, (xi, logits, reg) in enumerate(zip(x.split(counts), class_logits.split(counts),
                                                  box_regression.split(counts), strict=True)):
            logits, props = logits.float(), proposals[i].float()
            probs = F.softmax(logits, -1)
            if policy.name == "torchvision":
                boxes, scores, labels, idx = torchvision_select(rh, logits, reg.float(), props, sizes[i])
            else:
                idx = (butd_select(props, probs, policy) if policy.name != "given"
                       else torch.arange(len(props), device=props.device))
                boxes = props[idx]
                scores, labels = probs[idx, 1:].max(1)
                labels = labels + 1
            boxes = (given_boxes[i].to(boxes.device, torch.float32) if policy.name == "given"
                     else resize_boxes(boxes, sizes[i], original_sizes[i]))
            out.append({"boxes": boxes, "features": xi[idx], "class_probs": probs[idx],
                        "scores": scores, "labels": labels})
        return out


# ----------------------------------------------------------------------------- the family's interface
# Each builder's own resize settings (shorter side, cap on the longer side), shown in regionbert-extract
# --help (tiny_shapes is left out: it is the quickstart's); tests/test_extract_fidelity.py checks them
DEFAULT_SIZES = {"resnet50_fpn_v2": (800, 1333), "resnet50_fpn": (800, 1333), "mobilenet_v3_large_fpn": (800, 1333),
                 "mobilenet_v3_large_320_fpn": (320, 640)}


@dataclass(frozen=True)
class TorchvisionInput:
    """model.transform's normalize + resize on one decoded image, as model(images) does it (picklable)."""

    transform: torch.nn.Module

    def __call__(self, rgb) -> Tensor:
        return preprocess(self.transform, to_tensor(rgb))


def image_input(model) -> ImageInput:
    return ImageInput(TorchvisionInput(model.transform), int(model.transform.size_divisible))


def layout(model) -> tuple[int, None]:
    """D of the box head's output (1024 for every torchvision Faster R-CNN, 256 for tiny_shapes); no attributes."""
    head = model.roi_heads.box_head
    last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
    return last.out_features, None


FAMILY = Family(
    name=NAME, detectors=tuple(BUILDERS), policies=POLICIES, default_sizes=DEFAULT_SIZES, build=build,
    load_weights=read_checkpoint, image_input=image_input, layout=layout, box_policy=BoxPolicy,
    region_extractor=RegionExtractor)
