"""`regionbert-quickstart`: sample images and captions -> extract -> verify -> picture -> pretrain ->
evaluate -> summary, on a CPU in a few minutes. Every step is the real one, on small settings."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

from regionbert.data import ShardReader, verify_shard
from regionbert.data.show import draw_record
from regionbert.extract.detector import DetectorSpec
from regionbert.extract.pipeline import ExtractConfig, run
from regionbert.extract.regions import BoxPolicy

from .sample_data import write_sample_data


def _step(n: int, text: str) -> None:
    print(f"\n[{n}/6] {text}", flush=True)


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
    return {k: v for k, v in evals[-1].items() if k.endswith("_acc") or "_r" in k}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="regionbert-quickstart", description=__doc__)
    p.add_argument("--out", default="runs/quickstart", help="folder for everything this writes")
    p.add_argument("--images", type=int, default=96, help="sample images to draw (a quarter held out)")
    p.add_argument("--steps", type=int, default=300, help="pretraining steps")
    p.add_argument("--detector", default="mobilenet_v3_large_320_fpn")
    p.add_argument("--weights", default="none",
                   help="'none' (random, offline), or a torchvision weights name such as DEFAULT (downloads)")
    p.add_argument("--workers", type=int, default=2)
    args = p.parse_args(argv)
    start = time.perf_counter()
    out = os.path.abspath(args.out)
    if os.path.exists(os.path.join(out, "shards")) or os.path.exists(os.path.join(out, "run")):
        print(f"regionbert-quickstart: {out} holds an earlier run; remove it or pass --out", file=sys.stderr)
        return 2

    _step(1, f"drawing {args.images} sample images with captions into {out}/data")
    data = write_sample_data(os.path.join(out, "data"), args.images)
    print(f"  {data['num_images']} images, {data['num_captions']} captions, vocabulary {data['vocab']}")

    _step(2, f"extracting regions with {args.detector} (weights: {args.weights})")
    if args.weights.lower() == "none":
        print("  NOTE: the detector has RANDOM weights (no network here): boxes, features and classes are not "
              "meaningful.\n        Pass --weights DEFAULT on a machine that can download torchvision's COCO "
              "weights.")
    cfg = ExtractConfig(images=data["images"], out=os.path.join(out, "shards"),
                        detector=DetectorSpec(args.detector, args.weights, min_size=224, max_size=320),
                        policy=BoxPolicy("butd", min_boxes=10, max_boxes=36), batch_size=8, workers=args.workers)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="detector .* has RANDOM weights")  # said above, once
        summary = run(cfg)
    print(f"  {summary.written} images -> {summary.shard} ({summary.images_per_second:.1f} images/s), "
          f"{summary.failed} failed")

    _step(3, "verifying the shard (every record decoded, every checksum checked)")
    report = verify_shard(summary.shard)
    print(f"  {'OK' if report.ok else 'FAILED'}: {report.checked} records, {len(report.bad)} bad, "
          f"{report.content_hash}")
    if not report.ok:
        return 1

    _step(4, "drawing one image with its stored boxes and top classes")
    reader = ShardReader(summary.shard)
    rec = reader[0]
    picture = os.path.join(out, "example_regions.png")
    draw_record(rec, os.path.join(data["images"], rec.id + ".jpg"), reader.meta["class_names"], top=12,
                meta=reader.meta).save(picture)  # names random weights on the picture
    print(f"  {picture}")

    _step(5, f"pretraining a tiny model for {args.steps} steps (MLM, ITM + WRA, MRFR, MRC-kl)")
    from regionbert.train.cli import main as pretrain

    run_dir = os.path.join(out, "run")
    if pretrain(pretrain_args(data, os.path.dirname(summary.shard), run_dir, args.steps)) != 0:
        return 1

    _step(6, "held-out evaluation (the run's last: the held-out quarter's captions and images)")
    metrics = final_eval(run_dir)
    for k, v in sorted(metrics.items()):
        print(f"  {k:10s} {v:.3f}")

    curves = os.path.join(run_dir, "curves.png")
    print(f"\nquickstart done in {time.perf_counter() - start:.0f}s:")
    print(f"  shard      {summary.shard} ({report.checked} records)")
    print(f"  picture    {picture}")
    print(f"  run        {run_dir} (config.json, log.jsonl, checkpoint.pt, curves.png)")
    if os.path.exists(curves):
        print(f"  curves     {curves}")
    print("  held-out   " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(metrics.items())))
    if args.weights.lower() == "none":
        print("  (random detector weights: the figures show the pipeline runs end to end, not a good model)")
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"shard": summary.shard, "records": report.checked, "failed": summary.failed,
                   "content_hash": report.content_hash, "picture": picture, "run": run_dir, "eval": metrics,
                   "detector_weights": args.weights, "seconds": round(time.perf_counter() - start, 1)}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
