"""Start-up box-count gathering (issue 24 item 1): what Pairs did, against ShardSet.box_counts(), side by side.

    regionbert-shards synth /tmp/bc/new20k -n 20000 --dim 2048 -q
    python bench/bench_box_counts.py /tmp/bc/new20k /tmp/bc/old20k

NEW is a format 1.1 shard (written by this writer: it has the box-count table); OLD its format 1.0 twin (the
same records; made here as a copy with the table and schema_minor removed, if it does not exist). Each
variant runs in its own process after data.mdb is dropped from the page cache (posix_fadvise DONTNEED on a
file no process maps), so the first call reads from disk ("cold"); then twice more ("warm", best of 2).
Only the gathering is timed, not opening the shard.
"""

import json
import os
import shutil
import subprocess
import sys

CHILD = r"""
import sys, time, warnings
warnings.simplefilter("ignore")
from regionbert.data import ShardSet
how, path = sys.argv[1], sys.argv[2]
s = ShardSet(path)
def gather():
    if how == "full":  # what Pairs did before: a checksummed read of every record
        return [s[i].num_boxes for i in range(len(s))]
    for r in s.shards:
        r._box_counts = None  # (not cached between calls)
    return s.box_counts()
out = []
for _ in range(3):
    t = time.perf_counter()
    c = gather()
    out.append((time.perf_counter() - t) * 1e3)
print(" ".join(f"{x:.3f}" for x in out), int(sum(c)))
"""


def make_old_twin(new: str, old: str) -> None:
    import lmdb

    shutil.copytree(new, old)
    env = lmdb.open(old, max_dbs=3)
    with env.begin(write=True) as txn:
        meta = env.open_db(b"meta", txn=txn)
        for k in [bytes(k) for k, _ in txn.cursor(db=meta) if bytes(k).startswith(b"box_counts/")]:
            txn.delete(k, db=meta)
        m = json.loads(bytes(txn.get(b"shard", db=meta)))
        m.pop("schema_minor", None)
        txn.put(b"shard", json.dumps(m).encode(), db=meta)
    env.close()


def evict(path: str) -> None:
    fd = os.open(os.path.join(path, "data.mdb"), os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)


def main() -> None:
    new, old = sys.argv[1], sys.argv[2]
    if not os.path.exists(old):
        make_old_twin(new, old)
    print(f"{'variant':46s} {'cold ms':>10s} {'warm ms':>10s}  boxes")
    for label, how, path in [("before: every record read in full (1.1 shard)", "full", new),
                             ("box_counts(), 1.0 shard: record headers", "table", old),
                             ("box_counts(), 1.1 shard: the table", "table", new)]:
        evict(path)
        r = subprocess.run([sys.executable, "-c", CHILD, how, path], capture_output=True, text=True, check=True)
        *ms, boxes = r.stdout.split()
        ms = [float(x) for x in ms]
        print(f"{label:46s} {ms[0]:10.1f} {min(ms[1:]):10.2f}  {boxes}")


if __name__ == "__main__":
    main()
