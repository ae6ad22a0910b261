"""Build a torchvision Faster R-CNN and load its weights (a torchvision name, a local file, or none)."""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass

import torch
import torchvision
from torchvision.models import detection

BUILDERS = {
    "resnet50_fpn_v2": (detection.fasterrcnn_resnet50_fpn_v2, detection.FasterRCNN_ResNet50_FPN_V2_Weights),
    "resnet50_fpn": (detection.fasterrcnn_resnet50_fpn, detection.FasterRCNN_ResNet50_FPN_Weights),
    "mobilenet_v3_large_fpn": (detection.fasterrcnn_mobilenet_v3_large_fpn,
                               detection.FasterRCNN_MobileNet_V3_Large_FPN_Weights),
    "mobilenet_v3_large_320_fpn": (detection.fasterrcnn_mobilenet_v3_large_320_fpn,
                                   detection.FasterRCNN_MobileNet_V3_Large_320_FPN_Weights),
}
BUTD = "butd_r101_vg"  # bottom-up-attention's Visual Genome R101-C4 (extract/butd.py), from its published .pkl
DETECTORS = [*BUILDERS, BUTD]


@dataclass
class DetectorSpec:
    """Everything that decides which network computes the features."""

    arch: str = "resnet50_fpn_v2"
    weights: str = "DEFAULT"  # torchvision weights name, a local checkpoint path, or "none"
    min_size: int | None = None  # None: the builder's default (800; 320 for the 320 model)
    max_size: int | None = None  # None: the builder's default (1333; 320 for the 320 model)
    seed: int = 0  # initialisation seed when weights == "none"


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes): identifies the weights
    whatever file or download they came from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def _torchvision_weights(enum, name: str):
    """'DEFAULT', 'COCO_V1' or 'FasterRCNN_..._Weights.COCO_V1' -> a weights enum member, or None."""
    short = name.split(".", 1)[1] if name.startswith(enum.__name__ + ".") else name
    if short == "DEFAULT":
        return enum.DEFAULT
    return getattr(enum, short, None) if short.isidentifier() else None


def build_detector(spec: DetectorSpec, **overrides) -> tuple[torch.nn.Module, list[str], dict]:
    """The model in eval mode, its class names (background first), and what to record about it.

    overrides go to the torchvision builder (e.g. box_score_thresh, box_nms_thresh, rpn settings)."""
    if spec.arch == BUTD:
        from .butd import build_butd  # not a torchvision builder: its own network, weights file and vocabularies

        return build_butd(spec)
    if spec.arch not in BUILDERS:
        raise ValueError(f"unknown detector {spec.arch!r}; choose one of {', '.join(BUILDERS)}")
    builder, enum = BUILDERS[spec.arch]
    kwargs = dict(overrides)
    if spec.min_size is not None:
        kwargs["min_size"] = spec.min_size
    if spec.max_size is not None:
        kwargs["max_size"] = spec.max_size
    source = spec.weights
    tv_weights = None if source.lower() == "none" or os.path.exists(source) else _torchvision_weights(enum, source)
    if tv_weights is not None:  # downloaded into the torch cache when online
        model = builder(weights=tv_weights, **kwargs)
        source = f"{enum.__name__}.{tv_weights.name}"
        categories = list(tv_weights.meta["categories"])
    else:
        torch.manual_seed(spec.seed)
        model = builder(weights=None, weights_backbone=None, **kwargs)
        categories = list(enum.DEFAULT.meta["categories"])
        if source.lower() == "none":
            source = "none"
            warnings.warn(
                f"detector {spec.arch} has RANDOM weights (--weights none, seed {spec.seed}): its boxes, "
                "features and class distributions are meaningless. Use it for dry runs and tests only.",
                stacklevel=2)
        elif os.path.exists(source):
            try:
                state = torch.load(source, map_location="cpu", weights_only=True)
            except Exception as e:  # noqa: BLE001 - torch raises many kinds for a file that is not a checkpoint
                raise ValueError(f"{source}: not a weights-only torch checkpoint ({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:200]})") from None
            if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
                state = state["model"]  # torchvision references/detection checkpoints
            try:
                model.load_state_dict(state)
            except (RuntimeError, TypeError) as e:
                raise ValueError(f"{source}: not a state dict for {spec.arch}: {e}") from None
            source = os.path.abspath(source)
        else:
            raise ValueError(f"--weights {spec.weights!r}: not 'none', not a file, and not a weights name of "
                             f"{enum.__name__} ({', '.join(['DEFAULT', *enum.__members__])})")
    model.eval()
    t = model.transform
    info = {
        "detector": f"torchvision.fasterrcnn_{spec.arch}",
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
    return model, categories, info
