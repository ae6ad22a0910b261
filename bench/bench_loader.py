"""The trainer's data path on one core, against the floor of just reading and copying the same records.

    python bench/bench_loader.py                  # 2000 images of 10-100 boxes, 2048-d float16; 100 batches

One process, one thread (torch.set_num_threads(1), num_workers=0), the default task mix and token
budget, on synthetic shards shaped like extractor output (regionbert.data.synth: 2048-d float16
features, 91 float16 class probabilities, 10-100 boxes) with two captions per image.

- loader: `build_data(cfg)` -> its DataLoader, batches exactly as the trainer receives them (on CPU;
  nothing moved to a device), for the first --batches batches of the task sampler's stream.
- before: the data path before issue 13 (tests/legacy_loader.py: float32 on the host, masking and
  padding one sample at a time) in a DataLoader over the same batches of keys.
- floor: the same records of the same batches (ITM negatives included), read through the same
  ShardSet with checksums on, their features, locations and class probabilities copied into a
  preallocated batch buffer of the shard's dtypes (float16 features and class probabilities, float32
  locations). No masking, no tokens, no tensors: what any loader must do at the least.

Passes alternate (loader, before, floor, loader, ...) so all see the same machine; the best pass of
each counts. Prints samples/s for each, and the ratios loader / floor and loader / before; --json
writes them. samples/s is by wall time; `per cpu-s` divides by the process's CPU time instead, which a
busy machine disturbs less (cpu/wall below 100% means the pass was descheduled).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the synthetic caption writer the tests use

import numpy as np  # noqa: E402
import torch  # noqa: E402
from legacy_loader import LegacyDataset, legacy_collate  # noqa: E402
from train_synth import write_dataset  # noqa: E402

from regionbert.train.config import load_config  # noqa: E402
from regionbert.train.run import build_data  # noqa: E402


def make_data(out: str, images: int, dim: int) -> dict:
    folder = os.path.join(out, f"data-{images}-{dim}")
    if not os.path.exists(os.path.join(folder, "captions.csv")):
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        write_dataset(folder, images, 0, feature_dim=dim, min_boxes=10, max_boxes=100, seed=0)
        print(f"wrote {images} synthetic images ({dim}-d) in {time.perf_counter() - t:.0f}s", flush=True)
    return {"shards": os.path.join(folder, "shard-00000"), "captions": os.path.join(folder, "captions.csv"),
            "tokenizer": os.path.join(folder, "vocab.txt")}


def loader_pass(loader, batches: int) -> int:
    """Samples in the first `batches` batches the loader yields (a fresh iterator: the same stream)."""
    n = 0
    for batch in itertools.islice(iter(loader), batches):
        n += len(batch["text_lens"])
    return n


def floor_pass(dataset, keys: list[list[tuple]], bufs) -> int:
    """Read every key's record (the image it shows) and copy its arrays into the preallocated buffers."""
    feats, locs, probs = bufs
    pool, image_of, shards, cap = dataset.pairs.pool, dataset.pairs.image, dataset.shards, dataset.max_regions
    n = 0
    for batch in keys:
        for b, (_, p, other, _) in enumerate(batch):
            rec = shards[int(pool[image_of[p] if other < 0 else other])]
            k = min(rec.num_boxes, cap)
            feats[b, :k] = rec.features[:k]
            locs[b, :k] = rec.loc7[:k]
            probs[b, :k] = rec.class_probs[:k]
        n += len(batch)
    return n


def timed(fn) -> tuple[int, float, float]:
    c, t = time.process_time(), time.perf_counter()
    n = fn()
    return n, time.perf_counter() - t, time.process_time() - c


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--batches", type=int, default=100, help="batches per timed pass")
    p.add_argument("--passes", type=int, default=3, help="timed passes of each (after one untimed pass each)")
    p.add_argument("--out", default=os.path.join(HERE, "out", "loader"))
    p.add_argument("--json", help="write the results here")
    p.add_argument("--skip-before", action="store_true", help="do not time the pre-issue-13 data path")
    args = p.parse_args()
    torch.set_num_threads(1)
    paths = make_data(args.out, args.images, args.dim)
    cfg = load_config(None, [f"data.{k}={v}" for k, v in paths.items()] + [
        "data.split=null", "data.num_workers=0", "run.device=cpu"])  # default token budget and task mix
    pairs, dataset, _, loader = build_data(cfg, None, num_workers=0)
    keys = list(itertools.islice(iter(loader.batch_sampler), args.batches))  # the loader's own stream
    biggest = max(len(b) for b in keys)
    C = len(dataset.shards.meta["class_names"])
    bufs = (np.zeros((biggest, cfg.data.max_regions, args.dim), np.float16),
            np.zeros((biggest, cfg.data.max_regions, 7), np.float32),
            np.zeros((biggest, cfg.data.max_regions, C), np.float16))
    tasks = {t: sum(b[0][0] == t for b in keys) for t in cfg.tasks.mix}
    print(f"{len(pairs)} captions of {pairs.num_images} images; {args.batches} batches of the default mix "
          f"({', '.join(f'{t} {n}' for t, n in tasks.items() if n)}), token budget {cfg.data.token_budget}, "
          f"{sum(map(len, keys))} samples per pass", flush=True)
    before = torch.utils.data.DataLoader(LegacyDataset(dataset), batch_sampler=loader.batch_sampler,
                                         collate_fn=legacy_collate, num_workers=0)
    runs = {"loader": lambda: loader_pass(loader, args.batches), "before": lambda: loader_pass(before, args.batches),
            "floor": lambda: floor_pass(dataset, keys, bufs)}
    if args.skip_before:
        del runs["before"]
    for fn in runs.values():  # warm the page cache and the allocator
        fn()
    best = {name: None for name in runs}
    for _ in range(args.passes):
        for name, fn in runs.items():
            n, wall, cpu = timed(fn)
            if best[name] is None or wall < best[name][1]:
                best[name] = (n, wall, cpu)
    results = {"images": pairs.num_images, "captions": len(pairs), "feature_dim": args.dim,
               "token_budget": cfg.data.token_budget, "batches": args.batches, "passes": args.passes,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"torch {torch.__version__}, numpy {np.__version__}"}
    for name, (n, wall, cpu) in best.items():
        results[f"{name}_samples_per_s"] = n / wall
        results[f"{name}_samples_per_cpu_s"] = n / cpu
        results[f"{name}_cpu_over_wall"] = cpu / wall
        print(f"{name:6s}: {n / wall:8,.0f} samples/s  ({1e6 * wall / n:6.1f} us/sample; {n / cpu:8,.0f} per cpu-s, "
              f"cpu/wall {100 * cpu / wall:.0f}%)")
    results["ratio"] = results["loader_samples_per_s"] / results["floor_samples_per_s"]
    results["ratio_cpu"] = results["loader_samples_per_cpu_s"] / results["floor_samples_per_cpu_s"]
    print(f"loader / floor: {results['ratio']:.2f} (by cpu time {results['ratio_cpu']:.2f})")
    if "before" in best:
        results["speedup"] = results["loader_samples_per_s"] / results["before_samples_per_s"]
        print(f"loader / before: {results['speedup']:.1f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
