"""Sample data the project makes itself: pictures of coloured shapes, captions naming them, a vocabulary.

Each image holds one to three objects (a colour and a shape) on a textured background; each caption
lists them in a random order ("a red circle and an orange square"). No filler words: a masked caption word
is then almost always a colour or a shape, which only the image can tell, so masked language modelling
itself teaches the model to look at the regions (with template sentences around the objects, the same
pretraining stayed at chance on image-text matching for 900 steps even on perfect region features;
listing the objects alone, 0.91 after 600). No downloads: everything is drawn here from a seed.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
          "purple": (140, 50, 170), "orange": (245, 140, 30)}
SHAPES = ("circle", "square", "triangle")
SPECIAL = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")


def _draw(draw: ImageDraw.ImageDraw, shape: str, box, color) -> None:
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse(box, fill=color)
    elif shape == "square":
        draw.rectangle(box, fill=color)
    else:
        draw.polygon([((x1 + x2) / 2, y1), (x2, y2), (x1, y2)], fill=color)


def make_image(rng: np.random.Generator, width: int = 224, height: int = 168
               ) -> tuple[Image.Image, list[tuple[str, list[int]]]]:
    """An image and its objects: (name such as "red circle", [x1, y1, x2, y2] pixels), drawn in order."""
    base = rng.integers(150, 210, (height // 8, width // 8, 1)).repeat(3, 2).astype(np.uint8)
    im = Image.fromarray(base).resize((width, height), Image.BILINEAR)
    draw = ImageDraw.Draw(im)
    objects = []
    for _ in range(int(rng.integers(1, 4))):
        color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
        size = int(rng.integers(40, 80))
        x, y = int(rng.integers(0, width - size)), int(rng.integers(0, height - size))
        _draw(draw, shape, (x, y, x + size, y + size), COLORS[color])
        objects.append((f"{color} {shape}", [x, y, x + size, y + size]))
    return im, objects


def class_names() -> list[str]:
    """The detector's classes: every colour and shape, "red circle" ... "orange triangle"."""
    return [f"{c} {s}" for c in COLORS for s in SHAPES]


def coco_json(entries: list[tuple[str, int, int, list]], path: str) -> None:
    """[(file_name, width, height, objects)] -> a COCO-format json (bbox = [x, y, w, h])."""
    names = class_names()
    images, annotations = [], []
    for i, (file_name, w, h, objects) in enumerate(entries):
        images.append({"id": i + 1, "file_name": file_name, "width": w, "height": h})
        for name, (x1, y1, x2, y2) in objects:
            annotations.append({"id": len(annotations) + 1, "image_id": i + 1, "category_id": names.index(name) + 1,
                                "bbox": [x1, y1, x2 - x1, y2 - y1], "area": (x2 - x1) * (y2 - y1), "iscrowd": 0})
    categories = [{"id": i + 1, "name": n} for i, n in enumerate(names)]
    with open(path, "w") as f:
        json.dump({"images": images, "annotations": annotations, "categories": categories}, f)


def article(words: str) -> str:
    """ "an" before a vowel ("an orange circle"), else "a"."""
    return "an" if words[:1].lower() in "aeiou" and words[:1] else "a"


def caption(objects: list[str], rng: np.random.Generator) -> str:
    """The objects in a random order, each with its article: "a red circle, an orange square and a blue square"."""
    names = [f"{article(o)} {o}" for o in rng.permutation(objects)]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def write_sample_data(folder: str, num_images: int = 96, val_fraction: float = 0.25, captions_per_image: int = 2,
                      seed: int = 0) -> dict:
    """images/*.jpg, captions.csv (image_id, caption, split), vocab.txt, and the objects' boxes as COCO
    jsons (boxes_train.json, boxes_val.json: the same train / val split as the captions) under folder."""
    rng = np.random.default_rng(seed)
    images = os.path.join(folder, "images")
    os.makedirs(images, exist_ok=True)
    rows = []
    n_val = int(num_images * val_fraction)
    boxes: dict[str, list] = {"train": [], "val": []}
    for i in range(num_images):
        im, objects = make_image(rng)
        image_id = f"shapes_{i:04d}"
        im.save(os.path.join(images, image_id + ".jpg"), quality=92)
        split = "val" if i >= num_images - n_val else "train"
        boxes[split].append((image_id + ".jpg", im.width, im.height, objects))
        rows += [{"image_id": image_id, "caption": caption([name for name, _ in objects], rng), "split": split}
                 for _ in range(captions_per_image)]
    for split, entries in boxes.items():
        coco_json(entries, os.path.join(folder, f"boxes_{split}.json"))
    captions = os.path.join(folder, "captions.csv")
    pd.DataFrame(rows).to_csv(captions, index=False)
    # every word a caption can hold, so that the vocabulary does not depend on which objects were drawn
    words = sorted({w for r in rows for w in r["caption"].replace(",", " , ").split()}
                   | {"a", "an", "and", ",", *COLORS, *SHAPES})
    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join([*SPECIAL, *words]) + "\n")
    return {"images": images, "captions": captions, "vocab": vocab, "num_images": num_images,
            "num_captions": len(rows), "boxes_train": os.path.join(folder, "boxes_train.json"),
            "boxes_val": os.path.join(folder, "boxes_val.json")}
