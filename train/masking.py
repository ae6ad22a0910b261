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
            where = np.flatnonzero(eligible[b])
            chosen[b, where[rngs[b].integers(0, len(where), dtype=np.int64)]] = True  # = rng.choice(where)
        labels = np.where(chosen, ids, IGNORE)
        for row, rng, n in zip(u, rngs, lens.tolist(), strict=True):
            rng.random(out=row[:n])
        inputs = ids.copy()
        inputs[chosen & (u < 0.8)] = self.mask_id
        rand = chosen & (u >= 0.8) & (u < 0.9)
        counts = rand.sum(1)
        for b in np.flatnonzero(counts).tolist():
            draw = rngs[b].integers(0, len(self.random_ids), size=int(counts[b]), dtype=np.int64)
            inputs[b, rand[b]] = self.random_ids[draw]  # = rng.choice(random_ids, size), without its checks
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


# numpy's SeedSequence (NEP 19; numpy/random/bit_generator.pyx) and PCG64 seeding, constants as there
_INIT_A, _MULT_A, _INIT_B, _MULT_B = 0x43B0D7E5, 0x931E8875, 0x8B51F9DD, 0x58F38DED
_MIX_L, _MIX_R, _XSHIFT, _M32, _M128 = 0xCA01F9DD, 0x4973F715, 16, 0xFFFFFFFF, (1 << 128) - 1
_PCG_MULT = (2549297995355413924 << 64) + 4865540595714422341


def _hash_consts(start: int, mult: int, n: int) -> list[int]:
    out, h = [], start
    for _ in range(n):
        h = h * mult & _M32
        out.append(h)
    return out


class Generators:
    """One numpy Generator per seed, each in the state np.random.default_rng(seed) starts in: the same
    draws, for a fraction of the cost. default_rng builds a SeedSequence and a PCG64 per call (more
    than a sample's masking costs); here SeedSequence's hash runs over a whole batch of seeds at once
    in numpy and each resulting PCG64 state is set into a generator kept from earlier batches. Seeds
    that are not tuples of ints in [0, 2**32) of one length go through default_rng itself.
    The generators are reused by the next call: use them before calling again."""

    def __init__(self):
        self.pool: list[np.random.Generator] = []

    def __call__(self, seeds: list) -> list[np.random.Generator]:
        try:
            E = np.array(seeds, dtype=np.int64)
        except (ValueError, TypeError, OverflowError):
            E = None
        if E is None or E.ndim != 2 or E.size == 0 or E.min() < 0 or E.max() > _M32:
            return [np.random.default_rng(s) for s in seeds]
        while len(self.pool) < len(seeds):
            self.pool.append(np.random.Generator(np.random.PCG64(0)))
        out = self.pool[:len(seeds)]
        for g, (state, inc) in zip(out, _pcg64_states(E.astype(np.uint64)), strict=True):
            g.bit_generator.state = {"bit_generator": "PCG64", "state": {"state": state, "inc": inc},
                                     "has_uint32": 0, "uinteger": 0}
        return out


def _pcg64_states(E: np.ndarray) -> list[tuple[int, int]]:
    """(B, W) uint32 words of entropy (in uint64) -> the (state, inc) of PCG64(SeedSequence(row))."""
    B, W = E.shape
    consts = iter(_hash_consts(_INIT_A, _MULT_A, 4 + 12 + 4 * max(W - 4, 0)))
    h0 = _INIT_A

    def hashmix(v):  # SeedSequence's hashmix; the hash constant advances the same way for every seed
        nonlocal h0
        v = v ^ np.uint64(h0)
        h0 = next(consts)
        v = v * np.uint64(h0) & np.uint64(_M32)
        return v ^ (v >> np.uint64(_XSHIFT))

    def mix(x, y):
        r = (np.uint64(_MIX_L) * x - np.uint64(_MIX_R) * y) & np.uint64(_M32)
        return r ^ (r >> np.uint64(_XSHIFT))

    zero = np.zeros(B, np.uint64)
    pool = [hashmix(E[:, i] if i < W else zero) for i in range(4)]
    for s in range(4):
        for d in range(4):
            if s != d:
                pool[d] = mix(pool[d], hashmix(pool[s]))
    for s in range(4, W):
        for d in range(4):
            pool[d] = mix(pool[d], hashmix(E[:, s]))
    words, hb = [], _INIT_B  # generate_state(4, uint64): 8 uint32 words, little-endian pairs
    for i in range(8):
        v = pool[i % 4] ^ np.uint64(hb)
        hb = hb * _MULT_B & _M32
        v = v * np.uint64(hb) & np.uint64(_M32)
        words.append(v ^ (v >> np.uint64(_XSHIFT)))
    w64 = [(words[2 * k] | (words[2 * k + 1] << np.uint64(32))).tolist() for k in range(4)]
    out = []
    for s_hi, s_lo, i_hi, i_lo in zip(*w64, strict=True):  # pcg64_set_seed: srandom_r(initstate, initseq)
        inc = ((i_hi << 64 | i_lo) << 1 | 1) & _M128
        state = ((inc + (s_hi << 64 | s_lo)) * _PCG_MULT + inc) & _M128
        out.append((state, inc))
    return out


def modalities(task: str, mode: str) -> tuple[bool, bool]:
    """(mask text?, mask regions?) for one sample of `task` under masking `mode`."""
    if mode not in MODES:
        raise ValueError(f"tasks.masking must be one of {MODES}, got {mode!r}")
    if task not in TEXT_TASKS + REGION_TASKS:
        return False, False  # itm: the pair is shown whole
    if mode == "joint":
        return True, True
    return task in TEXT_TASKS, task in REGION_TASKS
