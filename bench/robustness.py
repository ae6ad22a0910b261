"""Does the default recipe learn whatever the seed and the floating point? (issue 27)

Two grids, each run a real `regionbert-pretrain` subprocess with OMP_NUM_THREADS set (1 and 2 threads round
differently: a stand-in for another CPU):

- quickstart: `regionbert-quickstart --seed D` for each detector seed D (the same 800 images; its own
  detector fine-tuning, extraction, shard), then the quickstart's own pretraining arguments with
  run.seed=P for each pretraining seed P and thread count;
- tiny: configs/tiny.toml as shipped on the learning test's data (tests/train_synth.py write_scenes, 1,500
  + 300 scenes, seed 0) with run.seed=P, and on tests/world_b.py's rooms (--worlds world_b).

Each run reports held-out ITM, retrieval R@1 both ways, and the first evaluation step at which held-out
ITM reached 0.6 ("left chance"). Writes OUT/results.json and OUT/table.md (per run, then median / worst).

    python bench/robustness.py quickstart --out bench/out/robustness --jobs 2      # 5 x 3 x 2 = 30 runs
    python bench/robustness.py tiny --out bench/out/robustness --jobs 2            # 5 x 2 = 10 runs
    python bench/robustness.py quickstart --pretrain-seeds 0 --detector-seeds 0 --threads 1   # one run
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import os
import subprocess
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
LEFT_CHANCE = 0.6


def sh(cmd: list[str], threads: int, log: str) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    t = time.perf_counter()
    with open(log, "w") as f:
        r = subprocess.run(cmd, env=env, stdout=f, stderr=subprocess.STDOUT)
    if r.returncode:
        raise RuntimeError(f"{' '.join(cmd)} exited {r.returncode}; see {log}")
    return time.perf_counter() - t


def evals(run_dir: str) -> list[dict]:
    out = []
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        for line in f:
            r = json.loads(line)
            if "eval" in r:
                out.append({"step": r["step"], **r["eval"]})
    return out


def loss_left(run_dir: str, below: float = 0.6) -> int | None:
    """The first training report from which ITM's loss stays below `below` for two reports (ln 2 = 0.693 is
    guessing): when ITM left chance, to the report (every 25 steps in the quickstart)."""
    with open(os.path.join(run_dir, "log.jsonl")) as f:
        reps = [(r["step"], r["itm"]) for r in map(json.loads, f) if "lr" in r and "itm" in r]
    return next((s for (s, a), (_, b) in zip(reps, reps[1:], strict=False) if a < below and b < below), None)


def summarise(run_dir: str, seconds: float, **what) -> dict:
    ev = evals(run_dir)
    last = ev[-1]
    left = next((e["step"] for e in ev if e.get("itm_acc", 0) >= LEFT_CHANCE), None)
    what["loss_left_step"] = loss_left(run_dir)
    return {**what, "itm_acc": last["itm_acc"], "t2i_r1": last["t2i_r1"], "i2t_r1": last["i2t_r1"],
            "mlm_acc": last.get("mlm_acc"), "mrc_kl_acc": last.get("mrc_kl_acc"), "left_chance_step": left,
            "steps": last["step"], "images": last.get("retrieval_images"), "seconds": round(seconds, 1),
            "curve": [(e["step"], round(e["itm_acc"], 3)) for e in ev]}


def quickstart_shard(out: str, det_seed: int) -> str:
    folder = os.path.join(out, f"quickstart-det{det_seed}")
    if not os.path.exists(os.path.join(folder, "summary.json")):
        # the quickstart's data, detector and shard; its own pretraining cut short (the grid pretrains)
        sh(["regionbert-quickstart", "--out", folder, "--seed", str(det_seed), "--steps", "20"], 2, folder + ".log")
    return folder


def quickstart_run(out: str, qs: str, det_seed: int, seed: int, threads: int, set_: list[str]) -> dict:
    from regionbert.quickstart.main import DEFAULT_STEPS, pretrain_args

    run_dir = os.path.join(out, f"qs-det{det_seed}-seed{seed}-t{threads}")
    data = {"captions": os.path.join(qs, "data", "captions.csv"), "vocab": os.path.join(qs, "data", "vocab.txt")}
    args = pretrain_args(data, os.path.join(qs, "shards"), run_dir, DEFAULT_STEPS)
    args += ["--set", f"run.seed={seed}", "--set", "run.plot=false", "--set", "data.num_workers=0"]
    for s in set_:
        args += ["--set", s]
    secs = sh(["regionbert-pretrain", *args], threads, run_dir + ".log")
    return summarise(run_dir, secs, grid="quickstart", detector_seed=det_seed, seed=seed, threads=threads)


def tiny_run(out: str, world: str, data: dict, seed: int, threads: int, set_: list[str]) -> dict:
    run_dir = os.path.join(out, f"tiny-{world}-seed{seed}-t{threads}")
    args = [os.path.join(ROOT, "configs", "tiny.toml"), "--out", run_dir]
    for s in [*(f"data.{k}={v}" for k, v in data.items()), f"run.seed={seed}", "run.checkpoint_every=0",
              "data.num_workers=0", "run.plot=false", "run.eval_every=100", "run.eval_pairs=400", *set_]:
        args += ["--set", s]
    secs = sh(["regionbert-pretrain", *args], threads, run_dir + ".log")
    return summarise(run_dir, secs, grid=f"tiny/{world}", seed=seed, threads=threads)


def table(results: list[dict]) -> str:
    lines = ["| grid | detector seed | seed | threads | ITM | t2i R@1 | i2t R@1 | held-out ITM >= 0.6 at step | "
             "ITM loss < 0.6 from step | s |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (r["grid"], r.get("detector_seed", -1), r["seed"], r["threads"])):
        lines.append(f"| {r['grid']} | {r.get('detector_seed', '')} | {r['seed']} | {r['threads']} | "
                     f"{r['itm_acc']:.3f} | {r['t2i_r1']:.2f} | {r['i2t_r1']:.2f} | {r['left_chance_step']} | "
                     f"{r['loss_left_step']} | {r['seconds']:.0f} |")
    lines += ["", "| grid | runs | ITM median / worst | t2i R@1 median / worst | i2t R@1 median / worst | "
              "held-out ITM >= 0.6 median / latest | ITM loss < 0.6 median / latest (of steps) |",
              "|---|---|---|---|---|---|---|"]
    for grid in sorted({r["grid"] for r in results}):
        rs = [r for r in results if r["grid"] == grid]
        left = [r["left_chance_step"] if r["left_chance_step"] is not None else float("inf") for r in rs]
        lleft = [r["loss_left_step"] if r["loss_left_step"] is not None else float("inf") for r in rs]
        f = {k: np.array([r[k] for r in rs]) for k in ("itm_acc", "t2i_r1", "i2t_r1")}
        lines.append(f"| {grid} | {len(rs)} | {np.median(f['itm_acc']):.3f} / {f['itm_acc'].min():.3f} | "
                     f"{np.median(f['t2i_r1']):.2f} / {f['t2i_r1'].min():.2f} | "
                     f"{np.median(f['i2t_r1']):.2f} / {f['i2t_r1'].min():.2f} | "
                     f"{np.median(left):.0f} / {max(left):.0f} | {np.median(lleft):.0f} / {max(lleft):.0f} "
                     f"(of {rs[0]['steps']}) |")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("grid", choices=["quickstart", "tiny"])
    p.add_argument("--out", default=os.path.join(HERE, "out", "robustness"))
    p.add_argument("--pretrain-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    p.add_argument("--detector-seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--worlds", nargs="+", default=["scenes"], choices=["scenes", "world_b"])
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--set", action="append", default=[], help="override for every run (KEY=VALUE)")
    p.add_argument("--tag", default="", help="a name for this grid's results file")
    a = p.parse_args()
    os.makedirs(a.out, exist_ok=True)
    jobs = []
    if a.grid == "quickstart":
        shards = {d: quickstart_shard(a.out, d) for d in a.detector_seeds}
        jobs = [(quickstart_run, (a.out, shards[d], d, s, t, a.set))
                for d in a.detector_seeds for s in a.pretrain_seeds for t in a.threads]
    else:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        for world in a.worlds:
            folder = os.path.join(a.out, f"data-{world}")
            sub = "scenes" if world == "scenes" else "rooms"
            data = {"shards": os.path.join(folder, sub), "captions": os.path.join(folder, "captions.csv"),
                    "tokenizer": os.path.join(folder, "vocab.txt")}
            if not os.path.exists(data["tokenizer"]):  # written last
                if world == "scenes":
                    from train_synth import write_scenes
                    write_scenes(folder, 1500, 300, seed=0)
                else:
                    from world_b import write_rooms
                    write_rooms(folder, 1500, 300, seed=0)
            jobs += [(tiny_run, (a.out, world, data, s, t, a.set)) for s in a.pretrain_seeds for t in a.threads]
    results, t0 = [], time.perf_counter()
    # runs with more threads each get fewer at a time: never more threads than --jobs in all, so that a
    # 2-thread run is not slowed by sharing its cores (the figures would not change, only the time)
    for threads in sorted(set(a.threads)):
        todo = [(fn, args) for fn, args in jobs if args[-2] == threads]
        with cf.ThreadPoolExecutor(max(1, a.jobs // threads)) as pool:
            futures = [pool.submit(fn, *args) for fn, args in todo]
            for f in cf.as_completed(futures):
                r = f.result()
                results.append(r)
                write(a, results)
                print(f"[{len(results)}/{len(jobs)} {time.perf_counter() - t0:.0f}s] {r['grid']} "
                      f"det {r.get('detector_seed', '-')} seed {r['seed']} threads {r['threads']}: ITM "
                      f"{r['itm_acc']:.3f} R@1 {r['t2i_r1']:.2f} / {r['i2t_r1']:.2f}, held-out ITM >= 0.6 at "
                      f"{r['left_chance_step']}, loss < 0.6 from {r['loss_left_step']}", flush=True)
    print(write(a, results))
    return 0


def write(a, results: list[dict]) -> str:
    """OUT/GRID[-TAG].json and .md, rewritten after every run (a grid stopped early keeps what it did)."""
    name = a.grid + (f"-{a.tag}" if a.tag else "")
    with open(os.path.join(a.out, f"{name}.json"), "w") as f:
        json.dump(results, f, indent=1)
    md = table(results)
    with open(os.path.join(a.out, f"{name}.md"), "w") as f:
        f.write(md)
    return md


if __name__ == "__main__":
    sys.exit(main())
