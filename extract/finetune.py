"""Fine-tune a torchvision Faster R-CNN on your own classes from COCO-format box annotations.

torchvision's detection training recipe (references/detection): SGD with momentum 0.9 and weight decay
1e-4, lr 0.02 per 16 images scaled linearly with the batch, a linear warmup over the first epoch (at
most 1000 steps, from 0.001 x lr), lr x 0.1 at 16/26 and 22/26 of the epochs, random horizontal flips,
the loss the model returns in training mode (RPN objectness + box regression, classifier + box
regression) summed. The start can be random (`none`), torchvision's COCO weights (`DEFAULT`; the box
predictor is replaced for the new class count), or a local checkpoint.

OUT/checkpoint.pt holds model, optimizer, epoch, step and RNG states (written atomically, loaded with
weights_only=True): `--resume` continues exactly where it stopped. OUT/detector.pt is what
`regionbert-extract --weights OUT/detector.pt` loads: the state dict with its builder, sizes and class
names, which end up in the shard metadata. OUT/log.jsonl has the losses and held-out figures.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor
from torchvision.ops import box_iou
from tqdm import tqdm

from .images import ImageError, decode_image, to_tensor
from .torchvision_rcnn import BUILDERS, CHECKPOINT_FORMAT, _torchvision_weights, read_checkpoint


@dataclass
class FinetuneConfig:
    annotations: str  # COCO-format json: images, annotations (bbox = [x, y, w, h] pixels), categories
    images: str  # folder the json's file_name entries are relative to
    out: str  # OUT/checkpoint.pt (resumable), OUT/detector.pt (for regionbert-extract), OUT/log.jsonl
    detector: str = "resnet50_fpn_v2"
    weights: str = "DEFAULT"  # starting point: none, a torchvision weights name, or a local checkpoint
    val_annotations: str | None = None  # held-out set; default: val_fraction of the images
    val_fraction: float = 0.1
    epochs: int = 26
    batch_size: int = 2
    lr: float | None = None  # None: 0.02 * batch_size / 16 (torchvision's 0.02 for 8 GPUs x 2 images); adamw: 1e-3
    # "sgd" (torchvision's recipe, for a pretrained start) or "adamw" (betas 0.9, 0.999): a small detector
    # from random weights (tiny_shapes) learns its classes several times faster with it
    optimizer: str = "sgd"
    momentum: float = 0.9
    weight_decay: float = 1e-4
    lr_steps: list[int] | None = None  # epochs where lr drops 10x; None: 16/26 and 22/26 of the epochs
    warmup_steps: int | None = None  # None: min(1000, steps per epoch - 1), as torchvision
    min_size: int | None = None  # None: the builder's default
    max_size: int | None = None
    flip: bool = True  # random horizontal flips
    eval_every: int = 1  # epochs; the last epoch is always evaluated
    checkpoint_every: int = 0  # steps; 0: at the end of every epoch only
    stop_after: int | None = None  # stop (with a checkpoint) after this many steps in total: for tests
    resume: bool = False
    seed: int = 0
    workers: int = 2
    device: str = "auto"
    progress: bool = True
    extra: dict = field(default_factory=dict)  # builder overrides (e.g. rpn settings)


# ----------------------------------------------------------------------------- data


@dataclass
class Sample:
    id: int
    path: str
    width: int
    height: int
    boxes: np.ndarray  # (N, 4) float32 xyxy pixels
    labels: np.ndarray  # (N,) int64, 1..K (0 is background)


def read_coco(path: str, image_root: str, class_names: list[str] | None = None) -> tuple[list[Sample], list[str]]:
    """A COCO-format json -> samples and class names (background first, then categories by id).

    class_names: those of the training set, for a held-out json (its categories must map onto them by
    name). Crowd boxes are left out (as torchvision does); boxes with no area are dropped and counted."""
    try:
        with open(path) as f:
            coco = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not a readable COCO json ({e})") from None
    for key in ("images", "annotations", "categories"):
        if not isinstance(coco, dict) or not isinstance(coco.get(key), list):
            raise ValueError(f"{path}: a COCO json needs a list {key!r}")
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    if class_names is None:
        class_names = ["__background__", *(str(c["name"]) for c in cats)]
        if not cats:
            raise ValueError(f"{path}: no categories")
    label_of = {}
    for c in cats:
        if str(c["name"]) not in class_names[1:]:
            raise ValueError(f"{path}: category {c['name']!r} (id {c['id']}) is not a training class")
        label_of[c["id"]] = class_names.index(str(c["name"]))
    images = {}
    for im in coco["images"]:
        try:
            images[im["id"]] = Sample(im["id"], os.path.join(image_root, im["file_name"]), int(im["width"]),
                                      int(im["height"]), np.zeros((0, 4), np.float32), np.zeros(0, np.int64))
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: image entry {im!r:.200} needs id, file_name, width, height ({e})") from None
    boxes: dict = {k: [] for k in images}
    labels: dict = {k: [] for k in images}
    dropped = 0
    for a in coco["annotations"]:
        where = f"{path}: annotation {a.get('id', '?')}"
        if a.get("image_id") not in images:
            raise ValueError(f"{where}: image_id {a.get('image_id')!r} is not in images")
        if a.get("category_id") not in label_of:
            raise ValueError(f"{where}: category_id {a.get('category_id')!r} is not in categories")
        bbox = a.get("bbox")
        if not (isinstance(bbox, list) and len(bbox) == 4 and all(isinstance(v, (int, float)) for v in bbox)
                and all(math.isfinite(v) for v in bbox)):
            raise ValueError(f"{where}: bbox must be [x, y, width, height], got {bbox!r}")
        if a.get("iscrowd", 0):
            continue
        im = images[a["image_id"]]
        x, y, w, h = bbox
        x1, y1, x2, y2 = max(0.0, x), max(0.0, y), min(float(im.width), x + w), min(float(im.height), y + h)
        if x2 - x1 < 1 or y2 - y1 < 1:
            dropped += 1
            continue
        boxes[a["image_id"]].append([x1, y1, x2, y2])
        labels[a["image_id"]].append(label_of[a["category_id"]])
    for k, s in images.items():
        if boxes[k]:
            s.boxes, s.labels = np.asarray(boxes[k], np.float32), np.asarray(labels[k], np.int64)
    if dropped:
        print(f"{path}: {dropped} boxes with no area left out")
    return sorted(images.values(), key=lambda s: s.path), class_names


def split(samples: list[Sample], fraction: float, seed: int) -> tuple[list[Sample], list[Sample]]:
    """A seeded held-out part of about `fraction` of the images (at least one when fraction > 0)."""
    n_val = 0 if fraction <= 0 else max(1, round(len(samples) * fraction))
    if n_val >= len(samples):
        raise ValueError(f"--val-fraction {fraction} leaves no training images out of {len(samples)}")
    order = np.random.default_rng(seed).permutation(len(samples))
    val = set(order[:n_val].tolist())
    return [s for i, s in enumerate(samples) if i not in val], [s for i, s in enumerate(samples) if i in val]


class DetectionDataset(Dataset):
    """(index, flip) -> (3, H, W) float image in [0, 1] and its target {boxes (N, 4), labels (N,)}."""

    def __init__(self, samples: list[Sample]):
        self.samples = samples

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, key):
        i, flip = key if isinstance(key, tuple) else (key, False)
        s = self.samples[i]
        try:
            rgb = decode_image(s.path)
        except ImageError as e:
            raise ValueError(f"{s.path}: {e}") from None
        if rgb.shape[:2] != (s.height, s.width):  # boxes refer to the upright image of the json's size
            raise ValueError(f"{s.path}: the json says {s.width}x{s.height}, the (upright) image is "
                             f"{rgb.shape[1]}x{rgb.shape[0]}")
        image, boxes = to_tensor(rgb), torch.from_numpy(s.boxes.copy())
        if flip:
            image = image.flip(-1)
            boxes[:, [0, 2]] = s.width - boxes[:, [2, 0]]
        return image, {"boxes": boxes, "labels": torch.from_numpy(s.labels.copy())}


def _collate(batch):
    return tuple(zip(*batch, strict=True))


def epoch_batches(n: int, batch_size: int, epoch: int, seed: int, flip: bool) -> list[list[tuple[int, bool]]]:
    """The epoch's batches of (index, flip): a function of (seed, epoch) only, so a resumed run sees the
    same order and flips as an uninterrupted one. The last partial batch is dropped (as torchvision)."""
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g).tolist()
    flips = (torch.rand(n, generator=g) < 0.5).tolist() if flip else [False] * n
    steps = max(1, n // batch_size)
    return [[(i, bool(flips[i])) for i in order[k * batch_size:(k + 1) * batch_size]] for k in range(steps)]


# ----------------------------------------------------------------------------- model


def build_trainable(cfg: FinetuneConfig, num_classes: int) -> tuple[torch.nn.Module, str]:
    """The builder's model started from cfg.weights, with a box predictor for num_classes (background
    included). Returns the model and a description of the start."""
    if cfg.detector not in BUILDERS:
        raise ValueError(f"unknown detector {cfg.detector!r}; choose one of {', '.join(BUILDERS)}")
    builder, enum = BUILDERS[cfg.detector]
    kwargs = dict(cfg.extra)
    if cfg.min_size is not None:
        kwargs["min_size"] = cfg.min_size
    if cfg.max_size is not None:
        kwargs["max_size"] = cfg.max_size
    torch.manual_seed(cfg.seed)
    source = cfg.weights
    if source.lower() == "none":
        return builder(weights=None, weights_backbone=None, num_classes=num_classes, **kwargs), "none"
    if os.path.exists(source):
        state, meta = read_checkpoint(source)
        if meta is not None and meta["arch"] != cfg.detector:
            raise ValueError(f"{source}: a {meta['arch']} checkpoint, not {cfg.detector}")
        key = "roi_heads.box_predictor.cls_score.weight"
        if key not in state:
            raise ValueError(f"{source}: not a Faster R-CNN state dict (no {key})")
        model = builder(weights=None, weights_backbone=None, num_classes=int(state[key].shape[0]), **kwargs)
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            raise ValueError(f"{source}: not a state dict for {cfg.detector}: {e}") from None
        source = os.path.abspath(source)
    else:
        tv = _torchvision_weights(enum, source)
        if tv is None:
            names = ", ".join(["DEFAULT", *enum.__members__]) if enum is not None else "none"
            raise ValueError(f"--weights {source!r}: not 'none', not a file, and not a weights name of "
                             f"{cfg.detector} ({names})")
        model = builder(weights=tv, **kwargs)  # downloads to the torch cache once
        source = f"{enum.__name__}.{tv.name}"
    predictor = model.roi_heads.box_predictor
    if predictor.cls_score.out_features != num_classes:  # a new head for the new classes
        model.roi_heads.box_predictor = FastRCNNPredictor(predictor.cls_score.in_features, num_classes)
    return model, source


def lr_factor(step: int, epoch: int, warmup_steps: int, lr_steps: list[int]) -> float:
    """torchvision's schedule: linear warmup from 0.001 over the first warmup_steps steps, then x0.1 at
    each milestone epoch."""
    warm = 1.0 if step >= warmup_steps else 0.001 + (1 - 0.001) * step / warmup_steps
    return warm * 0.1 ** sum(epoch >= m for m in lr_steps)


# ----------------------------------------------------------------------------- evaluation


@torch.inference_mode()
def evaluate(model, samples: list[Sample], device, batch_size: int = 4, iou: float = 0.5) -> dict:
    """Held-out figures of model(images) (its default score threshold and detections per image):
    recall: the fraction of ground-truth boxes found by a detection of their class with IoU >= iou;
    map50: mean over classes of average precision at IoU >= iou (all-point interpolated, VOC style)."""
    model.eval()
    ds = DetectionDataset(samples)
    per_class: dict[int, list] = {}  # label -> [(score, is_true_positive)]
    gt_count: dict[int, int] = {}
    found = total = 0
    for k in range(0, len(samples), batch_size):
        items = [ds[i] for i in range(k, min(k + batch_size, len(samples)))]
        outs = model([im.to(device) for im, _ in items])
        for (_, t), o in zip(items, outs, strict=True):
            gt_b, gt_l = t["boxes"], t["labels"]
            boxes, scores, labels = o["boxes"].cpu(), o["scores"].cpu(), o["labels"].cpu()
            total += len(gt_l)
            for c in gt_l.tolist():
                gt_count[c] = gt_count.get(c, 0) + 1
            ious = box_iou(boxes, gt_b) if len(gt_b) and len(boxes) else torch.zeros(len(boxes), len(gt_b))
            same = labels[:, None] == gt_l[None, :]
            hit = (ious >= iou) & same  # (detections, gt)
            found += int(hit.any(0).sum())
            taken = torch.zeros(len(gt_l), dtype=torch.bool)
            for d in torch.argsort(scores, descending=True).tolist():  # greedy matching, best score first
                cand = torch.where(hit[d] & ~taken, ious[d], torch.tensor(-1.0))
                j = int(cand.argmax()) if len(gt_l) else -1
                tp = j >= 0 and float(cand[j]) >= iou
                if tp:
                    taken[j] = True
                per_class.setdefault(int(labels[d]), []).append((float(scores[d]), tp))
    aps = []
    for c, n in gt_count.items():
        dets = sorted(per_class.get(c, []), key=lambda x: -x[0])
        tp = np.cumsum([d[1] for d in dets]) if dets else np.zeros(0)
        prec = tp / np.arange(1, len(dets) + 1) if dets else np.zeros(0)
        rec = tp / n if dets else np.zeros(0)
        mrec, mpre = np.r_[0.0, rec, 1.0], np.r_[0.0, prec, 0.0]
        mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # precision envelope
        aps.append(float(np.sum((mrec[1:] - mrec[:-1]) * mpre[1:])))
    return {"recall50": found / total if total else 0.0, "map50": float(np.mean(aps)) if aps else 0.0,
            "images": len(samples), "boxes": total}


# ----------------------------------------------------------------------------- checkpoints


def save_atomic(obj: dict, path: str) -> None:
    """Write to a temp file, fsync, rename: a crash leaves the old file or the new one, never half."""
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def export_dict(model, class_names: list[str], arch: str, source: str, figures: dict | None) -> dict:
    """What regionbert-extract loads: the state dict with its builder, sizes and class names."""
    t = model.transform
    return {"format": CHECKPOINT_FORMAT, "version": 1, "arch": arch, "class_names": list(class_names),
            "min_size": int(t.min_size[-1]), "max_size": int(t.max_size), "start": source,
            "heldout": figures or {}, "model": {k: v.detach().cpu() for k, v in model.state_dict().items()}}


def _resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ----------------------------------------------------------------------------- training


@dataclass
class Result:
    out: str
    detector_file: str
    steps: int
    epochs: int
    heldout: dict
    seconds: float
    images_per_second: float


def finetune(cfg: FinetuneConfig) -> Result:
    samples, class_names = read_coco(cfg.annotations, cfg.images)
    if cfg.val_annotations:
        train, _ = samples, None
        val, _ = read_coco(cfg.val_annotations, cfg.images, class_names)
    else:
        train, val = split(samples, cfg.val_fraction, cfg.seed)
    if len(train) < cfg.batch_size:
        raise ValueError(f"{cfg.annotations}: {len(train)} training images, fewer than --batch-size {cfg.batch_size}")
    device = _resolve_device(cfg.device)
    model, source = build_trainable(cfg, len(class_names))
    model.to(device)
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        lr = cfg.lr if cfg.lr is not None else 0.02 * cfg.batch_size / 16
        opt = torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "adamw":
        lr = cfg.lr if cfg.lr is not None else 1e-3
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=cfg.weight_decay)
    else:
        raise ValueError(f"--optimizer must be sgd or adamw, got {cfg.optimizer!r}")
    steps_per_epoch = max(1, len(train) // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    warmup = cfg.warmup_steps if cfg.warmup_steps is not None else max(1, min(1000, steps_per_epoch - 1))
    lr_steps = cfg.lr_steps if cfg.lr_steps is not None else sorted({round(cfg.epochs * 16 / 26),
                                                                     round(cfg.epochs * 22 / 26)})
    os.makedirs(cfg.out, exist_ok=True)
    ckpt_path, det_path = os.path.join(cfg.out, "checkpoint.pt"), os.path.join(cfg.out, "detector.pt")
    log_path = os.path.join(cfg.out, "log.jsonl")
    settings = {"annotations": os.path.abspath(cfg.annotations), "detector": cfg.detector, "start": source,
                "train_images": len(train), "val_images": len(val), "batch_size": cfg.batch_size,
                "optimizer": cfg.optimizer, "lr": lr,
                "epochs": cfg.epochs, "lr_steps": lr_steps, "warmup_steps": warmup, "seed": cfg.seed}
    step, heldout = 0, {}
    if os.path.exists(ckpt_path):
        if not cfg.resume:
            raise ValueError(f"{ckpt_path} exists: pass --resume to continue it, or choose another --out")
        ck = torch.load(ckpt_path, map_location="cpu", weights_only=True)
        if ck.get("class_names") != class_names or ck.get("arch") != cfg.detector:
            raise ValueError(f"{ckpt_path}: a run of {ck.get('arch')} on other classes; not resumable here")
        for k in ("train_images", "batch_size", "epochs", "seed", "optimizer"):
            if ck["settings"].get(k, "sgd" if k == "optimizer" else None) != settings[k]:  # sgd: before the option
                raise ValueError(f"{ckpt_path}: {k} was {ck['settings'].get(k)!r}, now {settings[k]!r}")
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        step, heldout = int(ck["step"]), dict(ck.get("heldout", {}))
        torch.set_rng_state(ck["rng"]["torch"])
        if device.type == "cuda" and ck["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(ck["rng"]["cuda"])
        print(f"resuming {ckpt_path} at step {step} of {total}")
    elif cfg.resume:
        print(f"no {ckpt_path} yet: starting")

    def checkpoint():
        save_atomic({"format": CHECKPOINT_FORMAT, "version": 1, "arch": cfg.detector, "class_names": class_names,
                     "min_size": int(model.transform.min_size[-1]), "max_size": int(model.transform.max_size),
                     "settings": settings, "step": step, "epoch": step // steps_per_epoch, "heldout": heldout,
                     "model": model.state_dict(), "optimizer": opt.state_dict(),
                     "rng": {"torch": torch.get_rng_state(),
                             "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}}, ckpt_path)

    ds = DetectionDataset(train)
    start, seen = time.perf_counter(), 0
    stopped = False
    with open(log_path, "a") as log, tqdm(total=total, initial=step, unit="step", disable=not cfg.progress,
                                          desc="finetune", dynamic_ncols=True) as bar:
        if step == 0:
            log.write(json.dumps({"settings": settings, "class_names": class_names}) + "\n")
        while step < total and not stopped:
            epoch, done_in_epoch = divmod(step, steps_per_epoch)
            batches = epoch_batches(len(train), cfg.batch_size, epoch, cfg.seed, cfg.flip)[done_in_epoch:]
            loader = DataLoader(ds, batch_sampler=batches, num_workers=cfg.workers, collate_fn=_collate,
                                generator=torch.Generator())  # its seed draw must not move the global RNG
            model.train()
            for images, targets in loader:
                for g in opt.param_groups:
                    g["lr"] = lr * lr_factor(step, epoch, warmup, lr_steps)
                losses = model([im.to(device) for im in images],
                               [{k: v.to(device) for k, v in t.items()} for t in targets])
                loss = sum(losses.values())
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"step {step}: loss is {float(loss)} "
                                             f"({ {k: float(v) for k, v in losses.items()} }); nothing saved")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                seen += len(images)
                rate = seen / (time.perf_counter() - start)
                bar.update(1)
                bar.set_postfix(loss=f"{float(loss.detach()):.3f}", img_s=f"{rate:.1f}", refresh=False)
                if step % max(1, steps_per_epoch // 2) == 0 or step == total:
                    log.write(json.dumps({"step": step, "epoch": epoch, "loss": round(float(loss.detach()), 5),
                                          "lr": opt.param_groups[0]["lr"], "images_per_second": round(rate, 2),
                                          **{k: round(float(v.detach()), 5) for k, v in losses.items()}}) + "\n")
                if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step % steps_per_epoch:
                    checkpoint()
                if cfg.stop_after is not None and step >= cfg.stop_after:
                    stopped = True
                    break
            if stopped:
                break
            if val and ((epoch + 1) % cfg.eval_every == 0 or step == total):
                heldout = {"epoch": epoch + 1, "step": step, **evaluate(model, val, device)}
                log.write(json.dumps({"eval": heldout}) + "\n")
                log.flush()
                bar.write(f"epoch {epoch + 1}: held-out recall@0.5 {heldout['recall50']:.3f}, "
                          f"mAP@0.5 {heldout['map50']:.3f} ({heldout['boxes']} boxes, {heldout['images']} images)")
            checkpoint()
    if stopped:
        checkpoint()
    seconds = time.perf_counter() - start
    if step >= total:
        save_atomic(export_dict(model, class_names, cfg.detector, source, heldout), det_path)
    return Result(out=cfg.out, detector_file=det_path if step >= total else "", steps=step, epochs=cfg.epochs,
                  heldout=heldout, seconds=seconds, images_per_second=seen / seconds if seconds else 0.0)


def result_dict(r: Result) -> dict:
    return asdict(r) | {"seconds": round(r.seconds, 1), "images_per_second": round(r.images_per_second, 2)}
