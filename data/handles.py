"""One handle per shard per process: how a shard's LMDB environment is opened for reading.

A complete shard is immutable, so it is opened once per process without LMDB's lock file and read-only
(nothing per-process is shared, so a forked DataLoader worker can keep using what it inherited; a
spawned one opens its own on first use). No lock file is created or needed, so a complete shard reads
from a read-only mount, or as a user who may read its files but not write its folder. The first
metadata read is lock-free too: the state says whether the shard is complete, and only an incomplete
one is reopened with LMDB's lock (it may be written right now). The environment of a complete shard is
never closed, so the numpy views handed out by readers never dangle.

An incomplete shard (its writer crashed, or is still running) is opened with LMDB's lock for each read
and its records are copied out. Where the lock file cannot be made (a read-only location), it is read
without, which is safe only while no writer runs; `lockless` says so and the reader warns.

A shard's files are regular files inside its folder, and nothing is followed that this process did not
make (the shard may come from a hostile stranger, and LMDB writes its lock table into lock.mdb, opening it
read-write and creating it if absent, through any link it finds there). So before LMDB sees a shard,
data.mdb (and, for a locked open, lock.mdb) are opened here with O_NOFOLLOW and must be regular files
(lock.mdb: with one link, as it is written); a symlink, dangling or not, or anything else is a ShardError
naming the shard and the file, and lock.mdb is created, if absent, by that same O_NOFOLLOW open, never
through a link. LMDB is then handed exactly those files, not their names in the shard folder (which could
be swapped for a link in between): in a private folder (this user's, mode 0700), links made here to
/proc/self/fd/<fd> of the files opened above, given to LMDB as `N.M` and `N.M-lock` (MDB_NOSUBDIR). LMDB's locks
are on the lock file's inode, so a reader that opens it this way shares them with the writer that opened
it by name. Without /proc (not Linux), LMDB opens the names after the same checks (a race then remains
with someone swapping a file for a link in that instant).
"""

from __future__ import annotations

import errno
import os
import stat
import tempfile
import threading
from contextlib import contextmanager

import lmdb

from .errors import ShardError
from .format import (
    DB_META,
    DB_ORDER,
    DB_RECORDS,
    FEATURE_DTYPE_CODES,
    META_SHARD,
    META_STATE,
    decode_meta,
    decode_state,
)
from .lmdbcheck import check_file

_READ_ONLY_ERRORS = (errno.EACCES, errno.EPERM, errno.EROFS)


class _NoLockHere(ShardError):
    """lock.mdb cannot be opened for writing here (a read-only location): read without LMDB's lock."""


_PIN = os.path.isdir("/proc/self/fd")  # Linux: LMDB is handed the very files opened here (module docstring)
_NOFOLLOW = os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a FIFO planted as a shard file never hangs us


def _not_a_file(path: str, name: str, why: str) -> ShardError:
    return ShardError(f"{path}: {name} {why}; a shard's files must be regular files inside its folder, and "
                      "nothing is opened through a link (replace it with the file itself)")


def _open_shard_file(path: str, name: str, flags: int, written: bool) -> int:
    """A descriptor of path/name opened without following a link; it must be a regular file (and, if this
    process writes it, have one link: a hard link would write someone else's file too)."""
    try:
        fd = os.open(os.path.join(path, name), flags | _NOFOLLOW, 0o644)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise _not_a_file(path, name, "is a symbolic link") from None
        raise
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or written and st.st_nlink != 1:
        os.close(fd)
        raise _not_a_file(path, name, "is not a regular file" if not stat.S_ISREG(st.st_mode)
                          else f"has {st.st_nlink} hard links")
    return fd


def check_shard_files(path: str, missing_ok: bool = False) -> None:
    """ShardError naming the file unless data.mdb is a regular file of path's own (absent: not a shard, or
    fine if missing_ok: a writer's new shard). By lstat: follows nothing. (lock.mdb is checked where it is
    used: by the O_NOFOLLOW open of a locked read.)"""
    try:
        st = os.lstat(os.path.join(path, "data.mdb"))
    except FileNotFoundError:
        if missing_ok:
            return
        raise ShardError(f"{path}: not a shard (no data.mdb in this folder)") from None
    except OSError as e:
        raise ShardError(f"{path}: cannot read data.mdb: {e.strerror}") from None
    if stat.S_ISLNK(st.st_mode):
        raise _not_a_file(path, "data.mdb", "is a symbolic link")
    if not stat.S_ISREG(st.st_mode):
        raise _not_a_file(path, "data.mdb", "is not a regular file")


def open_pinned(path: str, lock: bool, write: bool = False, **kw):
    """lmdb.open of the shard folder `path`, LMDB given the data.mdb (and, if lock, lock.mdb) opened here
    with O_NOFOLLOW (module docstring). write: the writer's open (data.mdb read-write, created if absent).
    ShardError naming the file for a link or non-regular file; _NoLockHere where lock.mdb cannot be
    opened for writing; lmdb.Error from LMDB itself."""
    fds = []
    try:
        try:
            data_flags = os.O_RDWR | os.O_CREAT if write else os.O_RDONLY
            fds.append(_open_shard_file(path, "data.mdb", data_flags, written=write))
        except FileNotFoundError:
            raise ShardError(f"{path}: not a shard (no data.mdb in this folder)") from None
        except OSError as e:
            raise ShardError(f"{path}: cannot open data.mdb: {e.strerror}") from None
        if lock:
            try:
                fds.append(_open_shard_file(path, "lock.mdb", os.O_RDWR | os.O_CREAT, written=True))
            except OSError as e:
                if e.errno in _READ_ONLY_ERRORS:
                    raise _NoLockHere(f"{path}: cannot open lock.mdb for writing: {e.strerror}") from None
                raise ShardError(f"{path}: cannot open lock.mdb: {e.strerror}") from None
        return _lmdb_open(path, fds, lock=lock, readonly=not write, **kw)
    finally:
        for fd in fds:  # LMDB holds its own descriptors of the same files
            os.close(fd)


_LINKS = {"dir": None, "pid": None, "ok": set()}  # this process's link folder and the links it has checked
_LINKS_LOCK = threading.Lock()


def _owned_private_dir(path: str) -> bool:
    """A real folder (not a link) of this user's that nobody else may write into."""
    try:
        st = os.lstat(path)
    except OSError:
        return False
    return stat.S_ISDIR(st.st_mode) and st.st_uid == os.geteuid() and not st.st_mode & 0o077


def _link_dir() -> str | None:
    """The folder of links to /proc/self/fd/N. The links' text is the same in every process ("self"), so one
    folder per user serves all its processes and is never cleaned up (a few dozen links): making and
    removing links for each open costs more than the open itself on a slow disk. It must be this user's
    own, mode 0700 (a folder of that name planted by another user is not used: then one per process)."""
    with _LINKS_LOCK:
        if _LINKS["pid"] == os.getpid():
            return _LINKS["dir"]
        base = os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
        d = os.path.join(base, f"regionbert-{os.geteuid()}-fd-links")
        try:
            os.mkdir(d, 0o700)
        except OSError:
            pass
        if not _owned_private_dir(d):
            try:
                d = tempfile.mkdtemp(prefix="regionbert-fd-links-")
            except OSError:
                d = None
        _LINKS.update(dir=d, pid=os.getpid(), ok=set())
        return d


def _fd_link(d: str, name: str, fd: int) -> None:
    """d/name -> /proc/self/fd/<fd>, made if absent; checked once per process (only this user writes d)."""
    link, text = os.path.join(d, name), f"/proc/self/fd/{fd}"
    if link in _LINKS["ok"]:
        return
    try:
        os.symlink(text, link)
    except FileExistsError:
        if os.readlink(link) != text:
            raise OSError(errno.EEXIST, f"{link} is not a link to {text}") from None
    _LINKS["ok"].add(link)


def _lmdb_open(path: str, fds: list, retry: bool = True, **kw):
    """LMDB opens the files behind fds through links made here (module docstring), named after the fd
    numbers; without /proc, or where no private folder can be had, it opens the names in path (checked
    just before)."""
    d = _link_dir() if _PIN else None
    if d is not None:
        name = ".".join(map(str, fds))  # "5" or "5.6": data.mdb is d/5.6, its lock d/5.6-lock (MDB_NOSUBDIR)
        try:
            _fd_link(d, name, fds[0])
            if len(fds) > 1:
                _fd_link(d, name + "-lock", fds[1])
        except OSError:
            d = None
    if d is None:
        return lmdb.open(path, subdir=True, **kw)
    try:
        return lmdb.open(os.path.join(d, name), subdir=False, **kw)
    except lmdb.Error:
        if os.path.lexists(os.path.join(d, name)) or not retry:
            raise
        with _LINKS_LOCK:  # the folder was cleaned away under us (a /tmp cleaner): make it again, once
            _LINKS["pid"] = None
        return _lmdb_open(path, fds, retry=False, **kw)


def _open_env(path: str, lock: bool):
    """(environment, (records, order, meta) tables), read-only; ShardError if it is not a shard."""
    try:
        env = open_pinned(path, lock, readahead=False, max_dbs=3, max_readers=1024)
    except lmdb.Error as e:
        hint = (" (each shard read keeps one file open for the life of the process: raise `ulimit -n`, or use "
                "fewer, larger shards)" if "Too many open files" in str(e) else "")
        raise ShardError(f"{path}: cannot open shard: {e}{hint}") from None
    try:
        dbs = tuple(env.open_db(n, create=False) for n in (DB_RECORDS, DB_ORDER, DB_META))
    except lmdb.Error:
        env.close()
        raise ShardError(f"{path}: not a regionbert shard (no records/order/meta tables)") from None
    return env, dbs


def _cannot_lock(e: ShardError) -> bool:
    """Whether opening with LMDB's lock failed only because the lock file cannot be made here."""
    if isinstance(e, _NoLockHere):
        return True
    msg = str(e)
    return any(os.strerror(n) in msg for n in _READ_ONLY_ERRORS)


class Handle:
    """This process's view of one shard: metadata, state, count, and how to read it."""

    def __init__(self, path: str):
        check_shard_files(path)  # regular files of its own, no links: before anything reads them
        check_file(path)  # data/lmdbcheck.py: a truncated or garbled file is an error here, not a SIGBUS later
        self.path = path
        self.env = None  # set for complete shards: the shared, lock-free, never-closed environment
        self.lockless = False  # an incomplete shard read without LMDB's lock (a read-only location)
        self.gen = 0
        self._local = threading.local()
        self.reload()

    def reload(self) -> None:
        """(Re)read metadata, state and count; new reads see the newest committed data."""
        self.signature = _signature(self.path)
        if self.env is None:
            # First look lock-free: a complete shard stays open like this, an incomplete one is reopened
            # with the lock below (what we read lock-free of it is thrown away).
            env, dbs = _open_env(self.path, lock=False)
            try:
                with env.begin(buffers=False) as txn:
                    state = decode_state(self.path, txn.get(META_STATE, db=dbs[2]))
            except ShardError:
                state = {}
            if state.get("complete"):
                self.env, self.dbs = env, dbs
            else:
                env.close()
        with self.snapshot(buffers=False) as (txn, _, order, meta_db):
            self.meta = decode_meta(self.path, txn.get(META_SHARD, db=meta_db))
            self.state = decode_state(self.path, txn.get(META_STATE, db=meta_db))
            self.count = txn.stat(order)["entries"]
        self.complete = bool(self.state.get("complete"))
        names, attrs = self.meta["class_names"], self.meta["attribute_names"]
        # (D, C, A, feature dtype code) that every record's header must carry
        self.expect = (self.meta["feature_dim"], 0 if names is None else len(names), 0 if attrs is None else len(attrs),
                       FEATURE_DTYPE_CODES[self.meta["feature_dtype"]])
        self.gen += 1

    @contextmanager
    def snapshot(self, buffers: bool = True):
        """A consistent read transaction and the (records, order, meta) tables, for scans."""
        if self.env is not None:
            with self._begin(buffers) as txn:
                yield (txn, *self.dbs)
            return
        env, dbs = self._open_locked()  # may be written right now: take a reader slot
        try:
            with env.begin(buffers=buffers) as txn:
                yield (txn, *dbs)
        finally:
            env.close()

    def _open_locked(self):
        if not self.lockless:
            try:
                return _open_env(self.path, lock=True)
            except ShardError as e:
                if not _cannot_lock(e):
                    raise
                self.lockless = True  # read-only here: nobody can be writing it through this folder
        return _open_env(self.path, lock=False)

    def _begin(self, buffers: bool):
        try:
            return self.env.begin(buffers=buffers)
        except lmdb.MapResizedError:  # a writer grew the file since we mapped it
            self.env.set_mapsize(0)
            return self.env.begin(buffers=buffers)

    def get(self, key: bytes, table: int):
        """One value from records (0) or order (1): a view of the map, or owned bytes if incomplete."""
        if self.env is None:
            with self.snapshot(buffers=False) as tables:
                return tables[0].get(key, db=tables[1 + table])
        local = self._local
        txn = local.__dict__.get("txn")
        if txn is None or local.gen != self.gen:  # long-lived per thread: handed-out views stay valid
            txn = local.txn = self._begin(True)
            local.gen = self.gen
        return txn.get(key, db=self.dbs[table])


_HANDLES: dict = {}  # by path, and by file identity (LMDB allows one open per file)
_HANDLES_LOCK = threading.Lock()


def _signature(path: str) -> tuple:
    try:
        st = os.lstat(os.path.join(path, "data.mdb"))  # (a link is refused by Handle: it has no identity here)
    except OSError:
        return ()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def get_handle(path: str, refresh: bool = False) -> Handle:
    """This process's handle on a shard. refresh: catch up if the file changed since it was read."""
    h = _HANDLES.get(path)
    if h is None:
        with _HANDLES_LOCK:
            ident = _signature(path)[:2]
            h = _HANDLES.get(path) or _HANDLES.get(ident)  # a moved or linked folder: same files
            if h is None:
                h = Handle(path)
            h.path = path
            _HANDLES[path] = _HANDLES[ident] = h
    elif refresh and (not h.complete or h.signature != _signature(path)):
        # (an incomplete shard is always reread: a commit within the file system's timestamp tick leaves
        # size and mtime as they were)
        with _HANDLES_LOCK:
            sig = _signature(path)
            if sig[:2] != h.signature[:2]:  # deleted and written anew: other files, a new environment
                h = _HANDLES.get(sig[:2]) or Handle(path)  # (the old one stays open for its views)
                h.path = path
                _HANDLES[path] = _HANDLES[sig[:2]] = h
            else:
                h.reload()
    return h


def open_for_reading_here(path: str) -> bool:
    """Whether this process holds the shard's environment open (LMDB allows one per file)."""
    h = _HANDLES.get(_signature(os.path.abspath(path))[:2])
    return h is not None and h.env is not None
