"""One writer per shard: an exclusive OS lock on `writer.lock`, a file INSIDE the shard folder, and on
`<shard>.writer.lock`, a file next to it.

Every writer (ShardWriter, hence regionbert-extract and `regionbert-shards import`) takes both before
touching the shard; `copy` takes the one next to its destination (which does not exist yet). A second
writer is refused at once, with who holds it (pid, host, command, start time: written into the lock
files by the holder). Readers never look at either, so shards read from read-only mounts need nothing
of them.

Why a file inside the folder: the lock must bind to the shard itself, the same inode whichever path
reaches it. A file next to the folder is found by the folder's path, and two mounts of one folder (a
container volume `-v host/shard-0:/out/shard-0`, a bind mount) give two real paths, two lock files and
two writers. `writer.lock` inside the folder is one inode whether the folder is reached through a
symlink, a bind mount, a container volume or NFS from another host. Why not flock on the folder's own
descriptor (no file at all): flock is shared with forked children (a killed writer's DataLoader workers
would keep the shard locked) and a directory cannot be locked over NFS; a POSIX record lock on a file
has neither problem. The file next to the folder is still taken: it is what `copy` can lock before its
destination exists, and what writers of earlier versions lock, so they and this one exclude each other.

Both files are opened relative to a descriptor of their folder, with O_NOFOLLOW, and must be regular
files with one link: a planted `<shard>.writer.lock` (or `writer.lock`) symlink or hard link to someone's
file is refused, never truncated. Nothing is followed that this module did not make, other than the
shard path the caller gives.

The lock is a POSIX record lock (fcntl.lockf): the kernel drops it when its process ends, kill -9
included, and, unlike flock, a child forked while it is held (a DataLoader worker) does not inherit it,
so a killed writer's lingering workers cannot keep the shard locked. It also works over NFS. POSIX locks
belong to the process, and closing ANY descriptor of the file drops them, so this module refuses a
second lock on the same shard within one process itself, before opening anything (by the folder's
inode, so two paths of one folder are one shard here too). The lock files are left in place after use
(removing one would race with the next writer).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import shlex
import socket
import stat
import sys
import threading

from .errors import ShardError
from .format import now_iso

INSIDE_NAME = "writer.lock"  # the lock file inside the shard folder
_HELD: dict[tuple, WriterLock] = {}  # ("name", lock file path) / ("shard", st_dev, st_ino) -> the holder here
_HELD_LOCK = threading.Lock()
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a FIFO planted as the lock never hangs us


class ShardBusyError(ShardError):
    """The shard is being written by another writer (named in the message)."""


def lock_path(shard: str) -> str:
    """`<shard>.writer.lock` next to the shard's real folder (so two names of one folder share one lock)."""
    return os.path.realpath(os.fspath(shard)) + ".writer.lock"


def inside_lock_path(shard: str) -> str:
    """`<shard>/writer.lock`: the lock that binds to the shard folder's inode, however it is reached."""
    return os.path.join(os.fspath(shard), INSIDE_NAME)


def _describe(raw: bytes) -> str:
    try:
        info = json.loads(raw.decode("utf-8"))
        return (f"pid {info['pid']} on host {info['host']}, started {info['started']}, command: "
                f"{info['command']}")
    except (ValueError, KeyError, TypeError):
        return "a writer that has not recorded itself yet"


def _folder_key(folder: str) -> tuple | None:
    """The in-process key of a shard folder: its inode (None if it does not exist)."""
    try:
        st = os.stat(folder)
    except OSError:
        return None
    return ("shard", st.st_dev, st.st_ino)


def _open_lock_file(shard: str, folder: str, name: str, flags: int, mode: int = 0o644) -> int:
    """Open folder/name without following a link at either end of our own making: relative to a descriptor
    of the folder, O_NOFOLLOW; then it must be a regular file with one link. ShardError naming the file."""
    where = os.path.join(folder, name)
    dfd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        try:
            fd = os.open(name, flags | _NOFOLLOW, mode, dir_fd=dfd)
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise ShardError(f"{shard}: its writer lock {where} is a symbolic link; a lock file is never "
                                 "followed to another file (remove the link)") from None
            raise
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        what = "not a regular file" if not stat.S_ISREG(st.st_mode) else f"a file with {st.st_nlink} hard links"
        raise ShardError(f"{shard}: its writer lock {where} is {what}; it is never written through (remove it)")
    return fd


def _take(shard: str, fd: int, where: str) -> None:
    """An exclusive, non-blocking POSIX lock on fd, or ShardBusyError naming the holder (fd then closed)."""
    try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = os.pread(fd, 4096, 0)
        os.close(fd)
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise ShardBusyError(f"{shard}: another writer is writing this shard ({_describe(holder)}); "
                                 f"one writer per shard: wait for it to finish, or stop it (its lock "
                                 f"{where} goes with its process)") from None
        raise ShardError(f"{shard}: cannot lock {where}: {e.strerror}") from None


class WriterLock:
    """The exclusive writer lock of one shard. `with WriterLock(path):` or acquire() / release().

    inside=False (for `copy`, whose destination does not exist yet): only the lock next to the folder."""

    def __init__(self, shard: str | os.PathLike, inside: bool = True):
        self.shard = os.fspath(shard)
        self.path = lock_path(self.shard)
        self.inside = inside
        self._fds: list[int] = []
        self._keys: list[tuple] = []

    def acquire(self) -> WriterLock:
        with _HELD_LOCK:
            try:
                self._acquire()
            except BaseException:
                self._drop()
                raise
        return self

    def _acquire(self) -> None:
        # (checked before opening anything: closing a descriptor of a file this process has locked drops the lock)
        name_key = ("name", self.path)
        if name_key in _HELD or (self.inside and _folder_key(self.shard) in _HELD):
            raise ShardBusyError(f"{self.shard}: this process is already writing it (one writer per shard)")
        parent = os.path.dirname(self.path)
        try:
            os.makedirs(parent, exist_ok=True)
            fd = _open_lock_file(self.shard, parent, os.path.basename(self.path), os.O_RDWR | os.O_CREAT)
        except OSError as e:
            raise ShardError(f"{self.shard}: cannot create its writer lock {self.path}: {e.strerror} "
                             "(a shard is written only where its folder's parent is writable)") from None
        _take(self.shard, fd, self.path)
        self._hold(fd, name_key)
        if self.inside:
            try:
                os.makedirs(self.shard, exist_ok=True)
                key = _folder_key(self.shard)
                if key in _HELD:  # (the folder was made just now, or swapped since the check above)
                    raise ShardBusyError(f"{self.shard}: this process is already writing it (one writer per shard)")
                fd = _open_lock_file(self.shard, self.shard, INSIDE_NAME, os.O_RDWR | os.O_CREAT)
            except OSError as e:
                raise ShardError(f"{self.shard}: cannot create its writer lock {inside_lock_path(self.shard)}: "
                                 f"{e.strerror} (a shard is written only where its folder is writable)") from None
            _take(self.shard, fd, inside_lock_path(self.shard))
            self._hold(fd, key)
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": now_iso(),
                "command": shlex.join(sys.argv)[:1000]}
        for fd in self._fds:
            os.ftruncate(fd, 0)
            os.pwrite(fd, (json.dumps(info) + "\n").encode(), 0)

    def _hold(self, fd: int, key: tuple) -> None:
        self._fds.append(fd)
        self._keys.append(key)
        _HELD[key] = self

    def _drop(self) -> None:
        """Empty and close what is held (the caller holds _HELD_LOCK); closing drops the locks."""
        fds, self._fds = self._fds, []
        for key in self._keys:
            _HELD.pop(key, None)
        self._keys = []
        for fd in reversed(fds):
            try:
                os.ftruncate(fd, 0)  # no stale holder details for the next one to read
            finally:
                os.close(fd)

    def release(self) -> None:
        with _HELD_LOCK:
            self._drop()

    def __enter__(self) -> WriterLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def _probe(shard: str, folder: str, name: str) -> None:
    """ShardBusyError if someone holds the lock folder/name now. A file that cannot be opened (none, a link,
    not a regular file) means nobody is writing through it."""
    try:
        fd = _open_lock_file(shard, folder, name, os.O_RDONLY)
    except (OSError, ShardError):
        return
    try:
        fcntl.lockf(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EACCES, errno.EAGAIN):
            raise ShardBusyError(f"{shard}: is being written ({_describe(os.pread(fd, 4096, 0))}); "
                                 "wait for it to finish") from None
    finally:
        os.close(fd)  # drops the shared lock, if taken


def check_not_written(shard: str) -> None:
    """ShardBusyError if a writer holds the shard's lock right now (a momentary test, for readers that
    need the shard to stand still, such as `copy`'s source): either lock file, so a writer that reaches
    the folder by another mount, or a writer of an earlier version, is seen too."""
    path = lock_path(shard)
    key = _folder_key(shard)
    if ("name", path) in _HELD or (key is not None and key in _HELD):
        raise ShardBusyError(f"{shard}: this process is writing it")
    _probe(shard, os.path.dirname(path), os.path.basename(path))
    if key is not None:
        _probe(shard, shard, INSIDE_NAME)
