"""ShardReader (one shard) and ShardSet (many shards as one sequence): lazy, read-only, fork-safe.

Each process opens its own LMDB environment on first use (never one inherited across fork), so
readers can be handed to DataLoader workers under fork or spawn. Records decode into zero-copy numpy
views of LMDB's memory map; environments stay open for the life of the process so those views never
dangle. Memory is the map's page cache, not Python objects: it stays flat however many records.
"""

from __future__ import annotations

import bisect
import json
import os
import threading
import warnings
from collections.abc import Iterator, Sequence

import lmdb

from .errors import CorruptRecordError, ShardError, ShardMismatchError
from .format import Record, decode_meta, decode_record, encode_key
from .writer import DB_META, DB_ORDER, DB_RECORDS, META_SHARD, META_STATE, order_key, settings_diff


class _Handle:
    """One process's open environment on one shard, with a read transaction per thread.

    The environment is never closed (py-lmdb allows one per file per process, and closing it would
    unmap memory that handed-out views still point into); `reload` moves it to the newest snapshot."""

    def __init__(self, path: str):
        if not os.path.isfile(os.path.join(path, "data.mdb")):
            raise ShardError(f"{path}: not a shard (no data.mdb in this folder)")
        self.path = path
        try:
            # Probe with locking on (safe while a writer is active); a complete shard is immutable, so
            # reopen it without locks: no reader-table slots, and read-only media work.
            self.env = self._open(path, lock=True)
        except lmdb.Error:
            self.env = self._open(path, lock=False)
        self.gen = 0
        self._local = threading.local()
        self.reload()
        if self.complete and self.env.flags()["lock"]:
            self.env.close()
            self.env = self._open(path, lock=False)
            self.reload()

    @staticmethod
    def _open(path: str, lock: bool):
        try:
            return lmdb.open(path, subdir=True, readonly=True, lock=lock, readahead=False, max_dbs=3,
                             max_readers=1024)
        except lmdb.Error as e:
            if not lock:
                raise ShardError(f"{path}: cannot open shard: {e}") from None
            raise

    def reload(self) -> None:
        """Re-read metadata and counts, and start new read transactions (the file has changed)."""
        self.signature = _signature(self.path)
        self.gen += 1
        try:
            self.records, self.order, meta_db = (self.env.open_db(n, create=False)
                                                 for n in (DB_RECORDS, DB_ORDER, DB_META))
        except lmdb.Error:
            raise ShardError(f"{self.path}: not a regionbert shard (no records/order/meta tables)") from None
        with self.begin(buffers=False) as txn:
            self.meta = decode_meta(self.path, txn.get(META_SHARD, db=meta_db))
            state = txn.get(META_STATE, db=meta_db)
            self.count = txn.stat(self.order)["entries"]
        try:
            self.state = json.loads(state) if state else {}
        except ValueError:
            raise ShardError(f"{self.path}: shard state is not valid JSON") from None
        self.complete = bool(self.state.get("complete"))

    def begin(self, buffers: bool = True):
        try:
            return self.env.begin(buffers=buffers)
        except lmdb.MapResizedError:  # a writer grew the map since we opened it
            self.env.set_mapsize(0)
            return self.env.begin(buffers=buffers)

    def txn(self):
        """This thread's long-lived read transaction: views it hands out stay valid."""
        local = self._local
        if getattr(local, "gen", None) != self.gen:
            if getattr(local, "txn", None) is not None:
                local.txn.abort()
            local.txn, local.gen = self.begin(), self.gen
        return local.txn


_HANDLES: dict[tuple[str, int], _Handle] = {}
_HANDLES_LOCK = threading.Lock()


def _signature(path: str) -> tuple:
    try:
        st = os.stat(os.path.join(path, "data.mdb"))
    except OSError:
        return ()
    return st.st_ino, st.st_size, st.st_mtime_ns


def _handle(path: str, refresh: bool = False) -> _Handle:
    """This process's handle on a shard. refresh: catch up if the file changed since it was read."""
    key = (path, os.getpid())
    h = _HANDLES.get(key)
    if h is None:
        with _HANDLES_LOCK:
            h = _HANDLES.get(key)
            if h is None:
                h = _HANDLES[key] = _Handle(path)
    elif refresh and h.signature != _signature(path):
        with _HANDLES_LOCK:
            h.reload()
    return h


def open_for_reading_here(path: str) -> bool:
    """Whether this process holds a read handle on the shard (LMDB allows one open per process)."""
    return (os.path.abspath(path), os.getpid()) in _HANDLES


class ShardReader(Sequence):
    """Random access to one shard by integer index (insertion order) or by image id.

    verify: check every record's checksum as it is read (default; costs ~2% of a read).
    copy:   return arrays that own writable memory instead of read-only views of the map.
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True, copy: bool = False):
        self.path = os.path.abspath(os.fspath(path))
        self.verify, self.copy = verify, copy
        h = self._h = _handle(self.path, refresh=True)  # fail early on a bad path
        self._pid = os.getpid()
        if not h.complete:
            warnings.warn(f"{self.path}: shard is incomplete (its writer did not finish); reading the "
                          f"{h.count} committed records", stacklevel=2)

    def __getstate__(self):
        return {"path": self.path, "verify": self.verify, "copy": self.copy}

    def __setstate__(self, state):
        self.__dict__.update(state, _h=None, _pid=None)  # reopened lazily in this process

    def _handle(self) -> _Handle:
        if self._pid != os.getpid():  # first use after unpickling or fork
            self._h, self._pid = _handle(self.path), os.getpid()
        return self._h

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
        key = h.txn().get(order_key(index), db=h.order)
        if key is None:
            raise ShardError(f"{self.path}: order table has no entry {index}; the shard is damaged")
        return bytes(key)

    def __getitem__(self, index: int) -> Record:
        if not isinstance(index, int):
            raise TypeError(f"ShardReader index must be int, got {type(index).__name__}; use .get(id)")
        return self._read(self.key_at(index))

    def get(self, image_id: str) -> Record:
        return self._read(encode_key(image_id))

    def __contains__(self, image_id) -> bool:
        h = self._handle()
        return isinstance(image_id, str) and h.txn().get(encode_key(image_id), db=h.records) is not None

    def keys(self) -> Iterator[str]:
        """Image ids in insertion order."""
        h = self._handle()
        with h.begin(buffers=False) as txn:
            for _, key in txn.cursor(db=h.order):
                yield key.decode("utf-8")

    def raw(self, key: bytes):
        """The stored bytes of one record (a memoryview of the map), or None."""
        h = self._handle()
        return h.txn().get(key, db=h.records)

    def _read(self, key: bytes) -> Record:
        h = self._handle()
        value = h.txn().get(key, db=h.records)
        if value is None:
            raise KeyError(f"{self.path}: no record {key.decode('utf-8', 'replace')!r}")
        try:
            rec = decode_record(key, value, verify=self.verify)
        except CorruptRecordError as e:
            raise e.at(self.path) from None
        meta = h.meta
        c = len(meta["class_names"]) if meta["class_names"] is not None else 0
        if rec.features.shape[1] != meta["feature_dim"] or (0 if rec.class_probs is None else
                                                            rec.class_probs.shape[1]) != c:
            raise CorruptRecordError(rec.id, f"dims (D={rec.features.shape[1]}, C={c}) disagree with the "
                                     "shard metadata", self.path)
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
