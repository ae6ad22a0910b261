"""Synthetic shards shaped like real extractor output, for tests, benchmarks and a GPU-free trainer.

Each image holds a few objects of COCO classes. Each region belongs to one object (or to clutter):
its feature is that class's prototype plus noise (non-negative, like a ReLU box-head output), and its
class distribution peaks on that class. So features and class distributions carry the image's
content, and `extra["objects"]` names it: enough for a learning test to caption from.
"""

from __future__ import annotations

import numpy as np

from .writer import ShardWriter

COCO_CLASSES = [
    "__background__", "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat",
    "traffic light", "fire hydrant", "N/A", "stop sign", "parking meter", "bench", "bird", "cat", "dog",
    "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe", "N/A", "backpack", "umbrella", "N/A",
    "N/A", "handbag", "tie", "suitcase", "frisbee", "skis", "snowboard", "sports ball", "kite",
    "baseball bat", "baseball glove", "skateboard", "surfboard", "tennis racket", "bottle", "N/A",
    "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple", "sandwich", "orange",
    "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch", "potted plant", "bed",
    "N/A", "dining table", "N/A", "N/A", "toilet", "N/A", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "N/A", "book", "clock", "vase",
    "scissors", "teddy bear", "hair drier", "toothbrush",
]
REAL_CLASSES = [i for i, n in enumerate(COCO_CLASSES) if n not in ("__background__", "N/A")]


def synth_record(rng: np.random.Generator, prototypes: np.ndarray, min_boxes: int = 10, max_boxes: int = 100,
                 max_objects: int = 4, classes: list[int] | None = None) -> dict:
    """One image's worth of writer arguments (without the id)."""
    classes = REAL_CLASSES if classes is None else classes
    num_classes, dim = prototypes.shape
    width, height = int(rng.integers(320, 1025)), int(rng.integers(240, 769))
    n = int(rng.integers(min_boxes, max_boxes + 1))
    objects = rng.choice(classes, size=int(rng.integers(1, max_objects + 1)), replace=False)
    owner = np.where(rng.random(n) < 0.8, rng.choice(objects, size=n), 0)  # 20% clutter (background)
    x1, y1 = rng.uniform(0, width - 2, n), rng.uniform(0, height - 2, n)
    x2, y2 = rng.uniform(x1 + 1, width), rng.uniform(y1 + 1, height)
    boxes = np.stack([x1, y1, x2, y2], 1).astype(np.float32)
    feats = prototypes[owner] + rng.standard_normal((n, dim), dtype=np.float32) * 0.5
    np.maximum(feats, 0, out=feats)
    logits = rng.standard_normal((n, num_classes), dtype=np.float32)
    logits[np.arange(n), owner] += 6.0
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    return dict(width=width, height=height, boxes=boxes, features=feats, class_probs=probs,
                extra={"objects": [COCO_CLASSES[c] for c in sorted(objects)]})


def write_synthetic_shard(path: str, num_records: int, feature_dim: int = 1024, min_boxes: int = 10,
                          max_boxes: int = 100, seed: int = 0, feature_dtype: str = "float16",
                          id_prefix: str = "synth", progress=None, classes: list[int] | None = None) -> int:
    """Write (or resume) a synthetic shard; returns the number of records added.

    classes: the COCO class indices objects are drawn from (default: all real classes)."""
    rng = np.random.default_rng(seed)
    prototypes = rng.gamma(1.0, 1.0, (len(COCO_CLASSES), feature_dim)).astype(np.float32)
    extractor = {"name": "regionbert.data.synth", "detector": "synthetic", "weights": None,
                 "weights_digest": None, "box_policy": "synthetic", "boxes": "synthetic",
                 "settings": {"seed": seed, "min_boxes": min_boxes, "max_boxes": max_boxes}}
    if classes is not None:
        extractor["settings"]["classes"] = [int(c) for c in classes]
    added = 0
    with ShardWriter(path, feature_dim=feature_dim, class_names=COCO_CLASSES, feature_dtype=feature_dtype,
                     extractor=extractor) as w:
        for i in range(num_records):
            image_id = f"{id_prefix}/{i:08d}"
            rec_rng = np.random.default_rng([seed, i])  # per-record streams: resume gives the same data
            if image_id in w:
                continue
            added += w.add(image_id, **synth_record(rec_rng, prototypes, min_boxes, max_boxes, classes=classes))
            if progress:
                progress(1)
    return added
