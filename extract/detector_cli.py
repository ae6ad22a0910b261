"""`regionbert-detector`: adapt a torchvision Faster R-CNN to your own classes.

  regionbert-detector finetune annotations.json --images DIR -o OUT [--detector ...] [--weights ...]

then `regionbert-extract IMAGES -o SHARDS --weights OUT/detector.pt` extracts with it (its builder,
sizes and class names come with the file; the class names land in the shard metadata)."""

from __future__ import annotations

import argparse
import json
import sys

from .finetune import FinetuneConfig, finetune, result_dict
from .torchvision_rcnn import BUILDERS


def finetune_parser(sub) -> None:
    p = sub.add_parser("finetune", help="fine-tune on a COCO-format json + image folder",
                       description=__import__("regionbert.extract.finetune", fromlist=["x"]).__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("annotations", help="COCO-format json: images, annotations (bbox [x, y, w, h]), categories")
    p.add_argument("--images", required=True, help="folder the json's file_name entries are relative to")
    p.add_argument("-o", "--out", required=True, help="run folder: checkpoint.pt, detector.pt, log.jsonl")
    p.add_argument("--detector", default="resnet50_fpn_v2", choices=list(BUILDERS))
    p.add_argument("--weights", default="DEFAULT",
                   help="start: a torchvision weights name (DEFAULT = COCO; downloads once), a local checkpoint, "
                        "or 'none' (random init); the box predictor is replaced for your class count")
    p.add_argument("--val", dest="val_annotations", help="held-out COCO json (default: --val-fraction of the images)")
    p.add_argument("--val-fraction", type=float, default=0.1)
    p.add_argument("--epochs", type=int, default=26)
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--lr", type=float, help="default: 0.02 x batch size / 16 (torchvision's recipe); adamw: 1e-3")
    p.add_argument("--optimizer", choices=["sgd", "adamw"], default="sgd",
                   help="sgd: torchvision's recipe (from COCO weights); adamw: a small detector from random weights")
    p.add_argument("--lr-steps", type=int, nargs="+", help="epochs where lr drops 10x (default: 16/26, 22/26 of them)")
    p.add_argument("--warmup-steps", type=int, help="default: min(1000, steps per epoch - 1)")
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--weight-decay", type=float, default=1e-4)
    p.add_argument("--min-size", type=int, help="resize shorter side to this (default: the builder's)")
    p.add_argument("--max-size", type=int, help="cap on the longer side (default: the builder's)")
    p.add_argument("--no-flip", dest="flip", action="store_false", help="no random horizontal flips")
    p.add_argument("--eval-every", type=int, default=1, help="epochs between held-out evaluations")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps (0: at the end of each epoch)")
    p.add_argument("--resume", action="store_true", help="continue OUT/checkpoint.pt")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="image decoding processes")
    p.add_argument("--device", default="auto")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="regionbert-detector", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    finetune_parser(sub)
    a = parser.parse_args(argv)
    for name in ("epochs", "batch_size", "eval_every"):
        if getattr(a, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if not 0 <= a.val_fraction < 1:
        parser.error("--val-fraction must be in [0, 1)")
    cfg = FinetuneConfig(annotations=a.annotations, images=a.images, out=a.out, detector=a.detector,
                         weights=a.weights, val_annotations=a.val_annotations, val_fraction=a.val_fraction,
                         epochs=a.epochs, batch_size=a.batch_size, lr=a.lr, optimizer=a.optimizer, momentum=a.momentum,
                         weight_decay=a.weight_decay, lr_steps=a.lr_steps, warmup_steps=a.warmup_steps,
                         min_size=a.min_size, max_size=a.max_size, flip=a.flip, eval_every=a.eval_every,
                         checkpoint_every=a.checkpoint_every, resume=a.resume, seed=a.seed, workers=a.workers,
                         device=a.device, progress=not a.quiet)
    try:
        r = finetune(cfg)
    except (ValueError, FloatingPointError) as e:
        print(f"regionbert-detector: error: {e}", file=sys.stderr)
        return 2
    h = r.heldout
    if h:
        print(f"held-out: recall@0.5 {h['recall50']:.3f}, mAP@0.5 {h['map50']:.3f} "
              f"({h['boxes']} boxes in {h['images']} images)")
    print(f"{r.detector_file}: for regionbert-extract --weights ({r.steps} steps, {r.seconds:.0f}s, "
          f"{r.images_per_second:.1f} images/s)")
    print(json.dumps(result_dict(r)), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
