"""Whole-shard operations: verify, content hash, summary, and the JSON index over many shards."""

from __future__ import annotations

import json
import os
import struct
from collections import Counter
from dataclasses import dataclass, field

import xxhash

from .checks import check_record
from .errors import CorruptRecordError, ShardError, ShardMismatchError
from .format import decode_record, peek_num_boxes, stored_checksum
from .reader import ShardReader, _handle, resolve_sources
from .writer import comparable_settings, now_iso, settings_diff

INDEX_FORMAT = "regionbert-index"
INDEX_VERSION = 1


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


def _hasher(meta: dict):
    h = xxhash.xxh3_128()
    h.update(json.dumps(comparable_settings(meta), sort_keys=True).encode())
    return h


def _hash_entry(h, key: bytes, checksum: int) -> None:
    h.update(struct.pack("<I", len(key)) + key + struct.pack("<Q", checksum))


def content_hash(path: str) -> str:
    """A hash of the shard's logical content (settings, then each key and record checksum in order).

    It ignores LMDB's page layout, so a compacting copy keeps it. It trusts the stored checksums;
    `verify` recomputes them."""
    h = _handle(os.path.abspath(path), refresh=True)
    hasher = _hasher(h.meta)
    with h.snapshot() as (txn, records, order, _):
        for _, key in txn.cursor(db=order):
            key = bytes(key)
            value = txn.get(key, db=records)
            if value is None:
                raise ShardError(f"{path}: order table names {key!r}, which has no record")
            _hash_entry(hasher, key, stored_checksum(value))
    return "xxh3_128:" + hasher.hexdigest()


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
    hasher = _hasher(h.meta)
    with h.snapshot() as (txn, records, order, _):
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
            value = txn.get(key, db=records)
            report.checked += 1
            if progress:
                progress(1)
            if value is None:
                report.bad.append((name, "listed in the order table but missing"))
                continue
            try:
                rec = decode_record(key, value, verify=True, expect=h.expect)
                rec.extra  # noqa: B018 - parse it: verify checks every field
                report.bad += [(name, rule) for rule in check_record(rec, key)]  # data/checks.py
                _hash_entry(hasher, key, stored_checksum(value))
            except CorruptRecordError as e:
                report.bad.append((name, e.reason))
    if not h.complete:
        report.problems.append("incomplete: the writer did not finish (rerun the job to resume it)")
    report.content_hash = "xxh3_128:" + hasher.hexdigest()
    return report


def summarize(path: str) -> dict:
    """What `inspect` shows: settings, counts and a histogram of boxes per image."""
    reader = ShardReader(path)
    h = reader._handle()
    boxes = Counter()
    with h.snapshot() as (txn, records, _, _):
        for _, value in txn.cursor(db=records):
            boxes[peek_num_boxes(value)] += 1
    meta = reader.meta
    return {
        "path": reader.path,
        "count": len(reader),
        "complete": h.complete,
        "updated": h.state.get("updated"),
        "bytes_on_disk": os.path.getsize(os.path.join(reader.path, "data.mdb")),
        "boxes_per_image": dict(sorted(boxes.items())),
        **meta,
    }


def compact_copy(src: str, dst: str) -> str:
    """Publish a complete shard: a compacting copy (free pages dropped, pages in order) to dst, checked
    by content hash. Written to dst + '.partial' and renamed, so dst is whole or absent."""
    src = os.path.abspath(src)
    h = _handle(src, refresh=True)
    if not h.complete or h.env is None:
        raise ShardError(f"{src}: shard is incomplete (its writer did not finish); finish it before publishing")
    if os.path.exists(dst):
        raise ShardError(f"{dst}: already exists; copy to a new path")
    tmp = dst.rstrip("/") + ".partial"
    if os.path.exists(tmp):
        import shutil

        shutil.rmtree(tmp)
    os.makedirs(tmp)
    h.env.copy(tmp, compact=True)
    expected, got = content_hash(src), content_hash(tmp)
    if got != expected:
        raise ShardError(f"{tmp}: copy's content hash {got} differs from the source's {expected}")
    os.replace(tmp, dst)
    return got


# ---- the index: one JSON file over many shards -----------------------------------------------------


def build_index(sources, out_path: str, force: bool = False, progress=None) -> dict:
    """Write a JSON index over shards; refuse shards whose settings differ, or that are incomplete,
    unless force. Shard paths are stored relative to the index file, so a folder moves as a whole."""
    paths, _ = resolve_sources(sources)
    if not paths:
        raise ShardError(f"{sources}: no shards")
    out_dir = os.path.dirname(os.path.abspath(out_path))
    entries, first = [], None
    for p in paths:
        p = os.path.abspath(p)
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
        entries.append({
            "path": os.path.relpath(p, out_dir),
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
    with open(tmp, "w") as f:
        json.dump(index, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, out_path)  # never a half-written index
    return index


def load_index(path: str) -> dict:
    """Read an index; shard paths come back absolute."""
    try:
        with open(path) as f:
            index = json.load(f)
    except (OSError, ValueError) as e:
        raise ShardError(f"{path}: cannot read index: {e}") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise ShardError(f"{path}: not a {INDEX_FORMAT} file")
    if index.get("version") != INDEX_VERSION:
        raise ShardError(f"{path}: index version {index.get('version')!r}, this regionbert reads {INDEX_VERSION}")
    base = os.path.dirname(os.path.abspath(path))
    shards = index.get("shards")
    if not isinstance(shards, list):
        raise ShardError(f"{path}: index has no list of shards")
    for i, s in enumerate(shards):
        if not (isinstance(s, dict) and isinstance(s.get("path"), str) and isinstance(s.get("count"), int)):
            raise ShardError(f"{path}: shard entry {i} needs a string 'path' and an integer 'count'")
        s["path"] = os.path.normpath(os.path.join(base, s["path"]))
    return index
