"""The trainer's data path as it runs: in-process and with 1 and 2 loader workers, before and after, against
the floor of just reading and copying the same records; and the padded tokens of each task's batches.

    python bench/bench_loader.py                      # 2000 images of 10-100 boxes, 2048-d float16; a few minutes
    python bench/bench_loader.py --before a08b430     # the code to compare with (a commit of this repository)

Synthetic shards shaped like extractor output (regionbert.data.synth via tests/train_synth.py: 2048-d
float16 features, 91 float16 class probabilities, 10-100 boxes), two captions per image, the default
task mix and token budget. Each measurement runs in a subprocess of its own, `now` (this working tree)
and `before` (`git archive` of --before, on PYTHONPATH) alternating, --reps times, so both see the same
machine; figures are medians with the range over the repetitions.

- in-process: `build_data(cfg, num_workers=0)`'s loader, batches exactly as the trainer receives them
  (on the CPU; nothing moved to a device), --batches batches after --warm untimed ones.
- 1 / 2 workers: the same loader with `num_workers` 1 and 2 (persistent workers, prefetch 4, as
  `build_data` makes it). CPU time is summed over all processes: the main process's (time.process_time)
  and each worker's (its CPU-time clock, as clock_getcpuclockid gives it), between two points of one
  iterator in its steady state, each taken with every worker idle and as far ahead as the prefetch lets
  it (worker_pass), so every process's CPU counts and nothing else, for exactly --batches batches each.
  `main us/sample` is what the training process itself spends: the rest of the node's cores feed it.
- floor: the same records of the same batches (ITM negatives included), read through the same ShardSet
  with checksums on, features, locations and class probabilities copied into a preallocated buffer of the
  shard's dtypes. No masking, no tokens, no tensors: what any loader must do at the least. Timed in
  every subprocess beside its in-process pass. `floor: read_into` (a version with ShardSet.read_into,
  issue 23): the same copies made by read_into, which builds no Record: the least with today's reader;
  `floor` keeps issue 13's definition (a Record per read), the one the in-process target is stated against.
- padding: over --padding-batches batches of each version's own task sampler (keys only, nothing read):
  per task, the padded tokens of a batch (samples x longest text + regions, ITM negatives' regions
  included) against the token budget, the batches above it, and the padding share.

CPU time, not wall time, is the measure: the machine is shared, and CPU time is what the node's cores
pay. --json writes everything.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the synthetic caption writer the tests use

import numpy as np  # noqa: E402
from gitcheckout import checkout  # noqa: E402  (bench/, the script's folder, is on sys.path)

TICK = os.sysconf("SC_CLK_TCK")


def make_data(out: str, images: int, dim: int) -> dict:
    from train_synth import write_dataset
    folder = os.path.join(out, f"data-{images}-{dim}")
    if not os.path.exists(os.path.join(folder, "captions.csv")):
        shutil.rmtree(folder, ignore_errors=True)
        t = time.perf_counter()
        write_dataset(folder, images, 0, feature_dim=dim, min_boxes=10, max_boxes=100, seed=0)
        print(f"wrote {images} synthetic images ({dim}-d) in {time.perf_counter() - t:.0f}s", flush=True)
    return {"shards": os.path.join(folder, "shard-00000"), "captions": os.path.join(folder, "captions.csv"),
            "tokenizer": os.path.join(folder, "vocab.txt")}


def proc_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process so far, all its threads, those that ended too: its CPU-time
    clock (the clock id glibc's clock_getcpuclockid makes, nanoseconds), or where that cannot be read
    utime + stime from /proc/PID/stat, which count in clock ticks (10 ms: +-2% of a worker's half second
    of CPU in a timed pass)."""
    try:
        return time.clock_gettime_ns((~pid << 3) | 2) / 1e9  # (Linux: CPUCLOCK_SCHED of process pid)
    except (OSError, OverflowError):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rpartition(")")[2].split()
        return (int(fields[11]) + int(fields[12])) / TICK


def samples_of(batch) -> int:
    return len(batch["text_lens"])


def worker_pass(loader, warm: int, batches: int) -> dict:
    """One iterator: warm batches untimed (workers start, buffers fill), then `batches` timed.

    With workers, both ends of the timed pass are taken with every worker idle, each batch it was given
    done (torch keeps prefetch_factor x workers batches asked for ahead of the one consumed): between the
    two, the workers did exactly `batches` batches' work, those `ahead` positions later in the stream than
    the ones consumed, whose samples their CPU is divided by (worker_samples; worker_cpu is given per
    consumed sample x the consumed samples, so the table's arithmetic is the same). Without that, a pass
    began with the workers ahead by as much as the prefetch lets them and ended wherever they were, and
    a ring buffer first made (and its pages first touched) at some point of a pass counted in it or not."""
    it = iter(loader)
    for batch in itertools.islice(it, warm):
        del batch
    inner = loader._iterator  # the DataLoader's own iterator: its worker processes
    pids = [w.pid for w in getattr(inner, "_workers", [])]
    ahead = (loader.prefetch_factor or 0) * len(pids)
    w0 = settle(pids)
    c0, t0 = time.process_time(), time.perf_counter()
    sizes = []
    for batch in itertools.islice(it, batches):
        sizes.append(samples_of(batch))
        del batch
    c1, t1 = time.process_time(), time.perf_counter()
    w1 = settle(pids)
    n, worked, cpu = sum(sizes), sum(sizes), sum(w1) - sum(w0)
    if pids:  # the batches the workers made meanwhile: the consumed ones shifted by `ahead`
        later = [samples_of(b) for b in itertools.islice(it, ahead)]
        worked = sum(sizes[ahead:]) + sum(later)
    receiver = getattr(loader, "receiver", None)  # shared buffers the workers made (a ring each), if any
    return {"samples": n, "main_cpu": c1 - c0, "worker_cpu": cpu * n / worked if worked else 0.0,
            "worker_cpu_raw": cpu, "worker_samples": worked, "wall": t1 - t0,
            "buffers_received": receiver.received if receiver else None}


def settle(pids: list[int], quiet: int = 3, interval: float = 0.03, limit: float = 10.0) -> list[float]:
    """The workers' CPU seconds once each has stopped using CPU (quiet intervals in a row with under 0.2 ms),
    i.e. every batch asked of it done; at most `limit` seconds of waiting."""
    last = [proc_cpu(p) for p in pids]
    still, end = 0, time.perf_counter() + limit
    while pids and still < quiet and time.perf_counter() < end:
        time.sleep(interval)
        now = [proc_cpu(p) for p in pids]
        still = still + 1 if sum(now) - sum(last) < 2e-4 else 0
        last = now
    return last


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


def floor_into_pass(dataset, keys: list[list[tuple]], bufs) -> int:
    """floor_pass through ShardSet.read_into: each record copied into row b of the buffers, no Record made."""
    feats, locs, probs = bufs
    pool, image_of, read_into = dataset.pairs.pool, dataset.pairs.image, dataset.shards.read_into
    n = 0
    for batch in keys:
        for b, (_, p, other, _) in enumerate(batch):
            read_into(int(pool[image_of[p] if other < 0 else other]), feats[b], locs[b], probs[b])
        n += len(batch)
    return n


def padding(pairs, sampler, budget: int, batches: int) -> dict:
    """Per task: padded tokens per batch against the budget, batches above it, padding share."""
    text = np.asarray(pairs.lengths) - pairs.num_boxes[pairs.image]
    per = {}
    for keys in itertools.islice(iter(sampler), batches):
        p = np.array([k[1] for k in keys])
        o = np.array([k[2] for k in keys])
        lens = text[p] + pairs.num_boxes[np.where(o < 0, pairs.image[p], o)]
        padded = len(keys) * int(lens.max())
        s = per.setdefault(keys[0][0], {"batches": 0, "padded": [], "real": 0, "over": 0})
        s["batches"] += 1
        s["padded"].append(padded)
        s["real"] += int(lens.sum())
        s["over"] += int(padded > budget and len(keys) > 1)
    out = {}
    for task, s in per.items():
        padded = np.array(s["padded"])
        out[task] = {"batches": s["batches"], "mean_over_budget": float(padded.mean() / budget),
                     "max_over_budget": float(padded.max() / budget), "batches_over": s["over"],
                     "padding": 1 - s["real"] / int(padded.sum()), "real": s["real"], "padded": int(padded.sum())}
    real, padded = sum(v["real"] for v in out.values()), sum(v["padded"] for v in out.values())
    out["all"] = {"batches": sum(v["batches"] for v in out.values()), "padding": 1 - real / padded,
                  "max_over_budget": max(v["max_over_budget"] for v in out.values()),
                  "batches_over": sum(v["batches_over"] for v in out.values())}
    return out


def measure(args) -> dict:
    """In one subprocess (of one version of the code): padding, in-process (+ floor), 1 and 2 workers."""
    import torch

    from regionbert.train.config import load_config
    from regionbert.train.run import build_data
    torch.set_num_threads(1)
    paths = json.loads(args.measure)
    cfg = load_config(None, [f"data.{k}={v}" for k, v in paths.items()] + [
        "data.split=null", "data.num_workers=0", "run.device=cpu"])  # default token budget and task mix
    out = {}
    pairs, dataset, _, loader = build_data(cfg, None, num_workers=0)
    if args.padding_batches:
        out["padding"] = padding(pairs, loader.batch_sampler, cfg.data.token_budget, args.padding_batches)
    keys = list(itertools.islice(iter(loader.batch_sampler), args.warm + args.batches))[args.warm:]
    biggest = max(len(b) for b in keys)
    C = len(dataset.shards.meta["class_names"])
    dim = dataset.shards.meta["feature_dim"]
    bufs = (np.zeros((biggest, cfg.data.max_regions, dim), np.float16),
            np.zeros((biggest, cfg.data.max_regions, 7), np.float32),
            np.zeros((biggest, cfg.data.max_regions, C), np.float16))
    floors = {"floor": floor_pass}
    if hasattr(dataset.shards, "read_into"):
        floors["floor: read_into"] = floor_into_pass
    floor_pass(dataset, keys, bufs)  # the page cache and the allocator warm
    for _ in range(2):  # in-process and floors alternate; the better of two passes each
        for name, floor in floors.items():
            c = time.process_time()
            n = floor(dataset, keys, bufs)
            cpu = time.process_time() - c
            if name not in out or cpu < out[name]["main_cpu"]:
                out[name] = {"samples": n, "main_cpu": cpu, "worker_cpu": 0.0, "wall": cpu}
        r = worker_pass(loader, args.warm, args.batches)
        if "in-process" not in out or r["main_cpu"] < out["in-process"]["main_cpu"]:
            out["in-process"] = r
    for workers in (1, 2):
        _, _, _, loader = build_data(cfg, None, num_workers=workers)
        out[f"{workers} worker{'s' if workers > 1 else ''}"] = worker_pass(loader, args.warm, args.batches)
        del loader
    out["tasks"] = {t: sum(b[0][0] == t for b in keys) for t in cfg.tasks.mix}
    out["samples_per_pass"] = sum(map(len, keys))
    out["token_budget"] = cfg.data.token_budget
    return out


def spread(values: list[float], fmt: str) -> str:
    v = sorted(values)
    if len(v) == 1:
        return format(v[0], fmt)
    return f"{format(v[len(v) // 2], fmt)} ({format(v[0], fmt)}-{format(v[-1], fmt)})"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--batches", type=int, default=100, help="batches per timed pass")
    p.add_argument("--warm", type=int, default=120, help="untimed batches before each timed pass (each process "
                   "then has checked the record rules of (nearly) every image once, as after a first epoch)")
    p.add_argument("--reps", type=int, default=3, help="subprocesses per version")
    p.add_argument("--before", default="a08b430", help="commit to compare with ('' for none)")
    p.add_argument("--padding-batches", type=int, default=2000)
    p.add_argument("--out", default=os.path.join(HERE, "out", "loader"))
    p.add_argument("--json", help="write the results here")
    p.add_argument("--measure", help=argparse.SUPPRESS)  # internal: one subprocess's measurements
    args = p.parse_args()
    if args.measure:
        json.dump(measure(args), sys.stdout)
        return 0
    paths = make_data(args.out, args.images, args.dim)
    load = {"start": os.getloadavg(), "start_utc": time.strftime("%H:%M", time.gmtime())}
    versions = {"now": None}
    tmp = tempfile.mkdtemp(prefix="bench-loader-")
    try:
        if args.before:
            versions["before"] = checkout(args.before, tmp)
        runs = {v: [] for v in versions}
        for rep in range(args.reps):
            for version, path in versions.items():
                env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
                if path:
                    env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
                cmd = [sys.executable, os.path.abspath(__file__), "--measure", json.dumps(paths),
                       "--batches", str(args.batches), "--warm", str(args.warm),
                       "--padding-batches", str(args.padding_batches if rep == 0 else 0)]
                r = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
                if r.returncode:
                    sys.stderr.write(r.stderr[-3000:])
                    return 1
                runs[version].append(json.loads(r.stdout))
                print(f"rep {rep + 1}/{args.reps} {version}: done", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    first = runs["now"][0]
    load |= {"end": os.getloadavg(), "end_utc": time.strftime("%H:%M", time.gmtime())}
    print(f"\n{load['start_utc']}-{load['end_utc']} UTC, load average {load['start'][0]:.1f} at the start, "
          f"{load['end'][0]:.1f} at the end ({os.cpu_count()} cores)")
    print(f"\n{args.images} images ({args.dim}-d), default mix and token budget {first['token_budget']}; "
          f"{args.batches} batches per timed pass ({first['samples_per_pass']:,} samples now), "
          f"{args.reps} subprocesses per version; median (range)\n")
    results = {"images": args.images, "feature_dim": args.dim, "batches": args.batches, "reps": args.reps,
               "before": args.before, "runs": runs, "load": load,
               "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"}
    print("| path | version | samples per CPU-s (all processes) | main us/sample | workers us/sample "
          "| total CPU vs in-process (same run) |")
    print("|---|---|---:|---:|---:|---:|")
    for path in ("floor", "floor: read_into", "in-process", "1 worker", "2 workers"):
        for version in versions:
            rs = [r[path] for r in runs[version] if path in r]
            if not rs:
                continue
            rate = [r["samples"] / (r["main_cpu"] + r["worker_cpu"]) for r in rs]
            main_us = [1e6 * r["main_cpu"] / r["samples"] for r in rs]
            work_us = [1e6 * r["worker_cpu"] / r["samples"] for r in rs]
            vs = [(r[path]["main_cpu"] + r[path]["worker_cpu"]) / r[path]["samples"]
                  / (r["in-process"]["main_cpu"] / r["in-process"]["samples"]) for r in runs[version]]
            results[f"{version} {path}"] = {"samples_per_cpu_s": rate, "main_us": main_us, "workers_us": work_us,
                                            "cpu_vs_in_process": vs}
            print(f"| {path} | {version} | {spread(rate, ',.0f')} | {spread(main_us, '.1f')} | "
                  f"{spread(work_us, '.1f') if path.endswith(('worker', 'workers')) else '-'} | "
                  f"{spread(vs, '.2f') if not path.startswith('floor') else '-'} |")
    for floor in ("floor", "floor: read_into"):
        for version in versions:
            if any(floor not in r for r in runs[version]):
                continue
            ratio = [(r[floor]["main_cpu"] / r[floor]["samples"]) / (r["in-process"]["main_cpu"]
                                                                    / r["in-process"]["samples"])
                     for r in runs[version]]
            results[f"{version} in-process vs {floor}"] = ratio
            print(f"\nin-process / {floor} ({version}, samples per CPU-s): {spread(ratio, '.2f')}", end="")
    print()
    tasks = [t for t in runs["now"][0].get("padding", {}) if t != "all"]  # none with --padding-batches 0
    if tasks:
        print("\n| task | version | batches | padded tokens / budget: mean | max | batches over budget | padding |")
        print("|---|---|---:|---:|---:|---:|---:|")
    for task in tasks + ["all"] if tasks else []:
        for version in versions:
            s = runs[version][0]["padding"].get(task)
            if s is None:
                continue
            mean = f"{s['mean_over_budget']:.2f}" if "mean_over_budget" in s else "-"
            print(f"| {task} | {version} | {s['batches']} | {mean} | {s['max_over_budget']:.2f} | "
                  f"{s['batches_over']} | {100 * s['padding']:.1f}% |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
