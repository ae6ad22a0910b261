"""Damage never crashes: byte flips and truncation in data.mdb, and a full disk while writing, give a clear
error and a non-zero exit, never a signal death, a raw lmdb traceback or a hang; a rerun after a full disk
resumes."""

import contextlib
import json
import os
import shutil
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import numpy as np
import pytest

from regionbert.data import content_hash
from regionbert.data.synth import write_synthetic_shard

RECORDS = 20

# Runs in a child process: one batch of damage trials against `verify`, a JSON line per trial. A signal that
# kills LMDB kills this process, and the test sees it.
TRIALS = textwrap.dedent("""
    import contextlib, io, json, os, random, struct, sys, traceback
    from regionbert.data.cli import main

    src, work, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
    good = open(os.path.join(src, "data.mdb"), "rb").read()
    psize = 4096
    pages = len(good) // psize

    def tree_pages():  # branch and leaf pages (their header names their own page number)
        out = []
        for i in range(2, pages):
            pgno, _, flags = struct.unpack_from("<QHH", good, i * psize)
            if pgno == i and flags & 0x03:
                out.append(i)
        return out

    trees = tree_pages()
    for t in range(first, first + count):
        rng = random.Random(t)
        data = bytearray(good)
        kind = ["meta", "tree", "tree", "anywhere", "anywhere", "truncate", "zero-page"][t % 7]
        if kind == "truncate":
            data = data[:rng.randrange(0, len(data))]
        elif kind == "zero-page":
            p = rng.randrange(pages)
            data[p * psize:(p + 1) * psize] = bytes(psize)
        else:
            for _ in range(rng.randint(1, 6)):
                if kind == "meta":
                    i = rng.randrange(2 * psize)
                elif kind == "tree":
                    i = rng.choice(trees) * psize + rng.randrange(psize)
                else:
                    i = rng.randrange(len(data))
                if rng.random() < 0.5:
                    data[i] ^= 1 << rng.randrange(8)
                else:
                    data[i] = rng.randrange(256)
        d = os.path.join(work, f"t{t}")
        os.makedirs(d)
        with open(os.path.join(d, "data.mdb"), "wb") as f:
            f.write(data)
        out, err = io.StringIO(), io.StringIO()
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                rc = main(["verify", "-q", d])
        except BaseException:
            rc, err = "raised", io.StringIO(traceback.format_exc())
        print(json.dumps({"trial": t, "kind": kind, "dir": d, "rc": rc, "out": out.getvalue(),
                          "err": err.getvalue()}), flush=True)
""")


@pytest.fixture(scope="module")
def good_shard(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("damage") / "good")
    write_synthetic_shard(path, RECORDS, feature_dim=16, min_boxes=1, max_boxes=8, seed=4)
    return path


def test_random_damage_to_data_mdb_never_crashes_verify(good_shard, tmp_path):
    """300 seeded trials (bit flips and random bytes in meta pages, tree pages and anywhere; truncation; a
    zeroed page), in batches of 75 per child process: every one exits 0 (the damage hit nothing that
    matters, and every record checks out) or 1 with FAILED and the shard's path."""
    results = []
    for first in range(0, 300, 75):
        r = subprocess.run([sys.executable, "-c", TRIALS, good_shard, str(tmp_path), str(first), "75"],
                           capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, f"a batch of damage trials died (code {r.returncode}): {r.stderr[-3000:]}"
        results += [json.loads(line) for line in r.stdout.splitlines()]
    assert len(results) == 300
    for t in results:
        where = f"trial {t['trial']} ({t['kind']}): {t['out']} {t['err']}"
        assert t["rc"] in (0, 1), where
        assert "Traceback" not in t["out"] + t["err"] and "lmdb." not in t["err"], where
        if t["rc"] == 0:
            assert f"OK     {t['dir']}: {RECORDS}/{RECORDS} records checked, 0 bad" in t["out"], where
        else:
            assert f"FAILED {t['dir']}" in t["out"], where
    failed = [t for t in results if t["rc"] == 1]
    assert len(failed) > 100  # the trials did damage things
    # and damage of every kind was reported as such: unreadable pages, not only bad checksums
    assert sum("damaged" in t["out"] for t in failed) > 20


def _run(*args, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, **kw)


def test_a_truncated_data_mdb_is_an_error_everywhere_not_a_sigbus(good_shard, tmp_path):
    """A copy cut short (an interrupted transfer): every way in says so; none dies of SIGBUS."""
    shard = str(tmp_path / "cut")
    shutil.copytree(good_shard, shard)
    with open(os.path.join(shard, "data.mdb"), "r+b") as f:
        f.truncate(2 * 4096 + 100)  # the meta pages and nothing else
    cli = "from regionbert.data.cli import main; import sys; sys.exit(main(sys.argv[1:]))"
    for args, code in ((["inspect", shard], 2), (["verify", "-q", shard], 1), (["export", shard, "--to", "hdf5", "-o",
                                                                                str(tmp_path / "x.h5"), "-q"], 2)):
        r = _run("-c", cli, *args)
        assert r.returncode == code, (args, r.returncode, r.stderr)
        assert "data.mdb is damaged" in r.stdout + r.stderr and "truncated" in r.stdout + r.stderr
        assert "Traceback" not in r.stderr
    r = _run("-c", f"from regionbert.data import ShardReader, ShardError\ntry:\n    ShardReader({shard!r})\n"
             "except ShardError as e:\n    print(e)\n    raise SystemExit(3)")
    assert r.returncode == 3 and f"{shard}: data.mdb is damaged" in r.stdout, r.stderr


# A producer: the synthetic records of write_synthetic_shard, committed every 16 (so a full disk leaves
# some behind), with the CLI's error convention (message on stderr, exit 2).
WRITE = textwrap.dedent("""
    import sys
    import numpy as np
    from regionbert.data import ShardError, ShardWriter
    from regionbert.data.synth import COCO_CLASSES, synth_record

    path, n = sys.argv[1], int(sys.argv[2])
    rng = np.random.default_rng(0)
    prototypes = rng.gamma(1.0, 1.0, (len(COCO_CLASSES), 256)).astype(np.float32)
    try:
        with ShardWriter(path, feature_dim=256, class_names=COCO_CLASSES, commit_every=16) as w:
            for i in range(n):
                rec = synth_record(np.random.default_rng([0, i]), prototypes, 5, 10)
                if f"r{i}" not in w:
                    w.add(f"r{i}", **rec)
    except ShardError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
""")


def _limit_file_size():
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing us
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))


@contextlib.contextmanager
def _small_disk(folder, how=None):
    """1 MiB to write in `folder`: a tmpfs mounted there, or (how="file_size_limit", or where mounting is
    not allowed and how is None) a 1 MiB file size limit for the child. Yields .how, .said (the error a
    writer must give), .preexec_fn (for the child) and .grow() (room for a rerun); unmounts at the end."""
    disk = SimpleNamespace(how=how or "tmpfs", preexec_fn=None, grow=lambda: None)
    if disk.how == "tmpfs":
        m = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(folder)], capture_output=True,
                           text=True)
        if m.returncode and how == "tmpfs":
            pytest.skip(f"cannot mount a small tmpfs here ({m.stderr.strip()}); file_size_limit covers this")
        disk.how = "file_size_limit" if m.returncode else "tmpfs"
    if disk.how == "tmpfs":
        disk.said = "no space left on device"
        disk.grow = lambda: subprocess.run(["mount", "-o", "remount,size=16m", str(folder)], check=True)
    else:
        disk.said, disk.preexec_fn = "file too large", _limit_file_size
    try:
        yield disk
    finally:
        if disk.how == "tmpfs":
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.mark.parametrize("how", ["tmpfs", "file_size_limit"])
def test_a_full_disk_is_a_clear_error_and_a_rerun_resumes(tmp_path, how):
    n = 300
    reference = str(tmp_path / "reference")
    assert _run("-c", WRITE, reference, str(n)).returncode == 0
    disk = tmp_path / "disk"
    disk.mkdir()
    shard = str(disk / "shard")
    with _small_disk(disk, how) as small:
        r = _run("-c", WRITE, shard, str(n), preexec_fn=small.preexec_fn)
        assert r.returncode == 2, r.stderr
        assert f"error: {shard}: {small.said} while committing records" in r.stderr and "Traceback" not in r.stderr
        assert "rerun the same command to resume" in r.stderr or "rerun with a higher limit" in r.stderr
        # what was committed before is intact
        v = _run("-m", "regionbert.data.cli", "verify", "-q", shard)
        committed = int(v.stdout.split(": ")[1].split("/")[0])
        assert 16 <= committed < n and committed % 16 == 0, v.stdout
        assert v.returncode == 1 and "0 bad" in v.stdout and "incomplete" in v.stdout, v.stdout
        small.grow()
        r = _run("-c", WRITE, shard, str(n))  # the same command again, with room
        assert r.returncode == 0, r.stderr
        v = _run("-m", "regionbert.data.cli", "verify", "-q", shard)
        assert v.returncode == 0 and f"{n}/{n} records checked, 0 bad" in v.stdout, v.stdout
        # resumed, not restarted or duplicated: the same content as one uninterrupted run
        h = _run("-c", f"from regionbert.data import content_hash; print(content_hash({shard!r}))")
        assert h.stdout.strip() == content_hash(reference)


def test_an_import_that_fills_the_disk_stops_instead_of_skipping_rows(tmp_path):
    """`import --on-error skip` must not call a full disk a bad row (and go on losing rows): it stops with
    exit 2, and the same command with room resumes to the source's exact content. (A 1 MiB tmpfs; where
    mounting is not allowed, a 1 MiB file size limit.)"""
    src = str(tmp_path / "src")
    write_synthetic_shard(src, 300, feature_dim=256, min_boxes=5, max_boxes=10, seed=2)
    h5 = str(tmp_path / "src.h5")
    cli = ["-m", "regionbert.data.cli"]
    assert _run(*cli, "export", src, "--to", "hdf5", "-o", h5, "-q").returncode == 0
    disk = tmp_path / "disk"
    disk.mkdir()
    shard = str(disk / "shard")
    cmd = [*cli, "import", h5, "-o", shard, "-q", "-j", "1", "--commit-every", "16", "--on-error", "skip",
           "--report", str(tmp_path / "report.jsonl")]
    with _small_disk(disk) as small:
        r = _run(*cmd, preexec_fn=small.preexec_fn)
        assert r.returncode == 2 and f"error: {shard}: {small.said}" in r.stderr, r.stderr
        assert "Traceback" not in r.stderr and not os.path.exists(tmp_path / "report.jsonl")
        small.grow()
        r = _run(*cmd)
        assert r.returncode == 0 and "0 bad rows skipped" in r.stdout, r.stdout + r.stderr
        assert "already there" in r.stdout and " 0 already there" not in r.stdout  # resumed
        h = _run("-c", f"from regionbert.data import content_hash; print(content_hash({shard!r}))")
        assert h.stdout.strip() == content_hash(src)


def test_an_extraction_that_fills_the_disk_stops(tmp_path):
    """The extractor must not file a full disk under failed images (losing the batch that was being
    committed and going on): it stops with exit 2 naming the shard, and what it committed is intact."""
    from PIL import Image

    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(20):
        Image.fromarray(rng.integers(0, 255, (64, 80, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
    out = tmp_path / "disk"
    out.mkdir()
    cmd = ["-m", "regionbert.extract.cli", str(images), "-o", str(out), "--weights", "none", "--detector",
           "mobilenet_v3_large_320_fpn", "--min-size", "96", "--max-size", "128", "--workers", "0",
           "--batch-size", "4", "--commit-every", "4", "--boxes-per-image", "36", "-q"]  # ~75 KB an image
    shard = str(out / "shard-00000-of-00001")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    with _small_disk(out) as small:
        r = _run(*cmd, env=env, preexec_fn=small.preexec_fn)
        assert r.returncode == 2 and f"{shard}: {small.said}" in r.stderr, r.stdout + r.stderr
        assert "Traceback" not in r.stderr
        failures = out / "shard-00000-of-00001.failures.jsonl"
        assert not failures.exists() or small.said not in failures.read_text()
        # what was committed is intact (resuming it is the writer's, tested above)
        v = _run("-m", "regionbert.data.cli", "verify", "-q", shard)
        committed = int(v.stdout.split(": ")[1].split("/")[0])
        assert 4 <= committed < 20 and "0 bad" in v.stdout and "incomplete" in v.stdout, v.stdout
