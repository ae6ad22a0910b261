"""From shards and captions to batches: pairs, a token-bucket sampler, per-task masking, collate.

A *pair* is one caption with its image. Each step trains one task on one batch:

    TokenBucketSampler  pair indices, batched by a token budget over text + regions (little padding)
    TaskSampler         draws the batch's task by the mixing ratios; for ITM swaps in another image
                        for half the pairs; gives every sample its own random seed
    PairDataset         reads the record (through regionbert.data), masks what the task hides
    collate             pads into tensors and measures the padding

Masking happens in the loader workers, seeded per sample, so a run is reproducible whatever the
number of workers.
"""

from __future__ import annotations

import itertools
import os

import numpy as np
import torch

from regionbert.data import ShardSet

from .masking import IGNORE, REGION_TASKS, TextMasker, mask_regions, modalities
from .text import Text, read_manifest


class Pairs:
    """Captions joined to shard records: pair p is (tokens[p], image[p]); images index `pool`."""

    def __init__(self, shards: ShardSet, manifest: str | os.PathLike, text: Text, split: str | None = None,
                 max_regions: int = 100):
        df = read_manifest(manifest, split)
        position = {image_id: i for i, image_id in enumerate(shards.keys())}
        ids = df["image_id"].tolist()
        missing = [(row, i) for row, i in enumerate(ids) if i not in position]
        if missing:
            shown = ", ".join(f"row {r}: {i!r}" for r, i in missing[:5])
            raise KeyError(f"{os.fspath(manifest)}: {len(missing)} caption(s) name images that are in no shard "
                           f"({shown}{', ...' if len(missing) > 5 else ''})")
        names, self.image = np.unique(np.array(ids, dtype=object), return_inverse=True)
        self.pool = np.array([position[n] for n in names], dtype=np.int64)  # image -> ShardSet index
        self.image_ids = list(names)
        self.tokens = text.encode(df["caption"].tolist())
        self.num_boxes = np.array([min(shards[int(i)].num_boxes, max_regions) for i in self.pool], dtype=np.int64)
        self.lengths = np.array([len(t) for t in self.tokens]) + self.num_boxes[self.image]  # text + regions

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_images(self) -> int:
        return len(self.pool)


class PairDataset(torch.utils.data.Dataset):
    """dataset[(task, pair, other_image, seed)] -> one sample, masked for the task (numpy arrays).

    other_image >= 0 replaces the pair's image (an ITM negative); seed seeds this sample's masking."""

    def __init__(self, shards: ShardSet, pairs: Pairs, text: Text, masking: str = "conditional",
                 mask_prob: float = 0.15, max_regions: int = 100, loc_dim: int = 7):
        self.shards, self.pairs, self.masking, self.mask_prob = shards, pairs, masking, mask_prob
        self.max_regions, self.loc_dim = max_regions, loc_dim
        self.masker = TextMasker(text.mask_id, text.random_ids, text.special_ids, mask_prob)
        modalities("mlm", masking)  # fail early on an unknown mode
        if shards.meta["class_names"] is None:
            self.num_classes = 0
        else:
            self.num_classes = len(shards.meta["class_names"])

    def __len__(self) -> int:
        return len(self.pairs)

    def regions(self, image: int) -> tuple[np.ndarray, np.ndarray]:
        """An image's unmasked (features (n, D), locations (n, loc_dim)) as float32 (for retrieval)."""
        rec = self.shards[int(self.pairs.pool[image])]
        n = min(rec.num_boxes, self.max_regions)
        return (np.array(rec.features[:n], dtype=np.float32),
                np.array((rec.loc7 if self.loc_dim == 7 else rec.loc5)[:n], dtype=np.float32))

    def __getitem__(self, key) -> dict:
        task, p, other, seed = key
        rng = np.random.default_rng(seed)
        image = int(self.pairs.image[p]) if other < 0 else int(other)
        rec = self.shards[int(self.pairs.pool[image])]
        n = min(rec.num_boxes, self.max_regions)
        ids = self.pairs.tokens[p]
        text_masked, regions_masked = modalities(task, self.masking)
        inputs, labels = self.masker(ids, rng) if text_masked else (ids, np.full_like(ids, IGNORE))
        region_mask = mask_regions(n, rng, self.mask_prob) if regions_masked else np.zeros(n, dtype=bool)
        if rec.class_probs is not None:
            probs = np.array(rec.class_probs[:n], dtype=np.float32)
        elif task in REGION_TASKS[1:]:
            raise ValueError(f"task {task} needs class distributions but record {rec.id!r} has none")
        else:
            probs = np.zeros((n, 0), dtype=np.float32)
        return {"task": task, "input_ids": inputs, "mlm_labels": labels, "region_mask": region_mask,
                "features": np.array(rec.features[:n], dtype=np.float32),  # copies: owned, writable
                "locations": np.array((rec.loc7 if self.loc_dim == 7 else rec.loc5)[:n], dtype=np.float32),
                "class_probs": probs, "itm_label": int(other < 0), "pair": p, "image": image}


def collate(samples: list[dict]) -> dict:
    """Pad a list of samples of one task into a batch of tensors (text to the longest text, regions
    to the most regions; the model packs them). pad_fraction: the share of the packed (B, T) sequence
    that is padding."""
    B = len(samples)
    text_lens = torch.tensor([len(s["input_ids"]) for s in samples])
    region_lens = torch.tensor([len(s["features"]) for s in samples])
    L, N = int(text_lens.max()), int(region_lens.max())
    D, loc, C = samples[0]["features"].shape[1], samples[0]["locations"].shape[1], samples[0]["class_probs"].shape[1]
    batch = {
        "input_ids": torch.zeros(B, L, dtype=torch.long),  # [PAD] positions are never attended to
        "mlm_labels": torch.full((B, L), IGNORE, dtype=torch.long),
        "features": torch.zeros(B, N, D), "locations": torch.zeros(B, N, loc), "class_probs": torch.zeros(B, N, C),
        "region_mask": torch.zeros(B, N, dtype=torch.bool),
    }
    for b, s in enumerate(samples):
        t, n = len(s["input_ids"]), len(s["features"])
        batch["input_ids"][b, :t] = torch.from_numpy(s["input_ids"])
        batch["mlm_labels"][b, :t] = torch.from_numpy(s["mlm_labels"])
        for k in ("features", "locations", "class_probs", "region_mask"):
            batch[k][b, :n] = torch.from_numpy(s[k])
    tokens = int((text_lens + region_lens).sum())
    batch.update(
        task=samples[0]["task"], text_lens=text_lens, region_lens=region_lens,
        itm_labels=torch.tensor([s["itm_label"] for s in samples]),
        pairs=torch.tensor([s["pair"] for s in samples]), images=torch.tensor([s["image"] for s in samples]),
        num_tokens=tokens, pad_fraction=1 - tokens / (B * int((text_lens + region_lens).max())),
    )
    return batch


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


class TokenBucketSampler:
    """Batches of pair indices under a token budget: batch size x longest (text + regions) <= budget.

    Shuffle, cut into buckets of bucket_size pairs, sort each bucket by length, fill batches in that
    order, shuffle the batches (UNITER). sort=False gives plain random batches under the same budget,
    for comparison. A pair longer than the budget gets a batch of its own."""

    def __init__(self, lengths, token_budget: int, bucket_size: int = 8192, sort: bool = True, seed: int = 0,
                 max_batch_size: int | None = None):
        self.lengths = np.asarray(lengths)
        self.budget, self.bucket_size, self.sort, self.seed = token_budget, bucket_size, sort, seed
        self.max_batch_size = max_batch_size or len(self.lengths)

    def batches(self, epoch: int) -> list[list[int]]:
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.lengths))
        out = []
        for start in range(0, len(order), self.bucket_size):
            bucket = order[start:start + self.bucket_size]
            if self.sort:
                bucket = bucket[np.argsort(-self.lengths[bucket], kind="stable")]
            batch, longest = [], 0
            for i in bucket.tolist():
                n = max(longest, int(self.lengths[i]))
                if batch and (n * (len(batch) + 1) > self.budget or len(batch) >= self.max_batch_size):
                    out.append(batch)
                    batch, n = [], int(self.lengths[i])
                batch.append(i)
                longest = n
            if batch:
                out.append(batch)
        return [out[i] for i in rng.permutation(len(out))]

    def padding_fraction(self, epoch: int = 0) -> float:
        """The padding share of one epoch of batches (packed text + regions, as the model sees it)."""
        real = padded = 0
        for b in self.batches(epoch):
            lens = self.lengths[b]
            real, padded = real + int(lens.sum()), padded + len(b) * int(lens.max())
        return 1 - real / padded


class TaskSampler:
    """An endless stream of batches of dataset keys (task, pair, other_image, seed), one task per batch.

    mix: {task: ratio}; a batch's task is drawn with these probabilities. In an ITM batch each pair's
    image is swapped for another image with probability itm_neg_prob, drawn uniformly from the
    neg_window images nearest in box count on either side (0: from all images). Matching box counts
    keeps batches tight, and denies the model a shortcut: a negative's box count says nothing.
    skip: batches to pass over (to resume a run where it stopped).

    Distributed: an epoch's batches are dealt out in groups of world_size, batch g * world_size + rank
    to each rank (a remainder smaller than a group is dropped, so every rank has as many steps). The
    task of group g is drawn from an RNG seeded by (seed, epoch, g) only: every rank trains the same
    task at the same step, so each step's gradients are of one objective, as in UNITER.
    On one process this is the same stream as before sharding existed."""

    def __init__(self, buckets: TokenBucketSampler, pairs: Pairs, mix: dict, seed: int = 0,
                 itm_neg_prob: float = 0.5, neg_window: int = 100, skip: int = 0, rank: int = 0,
                 world_size: int = 1):
        self.tasks = [t for t, r in mix.items() if r > 0]
        if not self.tasks:
            raise ValueError(f"tasks.mix gives no task a positive ratio: {mix}")
        ratios = np.array([mix[t] for t in self.tasks], dtype=np.float64)
        self.probs = ratios / ratios.sum()
        if "itm" in self.tasks and pairs.num_images < 2:
            raise ValueError("ITM needs at least two images to make negatives")
        self.buckets, self.pairs, self.seed, self.neg_prob, self.skip = buckets, pairs, seed, itm_neg_prob, skip
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        self.process_rank, self.world_size = rank, world_size
        self.by_boxes = np.argsort(pairs.num_boxes, kind="stable")  # images by box count
        self.rank = np.empty_like(self.by_boxes)
        self.rank[self.by_boxes] = np.arange(len(self.by_boxes))
        self.window = neg_window if 0 < 2 * neg_window + 1 < pairs.num_images else 0

    def __iter__(self):
        skip, W = self.skip, self.world_size
        for epoch in itertools.count():
            batches = self.buckets.batches(epoch)
            groups = len(batches) // W  # steps this epoch, the same on every rank
            if groups == 0:
                raise ValueError(f"an epoch has {len(batches)} batches, fewer than the {W} processes: "
                                 "lower data.token_budget or use more data")
            if skip >= groups:
                skip -= groups
                continue
            for g in range(skip, groups):
                b = g * W + self.process_rank
                yield self.keys(batches[b], epoch, b, g)
            skip = 0

    def keys(self, batch: list[int], epoch: int, b: int, group: int | None = None) -> list[tuple]:
        """The dataset keys of batch b of an epoch; its task comes from its group (the step's batches)."""
        group = b if group is None else group
        rng = np.random.default_rng([self.seed, epoch, group])  # the same on every rank
        task = self.tasks[rng.choice(len(self.tasks), p=self.probs)]
        if self.world_size > 1:  # negatives: this rank's own draws
            rng = np.random.default_rng([self.seed, epoch, group, self.process_rank])
        other = np.full(len(batch), -1)
        if task == "itm":
            neg = rng.random(len(batch)) < self.neg_prob
            other = np.where(neg, self.negatives(self.pairs.image[batch], rng), -1)
        return [(task, p, int(o), (self.seed, epoch, b, j))
                for j, (p, o) in enumerate(zip(batch, other.tolist(), strict=True))]

    def negatives(self, own: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """For each image in own, another image: near it in box count (see above), never itself."""
        if not self.window:
            draw = rng.integers(self.pairs.num_images - 1, size=len(own))
            return draw + (draw >= own)  # uniform over all images but the own one
        size = 2 * self.window + 1  # a window of images sorted by box count, shifted to fit the ends
        r = self.rank[own]
        lo = np.clip(r - self.window, 0, self.pairs.num_images - size)
        k = lo + rng.integers(size - 1, size=len(own))
        return self.by_boxes[k + (k >= r)]  # skip the own image's slot
