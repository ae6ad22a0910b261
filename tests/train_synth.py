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


# ---- an independent world: no code or constant shared with regionbert.data.synth ---------------------------
# A learning test passes on data its own generator made could be passing on that generator's quirks. This one
# is written separately, with its own classes, feature model, detector noise and caption style: a few objects
# per scene, each seen by several overlapping boxes; sparse non-negative features whose strength varies with
# the box; a detector that is sometimes wrong; background boxes; captions that name every object in free order.

SCENE_KINDS = ["apple", "boat", "candle", "drum", "eagle", "fence", "guitar", "hammer", "igloo", "jacket",
               "kettle", "ladder", "mirror", "needle", "owl", "piano"]
SCENE_TEMPLATES = [("", " next to ", ""), ("an image with ", " , ", ""), ("look at ", " and ", " here"),
                   ("", " beside ", " on a table"), ("this shows ", " plus ", "")]
SCENE_FILLER = ["the", "one", "a"]


def _scene_caption(kinds: list[str], rng: np.random.Generator) -> str:
    head, join, tail = SCENE_TEMPLATES[rng.integers(len(SCENE_TEMPLATES))]
    names = [f"{SCENE_FILLER[rng.integers(3)]} {k}" for k in rng.permutation(kinds)]
    return (head + join.join(names) + tail).strip()


def _scene(rng: np.random.Generator, codes: np.ndarray, max_objects: int) -> dict:
    """One scene: 1..max_objects distinct kinds, 1-4 boxes each around the object, 0-4 background boxes."""
    K, D = codes.shape
    W, H = int(rng.integers(200, 800)), int(rng.integers(200, 800))
    kinds = rng.choice(K, size=int(rng.integers(1, max_objects + 1)), replace=False)
    boxes, feats, logits = [], [], []
    for k in list(kinds) + [-1] * int(rng.integers(0, 5)):
        cx, cy = rng.uniform(0.1, 0.9) * W, rng.uniform(0.1, 0.9) * H  # the object's box: centre, size
        w, h = rng.uniform(20, W / 2), rng.uniform(20, H / 2)
        for _ in range(int(rng.integers(1, 5)) if k >= 0 else 1):
            jit = rng.normal(0, 0.1, 4) * [w, h, w, h]
            x1, y1 = np.clip([cx - w / 2 + jit[0], cy - h / 2 + jit[1]], 0, [W - 2, H - 2])
            x2, y2 = np.clip([cx + w / 2 + jit[2], cy + h / 2 + jit[3]], [x1 + 1, y1 + 1], [W, H])
            boxes.append([x1, y1, x2, y2])
            strength = rng.uniform(0.4, 1.6)  # a partial box sees its object less
            base = codes[k] * strength if k >= 0 else rng.exponential(0.7, D) * (rng.random(D) < 0.2)
            feats.append(np.maximum(base + rng.normal(0, 0.25, D), 0))
            lg = rng.normal(0, 1, K + 1)  # index 0: background
            seen = k + 1 if k >= 0 and rng.random() > 0.15 else int(rng.integers(0, K + 1))  # 15% confused
            lg[seen] += rng.uniform(2, 5)
            logits.append(lg)
    logits = np.array(logits)
    probs = np.exp(logits - logits.max(1, keepdims=True))
    return dict(width=W, height=H, boxes=np.array(boxes, np.float32), features=np.array(feats, np.float32),
                class_probs=(probs / probs.sum(1, keepdims=True)).astype(np.float32),
                kinds=[SCENE_KINDS[k] for k in kinds])


def write_scenes(folder: str, n_train: int, n_val: int, feature_dim: int = 48, max_objects: int = 3,
                 captions_per_image: int = 2, seed: int = 0) -> dict:
    """A shard of n_train + n_val scenes written with ShardWriter directly, a captions.csv with a split
    column and a vocab.txt: {"shards", "captions", "tokenizer"}, as write_dataset."""
    from regionbert.data import ShardWriter

    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng([seed, 7])
    # each kind lights up 5 of the feature dims, at its own strengths
    codes = np.zeros((len(SCENE_KINDS), feature_dim), np.float32)
    for k in range(len(SCENE_KINDS)):
        codes[k, rng.choice(feature_dim, 5, replace=False)] = rng.uniform(1.0, 3.0, 5)
    shard, rows = os.path.join(folder, "scenes"), []
    with ShardWriter(shard, feature_dim=feature_dim, class_names=["background"] + SCENE_KINDS,
                     extractor={"name": "tests.train_synth.write_scenes", "seed": seed}) as w:
        for i in range(n_train + n_val):
            s = _scene(rng, codes, max_objects)
            kinds = s.pop("kinds")
            w.add(f"scene-{i:06d}", **s)
            rows += [{"image_id": f"scene-{i:06d}", "caption": _scene_caption(kinds, rng),
                      "split": "train" if i < n_train else "val"} for _ in range(captions_per_image)]
    path = os.path.join(folder, "captions.csv")
    pd.DataFrame(rows).to_csv(path, index=False)
    words = sorted({w for r in rows for w in r["caption"].split()})
    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(SPECIAL + words) + "\n")
    return {"shards": shard, "captions": path, "tokenizer": vocab}
