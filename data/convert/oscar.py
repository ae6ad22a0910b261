"""Shards -> the feature / label TSV pair that Oscar and VinVL's downstream code read (docs/vinvl-spec.md section 8).

VinVL's released region features and Oscar+'s data loaders (e.g. oscar/run_retrieval.py, run_captioning.py,
`get_image_features` / `get_od_labels`) read two TSV files with one line per image:

  {prefix}.feature.tsv   image_key \\t {"num_boxes": N, "features": base64(float32 N x (D + 6), little-endian)}
  {prefix}.label.tsv     image_key \\t [{"class": name, "conf": p, "rect": [x1, y1, x2, y2]}, ...]

read as `np.frombuffer(base64.b64decode(info["features"]), np.float32).reshape((num_boxes, -1))` and
`" ".join(l["class"] for l in labels)`. Each feature row is the region's D-dim feature (2048 for VinVL's
X152-C4 and for bottom-up-attention) followed by 6 position values: the box in original pixels normalised
by the image size, [x1/W, y1/H, x2/W, y2/H, (x2-x1)/W, (y2-y1)/H] (no "+1"): 2054 values, Oscar's
img_feature_dim. Each TSV gets a `.lineidx` beside it (the byte offset of every line, one per line), which
Oscar's TSVFile uses to seek. The label's class is the best foreground class of the stored distribution
(its name from the shard's class_names) and conf its probability.

Files are written to NAME.partial and renamed when complete (removed if the export fails).
"""

from __future__ import annotations

import base64
import json
import os
import warnings

import numpy as np
from tqdm import tqdm

from ..reader import ShardSet
from .common import ConvertError, ExportWarning

POSITION_DIM = 6


def positions(boxes: np.ndarray, width: int, height: int) -> np.ndarray:
    """(N, 4) xyxy original pixels -> (N, 6) [x1/W, y1/H, x2/W, y2/H, w/W, h/H], float32 (math in float64)."""
    b = np.asarray(boxes, np.float64).reshape(-1, 4)
    w, h = float(width), float(height)
    out = np.stack([b[:, 0] / w, b[:, 1] / h, b[:, 2] / w, b[:, 3] / h, (b[:, 2] - b[:, 0]) / w,
                    (b[:, 3] - b[:, 1]) / h], 1)
    return out.astype(np.float32)


def oscar_features(rec) -> np.ndarray:
    """(N, D + 6) float32: the stored features, then the 6 position values."""
    feats = np.asarray(rec.features, np.float32)
    feats = feats.reshape(rec.num_boxes, feats.shape[-1] if feats.ndim == 2 else 0)
    return np.concatenate([feats, positions(rec.boxes, rec.width, rec.height)], 1)


def _labels(rec, class_names: list[str] | None, shard: str) -> list[dict]:
    boxes = np.asarray(rec.boxes, np.float64).reshape(-1, 4)
    if rec.class_probs is None or not class_names:
        raise ConvertError(f"{shard}: record {rec.id!r} has no class distribution, which Oscar's label TSV "
                           "(the object tags) needs")
    probs = np.asarray(rec.class_probs, np.float32)
    best = probs[:, 1:].argmax(1) + 1 if len(probs) else np.zeros(0, np.int64)
    return [{"class": class_names[c], "conf": float(probs[i, c]), "rect": [float(v) for v in boxes[i]]}
            for i, c in enumerate(best)]


def _write_lineidx(tsv: str, lineidx: str) -> None:
    """The byte offset of each line of `tsv` (Oscar's TSVFile seeks with it), one per line, to `lineidx`."""
    offsets, pos = [], 0
    with open(tsv, "rb") as f:
        for line in f:
            offsets.append(pos)
            pos += len(line)
    with open(lineidx, "w") as f:
        f.write("".join(f"{o}\n" for o in offsets))


def export_oscar(source, out: str, progress: bool = True) -> int:
    """Shards -> OUT.feature.tsv, OUT.label.tsv and their .lineidx files (OUT is a path prefix, e.g.
    data/coco/train as VinVL names its {split}.feature.tsv). Returns the record count."""
    shards = ShardSet(source)
    names = [out + ".feature.tsv", out + ".label.tsv", out + ".feature.lineidx", out + ".label.lineidx"]
    parent = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(parent):
        raise ConvertError(f"{out}: the folder {parent} does not exist")
    dim = shards.meta.get("feature_dim")
    if dim != 2048:
        warnings.warn(ExportWarning(f"{out}: features are {dim}-d, so rows are {dim}+6; Oscar/VinVL models expect "
                                    "2054 (2048 + 6), as VinVL's X152-C4 and bottom-up-attention give"), stacklevel=2)
    class_names = shards.meta.get("class_names")
    empty = 0
    try:
        with open(names[0] + ".partial", "w", newline="") as ff, open(names[1] + ".partial", "w", newline="") as fl, \
                tqdm(total=len(shards), desc=f"export oscar -> {out}", unit="rec", disable=not progress) as bar:
            for shard in shards.shards:
                for i in range(len(shard)):
                    rec = shard[i]
                    if any(c in rec.id for c in "\t\r\n"):
                        raise ConvertError(f"{shard.path}: record {rec.id!r} has a tab or newline in its id, "
                                           "which a TSV cannot hold")
                    empty += rec.num_boxes == 0
                    feats = np.ascontiguousarray(oscar_features(rec), dtype="<f4")
                    info = {"num_boxes": int(rec.num_boxes), "features": base64.b64encode(feats.tobytes()).decode()}
                    ff.write(f"{rec.id}\t{json.dumps(info)}\n")
                    fl.write(f"{rec.id}\t{json.dumps(_labels(rec, class_names, shard.path))}\n")
                    bar.update(1)
        for tsv, idx in ((names[0], names[2]), (names[1], names[3])):
            _write_lineidx(tsv + ".partial", idx + ".partial")
        for n in names:
            os.replace(n + ".partial", n)
    finally:
        for n in names:
            if os.path.exists(n + ".partial"):
                os.remove(n + ".partial")
    if empty:
        warnings.warn(ExportWarning(f"{out}: {empty} records have no boxes; Oscar's reader fails on them (numpy "
                                    "cannot reshape an empty features field to (0, -1))"), stacklevel=2)
    return len(shards)
