"""The extraction job: images -> one shard. Decoding and resizing run in DataLoader workers, the
detector runs batched on the main thread, and a writer thread owns the shard, so the model never
waits on LMDB. Re-running the same job resumes it; bad images go to a failures file."""

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

from regionbert.data import ShardError, ShardWriter

from .detector import DetectorSpec, build_detector
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
    to_tensor,
)
from .regions import BoxPolicy, RegionExtractor, preprocess


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

    def __init__(self, items: list[ImageItem], transform, max_pixels: int, boxes: dict | None = None):
        self.items, self.transform, self.max_pixels, self.boxes = items, transform, max_pixels, boxes

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
            with torch.no_grad():
                out["image"] = preprocess(self.transform, to_tensor(rgb))
            out["size"] = (h, w)
        except ImageError as e:
            out["error"] = str(e)
        except Exception as e:  # noqa: BLE001 - one bad file must not stop a days-long job
            out["error"] = f"unexpected {type(e).__name__}: {e}"
        return out


def _collate(batch):
    return batch


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

    boxes = None
    if cfg.policy.name == "given":
        if not cfg.boxes_file:
            raise ValueError("the 'given' box policy needs --boxes FILE")
        boxes = read_boxes(cfg.boxes_file)
    device = resolve_device(cfg.device)
    model, class_names, info = build_detector(cfg.detector)
    model.to(device)
    extractor = RegionExtractor(model, cfg.policy)
    settings = {"name": "regionbert.extract", **info, **cfg.policy.describe(model),
                "amp": cfg.amp if device.type == "cuda" else "none",
                "job": {"shard_index": shard_index, "num_shards": num_shards, "host": socket.gethostname(),
                        "images": os.path.abspath(cfg.images), "device": str(device)}}
    feature_dim = _box_feature_dim(model)

    os.makedirs(cfg.out, exist_ok=True)
    failures_path = shard + ".failures.jsonl"
    failures: list[dict] = []
    lock = threading.Lock()

    def fail(item: ImageItem, reason: str):
        with lock:
            failures.append({"id": item.id, "path": item.path, "reason": reason})

    writer = ShardWriter(shard, feature_dim=feature_dim, class_names=class_names, feature_dtype=cfg.feature_dtype,
                         extractor=settings, commit_every=cfg.commit_every, append=cfg.append)
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
        loader = DataLoader(ImageDataset(todo, model.transform, cfg.max_pixels, boxes), batch_size=cfg.batch_size,
                            num_workers=cfg.workers, collate_fn=_collate, pin_memory=device.type == "cuda",
                            worker_init_fn=_worker_init, persistent_workers=False)
        thread = _ShardWriterThread(writer, fail)
        thread.start()
        start = time.perf_counter()
        with tqdm(total=len(todo), unit="img", desc=os.path.basename(shard), disable=not cfg.progress,
                  dynamic_ncols=True) as bar:
            for batch in loader:
                good = [b for b in batch if b["error"] is None]
                for b in batch:
                    if b["error"] is not None:
                        fail(ImageItem(b["id"], b["path"]), b["error"])
                if good:
                    images = [b["image"].to(device, non_blocking=True) for b in good]
                    given = [b["boxes"] for b in good] if boxes is not None else None
                    with autocast_for(device, cfg.amp):
                        results = extractor(images, [b["size"] for b in good], given)
                    for b, r in zip(good, results, strict=True):
                        h, w = b["size"]
                        boxes_px = r["boxes"].float().cpu().numpy()
                        np.clip(boxes_px, 0, [w, h, w, h], out=boxes_px)  # float rounding when scaling back
                        thread.queue.put((ImageItem(b["id"], b["path"]), {
                            "width": w, "height": h, "boxes": boxes_px,
                            "features": r["features"].float().cpu().numpy(),
                            "class_probs": r["class_probs"].float().cpu().numpy()}))
                if thread.error is not None:
                    raise thread.error
                bar.update(len(batch))
                bar.set_postfix(failed=len(failures), refresh=False)
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


def _box_feature_dim(model) -> int:
    """D of the box head's output (1024 for every torchvision Faster R-CNN)."""
    head = model.roi_heads.box_head
    last = [m for m in head.modules() if isinstance(m, torch.nn.Linear)][-1]
    return last.out_features


def summary_dict(s: Summary) -> dict:
    return asdict(s) | {"images_per_second": round(s.images_per_second, 2),
                        "failure_fraction": round(s.failure_fraction, 4)}
