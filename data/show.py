"""Draw a shard record over its image: the stored boxes with their top class labels, as a PNG."""

from __future__ import annotations

import glob
import os

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from .errors import ShardError
from .format import Record

_PALETTE = [(230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
            (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (170, 110, 40), (128, 0, 0)]


def find_image(rec: Record, meta: dict, image: str | None = None, root: str | None = None) -> str:
    """The image file of a record: given, or the id (a path without extension) under root, or under
    the folder the extractor read (recorded in the shard). An id is a shard's word, so it may not lead
    outside that folder: absolute, `..`, or through a symlink (pass the file as `image` instead)."""
    if image:
        return image
    root = root or ((meta.get("extractor") or {}).get("job") or {}).get("images")
    if not isinstance(root, str) or not root or "\0" in root or not os.path.isdir(root):
        raise ShardError(f"record {rec.id!r}: no image file given and the shard records no image folder "
                         "(pass --image or --root)")
    if "\0" in rec.id or os.path.isabs(rec.id):
        raise ShardError(f"record {rec.id!r}: the id is not a relative path; pass the image with --image")
    real_root = os.path.realpath(root)
    hits = sorted(glob.glob(os.path.join(glob.escape(root), glob.escape(rec.id) + ".*")))
    if os.path.commonpath([real_root, os.path.realpath(os.path.join(root, rec.id))]) != real_root or any(
            os.path.commonpath([real_root, os.path.realpath(h)]) != real_root for h in hits):
        raise ShardError(f"record {rec.id!r}: the id leads outside the image folder {root}; pass the image "
                         "with --image")
    if not hits:
        raise ShardError(f"record {rec.id!r}: no file {rec.id}.* under {root}")
    return hits[0]


def box_labels(rec: Record) -> tuple[np.ndarray, np.ndarray] | None:
    """(class index, score) per box: the detector's own labels where the record keeps them (torchvision
    policy: extra labels/scores, what model(images) returned), else the best non-background class of the
    stored distribution; None if the record has neither."""
    extra = rec.extra or {}
    labels, scores = extra.get("labels"), extra.get("scores")
    if isinstance(labels, list) and isinstance(scores, list) and len(labels) == len(scores) == rec.num_boxes:
        return np.asarray(labels, np.int64), np.asarray(scores, np.float32)
    if rec.class_probs is not None:
        probs = rec.class_probs[:, 1:].astype(np.float32)  # background is never the label
        return probs.argmax(1) + 1, probs.max(1)
    return None


def random_weights(meta: dict | None) -> bool:
    """Whether the shard was extracted by a detector with random weights (--weights none)."""
    weights = ((meta or {}).get("extractor") or {}).get("weights")
    return isinstance(weights, str) and weights.lower() == "none"  # null (unknown, e.g. imported) is not random


Rect = tuple[float, float, float, float]  # x1, y1, x2, y2


def _overlap(a: Rect, b: Rect) -> float:
    return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))


def _clamp(v: float, lo: float, hi: float) -> float:
    return min(max(v, lo), max(lo, hi))


def place_labels(boxes, sizes, width: int, height: int, taken: list[Rect] | None = None) -> list[Rect]:
    """Where to put one label (a w x h rectangle) per box, placed in the order given (most important first):
    every label lies wholly inside the width x height image (unless it is larger than the image) and, where
    there is room anywhere, overlaps neither a label placed before it nor the `taken` rectangles. Tried in
    turn: just above the box, just below it, inside its top edge, inside its bottom edge (each at the box's
    left edge, then at its right edge, moved inside the image; a spot off the top or bottom of the image
    after the others); then the free spot nearest to the first of those (labels stack); if the image has
    no free spot, the tried spot that overlaps least."""
    placed: list[Rect] = list(taken or [])
    out: list[Rect] = []
    for (x1, y1, x2, y2), (w, h) in zip(boxes, sizes, strict=True):
        def at(x, y, w=w, h=h) -> Rect:
            x, y = _clamp(x, 0, width - w), _clamp(y, 0, height - h)
            return (x, y, x + w, y + h)

        def free(r: Rect) -> bool:
            return all(_overlap(r, o) == 0 for o in placed)

        ys = (y1 - h, y2, y1, y2 - h)  # those that would leave the image come last, moved inside it
        ys = [y for y in ys if 0 <= y <= height - h] + [y for y in ys if not 0 <= y <= height - h]
        tried = [at(x, y) for y in ys for x in (x1, x2 - w)]
        spot = next((r for r in tried if free(r)), None)
        if spot is None:  # stack: the free spot nearest to just above the box, on a grid of half a label
            sx, sy = max(1.0, w / 4), max(1.0, h / 2)
            grid = [at(i * sx, j * sy) for j in range(int(max(0, height - h) // sy) + 2)
                    for i in range(int(max(0, width - w) // sx) + 2)]
            grid.sort(key=lambda r: (r[0] - tried[0][0]) ** 2 + (r[1] - tried[0][1]) ** 2)
            spot = next((r for r in grid if free(r)), None)
        if spot is None:
            spot = min(tried, key=lambda r: sum(_overlap(r, o) for o in placed))
        placed.append(spot)
        out.append(spot)
    return out


def _gap(a: Rect, b: Rect) -> tuple[tuple[float, float], tuple[float, float]]:
    """The nearest points of two rectangles (a's, b's)."""
    def axis(a0, a1, b0, b1):
        if a1 < b0:
            return a1, b0
        if b1 < a0:
            return a0, b1
        m = (max(a0, b0) + min(a1, b1)) / 2
        return m, m
    (ax, bx), (ay, by) = axis(a[0], a[2], b[0], b[2]), axis(a[1], a[3], b[1], b[3])
    return (ax, ay), (bx, by)


def draw_record(rec: Record, image_path: str, class_names: list[str] | None, top: int = 20,
                min_width: int = 640, meta: dict | None = None) -> Image.Image:
    """The image (upright, as extracted) with up to `top` boxes, best first by their score, each labelled
    with its class name and score. Labels stay inside the image and off each other (place_labels; the
    best box's label is placed first); a label that had to move away from its box gets a line to it. With
    the shard's `meta`, a detector with random weights is named on the picture."""
    with Image.open(image_path) as im:
        im = ImageOps.exif_transpose(im).convert("RGB")
    if im.size != (rec.width, rec.height):
        raise ShardError(f"record {rec.id!r} is {rec.width}x{rec.height} but {image_path} is "
                         f"{im.size[0]}x{im.size[1]}: not the image it was extracted from")
    scale = max(1.0, min_width / rec.width)
    if scale > 1:
        im = im.resize((round(rec.width * scale), round(rec.height * scale)), Image.BILINEAR)
    draw = ImageDraw.Draw(im, "RGBA")
    font = ImageFont.load_default(size=max(11, round(12 * scale ** 0.5)))
    found = box_labels(rec)
    labelled = found is not None
    labels, scores = found if labelled else (np.zeros(rec.num_boxes, int), np.ones(rec.num_boxes, np.float32))
    banner = "RANDOM WEIGHTS (--weights none): boxes and labels are meaningless" if random_weights(meta) else None
    taken = [(0, 0, im.width, draw.textbbox((4, 4), banner, font=font)[3] + 4)] if banner else []  # kept clear
    best = np.argsort(-scores, kind="stable")[:top]
    boxes, texts, colors = [], [], []
    for i in best:
        boxes.append(tuple((rec.boxes[i] * scale).tolist()))
        colors.append(_PALETTE[int(labels[i]) % len(_PALETTE)])
        name = class_names[labels[i]] if class_names and labelled and labels[i] < len(class_names) else f"box {i}"
        texts.append(f"{name} {scores[i]:.2f}" if labelled else name)
    line = max(2, round(scale))
    for box, color in zip(boxes[::-1], colors[::-1], strict=True):  # best drawn last, on top
        draw.rectangle(box, outline=color + (255,), width=line)
    ink = [draw.textbbox((0, 0), t, font=font) for t in texts]
    spots = place_labels(boxes, [(b[2] - b[0] + 4, b[3] - b[1] + 2) for b in ink], im.width, im.height, taken)
    for box, color, text, b, spot in list(zip(boxes, colors, texts, ink, spots, strict=True))[::-1]:
        near, far = _gap(spot, box)
        if abs(near[0] - far[0]) + abs(near[1] - far[1]) > line + 1:  # moved off its box: point at it
            draw.line([near, far], fill=color + (255,), width=max(1, line // 2))
        draw.rectangle(spot, fill=color + (235,))
        ink_color = (0, 0, 0, 255) if 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] > 150 else \
            (255, 255, 255, 255)  # dark text on the light colours
        draw.text((spot[0] + 2 - b[0], spot[1] + 1 - b[1]), text, fill=ink_color, font=font)
    if banner:  # drawn last, over everything
        draw.rectangle(taken[0], fill=(200, 0, 0, 230))
        draw.text((4, 4), banner, fill=(255, 255, 255, 255), font=font)
    return im
