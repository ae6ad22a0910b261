"""ShardReader (one shard) and ShardSet (many shards as one sequence): lazy, read-only, fork-safe.

A complete shard is immutable, so it is opened once per process without LMDB's lock file (nothing
per-process is shared, so a forked DataLoader worker can keep using what it inherited; a spawned one
opens its own on first use) and records decode into zero-copy numpy views of LMDB's memory map. The
environment is never closed, so those views never dangle. Memory is the map's page cache, not Python
objects: it stays flat however many records are read.

An incomplete shard (its writer crashed, or is still running) may change under us: it is opened
with locking for each read and its records are copied out. Slower, but correct while a writer runs.
"""

from __future__ import annotations

import bisect
import json
import operator
import os
import threading
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import lmdb

from .errors import CorruptRecordError, ShardError, ShardMismatchError
from .format import FEATURE_DTYPE_CODES, Record, decode_meta, decode_record, encode_key
from .lmdbcheck import check_file
from .writer import DB_META, DB_ORDER, DB_RECORDS, META_SHARD, META_STATE, order_key, settings_diff


def _open_env(path: str, lock: bool):
    try:
        env = lmdb.open(path, subdir=True, readonly=True, lock=lock, readahead=False, max_dbs=3,
                        max_readers=1024)
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


class _Handle:
    """This process's view of one shard: metadata, count, and how to read it."""

    def __init__(self, path: str):
        if not os.path.isfile(os.path.join(path, "data.mdb")):
            raise ShardError(f"{path}: not a shard (no data.mdb in this folder)")
        check_file(path)  # data/lmdbcheck.py: a truncated or garbled file is an error here, not a SIGBUS later
        self.path = path
        self.env = None  # set for complete shards: the shared, lock-free, never-closed environment
        self.gen = 0
        self._local = threading.local()
        self.reload()

    def reload(self) -> None:
        """(Re)read metadata, state and count; new reads see the newest committed data."""
        self.signature = _signature(self.path)
        with self.snapshot(buffers=False) as (txn, _, order, meta_db):
            self.meta = decode_meta(self.path, txn.get(META_SHARD, db=meta_db))
            state = txn.get(META_STATE, db=meta_db)
            self.count = txn.stat(order)["entries"]
        try:
            self.state = json.loads(state) if state else {}
        except ValueError:
            raise ShardError(f"{self.path}: shard state is not valid JSON") from None
        self.complete = bool(self.state.get("complete"))
        names, attrs = self.meta["class_names"], self.meta["attribute_names"]
        # (D, C, A, feature dtype code) that every record's header must carry
        self.expect = (self.meta["feature_dim"], 0 if names is None else len(names), 0 if attrs is None else len(attrs),
                       FEATURE_DTYPE_CODES[self.meta["feature_dtype"]])
        if self.complete and self.env is None:
            self.env, self.dbs = _open_env(self.path, lock=False)
        self.gen += 1

    @contextmanager
    def snapshot(self, buffers: bool = True):
        """A consistent read transaction and the (records, order, meta) tables, for scans."""
        if self.env is not None:
            with self._begin(buffers) as txn:
                yield (txn, *self.dbs)
            return
        env, dbs = _open_env(self.path, lock=True)  # may be written right now: take a reader slot
        try:
            with env.begin(buffers=buffers) as txn:
                yield (txn, *dbs)
        finally:
            env.close()

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


_HANDLES: dict[str, _Handle] = {}  # by path, and by file identity (LMDB allows one open per file)
_HANDLES_LOCK = threading.Lock()


def _signature(path: str) -> tuple:
    try:
        st = os.stat(os.path.join(path, "data.mdb"))
    except OSError:
        return ()
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def _handle(path: str, refresh: bool = False) -> _Handle:
    """This process's handle on a shard. refresh: catch up if the file changed since it was read."""
    h = _HANDLES.get(path)
    if h is None:
        with _HANDLES_LOCK:
            ident = _signature(path)[:2]
            h = _HANDLES.get(path) or _HANDLES.get(ident)  # a moved or linked folder: same files
            if h is None:
                h = _Handle(path)
            h.path = path
            _HANDLES[path] = _HANDLES[ident] = h
    elif refresh and h.signature != _signature(path):
        with _HANDLES_LOCK:
            sig = _signature(path)
            if sig[:2] != h.signature[:2]:  # deleted and written anew: other files, a new environment
                h = _HANDLES.get(sig[:2]) or _Handle(path)  # (the old one stays open for its views)
                h.path = path
                _HANDLES[path] = _HANDLES[sig[:2]] = h
            else:
                h.reload()
    return h


def open_for_reading_here(path: str) -> bool:
    """Whether this process holds the shard's environment open (LMDB allows one per file)."""
    h = _HANDLES.get(_signature(os.path.abspath(path))[:2])
    return h is not None and h.env is not None


class ShardReader(Sequence):
    """Random access to one shard by integer index (insertion order) or by image id.

    verify: check every record's checksum as it is read (default). XXH3 runs at memory speed, so this
            costs about what one copy of the record would; see bench/README.md.
    copy:   return arrays that own writable memory instead of read-only views of the map.
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True, copy: bool = False):
        self.path = os.path.abspath(os.fspath(path))
        self.verify, self.copy = verify, copy
        h = _handle(self.path, refresh=True)  # fail early on a bad path
        if not h.complete:
            warnings.warn(f"{self.path}: shard is incomplete (its writer did not finish); reading the "
                          f"{h.count} committed records", stacklevel=2)

    def _handle(self) -> _Handle:
        return _handle(self.path)  # opened lazily in each process (a spawned worker unpickles a path)

    @property
    def meta(self) -> dict:
        return self._handle().meta

    @property
    def state(self) -> dict:
        return self._handle().state

    def __len__(self) -> int:
        return self._handle().count

    def key_at(self, index: int) -> bytes:
        h = self._handle()
        if index < 0:
            index += h.count
        if not 0 <= index < h.count:
            raise IndexError(f"{self.path}: index {index} out of range for {h.count} records")
        key = h.get(order_key(index), 1)
        if key is None:
            raise ShardError(f"{self.path}: order table has no entry {index}; the shard is damaged")
        return bytes(key)

    def __getitem__(self, index: int) -> Record:
        try:
            index = operator.index(index)  # ints, numpy ints, 0-d tensors
        except TypeError:
            raise TypeError(f"ShardReader index must be an integer, got {type(index).__name__}; use .get(id)") from None
        return self._read(self.key_at(index))

    def get(self, image_id: str) -> Record:
        return self._read(encode_key(image_id))

    def __contains__(self, image_id) -> bool:
        h = self._handle()
        return isinstance(image_id, str) and h.get(encode_key(image_id), 0) is not None

    def keys(self) -> Iterator[str]:
        """Image ids in insertion order."""
        h = self._handle()
        with h.snapshot(buffers=False) as (txn, _, order, _):
            for _, key in txn.cursor(db=order):
                yield key.decode("utf-8")

    def raw(self, key: bytes):
        """The stored bytes of one record (a memoryview of the map, or bytes), or None."""
        return self._handle().get(key, 0)

    def _read(self, key: bytes) -> Record:
        h = self._handle()
        value = h.get(key, 0)
        if value is None:
            raise KeyError(f"{self.path}: no record {key.decode('utf-8', 'replace')!r}")
        try:
            rec = decode_record(key, value, self.verify, None, h.expect)
        except CorruptRecordError as e:
            raise e.at(self.path) from None
        return rec.copy() if self.copy else rec


def find_shards(folder: str) -> list[str]:
    """Every shard (a folder holding data.mdb) under folder, sorted by path."""
    out = []
    for root, dirs, files in os.walk(folder):
        if "data.mdb" in files:
            out.append(root)
            dirs.clear()
        dirs.sort()
    return sorted(out)


def resolve_sources(source) -> tuple[list[str], list[int] | None]:
    """Shard paths (and known counts) from a shard, a folder of shards, an index file, or a list."""
    if isinstance(source, (list, tuple)):
        paths, counts = [], []
        for s in source:
            p, c = resolve_sources(s)
            paths += p
            counts = None if (counts is None or c is None) else counts + c
        return paths, counts
    source = os.fspath(source)
    if os.path.isfile(source):
        from .index import load_index

        index = load_index(source)
        return [s["path"] for s in index["shards"]], [s["count"] for s in index["shards"]]
    if os.path.isfile(os.path.join(source, "data.mdb")):
        return [source], None
    if os.path.isdir(source):
        paths = find_shards(source)
        if not paths:
            raise ShardError(f"{source}: no shards found (folders holding data.mdb)")
        return paths, None
    raise ShardError(f"{source}: no such shard, folder or index file")


class ShardSet(Sequence):
    """Many shards read as one sequence: `len`, integer indexing, `.get(id)`, `.keys()`.

    source: a shard folder, a folder of shards, an index JSON (from `regionbert-shards index`), or a
    list of these. Shards must agree in settings (feature dim, classes, extractor) unless
    check_settings=False. Per-shard counts are kept (a few bytes per shard), nothing per record.
    """

    def __init__(self, source, verify: bool = True, copy: bool = False, check_settings: bool = True):
        paths, counts = resolve_sources(source)
        if not paths:
            raise ShardError(f"{source}: no shards")
        self.shards = [ShardReader(p, verify=verify, copy=copy) for p in paths]
        actual = [len(s) for s in self.shards]
        if counts is not None and counts != actual:
            bad = [s.path for s, a, b in zip(self.shards, actual, counts, strict=True) if a != b]
            raise ShardError(f"shards changed since they were indexed (record counts differ): {bad}")
        if check_settings:
            first = self.shards[0]
            for s in self.shards[1:]:
                diff = settings_diff(first.meta, s.meta)
                if diff:
                    raise ShardMismatchError(f"{s.path} differs from {first.path} in {', '.join(diff)}")
        self.offsets = [0]
        for n in actual:
            self.offsets.append(self.offsets[-1] + n)

    @property
    def meta(self) -> dict:
        return self.shards[0].meta

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[ShardReader, int]:
        index = operator.index(index)
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} records")
        i = bisect.bisect_right(self.offsets, index) - 1
        return self.shards[i], index - self.offsets[i]

    def __getitem__(self, index: int) -> Record:
        shard, local = self.locate(index)
        return shard[local]

    def get(self, image_id: str) -> Record:
        for s in self.shards:
            if image_id in s:
                return s.get(image_id)
        raise KeyError(f"no record {image_id!r} in {len(self.shards)} shards")

    def __contains__(self, image_id) -> bool:
        return any(image_id in s for s in self.shards)

    def keys(self) -> Iterator[str]:
        for s in self.shards:
            yield from s.keys()
