"""What the record rules (data/checks.py) cost: `verify` with and without them, and the writer's add with and
without them, on the same synthetic shard, interleaved in one run (rounds alternate the order).

    python bench/bench_verify.py --records 2000 --out bench/out

Prints records/s for each variant (median of the rounds) and the rules' share of the time.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import time

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import regionbert.data.index as index_mod  # noqa: E402
import regionbert.data.writer as writer_mod  # noqa: E402
from regionbert.data.index import verify_shard  # noqa: E402
from regionbert.data.synth import COCO_CLASSES, synth_record, write_synthetic_shard  # noqa: E402


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--records", type=int, default=2000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default="bench/out")
    a = p.parse_args()
    shard = os.path.join(a.out, f"verify-{a.records}")
    if not os.path.exists(shard):
        write_synthetic_shard(shard, a.records, seed=0)
    rules, refuse = index_mod.check_record, writer_mod.refuse_bad_record
    rng = np.random.default_rng(0)
    protos = rng.gamma(1.0, 1.0, (len(COCO_CLASSES), 1024)).astype(np.float32)
    recs = [synth_record(np.random.default_rng([0, i]), protos) for i in range(min(a.records, 500))]

    def write(path):
        shutil.rmtree(path, ignore_errors=True)
        with writer_mod.ShardWriter(path, feature_dim=1024, class_names=COCO_CLASSES) as w:
            for i, r in enumerate(recs):
                w.add(f"r{i}", **r)

    times = {k: [] for k in ("verify with rules", "verify without", "write with rules", "write without")}
    for rnd in range(a.rounds):
        for on in ((True, False) if rnd % 2 == 0 else (False, True)):
            index_mod.check_record = rules if on else (lambda rec, key=None: [])
            writer_mod.refuse_bad_record = refuse if on else (lambda *args: None)
            suffix = "with rules" if on else "without"
            times[f"verify {suffix}"].append(_timed(lambda: verify_shard(shard)))
            times[f"write {suffix}"].append(_timed(lambda: write(os.path.join(a.out, "verify-write"))))
    index_mod.check_record, writer_mod.refuse_bad_record = rules, refuse
    for k, v in times.items():
        n = a.records if k.startswith("verify") else len(recs)
        print(f"{k:20} {n / statistics.median(v):9.0f} records/s  (median of {len(v)})")
    for what in ("verify", "write"):
        on, off = statistics.median(times[f"{what} with rules"]), statistics.median(times[f"{what} without"])
        print(f"rules' share of {what}: {100 * (on - off) / on:.1f}%")


if __name__ == "__main__":
    main()
