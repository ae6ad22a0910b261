"""One writer per shard: an exclusive OS lock on `<shard>.writer.lock`, a file next to the shard folder.

Every writer (ShardWriter, hence regionbert-extract and `regionbert-shards import`; and `copy` for its
destination) takes it before touching the shard; a second one is refused at once, with who holds it
(pid, host, command, start time: written into the lock file by the holder). Readers never look at it,
so shards read from read-only mounts need nothing of it.

The lock is a POSIX record lock (fcntl.lockf): the kernel drops it when its process ends, kill -9
included, and, unlike flock, a child forked while it is held (a DataLoader worker) does not inherit it,
so a killed writer's lingering workers cannot keep the shard locked. It also works over NFS. POSIX locks
belong to the process, so this module refuses a second lock on the same file within one process itself.
The lock file is left in place after use (removing it would race with the next writer).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import sys
import threading

from .errors import ShardError
from .format import now_iso

_HELD: dict[str, WriterLock] = {}  # real path of the lock file -> the lock this process holds on it
_HELD_LOCK = threading.Lock()


class ShardBusyError(ShardError):
    """The shard is being written by another writer (named in the message)."""


def lock_path(shard: str) -> str:
    """`<shard>.writer.lock` next to the shard's real folder (so two names of one folder share one lock)."""
    return os.path.realpath(os.fspath(shard)) + ".writer.lock"


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode("utf-8"))
        return (f"pid {info['pid']} on host {info['host']}, started {info['started']}, command: "
                f"{info['command']}")
    except (ValueError, KeyError, TypeError):
        return "a writer that has not recorded itself yet"


class WriterLock:
    """The exclusive writer lock of one shard. `with WriterLock(path):` or acquire() / release()."""

    def __init__(self, shard: str | os.PathLike):
        self.shard = os.fspath(shard)
        self.path = lock_path(self.shard)
        self._fd: int | None = None

    def acquire(self) -> WriterLock:
        parent = os.path.dirname(os.path.abspath(self.path))
        os.makedirs(parent, exist_ok=True)
        key = os.path.realpath(self.path)
        with _HELD_LOCK:
            other = _HELD.get(key)
            if other is not None:
                raise ShardBusyError(f"{self.shard}: this process is already writing it (one writer per shard)")
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise ShardError(f"{self.shard}: cannot create its writer lock {self.path}: {e.strerror} "
                                 "(a shard is written only where its folder's parent is writable)") from None
            try:
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = os.pread(fd, 4096, 0)
                os.close(fd)
                if e.errno in (errno.EACCES, errno.EAGAIN):
                    raise ShardBusyError(f"{self.shard}: another writer is writing this shard ({_describe(holder)}); "
                                         f"one writer per shard: wait for it to finish, or stop it (its lock "
                                         f"{self.path} goes with its process)") from None
                raise ShardError(f"{self.shard}: cannot lock {self.path}: {e.strerror}") from None
            info = {"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso(),
                    "command": shlex.join(sys.argv)[:1000]}
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)
            self._fd = fd
            _HELD[key] = self
        return self

    def release(self) -> None:
        with _HELD_LOCK:
            if self._fd is None:
                return
            fd, self._fd = self._fd, None
            _HELD.pop(os.path.realpath(self.path), None)
            try:
                os.ftruncate(fd, 0)  # no stale holder details for the next one to read
            finally:
                os.close(fd)  # closing drops the lock

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def check_not_written(shard: str) -> None:
    """ShardBusyError if a writer holds the shard's lock right now (a momentary test, for readers that
    need the shard to stand still, such as `copy`'s source). A lock file that cannot be opened means
    nobody is writing through it."""
    key = os.path.realpath(lock_path(shard))
    if key in _HELD:
        raise ShardBusyError(f"{shard}: this process is writing it")
    try:
        fd = os.open(lock_path(shard), os.O_RDONLY)
    except OSError:
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise ShardBusyError(f"{shard}: is being written ({_describe(os.pread(fd, 4096, 0))}); "
                                 "wait for it to finish") from None
    finally:
        os.close(fd)  # drops the shared lock, if taken
