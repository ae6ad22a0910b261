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


def draw_record(rec: Record, image_path: str, class_names: list[str] | None, top: int = 20,
                min_width: int = 640) -> Image.Image:
    """The image (upright, as extracted) with up to `top` boxes, best first by their class score."""
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
    if rec.class_probs is not None:
        probs = rec.class_probs[:, 1:].astype(np.float32)  # background is never the label
        labels, scores = probs.argmax(1) + 1, probs.max(1)
    else:
        labels, scores = np.zeros(rec.num_boxes, int), np.ones(rec.num_boxes, np.float32)
    for i in np.argsort(-scores, kind="stable")[:top][::-1]:  # best drawn last, on top
        x1, y1, x2, y2 = (rec.boxes[i] * scale).tolist()
        color = _PALETTE[int(labels[i]) % len(_PALETTE)]
        draw.rectangle([x1, y1, x2, y2], outline=color + (255,), width=max(2, round(scale)))
        name = class_names[labels[i]] if class_names and rec.class_probs is not None else f"box {i}"
        text = f"{name} {scores[i]:.2f}" if rec.class_probs is not None else name
        tx0, ty0, tx1, ty1 = draw.textbbox((x1 + 3, y1 + 1), text, font=font)
        draw.rectangle([tx0 - 2, ty0 - 1, tx1 + 2, ty1 + 1], fill=color + (200,))
        draw.text((x1 + 3, y1 + 1), text, fill=(255, 255, 255, 255), font=font)
    return im
