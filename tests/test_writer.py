"""The writer: validation, resume, map growth, and crash safety under kill -9."""

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from helpers import random_record

from regionbert.data import ShardError, ShardMismatchError, ShardReader, ShardWriter, verify_shard
from regionbert.data.synth import COCO_CLASSES, write_synthetic_shard


def _writer(path, **kw):
    return ShardWriter(path, feature_dim=32, class_names=COCO_CLASSES, extractor={"detector": "d1"}, **kw)


@pytest.mark.parametrize("change, match", [
    (dict(features=np.zeros((7, 16))), "feature dim 16"),
    (dict(class_probs=np.full((7, 10), 0.1)), r"class_probs shape \(7, 10\)"),
    (dict(boxes=np.array([[5, 5, 1, 1]] * 7)), "x1 <= x2"),
    (dict(boxes=np.array([[0, 0, 700, 10]] * 7)), "outside the 640x480 image"),
    (dict(boxes=np.full((7, 4), np.nan)), "NaN"),
    (dict(features=np.full((7, 32), np.inf)), "NaN or inf"),
    (dict(class_probs=np.full((7, 91), 0.5)), "sum to 1"),
    (dict(width=0), "must be positive"),
    (dict(extra={"x": object()}), "JSON"),
])
def test_bad_records_are_refused_naming_shard_and_key(tmp_path, change, match):
    rec = random_record(np.random.default_rng(0)) | change
    with _writer(tmp_path / "s") as w:
        w.add("good", **random_record(np.random.default_rng(1)))
        with pytest.raises(ShardError, match=match) as e:
            w.add("img/bad", **rec)
        assert "'img/bad'" in str(e.value) and str(tmp_path / "s") in str(e.value)
    assert list(ShardReader(tmp_path / "s").keys()) == ["good"]  # nothing else written, good one kept


def test_dim_mismatch_is_a_mismatch_error(tmp_path):
    with _writer(tmp_path / "s") as w, pytest.raises(ShardMismatchError):
        w.add("x", **random_record(np.random.default_rng(0), dim=48))


def test_reopening_with_other_settings_is_refused(tmp_path):
    with _writer(tmp_path / "s") as w:
        w.add("a", **random_record(np.random.default_rng(0)))
    for kw, what in [(dict(feature_dim=64), "feature_dim"),
                     (dict(class_names=COCO_CLASSES[:-1] + ["x"]), "class_names"),
                     (dict(extractor={"detector": "d2"}), "extractor.detector")]:
        args = dict(feature_dim=32, class_names=COCO_CLASSES, extractor={"detector": "d1"}) | kw
        with pytest.raises(ShardMismatchError, match=what):
            ShardWriter(tmp_path / "s", **args)
    # a different job (shard index, host) is not a different setting
    with ShardWriter(tmp_path / "s", feature_dim=32, class_names=COCO_CLASSES,
                     extractor={"detector": "d1", "job": {"shard_index": 3}}) as w:
        assert "a" in w and len(w) == 1


def test_resume_skips_committed_ids(tmp_path):
    rng = np.random.default_rng(0)
    recs = {f"r{i}": random_record(rng) for i in range(10)}
    w = _writer(tmp_path / "s")
    for i in range(6):
        w.add(f"r{i}", **recs[f"r{i}"])
    w.close(complete=False)  # the job stopped before its end
    with _writer(tmp_path / "s") as w:
        added = [w.add(k, **v) for k, v in recs.items()]
        assert w.add("r9", **recs["r9"]) is False  # pending duplicates are skipped too
    assert added == [False] * 6 + [True] * 4
    r = ShardReader(tmp_path / "s")
    assert list(r.keys()) == list(recs) and r.state["complete"]
    assert np.array_equal(r.get("r7").features, recs["r7"]["features"].astype(np.float16))


def test_map_grows_instead_of_failing(tmp_path):
    # ~8 MB of records into a 256 KiB map, committed in several batches and in one big one
    for commit_every in (5, 1000):
        path = tmp_path / f"s{commit_every}"
        rng = np.random.default_rng(0)
        with ShardWriter(path, feature_dim=1024, class_names=COCO_CLASSES, map_size=256 << 10,
                         commit_every=commit_every) as w:
            for i in range(40):
                w.add(str(i), **random_record(rng, n=100, dim=1024))
        assert len(ShardReader(path)) == 40 and verify_shard(str(path)).ok


def test_error_inside_with_keeps_accepted_records_and_marks_incomplete(tmp_path):
    rng = np.random.default_rng(0)
    with pytest.raises(RuntimeError), _writer(tmp_path / "s", commit_every=100) as w:
        for i in range(3):
            w.add(str(i), **random_record(rng))
        raise RuntimeError("job died")
    with pytest.warns(UserWarning, match="incomplete"):
        r = ShardReader(tmp_path / "s")
    assert len(r) == 3 and not r.state["complete"]
    assert verify_shard(str(tmp_path / "s")).problems == [
        "incomplete: the writer did not finish (rerun the job to resume it)"]


WRITER_SCRIPT = textwrap.dedent("""
    import sys
    from regionbert.data.synth import write_synthetic_shard
    import regionbert.data.writer as wm

    commit = wm.ShardWriter.commit
    def noisy_commit(self):
        commit(self)
        print("committed", self.count, flush=True)
    wm.ShardWriter.commit = noisy_commit
    import regionbert.data.synth as sm
    orig = sm.ShardWriter
    sm.ShardWriter = lambda *a, **k: orig(*a, **(k | {"commit_every": 7}))
    write_synthetic_shard(sys.argv[1], int(sys.argv[2]), feature_dim=256, seed=3)
""")


def test_kill_9_while_writing_then_resume(tmp_path):
    total = 200
    script = tmp_path / "write.py"
    script.write_text(WRITER_SCRIPT)
    path = str(tmp_path / "killed")
    cmd = [sys.executable, str(script), path, str(total)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # kill it mid-run, between and during commits
        if int(line.split()[1]) >= 60:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL

    with pytest.warns(UserWarning, match="incomplete"):
        partial = ShardReader(path)
    n = len(partial)
    assert 60 <= n < total and n % 7 == 0  # exactly the committed batches
    report = verify_shard(path)
    assert not report.bad and report.checked == n

    subprocess.run(cmd, check=True, capture_output=True)  # the same command resumes
    write_synthetic_shard(str(tmp_path / "clean"), total, feature_dim=256, seed=3)
    resumed, clean = ShardReader(path), ShardReader(tmp_path / "clean")
    assert verify_shard(path).ok and resumed.state["complete"]
    assert list(resumed.keys()) == list(clean.keys())
    for i in range(total):
        a, b = resumed[i], clean[i]
        assert np.array_equal(a.features, b.features) and np.array_equal(a.boxes, b.boxes)
    # the logical content is identical, whatever the page layout after a crash
    from regionbert.data import content_hash
    assert content_hash(path) == content_hash(str(tmp_path / "clean"))
    assert os.path.getsize(os.path.join(path, "data.mdb")) > 0


def test_a_complete_shard_is_left_alone_unless_appending(tmp_path):
    rng = np.random.default_rng(0)
    with _writer(tmp_path / "s") as w:
        w.add("a", **random_record(rng))
    data = tmp_path / "s" / "data.mdb"
    before = (data.stat().st_mtime_ns, data.read_bytes())
    with _writer(tmp_path / "s") as w:  # a finished job run again: nothing to add, nothing written
        assert w.add("a", **random_record(rng)) is False
    assert (data.stat().st_mtime_ns, data.read_bytes()) == before
    with pytest.raises(ShardError, match="complete"), _writer(tmp_path / "s") as w:
        w.add("b", **random_record(rng))
    with _writer(tmp_path / "s", append=True) as w:
        assert w.add("b", **random_record(rng))
    r = ShardReader(tmp_path / "s")
    assert list(r.keys()) == ["a", "b"] and r.state["complete"]


def test_extra_must_be_strict_json(tmp_path):
    rng = np.random.default_rng(0)
    with _writer(tmp_path / "s") as w:
        for bad in ({1: 2, "x": 3}, {"v": float("nan")}, ["not", "a", "dict"]):
            with pytest.raises(ShardError, match="extra"):
                w.add("x", **random_record(rng), extra=bad)
