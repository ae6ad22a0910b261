"""Sample data the project makes itself: pictures of coloured shapes, captions naming them, a vocabulary.

Each image holds one to three objects (a colour and a shape) on a textured background; its captions
say which, in varied words. No downloads: everything is drawn here from a seed.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (140, 50, 170), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
TEMPLATES = ("a photo of {}", "there is {} in the picture", "{} on a grey background", "a picture showing {}",
             "we can see {} here")
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _draw(draw: ImageDraw.ImageDraw, shape: str, box, color) -> None:
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=color)


def make_image(rng: np.random.Generator, width: int = 224, height: int = 168) -> tuple[Image.Image, list[str]]:
    base = rng.integers(150, 210, (height // 8, width // 8, 1)).repeat(3, 2).astype(np.uint8)
    im = Image.fromarray(base).resize((width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(im)
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
        size = int(rng.integers(40, 80))
        x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
        _draw(draw, shape, (x, y, x + size, y + size), COLORS[color])
        objects.append(f"{color} {shape}")
    return im, objects


def caption(objects: list[str], rng: np.random.Generator) -> str:
    names = [f"a {o}" for o in rng.permutation(objects)]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return TEMPLATES[int(rng.integers(len(TEMPLATES)))].format(listed)


def write_sample_data(folder: str, num_images: int = 96, val_fraction: float = 0.25, captions_per_image: int = 2,
                      seed: int = 0) -> dict:
    """images/*.jpg, captions.csv (image_id, caption, split) and vocab.txt under folder."""
    rng = np.random.default_rng(seed)
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    rows = []
    n_val = int(num_images * val_fraction)
    for i in range(num_images):
        im, objects = make_image(rng)
        image_id = f"shapes_{i:04d}"
        im.save(os.path.join(images, image_id + ".jpg"), quality=92)
        split = "val" if i >= num_images - n_val else "train"
        rows += [{"image_id": image_id, "caption": caption(objects, rng), "split": split}
                 for _ in range(captions_per_image)]
    captions = os.path.join(folder, "captions.csv")
    pd.DataFrame(rows).to_csv(captions, index=False)
    words = sorted({w for r in rows for w in r["caption"].replace(",", " , ").split()})
    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join([*SPECIAL, *words]) + "\n")
    return {"images": images, "captions": captions, "vocab": vocab, "num_images": num_images,
            "num_captions": len(rows)}
