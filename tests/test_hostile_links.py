"""Links and second paths planted around a shard (issue 22, items 1-4): a writer never follows a planted
lock-file link, the one-writer lock binds to the shard folder itself (a second mount, a renamed folder),
a reader never creates or writes anything through a lock.mdb / data.mdb link, and an index cannot reach a
file outside its folder through a shard's inner links, nor list one shard twice. Each attack asserts the
clean error (exit code 2 naming the file), that nothing outside the shard changed, and that nothing was lost."""

import json
import os
import re
import shutil
import stat
import subprocess
import sys

import numpy as np
import pytest
from helpers import PAUSED_WRITER
from PIL import Image
from train_synth import write_dataset

from regionbert.data import ShardError, ShardReader, ShardSet, ShardWriter, verify_shard
from regionbert.data.cli import main as shards_main
from regionbert.data.lock import INSIDE_NAME, ShardBusyError
from regionbert.data.synth import write_synthetic_shard

VICTIM_TEXT = "the reader's own file: must not change\n" * 10



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
    p = subprocess.Popen([sys.executable, "-c", PAUSED_WRITER, shard], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
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
first = subprocess.Popen([sys.executable, "-c", {PAUSED_WRITER!r}, a], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
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


# ---- item 1: a reader never creates or writes anything through a lock.mdb / data.mdb it did not make ----------

SET_COMPLETE = """
import json, sys, lmdb
env = lmdb.open(sys.argv[1], subdir=True, max_dbs=3, lock=False)
meta_db = env.open_db(b"meta")
with env.begin(write=True) as txn:
    state = json.loads(bytes(txn.get(b"state", db=meta_db)))
    txn.put(b"state", json.dumps({**state, "complete": sys.argv[2] == "true"}).encode(), db=meta_db)
env.close()
"""


def _set_complete(path: str, complete: bool) -> None:
    """Rewrite the shard's state (the attacker's edit: an incomplete shard is read with LMDB's lock). In a
    child: this process may hold the shard open already (LMDB allows one environment per file)."""
    subprocess.run([sys.executable, "-c", SET_COMPLETE, path, str(complete).lower()], check=True, timeout=120)


def _data_bytes(shard: str) -> bytes:
    return open(os.path.join(shard, "data.mdb"), "rb").read()


def _plant_lock(tmp_path, shard: str, plant: str) -> str:
    """lock.mdb replaced by `plant`; returns the victim file (or the path a dangling link names)."""
    lock = os.path.join(shard, "lock.mdb")
    if os.path.exists(lock):
        os.remove(lock)
    if plant == "dangling":
        victim = str(tmp_path / "made-through-the-link")
        os.symlink(victim, lock)
        return victim
    victim = _victim(tmp_path)
    if plant == "symlink":
        os.symlink(victim, lock)
    elif plant == "hardlink":
        os.link(victim, lock)
    else:
        os.mkfifo(lock)
    return victim


@pytest.fixture
def incomplete(tmp_path):
    """`synth s -n 20 --dim 16`, its state then set to incomplete (as in the issue)."""
    shard = str(tmp_path / "s")
    write_synthetic_shard(shard, 20, feature_dim=16, seed=2, min_boxes=0, max_boxes=4)
    _set_complete(shard, False)
    image = str(tmp_path / "image.png")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(image)
    return shard, image


READERS = {
    "inspect": lambda s, t: shards_main(["inspect", s]),
    "verify": lambda s, t: shards_main(["verify", "-q", s]),
    "show": lambda s, t: shards_main(["show", s, "--image", str(t / "image.png"), "-o", str(t / "show.png")]),
    "export": lambda s, t: shards_main(["export", s, "--to", "hdf5", "-q", "-o", str(t / "all.h5")]),
    "index --force": lambda s, t: shards_main(["index", s, "--force", "-q", "-o", str(t / "index.json")]),
    "ShardSet": lambda s, t: len(ShardSet(s)) and sum(float(r.features.sum()) for r in ShardSet(s)),
    "ShardReader": lambda s, t: [r.id for r in ShardReader(s)],
}


@pytest.mark.parametrize("plant", ["symlink", "dangling", "hardlink", "fifo"])
@pytest.mark.parametrize("reader", list(READERS))
def test_readers_never_write_through_a_planted_lock_mdb(tmp_path, incomplete, capsys, reader, plant):
    shard, _ = incomplete
    victim = _plant_lock(tmp_path, shard, plant)
    data = _data_bytes(shard)
    try:
        rc = READERS[reader](shard, tmp_path)
    except ShardError as e:
        rc, text = 2, str(e)
    else:
        text = "".join(capsys.readouterr())
    why = {"symlink": "is a symbolic link", "dangling": "is a symbolic link", "hardlink": "has 2 hard links",
           "fifo": "is not a regular file"}[plant]
    assert rc in (1, 2) and f"{shard}: lock.mdb {why}" in text, text  # verify: 1 (FAILED, naming the problem)
    if plant == "dangling":
        assert not os.path.lexists(victim)  # nothing created through the link
    else:
        assert _unchanged(victim)
    assert _data_bytes(shard) == data  # the shard itself untouched
    assert not os.path.exists(tmp_path / "index.json")


def test_the_trainer_never_writes_through_a_planted_lock_mdb(tmp_path):
    d = write_dataset(str(tmp_path / "d"), n_train=12, n_val=4, feature_dim=8, min_boxes=1, max_boxes=4)
    shard = d["shards"]
    _set_complete(shard, False)
    victim = _plant_lock(tmp_path, shard, "symlink")
    args = [f"--set=data.shards={shard}", f"--set=data.captions={d['captions']}",
            f"--set=data.tokenizer={d['tokenizer']}", "--set=optim.steps=1", "--out", str(tmp_path / "run")]
    r = subprocess.run([sys.executable, "-m", "regionbert.train.cli", *args], capture_output=True, text=True,
                       cwd="/", timeout=600)
    assert r.returncode == 2 and f"{shard}: lock.mdb is a symbolic link" in r.stderr, r.stdout[-2000:] + r.stderr
    assert "Traceback" not in r.stderr and _unchanged(victim)


def test_an_incomplete_shard_still_reads_with_its_lock(tmp_path, incomplete):
    """The pinned open (LMDB handed the lock.mdb opened here) still takes LMDB's reader lock: a reader of an
    incomplete shard sees every committed record, and the lock.mdb it created is a plain file in the folder."""
    shard, _ = incomplete
    os.remove(os.path.join(shard, "lock.mdb"))
    with pytest.warns(UserWarning, match="incomplete"):
        r = ShardReader(shard)
    assert len(r) == 20 and len([x.id for x in r]) == 20
    st = os.lstat(os.path.join(shard, "lock.mdb"))
    assert stat.S_ISREG(st.st_mode) and st.st_size > 0  # LMDB's lock table, written into the file made here


@pytest.mark.parametrize("target", ["another shard", "a private file"])
def test_a_data_mdb_link_is_refused_by_every_reader(tmp_path, capsys, target):
    shard = str(tmp_path / "s")
    write_synthetic_shard(shard, 5, feature_dim=16, seed=1, min_boxes=0, max_boxes=3)
    if target == "another shard":
        other = str(tmp_path / "elsewhere")
        write_synthetic_shard(other, 7, feature_dim=16, seed=5, min_boxes=0, max_boxes=3)
        linked = os.path.join(other, "data.mdb")
    else:
        linked = _victim(tmp_path, "private.txt")
    os.remove(os.path.join(shard, "data.mdb"))
    os.symlink(linked, os.path.join(shard, "data.mdb"))
    for reader in READERS.values():
        try:
            rc = reader(shard, tmp_path)
        except ShardError as e:
            rc, text = 2, str(e)
        else:
            text = "".join(capsys.readouterr())
        assert rc in (1, 2) and f"{shard}: data.mdb is a symbolic link" in text, text
        assert "the reader's own" not in text and "0x" not in text  # no byte of the linked file echoed


@pytest.mark.parametrize("name", ["lock.mdb", "data.mdb"])
def test_a_writer_resuming_a_shard_never_writes_through_its_links(tmp_path, incomplete, name):
    shard, _ = incomplete
    victim = _victim(tmp_path)
    target = os.path.join(shard, name)
    if name == "data.mdb":  # the real file moved away, a link in its place
        os.rename(target, str(tmp_path / "moved.mdb"))
        shutil.copyfile(str(tmp_path / "moved.mdb"), victim)
    else:
        os.remove(target)
    before = open(victim, "rb").read()
    os.symlink(victim, target)
    r = _cli("synth", shard, "-n", "30", "--dim", "16", "--seed", "2", "--min-boxes", "0", "--max-boxes", "4", "-q")
    assert r.returncode == 2 and f"{shard}: {name} is a symbolic link" in r.stderr, r.stderr
    assert open(victim, "rb").read() == before


# ---- item 4: an index reaches no file outside its folder, lists each shard once, and lists some ---------------

@pytest.fixture
def indexed_folder(tmp_path):
    folder = tmp_path / "pub"
    for name in ("a", "b"):
        write_synthetic_shard(str(folder / name), 6, feature_dim=16, seed=1, min_boxes=0, max_boxes=3,
                              id_prefix=name)
    index = str(folder / "index.json")
    assert shards_main(["index", str(folder), "-q", "-o", index]) == 0
    return folder, index


def _train_args(tmp_path, d, shards: str) -> list:
    return [f"--set=data.shards={shards}", f"--set=data.captions={d['captions']}",
            f"--set=data.tokenizer={d['tokenizer']}", "--set=optim.steps=1", "--out", str(tmp_path / "run")]


def test_an_indexed_shard_whose_data_mdb_leads_outside_is_refused(tmp_path, indexed_folder, capsys):
    """b/data.mdb replaced by a link to a shard outside the index's folder (a copy of b's own file, so count and
    content hash match the index entry): the folder is inside, its file is not. index, verify, ShardSet refuse."""
    folder, index = indexed_folder
    outside = tmp_path / "outside"
    outside.mkdir()
    shutil.move(str(folder / "b" / "data.mdb"), str(outside / "data.mdb"))
    os.symlink(str(outside / "data.mdb"), str(folder / "b" / "data.mdb"))
    bad = f"{folder / 'b'}: data.mdb is a symbolic link"
    assert shards_main(["verify", "-q", index]) == 1
    out = capsys.readouterr().out
    assert f"FAILED {folder / 'b'}" in out and bad in out and f"OK     {folder / 'a'}" in out, out
    with pytest.raises(ShardError, match=bad):
        ShardSet(index)
    assert shards_main(["index", str(folder), "-q", "-o", str(tmp_path / "again.json")]) == 2
    assert bad in capsys.readouterr().err and not os.path.exists(tmp_path / "again.json")


def test_the_trainer_refuses_an_indexed_shard_whose_data_mdb_leads_outside(tmp_path):
    d = write_dataset(str(tmp_path / "d"), n_train=12, n_val=4, feature_dim=8, min_boxes=1, max_boxes=4)
    index = str(tmp_path / "d" / "index.json")
    assert shards_main(["index", d["shards"], "-q", "-o", index]) == 0
    shutil.move(os.path.join(d["shards"], "data.mdb"), str(tmp_path / "elsewhere.mdb"))
    os.symlink(str(tmp_path / "elsewhere.mdb"), os.path.join(d["shards"], "data.mdb"))
    r = subprocess.run([sys.executable, "-m", "regionbert.train.cli", *_train_args(tmp_path, d, index)],
                       capture_output=True, text=True, cwd="/", timeout=600)
    assert r.returncode == 2 and f"{d['shards']}: data.mdb is a symbolic link" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr


def test_one_shard_listed_twice_is_refused(tmp_path, indexed_folder, capsys):
    folder, index = indexed_folder
    os.symlink("a", str(folder / "alias"))  # inside the index's folder: containment alone lets it through
    with open(index) as f:
        doc = json.load(f)
    doc["shards"].append({**doc["shards"][0], "path": "alias"})
    doc["total"] += doc["shards"][0]["count"]
    with open(index, "w") as f:
        json.dump(doc, f)
    why = f"shard entries 0 ({folder / 'a'}) and 2 ({folder / 'alias'}) name the same shard"
    with pytest.raises(ShardError, match=re.escape(why)):
        ShardSet(index)
    assert shards_main(["verify", "-q", index]) == 2
    assert why in capsys.readouterr().err
    # and `index` given both names
    assert shards_main(["index", str(folder / "a"), str(folder / "alias"), "-q", "-o", str(tmp_path / "i.json")]) == 2
    assert "the same shard as" in capsys.readouterr().err and not os.path.exists(tmp_path / "i.json")


def test_verify_of_an_index_listing_no_shards_fails(tmp_path, capsys):
    index = str(tmp_path / "index.json")
    with open(index, "w") as f:
        json.dump({"format": "regionbert-index", "version": 1, "total": 0, "shards": []}, f)
    assert shards_main(["verify", index]) == 2
    err = capsys.readouterr().err
    assert f"{index}: index lists no shards" in err, err
    with pytest.raises(ShardError, match="index lists no shards"):
        ShardSet(index)


def test_lmdb_is_handed_the_checked_files_not_their_names(tmp_path, incomplete):
    """The check and LMDB's open are not two looks at one name: lock.mdb swapped for a link right after it was
    checked (a racing attacker), LMDB still writes its lock table into the file that was checked."""
    from regionbert.data import handles

    if not handles._PIN:
        pytest.skip("no /proc/self/fd: LMDB opens the names, after the same checks")
    shard, _ = incomplete
    lock = os.path.join(shard, "lock.mdb")
    os.remove(lock)
    fds = [handles._open_shard_file(shard, "data.mdb", os.O_RDONLY, written=False),
           handles._open_shard_file(shard, "lock.mdb", os.O_RDWR | os.O_CREAT, written=True)]
    checked = str(tmp_path / "checked-lock.mdb")
    os.rename(lock, checked)
    victim = _victim(tmp_path)
    os.symlink(victim, lock)
    try:
        env = handles._lmdb_open(shard, fds, lock=True, readonly=True, max_dbs=3)
    finally:
        for fd in fds:
            os.close(fd)
    with env.begin() as txn:
        assert txn.stat(env.open_db(b"order", txn=txn, create=False))["entries"] == 20
    env.close()
    assert _unchanged(victim) and os.path.getsize(checked) > 0
