"""The extraction job: images -> one shard. Decoding and resizing run in DataLoader workers, the
detector runs batched on the main thread, and a writer thread owns the shard, so the model never
waits on LMDB. Re-running the same job resumes it; bad images go to a failures file.

Batches hold images of one padded shape only. torchvision pads every image of a batch to the batch's
largest (rounded up to a multiple of 32), and the padding changes the features near it (bench/README.md:
batch size 1 vs 4 moved same-box features by up to 31% of the feature maximum). An image padded
only to its own multiple of 32 looks the same alone or in a batch, so with this grouping an image's
features do not depend on which images happen to be read with it, nor on --batch-size (up to float
rounding of batched kernels). Decoded images wait in per-shape groups (at most `group_window` of them);
a group runs when it has batch_size images, or, when the window is full, the group holding the oldest
image runs as it is. Records are still written in input order."""

from __future__ import annotations

import json
import os
import queue
import socket
import threading
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from regionbert.data import ShardError, ShardWriteError, ShardWriter
from regionbert.data.lock import WriterLock

from .detector import DetectorSpec, ImageInput
from .families import build_detector, family_of
from .images import (
    DEFAULT_MAX_PIXELS,
    ImageError,
    ImageItem,
    check_boxes,
    decode_image,
    list_folder,
    partition,
    read_boxes,
    read_manifest,
    shard_from_env,
)
from .policies import BoxPolicy


@dataclass
class ExtractConfig:
    images: str  # a folder (searched recursively) or a manifest file
    out: str  # folder that receives shard-IIIII-of-NNNNN
    detector: DetectorSpec = field(default_factory=DetectorSpec)
    policy: BoxPolicy = field(default_factory=BoxPolicy)
    image_root: str | None = None  # manifest paths are relative to this (default: the manifest's folder)
    path_column: str | None = None
    id_column: str | None = None
    allow_outside_root: bool = False
    boxes_file: str | None = None  # JSONL of user boxes, for the 'given' policy
    num_shards: int | None = None  # None: from SLURM / torchrun environment, else 1
    shard_index: int | None = None
    batch_size: int = 8
    workers: int = 4
    device: str = "auto"
    amp: str = "auto"  # auto (bf16 if supported, else fp16, on CUDA; none on CPU), bf16, fp16, none
    feature_dtype: str = "float16"
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_failure_fraction: float = 0.01  # exit non-zero past this fraction of failed images
    commit_every: int = 256
    append: bool = False  # add images to a complete shard (safe only while nobody reads it)
    progress: bool = True
    group_window: int | None = None  # images waiting for a same-shape batch (None: 4 x batch_size)


@dataclass
class Summary:
    shard: str
    total: int = 0  # images in this job's partition
    already_done: int = 0  # committed by an earlier run, skipped
    written: int = 0
    failed: int = 0
    seconds: float = 0.0
    failures_file: str | None = None

    @property
    def images_per_second(self) -> float:
        return self.written / self.seconds if self.seconds else 0.0

    @property
    def failure_fraction(self) -> float:
        attempted = self.total - self.already_done
        return self.failed / attempted if attempted else 0.0


class ImageDataset(Dataset):
    """Decodes, normalizes and resizes one image in a worker; returns an error instead of raising."""

    def __init__(self, items: list[ImageItem], image_input: ImageInput, max_pixels: int, boxes: dict | None = None):
        self.items, self.image_input, self.max_pixels, self.boxes = items, image_input, max_pixels, boxes

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        item = self.items[i]
        out = {"id": item.id, "path": item.path, "image": None, "size": None, "boxes": None, "error": None}
        try:
            rgb = decode_image(item.path, self.max_pixels)
            h, w = rgb.shape[:2]
            if self.boxes is not None:
                if item.id not in self.boxes:
                    raise ImageError("no boxes given for this image")
                check_boxes(self.boxes[item.id], w, h)
                out["boxes"] = torch.from_numpy(self.boxes[item.id])
            with torch.no_grad():  # the family's preprocessing (butd_r101_vg: BGR uint8, PIL resize)
                out["image"] = self.image_input.prepare(rgb)
            out["size"] = (h, w)
        except ImageError as e:
            out["error"] = str(e)
        except Exception as e:  # noqa: BLE001 - one bad file must not stop a days-long job
            out["error"] = f"unexpected {type(e).__name__}: {e}"
        return out


def _collate(batch):
    return batch


def padded_shape(image: torch.Tensor, divisible: int) -> tuple[int, int]:
    """(H, W) of a preprocessed (3, H, W) image after torchvision pads it alone (to a multiple of divisible)."""
    h, w = image.shape[-2:]
    return -(-int(h) // divisible) * divisible, -(-int(w) // divisible) * divisible


class ShapeBatcher:
    """Groups items by a shape key into batches of one shape (see the module docstring).

    add(seq, key, item) -> batches ready now; flush() -> the rest. Each batch is a list of (seq, item),
    seq ascending. At most `window` items wait; when one more would exceed it, the group whose first
    item is oldest goes out as it is, so no item waits behind an endless stream of other shapes."""

    def __init__(self, batch_size: int, window: int):
        self.batch_size, self.window = batch_size, max(window, batch_size)
        self.groups: dict = {}  # key -> [(seq, item)], insertion-ordered by first arrival
        self.waiting = 0

    def add(self, seq: int, key, item) -> list[list]:
        out = []
        group = self.groups.setdefault(key, [])
        group.append((seq, item))
        self.waiting += 1
        if len(group) == self.batch_size:
            out.append(self._pop(key))
        while self.waiting > self.window:
            out.append(self._pop(min(self.groups, key=lambda k: self.groups[k][0][0])))
        return out

    def flush(self) -> list[list]:
        return [self._pop(k) for k in sorted(self.groups, key=lambda k: self.groups[k][0][0])]

    def _pop(self, key) -> list:
        group = self.groups.pop(key)
        self.waiting -= len(group)
        return group


class InOrder:
    """Passes results on in sequence order: put(seq, value) may come in any order; `emit` sees
    seq 0, 1, 2, ... (value None: nothing to pass on for that seq, e.g. a failed image)."""

    def __init__(self, emit):
        self.emit, self.next, self.held = emit, 0, {}

    def put(self, seq: int, value) -> None:
        self.held[seq] = value
        while self.next in self.held:
            v = self.held.pop(self.next)
            if v is not None:
                self.emit(v)
            self.next += 1


def _worker_init(_):
    torch.set_num_threads(1)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        return torch.device("cpu")
    return torch.device(name)


def autocast_for(device: torch.device, amp: str):
    if device.type != "cuda" or amp == "none":
        return nullcontext()
    if amp == "auto":
        amp = "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return torch.autocast("cuda", dtype={"bf16": torch.bfloat16, "fp16": torch.float16}[amp])


def shard_name(index: int, count: int) -> str:
    return f"shard-{index:05d}-of-{count:05d}"


def collect_items(cfg: ExtractConfig) -> list[ImageItem]:
    if os.path.isdir(cfg.images):
        return list_folder(cfg.images, cfg.allow_outside_root)
    if os.path.isfile(cfg.images):
        return read_manifest(cfg.images, cfg.image_root, cfg.path_column, cfg.id_column, cfg.allow_outside_root)
    raise ValueError(f"{cfg.images}: no such folder or manifest")


class _ShardWriterThread(threading.Thread):
    """Owns the ShardWriter: takes finished records from a queue, so inference never waits on LMDB."""

    def __init__(self, writer: ShardWriter, on_failure):
        super().__init__(name="shard-writer", daemon=True)
        self.writer, self.on_failure = writer, on_failure
        self.queue: queue.Queue = queue.Queue(maxsize=256)
        self.error: BaseException | None = None
        self.written = 0

    def run(self):
        while (rec := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain, so the producer never blocks
            item, fields = rec
            try:
                self.writer.add(item.id, **fields)
                self.written += 1
            except ShardWriteError as e:  # a full disk: stop the run (a rerun resumes), don't blame the image
                self.error = e
            except ShardError as e:  # a record the shard refuses (e.g. non-finite features)
                self.on_failure(item, str(e))
            except BaseException as e:  # noqa: BLE001 - reported on the main thread
                self.error = e


def run(cfg: ExtractConfig) -> Summary:
    """Extract one job's share of the images into its shard; returns what happened."""
    num_shards, shard_index = cfg.num_shards, cfg.shard_index
    if num_shards is None or shard_index is None:
        num_shards, shard_index = shard_from_env() or (1, 0)
    items = partition(collect_items(cfg), num_shards, shard_index)
    shard = os.path.join(cfg.out, shard_name(shard_index, num_shards))
    summary = Summary(shard=shard, total=len(items))
    make_out_folder(cfg.out)
    # The shard's writer lock first: a second job on the same shard is refused at once, not after its
    # detector is built (10-24 s for butd_r101_vg). Handed to ShardWriter below, which takes the same lock
    # (a process cannot hold it twice), so it is released just before.
    early = WriterLock(shard).acquire()
    try:
        model, class_names, info, boxes, device = _prepare(cfg)
    finally:
        early.release()
    return _extract(cfg, items, shard, summary, (shard_index, num_shards), model, class_names, info, boxes, device)


def make_out_folder(out: str) -> None:
    """--out as a folder, or a ValueError naming it (a file of that name, a parent that is a file, ...)."""
    if os.path.lexists(out) and not os.path.isdir(out):
        raise ValueError(f"--out {out}: exists and is not a folder (this job writes shard-IIIII-of-NNNNN in it)")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--out {out}: cannot create the folder: {e.strerror}") from None


def _prepare(cfg: ExtractConfig):
    """The given boxes (if any), the device and the detector: what run needs before it writes anything."""
    boxes = None
    if cfg.policy.name == "given":
        if not cfg.boxes_file:
            raise ValueError("the 'given' box policy needs --boxes FILE")
        boxes = read_boxes(cfg.boxes_file)
    device = resolve_device(cfg.device)
    model, class_names, info = build_detector(cfg.detector)
    return model, class_names, info, boxes, device


def _extract(cfg: ExtractConfig, items, shard, summary, job, model, class_names, info, boxes, device) -> Summary:
    """Run the detector over the items into the shard (run's second half, after the lock check)."""
    shard_index, num_shards = job
    family = family_of(cfg.detector.arch)
    cfg.policy.apply(model)
    model.to(device)
    extractor = family.region_extractor(model, cfg.policy)
    # a family checked against its original code in float32 (butd) is not autocast unless --amp asks
    amp = cfg.amp if device.type == "cuda" and (family.autocast or cfg.amp != "auto") else "none"
    window = cfg.group_window or 4 * cfg.batch_size
    image_input = family.image_input(model)
    divisible = image_input.size_divisible  # None: one image per forward pass (butd)
    grouping = ("none needed: the detector runs each image alone" if divisible is None else
                f"same padded shape (multiple of {divisible}): features do not depend on the batch")
    settings = {"name": "regionbert.extract", **info, **cfg.policy.describe(model), "amp": amp,
                "batch_grouping": grouping,
                "job": {"shard_index": shard_index, "num_shards": num_shards, "host": socket.gethostname(),
                        "images": os.path.abspath(cfg.images), "device": str(device),
                        "batch_size": cfg.batch_size, "group_window": window}}
    feature_dim, attribute_names = family.layout(model)
    failures_path = shard + ".failures.jsonl"
    failures: list[dict] = []
    lock = threading.Lock()

    def fail(item: ImageItem, reason: str):
        with lock:
            failures.append({"id": item.id, "path": item.path, "reason": reason})

    writer = ShardWriter(shard, feature_dim=feature_dim, class_names=class_names, feature_dtype=cfg.feature_dtype,
                         attribute_names=attribute_names, extractor=settings,
                         commit_every=cfg.commit_every, append=cfg.append)
    thread, ok, start = None, False, time.perf_counter()
    try:
        todo = []
        for it in items:
            try:
                if it.id not in writer:
                    todo.append(it)
            except ShardError as e:  # e.g. an id past LMDB's 511-byte key limit
                fail(it, str(e))
        summary.already_done = len(items) - len(todo) - len(failures)
        if todo and writer.was_complete and not cfg.append:
            raise ValueError(f"{shard} is complete, and {len(todo)} of the images are not in it (new, or failed "
                             "before); pass --append to add them, while nobody reads the shard")
        loader = DataLoader(ImageDataset(todo, image_input, cfg.max_pixels, boxes), batch_size=cfg.batch_size,
                            num_workers=cfg.workers, collate_fn=_collate, pin_memory=device.type == "cuda",
                            worker_init_fn=_worker_init, persistent_workers=False)
        thread = _ShardWriterThread(writer, fail)
        thread.start()
        start = time.perf_counter()
        in_order = InOrder(thread.queue.put)
        batcher = ShapeBatcher(cfg.batch_size, window)

        def run_batch(group: list) -> None:
            good = [b for _, b in group]
            images = [b["image"].to(device, non_blocking=True) for b in good]
            given = [b["boxes"] for b in good] if boxes is not None else None
            with autocast_for(device, amp):
                results = extractor(images, [b["size"] for b in good], given)
            for (seq, b), r in zip(group, results, strict=True):
                in_order.put(seq, (ImageItem(b["id"], b["path"]), record_fields(b, r, cfg.policy)))
            if thread.error is not None:
                raise thread.error
            bar.update(len(group))

        with tqdm(total=len(todo), unit="img", desc=os.path.basename(shard), disable=not cfg.progress,
                  dynamic_ncols=True) as bar:
            seq = 0
            for batch in loader:
                for b in batch:
                    if b["error"] is not None:
                        fail(ImageItem(b["id"], b["path"]), b["error"])
                        in_order.put(seq, None)
                        bar.update(1)
                    else:
                        key = 0 if divisible is None else padded_shape(b["image"], int(divisible))
                        for group in batcher.add(seq, key, b):
                            run_batch(group)
                    seq += 1
                bar.set_postfix(failed=len(failures), refresh=False)
            for group in batcher.flush():
                run_batch(group)
        ok = True
    finally:
        try:
            if thread is not None:
                thread.queue.put(None)
                thread.join()
            writer.close(complete=ok and (thread is None or thread.error is None))
        finally:  # whatever happened to the shard, say which images failed
            summary.seconds = time.perf_counter() - start
            summary.written = 0 if thread is None else thread.written
            summary.failed = len(failures)
            if failures:
                with open(failures_path, "w") as f:
                    for rec in failures:
                        f.write(json.dumps(rec) + "\n")
                summary.failures_file = failures_path
            elif ok and os.path.exists(failures_path):
                os.remove(failures_path)  # an earlier run's failures were all retried successfully
    if thread is not None and thread.error is not None:
        raise thread.error
    return summary


def record_fields(b: dict, r: dict, policy) -> dict:
    """ShardWriter.add fields for one image's extractor result. The torchvision policy also keeps each
    detection's label (class index) and score, as model(images) returns them, in extra."""
    h, w = b["size"]
    boxes_px = r["boxes"].float().cpu().numpy()
    np.clip(boxes_px, 0, [w, h, w, h], out=boxes_px)  # float rounding when scaling back
    fields = {"width": w, "height": h, "boxes": boxes_px, "features": r["features"].float().cpu().numpy(),
              "class_probs": r["class_probs"].float().cpu().numpy(),
              "attr_probs": r["attr_probs"].float().cpu().numpy() if "attr_probs" in r else None}
    if policy.name == "torchvision":
        fields["extra"] = {"labels": r["labels"].cpu().tolist(), "scores": r["scores"].float().cpu().tolist()}
    return fields


def summary_dict(s: Summary) -> dict:
    return asdict(s) | {"images_per_second": round(s.images_per_second, 2),
                        "failure_fraction": round(s.failure_fraction, 4)}
