"""Damage without crashes: check an LMDB file before mapping it, walk untrusted pages in a child process,
and turn LMDB's write failures (a full disk) into errors that name the shard.

LMDB maps data.mdb into memory and trusts what it finds: a file shorter than its meta page says (a
truncated copy, a disk that filled up under `cp`) makes the first touch of a missing page kill the
process with SIGBUS, and a flipped byte in a tree page can send LMDB's C code reading anywhere. So:

    check_file(path)       reads the two meta pages with plain file reads (no map) and refuses a file that
                           LMDB could not open safely: bad magic or version, impossible page size, roots past
                           the last page, or a file shorter than the pages the newest meta page counts.
                           Called before every open of a shard (reader and writer). Microseconds.
    verify_isolated(path)  runs `verify_shard` in a forked child: a signal death (SIGBUS, SIGSEGV) or an
                           LMDB error there becomes a "damaged" problem of the report, never a crash of the
                           caller. `regionbert-shards verify` uses it.
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
import json
import os
import select
import signal
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
STALL_SECONDS = 600  # a verify child that reports no progress for this long is stuck in a damaged tree


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


# ---- verify in a child process -----------------------------------------------------------------------


def _report_dict(report) -> dict:
    return {"path": report.path, "count": report.count, "checked": report.checked,
            "bad": [list(b) for b in report.bad], "problems": list(report.problems),
            "content_hash": report.content_hash}


def _child(path: str, wfd: int) -> None:
    """Runs in the forked child: verify, stream progress and the report as JSON lines, never return."""
    import lmdb

    from .index import VerifyReport, verify_shard
    from .reader import _handle

    out = os.fdopen(wfd, "w")

    def send(**msg) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    try:
        try:
            total = _handle(path, refresh=True).count
        except ShardError:
            total = None  # verify_shard reports why
        send(total=total)
        done = 0
        # a damaged tree can loop (a page that points back up): a walk yielding more entries than the file
        # could hold is cut short
        limit = os.path.getsize(os.path.join(path, "data.mdb")) // 8 + 1

        def progress(n: int) -> None:
            nonlocal done
            done += n
            if done > limit:
                raise ShardError(f"the order table yields more than {limit} entries, more than data.mdb can "
                                 "hold: its pages point in a circle")
            if done % 64 == 0:
                send(done=done)

        try:
            report = verify_shard(path, progress=progress)
        except Exception as e:  # noqa: BLE001 - whatever a damaged file makes the walk raise is damage to report
            report = VerifyReport(path, count=total or 0, checked=done)
            kind = "LMDB reports" if isinstance(e, lmdb.Error) else "reading it failed:"
            report.problems.append(f"damaged: {kind} {type(e).__name__}: {e}")
        send(done=done, report=_report_dict(report))
        out.close()
        os._exit(0)
    finally:
        os._exit(3)


def verify_isolated(path: str, progress=None, total=None):
    """verify_shard(path) run in a forked child: the caller survives whatever the file does to LMDB.

    progress(n): called as records are checked; total(n): called once with the record count (or None).
    Returns a VerifyReport; a child killed by a signal, or stuck, gives a report with a "damaged" problem."""
    from .index import VerifyReport, verify_shard

    path = os.path.abspath(path)
    try:
        check_file(path)
    except ShardError as e:
        return VerifyReport(path, problems=[str(e)])
    if not hasattr(os, "fork"):  # no fork (Windows): in this process
        return verify_shard(path, progress=progress)
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        os.close(rfd)
        _child(path, wfd)
    os.close(wfd)
    report, seen, buf = None, 0, b""
    try:
        while True:
            ready, _, _ = select.select([rfd], [], [], STALL_SECONDS)
            if not ready:  # no word for STALL_SECONDS: stuck in a damaged tree
                os.kill(pid, signal.SIGKILL)
                break
            chunk = os.read(rfd, 1 << 16)
            if not chunk:
                break
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                msg = json.loads(line)
                if "total" in msg and total:
                    total(msg["total"])
                if "done" in msg:
                    if progress and msg["done"] > seen:
                        progress(msg["done"] - seen)
                    seen = max(seen, msg["done"])
                if "report" in msg:
                    r = msg["report"]
                    report = VerifyReport(r["path"], r["count"], r["checked"], [tuple(b) for b in r["bad"]],
                                          r["problems"], r["content_hash"])
    finally:
        os.close(rfd)
        _, status = os.waitpid(pid, 0)
    if report is not None:
        return report
    report = VerifyReport(path, checked=seen)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        why = (f"reading it killed the checker with {signal.Signals(sig).name}" if sig != signal.SIGKILL
               else f"the checker made no progress for {STALL_SECONDS} s, or was killed")
    else:
        why = f"the checker exited with status {os.WEXITSTATUS(status)}"
    report.problems.append(f"damaged: data.mdb's pages are corrupt ({why}, after {seen} records); restore the "
                           "shard from its source or rerun the job that wrote it")
    return report
