"""Damage without crashes: check an LMDB file before mapping it, and turn LMDB's write failures (a full
disk) into errors that name the shard. Imports nothing of data/ but the errors (handles.py uses it).

LMDB maps data.mdb into memory and trusts what it finds: a file shorter than its meta page says (a
truncated copy, a disk that filled up under `cp`) makes the first touch of a missing page kill the
process with SIGBUS, and a flipped byte in a tree page can send LMDB's C code reading anywhere. So:

    check_file(path)       reads the two meta pages with plain file reads (no map) and refuses a file that
                           LMDB could not open safely: bad magic or version, impossible page size, roots past
                           the last page, or a file shorter than the pages the newest meta page counts. Then
                           it walks every tree (free pages, main, and each named table) with plain reads and
                           refuses a branch or leaf page that LMDB's C code would trust into a crash (SIGBUS
                           past the file's end, SIGABRT on an assertion): see check_trees. Called before every
                           open of a shard (reader and writer). Cost: the tree pages only, about 1% of a shard
                           of 2048-d features (values live in overflow pages, which are never read).
    (data/isolate.py runs `verify` in a forked child, so a page that kills LMDB's reader kills the child.)
    write_error(path, e)   a ShardError for a failed LMDB write: "no space left on device" with the shard
                           name, and that a rerun resumes from the last commit.

LMDB's file layout (lmdb.h / mdb.c, 64-bit build): pages 0 and 1 are meta pages; each is a 16-byte page
header (pgno u64, pad u16, flags u16, lower u16, upper u16) and then MDB_meta: magic u32 0xBEEFC0DE,
version u32 1, address u64, mapsize u64, two MDB_db (free pages, main) of 48 bytes each (pad u32 -- the
free DB's pad is the page size --, flags u16, depth u16, branch/leaf/overflow pages u64, entries u64,
root u64), last_pg u64, txnid u64. LMDB uses the meta page with the larger txnid.

A branch or leaf page: the page header (its flags P_BRANCH 0x01 or P_LEAF 0x02; P_DIRTY 0x10 may linger),
then `lower - 16` bytes of u16 offsets, one per node, pointing at nodes that lie between `upper` and the
page's end. A node: lo u16, hi u16, flags u16, ksize u16, the key (ksize bytes), then in a leaf the value
(lo | hi << 16 bytes), or for a value too big for the page (node flag F_BIGDATA 0x01) the u64 number of its
first overflow page: the value then spans (15 + size) // psize + 1 pages from there. A named table's entry in
the main tree has flag F_SUBDATA 0x02 and a 48-byte MDB_db as its value. In a branch node, lo | hi << 16 |
flags << 32 is the child's page number. Every leaf of a tree is at its MDB_db's depth.
"""

from __future__ import annotations

import errno
import os
import struct

import numpy as np

from .errors import ShardError, ShardWriteError

MDB_MAGIC = 0xBEEFC0DE
MDB_DATA_VERSION = 1
P_META = 0x08
P_INVALID = 2**64 - 1  # the root of an empty tree
MAX_DEPTH = 32  # LMDB's CURSOR_STACK: deeper trees cannot be walked
_PAGE_HEADER = struct.Struct("<QHHHH")  # 16 bytes
_DB = struct.Struct("<IHHQQQQQ")  # 48 bytes
_META = struct.Struct("<IIQQ48s48sQQ")  # 136 bytes, after the page header


def _damaged(path: str, why: str) -> ShardError:
    return ShardError(f"{path}: data.mdb is damaged ({why}); it cannot be read safely. Restore the shard from "
                      "its source or rerun the job that wrote it")


def _read_meta(fd: int, offset: int) -> dict | None:
    raw = os.pread(fd, _PAGE_HEADER.size + _META.size, offset)
    if len(raw) < _PAGE_HEADER.size + _META.size:
        return None
    _pgno, _pad, flags, _lower, _upper = _PAGE_HEADER.unpack_from(raw, 0)
    magic, version, _addr, mapsize, free_db, main_db, last_pg, txnid = _META.unpack_from(raw, _PAGE_HEADER.size)
    free, main = _DB.unpack(free_db), _DB.unpack(main_db)
    return {"flags": flags, "magic": magic, "version": version, "mapsize": mapsize, "psize": free[0],
            "free_depth": free[2], "free_root": free[7], "free_entries": free[6], "main_depth": main[2],
            "main_root": main[7], "main_entries": main[6],
            "last_pg": last_pg, "txnid": txnid}


def check_file(shard: str, empty_ok: bool = False) -> None:
    """Raise ShardError if SHARD/data.mdb is not an LMDB file that can be mapped without a crash.
    Does nothing if there is no data.mdb (the caller says what that means). empty_ok: an empty file is
    fine (a writer's LMDB initialises it); for a reader it is a shard whose writer never got going."""
    data = os.path.join(shard, "data.mdb")
    try:
        fd = os.open(data, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ShardError(f"{shard}: cannot read data.mdb: {e.strerror}") from None
    try:
        for _ in range(_WALKS):
            size = os.fstat(fd).st_size
            if size == 0:
                if empty_ok:
                    return
                raise ShardError(f"{shard}: data.mdb is empty: its writer never committed anything (rerun the job)")
            before = (_newest_txnid(fd), size)
            try:
                m, psize = _check_meta(shard, fd, size)
                check_trees(shard, fd, m, psize)
                return
            except ShardError:
                # An incomplete shard may be written right now, and this walk is no LMDB reader: two commits
                # during the walk can recycle pages it read (a mix of transactions looks damaged), and a
                # commit after the size was taken counts pages past it. The pages of a transaction stay put
                # while it is the newest, so damage is what the walk finds while the newest transaction id
                # and the size hold still; if either moved, walk again.
                if (_newest_txnid(fd), os.fstat(fd).st_size) == before:
                    raise
        # Committed to during every walk: a live LMDB writer is producing this file right now. No walk can
        # hold still here, and whoever can write the file now could change it after any check anyway.
    except OSError as e:
        raise ShardError(f"{shard}: cannot read data.mdb: {e.strerror or e}") from None
    finally:
        os.close(fd)


def _newest_txnid(fd: int) -> int | None:
    metas = [_read_meta(fd, 0)]
    if metas[0] is not None:
        metas.append(_read_meta(fd, metas[0]["psize"]))
    return max((m["txnid"] for m in metas if m is not None), default=None)


def _check_meta(shard: str, fd: int, size: int) -> tuple[dict, int]:
    """The meta page LMDB will use, and the page size; ShardError if either meta page is unusable."""
    first = _read_meta(fd, 0)
    if first is None:
        raise _damaged(shard, f"{size} bytes, shorter than LMDB's meta page")
    psize = first["psize"]
    if not (512 <= psize <= 65536 and psize & (psize - 1) == 0):
        raise _damaged(shard, f"meta page 0 gives page size {psize}")
    second = _read_meta(fd, psize)
    if second is None:
        raise _damaged(shard, f"{size} bytes, shorter than its two meta pages ({2 * psize} bytes)")
    for i, m in enumerate((first, second)):
        if not m["flags"] & P_META or m["magic"] != MDB_MAGIC:
            raise _damaged(shard, f"meta page {i} is not an LMDB meta page (flags {m['flags']:#x}, magic "
                           f"{m['magic']:#x})")
        if m["version"] != MDB_DATA_VERSION:
            raise _damaged(shard, f"meta page {i} has LMDB data version {m['version']}, not {MDB_DATA_VERSION}")
    m = first if first["txnid"] > second["txnid"] else second  # what LMDB will use
    pages = m["last_pg"] + 1
    if m["last_pg"] < 1 or pages * psize > size:
        raise _damaged(shard, f"its meta page counts {pages} pages of {psize} bytes ({pages * psize} bytes), the "
                       f"file has {size} bytes: truncated (an interrupted copy, or a full disk)")
    for name in ("free", "main"):
        root, depth = m[f"{name}_root"], m[f"{name}_depth"]
        if root != P_INVALID and not 2 <= root <= m["last_pg"]:
            raise _damaged(shard, f"the {name} tree's root is page {root}, outside pages 2..{m['last_pg']}")
        if depth > MAX_DEPTH:
            raise _damaged(shard, f"the {name} tree is {depth} levels deep (LMDB walks at most {MAX_DEPTH})")
    return m, psize


# --- The tree walk: every branch and leaf page LMDB may visit, read with pread, checked before it is mapped.
#
# What LMDB's C code trusts, and so what is checked (mdb.c 0.9): a page's own number in its header; its
# flags (a branch where a branch is expected, a leaf at the tree's depth); lower/upper inside the page;
# every node offset inside [upper, page end) and even (nodes are 2-aligned); key and inline value inside
# the page; a child page number inside the file (a page past the file's end is SIGBUS); a branch with at
# least two nodes (LMDB asserts it: SIGABRT), a leaf with at least one; an overflow value's pages inside
# the file; no page reached twice (a cycle would walk forever); as many leaf nodes as the tree's MDB_db
# counts. Overflow pages (the records' values) are never read: their bounds come from the leaf node.
# Pages are handled a level at a time, in chunks, with numpy over all nodes of the chunk at once, so the
# cost is the reads of the tree pages plus a few array operations per chunk, not Python per node.

P_BRANCH, P_LEAF, P_DIRTY = 0x01, 0x02, 0x10
F_BIGDATA, F_SUBDATA, F_DUPDATA = 0x01, 0x02, 0x04
_NODE = 8  # node header bytes
_CHUNK = 2048  # pages read and checked at once (8 MiB of 4 KiB pages)
_WALKS = 8  # walks of a file being committed to before it is taken as a live writer's (check_file)


class _Tree:
    """One B-tree to walk: its name (for messages), MDB_db fields, and whether it is the main tree."""

    def __init__(self, name: str, root: int, depth: int, entries: int, main: bool = False, free: bool = False):
        self.name, self.root, self.depth, self.entries = name, root, depth, entries
        self.main, self.free = main, free


def check_trees(shard: str, fd: int, m: dict, psize: int) -> int:
    """Walk every tree from meta page m with plain reads; ShardError naming the shard, the table and the
    page at the first thing LMDB would crash on. Returns the number of pages read."""
    last = m["last_pg"]
    seen = np.zeros(last + 1, dtype=bool)  # tree pages visited: a byte per page of the file
    trees = [_Tree("free-page", m["free_root"], m["free_depth"], m["free_entries"], free=True),
             _Tree("main", m["main_root"], m["main_depth"], m["main_entries"], main=True)]
    read = 0
    while trees:
        tree = trees.pop()
        subs, n = _walk(shard, fd, tree, psize, last, seen)
        read += n
        trees += subs
    return read


def _walk(shard: str, fd: int, tree: _Tree, psize: int, last: int, seen: np.ndarray) -> tuple[list[_Tree], int]:
    """Check one tree, level by level; (the named tables found in it, if it is the main tree; pages read)."""
    where = f"the {tree.name} table"

    def bad(page: int, why: str) -> ShardError:
        return _damaged(shard, f"{where}, page {page}: {why}")

    if tree.root == P_INVALID:
        if tree.depth or tree.entries:
            raise _damaged(shard, f"{where} is empty but counts {tree.entries} entries, {tree.depth} levels")
        return [], 0
    if not 1 <= tree.depth <= MAX_DEPTH:
        raise _damaged(shard, f"{where} is {tree.depth} levels deep (LMDB walks 1 to {MAX_DEPTH})")
    if not 2 <= tree.root <= last:
        raise _damaged(shard, f"{where}'s root is page {tree.root}, outside pages 2..{last}")
    level, subs, entries, read = np.array([tree.root], dtype=np.uint64), [], 0, 0
    for depth in range(1, tree.depth + 1):
        leaf = depth == tree.depth
        children = []
        for i in range(0, len(level), _CHUNK):
            pgnos = np.sort(level[i:i + _CHUNK])
            if (seen[pgnos]).any() or (pgnos[1:] == pgnos[:-1]).any():
                dup = pgnos[seen[pgnos]] if seen[pgnos].any() else pgnos[1:][pgnos[1:] == pgnos[:-1]]
                raise bad(int(dup[0]), "reached twice (its tree's pages point in a circle or share a page)")
            seen[pgnos] = True
            pages = _read_pages(fd, pgnos, psize)
            read += len(pgnos)
            kids, n, found = _check_pages(pages, pgnos, leaf, tree, psize, last, bad)
            children.append(kids)
            entries += n
            subs += found
        level = np.concatenate(children) if children else np.zeros(0, np.uint64)
        if not leaf and len(level) == 0:
            raise _damaged(shard, f"{where} has no pages at level {depth + 1} of {tree.depth}")
    if entries != tree.entries:
        raise _damaged(shard, f"{where}'s leaves hold {entries} entries, its header counts {tree.entries}")
    return subs, read


def _read_pages(fd: int, pgnos: np.ndarray, psize: int) -> np.ndarray:
    """Pages pgnos (sorted) as a (k, psize) uint8 array, one pread per run of consecutive pages."""
    out = np.empty((len(pgnos), psize), dtype=np.uint8)
    breaks = np.flatnonzero(np.diff(pgnos) != 1) + 1
    for run in np.split(np.arange(len(pgnos)), breaks):
        first, count = int(pgnos[run[0]]), len(run)
        raw = os.pread(fd, count * psize, first * psize)
        if len(raw) < count * psize:  # the file shrank under us (check_file checked its size first)
            raise OSError(errno.EIO, f"page {first + len(raw) // psize} is past the end of the file")
        out[run[0]:run[0] + count] = np.frombuffer(raw, np.uint8).reshape(count, psize)
    return out


def _u16(pages: np.ndarray, row: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Little-endian u16 at byte offsets `at` of pages[row] (any alignment), as int64."""
    return pages[row, at].astype(np.int64) | pages[row, at + 1].astype(np.int64) << 8


def _check_pages(pages, pgnos, leaf: bool, tree: _Tree, psize: int, last: int, bad):
    """Check a chunk of pages of one level: (child page numbers, leaf entries, named tables found)."""
    k = len(pgnos)
    rows = np.arange(k)
    own = pages[:, :8].copy().view("<u8").ravel()
    flags = _u16(pages, rows, np.full(k, 10)) & ~P_DIRTY
    lower, upper = _u16(pages, rows, np.full(k, 12)), _u16(pages, rows, np.full(k, 14))
    want = P_LEAF if leaf else P_BRANCH
    fewest = 1 if leaf or tree.free else 2  # LMDB asserts > 1 on a branch (but for the free-page tree)
    nkeys = (lower - 16) >> 1
    for mask, why in (
            (own != pgnos, lambda i: f"its header says page {int(own[i])}"),
            (flags != want, lambda i: f"flags {int(flags[i]):#x}, expected a {'leaf' if leaf else 'branch'} page "
                                      f"({want:#x}) at level {'last' if leaf else 'above the last'}"),
            ((lower < 16) | (lower > upper) | (upper > psize) | (lower & 1 == 1),
             lambda i: f"node bounds lower {int(lower[i])}, upper {int(upper[i])} do not fit a {psize}-byte page"),
            (nkeys < fewest, lambda i: f"{int(nkeys[i])} nodes (a {'leaf' if leaf else 'branch'} page has at least "
                                       f"{fewest})")):
        if mask.any():
            i = int(np.flatnonzero(mask)[0])
            raise bad(int(pgnos[i]), why(i))
    # every node of the chunk: its page (row) and its offset
    row = np.repeat(rows, nkeys)
    slot = np.arange(len(row)) - np.repeat(np.cumsum(nkeys) - nkeys, nkeys)
    off = _u16(pages, row, 16 + 2 * slot)

    def first(mask, why):
        if mask.any():
            j = int(np.flatnonzero(mask)[0])
            raise bad(int(pgnos[row[j]]), f"node {int(slot[j])} at offset {int(off[j])}: {why(j)}")

    first((off < upper[row]) | (off + _NODE > psize) | (off & 1 == 1),
          lambda j: f"outside the node area {int(upper[row[j]])}..{psize} or odd")
    lo, hi, nflags, ksize = (_u16(pages, row, off + 2 * f) for f in range(4))
    key_end = off + _NODE + ksize
    first(key_end > psize, lambda j: f"its {int(ksize[j])}-byte key runs past the page's end")
    if not leaf:
        child = lo | hi << 16 | nflags << 32
        first((child < 2) | (child > last), lambda j: f"points to page {int(child[j])}, outside pages 2..{last}")
        return child.astype(np.uint64), 0, []
    size = lo | hi << 16
    big = nflags & F_BIGDATA != 0
    first(nflags & ~(F_BIGDATA | F_SUBDATA) != 0,
          lambda j: f"node flags {int(nflags[j]):#x} (duplicate keys or garbage; a shard has neither)")
    first(~big & (key_end + size > psize), lambda j: f"its {int(size[j])}-byte value runs past the page's end")
    first(big & (key_end + 8 > psize), lambda j: "its overflow page number runs past the page's end")
    if big.any():
        b = np.flatnonzero(big)
        at = key_end[b]
        ov = sum(pages[row[b], at + i].astype(np.uint64) << np.uint64(8 * i) for i in range(8))
        span = ((15 + size[b]) // psize + 1).astype(np.uint64)
        outside = (ov < 2) | (ov > np.uint64(last)) | (ov + span - np.uint64(1) > np.uint64(last))
        if outside.any():
            j = int(b[np.flatnonzero(outside)[0]])
            i = int(np.flatnonzero(outside)[0])
            raise bad(int(pgnos[row[j]]), f"node {int(slot[j])}: its {int(size[j])}-byte value is on pages "
                      f"{int(ov[i])}..{int(ov[i] + span[i] - 1)}, outside pages 2..{last}")
    subs = []
    sub = nflags & F_SUBDATA != 0
    if sub.any():
        first(sub & ~np.bool_(tree.main), lambda j: "a named table inside a table")
        first(sub & (big | (size != _DB.size)), lambda j: f"a named table's header of {int(size[j])} bytes, "
                                                       f"not {_DB.size}")
        for j in np.flatnonzero(sub):
            r, k0 = int(row[j]), int(key_end[j] - ksize[j])
            name = bytes(pages[r, k0:int(key_end[j])]).decode("utf-8", "replace")
            db = _DB.unpack(bytes(pages[r, int(key_end[j]):int(key_end[j]) + _DB.size]))
            subs.append(_Tree(name, root=db[7], depth=db[2], entries=db[6]))
    return np.zeros(0, np.uint64), len(row), subs


def _disk_full(shard: str, needed: int) -> bool:
    try:
        st = os.statvfs(shard)
    except OSError:
        return False
    return st.f_bavail * st.f_frsize < needed + (1 << 20)


def _over_file_limit(shard: str, needed: int) -> bool:
    try:
        import resource

        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        size = os.path.getsize(os.path.join(shard, "data.mdb"))
    except (ImportError, OSError):
        return False
    return soft != resource.RLIM_INFINITY and size + needed + (1 << 16) > soft


def write_error(shard: str, err: Exception, doing: str, needed: int = 0) -> ShardWriteError:
    """A failed LMDB write (lmdb.Error or OSError) as a ShardError naming the shard; a full disk says so.

    LMDB reports a short write as EIO, which is what a full disk (or the file size limit) gives mid-batch,
    so an EIO is called "no space left" when the filesystem has less than `needed` bytes + 1 MiB free."""
    text = str(err)
    code = getattr(err, "errno", None)
    eio = code == errno.EIO or "Input/output error" in text
    kept = "Records committed before are kept"
    if code == errno.ENOSPC or "No space left on device" in text or eio and _disk_full(shard, needed):
        return ShardWriteError(f"{shard}: no space left on device while {doing} ({text}). {kept}; free some space "
                          "and rerun the same command to resume")
    if code == errno.EFBIG or "File too large" in text or eio and _over_file_limit(shard, needed):
        return ShardWriteError(f"{shard}: file too large while {doing} ({text}): the file size limit (`ulimit -f`) or "
                          f"the filesystem's. {kept}; rerun with a higher limit to resume")
    return ShardWriteError(f"{shard}: write failed while {doing}: {text}. {kept}; rerun the same command to resume")


def describe_failure(err: Exception) -> str:
    """A command's last word on an lmdb.Error or OSError that no shard-level code turned into a ShardError."""
    text = str(err)
    where = f"{err.filename}: " if getattr(err, "filename", None) else ""
    if getattr(err, "errno", None) == errno.ENOSPC or "No space left on device" in text:
        return f"{where}no space left on device ({text})"
    if isinstance(err, OSError):
        return f"{where}{err.strerror or text}"
    return (f"a shard's data.mdb is damaged ({type(err).__name__}: {text}); `regionbert-shards verify` names the "
            "shard and what is wrong")
