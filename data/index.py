"""Whole-shard operations: verify, content hash, summary, and the JSON index over many shards."""

from __future__ import annotations

import json
import os
import shutil
import struct
from array import array
from dataclasses import dataclass, field

import lmdb
import numpy as np

from .checks import box_table_problems, check_record
from .errors import CorruptRecordError, ShardError, ShardMismatchError
from .format import (
    DB_META,
    DB_ORDER,
    DB_RECORDS,
    META_SHARD,
    META_STATE,
    SCHEMA_MINOR,
    box_table_chunks,
    comparable_settings,
    content_hash_of,
    content_hasher,
    declares_box_table,
    decode_box_table,
    decode_record,
    decode_state,
    encode_box_table,
    encode_json,
    hash_entry,
    header_counts,
    now_iso,
    order_key,
    settings_diff,
    stored_checksum,
)
from .handles import get_handle as _handle
from .indexfile import INDEX_FORMAT, INDEX_VERSION, check_inside, load_index, shard_identity  # noqa: F401 - load_index: public API
from .lock import WriterLock, check_not_written
from .pagescan import counts_in_order
from .reader import ShardReader, resolve_sources


@dataclass
class VerifyReport:
    path: str
    count: int = 0
    checked: int = 0
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)
    problems: list[str] = field(default_factory=list)  # shard-level
    content_hash: str = ""

    @property
    def ok(self) -> bool:
        return not self.bad and not self.problems


def content_hash(path: str) -> str:
    """A hash of the shard's logical content (settings, then each key and record checksum in order).

    It ignores LMDB's page layout, so a compacting copy keeps it. It trusts the stored checksums;
    `verify` recomputes them. A complete shard also stores it in its state (the writer does, at close),
    which is what readers compare with an index."""
    h = _handle(os.path.abspath(path), refresh=True)
    with h.snapshot() as (txn, records, order, _):
        return content_hash_of(txn, records, order, h.meta, path)


def verify_shard(path: str, progress=None) -> VerifyReport:
    """Decode every record with its checksum, and check the shard's tables agree with each other."""
    path = os.path.abspath(path)
    report = VerifyReport(path)
    try:
        h = _handle(path, refresh=True)
    except ShardError as e:
        report.problems.append(str(e))
        return report
    report.count = h.count
    hasher = content_hasher(h.meta)
    with h.snapshot() as (txn, records, order, meta_db):
        headers = array("q")  # each position's box count as its record says, for the box-count table
        n_records = txn.stat(records)["entries"]
        if n_records != h.count:
            report.problems.append(f"{n_records} records but {h.count} entries in the order table")
        if h.state.get("count") != h.count:
            report.problems.append(f"state says {h.state.get('count')} records, order table has {h.count}")
        for i, (pos, key) in enumerate(txn.cursor(db=order)):
            key = bytes(key)
            name = key.decode("utf-8", "replace")
            if bytes(pos) != struct.pack(">Q", i):
                report.problems.append(f"order table entry {i} is out of sequence")
            report.checked += 1
            if progress:
                progress(1)
            headers.append(-1)
            if not key:
                report.bad.append((f"#{i}", "order table entry is empty"))
                continue
            value = txn.get(key, db=records)
            if value is None:
                report.bad.append((name, "listed in the order table but missing"))
                continue
            try:
                rec = decode_record(key, value, verify=True, expect=h.expect)
                headers[-1] = rec.num_boxes
                rec.extra  # noqa: B018 - parse it: verify checks every field
                report.bad += [(name, rule) for rule in check_record(rec, key)]  # data/checks.py
                hash_entry(hasher, key, stored_checksum(value))
            except CorruptRecordError as e:
                report.bad.append((name, e.reason))
        report.problems += box_table_problems(path, txn, meta_db, h.meta, np.frombuffer(headers, dtype=np.int64),
                                              lambda i: bytes(txn.get(order_key(i), db=order) or b"?"))
    if not h.complete:
        report.problems.append("incomplete: the writer did not finish (rerun the job to resume it)")
    report.content_hash = "xxh3_128:" + hasher.hexdigest()
    stored = h.state.get("content_hash")
    if stored is not None and not report.bad and stored != report.content_hash:
        report.problems.append(f"the state's stored content hash {stored} is not the records' (what readers "
                               "compare with an index); the shard was altered after its writer closed it")
    return report


def summarize(path: str) -> dict:
    """What `inspect` shows: settings, counts and a histogram of boxes per image.

    The histogram comes from the shard's box-count table (ShardReader.box_counts: one read of `meta`, no
    record touched; a format 1.0 shard: each record's header, with its warning), not from reading every
    record, which brought the whole shard's features in from disk to count boxes (issue 24)."""
    reader = ShardReader(path)
    h = reader._handle()
    values, counts = np.unique(reader.box_counts(), return_counts=True)
    boxes = dict(zip(values.tolist(), counts.tolist(), strict=True))
    meta = reader.meta
    return {
        "path": reader.path,
        "count": len(reader),
        "complete": h.complete,
        "updated": h.state.get("updated"),
        "bytes_on_disk": os.path.getsize(os.path.join(reader.path, "data.mdb")),
        "boxes_per_image": boxes,  # (np.unique: sorted by box count)
        **meta,
    }


def compact_copy(src: str, dst: str) -> str:
    """Publish a complete shard: a compacting copy (free pages dropped, pages in order) to dst, checked
    by content hash. Written to dst + '.partial' and renamed, so dst is whole or absent. The copy holds
    dst's writer lock (a second copy to the same place is refused), refuses a source that is being
    written, and carries the content hash in its state (stored there if the source predates that)."""
    src = os.path.abspath(src)
    check_not_written(src)
    h = _handle(src, refresh=True)
    if not h.complete or h.env is None:
        raise ShardError(f"{src}: shard is incomplete (its writer did not finish); finish it before publishing")
    with WriterLock(dst, inside=False):  # dst does not exist yet: the lock next to it, which writers take too
        if os.path.exists(dst):
            raise ShardError(f"{dst}: already exists; copy to a new path")
        tmp = dst.rstrip("/") + ".partial"
        if os.path.exists(tmp):
            shutil.rmtree(tmp)
        os.makedirs(tmp)
        # into a file made here (O_EXCL: never through a link); the source environment is opened through
        # pinned names (handles.py), so LMDB's copy-by-path would not know the folder layout
        fd = os.open(os.path.join(tmp, "data.mdb"), os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        try:
            h.env.copyfd(fd, compact=True)
            os.fsync(fd)
        except (lmdb.Error, OSError) as e:  # a full disk: say which file, not "damaged" (the source is fine)
            shutil.rmtree(tmp, ignore_errors=True)
            raise ShardError(f"{dst}: cannot write the copy ({os.path.join(tmp, 'data.mdb')}: {e}); "
                             "the source is untouched and the partial copy removed") from None
        finally:
            os.close(fd)
        try:
            expected, got = content_hash(src), _copy_hash(tmp, h.meta, src)
        except ShardError:  # (a forged box-count table): nothing half-published left behind
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if got != expected:
            raise ShardError(f"{tmp}: copy's content hash {got} differs from the source's {expected}")
        os.replace(tmp, dst)
    return got


def _copy_box_table(txn, records, order, meta_db, meta: dict, path: str, src: str) -> None:
    """The copy's box-count table, checked against its records' headers (a page of each): a table
    that does not match is not published (ShardError naming the source); a format 1.0 shard's copy gets the
    table and schema_minor 1."""
    count = txn.stat(order)["entries"]
    headers = counts_in_order(path, txn, order, count)  # a page per record (py-lmdb would read them whole)
    if headers is None:
        headers = header_counts(path, txn, records, order, count)
    chunks = box_table_chunks(path, txn, meta_db, count)
    if chunks or declares_box_table(meta):
        table = decode_box_table(src, chunks, count) if chunks or count else headers
        wrong = np.flatnonzero(table != headers)
        if len(wrong):
            raise ShardError(f"{src}: box-count table says {int(table[wrong[0]])} boxes at position {int(wrong[0])}, "
                             f"the record holds {int(headers[wrong[0]])} ({len(wrong)} position(s) wrong); the table "
                             "is damaged or forged (`regionbert-shards verify`): not published")
        return
    for key, value in encode_box_table(headers):
        txn.put(key, value, db=meta_db)
    txn.put(META_SHARD, encode_json({**meta, "schema_minor": SCHEMA_MINOR}), db=meta_db)


def _copy_hash(path: str, meta: dict, src: str) -> str:
    """The content hash of a fresh copy (not yet read by anyone, so opened here for writing without LMDB's
    lock file), stored into its state if missing there. A copy of a format 1.0 shard gets the box-count table
    (docs/shard-format.md section 1), from its records' headers, and schema_minor 1: publishing is the
    upgrade (the content hash does not change)."""
    env = lmdb.open(path, subdir=True, max_dbs=3, lock=False)
    try:
        records, order, meta_db = (env.open_db(n, create=False) for n in (DB_RECORDS, DB_ORDER, DB_META))
        with env.begin(write=True, buffers=True) as txn:  # buffers: the hash reads 8 bytes a record, no copies
            digest = content_hash_of(txn, records, order, meta, path)
            state = decode_state(path, txn.get(META_STATE, db=meta_db))
            if state.get("content_hash") != digest:
                txn.put(META_STATE, encode_json({**state, "content_hash": digest}), db=meta_db)
            _copy_box_table(txn, records, order, meta_db, meta, path, src)
        env.sync(True)
    finally:
        env.close()
    return digest


# ---- the index: one JSON file over many shards -----------------------------------------------------


def build_index(sources, out_path: str, force: bool = False, progress=None, allow_outside: bool = False) -> dict:
    """Write a JSON index over shards; refuse shards whose settings differ, or that are incomplete,
    unless force. Shard paths are stored relative to the index file, so a folder moves as a whole; they
    must lie inside the index's folder (readers refuse anything else) unless allow_outside."""
    paths, _ = resolve_sources(sources, allow_outside)
    if not paths:
        raise ShardError(f"{sources}: no shards")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    entries, first, seen = [], None, {}
    for p in paths:
        p = os.path.abspath(p)
        ident = shard_identity(p)  # a shard given twice (a name and a symlink to it) would be read twice
        if ident in seen:
            raise ShardError(f"{p}: the same shard as {seen[ident]}; list each shard once")
        seen[ident] = p
        h = _handle(p, refresh=True)
        if first is None:
            first = h.meta
        diff = settings_diff(first, h.meta)
        if diff and not force:
            raise ShardMismatchError(f"{p}: settings differ from {paths[0]} in {', '.join(diff)} "
                                     "(use --force to index them together anyway)")
        if not h.complete and not force:
            raise ShardError(f"{p}: shard is incomplete (its writer did not finish); finish the job or "
                             "use --force")
        rel = os.path.relpath(p, out_dir)
        check_inside(out_dir, rel, f"{out_path}: shard {p}", allow_outside)
        entries.append({
            "path": rel,
            "count": h.count,
            "complete": h.complete,
            "content_hash": content_hash(p),
            "bytes": os.path.getsize(os.path.join(p, "data.mdb")),
            "job": (h.meta.get("extractor") or {}).get("job"),
            **({"settings_differ": diff} if diff else {}),
        })
        if progress:
            progress(1)
    index = {
        "format": INDEX_FORMAT,
        "version": INDEX_VERSION,
        "created": now_iso(),
        "total": sum(e["count"] for e in entries),
        "settings": comparable_settings(first),
        "shards": entries,
    }
    tmp = out_path + ".tmp"
    try:
        with open(tmp, "w") as f:
            json.dump(index, f, indent=1)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:  # a full disk: name the index being written, leave no half-written .tmp
        if os.path.isfile(tmp):
            os.remove(tmp)
        raise ShardError(f"{out_path}: cannot write the index ({e.strerror or e})") from None
    os.replace(tmp, out_path)  # never a half-written index
    return index
