"""The trainer's data path as it was before issue 13 (float32 on the host, masking and padding one sample
at a time), kept verbatim as a reference: tests/test_train_feed.py checks that the new path gives the
same losses, and bench/bench_loader.py measures it side by side with the new one."""

from __future__ import annotations

import numpy as np
import torch

from regionbert.train.masking import IGNORE, REGION_TASKS, modalities


def legacy_getitem(ds, key) -> dict:
    """The old PairDataset.__getitem__, on a new PairDataset (the same fields)."""
    task, p, other, seed = key
    rng = np.random.default_rng(seed)
    image = int(ds.pairs.image[p]) if other < 0 else int(other)
    rec = ds.shards[int(ds.pairs.pool[image])]
    n = min(rec.num_boxes, ds.max_regions)
    ids = ds.pairs.tokens[p]
    text_masked, regions_masked = modalities(task, ds.masking)
    inputs, labels = legacy_mask_text(ds, ids, rng) if text_masked else (ids, np.full_like(ids, IGNORE))
    region_mask = legacy_mask_regions(n, rng, ds.mask_prob) if regions_masked else np.zeros(n, dtype=bool)
    if rec.class_probs is not None:
        probs = np.array(rec.class_probs[:n], dtype=np.float32)
    elif task in REGION_TASKS[1:]:
        raise ValueError(f"task {task} needs class distributions but record {rec.id!r} has none")
    else:
        probs = np.zeros((n, 0), dtype=np.float32)
    return {"task": task, "input_ids": inputs, "mlm_labels": labels, "region_mask": region_mask,
            "features": np.array(rec.features[:n], dtype=np.float32),  # copies: owned, writable
            "locations": np.array((rec.loc7 if ds.loc_dim == 7 else rec.loc5)[:n], dtype=np.float32),
            "class_probs": probs, "itm_label": int(other < 0), "pair": p, "image": image}


def legacy_mask_text(ds, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """The old TextMasker.__call__."""
    m = ds.masker
    eligible = ~np.isin(ids, list(m.special_ids))
    chosen = eligible & (rng.random(len(ids)) < m.prob)
    if eligible.any() and not chosen.any():  # at least one per sample
        chosen[rng.choice(np.flatnonzero(eligible))] = True
    labels = np.where(chosen, ids, IGNORE)
    inputs = ids.copy()
    u = rng.random(len(ids))
    inputs[chosen & (u < 0.8)] = m.mask_id
    rand = chosen & (u >= 0.8) & (u < 0.9)
    inputs[rand] = rng.choice(m.random_ids, size=int(rand.sum()))
    return inputs, labels


def legacy_mask_regions(n: int, rng: np.random.Generator, prob: float = 0.15) -> np.ndarray:
    chosen = rng.random(n) < prob
    if n and not chosen.any():
        chosen[rng.integers(n)] = True
    return chosen


def legacy_collate(samples: list[dict]) -> dict:
    """The old collate: float32 batch tensors, filled one sample at a time."""
    B = len(samples)
    text_lens = torch.tensor([len(s["input_ids"]) for s in samples])
    region_lens = torch.tensor([len(s["features"]) for s in samples])
    L, N = int(text_lens.max()), int(region_lens.max())
    D, loc, C = samples[0]["features"].shape[1], samples[0]["locations"].shape[1], samples[0]["class_probs"].shape[1]
    batch = {
        "input_ids": torch.zeros(B, L, dtype=torch.long),
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


class LegacyDataset(torch.utils.data.Dataset):
    """The old per-sample dataset over a new PairDataset's data: for a DataLoader with legacy_collate."""

    def __init__(self, ds):
        self.ds = ds

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, key) -> dict:
        return legacy_getitem(self.ds, key)
