"""Synthetic image-text data for the trainer's tests: shards from regionbert.data.synth, captions that
name the objects each image holds, and a small WordPiece vocabulary (no downloads)."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd

from regionbert.data import ShardSet
from regionbert.data.synth import COCO_CLASSES, REAL_CLASSES, write_synthetic_shard

SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TEMPLATES = ["a photo of {}", "there is {} in the picture", "{} in an image", "a picture showing {}",
             "we can see {} here"]
OBJECT_WORDS = sorted({w for c in COCO_CLASSES if c not in ("__background__", "N/A") for w in c.split()})
WORDS = sorted(set(OBJECT_WORDS) | {w for t in TEMPLATES for w in t.replace("{}", "").split()} | {"a", "and", ","})


def write_vocab(path: str) -> str:
    with open(path, "w") as f:
        f.write("\n".join(SPECIAL + WORDS) + "\n")
    return path


def caption(objects: list[str], rng: np.random.Generator) -> str:
    names = [f"a {o}" for o in rng.permutation(objects)]
    listed = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return TEMPLATES[rng.integers(len(TEMPLATES))].format(listed)


def write_dataset(folder: str, n_train: int, n_val: int, feature_dim: int = 64, min_boxes: int = 5,
                  max_boxes: int = 20, captions_per_image: int = 2, seed: int = 0, manifest: str = "captions.csv",
                  num_classes: int | None = None):
    """One shard of n_train + n_val images, a caption manifest with a split column, and a vocab.txt."""
    os.makedirs(folder, exist_ok=True)
    shard = os.path.join(folder, "shard-00000")
    classes = None if num_classes is None else REAL_CLASSES[:num_classes]
    write_synthetic_shard(shard, n_train + n_val, feature_dim=feature_dim, min_boxes=min_boxes,
                          max_boxes=max_boxes, seed=seed, classes=classes)
    rng = np.random.default_rng(seed)
    rows = []
    shards = ShardSet(shard)  # read only after writing: one LMDB environment per file per process
    for i, image_id in enumerate(shards.keys()):
        objects = shards[i].extra["objects"]
        for _ in range(captions_per_image):
            rows.append({"image_id": image_id, "caption": caption(objects, rng),
                         "split": "train" if i < n_train else "val", "objects": json.dumps(objects)})
    df = pd.DataFrame(rows)
    path = os.path.join(folder, manifest)
    if manifest.endswith(".csv"):
        df.to_csv(path, index=False)
    elif manifest.endswith(".jsonl"):
        df.to_json(path, orient="records", lines=True)
    else:
        df.to_parquet(path)
    return {"shards": shard, "captions": path, "tokenizer": write_vocab(os.path.join(folder, "vocab.txt"))}
