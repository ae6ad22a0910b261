"""How long ITM stays at chance: configs/tiny.toml on the independent synthetic scenes, held-out accuracy
every run.eval_every steps (issue 12). The runs behind README's Proof of learning (ITM negatives among the
200 images nearest in box count vs from any image, UNITER's and now the default; both with ITM's head at
N(0, 0.02), the default then):

    python bench/ablate_itm_plateau.py window100 1000 model.itm_head_init=bert tasks.itm_neg_window=100 \
        run.eval_every=200 run.log_every=100 run.eval_pairs=400
    python bench/ablate_itm_plateau.py any_image 1000 model.itm_head_init=bert run.eval_every=200 \
        run.log_every=100 run.eval_pairs=400
    python bench/ablate_itm_plateau.py itm_only 600 'tasks.mix={"itm":1}'

Arguments: a run name, optim.steps, then any --set style overrides. Prints the training losses and the
held-out accuracies per report; runs go to bench/out/itm_plateau/NAME.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from train_synth import write_scenes  # noqa: E402

from regionbert.train.config import load_config  # noqa: E402
from regionbert.train.run import run  # noqa: E402


def main() -> int:
    name, steps, *overrides = sys.argv[1:]
    base = os.path.join(HERE, "out", "itm_plateau")
    data = os.path.join(base, "scenes-1500")
    if not os.path.exists(os.path.join(data, "captions.csv")):
        write_scenes(data, 1500, 300, seed=0)
    paths = {"shards": os.path.join(data, "scenes"), "captions": os.path.join(data, "captions.csv"),
             "tokenizer": os.path.join(data, "vocab.txt")}
    out = os.path.join(base, name)
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(os.path.join(HERE, "..", "configs", "tiny.toml"), [f"data.{k}={v}" for k, v in paths.items()] + [
        f"optim.steps={steps}", f"run.out={out}", "run.checkpoint_every=0", "data.num_workers=0", "run.plot=false",
        "run.tensorboard=false", "run.eval_images=100", *overrides])
    torch.set_num_threads(1)
    t = time.time()
    run(cfg, print_fn=lambda *a, **k: None)
    for line in open(os.path.join(out, "log.jsonl")):
        r = json.loads(line)
        if "eval" in r:
            print(r["step"], {k: round(v, 3) for k, v in r["eval"].items() if k.endswith("acc") or "_r" in k})
        else:
            print(r["step"], {k: round(r[k], 3) for k in ("mlm", "itm", "wra", "mrfr", "mrc_kl", "mrc") if k in r})
    print(name, "seconds", round(time.time() - t))
    return 0


if __name__ == "__main__":
    sys.exit(main())
