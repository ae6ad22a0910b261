"""From shards and captions to batches: pairs, a token-bucket sampler, per-task masking, collate.

A *pair* is one caption with its image. Each step trains one task on one batch:

    TokenBucketSampler  pair indices, batched by a token budget over text + regions (little padding)
    TaskSampler         draws the batch's task by the mixing ratios; ITM batches come from a stream of
                        their own, bucketed by the lengths the pairs have once half of them show
                        another image; gives every sample its own random seed
    PairDataset         reads a batch's records (zero-copy, through regionbert.data), masks what the
                        task hides, over the whole batch
    collate             pads into tensors (float16 features, as stored) and measures the padding
    Loader              the DataLoader: in a loader worker each batch is built in one of the worker's
                        reused shared buffers (WorkerRing) and the main process puts it back together
                        from it (Receiver), without a copy and, on CUDA, pinned once per buffer
    DeviceFeed          moves batches to the device, casting to float32 there; on CUDA the next
                        batch's copy runs on a side stream while the current step computes

Masking happens in the loader workers, seeded per sample, so a run is reproducible whatever the
number of workers.
"""

from __future__ import annotations

import array
import collections.abc
import ctypes
import itertools
import math
import multiprocessing
import multiprocessing.queues
import operator
import os
import queue
import select
import sys
import time
from multiprocessing.reduction import ForkingPickler

try:  # (Linux and the other Unixes; elsewhere DirectQueue puts through the feeder thread, as multiprocessing)
    import fcntl
    import termios
except ImportError:
    fcntl = termios = None

import numpy as np
import torch

from regionbert.data import ShardError, ShardSet
from regionbert.data.checks import all_finite, check_batch, check_record

from .captions import open_table
from .masking import IGNORE, REGION_TASKS, Generators, TextMasker, mask_regions_batch, modalities
from .text import NoRows, Text


class Pairs:
    """Captions joined to shard records: pair p is (tokens[p], image[p]); images index `pool`.

    Everything per caption or per image is a flat array (train/captions.py): the tokens, images and pool
    are views of the captions table's shared mapping, built once per manifest, tokenizer, split and
    shards, so that forked loader workers share its pages; image_ids reads ids from the shards. cache: the
    table's folder (default: the manifest's own if writable, else the user's cache folder)."""

    def __init__(self, shards: ShardSet, manifest: str | os.PathLike, text: Text, split: str | None = None,
                 max_regions: int = 100, cache: str | None = None):
        self.table = open_table(shards, os.fspath(manifest), text, split, cache)
        if self.table.count == 0:
            raise NoRows(f"{os.fspath(manifest)}: no rows with split == {split!r}" if split is not None
                         else f"{os.fspath(manifest)}: no caption rows")
        self._views()
        self.image_ids = ImageIds(shards, self.table)
        # from each shard's box-count table (or its record headers), never reading features (issue 24 item 1)
        # int32, 4 bytes a pair or image (a text + regions length is small): the samplers read them every epoch
        self.num_boxes = np.minimum(shards.box_counts()[self.pool], max_regions).astype(np.int32)
        self.lengths = self.num_boxes[self.image]  # text + regions, summed in place (no second temporary)
        self.lengths += self.table.lengths
        release_heap()  # the table's checks and the box counts' temporaries, freed

    def _views(self) -> None:
        self.tokens = TokenRows(self.table)
        self.image, self.pool = self.table.image, self.table.pool

    def __getstate__(self) -> dict:  # a spawned worker maps the table again instead of unpickling copies
        return {k: v for k, v in self.__dict__.items() if k not in ("tokens", "image", "pool")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._views()

    def __len__(self) -> int:
        return self.table.count

    @property
    def num_images(self) -> int:
        return len(self.pool)


def text_lengths(pairs) -> np.ndarray:
    """Each pair's text length: the captions table's own lengths (a view of its shared pages, nothing owned),
    or for pairs without a table (tests' reference pairs) their lengths less their images' regions."""
    table = getattr(pairs, "table", None)
    return table.lengths if table is not None else np.asarray(pairs.lengths) - pairs.num_boxes[pairs.image]


class TokenRows:
    """tokens[p]: pair p's ids ([CLS] words [SEP], int64), read from the captions table."""

    def __init__(self, table):
        self.table = table

    def __len__(self) -> int:
        return self.table.count

    def __getitem__(self, p) -> np.ndarray:
        p = operator.index(p)
        if not -self.table.count <= p < self.table.count:
            raise IndexError(f"pair {p} out of range for {self.table.count} captions")
        return self.table.tokens(p % self.table.count)


class ImageIds(collections.abc.Sequence):
    """image_ids[i]: image i's id, read from its shard's order table (no list of ids kept)."""

    def __init__(self, shards: ShardSet, table):
        self.shards, self.table = shards, table

    def __len__(self) -> int:
        return len(self.table.pool)

    def __getitem__(self, i) -> str:
        i = operator.index(i)
        shard, local = self.shards.locate(int(self.table.pool[i]))
        return shard.key_at(local).decode("utf-8")


class PairDataset(torch.utils.data.Dataset):
    """dataset[(task, pair, other_image, seed)] -> one sample, masked for the task (numpy arrays).

    other_image >= 0 replaces the pair's image (an ITM negative); seed seeds this sample's masking.
    The DataLoader fetches a whole batch at once (__getitems__): records are read as zero-copy views
    in the shard's dtype (float16 features and class probabilities: nothing is widened on the host),
    and masking runs over the batch, one generator per sample, so a sample's masks are the same
    whichever batch or worker it is in (dataset[key] is the batch of one)."""

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
        meta = shards.meta  # each region field's (width, dtype) in a batch
        self.widths = {"features": (meta["feature_dim"], np.dtype(meta["feature_dtype"])),
                       "locations": (loc_dim, np.dtype(np.float32)),
                       "class_probs": (self.num_classes, np.dtype(np.float16))}
        self._modes = {}  # task -> (mask text?, mask regions?)
        self._generators = Generators()  # per-sample generators, as np.random.default_rng(seed) makes them
        # images whose record passed the record rules: a shard is immutable, so each is checked once (a byte
        # per image, as Pairs keeps per pair), and a later epoch's batches cost nothing. In shared memory, so
        # that an image checked by one loader worker is not checked again by each of the others (with N
        # workers the first epoch checked every image N times, and the Record each check needs is dearer
        # than a read_into: 2% of a benchmark's samples took that path again with 2 workers, 0.1% with one)
        self._checked_flags = torch.zeros(max(pairs.num_images, 1), dtype=torch.bool).share_memory_()
        self._checked = self._checked_flags.numpy()[:pairs.num_images]
        self._text_lens = text_lengths(pairs)  # each pair's text length: the table's shared int16 array
        self._pool = pairs.pool  # image -> ShardSet index (the table's shared array, not a list of ints: issue 24)
        self.ring_slots = 8  # shared batch buffers per loader worker (build_data: prefetch_factor + 4)

    def __getstate__(self) -> dict:  # (a spawned worker: the flags' shared memory, not a copy of them)
        return {k: v for k, v in self.__dict__.items() if k != "_checked"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._checked = self._checked_flags.numpy()[:self.pairs.num_images]

    def __len__(self) -> int:
        return len(self.pairs)

    def regions(self, image: int) -> tuple[np.ndarray, np.ndarray]:
        """An image's unmasked (features (n, D), locations (n, loc_dim)) as float32 (for retrieval)."""
        rec = self.shards[int(self.pairs.pool[image])]
        n = min(rec.num_boxes, self.max_regions)
        if not self._checked[image]:
            if not all_finite(rec.features[:n]):
                self._refuse(image)
            loc = (rec.loc7 if self.loc_dim == 7 else rec.loc5)[None, :n]
            self._check_rules([image], rec.boxes[None, :n], [(rec.width, rec.height)], [n], loc,
                              None if rec.class_probs is None else rec.class_probs[None, :n])
        return (np.array(rec.features[:n], dtype=np.float32),
                np.array((rec.loc7 if self.loc_dim == 7 else rec.loc5)[:n], dtype=np.float32))

    def __getitem__(self, key) -> dict:
        return self.__getitems__([key])[0]

    def __getitems__(self, keys: list[tuple]) -> list[dict]:
        """The samples of a batch of keys, their region arrays already in place in the batch's buffers:
        each record is copied into row j of (B, N, width) buffers right after it is read (and its
        checksum computed), while it is still in the CPU's cache; collate then takes the buffers as
        they are. A sample's features etc. are (n, width) views of its row; masks and masked tokens
        are its own."""
        pairs, shards, cap, loc7 = self.pairs, self.shards, self.max_regions, self.loc_dim == 7
        B = len(keys)
        if isinstance(keys, BatchKeys):  # (TaskSampler's: its arrays as they are)
            ps, img = keys.pairs.astype(np.int64), keys.shown(pairs.image)
        else:
            ps = np.fromiter((k[1] for k in keys), np.int64, B)
            shown = np.fromiter((k[2] for k in keys), np.int64, B)
            img = np.where(shown < 0, pairs.image[ps], shown)
        images, text_lens = img.tolist(), self._text_lens[ps]
        N, L = int(pairs.num_boxes[img].max(initial=0)), int(text_lens.max(initial=0))  # num_boxes: capped
        widths = self.widths
        if torch.utils.data.get_worker_info() is None:
            buffers = {k: _BUFFERS.take(k, (B, N, w), dt) for k, (w, dt) in widths.items()}  # tensors
            feats, locs, probs_buf = (buffers[k].numpy() for k in widths)
        else:  # in a loader worker: the whole batch in one of the worker's reused shared buffers, as numpy
            arena = worker_ring(self.ring_slots).arena(batch_bytes(B, N, L, widths))  # views (Arena.array)
            buffers = {k: arena.array((B, N, w), dt) for k, (w, dt) in widths.items()}
            buffers["_arena"] = arena
            feats, locs, probs_buf = (buffers[k] for k in widths)
        # rows of images the rules have not checked yet: one snapshot (another worker may set flags meanwhile)
        unchecked = ~self._checked[img]
        fresh = np.flatnonzero(unchecked)
        if len(fresh):
            boxes, sizes, used = np.zeros((B, N, 4), np.float32), np.ones((B, 2)), np.zeros(B, np.int64)
            unchecked = unchecked.tolist()
        modes_of, records = self._modes, self._pool[img].tolist()  # each row's record in the ShardSet
        loc, no_probs = "loc7" if loc7 else "loc5", not self.num_classes  # (every record's C is its shard's)
        ids, texts = self._texts(ps, text_lens, L)
        samples, text_rows, region_rows, seeds, masked, lens = [], [], [], [], [], []
        for j, (task, p, other, seed) in enumerate(keys):
            image = images[j]
            modes = modes_of.get(task) or modes_of.setdefault(task, modalities(task, self.masking))
            frow, lrow, prow = feats[j], locs[j], probs_buf[j]
            if len(fresh) and unchecked[j]:  # the first read of this image: the record rules
                rec = shards[records[j]]  # (its boxes and image size too: a Record)
                n, name = min(rec.num_boxes, cap), rec.id
                if n > N:
                    raise ValueError(f"record {name!r} has {n} boxes, more than the {N} it had when the run started")
                feats[j, :n] = rec.features[:n]
                locs[j, :n] = (rec.loc7 if loc7 else rec.loc5)[:n]
                if not all_finite(feats[j, :n]):  # while the copy is in cache: ~3 us, not 10 for a later pass
                    self._refuse(image)
                boxes[j, :n], sizes[j], used[j] = rec.boxes[:n], (rec.width, rec.height), n
                probs_buf[j, :n] = 0 if rec.class_probs is None else rec.class_probs[:n]
            else:  # straight into row j of the batch, checksum verified, no Record built (read_into)
                n, name = shards.read_into(records[j], frow, lrow, prow, loc)
                n = min(n, cap)
                if n > N:
                    raise ValueError(f"record {name!r} has {n} boxes, more than the {N} it had when the run started")
            if no_probs and task in REGION_TASKS[1:]:
                raise ValueError(f"task {task} needs class distributions but record {name!r} has none")
            lens.append(n)
            views = [frow[:n], lrow[:n], prow[:n]]  # + text and masks' views, below
            samples.append({"task": task, "input_ids": texts[j], "mlm_labels": None, "region_mask": None,
                            "features": views[0], "locations": views[1], "class_probs": views[2],
                            "itm_label": int(other < 0), "pair": p, "image": image, "id": name,
                            "_rows": (buffers, j, views)})  # where its regions are: collate checks it
            if modes[0] or modes[1]:
                seeds.append(seed)
                masked.append(j)
            if modes[0]:
                text_rows.append(j)
            if modes[1]:
                region_rows.append(j)
        lens = np.array(lens, np.int64)
        pad = np.arange(N)[None] >= lens[:, None]  # padding: zeros (the buffers are reused), in one pass each
        if pad.any():
            feats[pad], locs[pad], probs_buf[pad] = 0, 0, 0
        if len(fresh):
            rows = slice(None) if len(fresh) == B else fresh
            self._check_rules([images[j] for j in fresh], boxes[rows], sizes[rows], used[rows], locs[rows],
                              probs_buf[rows])
        rngs = dict(zip(masked, self._generators(seeds), strict=True))  # each sample's draws: text, then regions
        if text_rows:
            inputs, labels = self.masker.batch([samples[j]["input_ids"] for j in text_rows],
                                               [rngs[j] for j in text_rows])
            for row, j in enumerate(text_rows):
                t = len(samples[j]["input_ids"])
                samples[j]["input_ids"], samples[j]["mlm_labels"] = inputs[row, :t], labels[row, :t]
            if len(text_rows) == B:  # padded as collate pads (0, IGNORE): it takes them as they are
                buffers["_input_ids"], buffers["_mlm_labels"] = inputs, labels
            unmasked_text = None
        else:  # no text masked: no labels, one padded array for the batch (collate takes it), and the text's
            unmasked_text = buffers["_mlm_labels"] = np.full((B, L), IGNORE, np.int64)
            if ids is not None:  # rows are views of it (_texts)
                buffers["_input_ids"] = ids
        counts = lens.tolist()
        if region_rows:
            chosen = mask_regions_batch(lens[region_rows], [rngs[j] for j in region_rows], self.mask_prob)
            for row, j in enumerate(region_rows):
                samples[j]["region_mask"] = chosen[row, :counts[j]]
            if len(region_rows) == B and chosen.shape[1] == N:
                buffers["_region_mask"] = chosen
            unmasked_regions = None
        else:
            unmasked_regions = buffers["_region_mask"] = np.zeros((B, N), bool)
        if ids is not None:  # (rows of the table's lengths: each sample's input_ids as long as its text_lens)
            buffers["_lens"] = (text_lens, lens)  # collate's, for a batch it finds unedited
        # one pass over the samples: the rows of the batch's arrays for what no task masked, and the views of
        # each sample's arrays kept beside its row (collate finds the batch unedited by them)
        for j, (s, t, n) in enumerate(zip(samples, text_lens.tolist(), counts, strict=True)):
            if unmasked_text is not None:
                s["mlm_labels"] = unmasked_text[j, :t]
            elif s["mlm_labels"] is None:  # a batch masking the text of some samples only
                s["mlm_labels"] = np.full_like(s["input_ids"], IGNORE)
            if unmasked_regions is not None:
                s["region_mask"] = unmasked_regions[j, :n]
            elif s["region_mask"] is None:
                s["region_mask"] = np.zeros(n, dtype=bool)
            s["_rows"][2].extend((s["input_ids"], s["mlm_labels"], s["region_mask"]))
        return samples

    def _texts(self, ps: np.ndarray, text_lens: np.ndarray, L: int) -> tuple[np.ndarray | None, list]:
        """The batch's token ids: (padded (B, L) int64 with 0 past each row's length, each sample's row as a
        view of it), gathered from the captions table at once instead of a copy per sample; (None, a copy
        each from pairs.tokens) for pairs without a table (tests' reference pairs) or keys outside it."""
        table = getattr(self.pairs, "table", None)
        if table is None or not len(ps) or ps.min() < 0 or ps.max() >= table.count:
            return None, [self.pairs.tokens[p] for p in ps.tolist()]
        valid = np.arange(L)[None] < text_lens[:, None]
        ids = np.zeros(valid.shape, np.int64)
        ids[valid] = table.ids[(table.offsets[ps][:, None] + np.arange(L)[None])[valid]]
        return ids, [ids[j, :t] for j, t in enumerate(text_lens.tolist())]

    def _check_rules(self, images: list[int], boxes, sizes, lens, locs, probs) -> None:
        """The record rules (regionbert.data.checks) over what these rows of a batch train on, at once
        (vectorised): a shard that nobody ran `verify` on cannot train the model on boxes outside the image,
        location vectors that do not match the boxes, class distributions that are not distributions (or,
        checked as each record is copied, NaN features). A ShardError names the shard, the record and
        every rule it breaks. Each image once (self._checked, shared by the loader's workers)."""
        bad = check_batch(boxes, sizes, lens, locs, probs if self.num_classes else None)
        if len(bad):
            self._refuse(images[int(bad[0])])
        self._checked[images] = True

    def _refuse(self, image: int) -> None:
        """Raise the ShardError for an image whose record breaks a record rule, naming every rule."""
        shard, local = self.shards.locate(int(self.pairs.pool[image]))
        rec = shard[local]
        problems = check_record(rec) or ["rule check: its first regions break a record rule"]
        raise ShardError(f"{shard.path}: record {rec.id!r} breaks the shard format's record rules: "
                         f"{'; '.join(problems)}. The shard was not verified (`regionbert-shards verify` lists "
                         "every such record); fix or drop it before training on it")


class HostBuffers:
    """Host memory for batch tensors. A fresh 50 MB buffer per batch costs the kernel a page fault and
    a zeroed page every 4 KB, as much time as the copy into it; so in the main process a buffer is
    reused once nothing refers to it any more (no tensor of an earlier batch is alive: each keeps its
    numpy view, and so the buffer, referenced). Each field (features, ...) has its own buffers, so a
    buffer keeps its size from batch to batch. In a DataLoader worker the batch is allocated in shared
    memory instead, where the main process receives it without a copy."""

    def __init__(self, slots: int = 4):
        self.slots: dict[str, list[np.ndarray]] = {}  # field -> flat uint8 buffers
        self.max_slots = slots
        probe = [np.empty(1, np.uint8)]
        self._free_refs = sys.getrefcount(probe[0])  # the count of a buffer only its list holds

    def take(self, field: str, shape: tuple, dtype) -> torch.Tensor:
        """An uninitialised tensor of shape and (numpy) dtype, for one field of a batch."""
        dtype = np.dtype(dtype)
        nbytes = int(np.prod(shape)) * dtype.itemsize
        if torch.utils.data.get_worker_info() is not None:
            storage = torch.UntypedStorage._new_shared(nbytes)
            return torch.empty(0, dtype=TORCH_DTYPES[dtype]).set_(storage).view(shape)
        slots = self.slots.setdefault(field, [])
        for i in range(len(slots)):
            if sys.getrefcount(slots[i]) <= self._free_refs:
                if slots[i].nbytes < nbytes:
                    slots[i] = np.empty(nbytes + nbytes // 4 + 4096, np.uint8)  # room to grow
                return torch.from_numpy(slots[i][:nbytes].view(dtype).reshape(shape))
        flat = np.empty(nbytes + nbytes // 4 + 4096, np.uint8)
        if len(slots) < self.max_slots:
            slots.append(flat)
        return torch.from_numpy(flat[:nbytes].view(dtype).reshape(shape))


TORCH_DTYPES = {np.dtype(np.uint8): torch.uint8, np.dtype(np.float16): torch.float16,
                np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64,
                np.dtype(np.int64): torch.int64, np.dtype(bool): torch.bool}
_BUFFERS = HostBuffers()


def _pad_into(out: np.ndarray, rows: list[np.ndarray], lens: np.ndarray, fill) -> np.ndarray:
    """Short 1-d rows (len lens[b]) into out (B, width), padded with fill, in one scatter."""
    out.fill(fill)
    out[np.arange(out.shape[1])[None] < lens[:, None]] = np.concatenate(rows)
    return out


def _pad_rows(rows: list[np.ndarray], lens: np.ndarray, width: int, fill, dtype) -> torch.Tensor:
    """Short 1-d rows (len lens[b]) into a (B, width) tensor padded with fill, in one scatter."""
    return torch.from_numpy(_pad_into(np.empty((len(rows), width), dtype=dtype), rows, lens, fill))


_FIELDS = ("features", "locations", "class_probs", "input_ids", "mlm_labels", "region_mask")


def collate(samples: list[dict]) -> dict:
    """Pad a list of samples of one task into a batch of tensors (text to the longest text, regions
    to the most regions; the model packs them). Features and class probabilities stay in the shard's
    dtype (float16): the batch-to-device step casts them on the device (to_device). pad_fraction: the
    share of the packed (B, T) sequence that is padding. ids: the record id of each sample's image.

    Samples just as PairDataset made them (rows 0..B-1 of one batch, unedited) are taken as they are:
    their regions are already in the batch's buffers, their masked text and region masks already padded
    by the batch masking. In a loader worker every tensor of the batch is carved out of one of the
    worker's reused shared buffers (WorkerRing) and goes to the main process as its place in that
    buffer (Loader puts the tensors back together there)."""
    B = len(samples)
    first = samples[0]
    filled = _as_made(samples)
    made = first["_rows"][0].get("_lens") if filled else None
    if made is not None:  # every sample's arrays the ones PairDataset made: their lengths are the batch's
        text_lens, region_lens = (a.astype(np.int64) for a in made)
    else:
        text_lens = np.fromiter((len(s["input_ids"]) for s in samples), np.int64, B)
        region_lens = np.fromiter((len(s["features"]) for s in samples), np.int64, B)
    L, N = int(text_lens.max()), int(region_lens.max())
    filled = filled and first["_rows"][0]["features"].shape[1] == N  # (regions padded to the batch's most)
    buffers = first["_rows"][0] if filled else {}
    arena = buffers.get("_arena")
    if not filled and torch.utils.data.get_worker_info() is not None:
        widths = {k: (first[k].shape[1], first[k].dtype) for k in _FIELDS[:3]}
        arena = worker_ring(8).arena(batch_bytes(B, N, L, widths))

    def take(field, shape, dtype) -> np.ndarray | None:  # an arena's array, or None: a fresh one
        return arena.array(shape, dtype) if arena is not None else None

    # in a worker the batch's arrays stay numpy views of the arena (no tensor made per field: Arena.pack
    # sends each one's place in the buffer, and the main process makes the tensors there)
    tensor = torch.from_numpy if arena is None else _same_array
    regions = {k: buffers[k] for k in _FIELDS[:3]} if filled else {}  # as PairDataset filled them, or:
    for k in () if filled else _FIELDS[:3]:  # (B, N, width) each, copied
        if arena is not None:
            buf = a = arena.array((B, N, first[k].shape[1]), first[k].dtype)
        else:
            buf = _BUFFERS.take(k, (B, N, first[k].shape[1]), first[k].dtype)
            a = buf.numpy()
        for b, s in enumerate(samples):
            n = len(s[k])
            a[b, :n] = s[k]
            if n < N:
                a[b, n:] = 0
        regions[k] = buf
    out = {}
    for k, width, lens_, fill, dtype in (("input_ids", L, text_lens, 0, np.int64),
                                         ("mlm_labels", L, text_lens, IGNORE, np.int64),
                                         ("region_mask", N, region_lens, False, bool)):
        made = buffers.get("_" + k)  # the batch masking's own padded array, if it made one for all rows
        dst = take(k, (B, width), dtype)
        if made is not None and made.shape == (B, width):
            if dst is None:
                out[k] = torch.from_numpy(made)
                continue
            dst[...] = made
        else:
            dst = _pad_into(np.empty((B, width), dtype) if dst is None else dst, [s[k] for s in samples],
                            lens_, fill)
        out[k] = tensor(dst)
    small = {}
    for k, values in (("text_lens", text_lens), ("region_lens", region_lens),
                      ("itm_labels", [s["itm_label"] for s in samples]), ("pairs", [s["pair"] for s in samples]),
                      ("images", [s["image"] for s in samples])):
        dst = take(k, (B,), np.int64)
        if dst is None:
            small[k] = torch.from_numpy(values) if isinstance(values, np.ndarray) else torch.tensor(values)
        else:
            dst[...] = values
            small[k] = dst
    lens = text_lens + region_lens
    tokens = int(lens.sum())
    batch = {
        "input_ids": out["input_ids"], "mlm_labels": out["mlm_labels"], **regions, "region_mask": out["region_mask"],
        "task": first["task"], "text_lens": small["text_lens"], "region_lens": small["region_lens"],
        "itm_labels": small["itm_labels"], "pairs": small["pairs"], "images": small["images"],
        "ids": [s.get("id") for s in samples],
        "num_tokens": tokens, "pad_fraction": 1 - tokens / (B * int(lens.max())),
    }
    return arena.pack(batch) if arena is not None else batch


def _as_made(samples: list[dict]) -> bool:
    """Whether samples are rows 0..B-1 of one PairDataset batch, unedited: each one's arrays the very ones
    it was made with (a loop of identity tests: a microsecond a sample less than a generator's)."""
    first = samples[0].get("_rows")
    if not first or len(first[0]["features"]) != len(samples):
        return False
    buffers = first[0]
    for b, s in enumerate(samples):
        r = s.get("_rows")
        if r is None or r[0] is not buffers or r[1] != b:
            return False
        v = r[2]
        if len(v) != 6 or v[0] is not s["features"] or v[1] is not s["locations"] or v[2] is not s["class_probs"] \
                or v[3] is not s["input_ids"] or v[4] is not s["mlm_labels"] or v[5] is not s["region_mask"]:
            return False
    return True


def batch_bytes(B: int, N: int, L: int, widths: dict) -> int:
    """The bytes of one batch's tensors in an arena: regions (B, N, width) per field, the region mask, the
    text and its labels (B, L), five (B,) int64 vectors; each rounded up to the arena's alignment."""
    sizes = [B * N * w * np.dtype(dt).itemsize for w, dt in widths.values()] + [B * N] + [B * L * 8] * 2 + [B * 8] * 5
    return sum(-(-s // _ALIGN) * _ALIGN for s in sizes)


_ALIGN = 64  # bytes: every tensor of an arena starts on a cache line


class Arena:
    """One batch's arrays carved out of one flat shared buffer, one after the other (64-byte aligned).

    The worker fills numpy views of the buffer (`array`), each remembered with its byte offset, so that
    `pack` sends a batch as places in the buffer without a tensor made per field in the worker (the main
    process makes them where it maps the buffer): numpy views and no np.prod cost a fraction of the
    torch slicing and views they replace (~1 us a sample with workers, issue 23)."""

    def __init__(self, ring: WorkerRing, slot: int, storage: torch.UntypedStorage, send: bool,
                 flat: np.ndarray | None = None):
        self.ring, self.slot, self.storage, self.send = ring, slot, storage, send
        self.flat = _flat_view(storage) if flat is None else flat  # uint8, the whole buffer
        self.used = 0
        self.placed: dict[int, tuple[np.ndarray, int]] = {}  # id(array) -> (the array, its byte offset)

    def array(self, shape: tuple, dtype) -> np.ndarray:
        """An uninitialised C-contiguous array of shape and (numpy) dtype in the buffer."""
        dtype = np.dtype(dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        start, self.used = self.used, self.used + -(-nbytes // _ALIGN) * _ALIGN
        if self.used > len(self.flat):
            raise RuntimeError(f"batch buffer of {len(self.flat)} bytes is too small (batch_bytes is wrong)")
        out = self.flat[start:start + nbytes].view(dtype).reshape(shape)
        self.placed[id(out)] = (out, start)
        return out

    def pack(self, batch: dict) -> dict:
        """The batch as it goes to the main process: each of its arrays made by `array` replaced, in its
        place in the dict, by (offset in elements of its dtype, torch dtype, shape) in the buffer, and named
        in `_wire` (the buffer sent along only the first time: the main process keeps it mapped); anything
        else (a copy or view of such an array included) goes by value. Receiver turns the places back into
        tensors where they are, so the dict keeps collate's order with no list of its keys sent."""
        out, placed, names = {}, self.placed, []
        for k, v in batch.items():
            p = placed.get(id(v))
            if p is not None and p[0] is v:  # an array of `array`, as made (64-byte aligned: offsets divide)
                out[k] = (p[1] // v.itemsize, TORCH_DTYPES[v.dtype], v.shape)
                names.append(k)
            else:
                out[k] = v
        out["_wire"] = (os.getpid(), self.slot, self.storage if self.send else None,
                        self.ring.busy if not self.ring.busy_sent else None, names)
        self.ring.busy_sent = True
        return out


class WorkerRing:
    """A loader worker's shared batch buffers, reused from batch to batch (issue 23).

    A fresh shared buffer per batch cost the worker ~72% of its time (creating the memory and faulting
    in every page of it: 49 ms of CPU for 50 MB, against 4.3 ms for a reused one) and the main process
    ~70 us per sample to map and unmap it. Here each worker keeps up to `slots` buffers, one per batch
    in flight; a buffer goes to the main process once (torch passes its file descriptor) and after
    that only the place of each tensor in it does. `busy` is a small shared array: the worker marks a
    slot busy when it fills it; the main process (Loader) marks it free once nothing there refers to
    the batch any more. A buffer too small for a batch is replaced by one half as large again as the
    batch (batches are bounded by the token budget, so this stops). With every slot still held (the
    main process keeping more batches alive than slots), a batch gets a buffer of its own, as before."""

    def __init__(self, slots: int):
        self.max_slots = max(1, min(slots, 255))
        self.busy = torch.zeros(256, dtype=torch.uint8).share_memory_()  # 1: slot k's batch is not consumed
        self.flags = self.busy.numpy()
        self.busy_sent = False
        self.storages: list[torch.UntypedStorage] = []
        self.flats: list[np.ndarray] = []  # each storage's uint8 numpy view, made once
        self.allocated = 0  # shared buffers made (a test reads it through the Loader's count)

    def _new(self, nbytes: int) -> torch.UntypedStorage:
        self.allocated += 1
        return torch.UntypedStorage._new_shared(nbytes)

    def arena(self, nbytes: int) -> Arena:
        """A free buffer of at least nbytes, marked busy, for the next batch."""
        for k in range(len(self.storages)):
            if not self.flags[k]:
                send = self.storages[k].nbytes() < nbytes
                if send:
                    self.storages[k] = self._new(nbytes + nbytes // 2)
                    self.flats[k] = _flat_view(self.storages[k])
                self.flags[k] = 1
                return Arena(self, k, self.storages[k], send, self.flats[k])
        if len(self.storages) < self.max_slots:
            self.storages.append(self._new(nbytes + nbytes // 2))
            self.flats.append(_flat_view(self.storages[-1]))
            self.flags[len(self.storages) - 1] = 1
            return Arena(self, len(self.storages) - 1, self.storages[-1], True, self.flats[-1])
        return Arena(self, -1, self._new(nbytes), True)  # every slot held: a buffer for this batch alone


def _flat_view(storage: torch.UntypedStorage) -> np.ndarray:
    """A storage's bytes as a uint8 numpy array (a view: it keeps the storage alive)."""
    return torch.empty(0, dtype=torch.uint8).set_(storage).numpy()


def _same_array(a: np.ndarray) -> np.ndarray:
    return a


_RING: list = [None, None]  # (pid, WorkerRing) of this process


def worker_ring(slots: int) -> WorkerRing:
    """This worker process's ring (a forked worker must not use its parent's)."""
    if _RING[0] != os.getpid():
        _RING[:] = [os.getpid(), WorkerRing(slots)]
    return _RING[1]


class Receiver:
    """The main process's side of the workers' rings: puts each batch's tensors back together as views of
    the worker's buffer (mapped once, kept here), and marks a slot free once none of its tensors (nor any
    view of them) is alive: the count of references to the buffer is this object's own. On CUDA each
    buffer is pinned once where it is mapped (cudaHostRegister), so batches are copied to the device
    straight from the worker's memory with no pinned copy of each batch."""

    def __init__(self, pin: bool = False):
        self.pin = pin
        self.buffers: dict[tuple[int, int], torch.UntypedStorage] = {}  # (worker pid, slot) -> its buffer
        self.busy: dict[int, np.ndarray] = {}  # worker pid -> its busy flags
        self.held: list[tuple[int, int]] = []  # slots whose batch may still be alive
        self.received = 0  # buffers received (allocated by workers)
        self.single = 0  # of which buffers of one batch alone: every slot of the worker's ring was busy
        self._flags: dict[int, torch.Tensor] = {}
        self._registered: set[int] = set()  # addresses of the buffers pinned here

    def __call__(self, batch):
        if not isinstance(batch, dict) or "_wire" not in batch:
            return batch
        pid, slot, storage, busy, names = batch.pop("_wire")
        if busy is not None:
            self._flags[pid], self.busy[pid] = busy, busy.numpy()
        if storage is not None:
            self.received += 1
            self.single += slot < 0
            if slot >= 0:  # a ring buffer, pinned once (a buffer of one batch is not: see _pinned)
                storage = self._pinned(storage)
                self._drop((pid, slot))
                self.buffers[pid, slot] = storage
        else:
            storage = self.buffers[pid, slot]
        self.release()  # before this batch's tensors exist: its own slot is not freed
        for k in names:  # each in its place in the dict: collate's order
            offset, dtype, shape = batch[k]
            batch[k] = torch.empty(0, dtype=dtype).set_(storage, offset, shape)
        if slot >= 0:
            self.held.append((pid, slot))
        return batch

    def release(self) -> None:
        """Mark free every held slot none of whose tensors is alive any more."""
        still = []
        for key in self.held:
            if torch._C._storage_Use_Count(self.buffers[key]._cdata) <= 1:
                self.busy[key[0]][key[1]] = 0
            else:
                still.append(key)
        self.held = still

    def _pinned(self, storage: torch.UntypedStorage) -> torch.UntypedStorage:
        if self.pin and storage.nbytes():
            # flag 1: cudaHostRegisterPortable, as torch.cuda._pin_memory_utils (pinned for every context)
            if int(torch.cuda.cudart().cudaHostRegister(storage.data_ptr(), storage.nbytes(), 1)) == 0 \
                    and torch.empty(0, dtype=torch.uint8).set_(storage).is_pinned():
                self._registered.add(storage.data_ptr())
                return storage
            self.pin = False  # not possible here: to_device copies from pageable memory instead
        return storage

    def _drop(self, key) -> None:
        old = self.buffers.pop(key, None)  # a slot replaced only once free: nothing refers to it
        if old is not None and old.data_ptr() in self._registered:
            self._registered.discard(old.data_ptr())
            int(torch.cuda.cudart().cudaHostUnregister(old.data_ptr()))

    def forget(self) -> None:
        """Let go of the buffers of workers that are gone (a loader without persistent workers starts new
        ones for each pass); a buffer whose batch is still alive is kept until it is freed."""
        self.release()
        held = set(self.held)
        for key in [k for k in self.buffers if k not in held]:
            self._drop(key)

    def __del__(self):
        # pinned buffers must be unregistered before they are unmapped: a buffer a batch still uses is kept
        # mapped (and registered) for the life of the process rather than unmapped while registered
        if self._registered:
            self.release()
            _KEEP.extend(self.buffers[k] for k in self.held)
            self.held = []
            self.forget()


_KEEP: list = []  # pinned buffers still in use when their loader went away


_PAGE = os.sysconf("SC_PAGESIZE") if hasattr(os, "sysconf") else 4096  # a pipe's buffers are pages


class DirectQueue(multiprocessing.queues.Queue):
    """A multiprocessing queue whose put pickles and writes in the calling thread while the pipe has room
    for the message, instead of handing it to a feeder thread (issue 23): the loader's queues (batch keys
    to each worker, batches back). Each put through a feeder thread cost the sending process ~70-100 us of
    CPU a batch here (waking the thread, handing the GIL over and back, a second context switch) for a
    message of ~1-3 KB that one write puts in the pipe; the main process paid it for every batch's keys,
    each worker for every batch. Where a message might not fit in the pipe as it is now (a reader ~20 KB
    behind, a message over a page: see _fits), the put goes to the feeder thread as multiprocessing's
    does, and so does every later put of that process on this queue: a writer's messages stay in the
    order it put them, and a put never blocks on a full pipe. get polls the pipe with one poll object
    kept for the queue, not a selector made for each call (~20 Python calls)."""

    def _reset(self, after_fork=False):
        super()._reset(after_fork)
        self._direct = True  # this process writes its messages itself (until one does not fit)
        self._room = None  # (pid, pipe capacity in bytes), once known
        self._poller = None  # (pid, select.poll on the reader), once made
        self._poll = self._fast_poll

    def put(self, obj, block=True, timeout=None):
        if not self._direct or self._closed:
            return super().put(obj, block, timeout)
        data = ForkingPickler.dumps(obj)
        if not self._sem.acquire(block, timeout):
            raise queue.Full
        lock = self._wlock
        if lock is not None:
            lock.acquire()
        try:
            if self._fits(len(data)):
                self._writer.send_bytes(data)
                return None
            self._direct = False
        finally:
            if lock is not None:
                lock.release()
        self._sem.release()  # (taken again by the feeder's put)
        return super().put(obj, block, timeout)

    def _fits(self, nbytes: int) -> bool:
        """Whether a message of nbytes goes into the pipe now without blocking the caller. Called with the
        write lock held: other writers wait, and the reader only makes more room meanwhile. A pipe holds
        `slots` pages (16), not bytes: a write that does not fit in the last page's room starts a new one,
        so pages may be part empty, but any two pages in a row hold more than a page between them. Hence
        with at most `unread` bytes unread the pipe uses at most 2 * ceil(unread / page) + 3 pages (the
        first one part read), and a message of at most a page takes at most 2 more (one write of its
        length and bytes: Connection.send_bytes)."""
        if fcntl is None:
            return False
        fd = self._writer.fileno()
        room = self._room
        if room is None or room[0] != os.getpid():
            try:
                slots = fcntl.fcntl(fd, 1032) // _PAGE  # F_GETPIPE_SZ (Linux): the pipe's bytes
            except OSError:
                slots = 0  # not a pipe, or not Linux: always the feeder thread
            room = self._room = (os.getpid(), slots)
        if nbytes + 4 > _PAGE:
            return False
        unread = array.array("i", [0])
        try:
            fcntl.ioctl(fd, termios.FIONREAD, unread, True)
        except OSError:
            return False
        return 2 * -(-unread[0] // _PAGE) + 3 + 2 <= room[1]

    def _fast_poll(self, timeout=0.0):
        poller = self._poller
        if poller is None or poller[0] != os.getpid():
            p = select.poll()
            p.register(self._reader.fileno(), select.POLLIN)
            poller = self._poller = (os.getpid(), p)
        if timeout is None:
            ms = None
        else:  # (poll's milliseconds rounded up, as selectors does; never negative: that would block)
            ms = max(0, math.ceil(timeout * 1000))
        return bool(poller[1].poll(ms))


class _QueueContext:
    """Mixin for a multiprocessing context whose Queue is a DirectQueue."""

    def Queue(self, maxsize=0):
        return DirectQueue(maxsize, ctx=self.get_context())


_CONTEXTS: dict = {}


def direct_context(method: str | None = None) -> multiprocessing.context.BaseContext:
    """The multiprocessing context of `method` (the default one if None), its queues DirectQueue."""
    base = multiprocessing.get_context(method)
    if isinstance(base, multiprocessing.context.DefaultContext):
        base = base.get_context()  # the concrete context it stands for (fork, spawn or forkserver)
    cls = _CONTEXTS.get(type(base))
    if cls is None:
        cls = _CONTEXTS[type(base)] = type("Direct" + type(base).__name__, (_QueueContext, type(base)), {})
    return cls()


class Loader(torch.utils.data.DataLoader):
    """The DataLoader of the trainer: with workers, each batch arrives in a worker's reused shared buffer
    (WorkerRing) and is put back together here (Receiver); pinned on CUDA with no copy. Its queues (keys
    out, batches back) are DirectQueues, unless a multiprocessing_context is given."""

    def __init__(self, *args, pin_buffers: bool = False, **kwargs):
        if kwargs.get("num_workers", 0) > 0 and kwargs.get("multiprocessing_context") is None:
            kwargs["multiprocessing_context"] = direct_context()  # its queues without feeder threads (DirectQueue)
        super().__init__(*args, **kwargs)
        self.receiver = Receiver(pin_buffers)

    def __iter__(self):
        receive = self.receiver
        if not self.persistent_workers:
            receive.forget()
        for batch in self._restarted():
            yield receive(batch)

    def _restarted(self):
        """super().__iter__(), with the batches torch drops when it restarts persistent workers received here.
        A new pass over a loader whose workers persist makes torch read and throw away the batches the workers
        had prefetched for the last one (DataLoader's _reset); their ring slots stayed marked busy, never to be
        freed, so after two or three passes every slot was lost and each batch got a fresh shared buffer again
        (148 of 220 batches on the third pass, 5x the CPU). Received, they are freed like any dropped batch.
        So are the batches torch had already read but kept back, having come before their turn (from another
        worker than the batch awaited: with 2 or more workers), which _reset forgets: each such batch kept a
        slot busy for good too (a test run: 29 buffers received over 5 passes of 25 batches, 2 workers)."""
        it = getattr(self, "_iterator", None)
        get = getattr(it, "_get_data", None)
        if not self.persistent_workers or get is None:
            return super().__iter__()
        for info in list(getattr(it, "_task_info", {}).values()):
            if len(info) == 2:  # (worker id, batch): read ahead of its turn, never yielded; _reset drops it
                self.receiver(info[1])

        def drained():  # (only while torch restarts the workers: _next_data's later calls are torch's own)
            idx, data = get()
            self.receiver(data)  # its tensors die here: the slot is freed at the next batch
            return idx, data
        it._get_data = drained
        try:
            return super().__iter__()
        finally:
            del it._get_data  # the instance attribute: the class's method again


def to_device(batch: dict, device, dtype: torch.dtype = torch.float32) -> dict:
    """The batch on the device; floating tensors (float16 from the shard) cast to dtype there, after the
    copy, so the host never widens them and the copy moves half the bytes."""
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            v = v.to(device, non_blocking=True)
            if v.is_floating_point() and v.dtype != dtype:
                v = v.to(dtype)
        out[k] = v
    return out


class DeviceFeed:
    """Batches from a loader, on the device. On CUDA the next batch's copy overlaps the current step:
    `preload()` (called by the loop once the step's work is queued) takes batch i+1 from the loader
    (pinned by the DataLoader) and queues its non-blocking copy and cast on a side stream; `next()`
    makes the compute stream wait for that copy and hands the batch over. On a CPU it only moves
    (casts) each batch when it is taken."""

    def __init__(self, loader, device, dtype: torch.dtype = torch.float32):
        self.batches = iter(loader)
        self.device, self.dtype = torch.device(device), dtype
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None
        self.pending = None  # the next batch: on the device (CUDA, copy queued) or on the host (CPU)
        self.copying: list[tuple[dict, torch.cuda.Event]] = []  # host batches whose copy may still run

    def preload(self) -> float:
        """Fetch the next batch and queue its copy; returns the seconds spent waiting for the loader."""
        if self.pending is not None:
            return 0.0
        t0 = time.perf_counter()
        try:
            batch = next(self.batches)
        except (ShardError, RuntimeError) as e:
            raise _from_worker(e) from None
        waited = time.perf_counter() - t0
        if self.stream is not None:
            # a host batch is kept until its copy has run: pinned memory (a worker's buffer, reused once
            # nothing refers to it) must not be handed back while the copy engine still reads it
            self.copying = [(b, e) for b, e in self.copying if not e.query()]
            with torch.cuda.stream(self.stream):
                host, batch = batch, to_device(batch, self.device, self.dtype)
                done = torch.cuda.Event()
                done.record(self.stream)
            self.copying.append((host, done))
        self.pending = batch
        return waited

    def next(self) -> tuple[dict, float]:
        """(the next batch on the device, seconds spent waiting for the loader)."""
        waited = self.preload()
        batch, self.pending = self.pending, None
        if self.stream is None:
            return to_device(batch, self.device, self.dtype), waited
        current = torch.cuda.current_stream(self.device)
        current.wait_stream(self.stream)
        for v in batch.values():
            if torch.is_tensor(v):
                v.record_stream(current)  # its memory is not reused before the step that reads it is done
        return batch, waited


def _from_worker(e: Exception) -> Exception:
    """A ShardError (or CorruptRecordError) raised in a DataLoader worker reaches the main process with the
    worker's whole traceback as its text (torch's ExceptionWrapper; a RuntimeError where the error class
    cannot be rebuilt): the original message alone, as without workers, so the trainer's one-line error
    names the shard and the record."""
    text, mark = str(e), "regionbert.data.errors."
    if text.startswith("Caught ") and mark in text:
        _, _, message = text[text.rindex(mark):].partition(": ")
        if message:
            return ShardError(message.rstrip("\n"))
    if text.startswith("Caught ") and "</torch_" in text and "No space left on device" in text:
        return ValueError(f"a loader worker could not get shared memory for its next batch: {SHM} is full "
                          f"({_shm_free()}); another job may be filling it, or the workers' buffers grew to the "
                          f"largest batches: {shared_memory_remedy()}, then resume (--resume latest)")
    return e


SHM = "/dev/shm"  # where torch's shared CPU memory lives on Linux (shm_open)


def shared_memory_remedy(path: str = SHM) -> str:
    return (f"give the machine's {path} more room (docker run --shm-size=16g or --ipc=host; Kubernetes: an "
            f"emptyDir of medium Memory mounted on {path}), or lower data.num_workers or data.token_budget")


def _shm_free(path: str = SHM) -> str:
    try:
        st = os.statvfs(path)
    except OSError:
        return "its size unknown"
    return f"{st.f_bavail * st.f_frsize / 2**20:,.0f} MB free of {st.f_blocks * st.f_frsize / 2**20:,.0f} MB now"


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

    def batches(self, epoch: int, lengths: np.ndarray | None = None,
                rng: np.random.Generator | None = None) -> Batches:
        """An epoch's batches of pair indices; lengths and rng: other lengths (ITM's real ones) and draws.

        Kept as one flat array of pair indices cut at batch boundaries (Batches: 4 bytes a pair), not lists
        of Python ints (about 40 bytes a pair, kept for the epoch: issue 24). Each batch is a run of
        consecutive pairs of its (sorted) bucket, so the buckets are laid end to end and only the cuts are
        found one batch at a time; then the batches are shuffled as whole runs. The temporaries (a
        permutation, the runs' positions: 16 bytes a pair) are given back to the OS (release_heap)."""
        out = self._batches(epoch, lengths, rng)
        release_heap()
        return out

    def _batches(self, epoch: int, lengths: np.ndarray | None, rng: np.random.Generator | None) -> Batches:
        rng = np.random.default_rng([self.seed, epoch]) if rng is None else rng
        lengths = self.lengths if lengths is None else np.asarray(lengths)
        order = rng.permutation(len(lengths))
        flat = np.empty(len(lengths), index_dtype(len(lengths)))
        sizes = []  # one Python int per batch (not per pair), gone when the epoch's Batches is made
        for start in range(0, len(order), self.bucket_size):
            bucket = order[start:start + self.bucket_size]
            if self.sort:  # longest first: a batch is as many as fit under its first (one step per batch)
                bucket = bucket[np.argsort(-lengths[bucket], kind="stable")]
                sizes += self._sorted_cuts(lengths[bucket].tolist())
            else:
                sizes += self._plain_cuts(lengths[bucket].tolist())
            flat[start:start + len(bucket)] = bucket
        del order
        return Batches.shuffled(flat, np.array(sizes, np.int64), rng.permutation(len(sizes)))

    def _sorted_cuts(self, lens: list[int]) -> list[int]:
        """Batch sizes along a bucket sorted longest first: each as many as fit under its first pair."""
        sizes, i = [], 0
        while i < len(lens):
            size = self.max_batch_size if lens[i] <= 0 else max(1, min(self.budget // lens[i], self.max_batch_size))
            sizes.append(min(size, len(lens) - i))
            i += size
        return sizes

    def _plain_cuts(self, lens: list[int]) -> list[int]:
        """Batch sizes along an unsorted bucket: a batch grows while its size x longest stays in the budget."""
        sizes, count, longest = [], 0, 0
        for length in lens:
            n = max(longest, length)
            if count and (n * (count + 1) > self.budget or count >= self.max_batch_size):
                sizes.append(count)
                count, n = 0, length
            count += 1
            longest = n
        if count:
            sizes.append(count)
        return sizes

    def padding_fraction(self, epoch: int = 0) -> float:
        """The padding share of one epoch of batches (packed text + regions, as the model sees it)."""
        real = padded = 0
        for b in self.batches(epoch):
            lens = self.lengths[b]
            real, padded = real + int(lens.sum()), padded + len(b) * int(lens.max())
        return 1 - real / padded


def _malloc_trim():
    """glibc's malloc_trim, or None under another C library (there the heap is left as it is)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_MALLOC_TRIM = _malloc_trim()


def release_heap() -> None:
    """Give the heap's free pages back to the OS, after the per-epoch temporaries (several bytes a pair) are
    freed. glibc keeps freed blocks below its mmap threshold, which rises to the largest block freed (up to
    32 MiB), in the heap: there they stay the process's memory for good, about half of what an epoch's
    sampling allocated (measured: 8 bytes a pair per epoch kept, 4 of them garbage; ~30 B a caption per
    rank in bench_scale.py), more than the batches themselves. malloc_trim(0) returns them (madvise):
    milliseconds, once per epoch and per ITM round."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def index_dtype(n: int) -> type:
    """The dtype of indices below n: int32 (4 bytes an index), int64 only past 2**31."""
    return np.int32 if n < 2**31 else np.int64


class Batches(collections.abc.Sequence):
    """An epoch's batches of pair indices: batch k is flat[starts[k]:starts[k + 1]], given as a list of
    Python ints when asked for (batches[k]). flat is int32 (index_dtype), starts int64 per batch: about 4
    bytes a pair for the epoch. Equal to another Batches or to a list of lists with the same batches."""

    def __init__(self, starts: np.ndarray, flat: np.ndarray):
        self.starts, self.flat = starts, flat

    @classmethod
    def shuffled(cls, flat: np.ndarray, sizes: np.ndarray, perm: np.ndarray) -> Batches:
        """Runs of flat (sizes, end to end) reordered as whole runs: new batch k is old run perm[k]."""
        old = np.zeros(len(sizes) + 1, np.int64)
        np.cumsum(sizes, out=old[1:])
        starts = np.zeros(len(sizes) + 1, np.int64)
        np.cumsum(sizes[perm], out=starts[1:])
        # where each new position reads from: its run's old start - new start, + the position itself
        at = np.repeat((old[:-1][perm] - starts[:-1]).astype(flat.dtype), sizes[perm])
        at += np.arange(len(at), dtype=flat.dtype)
        return cls(starts, flat[at])

    def __len__(self) -> int:
        return len(self.starts) - 1

    def __getitem__(self, k) -> list[int]:
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        k = operator.index(k)
        if not -len(self) <= k < len(self):
            raise IndexError(f"batch {k} out of range for {len(self)} batches")
        k %= len(self)
        return self.flat[self.starts[k]:self.starts[k + 1]].tolist()

    def __eq__(self, other) -> bool:
        if isinstance(other, Batches):
            return np.array_equal(self.starts, other.starts) and np.array_equal(self.flat, other.flat)
        if not isinstance(other, collections.abc.Sequence) or len(other) != len(self):
            return NotImplemented if not isinstance(other, collections.abc.Sequence) else False
        return all(a == list(b) for a, b in zip(self, other, strict=True))

    __hash__ = None


def _compact(batches: Batches, other: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An epoch's ITM stream kept as (starts, flat pair indices, other image per pair), both int32: 8 bytes a
    pair where lists of Python ints take about 40 (the stream is kept for the epoch)."""
    return batches.starts, batches.flat, other.astype(batches.flat.dtype)


class BatchKeys(collections.abc.Sequence):
    """One batch's dataset keys, [(task, pair, other image, seed prefix + (j,)) for each row j], kept as
    the task, the pairs' and shown images' index arrays and the seed's common prefix: what TaskSampler
    yields. It is a sequence of exactly those tuples (equal to a list of them), made only when asked for.

    With loader workers every batch's keys are pickled in the main process (by the index queue's feeder
    thread) and unpickled in a worker: as 100+ tuples that cost ~15 us and ~11 us a batch, paid by the
    worker path alone; here they go as two byte strings (`__reduce__`: ~3 us), and PairDataset reads the
    arrays as they are."""

    __slots__ = ("task", "pairs", "others", "prefix")

    def __init__(self, task: str, pairs: np.ndarray, others: np.ndarray | None, prefix: tuple):
        if pairs.dtype.kind not in "iu":  # (integers: their bytes are what is pickled)
            pairs = pairs.astype(np.int64)
        if others is not None and others.dtype.kind not in "iu":
            others = others.astype(np.int64)
        self.task, self.pairs, self.others, self.prefix = task, pairs, others, prefix  # others None: all -1

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return list(self)[j]
        j = range(len(self.pairs))[j]  # (an IndexError past either end; a negative j from the end)
        return (self.task, int(self.pairs[j]), -1 if self.others is None else int(self.others[j]), self.prefix + (j,))

    def __iter__(self):
        task, prefix = self.task, self.prefix
        pairs = self.pairs.tolist()
        others = [-1] * len(pairs) if self.others is None else self.others.tolist()
        return ((task, p, o, prefix + (j,)) for j, (p, o) in enumerate(zip(pairs, others, strict=True)))

    def __eq__(self, other) -> bool:
        if not isinstance(other, collections.abc.Sequence):
            return NotImplemented
        return len(other) == len(self) and list(self) == list(other)

    __hash__ = None

    def __repr__(self) -> str:
        return f"BatchKeys({list(self)!r})"

    def __reduce__(self):
        others = None if self.others is None else (self.others.tobytes(), self.others.dtype.str)
        return _batch_keys, (self.task, self.pairs.tobytes(), self.pairs.dtype.str, others, self.prefix)

    def shown(self, image: np.ndarray) -> np.ndarray:
        """The image each row shows (its pair's own, or the other image), int64, given pair -> image."""
        own = image[self.pairs]
        shown = own if self.others is None else np.where(self.others < 0, own, self.others)
        return shown.astype(np.int64, copy=False)


def _batch_keys(task: str, pairs: bytes, dtype: str, others, prefix: tuple) -> BatchKeys:
    """BatchKeys from its pickled form (read-only arrays over the pickle's bytes: nothing copied)."""
    others = None if others is None else np.frombuffer(others[0], others[1])
    return BatchKeys(task, np.frombuffer(pairs, dtype), others, prefix)


class TaskSampler:
    """An endless stream of batches of dataset keys (task, pair, other_image, seed), one task per batch.

    mix: {task: ratio}; a batch's task is drawn with these probabilities. In an ITM batch each pair's
    image is swapped for another image with probability itm_neg_prob, drawn uniformly from all other
    images (neg_window 0, UNITER's data/itm.py), or from the neg_window images nearest in box count on
    either side: a negative's box count then says nothing. That option is not the default because it
    is harder to start from: from scratch with the default mix (bench/ablate_itm_plateau.py) ITM left
    chance by step 800 with any image as negative, and was still at chance at step 1,000 with a window
    of 100.
    skip: batches to pass over (to resume a run where it stopped).

    Every batch of every task keeps the token budget. The token buckets cut batches by each pair's own
    length (text + its image's regions); an ITM negative brings another image's regions, so ITM batches
    are not those: ITM has a stream of its own (`itm_batches`), as in UNITER, whose ITM dataset buckets
    by the lengths its samples have once the negatives are drawn: every pair's negative (or not) is drawn
    for the epoch, and the pairs are bucketed by those real lengths, under the same budget, with as
    little padding as the other tasks. A step whose drawn task is ITM takes the next batch of that
    stream (and the pair batch of its step goes unused, as it went to ITM before); the mix stays one
    task per step with the ratios given. Before, negatives were swapped into batches cut by the pairs'
    own lengths: ITM batches held up to 3.6x the budget and 44% padding.

    Distributed: an epoch's batches are dealt out in groups of world_size, batch g * world_size + rank
    to each rank (a remainder smaller than a group is dropped, so every rank has as many steps). The
    task of group g is drawn from an RNG seeded by (seed, epoch, g) only: every rank trains the same
    task at the same step, so each step's gradients are of one objective, as in UNITER. ITM's stream
    is dealt out the same way (its j-th ITM step: ITM batch j * world_size + rank), so every rank has
    one batch per step. On one process this is the same stream as before sharding existed."""

    def __init__(self, buckets: TokenBucketSampler, pairs: Pairs, mix: dict, seed: int = 0,
                 itm_neg_prob: float = 0.5, neg_window: int = 0, skip: int = 0, rank: int = 0,
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
        self._itm = None  # (epoch, [(batches, other image per pair) per round]) of ITM's stream

    def __iter__(self):
        skip, W = self.skip, self.world_size
        for epoch in itertools.count():
            batches = self.buckets.batches(epoch)
            groups = len(batches) // W  # steps this epoch, the same on every rank
            if groups == 0:
                raise ValueError(f"an epoch has {len(batches)} batches, fewer than the {W} processes: "
                                 "lower data.token_budget or use more data")
            itm_steps = 0  # ITM steps so far this epoch: the next one's place in ITM's stream
            for g in range(groups):
                task = self.task(epoch, g)
                if task == "itm":
                    itm_steps += 1
                if skip:
                    skip -= 1
                elif task == "itm":
                    yield self.itm_keys(epoch, itm_steps - 1)
                else:
                    b = g * W + self.process_rank
                    batch = batches.flat[batches.starts[b]:batches.starts[b + 1]] if isinstance(batches, Batches) \
                        else batches[b]  # (the array itself: no list of Python ints made for BatchKeys)
                    yield self.keys(batch, epoch, b, g, task)

    def task(self, epoch: int, group: int) -> str:
        """The task of an epoch's group of batches (the same on every rank)."""
        rng = np.random.default_rng([self.seed, epoch, group])
        return self.tasks[rng.choice(len(self.tasks), p=self.probs)]

    def keys(self, batch, epoch: int, b: int, group: int | None = None,
             task: str | None = None) -> BatchKeys:
        """The dataset keys of batch b of an epoch's pair batches; its task comes from its group (the
        step's batches). An ITM step takes its batch from itm_keys instead (here, for a pair batch drawn
        ITM, its negatives are swapped in: the pairs' own lengths, not a batch the budget holds for)."""
        group = b if group is None else group
        batch = np.asarray(batch, dtype=np.int64) if isinstance(batch, list) else batch
        if task is not None and task != "itm":  # drawn already (self.task): no negatives to draw
            return BatchKeys(task, batch, None, (self.seed, epoch, b))
        rng = np.random.default_rng([self.seed, epoch, group])  # the same on every rank
        task = self.tasks[rng.choice(len(self.tasks), p=self.probs)]
        if self.world_size > 1:  # negatives: this rank's own draws
            rng = np.random.default_rng([self.seed, epoch, group, self.process_rank])
        other = np.full(len(batch), -1)
        if task == "itm":
            neg = rng.random(len(batch)) < self.neg_prob
            other = np.where(neg, self.negatives(self.pairs.image[batch], rng), -1)
        return BatchKeys(task, batch, other if task == "itm" else None, (self.seed, epoch, b))

    def itm_batches(self, epoch: int, round_: int) -> tuple[Batches, np.ndarray]:
        """One round of ITM's stream in an epoch: (batches of pair indices, the image each pair shows:
        a negative, or -1 for its own). Every pair's negative is drawn (with probability itm_neg_prob),
        then the pairs are bucketed by the lengths they really have (text + the shown image's regions)
        under the budget. Seeded by (seed, epoch, 2**32 - 1, round): apart from the pair batches' draws."""
        rng = np.random.default_rng([self.seed, epoch, 0xFFFFFFFF, round_])
        own = self.pairs.image
        neg = rng.random(len(own)) < self.neg_prob
        other = np.where(neg, self.negatives(own, rng), -1)
        text = np.asarray(self.pairs.lengths) - self.pairs.num_boxes[own]
        real = text + self.pairs.num_boxes[np.where(other < 0, own, other)]
        return self.buckets.batches(epoch, lengths=real, rng=rng), other

    def itm_keys(self, epoch: int, j: int) -> BatchKeys:
        """The keys of this rank's batch for the j-th ITM step of an epoch: ITM batch j * world_size + rank
        of the epoch's ITM stream (rounds of itm_batches one after the other, each dealt out whole groups
        of world_size; a round used up, the next begins, with new negatives)."""
        W = self.world_size
        if self._itm is None or self._itm[0] != epoch:
            self._itm = (epoch, [])
        rounds, g = self._itm[1], j
        for r in itertools.count():
            if r == len(rounds):
                rounds.append(_compact(*self.itm_batches(epoch, r)))
                release_heap()  # the round's draws and lengths (tens of bytes a pair), freed
            starts, flat, other = rounds[r]
            count = len(starts) - 1
            if g < count // W:
                break
            if not count // W:
                raise ValueError(f"ITM's stream has {count} batches, fewer than the {W} processes: "
                                 "lower data.token_budget or use more data")
            g -= count // W
        b = g * W + self.process_rank
        keys = BatchKeys("itm", flat[starts[b]:starts[b + 1]], None, (self.seed, epoch, 0xFFFFFFFF - r, b))
        keys.others = np.asarray(other[keys.pairs], dtype=keys.pairs.dtype)
        return keys

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
