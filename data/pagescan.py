"""Record headers straight from data.mdb's pages: the box counts of a format 1.0 shard without its features.

A format 1.0 shard has no box-count table (docs/shard-format.md section 1), so its counts are in the 48-byte
headers of its records. Reading those through py-lmdb reads whole records: before a value is handed over,
py-lmdb touches every page of it (its preload.h, so that page faults happen without the GIL), so from a
cold disk the header scan reads the whole shard, as the old start-up did. Here the `records` tree is
walked with plain reads (pread, no map), as data/lmdbcheck.py walks it before every open, and only the first
48 bytes of each value are read: one page per record, read in file order.

    header_counts_by_pages(path) -> {key: N}, or None where this cannot be done (the caller then reads the
                                    headers through LMDB)
    counts_in_order(path, txn, order, n) -> the first n order positions' counts (uint32), or None

Only for a complete shard (immutable: the pages cannot change under the walk). Every page is checked as
lmdbcheck checks it before anything in it is used (lmdbcheck._check_pages), every read is bounded by the
file, and each header is checked as decode_record checks it, its length against the value's size in the
leaf node. A wrong count could only come from a file that changed after it was opened; the reader compares
each record it returns with its count anyway (ShardReader.box_counts).
"""

from __future__ import annotations

import os

import numpy as np

from .errors import CorruptRecordError, ShardError
from .format import HEADER_SIZE, header_num_boxes
from .lmdbcheck import (
    _CHUNK,
    _NODE,
    F_BIGDATA,
    P_INVALID,
    _check_meta,
    _check_pages,
    _damaged,
    _read_pages,
    _Tree,
    _u16,
    _walk,
)

_PAGE_HEADER_SIZE = 16  # an overflow value starts after its first page's header


def header_counts_by_pages(path: str) -> dict[bytes, int] | None:
    """{record key: N} for every record of a complete shard, from its headers; None if data.mdb has no
    `records` table. ShardError (lmdbcheck's) for a damaged page, CorruptRecordError for a bad header."""
    fd = os.open(os.path.join(path, "data.mdb"), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)  # one page per record: no read-ahead of features
        m, psize = _check_meta(path, fd, os.fstat(fd).st_size)
        last = m["last_pg"]
        seen = np.zeros(last + 1, dtype=bool)
        subs, _ = _walk(path, fd, _Tree("main", m["main_root"], m["main_depth"], m["main_entries"], main=True),
                        psize, last, seen)
        records = next((t for t in subs if t.name == "records"), None)
        if records is None:
            return None
        return _leaf_headers(path, fd, records, psize, last, seen)
    finally:
        os.close(fd)


def counts_in_order(path: str, txn, order, n: int) -> np.ndarray | None:
    """The box counts of order positions 0..n-1 (header_counts_by_pages joined to the order table, read
    through txn: its values are the small keys, in its leaf pages); None where the pages give none."""
    by_key = header_counts_by_pages(path)
    if by_key is None:
        return None
    counts = np.empty(n, dtype=np.uint32)
    i = -1
    for i, (_, key) in enumerate(txn.cursor(db=order)):
        if i == n:
            break
        got = by_key.get(bytes(key))
        if got is None:
            raise ShardError(f"{path}: order table entry {i} names {bytes(key)!r}, which has no record; the shard "
                             "is damaged (`regionbert-shards verify`)")
        counts[i] = got
    if n and i < n - 1:
        raise ShardError(f"{path}: order table holds {i + 1} entries, {n} expected; the shard is damaged")
    return counts


def _leaf_headers(path: str, fd: int, tree: _Tree, psize: int, last: int, seen: np.ndarray) -> dict[bytes, int]:
    """Walk the records tree level by level (its pages checked as lmdbcheck checks them); at the leaves, each
    node's key and its value's first 48 bytes: in the leaf page, or read at its first overflow page."""
    def bad(page: int, why: str):
        return _damaged(path, f"the records table, page {page}: {why}")

    if tree.root == P_INVALID:
        return {}
    level, inline, overflow = np.array([tree.root], dtype=np.uint64), [], []
    for depth in range(1, tree.depth + 1):
        leaf = depth == tree.depth
        children = []
        for i in range(0, len(level), _CHUNK):
            pgnos = np.sort(level[i:i + _CHUNK])
            if seen[pgnos].any() or (pgnos[1:] == pgnos[:-1]).any():
                raise bad(int(pgnos[0]), "reached twice")
            seen[pgnos] = True
            pages = _read_pages(fd, pgnos, psize)
            kids, _, _ = _check_pages(pages, pgnos, leaf, tree, psize, last, bad)  # bounds of every node checked
            if leaf:
                _leaf_nodes(pages, psize, inline, overflow)
            else:
                children.append(kids)
        if not leaf:
            level = np.concatenate(children) if children else np.zeros(0, np.uint64)
    out = {key: _count(path, key, head, size) for key, head, size in inline}
    for ov, key, size in sorted(overflow):  # in file order: the disk reads forward
        out[key] = _count(path, key, os.pread(fd, HEADER_SIZE, ov * psize + _PAGE_HEADER_SIZE), size)
    return out


def _leaf_nodes(pages: np.ndarray, psize: int, inline: list, overflow: list) -> None:
    """The nodes of checked leaf pages: (key, first 48 bytes, size) for values in the page, (first overflow
    page, key, size) for the others."""
    k = len(pages)
    rows = np.arange(k)
    nkeys = (_u16(pages, rows, np.full(k, 12)) - 16) >> 1
    row = np.repeat(rows, nkeys)
    slot = np.arange(len(row)) - np.repeat(np.cumsum(nkeys) - nkeys, nkeys)
    off = _u16(pages, row, 16 + 2 * slot)
    lo, hi, nflags, ksize = (_u16(pages, row, off + 2 * f) for f in range(4))
    key_end = off + _NODE + ksize
    size = lo | hi << 16
    big = nflags & F_BIGDATA != 0
    for j in range(len(row)):
        r, ke = int(row[j]), int(key_end[j])
        key = pages[r, ke - int(ksize[j]):ke].tobytes()
        if big[j]:
            ov = int(pages[r, ke:ke + 8].view("<u8")[0])  # within the page and the file: _check_pages says so
            overflow.append((ov, key, int(size[j])))
        else:
            inline.append((key, pages[r, ke:min(ke + HEADER_SIZE, psize)].tobytes(), int(size[j])))


def _count(path: str, key: bytes, head: bytes, size: int) -> int:
    try:
        return header_num_boxes(key, head, size)
    except CorruptRecordError as e:
        raise e.at(path) from None
