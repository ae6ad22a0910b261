"""`verify` in a forked child: whatever a damaged data.mdb does to LMDB's reader (SIGBUS, SIGSEGV, an
endless walk, an lmdb.Error) happens to the child and comes back as a "damaged" problem of the report,
never as a crash or a hang of the caller. `regionbert-shards verify` uses it.

The child streams JSON lines over a pipe: {"total": n}, {"done": k} as it goes, {"report": {...}} at
the end. No line for STALL_SECONDS means it is stuck (a tree whose pages point in a circle): it is killed.
"""

from __future__ import annotations

import json
import os
import select
import signal

from .errors import ShardError
from .handles import check_shard_files
from .lmdbcheck import check_file

STALL_SECONDS = 600  # a verify child that reports no progress for this long is stuck in a damaged tree


def _report_dict(report) -> dict:
    return {"path": report.path, "count": report.count, "checked": report.checked,
            "bad": [list(b) for b in report.bad], "problems": list(report.problems),
            "content_hash": report.content_hash}


def _child(path: str, wfd: int) -> None:
    """Runs in the forked child: verify, stream progress and the report as JSON lines, never return."""
    import lmdb

    from .handles import get_handle
    from .index import VerifyReport, verify_shard

    out = os.fdopen(wfd, "w")

    def send(**msg) -> None:
        out.write(json.dumps(msg) + "\n")
        out.flush()

    try:
        try:
            total = get_handle(path, refresh=True).count
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
        check_shard_files(path)  # data.mdb a regular file of the shard's own (not a link): before reading it
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
