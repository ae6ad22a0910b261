"""Build a torchvision Faster R-CNN and load its weights (a torchvision name, a local file, or none)."""

from __future__ import annotations

import hashlib
import os
import warnings
from dataclasses import dataclass

import torch
import torchvision
from torchvision.models import detection

from .tiny import fasterrcnn_tiny_shapes

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


def build_detector(spec: DetectorSpec, **overrides) -> tuple[torch.nn.Module, list[str], dict]:
    """The model in eval mode, its class names (background first), and what to record about it.

    overrides go to the torchvision builder (e.g. box_score_thresh, box_nms_thresh, rpn settings).
    A `regionbert-detector finetune` checkpoint brings its own builder, class names and sizes (explicit
    min_size / max_size in spec still win)."""
    if spec.arch == BUTD:
        from .butd import build_butd  # not a torchvision builder: its own network, weights file and vocabularies

        return build_butd(spec)
    arch, source = spec.arch, spec.weights
    state, meta = (None, None)
    if source.lower() != "none" and os.path.exists(source):
        state, meta = read_checkpoint(source)
        if meta is not None:
            arch = meta["arch"]
    if arch not in BUILDERS:
        raise ValueError(f"unknown detector {arch!r}; choose one of {', '.join(DETECTORS)}")
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
            warnings.warn(
                f"detector {arch} has RANDOM weights (--weights none, seed {spec.seed}): its boxes, "
                "features and class distributions are meaningless. Use it for dry runs and tests only.",
                stacklevel=2)
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
