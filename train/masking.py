"""What each pretraining task hides, per sample (numpy, in the data loader).

- Text (MLM): each word with probability 0.15, at least one per sample; a chosen word becomes [MASK]
  80% of the time, a random word 10%, and stays unchanged 10%. [CLS] and [SEP] are never chosen.
- Regions (MRFR, MRC, MRC-kl): each region with probability 0.15, at least one (when there is one).
  The model replaces a masked region's feature by zeros; the targets keep the original.
- Which modality a task masks: `conditional` (UNITER, the default) masks only the one the task
  reconstructs, so the other is intact and can explain it; `joint` masks both at random, for
  ablations (then the word "dog" and the dog's regions may be hidden together).

Every sample draws from its own generator (seeded by its dataset key), so its masks do not depend on
the batch it is in or on the number of loader workers. The batch functions (`TextMasker.batch`,
`mask_regions_batch`) take one generator per sample and draw from each exactly what the per-sample
functions draw, in the same order, so they give the same masks; the arithmetic on the draws runs once
over the padded batch instead of once per sample.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

IGNORE = -100  # label of a token that has no MLM target (F.cross_entropy's ignore_index)
TEXT_TASKS = ("mlm",)
REGION_TASKS = ("mrfr", "mrc", "mrc_kl")
MODES = ("conditional", "joint")


@dataclass(frozen=True)
class TextMasker:
    mask_id: int
    random_ids: np.ndarray  # ids a word may be replaced by (the vocabulary without special tokens)
    special_ids: frozenset  # never masked ([CLS], [SEP], [PAD])
    prob: float = 0.15

    def __call__(self, ids: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """ids (L,) -> (inputs (L,), labels (L,) with the original id where masked, IGNORE elsewhere)."""
        eligible = ~np.isin(ids, list(self.special_ids))
        chosen = eligible & (rng.random(len(ids)) < self.prob)
        if eligible.any() and not chosen.any():  # at least one per sample
            chosen[rng.choice(np.flatnonzero(eligible))] = True
        labels = np.where(chosen, ids, IGNORE)
        inputs = ids.copy()
        u = rng.random(len(ids))
        inputs[chosen & (u < 0.8)] = self.mask_id
        rand = chosen & (u >= 0.8) & (u < 0.9)
        inputs[rand] = rng.choice(self.random_ids, size=int(rand.sum()))
        return inputs, labels  # the remaining 10% of chosen words stay unchanged

    def batch(self, seqs: list[np.ndarray], rngs: list[np.random.Generator]) -> tuple[np.ndarray, np.ndarray]:
        """B sequences (L_b,) and one generator each -> (inputs (B, L), labels (B, L)) padded to the longest
        with 0 / IGNORE; row b equals self(seqs[b], rngs[b]) on its first L_b positions."""
        lens = np.fromiter(map(len, seqs), np.int64, len(seqs))
        valid = np.arange(int(lens.max(initial=0)))[None] < lens[:, None]  # (B, L)
        ids = np.zeros(valid.shape, np.int64)
        ids[valid] = np.concatenate(seqs) if seqs else []
        eligible = valid & ~np.isin(ids, list(self.special_ids))
        u = np.ones(valid.shape)  # padding draws nothing and is never chosen
        for row, rng, n in zip(u, rngs, lens.tolist(), strict=True):
            rng.random(out=row[:n])
        chosen = eligible & (u < self.prob)
        for b in np.flatnonzero(eligible.any(1) & ~chosen.any(1)).tolist():  # at least one per sample
            chosen[b, rngs[b].choice(np.flatnonzero(eligible[b]))] = True
        labels = np.where(chosen, ids, IGNORE)
        for row, rng, n in zip(u, rngs, lens.tolist(), strict=True):
            rng.random(out=row[:n])
        inputs = ids.copy()
        inputs[chosen & (u < 0.8)] = self.mask_id
        rand = chosen & (u >= 0.8) & (u < 0.9)
        counts = rand.sum(1)
        for b in np.flatnonzero(counts).tolist():
            inputs[b, rand[b]] = rngs[b].choice(self.random_ids, size=int(counts[b]))
        return inputs, labels


def mask_regions(n: int, rng: np.random.Generator, prob: float = 0.15) -> np.ndarray:
    """(n,) bool: which of n regions to hide; at least one when n > 0."""
    chosen = rng.random(n) < prob
    if n and not chosen.any():
        chosen[rng.integers(n)] = True
    return chosen


def mask_regions_batch(lens: np.ndarray, rngs: list[np.random.Generator], prob: float = 0.15) -> np.ndarray:
    """(B, N) bool for B samples of lens[b] regions (N = the most): row b equals mask_regions(lens[b],
    rngs[b], prob) on its first lens[b] positions, False beyond."""
    lens = np.asarray(lens, np.int64)
    u = np.ones((len(lens), int(lens.max(initial=0))))
    for row, rng, n in zip(u, rngs, lens.tolist(), strict=True):
        rng.random(out=row[:n])
    chosen = u < prob
    for b in np.flatnonzero((lens > 0) & ~chosen.any(1)).tolist():
        chosen[b, rngs[b].integers(lens[b])] = True
    return chosen


def modalities(task: str, mode: str) -> tuple[bool, bool]:
    """(mask text?, mask regions?) for one sample of `task` under masking `mode`."""
    if mode not in MODES:
        raise ValueError(f"tasks.masking must be one of {MODES}, got {mode!r}")
    if task not in TEXT_TASKS + REGION_TASKS:
        return False, False  # itm: the pair is shown whole
    if mode == "joint":
        return True, True
    return task in TEXT_TASKS, task in REGION_TASKS
