"""The captions table (train/captions.py, issue 24 items 2, 3): the same pairs, batches and losses as the
old Pairs (tests/legacy_pairs.py) and the old sampler's lists of batches (legacy_batches, below); rebuilt
when the manifest, tokenizer, max length or shards change and reused otherwise; a build killed with
kill -9 leaves nothing a later run reads; two ranks under torchrun build it once and agree; a caption
whose image is in no shard is named by its row."""

import glob
import hashlib
import itertools
import json
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import warnings

import numpy as np
import pandas as pd
import pytest
import torch
from legacy_pairs import LegacyPairs
from train_synth import write_dataset

from regionbert.data import ShardSet
from regionbert.data.synth import write_synthetic_shard
from regionbert.train import run as run_module
from regionbert.train.captions import HEADER_BYTES
from regionbert.train.cli import main
from regionbert.train.config import load_config
from regionbert.train.data import Batches, Pairs, TaskSampler, TokenBucketSampler
from regionbert.train.run import build_data
from regionbert.train.text import Text

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
TESTS = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("captions")
    return write_dataset(str(folder / "d"), n_train=160, n_val=40, feature_dim=16, min_boxes=0, max_boxes=30)


def tables(folder) -> list[str]:
    return sorted(glob.glob(os.path.join(str(folder), "*.captions*")))


def assert_same_pairs(new, old):
    assert len(new) == len(old) and new.num_images == old.num_images
    assert np.array_equal(new.image, old.image) and np.array_equal(new.pool, old.pool)
    assert np.array_equal(new.num_boxes, old.num_boxes) and np.array_equal(new.lengths, old.lengths)
    assert new.lengths.dtype == np.int32 and new.num_boxes.dtype == np.int32  # 4 bytes a pair (old: int64)
    for p in range(len(old)):
        assert new.tokens[p].dtype == old.tokens[p].dtype and np.array_equal(new.tokens[p], old.tokens[p])
    assert list(new.image_ids) == old.image_ids


def digest(pairs) -> str:
    h = hashlib.sha256()
    for a in (pairs.table.ids, pairs.table.offsets, pairs.image, pairs.pool, pairs.lengths):
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def legacy_batches(self, epoch, lengths=None, rng=None) -> list[list[int]]:
    """TokenBucketSampler.batches as it was before its compact form (commit 010e373): lists of Python ints."""
    rng = np.random.default_rng([self.seed, epoch]) if rng is None else rng
    lengths = self.lengths if lengths is None else np.asarray(lengths)
    order = rng.permutation(len(lengths))
    out = []
    for start in range(0, len(order), self.bucket_size):
        bucket = order[start:start + self.bucket_size]
        if self.sort:
            bucket = bucket[np.argsort(-lengths[bucket], kind="stable")]
            lens, i = lengths[bucket].tolist(), 0
            while i < len(lens):
                size = self.max_batch_size if lens[i] <= 0 else \
                    max(1, min(self.budget // lens[i], self.max_batch_size))
                out.append(bucket[i:i + size].tolist())
                i += size
            continue
        batch, longest = [], 0
        for i in bucket.tolist():
            n = max(longest, int(lengths[i]))
            if batch and (n * (len(batch) + 1) > self.budget or len(batch) >= self.max_batch_size):
                out.append(batch)
                batch, n = [], int(lengths[i])
            batch.append(i)
            longest = n
        if batch:
            out.append(batch)
    return [out[i] for i in rng.permutation(len(out))]


def legacy_as_batches(self, epoch, lengths=None, rng=None) -> Batches:
    """The old sampler's lists, handed to TaskSampler in the form it takes now (the same pairs, in order)."""
    lists = legacy_batches(self, epoch, lengths, rng)
    starts = np.cumsum([0] + [len(b) for b in lists], dtype=np.int64)
    return Batches(starts, np.array([p for b in lists for p in b], np.int32))


# ----------------------------------------------------------------------------- the same as before
def test_compact_batches_equal_the_old_lists(data, tmp_path, monkeypatch):
    """The epoch's batches and ITM's stream (one flat int32 array cut at boundaries) hold the old sampler's
    lists exactly: random lengths (zeros included), budgets, bucket sizes, caps, sorted and plain; and
    a TaskSampler's keys (pairs, shown images, seeds) over three epochs with every task."""
    rs = np.random.default_rng(0)
    for t in range(200):
        lengths = rs.integers(0 if t % 5 == 0 else 1, 300, int(rs.integers(0, 2500))).astype(np.int32)
        s = TokenBucketSampler(lengths, int(rs.integers(1, 2000)), bucket_size=int(rs.integers(1, 3000)),
                               sort=bool(t % 3), seed=t, max_batch_size=[None, int(rs.integers(1, 40))][t % 2])
        new, old = s.batches(t % 4), legacy_batches(s, t % 4)
        assert new.flat.dtype == np.int32 and new == old and [list(b) for b in new] == old, t
        assert all(type(p) is int for b in new for p in b)  # keys hold Python ints, as before
    pairs = Pairs(ShardSet(data["shards"]), data["captions"], Text(data["tokenizer"], 24), "train",
                  cache=str(tmp_path))
    mix = {"mlm": 1, "mrfr": 1, "mrc": 1, "itm": 2}

    def stream(batches, n=120):
        with monkeypatch.context() as m:
            m.setattr(TokenBucketSampler, "batches", batches)
            return list(itertools.islice(TaskSampler(TokenBucketSampler(pairs.lengths, 300, seed=3), pairs, mix,
                                                     seed=3, rank=1, world_size=2), n))
    new, old = stream(TokenBucketSampler.batches), stream(legacy_as_batches)
    assert new == old and sum(b[0][0] == "itm" for b in new) > 10
    assert all(type(k[1]) is int and type(k[2]) is int for b in new for k in b)


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_table_gives_the_old_pairs_for_every_split_and_format(data, tmp_path, ext):
    df = pd.read_csv(data["captions"], dtype=str)
    path = str(tmp_path / f"m{ext}")
    {".csv": lambda: df.to_csv(path, index=False), ".tsv": lambda: df.to_csv(path, sep="\t", index=False),
     ".jsonl": lambda: df.to_json(path, orient="records", lines=True),
     ".parquet": lambda: df.to_parquet(path)}[ext]()
    shards, text = ShardSet(data["shards"]), Text(data["tokenizer"], max_len=9)  # 9: some captions truncated
    for split in ("train", "val", None):
        new = Pairs(shards, path, text, split, max_regions=20)
        assert new.table.built
        assert_same_pairs(new, LegacyPairs(shards, path, text, split, max_regions=20))
        again = Pairs(shards, path, text, split, max_regions=20)
        assert not again.table.built and digest(again) == digest(new)
    assert len(tables(tmp_path)) == 3  # one per split, beside the manifest


def test_pickled_pairs_map_the_table_again(data, tmp_path):
    pairs = Pairs(ShardSet(data["shards"]), data["captions"], Text(data["tokenizer"], 24), "train",
                  cache=str(tmp_path))
    blob = pickle.dumps(pairs)
    # the table's arrays do not travel (a spawned worker maps the file): only the run's lengths and box counts
    assert len(blob) < pairs.lengths.nbytes + pairs.num_boxes.nbytes + 4096
    back = pickle.loads(blob)
    assert digest(back) == digest(pairs) and np.array_equal(back.tokens[5], pairs.tokens[5])


TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
        "model.max_text_len=24", "data.token_budget=600", "optim.warmup_steps=2", "optim.lr=1e-3",
        "data.num_workers=0", "run.plot=false", "run.tensorboard=false", "run.log_every=1", "optim.steps=6",
        "run.eval_images=20", "run.eval_pairs=40", 'tasks.mix={"mlm":1,"mrfr":1,"mrc":1,"mrc_kl":1,"itm":1}']


def _log(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "log.jsonl"))]


def test_batches_masks_and_losses_equal_the_old_pairs(data, tmp_path, monkeypatch):
    """The trainer with the table and with the old Pairs: every batch tensor of two epochs' worth of
    batches, then 6 training steps' losses and the held-out evaluation, equal to the bit."""
    overrides = [f"data.{k}={json.dumps(v)}" for k, v in data.items()] + TINY
    cfg = load_config(None, overrides + [f"run.out={tmp_path / 'cfg'}"])
    _, _, _, new_loader = build_data(cfg, "train")
    with monkeypatch.context() as m:  # "old": the old Pairs and the old sampler's lists of batches
        m.setattr(run_module, "Pairs", LegacyPairs)
        m.setattr(TokenBucketSampler, "batches", legacy_as_batches)
        _, _, _, old_loader = build_data(load_config(None, overrides + [f"run.out={tmp_path / 'cfg'}"]), "train")
    n = 0
    for a, b in zip(new_loader, old_loader, strict=False):
        assert a.keys() == b.keys()
        for k in a:
            if isinstance(a[k], torch.Tensor):
                assert torch.equal(a[k], b[k]), k
            else:
                assert a[k] == b[k], k
        n += 1
        if n == 60:
            break
    assert n == 60
    torch.set_num_threads(1)  # (tests/conftest.py sets it back after the test)
    args = [f"--set={o}" for o in overrides]
    assert main([*args, "--out", str(tmp_path / "new")]) == 0
    with monkeypatch.context() as m:
        m.setattr(run_module, "Pairs", LegacyPairs)
        m.setattr(TokenBucketSampler, "batches", legacy_as_batches)
        assert main([*args, "--out", str(tmp_path / "old")]) == 0
    new, old = _log(tmp_path / "new"), _log(tmp_path / "old")
    def kept(log):  # losses and held-out metrics, not timings
        keep = ("step", "mlm", "mrfr", "mrc", "mrc_kl", "itm", "wra")
        return [{**{k: v for k, v in r.items() if k in keep},
                 **({"eval": {k: v for k, v in r["eval"].items() if k != "eval_seconds"}} if "eval" in r else {})}
                for r in log]

    assert kept(new) == kept(old)
    assert any("eval" in r for r in new) and len([r for r in new if "lr" in r]) == 6


# ----------------------------------------------------------------------------- rebuilt when an input changes
def test_table_is_rebuilt_when_manifest_tokenizer_length_or_shards_change(data, tmp_path):
    folder = tmp_path / "d"
    shutil.copytree(os.path.dirname(data["captions"]), folder, ignore=shutil.ignore_patterns("*.captions*"))
    shard, manifest, vocab = str(folder / "shard-00000"), str(folder / "captions.csv"), str(folder / "vocab.txt")

    def pairs(shard_path=shard, max_len=24, lowercase=True):
        return Pairs(ShardSet(shard_path), manifest, Text(vocab, max_len, lowercase), "train")

    first = pairs()
    assert first.table.built and not pairs().table.built
    # a copy of the shards elsewhere (the same content hash) is the same table
    shutil.copytree(shard, tmp_path / "copy")
    assert not pairs(str(tmp_path / "copy")).table.built
    # the manifest: one caption changed
    df = pd.read_csv(manifest, dtype=str)
    df.loc[3, "caption"] = "a zebra and a zebra"
    df.to_csv(manifest, index=False)
    changed = pairs()
    assert changed.table.built and changed.tokens[3].tolist() != first.tokens[3].tolist()
    assert_same_pairs(changed, LegacyPairs(ShardSet(shard), manifest, Text(vocab, 24), "train"))
    # the tokenizer: a word more in the vocabulary; its lowercasing; the max length
    with open(vocab, "a") as f:
        f.write("zzz\n")
    assert pairs().table.built and not pairs().table.built
    assert pairs(lowercase=False).table.built
    short = pairs(max_len=5)
    assert short.table.built and short.table.lengths.max() == 5
    # the shards: the same ids, other content (another seed), so another content hash
    other = str(tmp_path / "other")
    write_synthetic_shard(other, 200, feature_dim=16, min_boxes=0, max_boxes=30, seed=7)
    rebuilt = pairs(other)
    assert rebuilt.table.built and not np.array_equal(rebuilt.num_boxes, first.num_boxes)
    assert_same_pairs(rebuilt, LegacyPairs(ShardSet(other), manifest, Text(vocab, 24), "train"))


def test_tables_of_earlier_inputs_are_named_when_building_not_removed(data, tmp_path):
    """A manifest changed twice: each build names the tables of that manifest and split built for the
    earlier inputs (once: a warm start says nothing) and removes none; another split's table and a build's
    temporary file are not named."""
    folder = tmp_path / "d"
    shutil.copytree(os.path.dirname(data["captions"]), folder, ignore=shutil.ignore_patterns("*.captions*"))
    shards, manifest, text = ShardSet(str(folder / "shard-00000")), str(folder / "captions.csv"), \
        Text(str(folder / "vocab.txt"), 24)

    def pairs(split="train"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            p = Pairs(shards, manifest, text, split)
        return p, [str(w.message) for w in caught if "other captions table" in str(w.message)]

    first, said = pairs()
    assert first.table.built and said == []
    val, said = pairs("val")
    assert val.table.built and said == []  # another split's table is not another input's
    (folder / (os.path.basename(first.table.path) + ".tmp-1-ab")).write_bytes(b"x")
    df = pd.read_csv(manifest, dtype=str)
    for k, word in enumerate(("zebra", "giraffe")):
        df.loc[3, "caption"] = f"a {word}"
        df.to_csv(manifest, index=False)
        new, said = pairs()
        assert new.table.built and len(said) == 1, said
        assert f"{k + 1} other captions table(s) of captions.csv (split train)" in said[0]
        assert os.path.basename(first.table.path) in said[0] and ".tmp-" not in said[0]
        assert os.path.basename(val.table.path) not in said[0]
        again, said = pairs()
        assert not again.table.built and said == []  # said once, when built
    assert os.path.exists(first.table.path) and len(tables(folder)) == 5  # 3 train + val + the planted tmp


def test_a_damaged_table_is_built_again_not_read(data, tmp_path):
    shards, text = ShardSet(data["shards"]), Text(data["tokenizer"], 24)
    good = Pairs(shards, data["captions"], text, "train", cache=str(tmp_path))
    path, expected = good.table.path, digest(good)  # (good maps the file: damaging it in place changes good too)
    for at in (HEADER_BYTES + 3, 20, os.path.getsize(path) - 1):  # a token id, the header, the pool
        with open(path, "r+b") as f:
            f.seek(at)
            byte = f.read(1)
            f.seek(at)
            f.write(bytes([byte[0] ^ 0x5A]))
        with pytest.warns(UserWarning, match="captions table not usable"):
            again = Pairs(shards, data["captions"], text, "train", cache=str(tmp_path))
        assert again.table.built and digest(again) == expected
    with open(path, "r+b") as f:
        f.truncate(HEADER_BYTES + 10)
    with pytest.warns(UserWarning, match="captions table not usable"):
        assert digest(Pairs(shards, data["captions"], text, "train", cache=str(tmp_path))) == expected


# ----------------------------------------------------------------------------- kill -9, two ranks
BUILD = """
import sys
sys.path.insert(0, {tests!r})
from regionbert.data import ShardSet
from regionbert.train import captions
from regionbert.train.data import Batches, Pairs, TaskSampler, TokenBucketSampler
from regionbert.train.text import Text
captions.CHUNK_ROWS = 10  # many small blocks: a build long enough to be killed midway
Pairs(ShardSet({shards!r}), {manifest!r}, Text({vocab!r}, 24), None, cache={cache!r})
print("finished")
"""


def big_manifest(data, path, rows):
    df = pd.read_csv(data["captions"], dtype=str)
    pd.concat([df] * (rows // len(df) + 1)).iloc[:rows].to_csv(path, index=False)
    return str(path)


def test_a_build_killed_with_kill_9_leaves_nothing_a_later_run_reads(data, tmp_path):
    manifest = big_manifest(data, tmp_path / "big.csv", 40_000)
    cache = tmp_path / "cache"
    script = BUILD.format(tests=TESTS, shards=data["shards"], manifest=manifest, vocab=data["tokenizer"],
                          cache=str(cache))
    child = subprocess.Popen([sys.executable, "-c", script], env=ENV, stdout=subprocess.PIPE, text=True)
    seen = None
    try:
        while child.poll() is None and seen is None:
            tmps = glob.glob(str(cache / "*.tmp-*"))
            if tmps and os.path.getsize(tmps[0]) > HEADER_BYTES:  # token ids being written
                seen = tmps[0]
            time.sleep(0.005)
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.wait(timeout=60)
    assert seen is not None and child.returncode == -signal.SIGKILL, "the build finished before it was killed"
    assert [p for p in tables(cache) if not p.endswith(os.path.basename(seen))] == []  # no table, only the tmp
    shards, text = ShardSet(data["shards"]), Text(data["tokenizer"], 24)
    after = Pairs(shards, manifest, text, None, cache=str(cache))
    assert after.table.built and tables(cache) == [after.table.path]  # the killed build's file is gone
    assert_same_pairs(after, LegacyPairs(shards, manifest, text, None))


RANK = """
import hashlib, json, os, sys
import numpy as np
from regionbert.data import ShardSet
from regionbert.train.data import Batches, Pairs, TaskSampler, TokenBucketSampler
from regionbert.train.text import Text
pairs = Pairs(ShardSet({shards!r}), {manifest!r}, Text({vocab!r}, 24), "train", cache={cache!r})
h = hashlib.sha256()
for a in (pairs.table.ids, pairs.table.offsets, pairs.image, pairs.pool, pairs.lengths):
    h.update(np.ascontiguousarray(a).tobytes())
with open(os.path.join({out!r}, os.environ["RANK"] + ".json"), "w") as f:
    json.dump({{"built": pairs.table.built, "digest": h.hexdigest(), "path": pairs.table.path}}, f)
"""


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun (from torch) is not on PATH")
def test_two_ranks_under_torchrun_build_the_table_once_and_agree(data, tmp_path):
    manifest = big_manifest(data, tmp_path / "big.csv", 20_000)
    cache, out = tmp_path / "cache", tmp_path / "out"
    out.mkdir()
    script = tmp_path / "rank.py"
    script.write_text(RANK.format(shards=data["shards"], manifest=manifest, vocab=data["tokenizer"],
                                  cache=str(cache), out=str(out)))
    r = subprocess.run([shutil.which("torchrun"), "--standalone", "--nproc_per_node", "2", str(script)],
                       capture_output=True, text=True, timeout=300, env=ENV, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    ranks = [json.loads((out / f"{i}.json").read_text()) for i in range(2)]
    assert sorted(x["built"] for x in ranks) == [False, True]  # one built, the other read it
    assert ranks[0]["digest"] == ranks[1]["digest"] and ranks[0]["path"] == ranks[1]["path"]
    assert tables(cache) == [ranks[0]["path"]]  # no tmp left behind
    text = Text(data["tokenizer"], 24)
    assert_same_pairs(Pairs(ShardSet(data["shards"]), manifest, text, "train", cache=str(cache)),
                      LegacyPairs(ShardSet(data["shards"]), manifest, text, "train"))


# ----------------------------------------------------------------------------- bad input
def test_a_caption_whose_image_is_in_no_shard_is_named_by_its_row(data, tmp_path, monkeypatch):
    from regionbert.train import captions

    monkeypatch.setattr(captions, "CHUNK_ROWS", 64)  # the bad rows in later blocks than the first
    df = pd.read_csv(data["captions"], dtype=str)
    df.loc[[150, 151, 390], "image_id"] = ["coco/nowhere", "coco/elsewhere", "coco/nowhere"]
    df.to_csv(tmp_path / "m.csv", index=False)
    shards, text = ShardSet(data["shards"]), Text(data["tokenizer"], 24)
    with pytest.raises(KeyError, match=r"m.csv: 3 caption\(s\) name images that are in no shard \(row 150: "
                                       r"'coco/nowhere', row 151: 'coco/elsewhere', row 390: 'coco/nowhere'\)"):
        Pairs(shards, str(tmp_path / "m.csv"), text)
    # rows are the file's data rows whatever the split (390 is a val row)
    with pytest.raises(KeyError, match=r"1 caption\(s\) name images that are in no shard \(row 390: 'coco/nowh"):
        Pairs(shards, str(tmp_path / "m.csv"), text, "val")
    assert tables(tmp_path) == []  # nothing written, no tmp left
    # a near miss: a prefix or an extension of a real id is no match
    df = pd.read_csv(data["captions"], dtype=str)
    df.loc[0, "image_id"] = df.loc[0, "image_id"][:-1]
    df.loc[1, "image_id"] = df.loc[1, "image_id"] + "0"
    df.to_csv(tmp_path / "n.csv", index=False)
    with pytest.raises(KeyError, match=r"2 caption\(s\) name images that are in no shard \(row 0: 'synth/0000000'"):
        Pairs(shards, str(tmp_path / "n.csv"), text)


def test_an_empty_caption_is_still_named_by_its_row_when_streaming(data, tmp_path, monkeypatch):
    from regionbert.train import captions

    monkeypatch.setattr(captions, "CHUNK_ROWS", 64)
    df = pd.read_csv(data["captions"], dtype=str)
    df.loc[200, "caption"] = "  "
    df.to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(ValueError, match=r"m.csv: data row 200 has an empty image_id or caption"):
        Pairs(ShardSet(data["shards"]), str(tmp_path / "m.csv"), Text(data["tokenizer"], 24))
    assert tables(tmp_path) == []


def test_prepare_only_builds_the_train_and_eval_tables_that_the_run_then_reads(data, tmp_path, capsys):
    cache = tmp_path / "cache"
    args = [f"--set=data.{k}={json.dumps(v)}" for k, v in data.items()] + [f"--set={o}" for o in TINY]
    args += [f"--set=data.captions_cache={json.dumps(str(cache))}", "--out", str(tmp_path / "run")]
    assert main([*args, "--prepare-only"]) == 0
    printed = capsys.readouterr().out
    assert printed.count("(built)") == 2 and len(tables(cache)) == 2
    stamps = {p: os.stat(p).st_mtime_ns for p in tables(cache)}
    assert main([*args, "--prepare-only"]) == 0
    assert capsys.readouterr().out.count("(already built)") == 2
    assert main([*args, "--set=optim.steps=2"]) == 0
    assert {p: os.stat(p).st_mtime_ns for p in tables(cache)} == stamps  # read, not built again


def test_default_cache_is_the_run_folder_when_the_manifest_folder_is_read_only(data):
    """As a user who may not write beside the manifest (uid 65534, or root without DAC override): the tables go
    to RUN/captions and nothing appears beside the manifest."""
    from test_readonly import _restricted

    prefix, uid, how = _restricted()
    base = tempfile.mkdtemp(prefix="regionbert-captions-")  # under /tmp: reachable by another uid
    folder, run = os.path.join(base, "ro"), os.path.join(base, "run")
    try:
        os.chmod(base, 0o755)
        os.makedirs(folder)
        os.makedirs(run)
        shutil.copytree(data["shards"], os.path.join(base, "shard"))
        for p in (data["captions"], data["tokenizer"]):
            shutil.copy(p, folder)
        os.chmod(folder, 0o555)
        if uid is not None:
            os.chown(run, uid, uid)
        sets = {"data.shards": os.path.join(base, "shard"), "data.captions": os.path.join(folder, "captions.csv"),
                "data.tokenizer": os.path.join(folder, "vocab.txt")}
        args = [f"--set={k}={json.dumps(v)}" for k, v in sets.items()] + [f"--set={o}" for o in TINY]
        r = subprocess.run([*prefix, sys.executable, "-m", "regionbert.train.cli", *args, "--out", run,
                            "--prepare-only"], capture_output=True, text=True, cwd="/", timeout=300,
                           env={**ENV, "HOME": run, "PYTHONDONTWRITEBYTECODE": "1"})
        assert r.returncode == 0, f"{how}: {r.stdout[-2000:]}{r.stderr[-2000:]}"
        assert sorted(os.listdir(folder)) == ["captions.csv", "vocab.txt"]
        assert len(tables(os.path.join(run, "captions"))) == 2 and r.stdout.count("(built)") == 2
    finally:
        os.chmod(folder, 0o755)
        shutil.rmtree(base)


def test_a_missing_manifest_an_unusable_cache_and_a_planted_link_are_refused_or_replaced(data, tmp_path):
    from regionbert.train.captions import table_key, table_path

    shards, text = ShardSet(data["shards"]), Text(data["tokenizer"], 24)
    with pytest.raises(FileNotFoundError, match=r"nowhere.csv: caption manifest not found"):
        Pairs(shards, str(tmp_path / "nowhere.csv"), text, "train", cache=str(tmp_path))
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ValueError, match=r"afile: cannot create the captions table folder"):
        Pairs(shards, data["captions"], text, "train", cache=str(tmp_path / "afile"))
    # a link planted where the table goes: not followed (O_NOFOLLOW), replaced by the table, its target untouched
    cache = tmp_path / "cache"
    cache.mkdir()
    target = tmp_path / "victim"
    target.write_bytes(b"precious")
    path = table_path(str(cache), data["captions"], "train", table_key(shards, data["captions"], text, "train")[0])
    os.symlink(target, path)
    with pytest.warns(UserWarning, match="captions table not usable"):
        pairs = Pairs(shards, data["captions"], text, "train", cache=str(cache))
    assert pairs.table.built and not os.path.islink(path) and target.read_bytes() == b"precious"
    assert_same_pairs(pairs, LegacyPairs(shards, data["captions"], text, "train"))
