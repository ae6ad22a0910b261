"""What each pretraining task hides, per sample (numpy, in the data loader).

- Text (MLM): each word with probability 0.15, at least one per sample; a chosen word becomes [MASK]
  80% of the time, a random word 10%, and stays unchanged 10%. [CLS] and [SEP] are never chosen.
- Regions (MRFR, MRC, MRC-kl): each region with probability 0.15, at least one (when there is one).
  The model replaces a masked region's feature by zeros; the targets keep the original.
- Which modality a task masks: `conditional` (UNITER, the default) masks only the one the task
  reconstructs, so the other is intact and can explain it; `joint` masks both at random, for
  ablations (then the word "dog" and the dog's regions may be hidden together).
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


def mask_regions(n: int, rng: np.random.Generator, prob: float = 0.15) -> np.ndarray:
    """(n,) bool: which of n regions to hide; at least one when n > 0."""
    chosen = rng.random(n) < prob
    if n and not chosen.any():
        chosen[rng.integers(n)] = True
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
