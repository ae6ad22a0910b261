"""`regionbert-quickstart`: sample images and captions -> fine-tune a detector on their boxes -> extract ->
verify -> picture -> pretrain -> evaluate -> summary, on a CPU in a few minutes. Every step is the real
one (the same code as regionbert-detector, regionbert-extract and regionbert-pretrain), on small settings."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from regionbert.data import ShardReader, verify_shard
from regionbert.data.show import draw_record
from regionbert.extract.detector import DetectorSpec
from regionbert.extract.finetune import FinetuneConfig, finetune
from regionbert.extract.pipeline import ExtractConfig, run
from regionbert.extract.regions import BoxPolicy

from .sample_data import write_sample_data

STEPS = 7


def _step(n: int, text: str) -> None:
    print(f"\n[{n}/{STEPS}] {text}", flush=True)


def pretrain_args(data: dict, shard_dir: str, run_dir: str, steps: int) -> list[str]:
    """regionbert-pretrain arguments for a tiny model on the sample data."""
    sets = {"data.shards": [shard_dir], "data.captions": data["captions"], "data.tokenizer": data["vocab"],
            "data.split": "train", "data.num_workers": 1, "data.token_budget": 2048,
            "model.hidden_size": 128, "model.num_layers": 2, "model.num_heads": 4, "model.intermediate_size": 512,
            "model.max_text_len": 24, "optim.steps": steps, "optim.lr": 1e-3, "optim.warmup_steps": steps // 10,
            "run.log_every": max(1, steps // 6), "run.checkpoint_every": 0, "run.out": run_dir,
            "data.eval_split": "val", "run.eval_every": max(1, steps // 3)}
    return [a for k, v in sets.items() for a in ("--set", f"{k}={json.dumps(v)}")]


def final_eval(run_dir: str) -> dict:
    """The run's last held-out evaluation (accuracies and retrieval recall), from its log.jsonl."""
    evals = []
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "eval" in rec:
                evals.append(rec["eval"])
    if not evals:
        raise RuntimeError(f"{run_dir}/log.jsonl holds no evaluation")
    return {k: v for k, v in evals[-1].items() if k.endswith("_acc") or "_r" in k or k == "retrieval_images"}


def describe(metrics: dict, detector: dict, num_val_images: int, num_classes: int) -> list[str]:
    """The held-out figures in words, each next to what guessing would get."""
    lines = []
    if detector:
        lines.append(f"The detector finds {detector['recall50']:.0%} of the held-out shapes with the right name "
                     f"(colour and shape, one of {num_classes}) and a box overlapping the true one by at least "
                     f"half (mAP@0.5 {detector['map50']:.2f}).")
    if "itm_acc" in metrics:
        lines.append(f"Shown a held-out image with a caption, half of them of another image, the model says "
                     f"whether the caption describes the image {metrics['itm_acc']:.0%} of the time "
                     f"(guessing: 50%).")
    chance = 1 / max(1, num_val_images)
    if "t2i_r1" in metrics:
        lines.append(f"Given a held-out caption, it ranks the right image first among {num_val_images} "
                     f"{metrics['t2i_r1']:.0%} of the time, {metrics['t2i_r1'] / chance:.1f}x guessing "
                     f"({chance:.1%}); given an image, one of its own captions comes first "
                     f"{metrics['i2t_r1']:.0%} of the time ({metrics['i2t_r1'] / chance:.1f}x guessing).")
    mrc = metrics.get("mrc_kl_acc", metrics.get("mrc_acc"))
    if mrc is not None:
        lines.append(f"With a region hidden, it names the hidden region's class from the rest of the image and "
                     f"the caption {mrc:.0%} of the time (guessing one of {num_classes}: "
                     f"{1 / num_classes:.0%}).")
    if "mlm_acc" in metrics:
        lines.append(f"It fills in a hidden caption word {metrics['mlm_acc']:.0%} of the time.")
    return lines


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="regionbert-quickstart", description=__doc__)
    p.add_argument("--out", default="runs/quickstart", help="folder for everything this writes")
    p.add_argument("--images", type=int, default=160, help="sample images to draw (a quarter held out)")
    p.add_argument("--steps", type=int, default=600, help="pretraining steps (the default task mix)")
    p.add_argument("--detector", default="tiny_shapes",
                   help="builder to fine-tune on the sample boxes (tiny_shapes learns from scratch in a minute)")
    p.add_argument("--weights", default="none",
                   help="the detector's starting point: 'none' (random, offline) or a torchvision weights name "
                        "such as DEFAULT (COCO; downloads)")
    p.add_argument("--detector-epochs", type=int, default=14, help="fine-tuning epochs over the training images "
                   "(lr x0.1 for the last two)")
    p.add_argument("--workers", type=int, default=1)
    args = p.parse_args(argv)
    start = time.perf_counter()
    out = os.path.abspath(args.out)
    if any(os.path.exists(os.path.join(out, d)) for d in ("detector", "shards", "run")):
        print(f"regionbert-quickstart: {out} holds an earlier run; remove it or pass --out", file=sys.stderr)
        return 2

    _step(1, f"drawing {args.images} sample images with captions and object boxes into {out}/data")
    data = write_sample_data(os.path.join(out, "data"), args.images)
    print(f"  {data['num_images']} images, {data['num_captions']} captions, vocabulary {data['vocab']}, "
          f"boxes {data['boxes_train']} (COCO format)")

    det_dir = os.path.join(out, "detector")
    lr_step = max(1, args.detector_epochs - 2)  # torchvision's 16/26 decays too early for so short a run
    _step(2, f"fine-tuning a {args.detector} detector on the training images' boxes (from weights: {args.weights})")
    print(f"  the same as: regionbert-detector finetune {data['boxes_train']} --val {data['boxes_val']} "
          f"--images {data['images']} -o {det_dir} --detector {args.detector} --weights {args.weights} "
          f"--epochs {args.detector_epochs} --batch-size 8 --lr 0.05 --lr-steps {lr_step}")
    ft = finetune(FinetuneConfig(annotations=data["boxes_train"], val_annotations=data["boxes_val"],
                                 images=data["images"], out=det_dir, detector=args.detector, weights=args.weights,
                                 epochs=args.detector_epochs, batch_size=8, lr=0.05, lr_steps=[lr_step],
                                 eval_every=args.detector_epochs, workers=args.workers))
    det = ft.heldout
    print(f"  held-out: recall@0.5 {det['recall50']:.2f}, mAP@0.5 {det['map50']:.2f} "
          f"({det['boxes']} shapes in {det['images']} images), {ft.seconds:.0f}s")

    _step(3, f"extracting regions with the fine-tuned detector ({ft.detector_file})")
    cfg = ExtractConfig(images=data["images"], out=os.path.join(out, "shards"),
                        detector=DetectorSpec(args.detector, ft.detector_file),
                        policy=BoxPolicy("butd", min_boxes=4, max_boxes=16), batch_size=8, workers=args.workers,
                        progress=False)
    summary = run(cfg)
    print(f"  {summary.written} images -> {summary.shard} ({summary.images_per_second:.1f} images/s), "
          f"{summary.failed} failed")

    _step(4, "verifying the shard (every record decoded, every checksum checked)")
    report = verify_shard(summary.shard)
    print(f"  {'OK' if report.ok else 'FAILED'}: {report.checked} records, {len(report.bad)} bad, "
          f"{report.content_hash}")
    if not report.ok:
        return 1

    _step(5, "drawing a held-out image with its detected boxes, class names and scores")
    reader = ShardReader(summary.shard)
    class_names = reader.meta["class_names"]
    rec = reader[len(reader) - 1]  # the last image is held out: the detector never saw it
    picture = os.path.join(out, "example_regions.png")
    confident = int((rec.class_probs[:, 1:].max(1) >= 0.3).sum())  # the detections, not the padding boxes
    draw_record(rec, os.path.join(data["images"], rec.id + ".jpg"), class_names,
                top=min(6, max(1, confident))).save(picture)
    print(f"  {picture}")

    _step(6, f"pretraining a tiny model for {args.steps} steps (the default mix: MLM, ITM + WRA, MRFR, MRC-kl)")
    from regionbert.train.cli import main as pretrain

    run_dir = os.path.join(out, "run")
    if pretrain(pretrain_args(data, os.path.dirname(summary.shard), run_dir, args.steps)) != 0:
        return 1

    _step(7, "held-out evaluation (the held-out quarter's captions and images, never trained on)")
    metrics = final_eval(run_dir)
    for k, v in sorted(metrics.items()):
        print(f"  {k:10s} {v:.3f}")

    num_val = int(metrics.get("retrieval_images", 0)) or int(args.images * 0.25)
    words = describe(metrics, det, num_val, len(class_names) - 1)
    curves = os.path.join(run_dir, "curves.png")
    print(f"\nquickstart done in {time.perf_counter() - start:.0f}s:")
    print(f"  detector   {ft.detector_file}")
    print(f"  shard      {summary.shard} ({report.checked} records)")
    print(f"  picture    {picture}")
    print(f"  run        {run_dir} (config.json, log.jsonl, checkpoint.pt, curves.png)")
    if os.path.exists(curves):
        print(f"  curves     {curves}")
    print("\nWhat was learned, on images and captions held out from training:")
    for line in words:
        print("  - " + line)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"detector": ft.detector_file, "detector_heldout": det, "shard": summary.shard,
                   "records": report.checked, "failed": summary.failed, "content_hash": report.content_hash,
                   "picture": picture, "run": run_dir, "eval": metrics, "retrieval_images": num_val,
                   "chance": {"itm_acc": 0.5, "t2i_r1": 1 / num_val, "i2t_r1": 1 / num_val,
                              "mrc_acc": 1 / (len(class_names) - 1)},
                   "in_words": words, "detector_weights": args.weights,
                   "seconds": round(time.perf_counter() - start, 1)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
