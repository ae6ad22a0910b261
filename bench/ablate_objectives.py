"""Ablation of the pretraining objectives: the same tiny model on the same data, UNITER's default recipe
against one change at a time, a few seeds each.

    python bench/ablate_objectives.py --jobs 2              # 4 variants x 3 seeds, configs/tiny.toml
    python bench/ablate_objectives.py --seeds 1 --steps 5 --images 60  # a smoke run

Variants (everything else as configs/tiny.toml: the default task mix and loss weights):
- default:      conditional masking, WRA (weight 0.1), MRC-kl in the mix
- joint:        joint masking (text and regions masked together in MLM / MRM steps)
- no_wra:       tasks.wra_weight = 0
- no_mrc_kl:    MRC-kl's share of the mix removed (the other ratios keep theirs)

Data: the independent synthetic scenes of tests/train_synth.py (write_scenes; not regionbert.data.synth),
held-out split judged by the run's own evaluation every 500 steps and at the end: ITM accuracy,
masked-word accuracy, masked-region class accuracy and zero-shot retrieval R@1 over 100 held-out images.
Writes bench/out/ablate/results.json, table.md (mean +- std over seeds at the end) and ablation.png
(the final figures per run, and held-out ITM accuracy over steps, mean over seeds).
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
sys.path.insert(0, os.path.join(HERE, "..", "tests"))  # the synthetic scene writer the learning test uses

from train_synth import write_scenes  # noqa: E402

from regionbert.train.config import load_config  # noqa: E402
from regionbert.train.run import run  # noqa: E402

CONFIG = os.path.join(HERE, "..", "configs", "tiny.toml")
VARIANTS = {
    "default": [],
    "joint": ["tasks.masking=joint"],
    "no_wra": ["tasks.wra_weight=0"],
    "no_mrc_kl": ["tasks.mix.mrc_kl=0"],
}
METRICS = ["itm_acc", "mlm_acc", "mrc_kl_acc", "t2i_r1", "i2t_r1"]


def train_one(variant: str, seed: int, paths: dict, out: str, steps: int | None, threads: int = 1,
              extra: tuple = ()) -> dict:
    torch.set_num_threads(threads)
    folder = os.path.join(out, "runs", f"{variant}-seed{seed}")
    shutil.rmtree(folder, ignore_errors=True)
    overrides = [f"data.{k}={v}" for k, v in paths.items()] + VARIANTS[variant] + [
        f"run.out={folder}", f"run.seed={seed}", "run.checkpoint_every=0", "data.num_workers=0", "run.plot=false",
        "run.tensorboard=false", "run.eval_every=500", "run.eval_images=100", "run.eval_pairs=600"]
    if steps:
        overrides.append(f"optim.steps={steps}")
    cfg = load_config(CONFIG, overrides + list(extra))
    t = time.perf_counter()
    run(cfg, print_fn=lambda *a, **k: None)
    log = [json.loads(line) for line in open(os.path.join(folder, "log.jsonl"))]
    evals = [r for r in log if "eval" in r]
    m = evals[-1]["eval"]
    by_step = {r["step"]: r["eval"] for r in evals}  # one per step
    curve = [[k, e.get("itm_acc"), e.get("t2i_r1")] for k, e in sorted(by_step.items())]
    result = {"variant": variant, "seed": seed, "steps": cfg.optim.steps, "seconds": time.perf_counter() - t,
              **{k: m.get(k) for k in METRICS}, "curve": curve}
    with open(os.path.join(folder, "result.json"), "w") as f:
        json.dump(result, f)
    return result


def table(rows: list[dict]) -> str:
    lines = ["| variant | " + " | ".join(METRICS) + " |", "|---" * (len(METRICS) + 1) + "|"]
    for v in VARIANTS:
        mine = [r for r in rows if r["variant"] == v]
        if not mine:
            continue
        cells = []
        for k in METRICS:
            vals = np.array([r[k] for r in mine if r[k] is not None], dtype=float)
            cells.append(f"{vals.mean():.3f} ± {vals.std():.3f}" if len(vals) else "n/a")
        lines.append(f"| {v} ({len(mine)} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(METRICS) + 1, figsize=(3.2 * (len(METRICS) + 1), 3.4))
    names = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    ax = axes[-1]  # held-out ITM accuracy over steps, mean over seeds
    for v in names:
        curves = [r["curve"] for r in rows if r["variant"] == v]
        n = min(len(c) for c in curves)
        steps = [c[0] for c in curves[0][:n]]
        ax.plot(steps, np.mean([[c[1] for c in cur[:n]] for cur in curves], axis=0), marker="o", ms=3, label=v)
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set_title("itm_acc over steps")
    ax.set_xlabel("step")
    ax.legend(fontsize=7)
    for ax, k in zip(axes[:-1], METRICS, strict=True):
        for i, v in enumerate(names):
            vals = [r[k] for r in rows if r["variant"] == v and r[k] is not None]
            ax.scatter([i] * len(vals), vals, s=14, alpha=0.7)
            if vals:
                ax.hlines(np.mean(vals), i - 0.3, i + 0.3, color="k")
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right")
        ax.set_title(k)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--first-seed", type=int, default=0, help="seeds first-seed .. first-seed + seeds - 1")
    p.add_argument("--only-new", action="store_true", help="keep the runs already in OUT/runs with the same "
                   "steps (their result.json) and train only the missing ones")
    p.add_argument("--steps", type=int, default=0, help="optim.steps (0: the config's)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--images", type=int, default=1500, help="training scenes (plus 300 held out)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--jobs", type=int, default=1, help="runs at once (separate processes)")
    p.add_argument("--out", default=os.path.join(HERE, "out", "ablate"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="a config override for every run (e.g. model.itm_head_init=bert); repeatable")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = os.path.join(args.out, f"scenes-{args.images}")
    if not os.path.exists(os.path.join(data, "captions.csv")):
        write_scenes(data, args.images, 300, seed=0)
    paths = {"shards": os.path.join(data, "scenes"), "captions": os.path.join(data, "captions.csv"),
             "tokenizer": os.path.join(data, "vocab.txt")}
    from joblib import Parallel, delayed

    todo = [(v, seed) for seed in range(args.first_seed, args.first_seed + args.seeds) for v in args.variants]
    rows = []
    if args.only_new:
        for v, seed in list(todo):
            done = os.path.join(args.out, "runs", f"{v}-seed{seed}", "result.json")
            if os.path.exists(done):
                r = json.load(open(done))
                if r["steps"] == (args.steps or load_config(CONFIG).optim.steps):
                    rows.append(r)
                    todo.remove((v, seed))
    for r in Parallel(n_jobs=args.jobs, return_as="generator")(
            delayed(train_one)(v, seed, paths, args.out, args.steps or None, args.threads, tuple(args.set))
            for v, seed in todo):
        print(json.dumps({k: round(x, 3) if isinstance(x, float) else x for k, x in r.items() if k != "curve"}),
              flush=True)
        rows.append(r)
    md = table(rows)
    print(md)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"rows": rows, "args": vars(args), "machine": platform.platform(), "torch": torch.__version__},
                  f, indent=1)
    with open(os.path.join(args.out, "table.md"), "w") as f:
        f.write(md)
    plot(rows, os.path.join(args.out, "ablation.png"))
    print(f"wrote {args.out}/table.md, results.json and ablation.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
