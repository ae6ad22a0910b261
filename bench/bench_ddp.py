"""Distributed training on CPU: throughput of 1 vs 2 processes under torchrun (gloo), tiny model.

    python bench/bench_ddp.py                      # 2000 synthetic images, 120 steps per run

Each configuration runs the real command, `torchrun --standalone --nproc_per_node N -m
regionbert.train.cli`, with the model of configs/tiny.toml (2 layers, hidden 128) on shards shaped
like extractor output (10-100 boxes, 1024-d float16 features, 91 classes):

    1 process x 1 thread     the baseline
    2 processes x 1 thread   DDP: each rank its own batches, gradients all-reduced every step
    1 process x 2 threads    the same cores without DDP (intra-op threads), for comparison

samples/s is summed over ranks (what the log reports), averaged over the reports after the first
(which includes start-up). Scaling = 2-process samples/s / 1-process samples/s (ideal: 2.0). The
per-rank batch is the same token budget in every run, so 2 processes train on twice the samples per
step. Results go to bench/out/ddp/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the synthetic caption writer the tests use

import torch  # noqa: E402
from train_synth import write_dataset  # noqa: E402


def run_one(paths: dict, out: str, procs: int, threads: int, steps: int, budget: int) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    torchrun = shutil.which("torchrun") or sys.exit("torchrun (from torch) is not on PATH")
    cmd = [torchrun, "--standalone", "--nproc_per_node", str(procs), "-m", "regionbert.train.cli",
           os.path.join(HERE, "..", "configs", "tiny.toml"), "--out", out,
           *[f"--set=data.{k}={v}" for k, v in paths.items()],
           "--set=data.split=null", "--set=data.eval_split=null", "--set=data.num_workers=0",
           f"--set=data.token_budget={budget}", f"--set=optim.steps={steps}", "--set=optim.warmup_steps=20",
           f"--set=run.log_every={max(1, steps // 6)}", "--set=run.checkpoint_every=0", "--set=run.plot=false",
           "--set=run.tensorboard=false", "--set=run.device=cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONWARNINGS": "ignore"}
    t = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if r.returncode:
        sys.exit(f"{' '.join(cmd)}\nfailed:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    reports = [json.loads(x) for x in open(os.path.join(out, "log.jsonl"))]
    reports = [x for x in reports if "lr" in x][1:]  # the first includes start-up
    sps = sum(x["samples_per_s"] for x in reports) / len(reports)
    return {"processes": procs, "threads_per_process": threads, "steps": steps, "samples_per_s": sps,
            "wall_seconds": wall, "data_wait": sum(x["data_wait"] for x in reports) / len(reports)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--token-budget", type=int, default=4096)
    p.add_argument("--out", default=os.path.join(HERE, "out", "ddp"))
    args = p.parse_args()
    data_dir = os.path.join(args.out, f"data-{args.images}")
    if not os.path.exists(os.path.join(data_dir, "captions.csv")):
        shutil.rmtree(data_dir, ignore_errors=True)
        write_dataset(data_dir, args.images, 0, feature_dim=1024, min_boxes=10, max_boxes=100, seed=0)
    paths = {"shards": os.path.join(data_dir, "shard-00000"), "captions": os.path.join(data_dir, "captions.csv"),
             "tokenizer": os.path.join(data_dir, "vocab.txt")}
    runs = []
    for procs, threads in ((1, 1), (2, 1), (1, 2)):
        r = run_one(paths, os.path.join(args.out, f"run-{procs}x{threads}"), procs, threads, args.steps,
                    args.token_budget)
        runs.append(r)
        print(f"{procs} process(es) x {threads} thread(s): {r['samples_per_s']:.0f} samples/s "
              f"(data wait {100 * r['data_wait']:.1f}%, {r['wall_seconds']:.0f}s wall for {args.steps} steps)",
              flush=True)
    base = runs[0]["samples_per_s"]
    results = {"runs": runs, "scaling_2_processes": runs[1]["samples_per_s"] / base,
               "scaling_2_threads": runs[2]["samples_per_s"] / base, "images": args.images,
               "token_budget_per_rank": args.token_budget,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                          f"torch {torch.__version__}"}
    print(f"scaling: 2 processes (DDP, gloo) {results['scaling_2_processes']:.2f}x, "
          f"2 threads in 1 process {results['scaling_2_threads']:.2f}x (ideal 2.00x)")
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
