"""A second synthetic world for the trainer's learning tests, written independently of tests/train_synth.py
and regionbert.data.synth (no code, constant or RNG stream shared): rooms of coloured household objects.

How it differs from train_synth.write_scenes, axis by axis:
- kinds: 20 nouns x 8 colours, and a size ("small" / "large") that only the box's geometry carries; the
  detector's classes are the nouns alone (colour is in its attribute distribution and the features);
- features: 96-d dense Gaussian: the noun's prototype (sd 1) plus the colour's (sd 0.7), scaled per box,
  plus a room-wide lighting offset (sd 0.3) and per-dimension noise (sd 0.9); not 5 sparse non-negative
  dims of 48;
- counts: 2-4 groups a room (distinct nouns, one colour each) of 1-3 objects, 2-6 objects in all, 1-2 boxes
  an object, 1-6 clutter boxes (features with no prototype): 3-18 regions an image, in random order;
- noise: the detector's best class is a random one (background included) for 25% of object boxes, at a
  temperature drawn per box; clutter boxes are called background about 60% of the time;
- captions: sentences over 2-3 of the room's groups (never all of a room with 3 or more), in random
  order, with counts and plurals ("two lamps"), a colour 60% of the time, sizes, spatial relations that
  hold in the image ("to the left of", "above"), verbs and filler ("there are", "in this room", "we can
  see"): 6-20 words (seed 0), 11 on average.

Nothing but the regions' features (and boxes, for sizes and relations) links the words to an image: a
mismatched image is another random room.
"""

from __future__ import annotations

import os

import numpy as np
import pandas as pd

RB_SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
NOUNS = ["lamp", "shelf", "pillow", "basket", "rug", "bucket", "teapot", "stool", "jar", "crate", "lantern",
         "barrel", "drawer", "curtain", "blanket", "trophy", "globe", "helmet", "wagon", "towel"]
PLURAL = {n: n + "s" for n in NOUNS} | {"shelf": "shelves"}
COLOURS = ["red", "blue", "green", "yellow", "black", "white", "orange", "purple"]
SIZES = ["small", "large"]
COUNT_WORDS = {1: ["a", "one"], 2: ["two"], 3: ["three"], 4: ["four"], 5: ["five"]}
# relation of the first object to the second, from their boxes' centres (image y grows downwards)
RELATIONS = {"left": "to the left of", "right": "to the right of", "up": "above", "down": "below"}
NEAR = ["near", "beside", "close to"]
VERBS = [("is", "are"), ("sits", "sit"), ("rests", "rest"), ("stands", "stand")]
OPENERS = ["", "in this room", "here", "in the picture"]
WORDS_EXTRA = "there is are and with also we can see while a an room holding".split()
MAX_WORDS = 38  # configs/tiny.toml: model.max_text_len = 40 tokens, [CLS] and [SEP] included


def vocabulary() -> list[str]:
    """Every word the grammar can write (each is one WordPiece token)."""
    words = set(NOUNS) | set(PLURAL.values()) | set(COLOURS) | set(SIZES) | set(WORDS_EXTRA)
    for group in (COUNT_WORDS.values(), [r.split() for r in RELATIONS.values()], [n.split() for n in NEAR],
                  VERBS, [o.split() for o in OPENERS]):
        for ws in group:
            words |= set(ws)
    return sorted(words)


# ---- rooms -------------------------------------------------------------------------------------------------

def _room(rng: np.random.Generator, nouns: np.ndarray, colours: np.ndarray, dim: int) -> dict:
    """A room: 2-4 groups (distinct nouns, each one colour) of 1-3 objects, 2-6 objects in all, 1-2 boxes an
    object, 1-6 clutter boxes."""
    W, H = int(rng.integers(320, 1025)), int(rng.integers(320, 1025))
    n_groups = int(rng.integers(2, 5))
    kinds = rng.choice(len(NOUNS), size=n_groups, replace=False)
    groups = [{"noun": int(k), "colour": int(rng.integers(len(COLOURS))), "boxes": []} for k in kinds]
    counts = rng.choice([1, 2, 3], size=n_groups, p=[0.7, 0.2, 0.1])
    while counts.sum() > 6:  # at most 6 objects a room
        counts[rng.choice(np.flatnonzero(counts > 1))] -= 1
    members = list(np.repeat(np.arange(n_groups), counts))
    light = rng.normal(0, 0.3, dim)  # the room's lighting: shared by all its regions
    boxes, feats, cls, attr = [], [], [], []
    n_cls = len(NOUNS) + 1

    def detect(peak: int, n: int, wrong: float) -> np.ndarray:
        logits = rng.normal(0, 1, n)
        if rng.random() < wrong:
            peak = int(rng.integers(0, n))
        logits[peak] += rng.uniform(1.5, 4.0)
        z = logits / rng.uniform(0.6, 1.3)  # the detector's temperature, per box
        p = np.exp(z - z.max())
        return p / p.sum()

    for g in members:
        grp = groups[g]
        bw, bh = rng.uniform(0.06, 0.5) * W, rng.uniform(0.06, 0.5) * H
        cx, cy = rng.uniform(bw / 2, W - bw / 2), rng.uniform(bh / 2, H - bh / 2)
        grp["boxes"].append((cx, cy, bw * bh / (W * H)))
        for b in range(int(rng.integers(1, 3))):
            if b == 0:
                x1, y1, x2, y2 = cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2
                seen = rng.uniform(0.8, 1.3)
            else:  # a second, looser detection of the same object sees it less well
                d = rng.normal(0, 0.15, 4) * [bw, bh, bw, bh]
                x1, y1 = cx - bw / 2 + d[0], cy - bh / 2 + d[1]
                x2, y2 = cx + bw / 2 + d[2], cy + bh / 2 + d[3]
                seen = rng.uniform(0.5, 1.0)
            x1, y1 = min(max(x1, 0.0), W - 4.0), min(max(y1, 0.0), H - 4.0)
            x2, y2 = min(max(x2, x1 + 2.0), float(W)), min(max(y2, y1 + 2.0), float(H))
            boxes.append([x1, y1, x2, y2])
            feats.append(seen * (nouns[grp["noun"]] + colours[grp["colour"]]) + light + rng.normal(0, 0.9, dim))
            cls.append(detect(grp["noun"] + 1, n_cls, 0.25))
            attr.append(detect(grp["colour"], len(COLOURS), 0.3))
    for _ in range(int(rng.integers(1, 7))):  # clutter: anywhere, any shape, no prototype in its feature
        x1, y1 = rng.uniform(0, 0.85) * W, rng.uniform(0, 0.85) * H
        x2, y2 = min(x1 + rng.uniform(0.05, 0.6) * W, W), min(y1 + rng.uniform(0.05, 0.6) * H, H)
        boxes.append([x1, y1, x2, y2])
        feats.append(rng.normal(0, 1.1, dim) + light)
        cls.append(detect(0, n_cls, 0.4))
        attr.append(detect(int(rng.integers(len(COLOURS))), len(COLOURS), 1.0))
    order = rng.permutation(len(boxes))  # regions in no particular order
    return dict(width=W, height=H, boxes=np.array(boxes, np.float32)[order],
                features=np.array(feats, np.float32)[order], class_probs=np.array(cls, np.float32)[order],
                attr_probs=np.array(attr, np.float32)[order], groups=groups)


# ---- captions ----------------------------------------------------------------------------------------------

def _phrase(grp: dict, rng: np.random.Generator) -> str:
    n = len(grp["boxes"])
    words = [str(rng.choice(COUNT_WORDS[n]))]
    area = grp["boxes"][0][2]
    if n == 1 and rng.random() < 0.5 and (area < 0.02 or area > 0.12):
        words.append("small" if area < 0.02 else "large")  # said only when it plainly holds
    if rng.random() < 0.6:
        words.append(COLOURS[grp["colour"]])
    words.append(NOUNS[grp["noun"]] if n == 1 else PLURAL[NOUNS[grp["noun"]]])
    if words[0] == "a" and words[1][0] in "aeiou":
        words[0] = "an"
    return " ".join(words)


def _relation(a: dict, b: dict, rng: np.random.Generator) -> str:
    (ax, ay, _), (bx, by, _) = a["boxes"][0], b["boxes"][0]
    if rng.random() < 0.3:
        return str(rng.choice(NEAR))
    dx, dy = ax - bx, ay - by
    if abs(dx) > abs(dy):
        return RELATIONS["left" if dx < 0 else "right"]
    return RELATIONS["up" if dy < 0 else "down"]


def _caption(groups: list[dict], rng: np.random.Generator) -> str:
    k = int(rng.integers(2, min(4, len(groups)) + 1))
    if len(groups) > 2 and k == len(groups):
        k -= 1  # a subset: never every group of a room with three or more
    picked = [groups[i] for i in rng.permutation(len(groups))[:k]]
    np_ = [_phrase(g, rng) for g in picked]
    plural = [len(g["boxes"]) > 1 for g in picked]
    style = int(rng.integers(4))
    if style == 0:  # there is a red lamp near two blue jars and a green rug
        s = f"there {'are' if plural[0] else 'is'} {np_[0]} {_relation(picked[0], picked[1], rng)} {np_[1]}"
        s += "".join(f" and {p}" for p in np_[2:])
    elif style == 1:  # a red lamp is above two blue jars while a green rug sits near a stool
        clauses = []
        for i in range(0, k - 1, 2):
            verb = VERBS[int(rng.integers(len(VERBS)))][int(plural[i])]
            clauses.append(f"{np_[i]} {verb} {_relation(picked[i], picked[i + 1], rng)} {np_[i + 1]}")
        if k % 2:
            clauses[-1] += f" with {np_[-1]}"
        s = f" {rng.choice(['and', 'while'])} ".join(clauses)
    elif style == 2:  # we can see a red lamp with two blue jars and also a green rug
        s = f"we can see {np_[0]} with {np_[1]}" + "".join(f" and also {p}" for p in np_[2:])
    else:  # a room holding two blue jars and a red lamp
        s = "a room holding " + " and ".join(np_)
    opener = OPENERS[int(rng.integers(len(OPENERS)))] if style != 3 else ""
    s = f"{opener} {s}".strip()
    assert len(s.split()) <= MAX_WORDS, s
    return s


# ---- the data set ------------------------------------------------------------------------------------------

def write_rooms(folder: str, n_train: int, n_val: int, captions_per_image: int = 2, seed: int = 0,
                feature_dim: int = 96) -> dict:
    """A shard of n_train + n_val rooms written with ShardWriter, a captions.csv (image_id, caption, split)
    and a vocab.txt: {"shards", "captions", "tokenizer"}, as train_synth.write_scenes."""
    from regionbert.data import ShardWriter

    os.makedirs(folder, exist_ok=True)
    protos, scenes, words = (np.random.default_rng(s) for s in np.random.SeedSequence([2027, seed]).spawn(3))
    nouns = protos.normal(0, 1.0, (len(NOUNS), feature_dim))
    colours = protos.normal(0, 0.7, (len(COLOURS), feature_dim))
    shard, rows = os.path.join(folder, "rooms"), []
    with ShardWriter(shard, feature_dim=feature_dim, class_names=["background"] + NOUNS, attribute_names=COLOURS,
                     extractor={"name": "tests.world_b.write_rooms", "seed": seed}) as w:
        for i in range(n_train + n_val):
            room = _room(scenes, nouns, colours, feature_dim)
            groups = room.pop("groups")
            image_id = f"room-{i:05d}"  # extra: what the room holds, [noun, colour, how many], for analyses
            w.add(image_id, **room, extra={"objects": [[NOUNS[g["noun"]], COLOURS[g["colour"]], len(g["boxes"])]
                                                       for g in groups]})
            rows += [{"image_id": image_id, "caption": _caption(groups, words),
                      "split": "train" if i < n_train else "val"} for _ in range(captions_per_image)]
    path = os.path.join(folder, "captions.csv")
    pd.DataFrame(rows).to_csv(path, index=False)
    vocab = os.path.join(folder, "vocab.txt")
    with open(vocab, "w") as f:
        f.write("\n".join(RB_SPECIAL + vocabulary()) + "\n")
    return {"shards": shard, "captions": path, "tokenizer": vocab}
