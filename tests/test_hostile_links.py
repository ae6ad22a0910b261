"""Links and second paths planted around a shard (issue 22, items 1-4): a writer never follows a planted
lock-file link, the one-writer lock binds to the shard folder itself (a second mount, a renamed folder),
a reader never creates or writes anything through a lock.mdb / data.mdb link, and an index cannot reach a
file outside its folder through a shard's inner links, nor list one shard twice. Each attack asserts the
clean error (exit code 2 naming the file), that nothing outside the shard changed, and that nothing was lost."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from regionbert.data import ShardReader, ShardWriter, verify_shard
from regionbert.data.lock import INSIDE_NAME, ShardBusyError
from regionbert.data.synth import write_synthetic_shard

VICTIM_TEXT = "the reader's own file: must not change\n" * 10

# A writer that pauses after 10 records until told to go on (a line on stdin): a real process holding the lock.
FIRST = """
import sys
from regionbert.data.synth import write_synthetic_shard
done = [0]
def progress(n):
    done[0] += n
    if done[0] == 10:
        print("ready", flush=True)
        sys.stdin.readline()
write_synthetic_shard(sys.argv[1], 40, feature_dim=16, min_boxes=0, max_boxes=5, seed=3, progress=progress)
print("finished", flush=True)
"""


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "regionbert.data.cli", *args], capture_output=True, text=True,
                          cwd="/", timeout=300)


def _victim(tmp_path, name: str = "victim.txt") -> str:
    path = str(tmp_path / name)
    with open(path, "w") as f:
        f.write(VICTIM_TEXT)
    return path


def _unchanged(path: str) -> bool:
    return open(path).read() == VICTIM_TEXT


# ---- item 3: writers never follow a planted lock-file link --------------------------------------------------

@pytest.mark.parametrize("plant", ["symlink", "dangling", "hardlink", "fifo"])
def test_writer_refuses_a_planted_lock_file_next_to_the_shard(tmp_path, plant):
    victim = _victim(tmp_path)
    shard = str(tmp_path / "s")
    lock = shard + ".writer.lock"
    if plant == "symlink":
        os.symlink(victim, lock)
    elif plant == "dangling":
        os.symlink(str(tmp_path / "made-through-the-link"), lock)
    elif plant == "hardlink":
        os.link(victim, lock)
    else:
        os.mkfifo(lock)
    r = _cli("synth", shard, "-n", "3", "--dim", "16", "-q")
    assert r.returncode == 2, r.stderr
    assert f"its writer lock {lock} is" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert _unchanged(victim)
    assert not os.path.exists(tmp_path / "made-through-the-link")
    assert not os.path.exists(shard)  # refused before the shard was made


def test_copy_refuses_a_planted_lock_link_at_its_destination(tmp_path, small_shard):
    victim = _victim(tmp_path)
    dst = str(tmp_path / "pub")
    os.symlink(victim, dst + ".writer.lock")
    r = _cli("copy", small_shard, dst)
    assert r.returncode == 2 and "symbolic link" in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert _unchanged(victim) and not os.path.exists(dst)


def test_writer_refuses_a_planted_lock_link_inside_the_shard(tmp_path):
    victim = _victim(tmp_path)
    shard = str(tmp_path / "s")
    write_synthetic_shard(shard, 5, feature_dim=16, seed=1, min_boxes=0, max_boxes=3)
    before = verify_shard(shard).content_hash
    os.remove(os.path.join(shard, INSIDE_NAME))
    os.symlink(victim, os.path.join(shard, INSIDE_NAME))
    r = _cli("synth", shard, "-n", "8", "--dim", "16", "--seed", "1", "--min-boxes", "0", "--max-boxes", "3", "-q")
    assert r.returncode == 2 and f"{shard}/{INSIDE_NAME} is a symbolic link" in r.stderr, r.stderr
    assert _unchanged(victim)
    os.remove(os.path.join(shard, INSIDE_NAME))
    report = verify_shard(shard)  # nothing lost, nothing added
    assert report.ok and report.count == 5 and report.content_hash == before


# ---- item 2: the lock binds to the shard folder, whatever path reaches it -------------------------------------

def _first_writer(shard: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", FIRST, shard], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, cwd="/")
    assert p.stdout.readline().strip() == "ready", p.stderr.read()
    return p


def test_a_renamed_folder_is_still_locked(tmp_path):
    """The writer holds s; the folder is renamed to t under it. A writer of t finds a new name next to the
    folder (t.writer.lock, free), but the same folder: refused, naming the first."""
    shard, moved = str(tmp_path / "s"), str(tmp_path / "t")
    first = _first_writer(shard)
    try:
        os.rename(shard, moved)
        second = _cli("synth", moved, "-n", "40", "--dim", "16", "--min-boxes", "0", "--max-boxes", "5", "--seed", "3",
                      "-q")
        assert second.returncode == 2, second.stderr
        assert "another writer is writing this shard" in second.stderr and f"pid {first.pid}" in second.stderr
    finally:
        out, err = first.communicate("go\n", timeout=300)
    assert first.returncode == 0 and "finished" in out, err
    report = verify_shard(moved)
    assert report.ok and report.count == report.checked == 40, (report.problems, report.bad)


def test_one_process_two_paths_of_one_folder(tmp_path):
    shard, moved = str(tmp_path / "s"), str(tmp_path / "t")
    with ShardWriter(shard, feature_dim=4, class_names=None):
        os.rename(shard, moved)
        with pytest.raises(ShardBusyError, match="this process is already writing it"):
            ShardWriter(moved, feature_dim=4, class_names=None)


# Run inside a private mount namespace where B is a bind mount of A: a first writer on A (paused), a second on B.
SECOND_MOUNT = f"""
import json, subprocess, sys
a, b = sys.argv[1], sys.argv[2]
first = subprocess.Popen([sys.executable, "-c", {FIRST!r}, a], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
ready = first.stdout.readline().strip()
second = subprocess.run([sys.executable, "-m", "regionbert.data.cli", "synth", b, "-n", "40", "--dim", "16",
                         "--min-boxes", "0", "--max-boxes", "5", "--seed", "3", "--prefix", "other", "-q"],
                        capture_output=True, text=True)
out, err = first.communicate("go\\n")
print(json.dumps({{"ready": ready, "first_pid": first.pid, "first_rc": first.returncode, "first_out": out,
                  "first_err": err, "second_rc": second.returncode, "second_err": second.stderr}}))
"""


def test_a_second_mount_of_the_folder_is_refused(tmp_path):
    """A real bind mount (a container volume `-v host/shard:/out/shard` is one): two real paths that realpath
    cannot unify. Needs unshare(1) and user or mount namespaces; skipped where they are not allowed."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("needs unshare(1)")
    a, b = str(tmp_path / "host" / "shard-0"), str(tmp_path / "out" / "shard-0")
    os.makedirs(a)
    os.makedirs(b)
    script = 'mount --bind "$1" "$2" || exit 77; exec "$3" -c "$4" "$1" "$2"'
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    r = subprocess.run([unshare, "-rm", "sh", "-c", script, "sh", a, b, sys.executable, SECOND_MOUNT],
                       capture_output=True, text=True, cwd="/", timeout=300, env=env)
    if r.returncode in (1, 77) and not r.stdout:
        pytest.skip(f"cannot make a bind mount in a private namespace here: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stdout + r.stderr
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["ready"] == "ready" and res["first_rc"] == 0 and "finished" in res["first_out"], res
    assert res["second_rc"] == 2, res
    assert "another writer is writing this shard" in res["second_err"], res
    assert f"pid {res['first_pid']}" in res["second_err"], res
    report = verify_shard(a)  # the first writer's 40 records, each with its order entry; none of the second's
    assert report.ok and report.count == report.checked == 40, (report.problems, report.bad)
    assert not [k for k in ShardReader(a).keys() if k.startswith("other")]
