"""Damage without crashes: check an LMDB file before mapping it, and turn LMDB's write failures (a full
disk) into errors that name the shard. Imports nothing of data/ but the errors (handles.py uses it).

LMDB maps data.mdb into memory and trusts what it finds: a file shorter than its meta page says (a
truncated copy, a disk that filled up under `cp`) makes the first touch of a missing page kill the
process with SIGBUS, and a flipped byte in a tree page can send LMDB's C code reading anywhere. So:

    check_file(path)       reads the two meta pages with plain file reads (no map) and refuses a file that
                           LMDB could not open safely: bad magic or version, impossible page size, roots past
                           the last page, or a file shorter than the pages the newest meta page counts.
                           Called before every open of a shard (reader and writer). Microseconds.
    (data/isolate.py runs `verify` in a forked child, so a page that kills LMDB's reader kills the child.)
    write_error(path, e)   a ShardError for a failed LMDB write: "no space left on device" with the shard
                           name, and that a rerun resumes from the last commit.

LMDB's file layout (lmdb.h / mdb.c, 64-bit build): pages 0 and 1 are meta pages; each is a 16-byte page
header (pgno u64, pad u16, flags u16, lower u16, upper u16) and then MDB_meta: magic u32 0xBEEFC0DE,
version u32 1, address u64, mapsize u64, two MDB_db (free pages, main) of 48 bytes each (pad u32 -- the
free DB's pad is the page size --, flags u16, depth u16, branch/leaf/overflow pages u64, entries u64,
root u64), last_pg u64, txnid u64. LMDB uses the meta page with the larger txnid.
"""

from __future__ import annotations

import errno
import os
import struct

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


def _read_meta(f, offset: int) -> dict | None:
    f.seek(offset)
    raw = f.read(_PAGE_HEADER.size + _META.size)
    if len(raw) < _PAGE_HEADER.size + _META.size:
        return None
    _pgno, _pad, flags, _lower, _upper = _PAGE_HEADER.unpack_from(raw, 0)
    magic, version, _addr, mapsize, free_db, main_db, last_pg, txnid = _META.unpack_from(raw, _PAGE_HEADER.size)
    free, main = _DB.unpack(free_db), _DB.unpack(main_db)
    return {"flags": flags, "magic": magic, "version": version, "mapsize": mapsize, "psize": free[0],
            "free_depth": free[2], "free_root": free[7], "main_depth": main[2], "main_root": main[7],
            "last_pg": last_pg, "txnid": txnid}


def check_file(shard: str, empty_ok: bool = False) -> None:
    """Raise ShardError if SHARD/data.mdb is not an LMDB file that can be mapped without a crash.
    Does nothing if there is no data.mdb (the caller says what that means). empty_ok: an empty file is
    fine (a writer's LMDB initialises it); for a reader it is a shard whose writer never got going."""
    data = os.path.join(shard, "data.mdb")
    try:
        size = os.path.getsize(data)
        if size == 0:
            if empty_ok:
                return
            raise ShardError(f"{shard}: data.mdb is empty: its writer never committed anything (rerun the job)")
        with open(data, "rb") as f:
            first = _read_meta(f, 0)
            if first is None:
                raise _damaged(shard, f"{size} bytes, shorter than LMDB's meta page")
            psize = first["psize"]
            if not (512 <= psize <= 65536 and psize & (psize - 1) == 0):
                raise _damaged(shard, f"meta page 0 gives page size {psize}")
            second = _read_meta(f, psize)
    except FileNotFoundError:
        return
    except OSError as e:
        raise ShardError(f"{shard}: cannot read data.mdb: {e}") from None
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
