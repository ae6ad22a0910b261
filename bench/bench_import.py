"""Import throughput and peak memory of `regionbert-shards import` on a generated bottom-up-attention TSV.

    python bench/bench_import.py                       # 1000 images x 36 boxes x 2048-d, 1 / 2 / all cores
    python bench/bench_import.py --mem-rows 8000 --limit-mb 1024

1. Throughput: the TSV (float32 base64, as generate_tsv.py writes it: ~390 KB per image) is imported by
   the real command in a subprocess with -j 1, 2 and all cores; records/s and TSV MB/s from wall time
   (process start and the first-row probe included).
2. Memory: a TSV of --mem-rows images (several times --limit-mb) is imported with the converter's data
   segment capped at --limit-mb (RLIMIT_DATA, inherited by its worker processes: a converter that held
   the file in RAM would die), while the anonymous memory (RssAnon) of the whole process tree is sampled
   every 50 ms. LMDB's file-backed map pages are page cache, not the converter's memory, so they are
   reported apart (RssFile).
Big files go to --workdir and are deleted afterwards.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
from tqdm import tqdm


def write_tsv(path: str, rows: int, boxes: int, dim: int, seed: int = 0) -> int:
    """A bottom-up-attention TSV: image_id, image_w, image_h, num_boxes, boxes, features. Returns bytes."""
    rng = np.random.default_rng(seed)
    feats = rng.gamma(1.0, 1.0, (64, boxes, dim)).astype(np.float32)  # reused blocks: generation stays fast
    with open(path, "w") as f:
        for i in tqdm(range(rows), desc=f"write {os.path.basename(path)}", unit="row", leave=False):
            w, h = int(rng.integers(400, 800)), int(rng.integers(300, 600))
            x1, y1 = rng.uniform(0, w - 1, boxes), rng.uniform(0, h - 1, boxes)
            bx = np.stack([x1, y1, rng.uniform(x1, w), rng.uniform(y1, h)], 1).astype(np.float32)
            f.write(f"{i}\t{w}\t{h}\t{boxes}\t{base64.b64encode(bx.tobytes()).decode()}\t"
                    f"{base64.b64encode(feats[i % 64].tobytes()).decode()}\n")
    return os.path.getsize(path)


def _tree(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                ppid = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(d))
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


def _mem_kb(pid: int) -> tuple[int, int]:
    anon = file = 0
    try:
        for line in open(f"/proc/{pid}/status"):
            if line.startswith("RssAnon:"):
                anon = int(line.split()[1])
            elif line.startswith("RssFile:"):
                file = int(line.split()[1])
    except OSError:
        pass
    return anon, file


def run_import(tsv: str, shard: str, jobs: int, limit_mb: int | None = None) -> dict:
    """The real command in a subprocess; wall time and peak memory of its process tree."""
    cmd = [sys.executable, "-m", "regionbert.data.cli", "import", tsv, "-o", shard, "-q", "-j", str(jobs)]

    def cap():
        if limit_mb:
            resource.setrlimit(resource.RLIMIT_DATA, (limit_mb << 20, limit_mb << 20))

    peak = {"anon_mb": 0.0, "file_mb": 0.0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, preexec_fn=cap)

    def sample():
        while proc.poll() is None:
            mem = [_mem_kb(p) for p in _tree(proc.pid)]
            peak["anon_mb"] = max(peak["anon_mb"], sum(m[0] for m in mem) / 1024)
            peak["file_mb"] = max(peak["file_mb"], sum(m[1] for m in mem) / 1024)
            time.sleep(0.05)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    out, err = proc.communicate()
    wall = time.perf_counter() - t0
    t.join()
    if proc.returncode != 0:
        raise SystemExit(f"import failed ({proc.returncode}): {err[-2000:]}")
    return {"wall_s": round(wall, 2), "stdout": out.strip(), "peak_tree_rss_anon_mb": round(peak["anon_mb"]),
            "peak_tree_rss_file_mb": round(peak["file_mb"])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=1000, help="images in the throughput TSV")
    ap.add_argument("--boxes", type=int, default=36)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--mem-rows", type=int, default=8000, help="images in the memory TSV (0: skip)")
    ap.add_argument("--limit-mb", type=int, default=1024, help="RLIMIT_DATA for the converter in the memory run")
    ap.add_argument("--workdir", default=None, help="where the TSVs and shards go (default: a temp folder)")
    ap.add_argument("--out", default="bench/out/import/results.json")
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="bench-import-", dir=args.workdir)
    cores = os.cpu_count() or 1
    results = {"rows": args.rows, "boxes": args.boxes, "dim": args.dim, "cores": cores, "throughput": []}
    try:
        tsv = os.path.join(work, "butd.tsv")
        size = write_tsv(tsv, args.rows, args.boxes, args.dim)
        results["tsv_mb"] = round(size / 2**20)
        for jobs in sorted({1, 2, cores}):
            shard = os.path.join(work, f"shard-j{jobs}")
            r = run_import(tsv, shard, jobs)
            r.update(jobs=jobs, records_per_s=round(args.rows / r["wall_s"], 1),
                     tsv_mb_per_s=round(size / 2**20 / r["wall_s"], 1))
            results["throughput"].append(r)
            print(f"-j {jobs}: {r['records_per_s']} records/s, {r['tsv_mb_per_s']} MB/s of TSV "
                  f"({r['wall_s']} s), peak tree RssAnon {r['peak_tree_rss_anon_mb']} MB", flush=True)
            shutil.rmtree(shard)
        os.remove(tsv)
        if args.mem_rows:
            tsv = os.path.join(work, "big.tsv")
            size = write_tsv(tsv, args.mem_rows, args.boxes, args.dim, seed=1)
            r = run_import(tsv, os.path.join(work, "shard-big"), -1, limit_mb=args.limit_mb)
            r.update(rows=args.mem_rows, tsv_mb=round(size / 2**20), limit_mb=args.limit_mb,
                     records_per_s=round(args.mem_rows / r["wall_s"], 1))
            results["memory"] = r
            print(f"memory: {r['tsv_mb']} MB TSV imported under RLIMIT_DATA {args.limit_mb} MB: peak tree RssAnon "
                  f"{r['peak_tree_rss_anon_mb']} MB (file-backed {r['peak_tree_rss_file_mb']} MB), "
                  f"{r['records_per_s']} records/s", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
