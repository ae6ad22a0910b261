"""Trainer benchmark on CPU: how long a tiny model waits for data, and how much of a batch is padding.

    python bench/bench_train.py                       # 4000 synthetic images, 200 steps, 1 loader worker

1. Padding: one epoch of batches under the same token budget, from the token-bucket sampler (sorted
   buckets) and from plain random batches; the share of the packed text + regions that is padding.
   Also the padding of the batches actually trained on (ITM negatives change a pair's box count).
2. Data wait: a tiny model (2 layers, hidden 128) trains with `regionbert.train` as the command does;
   the share of step time spent waiting for the next batch (after the first report, which includes
   starting the workers).

The shards are shaped like extractor output (10-100 boxes, 1024-d float16 features, 91 classes);
captions name each image's objects. Results go to bench/out/train/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the synthetic caption writer the tests use

from train_synth import write_dataset  # noqa: E402

from regionbert.train.config import load_config  # noqa: E402
from regionbert.train.data import Pairs, TokenBucketSampler  # noqa: E402
from regionbert.train.run import run  # noqa: E402
from regionbert.train.text import Text  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--token-budget", type=int, default=4096)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--out", default=os.path.join(HERE, "out", "train"))
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    data_dir = os.path.join(args.out, f"data-{args.images}")
    if not os.path.exists(os.path.join(data_dir, "captions.csv")):
        shutil.rmtree(data_dir, ignore_errors=True)
        t = time.perf_counter()
        write_dataset(data_dir, args.images, 0, feature_dim=1024, min_boxes=10, max_boxes=100, seed=0)
        print(f"wrote {args.images} synthetic images in {time.perf_counter() - t:.1f}s")
    paths = {"shards": os.path.join(data_dir, "shard-00000"), "captions": os.path.join(data_dir, "captions.csv"),
             "tokenizer": os.path.join(data_dir, "vocab.txt")}
    cfg = load_config(None, [f"data.{k}={v}" for k, v in paths.items()] + [
        "model.hidden_size=128", "model.num_layers=2", "model.num_heads=4", "model.intermediate_size=512",
        "model.max_text_len=40", f"data.token_budget={args.token_budget}", f"data.num_workers={args.workers}",
        "data.split=null", f"optim.steps={args.steps}", "optim.warmup_steps=20", "optim.lr=1e-3",
        f"run.log_every={max(1, args.steps // 10)}", "run.checkpoint_every=0",
        f"run.out={os.path.join(args.out, 'run')}", "run.device=cpu"])

    from regionbert.data import ShardSet

    pairs = Pairs(ShardSet(paths["shards"]), paths["captions"], Text(paths["tokenizer"], 40), None)
    bucketed = TokenBucketSampler(pairs.lengths, args.token_budget, seed=0)
    plain = TokenBucketSampler(pairs.lengths, args.token_budget, sort=False, seed=0)
    n_batches = [len(s.batches(0)) for s in (bucketed, plain)]
    results = {
        "pairs": len(pairs), "images": pairs.num_images, "token_budget": args.token_budget,
        "length_mean": float(np.mean(pairs.lengths)), "length_min": int(pairs.lengths.min()),
        "length_max": int(pairs.lengths.max()),
        "padding_token_bucket": bucketed.padding_fraction(0), "padding_random_batches": plain.padding_fraction(0),
        "batches_per_epoch_token_bucket": n_batches[0], "batches_per_epoch_random": n_batches[1],
    }
    print(f"padding, one epoch: token-bucket {100 * results['padding_token_bucket']:.1f}% "
          f"({n_batches[0]} batches), random batches {100 * results['padding_random_batches']:.1f}% "
          f"({n_batches[1]} batches)")

    log = os.path.join(cfg.run.out, "log.jsonl")
    if os.path.exists(log):
        os.remove(log)
    t = time.perf_counter()
    run(cfg)
    reports = [json.loads(line) for line in open(log)][1:]  # the first includes starting the workers
    weights = np.array([r["samples_per_s"] for r in reports])
    results.update(
        train_seconds=time.perf_counter() - t, steps=args.steps, workers=args.workers,
        torch_threads=torch.get_num_threads(),
        data_wait=float(np.mean([r["data_wait"] for r in reports])),
        data_wait_max=float(max(r["data_wait"] for r in reports)),
        samples_per_s=float(weights.mean()),
        padding_trained_batches=float(np.mean([r["pad_fraction"] for r in reports])),
        machine=f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
    )
    print(f"data wait {100 * results['data_wait']:.1f}% of step time (max {100 * results['data_wait_max']:.1f}% "
          f"per report), {results['samples_per_s']:.0f} samples/s, padding in trained batches "
          f"{100 * results['padding_trained_batches']:.1f}%")
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
