"""Box counts without touching features (issue 24 item 1): the box-count table of format 1.1.

The trainer must know every record's number of boxes before step 1. It used to read every record in full
for it (a checksummed read of all features: the whole corpus, per rank). Now the writer keeps a small table
of counts in the shard's `meta` database (docs/shard-format.md section 1), written with each commit, and
ShardReader/ShardSet.box_counts() read it in one transaction. These tests hold that table to the records:
for synth, the writer across chunk boundaries, a writer killed with kill -9 and resumed (real processes),
`copy`, and an import; a format 1.0 shard (no table) still counts, from its headers, warning once; a forged
or malformed table is refused by box_counts (so by the trainer's start-up), by `verify`, and, where it is
plausible but wrong, by the first read of the record it lies about.
"""

import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import textwrap
import warnings

import lmdb
import numpy as np
import pytest
from train_synth import write_dataset

from regionbert.data import ShardError, ShardReader, ShardSet, ShardWriter, verify_shard
from regionbert.data.cli import main as shards_main
from regionbert.data.format import BOX_CHUNK, BOX_COUNTS, box_chunk_key
from regionbert.data.synth import write_synthetic_shard
from regionbert.train.data import PairDataset, Pairs
from regionbert.train.text import Text


def _records(path) -> np.ndarray:
    """Every record's box count the slow way: each record read in full, checksum verified."""
    r = ShardReader(path)
    return np.array([r[i].num_boxes for i in range(len(r))], dtype=np.int64)


def _synth(path, n=40, **kw) -> str:
    write_synthetic_shard(str(path), n, **{"feature_dim": 16, "min_boxes": 0, "max_boxes": 12, "seed": 5, **kw})
    return str(path)


def _edit_meta(path: str, fn) -> None:
    """Change the shard's meta table by hand, bypassing the writer (a forger, or an older writer)."""
    env = lmdb.open(path, subdir=True, max_dbs=3)
    try:
        with env.begin(write=True) as txn:
            fn(txn, env.open_db(b"meta", txn=txn))
    finally:
        env.close()


def _raw_table(path: str) -> dict[bytes, bytes]:
    """The stored chunks, key -> value (read before any reader of this process opens the shard)."""
    out = {}
    env = lmdb.open(path, subdir=True, max_dbs=3, readonly=True, lock=False)
    try:
        with env.begin() as txn:
            for k, v in txn.cursor(db=env.open_db(b"meta", txn=txn, create=False)):
                if k.startswith(BOX_COUNTS):
                    out[bytes(k)] = bytes(v)
    finally:
        env.close()
    return out


def _strip_table(path: str, complete: bool = True) -> None:
    """Make a format 1.0 shard: no table, no schema_minor (what an earlier regionbert wrote)."""
    def strip(txn, meta):
        for k in [bytes(k) for k, _ in txn.cursor(db=meta) if bytes(k).startswith(BOX_COUNTS)]:
            txn.delete(k, db=meta)
        m = json.loads(bytes(txn.get(b"shard", db=meta)))
        m.pop("schema_minor")
        txn.put(b"shard", json.dumps(m).encode(), db=meta)
        if not complete:  # a 1.0 writer killed mid-run
            s = json.loads(bytes(txn.get(b"state", db=meta)))
            txn.put(b"state", json.dumps({**s, "complete": False}).encode(), db=meta)
    _edit_meta(path, strip)


def _set_table(path: str, counts, chunk: int = BOX_CHUNK) -> None:
    """Replace the table with these counts (a forged one), chunked as stored."""
    def put(txn, meta):
        for k in [bytes(k) for k, _ in txn.cursor(db=meta) if bytes(k).startswith(BOX_COUNTS)]:
            txn.delete(k, db=meta)
        c = np.asarray(counts, dtype="<u4")
        for k, off in enumerate(range(0, len(c), chunk)):
            txn.put(box_chunk_key(k), c[off:off + chunk].tobytes(), db=meta)
    _edit_meta(path, put)


# ---- the table matches the records ---------------------------------------------------------------------


def test_synth_table_is_the_records_box_counts_as_specified(tmp_path):
    path = _synth(tmp_path / "s", 50)
    raw = _raw_table(path)  # docs/shard-format.md: key box_counts/ + uint32 BE chunk, LE uint32 counts
    assert list(raw) == [BOX_COUNTS + b"\0\0\0\0"]
    counts = ShardReader(path).box_counts()
    assert counts.dtype == np.uint32 and not counts.flags.writeable and len(counts) == 50
    assert np.array_equal(counts, _records(path))
    assert np.array_equal(np.frombuffer(raw[BOX_COUNTS + b"\0\0\0\0"], "<u4"), counts)
    assert ShardReader(path).meta["schema_minor"] == 1 and (counts == 0).any()  # 0-box records are counted too
    assert verify_shard(path).ok


def test_writer_table_across_chunks_and_commits(tmp_path):
    """More than one chunk, with a commit that straddles the chunk boundary (300-record commits)."""
    n = BOX_CHUNK + 300
    path = str(tmp_path / "w")
    rng = np.random.default_rng(0)
    want = rng.integers(0, 4, n)
    with ShardWriter(path, feature_dim=2, class_names=None, commit_every=300) as w:
        for i, k in enumerate(want):
            b = np.tile(np.array([[1, 1, 5, 5]], np.float32), (k, 1))
            w.add(f"r{i}", width=8, height=8, boxes=b, features=np.ones((k, 2)))
    raw = _raw_table(path)
    assert list(raw) == [box_chunk_key(0), box_chunk_key(1)]
    assert [len(v) // 4 for v in raw.values()] == [BOX_CHUNK, 300]
    counts = ShardReader(path).box_counts()
    assert np.array_equal(counts, want) and np.array_equal(counts, _records(path))
    assert verify_shard(path).ok


def test_empty_shard_has_no_table_and_no_warning(tmp_path):
    path = str(tmp_path / "e")
    ShardWriter(path, feature_dim=4, class_names=None).close()
    assert _raw_table(path) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(ShardReader(path).box_counts()) == 0 and len(ShardSet(path).box_counts()) == 0
    assert verify_shard(path).ok


def test_shard_set_concatenates_shards_in_order(tmp_path):
    a, b = _synth(tmp_path / "a", 30, seed=1, id_prefix="a"), _synth(tmp_path / "b", 20, seed=2, id_prefix="b")
    s = ShardSet([a, b], check_settings=False)  # (their seeds differ, and the seed is an extractor setting)
    counts = s.box_counts()
    assert counts.dtype == np.uint32 and len(counts) == 50
    assert np.array_equal(counts, np.concatenate([_records(a), _records(b)]))
    assert np.array_equal(counts, [s[i].num_boxes for i in range(len(s))])


WRITER_SCRIPT = textwrap.dedent("""
    import sys
    import regionbert.data.writer as wm
    from regionbert.data.synth import write_synthetic_shard

    commit = wm.ShardWriter.commit
    def noisy_commit(self):
        commit(self)
        print("committed", self.count, flush=True)
    wm.ShardWriter.commit = noisy_commit
    import regionbert.data.synth as sm
    orig = sm.ShardWriter
    sm.ShardWriter = lambda *a, **k: orig(*a, **(k | {"commit_every": 7}))
    write_synthetic_shard(sys.argv[1], int(sys.argv[2]), feature_dim=16, min_boxes=0, max_boxes=12, seed=3)
""")


def test_kill_9_then_resume_keeps_the_table_whole(tmp_path):
    total = 120
    script = tmp_path / "write.py"
    script.write_text(WRITER_SCRIPT)
    path = str(tmp_path / "killed")
    cmd = [sys.executable, str(script), path, str(total)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:  # killed while it writes: between commits or in one
        if int(line.split()[1]) >= 40:
            break
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    with pytest.warns(UserWarning, match="incomplete"):
        partial = ShardReader(path)
    n = len(partial)
    assert 40 <= n < total and n % 7 == 0
    with pytest.warns(UserWarning, match="incomplete"):
        slow = _records(path)
    assert np.array_equal(partial.box_counts(), slow)  # exactly the committed records
    assert not verify_shard(path).bad and not [p for p in verify_shard(path).problems if "box-count" in p]

    subprocess.run(cmd, check=True, capture_output=True)  # the same command resumes
    clean = _synth(tmp_path / "clean", total, seed=3)
    counts = ShardReader(path).box_counts()
    assert len(counts) == total and np.array_equal(counts, _records(path))
    assert np.array_equal(counts, ShardReader(clean).box_counts())
    assert verify_shard(path).ok


def test_copy_and_import_keep_the_table(tmp_path):
    src = _synth(tmp_path / "src", 40)
    dst = str(tmp_path / "pub")
    assert shards_main(["copy", src, dst]) == 0
    h5, back = str(tmp_path / "f.h5"), str(tmp_path / "back")
    assert shards_main(["export", src, "--to", "hdf5", "-o", h5, "-q"]) == 0
    assert shards_main(["import", h5, "-o", back, "-q", "-j", "1"]) == 0  # an import goes through the writer
    want = _records(src)
    for p in (dst, back):
        assert np.array_equal(ShardReader(p).box_counts(), want), p
        assert verify_shard(p).ok, p


def test_copy_publishes_an_old_shard_with_its_table_and_refuses_a_forged_one(tmp_path):
    ref = _synth(tmp_path / "ref", 40, min_boxes=1)
    old = _synth(tmp_path / "old", 40, min_boxes=1)
    _strip_table(old)
    assert shards_main(["copy", old, str(tmp_path / "pub")]) == 0  # publishing is the upgrade
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pub = ShardReader(tmp_path / "pub")
        assert np.array_equal(pub.box_counts(), ShardReader(ref).box_counts())
    assert pub.meta["schema_minor"] == 1 and verify_shard(str(tmp_path / "pub")).ok
    assert pub.state["content_hash"] == ShardReader(ref).state["content_hash"]  # the same content

    forged = _synth(tmp_path / "forged", 40, min_boxes=1)
    c = np.frombuffer(_raw_table(forged)[box_chunk_key(0)], "<u4").astype(np.int64)
    c[[5, 6]] = c[[6, 5]] if c[5] != c[6] else (c[5] + 1, c[6] - 1)
    _set_table(forged, c)
    dst = str(tmp_path / "pub2")
    with pytest.raises(ShardError) as e:
        from regionbert.data.index import compact_copy
        compact_copy(forged, dst)
    assert str(e.value).startswith(f"{forged}: box-count table says {c[5]} boxes at position 5")
    assert not os.path.exists(dst) and not os.path.exists(dst + ".partial")  # nothing published
    assert shards_main(["copy", forged, dst]) == 2


# ---- format 1.0 shards: counted from their headers, once warned ----------------------------------------


def test_old_format_shard_counts_from_headers_and_warns_once(tmp_path):
    ref = _synth(tmp_path / "ref", 40)
    old = _synth(tmp_path / "old", 40)
    _strip_table(old)
    assert _raw_table(old) == {}
    with pytest.warns(UserWarning) as caught:
        r = ShardReader(old)
        first = r.box_counts()
        again = ShardSet(old).box_counts()  # a second reader, the same process: no second warning
    said = [str(w.message) for w in caught]
    assert len(said) == 1 and said[0].startswith(f"{old}: shard has no box-count table (written before format "
                                                 "1.1); counting the boxes of its 40 records from their headers")
    assert np.array_equal(first, ShardReader(ref).box_counts()) and np.array_equal(again, first)
    assert first.dtype == np.uint32
    assert verify_shard(old).ok  # a 1.0 shard without a table is not damaged


def test_old_format_header_read_does_not_check_or_decode_features(tmp_path):
    """Only the header is used: features zeroed without fixing the checksum still count (a full read fails)."""
    old = _synth(tmp_path / "old", 10)
    _strip_table(old)
    env = lmdb.open(old, subdir=True, max_dbs=3)
    with env.begin(write=True) as txn:
        records = env.open_db(b"records", txn=txn)
        key = bytes(txn.get(struct.pack(">Q", 3), db=env.open_db(b"order", txn=txn)))
        value = bytearray(txn.get(key, db=records))
        n = struct.unpack_from("<I", value, 16)[0]
        value[-100:-8] = bytes(92)  # inside the last sections: the checksum no longer matches
        txn.put(key, bytes(value), db=records)
    env.close()
    with pytest.warns(UserWarning, match="no box-count table"):
        counts = ShardReader(old).box_counts()
    assert counts[3] == n
    with pytest.raises(ShardError, match="checksum mismatch"):
        ShardReader(old)[3]


def _resident_pages(path: str) -> tuple[int, int]:
    """(pages of the file in the page cache, pages in all), by mincore(2) on a fresh map of it."""
    import ctypes
    import mmap

    libc = ctypes.CDLL(None, use_errno=True)
    libc.mmap.restype = ctypes.c_void_p
    libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
    size = os.path.getsize(path)
    pages = -(-size // mmap.PAGESIZE)
    fd = os.open(path, os.O_RDONLY)
    try:
        addr = libc.mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            pytest.skip(f"mmap: {os.strerror(ctypes.get_errno())}")
        vec = (ctypes.c_ubyte * pages)()
        try:
            if libc.mincore(addr, size, vec) != 0:
                pytest.skip(f"mincore: {os.strerror(ctypes.get_errno())}")
        finally:
            libc.munmap(addr, size)
    finally:
        os.close(fd)
    return sum(v & 1 for v in vec), pages


def test_old_format_complete_shard_reads_one_page_per_record(tmp_path):
    """From a cold page cache, counting a 1.0 shard's boxes brings in its tree pages and one page per record,
    not the records' features (py-lmdb would fault in every page of every record it returns)."""
    old = _synth(tmp_path / "old", 30, feature_dim=2048, min_boxes=20, max_boxes=30)
    _strip_table(old)
    data = os.path.join(old, "data.mdb")
    r = ShardReader(old)  # opened first: its checks of the file read pages of their own
    fd = os.open(data, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # (pages LMDB has mapped stay: a few, counted in cold)
    os.close(fd)
    cold, pages = _resident_pages(data)
    if cold > pages // 10:
        pytest.skip(f"the page cache kept {cold} of {pages} pages after POSIX_FADV_DONTNEED")
    with pytest.warns(UserWarning, match="no box-count table"):
        counts = r.box_counts()
    assert len(counts) == 30 and counts.min() >= 20
    read, _ = _resident_pages(data)
    assert read - cold <= 30 + 8, (read, cold, pages)  # a page per record and the records tree's few pages
    assert pages > 30 * 20  # (where reading the records would bring in 20+ pages each)
    assert np.array_equal(counts, _records(old))


def test_old_format_incomplete_shard_counts_through_lmdb(tmp_path):
    """A 1.0 shard whose writer died (it may still be written: no page walk) is counted through LMDB."""
    ref = _synth(tmp_path / "ref", 20)
    old = _synth(tmp_path / "old", 20)
    _strip_table(old, complete=False)
    with pytest.warns(UserWarning) as caught:
        counts = ShardReader(old).box_counts()
    assert any("no box-count table" in str(w.message) for w in caught)
    assert np.array_equal(counts, ShardReader(ref).box_counts())


def test_old_format_header_that_lies_about_its_length_is_named(tmp_path):
    old = _synth(tmp_path / "old", 10, min_boxes=2)
    _strip_table(old)
    env = lmdb.open(old, subdir=True, max_dbs=3)
    with env.begin(write=True) as txn:
        records = env.open_db(b"records", txn=txn)
        key = bytes(txn.get(struct.pack(">Q", 4), db=env.open_db(b"order", txn=txn)))
        value = bytearray(txn.get(key, db=records))
        struct.pack_into("<I", value, 16, 4_000_000_000)  # N: absurd, the value is a few KB
        txn.put(key, bytes(value), db=records)
    env.close()
    with pytest.warns(UserWarning), pytest.raises(ShardError) as e:
        ShardReader(old).box_counts()
    assert str(e.value).startswith(old) and "synth/00000004" in str(e.value)
    assert "implies another length" in str(e.value)


def test_a_writer_resuming_or_appending_to_an_old_shard_adds_the_table(tmp_path):
    ref = _synth(tmp_path / "ref", 60)
    crashed = _synth(tmp_path / "crashed", 40)
    _strip_table(crashed, complete=False)  # a 1.0 writer killed after 40 records
    complete = _synth(tmp_path / "complete", 40)
    _strip_table(complete)
    untouched = _synth(tmp_path / "untouched", 40)
    _strip_table(untouched)

    _synth(crashed, 60)  # resumed by this writer: the 40 from headers, 20 new
    with ShardWriter(complete, feature_dim=16, class_names=ShardReader(ref).meta["class_names"],
                     extractor=ShardReader(ref).meta["extractor"], append=True) as w:
        w.add("extra", width=10, height=10, boxes=np.zeros((3, 4)), features=np.ones((3, 16)),
              class_probs=np.full((3, 91), 1 / 91))
    ShardWriter(untouched, feature_dim=16, class_names=ShardReader(ref).meta["class_names"],
                extractor=ShardReader(ref).meta["extractor"]).close()  # reopened, nothing added: left as it was

    assert list(_raw_table(crashed)) == [box_chunk_key(0)] and list(_raw_table(complete)) == [box_chunk_key(0)]
    assert _raw_table(untouched) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert np.array_equal(ShardReader(crashed).box_counts(), ShardReader(ref).box_counts())
        c = ShardReader(complete).box_counts()
    assert np.array_equal(c, [*ShardReader(ref).box_counts()[:40], 3])
    for p in (crashed, complete):
        assert ShardReader(p).meta["schema_minor"] == 1 and verify_shard(p).ok, p
    assert "schema_minor" not in ShardReader(untouched).meta


# ---- forged and malformed tables -----------------------------------------------------------------------


def _forge(tmp_path, how: str) -> tuple[str, np.ndarray]:
    """A shard whose table was changed by hand (fresh shard: forged before anything here reads it)."""
    path = _synth(tmp_path / f"forged-{how}", 40, min_boxes=1)
    real = np.frombuffer(_raw_table(path)[box_chunk_key(0)], "<u4").astype(np.int64)
    if how == "swapped":  # plausible: right length, same total, two records' counts exchanged
        i, j = 3, int(np.flatnonzero((real != real[3]) & (np.arange(len(real)) > 3))[0])
        c = real.copy()
        c[[i, j]] = c[[j, i]]
        _set_table(path, c)
    elif how == "one-off":
        c = real.copy()
        c[7] += 1
        _set_table(path, c)
    return path, real


def test_verify_names_a_forged_table(tmp_path):
    path, real = _forge(tmp_path, "one-off")
    report = verify_shard(path)
    assert not report.ok and not report.bad
    assert report.problems == [f"box-count table: position 7 ('synth/00000007') says {real[7] + 1} boxes, the "
                               f"record holds {real[7]}; the table is damaged or forged (readers trust its counts)"]
    r = subprocess.run([sys.executable, "-m", "regionbert.data.cli", "verify", path], capture_output=True, text=True)
    assert r.returncode != 0 and "box-count table: position 7" in r.stdout + r.stderr


def test_a_plausible_forged_table_is_refused_when_the_record_is_read(tmp_path):
    """Length and total are right, so start-up cannot tell (it would have to read every record); the first read
    of a record the table lies about is a ShardError naming the shard and the record, before it trains."""
    path, real = _forge(tmp_path, "swapped")
    assert verify_shard(path).problems[0].startswith("box-count table: position 3 ('synth/00000003')")
    s = ShardSet(path)
    counts = s.box_counts()  # accepted: it fits
    assert counts[3] != real[3]
    with pytest.raises(ShardError) as e:
        s[3]
    assert str(e.value).startswith(f"{path}: record 'synth/00000003' (position 3) has {real[3]} boxes, but the "
                                   f"shard's box-count table says {counts[3]}")
    s[0]  # records the table is right about read as ever
    # the trainer: Pairs takes the counts, the batch that holds record 3 is refused
    data = write_dataset(str(tmp_path / "d"), 8, 0, feature_dim=16, min_boxes=1, max_boxes=12)
    c = ShardReader(data["shards"]).box_counts().astype(np.int64)
    shard = str(tmp_path / "d2")
    shutil.copytree(data["shards"], shard)
    j = int(np.flatnonzero((c != c[3]) & (np.arange(len(c)) > 3))[0])
    c[[3, j]] = c[[j, 3]]
    _set_table(shard, c)
    text = Text(data["tokenizer"], max_len=24)
    shards = ShardSet(shard)
    pairs = Pairs(shards, data["captions"], text, "train")
    ds = PairDataset(shards, pairs, text)
    with pytest.raises(ShardError, match="box-count table says"):
        ds.__getitems__([("mlm", p, -1, (0, 0, 0, p)) for p in range(len(pairs))])


def _hostile_tables(real: np.ndarray) -> dict:
    """name -> (edit of the meta table, what the ShardError says)."""
    n = len(real)

    def chunks(*values):
        def put(txn, meta):
            for k in [bytes(k) for k, _ in txn.cursor(db=meta) if bytes(k).startswith(BOX_COUNTS)]:
                txn.delete(k, db=meta)
            for key, v in values:
                txn.put(key, v, db=meta)
        return put
    c = real.astype("<u4")
    return {
        "longer": (chunks((box_chunk_key(0), np.append(c, 5).astype("<u4").tobytes())), "not 40 uint32 counts"),
        "shorter": (chunks((box_chunk_key(0), c[:-1].tobytes())), "not 40 uint32 counts"),
        "odd-bytes": (chunks((box_chunk_key(0), c.tobytes() + b"\1")), "not 40 uint32 counts"),
        "extra-chunk": (chunks((box_chunk_key(0), c.tobytes()), (box_chunk_key(1), c[:3].tobytes())),
                        "has 2 chunk(s), the shard's 40 records need 1"),
        "gap": (chunks((box_chunk_key(1), c.tobytes())), "is not chunk 0"),
        "many-chunks": (chunks(*[(box_chunk_key(k), c.tobytes()) for k in range(1000)]),
                        "has 2 chunk(s), the shard's 40 records need 1"),  # (the scan stops at one too many)
        "stray-key": (chunks((box_chunk_key(0), c.tobytes()), (BOX_COUNTS + b"x", b"")), "is not chunk 1"),
        "absurd": (chunks((box_chunk_key(0), np.full(n, 2**32 - 1, "<u4").tobytes())), "but data.mdb is"),
        "absurd-one": (chunks((box_chunk_key(0), np.where(np.arange(n) == 9, 2**31, c).astype("<u4").tobytes())),
                       "up to 2147483648 in record 9"),
        "declared-missing": (chunks(), "declares a box-count table (schema_minor 1) but stores none"),
    }


HOSTILE = sorted(_hostile_tables(np.zeros(40)))


@pytest.mark.parametrize("how", HOSTILE)
def test_hostile_table_is_a_shard_error_naming_the_shard(tmp_path, how):
    path = _synth(tmp_path / "h", 40, min_boxes=1)
    real = np.frombuffer(_raw_table(path)[box_chunk_key(0)], "<u4")
    edit, says = _hostile_tables(real)[how]
    resumed = str(tmp_path / "resumed")
    _edit_meta(path, edit)
    shutil.copytree(path, resumed)
    listing = sorted(os.listdir(path))
    with pytest.raises(ShardError) as e:
        ShardSet(path).box_counts()
    assert str(e.value).startswith(f"{path}: ") and says in str(e.value), str(e.value)
    assert sorted(os.listdir(path)) == listing  # nothing written by reading
    report = verify_shard(path)  # verify names it too, and still checks every record
    assert not report.ok and report.checked == 40 and not report.bad
    assert [p for p in report.problems if p.startswith("box-count table")], report.problems
    if how not in ("absurd", "absurd-one"):  # (the writer checks the table's shape; verify its values)
        with pytest.raises(ShardError, match="box-count table|declares a box-count table"):
            ShardWriter(resumed, feature_dim=16, class_names=ShardReader(path).meta["class_names"],
                        extractor=ShardReader(path).meta["extractor"], append=True)
    assert np.array_equal(real, _records(path))  # the records themselves are as they were


def test_a_bad_schema_minor_is_refused(tmp_path):
    path = _synth(tmp_path / "m", 5)

    def bad(txn, meta):
        m = json.loads(bytes(txn.get(b"shard", db=meta)))
        txn.put(b"shard", json.dumps({**m, "schema_minor": "1"}).encode(), db=meta)
    _edit_meta(path, bad)
    with pytest.raises(ShardError, match="schema_minor must be a non-negative integer"):
        ShardReader(path)


def test_the_trainer_refuses_an_absurd_table_at_start_up(tmp_path):
    """End to end: exit 2, one line naming the shard and the table, before any training."""
    data = write_dataset(str(tmp_path / "d"), 8, 0, feature_dim=16, min_boxes=1, max_boxes=12)
    shard = str(tmp_path / "forged")  # (write_dataset read the original in this process: LMDB opens a file once)
    shutil.copytree(data["shards"], shard)
    data["shards"] = shard
    _set_table(shard, np.full(8, 10**9))
    settings = {"data.shards": data["shards"], "data.captions": data["captions"], "data.tokenizer": data["tokenizer"],
                "model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2, "model.intermediate_size": 64,
                "model.max_text_len": 24, "data.token_budget": 600, "data.num_workers": 0,
                "optim.warmup_steps": 1, "optim.steps": 2, "run.log_every": 1, "run.eval_every": 0}
    r = subprocess.run([sys.executable, "-m", "regionbert.train.cli", *[f"--set={k}={v}" for k, v in settings.items()],
                        "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    line = [x for x in r.stderr.splitlines() if x.startswith("regionbert-pretrain: error:")]
    assert line and f"{data['shards']}: box-count table claims 8000000000 boxes" in line[0], r.stderr
    assert not os.path.exists(os.path.join(str(tmp_path / "run"), "checkpoint.pt"))


# ---- read-only locations -------------------------------------------------------------------------------


def test_box_counts_read_only_as_another_user():
    """A published (0444 / 0555) shard, new and old format, read by a process that may not write there."""
    from test_readonly import _freeze, _listing, _restricted, _thaw

    prefix, uid, how = _restricted()
    base = tempfile.mkdtemp(prefix="regionbert-box-counts-")  # under /tmp: reachable by another uid
    os.chmod(base, 0o755)
    new, old = _synth(os.path.join(base, "new"), 30), _synth(os.path.join(base, "old"), 30)
    _strip_table(old)
    for p in (new, old):
        for lock in ("lock.mdb", "writer.lock"):
            if os.path.exists(os.path.join(p, lock)):
                os.remove(os.path.join(p, lock))
        _freeze(p)
    before = {p: _listing(p) for p in (new, old)}
    code = ("import sys, warnings; from regionbert.data import ShardSet\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    for p in sys.argv[1:]: print(ShardSet(p).box_counts().tolist())\n"
            "print(len(w), file=sys.stderr)")
    try:
        r = subprocess.run([*prefix, sys.executable, "-c", code, new, old], capture_output=True, text=True, cwd="/",
                           env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, timeout=300)
        assert r.returncode == 0, (how, r.stderr[-2000:])
        a, b = (json.loads(x) for x in r.stdout.splitlines())
        assert a == b and len(a) == 30 and r.stderr.strip().endswith("1"), r.stderr  # one warning: the old one
        assert {p: _listing(p) for p in (new, old)} == before  # no lock file made, nothing written
        assert a == _records(new).tolist()
    finally:
        _thaw(base)
        shutil.rmtree(base)
