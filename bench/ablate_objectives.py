"""Ablation of the pretraining objectives: the same tiny model on the same data, UNITER's default recipe
against one change at a time, a few seeds each.

    python bench/ablate_objectives.py                      # 4 variants x 3 seeds, configs/tiny.toml
    python bench/ablate_objectives.py --seeds 1 --steps 5 --images 60  # a smoke run

Variants (everything else as configs/tiny.toml: the default task mix and loss weights):
- default:      conditional masking, WRA (weight 0.1), MRC-kl in the mix
- joint:        joint masking (text and regions masked together in MLM / MRM steps)
- no_wra:       tasks.wra_weight = 0
- no_mrc_kl:    MRC-kl's share of the mix removed (the other ratios keep theirs)

Data: the independent synthetic scenes of tests/train_synth.py (write_scenes; not regionbert.data.synth),
held-out split judged at the end by the run's own evaluation: ITM accuracy, masked-word accuracy,
masked-region class accuracy and zero-shot retrieval R@1 over 100 held-out images.
Writes bench/out/ablate/results.json, table.md (mean +- std over seeds) and ablation.png.
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


def train_one(variant: str, seed: int, paths: dict, out: str, steps: int | None) -> dict:
    folder = os.path.join(out, "runs", f"{variant}-seed{seed}")
    shutil.rmtree(folder, ignore_errors=True)
    overrides = [f"data.{k}={v}" for k, v in paths.items()] + VARIANTS[variant] + [
        f"run.out={folder}", f"run.seed={seed}", "run.checkpoint_every=0", "data.num_workers=0", "run.plot=false",
        "run.tensorboard=false", "run.eval_every=0", "run.eval_images=100", "run.eval_pairs=600"]
    if steps:
        overrides.append(f"optim.steps={steps}")
    cfg = load_config(CONFIG, overrides)
    t = time.perf_counter()
    run(cfg, print_fn=lambda *a, **k: None)
    log = [json.loads(line) for line in open(os.path.join(folder, "log.jsonl"))]
    m = [r for r in log if "eval" in r][-1]["eval"]
    return {"variant": variant, "seed": seed, "seconds": time.perf_counter() - t, **{k: m.get(k) for k in METRICS}}


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

    fig, axes = plt.subplots(1, len(METRICS), figsize=(3.2 * len(METRICS), 3.2))
    names = [v for v in VARIANTS if any(r["variant"] == v for r in rows)]
    for ax, k in zip(axes, METRICS, strict=True):
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
    p.add_argument("--steps", type=int, default=0, help="optim.steps (0: the config's)")
    p.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--images", type=int, default=1500, help="training scenes (plus 300 held out)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per run")
    p.add_argument("--out", default=os.path.join(HERE, "out", "ablate"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = os.path.join(args.out, f"scenes-{args.images}")
    if not os.path.exists(os.path.join(data, "captions.csv")):
        write_scenes(data, args.images, 300, seed=0)
    paths = {"shards": os.path.join(data, "scenes"), "captions": os.path.join(data, "captions.csv"),
             "tokenizer": os.path.join(data, "vocab.txt")}
    rows = []
    for seed in range(args.seeds):
        for v in args.variants:
            r = train_one(v, seed, paths, args.out, args.steps or None)
            print(json.dumps({k: round(x, 3) if isinstance(x, float) else x for k, x in r.items()}), flush=True)
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
