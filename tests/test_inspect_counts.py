"""`regionbert-shards inspect`'s box-count histogram comes from the box-count table (issue 24): it reads no
record. It used to read every record of the shard to look at its header, which brought the whole shard's
features in from disk (for a 2048-d corpus, hundreds of GB) to print a histogram of a few KB."""

import json
import os
from collections import Counter

import lmdb
import numpy as np
import pytest
from test_box_counts import _edit_meta, _hostile_tables, _raw_table, _records, _resident_pages, _strip_table, _synth

from regionbert.data import ShardError, ShardReader
from regionbert.data.cli import main as shards_main
from regionbert.data.format import box_chunk_key
from regionbert.data.index import summarize


def _histogram(counts) -> dict:
    return dict(sorted(Counter(np.asarray(counts).tolist()).items()))


def _twin(folder, name: str, n: int, **kw) -> tuple[str, dict]:
    """(a shard, the histogram of its records read in full): from a twin written with the same seed, so that
    the shard itself is not opened (nor its pages mapped) by this process before the test."""
    path = _synth(folder / name, n, **kw)
    return path, _histogram(_records(_synth(folder / f"{name}-twin", n, **kw)))


def _wreck_records(path: str) -> None:
    """Zero every record's 48-byte header in place (same length): no record can be decoded or peeked at."""
    env = lmdb.open(path, subdir=True, max_dbs=3)
    try:
        with env.begin(write=True) as txn:
            records = env.open_db(b"records", txn=txn)
            for key, value in [(bytes(k), bytearray(v)) for k, v in txn.cursor(db=records)]:
                value[:48] = bytes(48)
                txn.put(key, bytes(value), db=records)
    finally:
        env.close()


def test_inspect_histogram_is_the_table_even_when_no_record_is_readable(tmp_path, capsys):
    """Every record's header zeroed (the table kept): inspect still prints the true histogram, in text and
    JSON. Reading the records (as inspect did) would find no box count in any of them."""
    path, expected = _twin(tmp_path, "s", 60)
    _wreck_records(path)
    with pytest.raises(ShardError):
        ShardReader(path)[0]  # the records really are unreadable
    assert summarize(path)["boxes_per_image"] == expected
    assert shards_main(["inspect", "--json", path]) == 0
    shown = json.loads(capsys.readouterr().out)["boxes_per_image"]
    assert {int(k): v for k, v in shown.items()} == expected and list(map(int, shown)) == sorted(expected)
    assert shards_main(["inspect", path]) == 0
    out = capsys.readouterr().out
    assert "boxes per image:" in out and f"{sum(expected.values()):>8}" not in out.split("boxes per image:")[0]
    assert sum(int(line.split()[1]) for line in out.split("boxes per image:\n")[1].splitlines()) == 60


def test_inspect_brings_no_record_pages_in_from_disk(tmp_path):
    """From a cold page cache, summarize() of an open 2048-d shard brings in at most a few meta pages, not the
    records' pages (reading the records, as before: 20+ pages each, all of the file)."""
    path, expected = _twin(tmp_path, "big", 30, feature_dim=2048, min_boxes=20, max_boxes=30)
    data = os.path.join(path, "data.mdb")
    ShardReader(path)  # opened first (summarize's reader shares its handle): the file's checks at open read
    # pages of their own, with the kernel's read-around about 80 here, the same for any number of records
    fd = os.open(data, os.O_RDONLY)
    os.fsync(fd)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    cold, pages = _resident_pages(data)
    if cold > pages // 10:
        pytest.skip(f"the page cache kept {cold} of {pages} pages after POSIX_FADV_DONTNEED")
    assert summarize(path)["boxes_per_image"] == expected
    read, _ = _resident_pages(data)
    assert read - cold <= 16, (read, cold, pages)  # meta's pages at most (reading the records: all 840)
    assert pages > 30 * 20


def test_inspect_of_a_format_1_0_shard_counts_from_headers_and_says_so(tmp_path):
    """A shard without the table (written before format 1.1): the histogram from its records' headers, with
    the reader's one warning that points at `copy`."""
    path, expected = _twin(tmp_path, "old", 25)
    _strip_table(path)
    with pytest.warns(UserWarning, match="no box-count table"):
        assert summarize(path)["boxes_per_image"] == expected


@pytest.mark.parametrize("how", ["longer", "absurd", "declared-missing"])
def test_inspect_of_a_forged_table_exits_2_naming_the_shard(tmp_path, capsys, how):
    """A stranger's shard whose box-count table lies (a count too many, absurd counts, declared but absent):
    `inspect` stops with exit code 2 and one message naming the shard and the table, prints no histogram,
    and leaves the shard as it was."""
    path = _synth(tmp_path / "f", 40, min_boxes=1)
    real = np.frombuffer(_raw_table(path)[box_chunk_key(0)], "<u4")
    edit, says = _hostile_tables(real)[how]
    _edit_meta(path, edit)
    listing = {n: os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)}
    assert shards_main(["inspect", path]) == 2
    out, err = capsys.readouterr()
    assert "boxes per image" not in out and "Traceback" not in err, (out, err)
    assert path in err and says in err, err
    assert {n: os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)} == listing
