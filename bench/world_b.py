"""configs/tiny.toml on the second synthetic world (tests/world_b.py: rooms of coloured objects, captions
with counts and spatial relations), held-out figures every run.eval_every steps (issue 27 item 3).

    python bench/world_b.py 1500 0                                   # the default recipe, seed 0
    python bench/world_b.py 1500 1 --set optim.lr=5e-4               # another seed, a changed setting
    python bench/world_b.py 600 0 --set 'tasks.mix={"itm":1}' --name itm_only
    python bench/world_b.py 1500 0 --data-seed 1                     # another draw of the world

Arguments: optim.steps, run.seed, then any number of --set KEY=VALUE overrides (applied after this
script's own: data paths, run.out, run.checkpoint_every=0, data.num_workers=0, run.plot=false,
run.eval_every=100, run.eval_pairs=400, so they can be overridden too). The data (1,500 training rooms +
300 held out, 2 captions each) is written once per --data-seed under bench/out/world_b/; the run goes to
bench/out/world_b/NAME (default: s{seed}). Prints the training losses and the held-out figures per
report, then the first evaluation where held-out ITM >= 0.6 ("left chance") and the wall time.
Runs on one thread (torch.set_num_threads(1)).

Measured (run.seed 0, data seed 0, one thread on a shared 2-core CPU):
- the default recipe (`1500 0`): held-out ITM 0.50-0.51 at every evaluation through step 1,500, R@1 0.01,
  MLM 0.17 at step 100 -> 0.61; a masked noun 0.09 with the true image, 0.07 with a shuffled one; 408 s;
- ITM alone (`1000 0 --set 'tasks.mix={"itm":1}'`): left chance at step 300, 0.81 at 400, 0.90 at 1,000,
  R@1 0.32 t2i / 0.36 i2t (303 s); tests/train_synth.py's world, the same way: 0.65 at 200, 0.87 at 1,000;
- MLM alone (`1500 0 --set 'tasks.mix={"mlm":1}'`): a masked noun 0.25 with the true image, 0.05 with a
  shuffled one; a masked colour 0.45 / 0.15 (268 s).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

from world_b import write_rooms  # noqa: E402

from regionbert.train.config import load_config  # noqa: E402
from regionbert.train.run import run  # noqa: E402

LEFT_CHANCE = 0.6


def data_paths(base: str, data_seed: int) -> dict:
    folder = os.path.join(base, f"rooms-1500-d{data_seed}")
    paths = {"shards": os.path.join(folder, "rooms"), "captions": os.path.join(folder, "captions.csv"),
             "tokenizer": os.path.join(folder, "vocab.txt")}
    if not os.path.exists(paths["tokenizer"]):  # vocab.txt is written last
        shutil.rmtree(folder, ignore_errors=True)
        write_rooms(folder, 1500, 300, seed=data_seed)
    return paths


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("steps", type=int)
    ap.add_argument("seed", type=int)
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--name", help="run folder under bench/out/world_b (default: s{seed})")
    ap.add_argument("--data-seed", type=int, default=0)
    a = ap.parse_args()
    base = os.path.join(HERE, "out", "world_b")
    paths = data_paths(base, a.data_seed)
    out = os.path.join(base, a.name or f"s{a.seed}")
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(os.path.join(HERE, "..", "configs", "tiny.toml"), [f"data.{k}={v}" for k, v in paths.items()] + [
        f"optim.steps={a.steps}", f"run.seed={a.seed}", f"run.out={out}", "run.checkpoint_every=0",
        "data.num_workers=0", "run.plot=false", "run.eval_every=100", "run.eval_pairs=400", *a.overrides])
    torch.set_num_threads(1)
    t = time.time()
    run(cfg, print_fn=lambda *a, **k: None)
    seconds = time.time() - t
    left = None
    for line in open(os.path.join(out, "log.jsonl")):
        r = json.loads(line)
        if "eval" in r:
            e = r["eval"]
            print(r["step"], "held-out", {k: round(v, 3) for k, v in e.items() if k.endswith("acc") or "_r1" in k})
            if left is None and e.get("itm_acc", 0) >= LEFT_CHANCE:
                left = r["step"]
        else:
            print(r["step"], "train", {k: round(r[k], 3) for k in ("mlm", "itm", "wra", "mrfr", "mrc_kl", "mrc")
                                       if k in r})
    print(f"left chance (held-out ITM >= {LEFT_CHANCE}): {'never' if left is None else f'step {left}'}")
    print(f"{a.name or f's{a.seed}'}: {a.steps} steps, seed {a.seed}, data seed {a.data_seed}, "
          f"{seconds:.0f} s, overrides {a.overrides}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
