"""The quickstart's pretraining settings against the alternatives they were chosen over (issue 15), on the
shard and captions of a finished quickstart run, each variant one run of the quickstart's own
regionbert-pretrain arguments plus its overrides:

    regionbert-quickstart --out runs/quickstart
    python bench/quickstart_variants.py runs/quickstart --jobs 2      # about 25 minutes on 2 cores
    python bench/quickstart_variants.py runs/quickstart --jobs 2 --curve --only "seed 1" "8 heads"
    python bench/quickstart_variants.py runs/quickstart --steps 4     # a smoke run

Prints a table of held-out ITM accuracy (half the pairs mismatched), retrieval R@1 among the run's
held-out images and the masked region's class accuracy, and writes bench/out/quickstart_variants.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

VARIANTS = {
    "quickstart": [],  # 4096 tokens a batch, FFN 256, lr 1.5e-3, no dropout
    "seed 1": ["run.seed=1"],  # how far from the edge: the same run with other seeds
    "seed 2": ["run.seed=2"],
    "dropout 0.1": ["model.dropout=0.1"],  # BERT's: 15% slower a step on a CPU
    "8 heads": ["model.num_heads=8"],
    "warmup 20": ["optim.warmup_steps=20"],
    "lr 1e-3": ["optim.lr=0.001"],
    "FFN 512, lr 1e-3": ["model.intermediate_size=512", "optim.lr=0.001"],
    "2048 tokens, lr 1e-3": ["data.token_budget=2048", "optim.lr=0.001"],
    "ITM alone": ['tasks.mix={"itm": 1}'],  # do the regions carry what the captions say?
}


def train_one(name: str, quickstart: str, steps: int | None, out: str, curve: bool = False) -> dict:
    import torch

    from regionbert.quickstart.main import pretrain_args
    from regionbert.train.cli import main as pretrain

    torch.set_num_threads(1)
    data = {"captions": os.path.join(quickstart, "data", "captions.csv"),
            "vocab": os.path.join(quickstart, "data", "vocab.txt")}
    run_dir = os.path.join(out, name.replace(" ", "_").replace(",", ""))
    shutil.rmtree(run_dir, ignore_errors=True)
    args = pretrain_args(data, os.path.join(quickstart, "shards"), run_dir, steps or 650)
    args += ["--set", "run.plot=false", "--set", "data.num_workers=0"]
    if curve:  # when ITM leaves 0.5: a held-out evaluation every 50 steps (retrieval among 20 images then)
        args += ["--set", "run.eval_every=50", "--set", "run.eval_images=20"]
    for o in VARIANTS[name]:
        args += ["--set", o]
    t = time.perf_counter()
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        rc = pretrain(args)
    if rc != 0:
        raise RuntimeError(f"{name}: regionbert-pretrain failed")
    evals = [json.loads(line)["eval"] for line in open(os.path.join(run_dir, "log.jsonl")) if '"eval"' in line]
    e = evals[-1]
    return {"variant": name, "seconds": round(time.perf_counter() - t), "itm_acc": e.get("itm_acc"),
            "t2i_r1": e.get("t2i_r1"), "i2t_r1": e.get("i2t_r1"), "mrc_kl_acc": e.get("mrc_kl_acc"),
            "retrieval_images": e.get("retrieval_images"), "itm_over_steps": [x.get("itm_acc") for x in evals]}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("quickstart", help="a finished regionbert-quickstart --out folder")
    p.add_argument("--steps", type=int, default=0, help="pretraining steps (0: the quickstart's 650)")
    p.add_argument("--jobs", type=int, default=1)
    p.add_argument("--only", nargs="*", help="these variants (names as in the table)")
    p.add_argument("--curve", action="store_true", help="evaluate every 50 steps (retrieval among 20 images)")
    p.add_argument("--out", default=os.path.join(HERE, "out", "quickstart_variants"))
    a = p.parse_args()
    if not os.path.exists(os.path.join(a.quickstart, "summary.json")):
        p.error(f"{a.quickstart}: no summary.json; run regionbert-quickstart --out {a.quickstart} first")
    from joblib import Parallel, delayed

    rows = list(Parallel(n_jobs=a.jobs)(delayed(train_one)(v, a.quickstart, a.steps or None, a.out, a.curve)
                                          for v in (a.only or VARIANTS)))
    print("| variant | held-out ITM | t2i / i2t R@1 | masked region class | ITM at each eval | s |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        mrc = "n/a" if r["mrc_kl_acc"] is None else f"{r['mrc_kl_acc']:.2f}"
        print(f"| {r['variant']} | {r['itm_acc']:.3f} | {r['t2i_r1']:.3f} / {r['i2t_r1']:.3f} | {mrc} | "
              f"{' / '.join(f'{x:.2f}' for x in r['itm_over_steps'])} | {r['seconds']} |")
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "..", "quickstart_variants.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
