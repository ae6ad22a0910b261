#!/usr/bin/env python
"""Random-access read throughput: our shard format against the usual ways of storing region features.

    python bench/bench_read.py --records 20000 --out bench/out      # the measurement in bench/README.md
    python bench/bench_read.py --records 500 --out bench/out        # smoke run, a few seconds

Data. Our shard is written with `regionbert.data.synth.write_synthetic_shard` (N in [10, 100] boxes,
1024-dim float16 features, 91-class float16 class probabilities, float32 boxes, float32 loc5/loc7,
a small JSON `extra`). Every baseline is then built from that shard's decoded records, so all formats
hold the same arrays, bit for bit. Files are kept under --out/records-R-seed-S/ and reused by reruns
with the same parameters (a `<format>.done.json` marker names them).

Formats, each read in the same fixed random order (one permutation, same for all):
  ours, by index / by key   ShardReader(path) with checksum verification ON (default); reader[i] and
                            reader.get(image_id).
  pickle in LMDB            the ViLBERT/MMF way: value = pickle.dumps(dict of numpy arrays) (default
                            protocol); read = txn.get(key) + pickle.loads.
  msgpack-numpy in LMDB     the UNITER way, uncompressed: msgpack.packb(dict, default=msgpack_numpy.encode);
                            read = txn.get(key) + msgpack.unpackb(object_hook=msgpack_numpy.decode).
  padded HDF5               datasets (R, 100, D) padded to 100 boxes, chunked one record per chunk
                            ((1, 100, D)), uncompressed; num_boxes and image sizes are loaded into
                            memory at open; read = ds[i, :n] for each array dataset. Opened with the
                            chunk cache off (rdcc_nbytes=0), several times faster for random reads of
                            whole records than h5py's defaults (--h5-defaults times those instead).
  ceiling                   txn.get(key) on our shard + np.frombuffer(value, uint8) over the whole value:
                            no checksum, no header, no parsing.

Fairness rules:
  * Every LMDB environment (ours, baselines, ceiling) is opened readonly=True, lock=False,
    readahead=False, and read through one long-lived read transaction with buffers=True; so the
    baselines get a zero-copy memoryview of the value too. Their real loaders use LMDB's default,
    buffers=False, which first copies each value into a new bytes object: one row shows that for pickle.
  * Every read yields numpy arrays for boxes, features, class_probs, loc5 and loc7 (what a trainer
    needs), and the benchmark touches each one the same minimal way: its .shape and its last element.
    Copying decoders (pickle, msgpack, HDF5) pay for their copies; ours returns zero-copy views but
    verifies a checksum over every byte of the record, so it reads every byte anyway.
  * The page cache is warmed first (each file is read end to end, then one untimed pass of the reads),
    so this measures decode cost, not the disk. The garbage collector is off during timed passes.
  * Each format is timed over --repeat passes of the permutation, round-robin across formats (so a burst
    of other load on the machine spoils one pass of several formats, not every pass of one); the table
    shows the best pass, its median, and the CPU time / wall time of the best pass (< 90% means the
    process was descheduled: the machine was busy).

Rows marked (diag) are diagnostics, not targets: ours with verify=False, and the ceiling plus XXH3 over
the record (the floor for any read that checks every byte). --breakdown times the pieces of a verified
read.

--consume says what is done with each record read:
  touch  the shape and last element of each array (the least a reader can be asked for);
  copy   every array copied into a preallocated buffer, as a collate function copies records into a
         batch: a trainer pulls every byte it reads out of memory once, whatever the format.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import pickle
import platform
import shutil
import statistics
import struct
import subprocess
import sys
import time

import h5py
import lmdb
import msgpack
import msgpack_numpy
import numpy as np
from tqdm import tqdm

from regionbert.data import ShardReader
from regionbert.data.format import (
    decode_record,
    record_checksum,
)
from regionbert.data.reader import _handle
from regionbert.data.synth import write_synthetic_shard
from regionbert.data.writer import order_key

ARRAYS = ("boxes", "features", "class_probs", "loc5", "loc7")
MAX_BOXES = 100
MIN_BOXES = 10
FEATURE_DIM = 1024
BENCH_VERSION = 1  # bump when the files written here change
_CHECKSUM = struct.Struct("<Q")
LMDB_READ = dict(readonly=True, lock=False, readahead=False)  # the same for every LMDB variant


# ---- building the files ---------------------------------------------------------------------------------


def is_done(marker: str, params: dict) -> bool:
    try:
        with open(marker) as f:
            return json.load(f) == params
    except (OSError, ValueError):
        return False


def mark_done(marker: str, params: dict) -> None:
    with open(marker, "w") as f:
        json.dump(params, f)


def remove(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path)
    elif os.path.exists(path):
        os.remove(path)


def build_ours(path: str, records: int, seed: int) -> None:
    with tqdm(total=records, desc="ours (ShardWriter)", unit="rec") as bar:
        write_synthetic_shard(path, records, feature_dim=FEATURE_DIM, min_boxes=MIN_BOXES, max_boxes=MAX_BOXES,
                              seed=seed, progress=bar.update)


def record_dict(rec) -> dict:
    """One record as the dict the pickle / msgpack baselines store (arrays copied out of the map)."""
    d = {"image_id": rec.id, "image_w": rec.width, "image_h": rec.height, "num_boxes": rec.num_boxes,
         "extra": rec.extra}
    d.update({name: np.array(getattr(rec, name)) for name in ARRAYS})
    return d


def build_lmdb_baseline(path: str, reader: ShardReader, encode, desc: str) -> None:
    env = lmdb.open(path, subdir=True, map_size=len(reader) * 512 * 1024 + (1 << 30))
    batch = 256
    with tqdm(total=len(reader), desc=desc, unit="rec") as bar:
        for start in range(0, len(reader), batch):
            with env.begin(write=True) as txn:
                for i in range(start, min(start + batch, len(reader))):
                    rec = reader[i]
                    txn.put(rec.id.encode("utf-8"), encode(record_dict(rec)))
            bar.update(min(batch, len(reader) - start))
    env.sync(True)
    env.close()


def encode_pickle(d: dict) -> bytes:
    return pickle.dumps(d)


def encode_msgpack(d: dict) -> bytes:
    return msgpack.packb(d, default=msgpack_numpy.encode, use_bin_type=True)


def build_h5(path: str, reader: ShardReader) -> None:
    r = len(reader)
    meta = reader.meta
    widths = {"boxes": 4, "features": meta["feature_dim"], "class_probs": len(meta["class_names"]),
              "loc5": 5, "loc7": 7}
    dtypes = {"boxes": np.float32, "features": np.float16, "class_probs": np.float16,
              "loc5": np.float32, "loc7": np.float32}
    batch = 256
    with h5py.File(path + ".tmp", "w") as f:
        ds = {name: f.create_dataset(name, shape=(r, MAX_BOXES, widths[name]), dtype=dtypes[name],
                                     chunks=(1, MAX_BOXES, widths[name])) for name in ARRAYS}
        num_boxes = np.zeros(r, np.int32)
        sizes = np.zeros((r, 2), np.int32)
        ids = []
        with tqdm(total=r, desc="padded HDF5", unit="rec") as bar:
            for start in range(0, r, batch):
                stop = min(start + batch, r)
                bufs = {name: np.zeros((stop - start, MAX_BOXES, widths[name]), dtypes[name]) for name in ARRAYS}
                for i in range(start, stop):
                    rec = reader[i]
                    n = num_boxes[i] = rec.num_boxes
                    sizes[i] = rec.width, rec.height
                    ids.append(rec.id)
                    for name in ARRAYS:
                        bufs[name][i - start, :n] = getattr(rec, name)
                for name in ARRAYS:
                    ds[name][start:stop] = bufs[name]
                bar.update(stop - start)
        f.create_dataset("num_boxes", data=num_boxes)
        f.create_dataset("image_wh", data=sizes)
        f.create_dataset("image_id", data=np.array(ids, dtype=h5py.string_dtype()))
    os.replace(path + ".tmp", path)


def build_all(folder: str, records: int, seed: int, rebuild: bool) -> dict:
    os.makedirs(folder, exist_ok=True)
    params = {"bench_version": BENCH_VERSION, "records": records, "seed": seed, "min_boxes": MIN_BOXES,
              "max_boxes": MAX_BOXES, "feature_dim": FEATURE_DIM}
    paths = {"ours": os.path.join(folder, "ours"), "pickle": os.path.join(folder, "pickle.lmdb"),
             "msgpack": os.path.join(folder, "msgpack.lmdb"), "h5": os.path.join(folder, "padded.h5")}
    marker = {k: os.path.join(folder, f"{k}.done.json") for k in paths}
    if rebuild or not is_done(marker["ours"], params):
        for k in paths:  # the baselines derive from our shard: rebuild everything
            remove(paths[k])
            remove(marker[k])
        build_ours(paths["ours"], records, seed)
        mark_done(marker["ours"], params)
    reader = ShardReader(paths["ours"])
    builders = {
        "pickle": lambda p: build_lmdb_baseline(p, reader, encode_pickle, "pickle in LMDB"),
        "msgpack": lambda p: build_lmdb_baseline(p, reader, encode_msgpack, "msgpack-numpy in LMDB"),
        "h5": lambda p: build_h5(p, reader),
    }
    for k, build in builders.items():
        if not is_done(marker[k], params):
            remove(paths[k])
            t0 = time.perf_counter()
            build(paths[k])
            mark_done(marker[k], params)
            print(f"  built {paths[k]} in {time.perf_counter() - t0:.0f} s", flush=True)
    return paths


# ---- readers: each returns a function (key or index) -> tuple of the five arrays --------------------------


@functools.cache
def open_lmdb(path: str) -> lmdb.Environment:
    """One environment per file per process (py-lmdb refuses a second); each reader begins its own txn."""
    return lmdb.open(path, subdir=True, max_dbs=3, **LMDB_READ)


def read_ours_by_index(path: str):
    reader = ShardReader(path)  # verify=True, copy=False: the defaults

    def read(i: int):
        rec = reader[i]
        return rec.boxes, rec.features, rec.class_probs, rec.loc5, rec.loc7

    return read


def read_ours_by_key(path: str, verify: bool = True):
    reader = ShardReader(path, verify=verify)

    def read(image_id: str):
        rec = reader.get(image_id)
        return rec.boxes, rec.features, rec.class_probs, rec.loc5, rec.loc7

    return read


def read_pickle(path: str, buffers: bool = True):
    txn = open_lmdb(path).begin(buffers=buffers)

    def read(key: bytes):
        d = pickle.loads(txn.get(key))
        return d["boxes"], d["features"], d["class_probs"], d["loc5"], d["loc7"]

    return read


def read_msgpack(path: str):
    txn = open_lmdb(path).begin(buffers=True)

    def read(key: bytes):
        d = msgpack.unpackb(txn.get(key), object_hook=msgpack_numpy.decode, raw=False)
        return d["boxes"], d["features"], d["class_probs"], d["loc5"], d["loc7"]

    return read


def read_h5(path: str, chunk_cache: bool):
    """chunk_cache=False opens with rdcc_nbytes=0: no record is read twice, so HDF5's chunk cache (1 MiB
    per dataset by default) only costs; without it HDF5 reads just the selected rows of a chunk. (HDF5
    keeps one shared state per open file per process: the first open's cache settings win, so one run
    can time only one of the two.)"""
    f = h5py.File(path, "r") if chunk_cache else h5py.File(path, "r", rdcc_nbytes=0)
    num_boxes = f["num_boxes"][:]  # what an HDF5 loader keeps in memory
    f["image_wh"][:]
    boxes, features, class_probs, loc5, loc7 = (f[name] for name in ARRAYS)

    def read(i: int):
        n = num_boxes[i]
        return boxes[i, :n], features[i, :n], class_probs[i, :n], loc5[i, :n], loc7[i, :n]

    return read


def shard_env(path: str):
    """Our shard's environment and its records and order tables. py-lmdb allows one open environment per
    file per process, so the ceiling and the diagnostics borrow the ShardReader's (readonly, lock=False,
    readahead=False, like every other variant here; reader internals, so this may need updating when
    data/reader.py changes) and read it through their own read transaction."""
    h = _handle(os.path.abspath(path))
    if h.env is None:
        raise SystemExit(f"{path}: shard is not complete; rebuild with --rebuild")
    records, order, _meta = h.dbs
    return h.env, records, order


def read_ceiling(path: str):
    env, db, _ = shard_env(path)
    txn = env.begin(buffers=True)

    def read(key: bytes):
        return (np.frombuffer(txn.get(key, db=db), np.uint8),)

    return read


def read_checksum_only(path: str):
    """Diagnostic: the ceiling plus XXH3 over the record, i.e. the floor for a verified read."""
    env, db, _ = shard_env(path)
    txn = env.begin(buffers=True)

    def read(key: bytes):
        v = txn.get(key, db=db)
        record_checksum(key, v[:-8])
        return (np.frombuffer(v, np.uint8),)

    return read


# ---- timing -----------------------------------------------------------------------------------------------


def touch(arrays) -> float:
    """The same minimal use of every array, for every format: its shape and its last element."""
    s = 0.0
    for a in arrays:
        s += a.shape[0] + a.item(-1)
    return s


_SINK = np.empty(1 << 20, np.uint8)


def copy_out(arrays) -> float:
    """What a collate function does: every array copied into a (preallocated) batch buffer."""
    s, off = 0.0, 0
    for a in arrays:
        b = a.reshape(-1).view(np.uint8)
        _SINK[off:off + b.size] = b
        off += b.size
        s += a.shape[0] + a.item(-1)
    return s


CONSUMERS = {"touch": touch, "copy": copy_out}
consume = touch


def one_pass(read, items) -> tuple[float, float, float]:
    """(wall seconds, CPU seconds of this process, sum of touched elements) for one pass over items."""
    s = 0.0
    c0, t0 = time.process_time(), time.perf_counter()
    for x in items:
        s += consume(read(x))
    return time.perf_counter() - t0, time.process_time() - c0, s


def warm_files(paths) -> None:
    """Pull files into the page cache by reading them end to end."""
    buf = bytearray(64 << 20)
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while f.readinto(buf):
                pass


def measure_all(cases, repeat: int) -> list[dict]:
    """Time every case `repeat` times, round-robin (so a burst of other load hits one pass of several
    formats rather than every pass of one), after one untimed pass each. GC is off while timing."""
    readers = []
    for label, _role, path, make_reader, items in cases:
        read = make_reader(path)
        one_pass(read, items)  # untimed: maps the pages, fills HDF5's caches
        readers.append(read)
        print(f"  warmed {label}", flush=True)
    passes = [[] for _ in cases]
    gc.disable()
    try:
        for rep in range(repeat):
            for (label, _role, _path, _make, items), read, out in zip(cases, readers, passes, strict=True):
                wall, cpu, s = one_pass(read, items)
                out.append((wall, cpu, s))
                print(f"  pass {rep + 1}/{repeat}  {label:38s} {wall / len(items) * 1e6:7.1f} µs/read  "
                      f"(cpu/wall {cpu / wall:4.0%})", flush=True)
    finally:
        gc.enable()
    results = []
    for (label, role, path, _make, items), out in zip(cases, passes, strict=True):
        wall, cpu, s = min(out)
        results.append({
            "label": label, "role": role, "reads": len(items), "best_s": wall, "best_cpu_s": cpu,
            "median_s": statistics.median(w for w, _, _ in out), "times_s": [w for w, _, _ in out],
            "reads_per_s": len(items) / wall, "us_per_read": wall / len(items) * 1e6, "touch_sum": s,
            "bytes_per_record": file_size(path) / len(items)})
    return results


def file_size(path: str) -> int:
    return os.path.getsize(data_file(path))


def data_file(path: str) -> str:
    return os.path.join(path, "data.mdb") if os.path.isdir(path) else path


def breakdown(path: str, keys: list[bytes], order: list[int], repeat: int) -> list[tuple[str, float]]:
    """Diagnostic: what the pieces of a verified read cost, µs per read (best of `repeat` passes, in the
    same random order; values are looked up beforehand where a step starts from one)."""
    env, rdb, odb = shard_env(path)
    txn = env.begin(buffers=True)
    pairs = [(k, txn.get(k, db=rdb)) for k in keys]
    reader = ShardReader(path)
    ids = [k.decode() for k in keys]
    steps = [  # (what, function of one item, items)
        ("order table get: index -> key (incl. order_key)", lambda i: txn.get(order_key(i), db=odb), order),
        ("records table get: key -> memoryview", lambda k: txn.get(k, db=rdb), keys),
        ("xxh3 over the record", lambda kv: record_checksum(kv[0], kv[1][:-8]), pairs),
        ("decode_record(verify=False)", lambda kv: decode_record(kv[0], kv[1], verify=False), pairs),
        ("decode_record(verify=True)", lambda kv: decode_record(kv[0], kv[1]), pairs),
        ("ShardReader.get(id), verify=True", reader.get, ids),
        ("ShardReader[i], verify=True", reader.__getitem__, order),
    ]
    out = []
    gc.disable()
    try:
        for name, fn, items in steps:
            _timed(fn, items)
            best = min(_timed(fn, items) for _ in range(repeat))
            out.append((name, best / len(items) * 1e6))
    finally:
        gc.enable()
    return out


def _timed(fn, items) -> float:
    t0 = time.perf_counter()
    for x in items:
        fn(x)
    return time.perf_counter() - t0


# ---- main -------------------------------------------------------------------------------------------------


def print_table(header: list[str], rows: list[list[str]]) -> None:
    """A Markdown table: first column left-aligned, the rest right-aligned."""
    w = [max(len(str(c)) for c in col) for col in zip(header, *rows, strict=True)]
    line = lambda cells: "| " + " | ".join(c.ljust(w[0]) if i == 0 else c.rjust(w[i])  # noqa: E731
                                           for i, c in enumerate(cells)) + " |"
    print(line(header))
    print("|" + "|".join("-" * (w[0] + 2) if i == 0 else "-" * (w[i] + 1) + ":" for i in range(len(w))) + "|")
    for r in rows:
        print(line(r))


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                return line.split(":", 1)[1].strip()
    except (OSError, subprocess.CalledProcessError):
        pass
    return platform.processor() or "unknown"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=20000, help="records per format (default 20000)")
    ap.add_argument("--out", default="bench/out", help="folder for the generated files (reused by reruns)")
    ap.add_argument("--seed", type=int, default=0, help="data seed (the read permutation uses seed+1)")
    ap.add_argument("--repeat", type=int, default=5, help="timed passes per format; the best is reported")
    ap.add_argument("--rebuild", action="store_true", help="regenerate the files even if they exist")
    ap.add_argument("--h5-defaults", action="store_true",
                    help="open the HDF5 file with h5py's default chunk cache instead of none")
    ap.add_argument("--breakdown", action="store_true", help="also time the pieces of a verified read")
    ap.add_argument("--consume", choices=sorted(CONSUMERS), default="touch",
                    help="what is done with each record read (see above)")
    ap.add_argument("--json", help="also write the results here (default: <out>/.../results.json)")
    args = ap.parse_args(argv)
    global consume
    consume = CONSUMERS[args.consume]

    folder = os.path.join(args.out, f"records-{args.records}-seed-{args.seed}")
    print(f"files: {folder}", flush=True)
    paths = build_all(folder, args.records, args.seed, args.rebuild)

    ids = list(ShardReader(paths["ours"]).keys())
    perm = np.random.default_rng(args.seed + 1).permutation(len(ids)).tolist()
    by_index = perm
    by_id = [ids[i] for i in perm]
    by_key = [i.encode("utf-8") for i in by_id]

    cases = [  # (label, role, file, reader factory, items read in order); role "diag*" rows are diagnostics
        ("ours, by index (verify)", "ours", paths["ours"], read_ours_by_index, by_index),
        ("ours, by key (verify)", "ours", paths["ours"], read_ours_by_key, by_id),
        ("pickle in LMDB", "baseline", paths["pickle"], read_pickle, by_key),
        ("pickle in LMDB, buffers=False", "baseline", paths["pickle"], lambda p: read_pickle(p, False), by_key),
        ("msgpack-numpy in LMDB", "baseline", paths["msgpack"], read_msgpack, by_key),
        (f"padded HDF5, {'h5py defaults' if args.h5_defaults else 'chunk cache off'}", "baseline", paths["h5"],
         lambda p: read_h5(p, chunk_cache=args.h5_defaults), by_index),
        ("ceiling: get + frombuffer", "ceiling", paths["ours"], read_ceiling, by_key),
        ("(diag) ours, by key, verify=False", "diag", paths["ours"],
         lambda p: read_ours_by_key(p, verify=False), by_id),
        ("(diag) get + xxh3, no decode", "diag-raw", paths["ours"], read_checksum_only, by_key),
    ]
    print(f"warming the page cache ({len(paths)} files) and one untimed pass per format...", flush=True)
    warm_files(data_file(p) for p in paths.values())
    load_before = os.getloadavg()
    results = measure_all(cases, args.repeat)
    load_after = os.getloadavg()

    # every reader that yields the five arrays must see the same data (the "raw" rows yield bytes)
    sums = {r["label"]: r["touch_sum"] for r in results if r["role"] in ("ours", "baseline", "diag")}
    same = len(set(sums.values())) == 1
    fastest = max((r for r in results if r["role"] == "baseline"), key=lambda r: r["reads_per_s"])
    ceiling = next(r for r in results if r["role"] == "ceiling")

    print()
    print(f"{args.records} records, {len(perm)} random reads per pass (--consume {args.consume}), best of "
          f"{args.repeat} passes; "
          f"CPU: {cpu_model()}, {os.cpu_count()} cores; Python {platform.python_version()}, numpy "
          f"{np.__version__}, lmdb {lmdb.__version__}, h5py {h5py.__version__}, msgpack "
          f"{'.'.join(map(str, msgpack.version))}; load average {load_before[0]:.2f} before, "
          f"{load_after[0]:.2f} after")
    rows = [[r["label"], f"{r['reads_per_s']:,.0f}", f"{r['us_per_read']:.1f}",
             f"{r['median_s'] / r['reads'] * 1e6:.1f}", f"{r['reads_per_s'] / fastest['reads_per_s']:.2f}x",
             f"{r['reads_per_s'] / ceiling['reads_per_s']:.0%}", f"{r['bytes_per_record']:,.0f}",
             f"{r['best_cpu_s'] / r['best_s']:.0%}"] for r in results]
    print_table(["format", "reads/s", "µs/read", "median µs", "vs fastest baseline", "vs ceiling",
                 "bytes on disk/record", "cpu/wall"], rows)
    busy = [r["label"] for r in results if r["best_cpu_s"] < 0.9 * r["best_s"]]
    if busy:
        print(f"WARNING: the best pass of {', '.join(busy)} got < 90% of a CPU: other load on the machine; "
              "rerun when it is idle (or with more --repeat)")
    print()
    print(f"data check: {', '.join(sums)}: {'agree' if same else 'DISAGREE'} "
          f"(sum of touched elements: {sorted(set(sums.values()))})")
    print(f"fastest baseline: {fastest['label']} ({fastest['us_per_read']:.1f} µs/read)")
    targets = []
    for r in (r for r in results if r["role"] == "ours"):
        speedup = r["reads_per_s"] / fastest["reads_per_s"]
        of_ceiling = r["reads_per_s"] / ceiling["reads_per_s"]
        targets += [
            (f"{r['label']}: >= 2x the fastest baseline", speedup >= 2, f"{speedup:.2f}x"),
            (f"{r['label']}: >= 60% of the ceiling", of_ceiling >= 0.6, f"{of_ceiling:.0%}"),
        ]
    for name, ok, value in targets:
        print(f"{'PASS' if ok else 'FAIL'}  {name}  ({value})")

    if args.breakdown:
        print()
        print("breakdown of a verified read of our shard (µs per read, best pass):")
        for name, us in breakdown(paths["ours"], by_key, by_index, args.repeat):
            print(f"  {name:52s} {us:7.2f}")

    out_json = args.json or os.path.join(folder, "results.json")
    with open(out_json, "w") as f:
        json.dump({"args": vars(args), "cpu": cpu_model(), "results": results, "data_agree": same,
                   "targets": [{"target": n, "pass": ok, "value": v} for n, ok, v in targets]}, f, indent=1)
    print(f"\nresults: {out_json}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
