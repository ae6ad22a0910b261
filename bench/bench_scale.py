"""Memory and start-up of a rank's data as the corpus grows (issue 24 item 4): before and after the captions table.

    python bench/bench_scale.py                          # 40k / 160k images x 5 captions, 16-d; ~15 minutes here
    python bench/bench_scale.py --before c3b0d1d --images 40000 160000 --out bench/out/scale
    python bench/bench_scale.py --before 010e373 ...     # the table, before the compact samplers (run warm)

A synthetic corpus at two sizes, the larger holding the smaller's shard plus more shards of the same size
(regionbert.data.synth: 16-d float16 features, 2-10 boxes, 8 classes, so that it fits the disk; 5 captions
per image from a 60-word vocabulary). Each configuration runs as `torchrun --nproc_per_node 2` of this
script's --child mode, 2 loader workers per rank, as the trainer builds them (train.run.build_data with
rank and world size), `before` from `git archive` of --before on PYTHONPATH, `now` this working tree
(a --before that has the captions table is run cold, then warm: its warm run is the "before" row):

- start-up: from entering build_data to the first batch in the rank's hands (pairs, samplers, loader,
  workers started); `now` cold (its captions table folder emptied first: the table is built) and warm
  (the table read). Imports are measured apart (the same for every size).
- steady samples/s: per rank, over --batches batches after --warm ones (no model: the data path alone).
- memory: after those batches, with every worker alive, each process's USS (Private_Clean + Private_Dirty)
  and PSS from /proc/PID/smaps_rollup; "per rank" sums a rank and its loader workers.
- slopes between the two sizes: bytes per caption (PSS and USS per rank with its workers) and seconds
  per million captions of start-up.

Figures are per rank, averaged over the 2 ranks. --json writes everything.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from gitcheckout import checkout  # bench/, the script's folder, is on sys.path

T0 = time.perf_counter()
HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
WORDS = ["a", "an", "the", "photo", "picture", "of", "with", "and", "on", "in", "near", "under", "two", "three",
         "dog", "cat", "man", "woman", "child", "car", "bus", "tree", "street", "table", "cup", "plate", "pizza",
         "horse", "beach", "sofa", "bed", "room", "kitchen", "field", "grass", "sky", "water", "boat", "bike",
         "red", "blue", "green", "white", "black", "small", "large", "old", "young", "sitting", "standing",
         "riding", "holding", "eating", "looking", "at", "next", "to", "front", "behind", "its"]
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
PER_IMAGE = 5


# ----------------------------------------------------------------------------- data
def make_shard(path: str, n: int, prefix: str, dim: int = 16) -> None:
    from regionbert.data.synth import REAL_CLASSES, write_synthetic_shard
    if not os.path.exists(os.path.join(path, "data.mdb")):
        write_synthetic_shard(path + ".partial", n, feature_dim=dim, min_boxes=2, max_boxes=10, seed=0,
                              id_prefix=prefix, classes=REAL_CLASSES[:8])
        os.rename(path + ".partial", path)


def make_corpus(out: str, sizes: list[int], dim: int = 16) -> list[dict]:
    """Shards of sizes[0] images each (written two at a time), a manifest and a vocab per size."""
    import numpy as np
    import pandas as pd

    from regionbert.data import ShardSet
    step = sizes[0]
    if any(s % step for s in sizes):
        raise SystemExit(f"--images {sizes}: each size must be a multiple of the first")
    tag = "" if dim == 16 else f"{dim}d-"  # 16-d shards keep their first names
    shards = [os.path.join(out, f"shard-{tag}{i:02d}") for i in range(max(sizes) // step)]
    todo = [(p, i) for i, p in enumerate(shards) if not os.path.exists(os.path.join(p, "data.mdb"))]
    t = time.perf_counter()
    for a in range(0, len(todo), 2):  # two processes at a time (two cores)
        procs = [subprocess.Popen([sys.executable, __file__, "--make-shard", p, str(step), f"s{i:02d}", str(dim)])
                 for p, i in todo[a:a + 2]]
        if any(p.wait() for p in procs):
            raise SystemExit("writing a synthetic shard failed")
    if todo:
        print(f"wrote {len(todo)} shards of {step} images in {time.perf_counter() - t:.0f}s", flush=True)
    vocab = os.path.join(out, "vocab.txt")
    with open(vocab, "w") as f:  # (shared by every dim)
        f.write("\n".join(SPECIAL + WORDS) + "\n")
    corpora = []
    for size in sizes:
        use = shards[:size // step]
        manifest = os.path.join(out, f"captions-{tag}{size}.csv")
        if not os.path.exists(manifest):
            rng = np.random.default_rng(size)
            ids = np.array([k for s in use for k in ShardSet(s).keys()])
            n = len(ids) * PER_IMAGE
            lens = rng.integers(6, 16, n)
            words = np.array(WORDS)[rng.integers(0, len(WORDS), int(lens.sum()))]
            cuts = np.cumsum(lens)[:-1]
            caps = [" ".join(w) for w in np.split(words, cuts)]
            pd.DataFrame({"image_id": np.repeat(ids, PER_IMAGE), "caption": caps,
                          "split": "train"}).to_csv(manifest + ".partial", index=False)
            os.rename(manifest + ".partial", manifest)
        corpora.append({"shards": use, "captions": manifest, "tokenizer": vocab, "images": size,
                        "captions_n": size * PER_IMAGE})
    return corpora


# ----------------------------------------------------------------------------- one rank (under torchrun)
def smaps(pid: int) -> dict:
    """A process's memory (bytes): PSS, USS, RSS from smaps_rollup, PSS split into anonymous + shared memory
    (what the process owns: Python objects, arrays, batch buffers) and file pages, and the PSS of two kinds
    of mapping from smaps: the captions table (*.captions) and the shards (data.mdb; pages mapped as records
    are read, with the kernel's fault-around, so they grow with what was read, not with the captions)."""
    out = {}
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 3 and parts[-1] == "kB":
                out[parts[0].rstrip(":")] = int(parts[1]) * 1024
    kinds, kind = {"table": 0, "shards": 0}, None
    with open(f"/proc/{pid}/smaps") as f:
        for line in f:
            parts = line.split()
            if parts and "-" in parts[0] and len(parts) >= 5:  # a mapping's first line: address perms ... [path]
                path = parts[5] if len(parts) > 5 else ""
                kind = "table" if path.endswith(".captions") else "shards" if path.endswith("data.mdb") else None
            elif kind and parts and parts[0] == "Pss:":
                kinds[kind] += int(parts[1]) * 1024
    return {"pss": out.get("Pss", 0), "uss": out.get("Private_Clean", 0) + out.get("Private_Dirty", 0),
            "rss": out.get("Rss", 0), "pss_owned": out.get("Pss_Anon", 0) + out.get("Pss_Shmem", 0),
            "pss_file": out.get("Pss_File", 0), "pss_table": kinds["table"], "pss_shards": kinds["shards"]}


def children(pid: int) -> list[int]:
    kids = []
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/children") as f:
                kids += [int(x) for x in f.read().split()]
        except OSError:
            pass
    return sorted(set(kids))


def child(args) -> None:
    import torch
    t_import = time.perf_counter() - T0
    import regionbert.train
    from regionbert.train import config as cfg_module
    from regionbert.train.config import load_config
    from regionbert.train.run import build_data
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    sets = [f"data.shards={json.dumps(args.shards)}", f"data.captions={json.dumps(args.captions)}",
            f"data.tokenizer={json.dumps(args.tokenizer)}", "data.num_workers=2", "data.eval_split=null",
            "model.max_text_len=40", f"data.token_budget={args.budget}", f"run.out={json.dumps(args.workdir)}"]
    if args.cache and hasattr(cfg_module.DataConfig(), "captions_cache"):  # (a commit before the table: none)
        sets.append(f"data.captions_cache={json.dumps(args.cache)}")
    cfg = load_config(None, sets)
    t = time.perf_counter()
    pairs, _, _, loader = build_data(cfg, "train", num_workers=2, rank=rank, world_size=world)
    t_built = time.perf_counter() - t
    it = iter(loader)
    next(it)
    t_first = time.perf_counter() - t
    for _ in range(args.warm):
        next(it)
    samples, t = 0, time.perf_counter()
    for _ in range(args.batches):
        samples += len(next(it)["text_lens"])
    rate = samples / (time.perf_counter() - t)
    me = smaps(os.getpid())
    workers = [smaps(p) for p in children(os.getpid())]
    table = getattr(pairs, "table", None)
    result = {"rank": rank, "package": os.path.dirname(regionbert.train.__file__), "captions": len(pairs),
              "images": pairs.num_images, "import_s": t_import, "build_data_s": t_built, "first_batch_s": t_first,
              "samples_per_s": rate, "main": me, "workers": workers,
              **{f"rank_{k}": me[k] + sum(w[k] for w in workers) for k in me},
              "built": None if table is None else table.built}
    with open(os.path.join(args.result, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    del it


# ----------------------------------------------------------------------------- the driver
def run_one(corpus: dict, pythonpath: str | None, cache: str | None, work: str, args) -> dict:
    result = tempfile.mkdtemp(dir=work)
    cmd = [shutil.which("torchrun") or "torchrun", "--standalone", "--nproc_per_node", "2", __file__, "--child",
           "--shards", *corpus["shards"], "--captions", corpus["captions"], "--tokenizer", corpus["tokenizer"],
           "--workdir", os.path.join(work, "run"), "--result", result, "--batches", str(args.batches),
           "--warm", str(args.warm), "--budget", str(args.budget)] + (["--cache", cache] if cache else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false"}
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    ranks = [json.load(open(os.path.join(result, f"rank{i}.json"))) for i in range(2)]
    return {"wall_s": time.perf_counter() - t, "ranks": ranks,
            **{k: sum(x[k] for x in ranks) / 2 for k in ranks[0] if k.startswith("rank_")
               or k in ("first_batch_s", "build_data_s", "import_s", "samples_per_s")},
            "main_pss": sum(x["main"]["pss"] for x in ranks) / 2,
            "worker_pss": sum(w["pss"] for x in ranks for w in x["workers"]) / max(1, sum(len(x["workers"])
                                                                                         for x in ranks)),
            "built": [x["built"] for x in ranks]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--before", default="c3b0d1d", help="the commit to compare with (before the captions table)")
    p.add_argument("--images", type=int, nargs="+", default=[40000, 160000], help="two sizes (or one, without slopes)")
    p.add_argument("--dim", type=int, default=16, help="feature dim of the shards (16; 2048 to compare start-up)")
    p.add_argument("--now-only", action="store_true", help="only this tree (cold, warm), not --before")
    p.add_argument("--out", default=os.path.join(HERE, "out", "scale"))
    p.add_argument("--batches", type=int, default=100)
    p.add_argument("--warm", type=int, default=10)
    p.add_argument("--budget", type=int, default=4096)
    p.add_argument("--json")
    # child mode
    p.add_argument("--child", action="store_true")
    p.add_argument("--make-shard", nargs=4)
    for a in ("--captions", "--tokenizer", "--workdir", "--result", "--cache"):
        p.add_argument(a)
    p.add_argument("--shards", nargs="+")
    args = p.parse_args()
    if args.make_shard:
        return make_shard(args.make_shard[0], int(args.make_shard[1]), args.make_shard[2], int(args.make_shard[3]))
    if args.child:
        return child(args)
    os.makedirs(args.out, exist_ok=True)
    corpora = make_corpus(args.out, args.images, args.dim)
    work = tempfile.mkdtemp(dir=args.out, prefix="work-")
    before = checkout(args.before, os.path.join(work, "before"))
    rows = {}
    for c in corpora:
        n = c["captions_n"]
        if not args.now_only:
            # a commit that has the captions table builds it on the first run (into a folder of its own);
            # the "before" row is then its warm run, as "now warm" is (the cold one is kept as "before cold")
            before_cache = os.path.join(work, f"cache-before-{n}")
            rows[("before", n)] = run_one(c, before, before_cache, work, args)
            if any(rows[("before", n)]["built"]):
                rows[("before cold", n)] = rows[("before", n)]
                print(f"before cold {n}: {summary(rows[('before cold', n)])}", flush=True)
                rows[("before", n)] = run_one(c, before, before_cache, work, args)
            print(f"before {n}: {summary(rows[('before', n)])}", flush=True)
        cache = os.path.join(work, f"cache-{n}")
        rows[("now cold", n)] = run_one(c, None, cache, work, args)
        print(f"now cold {n}: {summary(rows[('now cold', n)])}", flush=True)
        rows[("now warm", n)] = run_one(c, None, cache, work, args)
        print(f"now warm {n}: {summary(rows[('now warm', n)])}", flush=True)
    if len(corpora) == 2 and not args.now_only:
        print(table(rows, [c["captions_n"] for c in corpora]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({f"{k[0]} {k[1]}": v for k, v in rows.items()}, f, indent=1)
    shutil.rmtree(work, ignore_errors=True)


def summary(r: dict) -> str:
    return (f"first batch {r['first_batch_s']:.2f}s (build_data {r['build_data_s']:.2f}s, "
            f"imports {r['import_s']:.1f}s), "
            f"{r['samples_per_s']:.0f} samples/s, per rank PSS {r['rank_pss'] / 2**20:.0f} MiB (owned "
            f"{r['rank_pss_owned'] / 2**20:.0f}, table {r['rank_pss_table'] / 2**20:.1f}, shards "
            f"{r['rank_pss_shards'] / 2**20:.0f}) USS "
            f"{r['rank_uss'] / 2**20:.0f} MiB (main PSS {r['main_pss'] / 2**20:.0f}, worker PSS "
            f"{r['worker_pss'] / 2**20:.0f}), built {r['built']}")


def table(rows: dict, sizes: list[int]) -> str:
    a, b = sizes
    d = b - a
    lines = ["| | " + " | ".join(f"{n:,} captions" for n in sizes) + " | slope |", "|---|---|---|---|"]

    def line(label, key, fmt, scale=1.0, unit=""):
        for version in ("before", "now cold", "now warm"):
            x, y = rows[(version, a)][key], rows[(version, b)][key]
            lines.append(f"| {version}: {label} | {fmt.format(x * scale)} | {fmt.format(y * scale)} | "
                         f"{(y - x) / d * (1e6 if unit == 's/M' else 1):.1f} {unit} |")

    line("first batch (s)", "first_batch_s", "{:.2f}", unit="s/M")
    line("PSS per rank incl. workers (MiB)", "rank_pss", "{:.0f}", 2**-20, "B/caption")
    line("  of which owned: anonymous + shared memory (MiB)", "rank_pss_owned", "{:.1f}", 2**-20, "B/caption")
    line("  of which the captions table's pages (MiB)", "rank_pss_table", "{:.1f}", 2**-20, "B/caption")
    line("  of which shard pages mapped (MiB)", "rank_pss_shards", "{:.1f}", 2**-20, "B/caption")
    line("USS per rank incl. workers (MiB)", "rank_uss", "{:.0f}", 2**-20, "B/caption")
    line("main process PSS (MiB)", "main_pss", "{:.0f}", 2**-20, "B/caption")
    line("one worker's PSS (MiB)", "worker_pss", "{:.0f}", 2**-20, "B/caption")
    line("steady samples/s per rank", "samples_per_s", "{:.0f}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
