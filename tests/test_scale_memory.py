"""No per-caption or per-image Python objects (issue 24 item 3): what a rank keeps for its data (pairs, dataset,
samplers, loader) is a fixed number of allocations whatever the corpus, a few bytes per caption (int32 arrays,
the samplers' epoch of batches included), and building the captions table has a peak that does not grow with
the manifest. Measured with tracemalloc (counts of live blocks and peak
bytes), never with a clock; each test first checks that the old Pairs (tests/legacy_pairs.py) is caught."""

import gc
import json
import os
import subprocess
import sys
import tracemalloc

import numpy as np
import pandas as pd
import pytest
from legacy_pairs import LegacyPairs
from train_synth import write_vocab

from regionbert.data import ShardSet
from regionbert.data.synth import write_synthetic_shard
from regionbert.train import captions
from regionbert.train import data as data_module
from regionbert.train import run as run_module
from regionbert.train.config import load_config
from regionbert.train.data import TaskSampler, TokenBucketSampler
from regionbert.train.run import build_data
from regionbert.train.text import Text

PER_IMAGE = 4
WORDS = ["dog", "cat", "a", "photo", "of", "and", "person", "car", "on", "the"]


def corpus(folder, images: int, per_image: int = PER_IMAGE) -> dict:
    os.makedirs(folder, exist_ok=True)
    shard = os.path.join(folder, "shard")
    write_synthetic_shard(shard, images, feature_dim=4, min_boxes=1, max_boxes=6, seed=1)
    rng = np.random.default_rng(0)
    ids = list(ShardSet(shard).keys())
    rows = [{"image_id": i, "caption": " ".join(rng.choice(WORDS, rng.integers(3, 12))), "split": "train"}
            for i in ids for _ in range(per_image)]
    path = os.path.join(folder, "captions.csv")
    pd.DataFrame(rows).to_csv(path, index=False)
    return {"shards": shard, "captions": path, "tokenizer": write_vocab(os.path.join(folder, "vocab.txt"))}


@pytest.fixture(scope="module")
def sizes(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    return corpus(str(root / "small"), 300), corpus(str(root / "large"), 1500)


def live_blocks(make):
    """(live tracemalloc blocks that make() leaves allocated, its result)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = sum(s.count for s in tracemalloc.take_snapshot().statistics("filename"))
        out = make()
        gc.collect()
        after = sum(s.count for s in tracemalloc.take_snapshot().statistics("filename"))
    finally:
        tracemalloc.stop()
    return after - before, out


def config(d, out):
    return load_config(None, [f"data.{k}={json.dumps(v)}" for k, v in d.items()] + [
        "model.max_text_len=16", "data.num_workers=0", "data.token_budget=400", f"run.out={json.dumps(str(out))}",
        'tasks.mix={"mlm":1,"mrfr":1,"mrc_kl":1,"itm":1}'])


def test_a_ranks_data_objects_do_not_grow_with_the_corpus(sizes, tmp_path, monkeypatch):
    """build_data (Pairs, PairDataset, TokenBucketSampler, TaskSampler, Loader) over a warm table, at 1,200 and
    6,000 captions: the live blocks it leaves differ by less than 1 per 20 captions. The old Pairs (a list of
    arrays, a dict and a list of ids) leaves more than one per caption."""
    captions_diff = (1500 - 300) * PER_IMAGE
    for d in sizes:  # warm: the tables exist (building them is the next test's)
        build_data(config(d, tmp_path), "train")
    grown = []
    for d in sizes:
        n, (pairs, *_) = live_blocks(lambda d=d: build_data(config(d, tmp_path), "train"))
        assert not pairs.table.built
        grown.append(n)
    with monkeypatch.context() as m:
        m.setattr(run_module, "Pairs", LegacyPairs)
        old = [live_blocks(lambda d=d: build_data(config(d, tmp_path), "train"))[0] for d in sizes]
    assert old[1] - old[0] > captions_diff, old  # the measurement sees per-caption objects
    assert grown[1] - grown[0] < captions_diff / 20, (grown, old)


def peak_bytes(make) -> int:
    gc.collect()
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        make()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def test_building_the_table_has_a_peak_that_does_not_grow_with_the_manifest(sizes, tmp_path, monkeypatch):
    """One shard of 1,500 images; manifests of 1 and 8 captions per image, read in blocks of 500 rows: the
    table build's traced peak grows by under 8 bytes per added caption (the old Pairs: hundreds)."""
    d = sizes[1]
    small, large = (corpus(str(tmp_path / f"m{k}"), 1500, k) for k in (1, 8))
    monkeypatch.setattr(captions, "CHUNK_ROWS", 500)
    monkeypatch.setattr(captions, "BLOCK", 500)  # arrays converted and checked 500 elements at a time
    shards, text = ShardSet(d["shards"]), Text(d["tokenizer"], 16)
    added = 1500 * 7

    def build(m):  # the table alone: Pairs then adds the run's lengths (8 bytes a caption)
        assert captions.open_table(shards, m["captions"], text, "train", str(tmp_path / "cache")).built

    new = [peak_bytes(lambda m=m: build(m)) for m in (small, large)]
    old = [peak_bytes(lambda m=m: LegacyPairs(shards, m["captions"], text, "train")) for m in (small, large)]
    assert old[1] - old[0] > 100 * added, old  # the measurement sees the old build's per-caption memory
    assert new[1] - new[0] < 8 * added, (new, old)


def retained_bytes(make):
    """(traced bytes that make() leaves allocated, what it returned: kept alive while measuring)."""
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        out = make()
        gc.collect()
        return tracemalloc.get_traced_memory()[0] - before, out
    finally:
        tracemalloc.stop()


def sampler_bytes_per_caption(sizes, tmp_path, mix: dict, steps: int = 12) -> float:
    """Bytes a TaskSampler keeps per caption once iterating (its epoch of batches, ITM's stream), from the
    slope between the two corpora; the tasks drawn in those steps must be all of mix's."""
    grown = []
    for d in sizes:
        pairs = build_data(config(d, tmp_path), "train")[0]  # warm table, outside the measurement

        def make(pairs=pairs):
            sampler = TaskSampler(TokenBucketSampler(pairs.lengths, 400, seed=0), pairs, mix, seed=0)
            it = iter(sampler)
            return sampler, it, {next(it)[0][0] for _ in range(steps)}

        n, (_, _, tasks) = retained_bytes(make)
        assert tasks == set(mix), tasks
        grown.append(n)
    return (grown[1] - grown[0]) / ((1500 - 300) * PER_IMAGE)


def test_the_samplers_keep_their_epoch_as_arrays_not_python_lists(sizes, tmp_path, monkeypatch):
    """An iterating TaskSampler keeps its epoch's pair batches as one int32 array (4 B a pair) and ITM's stream
    as two (8 B a pair), plus two int64 arrays per image (by box count): 8 B per caption without ITM, 16.5
    with it (at 010e373, with lists of Python ints: 46 and 54). Lists of Python ints (an int object and a
    list slot per pair) coming back in either stream are caught (about +36 B per caption)."""
    for d in sizes:
        build_data(config(d, tmp_path), "train")
    assert sampler_bytes_per_caption(sizes, tmp_path, {"mlm": 1}) < 16
    assert sampler_bytes_per_caption(sizes, tmp_path, {"mlm": 1, "itm": 1}) < 24
    compact = TokenBucketSampler.batches
    with monkeypatch.context() as m:  # the pair batches as lists of lists of Python ints (the old form)
        m.setattr(TokenBucketSampler, "batches", lambda self, *a, **k: list(compact(self, *a, **k)))
        assert sampler_bytes_per_caption(sizes, tmp_path, {"mlm": 1}) > 30
    with monkeypatch.context() as m:  # ITM's stream holding a Python int per pair
        m.setattr(data_module, "_compact", lambda b, other: (b.starts, b.flat.astype(object), other.astype(object)))
        assert sampler_bytes_per_caption(sizes, tmp_path, {"mlm": 1, "itm": 1}) > 40


def test_a_ranks_data_arrays_take_a_few_bytes_per_caption(sizes, tmp_path):
    """build_data over a warm table keeps about 10 B per caption: Pairs.lengths (int32, 4 B), per image box
    counts (int32), the ITM sampler's two orders by box count (int64) and the dataset's checked flags; the
    dataset's text lengths are the table's own shared array. At 010e373 (int64 lengths and an int64 copy
    of the text lengths): 23 B."""
    for d in sizes:
        build_data(config(d, tmp_path), "train")
    grown = [retained_bytes(lambda d=d: build_data(config(d, tmp_path), "train"))[0] for d in sizes]
    assert (grown[1] - grown[0]) / ((1500 - 300) * PER_IMAGE) < 16, grown


EPOCHS = """
import os, sys
import numpy as np
from regionbert.train import data

def anon() -> int:
    with open(f"/proc/{os.getpid()}/smaps_rollup") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss_Anon:"))

if sys.argv[1] == "off":
    data._MALLOC_TRIM = None  # the temporaries left in the heap, as before
n = 1_000_000
sampler = data.TokenBucketSampler(np.random.default_rng(0).integers(10, 60, n).astype(np.int32), 4096, seed=0)
sampler.batches(0)  # the first epoch's allocations (the heap's own growth) are not counted
before = anon()
kept = [sampler.batches(e) for e in range(1, 4)]
print((anon() - before) / (3 * n))
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps_rollup") or data_module._MALLOC_TRIM is None,
                    reason="needs Linux's smaps_rollup and glibc's malloc_trim")
def test_an_epochs_temporaries_do_not_stay_in_the_heap(tmp_path):
    """Three epochs of batches over a million pairs, each kept (a real process, its anonymous memory from
    /proc): about 4 bytes a pair each, what Batches holds. Without giving the freed temporaries back
    (release_heap off) glibc keeps about as much again in the heap, for good."""
    script = tmp_path / "epochs.py"
    script.write_text(EPOCHS)
    per_pair = {}
    for mode in ("on", "off"):
        r = subprocess.run([sys.executable, str(script), mode], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
        per_pair[mode] = float(r.stdout.split()[-1])
    assert per_pair["off"] > 6, per_pair  # the measurement sees the temporaries left behind
    assert per_pair["on"] < 5, per_pair  # (measured here: 2.7 with it, 8.0 without)
