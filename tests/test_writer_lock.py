"""One writer per shard: a second writer (another process, or the same one) is refused at once, naming the
first; the lock goes with its process, kill -9 included; `copy` takes its destination's lock."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from helpers import PAUSED_WRITER

from regionbert.data import ShardError, ShardReader, ShardWriter, verify_shard
from regionbert.data.cli import main as shards_main
from regionbert.data.lock import ShardBusyError, lock_path
from regionbert.data.synth import write_synthetic_shard


def _first_writer(shard: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", PAUSED_WRITER, shard, "--tag-for-the-lock"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    assert p.stdout.readline().strip() == "ready", p.stderr.read()
    return p


def _synth(shard: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "regionbert.data.cli", "synth", shard, "-n", "40", "--dim", "16",
                           "--min-boxes", "0", "--max-boxes", "5", "--seed", "3", "-q"],
                          capture_output=True, text=True, cwd="/")


def test_second_writer_process_is_refused_naming_the_first(tmp_path):
    shard = str(tmp_path / "shard-000")
    first = _first_writer(shard)
    try:
        second = _synth(shard)
        assert second.returncode != 0
        err = second.stderr
        assert "another writer is writing this shard" in err and f"pid {first.pid}" in err, err
        assert f"host {socket.gethostname()}" in err and "--tag-for-the-lock" in err and "started 20" in err
        # copy onto the shard being written: refused too (copy takes its destination's lock)
        src = str(tmp_path / "other")
        write_synthetic_shard(src, 5, feature_dim=16, seed=1)
        r = subprocess.run([sys.executable, "-m", "regionbert.data.cli", "copy", src, shard], capture_output=True,
                           text=True, cwd="/")
        assert r.returncode != 0 and f"pid {first.pid}" in r.stderr, r.stderr
        # and copying from it is refused while it is written
        r = subprocess.run([sys.executable, "-m", "regionbert.data.cli", "copy", shard, str(tmp_path / "pub")],
                           capture_output=True, text=True, cwd="/")
        assert r.returncode != 0 and "is being written" in r.stderr and not os.path.exists(tmp_path / "pub")
    finally:
        out, err = first.communicate("go\n", timeout=300)
    assert first.returncode == 0 and "finished" in out, err
    report = verify_shard(shard)
    assert report.ok and report.count == 40 == report.checked, (report.problems, report.bad)
    assert open(lock_path(shard)).read() == ""  # released and cleared on a normal exit
    # a third writer, now that the first is gone, is let in (and finds nothing to add)
    assert _synth(shard).returncode == 0


def test_lock_goes_with_a_killed_writer(tmp_path):
    shard = str(tmp_path / "shard-000")
    first = _first_writer(shard)
    first.send_signal(signal.SIGKILL)
    first.wait(timeout=60)
    assert first.returncode == -signal.SIGKILL
    assert json.loads(open(lock_path(shard)).read())["pid"] == first.pid  # the dead holder's details remain
    again = _synth(shard)  # the kernel dropped the lock: this one resumes the shard
    assert again.returncode == 0, again.stderr
    report = verify_shard(shard)
    assert report.ok and report.count == 40, (report.problems, report.bad)


def test_second_writer_in_one_process_is_refused(tmp_path):
    shard = str(tmp_path / "s")
    w = ShardWriter(shard, feature_dim=4, class_names=None)
    with pytest.raises(ShardBusyError, match="this process is already writing it"):
        ShardWriter(shard, feature_dim=4, class_names=None)
    w.close()
    with ShardWriter(shard, feature_dim=4, class_names=None) as w2:  # released by close
        assert len(w2) == 0
    assert len(ShardReader(shard)) == 0


def test_writer_that_fails_to_open_releases_its_lock(tmp_path):
    shard = str(tmp_path / "s")
    with ShardWriter(shard, feature_dim=4, class_names=None):
        pass
    with pytest.raises(ShardError, match="existing shard differs in feature_dim"):
        ShardWriter(shard, feature_dim=8, class_names=None)
    with ShardWriter(shard, feature_dim=4, class_names=None):  # not left locked by the failed attempt
        pass


def test_copy_publishes_with_the_stored_hash(tmp_path, small_shard):
    dst = str(tmp_path / "pub" / "shard-000")
    os.makedirs(os.path.dirname(dst))
    assert shards_main(["copy", small_shard, dst]) == 0
    r = ShardReader(dst)
    assert r.state["content_hash"] == verify_shard(dst).content_hash == ShardReader(small_shard).state["content_hash"]
    assert sorted(os.listdir(dst)) == ["data.mdb"]  # no lock file in what is handed out


def test_two_names_of_one_shard_share_its_lock(tmp_path):
    real = tmp_path / "real"
    with ShardWriter(real, feature_dim=4, class_names=None):
        pass
    os.symlink(real, tmp_path / "alias")
    with ShardWriter(real, feature_dim=4, class_names=None):
        with pytest.raises(ShardBusyError):
            ShardWriter(tmp_path / "alias", feature_dim=4, class_names=None)
    assert lock_path(str(tmp_path / "alias")) == str(tmp_path / "real.writer.lock")
