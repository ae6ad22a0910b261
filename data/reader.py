"""ShardReader (one shard) and ShardSet (many shards as one sequence): lazy, read-only, fork-safe.

How a shard is opened is handles.py: a complete shard once per process, without LMDB's lock file (so it
reads from a read-only mount, as any user who may read its files), and records decode into zero-copy
numpy views of LMDB's memory map. Memory is the map's page cache, not Python objects: it stays flat
however many records are read. An incomplete shard (its writer crashed, or is still running) is opened
with locking for each read and its records are copied out: slower, but correct while a writer runs.
"""

from __future__ import annotations

import bisect
import operator
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import lmdb
import numpy as np
import xxhash

from .errors import CorruptRecordError, ShardError, ShardMismatchError
from .format import (
    _HEADER,
    _U64,
    CHECKSUM_SIZE,
    FEATURE_DTYPES,
    HEADER_SIZE,
    MAGIC,
    MAX_KEY_BYTES,
    RECORD_VERSION,
    Record,
    _record_end,
    box_table_chunks,
    content_hash_of,
    declares_box_table,
    decode_box_table,
    decode_record,
    encode_key,
    header_counts,
    min_box_bytes,
    order_key,
    settings_diff,
)
from .handles import Handle, get_handle, open_for_reading_here
from .indexfile import load_index
from .pagescan import counts_in_order

_handle = get_handle  # the name other modules and benchmarks use
__all__ = ["ShardReader", "ShardSet", "find_shards", "open_for_reading_here", "resolve_sources"]


class ShardReader(Sequence):
    """Random access to one shard by integer index (insertion order) or by image id.

    verify: check every record's checksum as it is read (default). XXH3 runs at memory speed, so this
            costs about what one copy of the record would; see bench/README.md.
    copy:   return arrays that own writable memory instead of read-only views of the map.
    """

    def __init__(self, path: str | os.PathLike, verify: bool = True, copy: bool = False):
        self.path = os.path.abspath(os.fspath(path))
        self.verify, self.copy = verify, copy
        self._box_counts = None  # set by box_counts(): then every record read by position is compared with it
        with _lmdb_errors(self.path, "its metadata"):
            h = _handle(self.path, refresh=True)  # fail early on a bad path
        if not h.complete:
            unlocked = " without LMDB's lock (none can be taken here: safe only while no writer runs)"
            warnings.warn(f"{self.path}: shard is incomplete (its writer did not finish); reading the "
                          f"{h.count} committed records{unlocked if h.lockless else ''}", stacklevel=2)

    def _handle(self) -> Handle:
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
        with _lmdb_errors(self.path, f"order entry {index}"):
            key = h.get(order_key(index), 1)
        if key is None:
            raise ShardError(f"{self.path}: order table has no entry {index}; the shard is damaged")
        if not 0 < len(key) <= MAX_KEY_BYTES:
            raise ShardError(f"{self.path}: order table entry {index} is {len(key)} bytes, not an id; the shard is "
                             "damaged")
        return bytes(key)

    def __getitem__(self, index: int) -> Record:
        try:
            index = operator.index(index)  # ints, numpy ints, 0-d tensors
        except TypeError:
            raise TypeError(f"ShardReader index must be an integer, got {type(index).__name__}; use .get(id)") from None
        key = self.key_at(index)
        try:
            rec = self._read(key)
        except KeyError:
            raise ShardError(f"{self.path}: order table entry {index} names {_show(key)}, which has no record; "
                             "the shard is damaged") from None
        counts = self._box_counts
        if counts is not None and rec.num_boxes != counts[index]:  # (a negative index was made positive above)
            self._table_disagrees(index if index >= 0 else index + len(counts), rec)
        return rec

    def read_into(self, index: int, features: np.ndarray, locations: np.ndarray,
                  class_probs: np.ndarray | None = None, loc: str = "loc7") -> tuple[int, str]:
        """Record `index` copied straight into the caller's arrays, with no Record and no views made: its first
        k = min(N, len(features)) rows of features into features[:k], of locations (`loc`: "loc7" or "loc5")
        into locations[:k] and of class probabilities into class_probs[:k] (zeros for a shard that stores
        none). Returns (N, the record's id). A trainer's loader copies every record it reads into its batch
        anyway; building a Record of seven views for it cost ~4 us of the ~18 a read takes (issue 23).

        Checked as self[index] is, with the same errors: the order table's entry, the record's header, its
        length, the shard's (D, C, A, dtype), the checksum (when this reader verifies, the default: every
        read, never skipped) and the box-count table. Only a record that passes them all is copied from
        here; any other goes through decode_record, which raises its own error naming the record (or, for
        a record the checks here are stricter on than decode_record, returns it and it is copied from the
        Record): one place says what a well-formed record is and how a bad one is reported."""
        if loc not in ("loc7", "loc5"):
            raise ValueError(f"loc must be 'loc7' or 'loc5', not {loc!r}")
        index = operator.index(index)
        h = self._handle()
        try:  # key_at's lookup without its context manager (a microsecond a read); errors as key_at gives them
            key = h.get(order_key(index), 1) if 0 <= index < h.count else None
            key = bytes(key) if key is not None and 0 < len(key) <= MAX_KEY_BYTES else None
            value = None if key is None else h.get(key, 0)
        except lmdb.Error:
            key = value = None
        if value is None:
            key = self.key_at(index)  # raises its error for a bad index or order entry
            value = self.raw(key)  # raises the ShardError of a damaged page
        if value is None:
            raise ShardError(f"{self.path}: order table entry {index} names {_show(key)}, which has no record; "
                             "the shard is damaged")
        mv = memoryview(value)
        layout = _fast_layout(key, mv, self.verify, h.expect)
        rec = None
        if layout is None:  # a record the fast checks refuse: decode_record's error (or its Record)
            rec = self._read(key)
            n = rec.num_boxes
        else:
            n = layout[0]
        counts = self._box_counts
        if counts is not None and n != counts[index]:  # (a negative index counts from the end, as in key_at)
            self._table_disagrees(index if index >= 0 else index + len(counts),
                                  rec if rec is not None else self._read(key))
        k = min(n, len(features))
        if rec is not None:
            features[:k] = rec.features[:k]
            locations[:k] = (rec.loc7 if loc == "loc7" else rec.loc5)[:k]
            if class_probs is not None:
                class_probs[:k] = 0 if rec.class_probs is None else rec.class_probs[:k]
            return n, rec.id
        _, d, c, sections = layout  # ((name, offset, dtype, shape) per array: boxes, loc5, loc7, features, ...)
        features[:k] = np.ndarray((k, d), sections[3][2], mv, sections[3][1])
        _, off, dt, (_, width) = sections[2 if loc == "loc7" else 1]
        locations[:k] = np.ndarray((k, width), dt, mv, off)
        if class_probs is not None:
            if c:
                class_probs[:k] = np.ndarray((k, c), sections[4][2], mv, sections[4][1])
            else:
                class_probs[:k] = 0
        return n, key.decode("utf-8", "replace")

    def box_counts(self) -> np.ndarray:
        """The number of boxes of every record, in order (uint32, len(self)), without reading features.

        Format 1.1 shards: from the box-count table the writer keeps in `meta` (one read transaction, a few
        KB per 4096 records). The table is not trusted blindly: its length must be the shard's record count
        and its total must fit in data.mdb (each box takes at least its location rows and its feature row),
        so a forged table cannot make a trainer allocate or pad for boxes that do not exist; and from then on
        every record this reader returns by position is compared with it (the header's N, which the record's
        checksum covers): a table that lies about a record is a ShardError when that record is read.
        `regionbert-shards verify` compares the whole table with every record.

        Format 1.0 shards (written before the table): from each record's 48-byte header, with one warning
        naming the shard. The header's length must agree with the record's, as decode_record requires; nothing
        else is read or decoded, and no checksum computed. For a complete shard the headers are read from
        data.mdb's pages directly (data/pagescan.py: one page per record, in file order), since py-lmdb faults
        in every page of a value it returns; a shard being written is read through LMDB. The table is the
        lasting fix: `regionbert-shards copy` adds it, as does a writer resuming or appending."""
        if self._box_counts is None:
            self._box_counts = self._load_box_counts()
        return self._box_counts

    def _load_box_counts(self) -> np.ndarray:
        h = self._handle()
        n = len(self)
        with _lmdb_errors(self.path, "the box-count table"), h.snapshot() as (txn, records, order, meta_db):
            have = txn.stat(order)["entries"]  # this snapshot's count (an incomplete shard may have grown)
            chunks = box_table_chunks(self.path, txn, meta_db, have)
            if have < n:
                raise ShardError(f"{self.path}: the order table shrank from {n} to {have} entries while open; "
                                 "the shard was replaced")
            if chunks:
                counts = decode_box_table(self.path, chunks, have)[:n]
            elif n and declares_box_table(h.meta):
                raise ShardError(f"{self.path}: the shard declares a box-count table (schema_minor "
                                 f"{h.meta['schema_minor']}) but stores none; it is damaged (`regionbert-shards "
                                 "verify`): restore it from its source")
            elif n:
                _warn_no_table(self.path, n)
                counts = self._headers(h, txn, records, order, n)
            else:
                counts = np.zeros(0, dtype=np.uint32)
        self._check_fits(counts)
        counts.flags.writeable = False  # shared by everyone who asks (and by forked workers)
        return counts

    def _headers(self, h, txn, records, order, n: int) -> np.ndarray:
        """A format 1.0 shard's counts from its records' headers. A complete shard (immutable): its pages read
        directly, one per record (data/pagescan.py; py-lmdb would read every record whole). One being
        written: through LMDB, in this snapshot."""
        counts = counts_in_order(self.path, txn, order, n) if h.env is not None else None
        return header_counts(self.path, txn, records, order, n) if counts is None else counts

    def _check_fits(self, counts: np.ndarray) -> None:
        """The boxes the table claims fit in data.mdb: sum(counts) * (fewest bytes a box takes) <= its size."""
        total = int(counts.sum(dtype=np.uint64))
        per_box = min_box_bytes(self.meta)
        size = os.stat(os.path.join(self.path, "data.mdb"), follow_symlinks=False).st_size
        if total * per_box > size:
            i = int(np.argmax(counts))
            raise ShardError(f"{self.path}: box-count table claims {total} boxes (up to {int(counts[i])} in record "
                             f"{i}), at least {total * per_box} bytes of {per_box} per box, but data.mdb is {size} "
                             "bytes; the table is damaged or forged (`regionbert-shards verify`)")

    def _table_disagrees(self, index: int, rec: Record) -> None:
        raise ShardError(f"{self.path}: record {rec.id!r} (position {index}) has {rec.num_boxes} boxes, but the "
                         f"shard's box-count table says {int(self._box_counts[index])}; the table is damaged or "
                         "forged (`regionbert-shards verify`): restore the shard from its source")

    def get(self, image_id: str) -> Record:
        return self._read(encode_key(image_id))

    def __contains__(self, image_id) -> bool:
        h = self._handle()
        try:
            key = encode_key(image_id)
        except ShardError:  # not a str, empty, NUL, not encodable: no shard holds it
            return False
        with _lmdb_errors(self.path, f"record {_show(key)}"):
            return h.get(key, 0) is not None

    def keys(self) -> Iterator[str]:
        """Image ids in insertion order."""
        h = self._handle()
        i = 0
        with _lmdb_errors(self.path, "the order table", lambda: f" (after entry {i})"), \
                h.snapshot(buffers=False) as (txn, _, order, _):
            for i, (_, key) in enumerate(txn.cursor(db=order)):
                try:
                    text = key.decode("utf-8")
                except UnicodeDecodeError:
                    raise ShardError(f"{self.path}: order table entry {i}: id {_show(key)} is not valid UTF-8; "
                                     "the shard is damaged") from None
                yield text

    def raw(self, key: bytes):
        """The stored bytes of one record (a memoryview of the map, or bytes), or None."""
        with _lmdb_errors(self.path, f"record {_show(key)}"):
            return self._handle().get(key, 0)

    def _read(self, key: bytes) -> Record:
        h = self._handle()
        with _lmdb_errors(self.path, f"record {_show(key)}"):
            value = h.get(key, 0)
        if value is None:
            raise KeyError(f"{self.path}: no record {_show(key)}")
        try:
            rec = decode_record(key, value, self.verify, None, h.expect)
        except CorruptRecordError as e:
            raise e.at(self.path) from None
        return rec.copy() if self.copy else rec


def _fast_layout(key: bytes, mv: memoryview, verify: bool, expect) -> tuple | None:
    """(N, D, C, array sections) of a record value that decode_record would accept, its checksum verified
    (if verify); None for anything else, which the caller hands to decode_record for its error. The same
    header checks as decode_record, in one expression: a record these accept is one it accepts."""
    size = mv.nbytes
    if size < HEADER_SIZE + CHECKSUM_SIZE:
        return None
    magic, version, header_size, width, height, n, d, c, a, fcode, _, _, extra_len, _ = _HEADER.unpack_from(mv, 0)
    if magic != MAGIC or version != RECORD_VERSION or header_size != HEADER_SIZE or fcode not in FEATURE_DTYPES \
            or not width or not height or expect is None or (d, c, a, fcode) != expect:
        return None
    sections, _, end = _record_end(n, d, c, a, fcode, extra_len)
    if end + CHECKSUM_SIZE != size:
        return None
    if verify and _U64.unpack_from(mv, end)[0] != xxhash.xxh3_64_intdigest(mv[:end],
                                                                            seed=xxhash.xxh3_64_intdigest(key)):
        return None
    return n, d, c, sections


_WARNED: set = set()  # shards whose missing box-count table was reported in this process


def _warn_no_table(path: str, n: int) -> None:
    if path in _WARNED:
        return
    _WARNED.add(path)
    warnings.warn(f"{path}: shard has no box-count table (written before format 1.1); counting the boxes of its "
                  f"{n} records from their headers (a page of each). `regionbert-shards copy` writes a copy with "
                  "the table, read in milliseconds",
                  stacklevel=4)


@contextmanager
def _lmdb_errors(path: str, what: str, where=None):
    """An lmdb.Error raised inside (a damaged page that data/lmdbcheck.py's walk at open could not see: the
    file changed since, or LMDB minds something the walk does not check) as a ShardError naming the shard
    and what was read, so that a long run stops saying which shard to restore, not with LMDB's bare words.
    where(): more about the place, computed only if it fails."""
    try:
        yield
    except lmdb.Error as e:
        raise ShardError(f"{path}: reading {what}{where() if where else ''} failed: data.mdb is damaged (LMDB: "
                         f"{type(e).__name__}: {e}); `regionbert-shards verify` names what is wrong; restore the "
                         "shard from its source") from None


def _show(key: bytes) -> str:
    """An id for a message: its text, or its bytes where they are not UTF-8."""
    try:
        return repr(key.decode("utf-8"))
    except UnicodeDecodeError:
        return repr(key)


def find_shards(folder: str) -> list[str]:
    """Every shard (a folder holding data.mdb) under folder, sorted by path."""
    out = []
    for root, dirs, files in os.walk(folder):
        if "data.mdb" in files:
            out.append(root)
            dirs.clear()
        dirs.sort()
    return sorted(out)


def resolve_sources(source, allow_outside: bool = False) -> tuple[list[str], list[dict | None]]:
    """Shard paths from a shard, a folder of shards, an index file, or a list of these; and for each, its
    index entry (count, content hash) when it came from an index, else None.

    allow_outside: accept index entries that lead outside the index's folder (indexfile.py)."""
    if isinstance(source, (list, tuple)):
        paths, entries = [], []
        for s in source:
            p, e = resolve_sources(s, allow_outside)
            paths += p
            entries += e
        return paths, entries
    source = os.fspath(source)
    if os.path.isfile(source):
        shards = load_index(source, allow_outside=allow_outside)["shards"]
        return [s["path"] for s in shards], [{**s, "index": source} for s in shards]
    if os.path.isfile(os.path.join(source, "data.mdb")):
        return [source], [None]
    if os.path.isdir(source):
        paths = find_shards(source)
        if not paths:
            raise ShardError(f"{source}: no shards found (folders holding data.mdb)")
        return paths, [None] * len(paths)
    raise ShardError(f"{source}: no such shard, folder or index file")


def check_against_index(shard: ShardReader, entry: dict) -> None:
    """The shard is the one its index entry describes: same record count and content hash. Cheap: the
    hash is the one the writer stored in the shard's state (computed once here for shards without)."""
    h = shard._handle()
    where = f"{shard.path} (listed in {entry['index']})"
    if h.count != entry["count"]:
        raise ShardError(f"{where}: the shard has {h.count} records, the index says {entry['count']} (shards "
                         "changed since they were indexed); rebuild the index or restore the shard")
    stored = h.state.get("content_hash")
    if stored is None:  # written before shards stored their hash, or by another implementation
        with _lmdb_errors(shard.path, "the order table for its content hash"), h.snapshot() as (txn, records, order, _):
            stored = content_hash_of(txn, records, order, h.meta, shard.path)
    if stored != entry["content_hash"]:
        raise ShardError(f"{where}: shard was replaced since it was indexed: content hash {stored}, the index "
                         f"says {entry['content_hash']}; rebuild the index or restore the shard")


class ShardSet(Sequence):
    """Many shards read as one sequence: `len`, integer indexing, `.get(id)`, `.keys()`.

    source: a shard folder, a folder of shards, an index JSON (from `regionbert-shards index`), or a
    list of these. Shards must agree in settings (feature dim, classes, extractor) unless
    check_settings=False. Shards from an index must match their entry (record count and stored content
    hash), and an index may name only shards inside its folder unless allow_outside=True. Per-shard
    counts are kept (a few bytes per shard), nothing per record.
    """

    def __init__(self, source, verify: bool = True, copy: bool = False, check_settings: bool = True,
                 allow_outside: bool = False):
        paths, entries = resolve_sources(source, allow_outside)
        if not paths:
            raise ShardError(f"{source}: no shards")
        self.shards = [ShardReader(p, verify=verify, copy=copy) for p in paths]
        for shard, entry in zip(self.shards, entries, strict=True):
            if entry is not None:
                check_against_index(shard, entry)
        actual = [len(s) for s in self.shards]
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

    def read_into(self, index: int, features: np.ndarray, locations: np.ndarray,
                  class_probs: np.ndarray | None = None, loc: str = "loc7") -> tuple[int, str]:
        """Record `index` of the set copied into the caller's arrays: ShardReader.read_into."""
        shard, local = self.locate(index)
        return shard.read_into(local, features, locations, class_probs, loc)

    def get(self, image_id: str) -> Record:
        for s in self.shards:
            if image_id in s:
                return s.get(image_id)
        raise KeyError(f"no record {image_id!r} in {len(self.shards)} shards")

    def box_counts(self) -> np.ndarray:
        """The number of boxes of every record of the set, in order (uint32, len(self)): each shard's
        ShardReader.box_counts(), one read transaction per shard (format 1.1: the table only)."""
        out = np.empty(len(self), dtype=np.uint32)
        for s, start, end in zip(self.shards, self.offsets, self.offsets[1:], strict=False):
            counts = s.box_counts()
            if len(counts) != end - start:
                raise ShardError(f"{s.path}: {len(counts)} box counts for {end - start} records; the shard "
                                 "changed since it was opened")
            out[start:end] = counts
        return out

    def __contains__(self, image_id) -> bool:
        return any(image_id in s for s in self.shards)

    def keys(self) -> Iterator[str]:
        for s in self.shards:
            yield from s.keys()
