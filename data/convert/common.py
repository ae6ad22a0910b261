"""The import driver every source format shares: decode rows in parallel, write them in order, report bad rows.

A source format (tsv.py, npz.py, hdf5.py) provides a `Source`: its settings (feature dim, class names,
extractor description) and a stream of batches of undecoded items plus a decode function that runs in
a worker process. This module runs the batches through joblib, writes the decoded records into one
`ShardWriter` in source order, and deals with bad rows: stop at the first (the default), or skip it,
append it to a JSONL report and go on.

Crash safety comes from ShardWriter: records are committed in batches, and the shard is marked
complete only when the import finishes. An exception or a kill -9 midway leaves `complete: false` with
every committed record; running the same import again skips the ids already stored.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import lmdb
import numpy as np
import xxhash
from joblib import Parallel, delayed
from tqdm import tqdm

from ..errors import ShardError, ShardWriteError
from ..handles import check_shard_files
from ..lmdbcheck import check_file
from ..writer import DB_ORDER, ShardWriter

BOX_EPS = 1e-3  # the writer's tolerance for boxes on the image border (pixels)
CONVERTER = "regionbert.data.convert"


class ConvertError(ShardError):
    """An import or export that cannot go on; names the file (and row) it is about."""


class ExportWarning(UserWarning):
    """An export that goes on but cannot carry everything the shard holds; says what is left out."""


class RowError(Exception):
    """One source row that cannot become a record. Raised in workers, caught by the driver."""

    def __init__(self, file: str, row: int | None, reason: str, image_id: str | None = None):
        self.file, self.row, self.reason, self.image_id = file, row, reason, image_id
        super().__init__(f"{self.where}: {reason}")

    def __reduce__(self):  # travels back from worker processes
        return RowError, (self.file, self.row, self.reason, self.image_id)

    @property
    def where(self) -> str:
        return self.file if self.row is None else f"{self.file} row {self.row}"


@dataclass
class Decoded:
    """One record ready for ShardWriter.add, plus where it came from."""

    image_id: str
    file: str
    row: int | None
    fields: dict  # ShardWriter.add keyword arguments: width, height, boxes, features, class_probs, extra, ...


@dataclass
class Settings:
    """What the shard's metadata will say. `job` goes into extractor["job"] (allowed to differ between
    shards that belong together, e.g. the source file list)."""

    feature_dim: int
    class_names: list[str] | None
    extractor: dict
    attribute_names: list[str] | None = None
    feature_dtype: str | None = None  # None: the --dtype the user chose


@dataclass
class Source:
    """A prepared import: settings, how many items (if known), and the batches to decode.

    batches(skip): yields lists of (image_id or None, item); `skip(image_id)` says the id is already
                   stored, so the item need not be sent to a worker at all (None: not known before decoding).
    decode(batch, feature_dim, dtype) -> list of Decoded or RowError; runs in a worker, must be picklable.
    """

    settings: Settings
    total: int | None
    batches: Callable[[Callable[[str], bool]], Iterator[list]]
    decode: Callable[[list, int, str], list]
    parallel: bool = True  # False for sources that must be read in this process (HDF5: h5py is not fork-safe)


@dataclass
class ImportResult:
    shard: str
    added: int = 0
    skipped_existing: int = 0  # ids stored by an earlier run of this import (resume)
    duplicates: int = 0  # rows repeating an earlier row of this import, same id and same data: skipped
    bad: list[dict] = field(default_factory=list)  # {file, row, image_id, reason}
    report: str | None = None


def check_boxes(file: str, row, boxes: np.ndarray, width: int, height: int, image_id: str | None = None) -> None:
    """xyxy pixel boxes inside the image (the shard format's rule), or a RowError naming the first bad box."""
    if not np.isfinite(boxes).all():
        raise RowError(file, row, "boxes contain NaN or inf", image_id)
    x1, y1, x2, y2 = boxes.T
    bad = (x1 > x2) | (y1 > y2)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RowError(file, row, f"box {i} {boxes[i].tolist()} has x1 > x2 or y1 > y2 (xywh, not xyxy?)", image_id)
    bad = (x1 < -BOX_EPS) | (y1 < -BOX_EPS) | (x2 > width + BOX_EPS) | (y2 > height + BOX_EPS)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise RowError(file, row, f"box {i} {boxes[i].tolist()} lies outside the {width}x{height} image", image_id)


LABELS = (("objects_id", np.int64), ("objects_conf", np.float32), ("attrs_id", np.int64), ("attrs_conf", np.float32))
NO_ATTRIBUTE = ("__no_attribute__", "no_attribute", "__no_attr__", "__background__", "")  # attribute 0 = none


def _best(probs, skip: int, n: int) -> tuple[np.ndarray, np.ndarray]:
    """argmax over classes skip.. and its probability; ids count from class `skip` (id = index - skip)."""
    p = np.asarray(probs, np.float32)[:, skip:]
    ids = p.argmax(1).astype(np.int64) if n else np.zeros(0, np.int64)
    return ids, p[np.arange(n), ids]


def record_labels(rec, meta: dict) -> dict | None:
    """LXMERT's per-box hard labels, as its load_obj_tsv reads them: objects_id (N,) int64, objects_conf (N,)
    float32, attrs_id (N,) int64, attrs_conf (N,) float32. None if the record has neither a class distribution
    nor stored labels.

    From a class distribution (class 0 = background, as in every shard): objects_id = argmax over classes 1..
    minus 1, so the 1601 Visual Genome classes give ids 0..1599 as in LXMERT's files; objects_conf = its
    probability. From an attribute distribution: if attribute_names[0] says "no attribute" (NO_ATTRIBUTE,
    e.g. '__no_attribute__', as in the 401-way Visual Genome head), it is skipped the same way (ids 0..399);
    otherwise attrs_id is the plain argmax. Without attributes: attrs_id 0 with attrs_conf 0 (LXMERT weights
    its attribute loss by the confidence). Records imported from an LXMERT TSV keep the file's labels in
    `extra`, and those are returned unchanged."""
    n, extra = rec.num_boxes, rec.extra or {}
    out = {}
    if rec.class_probs is not None:
        out["objects_id"], out["objects_conf"] = _best(rec.class_probs, 1, n)
    elif "objects_id" in extra and "objects_conf" in extra:
        out["objects_id"], out["objects_conf"] = extra["objects_id"], extra["objects_conf"]
    else:
        return None
    names = meta.get("attribute_names")
    if rec.attr_probs is not None:
        out["attrs_id"], out["attrs_conf"] = _best(rec.attr_probs, 1 if names and names[0] in NO_ATTRIBUTE else 0, n)
    elif "attrs_id" in extra and "attrs_conf" in extra:
        out["attrs_id"], out["attrs_conf"] = extra["attrs_id"], extra["attrs_conf"]
    else:
        out["attrs_id"], out["attrs_conf"] = np.zeros(n, np.int64), np.zeros(n, np.float32)
    return {k: np.asarray(out[k], dt).reshape(n) for k, dt in LABELS}


SOURCE_KEYS = ("source_file", "source_row")  # where a row came from: not part of what it says


def content_digest(fields: dict) -> int:
    """XXH3-64 of what a decoded record says (size, arrays as stored, extra without its source position), to
    tell an identical repeated image id from a conflicting one without keeping the records in memory."""
    h = xxhash.xxh3_64()
    h.update(f"{fields['width']}x{fields['height']}|".encode())
    for k in ("boxes", "features", "class_probs", "attr_probs"):
        a = fields.get(k)
        if a is not None:
            a = np.ascontiguousarray(a)
            h.update(f"{k}|{a.dtype.str}|{a.shape}|".encode())
            h.update(a.tobytes())
    extra = {k: v for k, v in (fields.get("extra") or {}).items() if k not in SOURCE_KEYS}
    h.update(json.dumps(extra, sort_keys=True).encode())
    return h.intdigest()


def existing_ids(path: str) -> set[str]:
    """Ids already in a shard (for resuming), read with a short-lived read-only environment so that this
    process can open the shard for writing afterwards. Empty if there is no shard yet."""
    if not os.path.lexists(os.path.join(path, "data.mdb")):
        return set()
    check_shard_files(path)  # a regular file of the shard's own, never a link followed (trust.md)
    check_file(path)  # meta and tree pages checked before LMDB maps the file
    env = lmdb.open(path, subdir=True, readonly=True, lock=False, max_dbs=3)
    try:
        try:
            order = env.open_db(DB_ORDER, create=False)
        except lmdb.Error:
            return set()  # created but nothing committed yet
        with env.begin() as txn:
            return {bytes(k).decode("utf-8") for _, k in txn.cursor(db=order)}
    finally:
        env.close()


def run_import(source: Source, out: str, *, on_error: str = "stop", report: str | None = None, n_jobs: int = -1,
               feature_dtype: str = "float16", progress: bool = True, commit_every: int = 256) -> ImportResult:
    """Decode the source's batches (in parallel), write them into the shard `out` in order.

    on_error "stop": the first bad row raises ConvertError naming file and row; every record before it
    is committed and the shard stays incomplete. "skip": bad rows go to `report` (JSONL: file, row,
    image_id, reason; default OUT.import-errors.jsonl, rewritten by every run) and the import goes on.

    An image id seen earlier in this import is a bad row if its data differ (the first one is kept), and
    is counted in `duplicates` and skipped if they are the same. Ids stored by an earlier, interrupted
    run are skipped before decoding (`skipped_existing`), so they are not compared."""
    if on_error not in ("stop", "skip"):
        raise ConvertError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    s = source.settings
    dtype = s.feature_dtype or feature_dtype
    result = ImportResult(shard=out, report=report or f"{os.path.normpath(out)}.import-errors.jsonl")
    done = existing_ids(out)  # resume: never send these to a worker
    seen: dict[str, tuple[int, str, int | None]] = {}  # id -> (content digest, file, row) of what this run added
    report_file = None
    bar = tqdm(total=source.total, desc=f"import -> {out}", unit="rec", disable=not progress, dynamic_ncols=True)

    def bad_row(err: RowError) -> None:
        nonlocal report_file
        entry = {"file": err.file, "row": err.row, "image_id": err.image_id, "reason": err.reason}
        if on_error == "stop":
            raise ConvertError(f"{err.where}: {err.reason} (nothing after it was imported; "
                               "rerun with --on-error skip to skip bad rows and list them in a report)")
        result.bad.append(entry)
        if report_file is None:
            report_file = open(result.report, "w")
        report_file.write(json.dumps(entry) + "\n")
        report_file.flush()

    def skip(image_id: str) -> bool:
        if image_id in done:
            result.skipped_existing += 1
            bar.update(1)
            return True
        return False

    batches = source.batches(skip)
    work = (delayed(source.decode)(b, s.feature_dim, dtype) for b in batches)
    try:
        with ShardWriter(out, feature_dim=s.feature_dim, class_names=s.class_names, feature_dtype=dtype,
                         attribute_names=s.attribute_names, extractor=s.extractor, commit_every=commit_every) as w:
            if source.parallel and n_jobs != 1:
                # Ordered results; at most 2 * n_jobs batches in flight, so memory stays bounded.
                results = Parallel(n_jobs=n_jobs, return_as="generator", pre_dispatch="2*n_jobs")(work)
            else:
                results = (fn(*a, **k) for fn, a, k in work)
            for decoded in results:
                for d in decoded:
                    bar.update(1)
                    if isinstance(d, RowError):
                        bad_row(d)
                        continue
                    digest = content_digest(d.fields)
                    if d.image_id in seen:
                        first_digest, file, row = seen[d.image_id]
                        if digest == first_digest:
                            result.duplicates += 1
                        else:
                            first = file if row is None else f"{file} row {row}"
                            bad_row(RowError(d.file, d.row, f"image id {d.image_id!r} was already imported from "
                                             f"{first} with different data (the first is kept)", d.image_id))
                        continue
                    try:
                        if w.add(d.image_id, **d.fields):
                            result.added += 1
                            seen[d.image_id] = (digest, sys.intern(d.file), d.row)
                        else:
                            result.skipped_existing += 1
                    except ShardWriteError:  # a full disk is not the row's fault: stop (a rerun resumes)
                        raise
                    except ShardError as e:  # the writer's own checks (e.g. features overflow float16)
                        bad_row(RowError(d.file, d.row, str(e).split(": ", 1)[-1], d.image_id))
                bar.set_postfix(bad=len(result.bad), refresh=False)
    finally:
        bar.close()
        if report_file is not None:
            report_file.close()
    if not result.bad and os.path.exists(result.report):
        os.remove(result.report)  # a report from an earlier run that had bad rows no longer applies
    return result


def worker_count(n_jobs: int) -> int:
    return (os.cpu_count() or 1) if n_jobs == -1 else max(1, n_jobs)


def describe(source_format: str, files: list[str], **more) -> dict:
    """The extractor metadata of an imported shard. The file list goes into `job`, the one member that may
    differ between shards that belong together (an index joins shards converted from different files)."""
    return {"name": CONVERTER, "source_format": source_format, "detector": "unknown (imported)",
            "weights": None, "weights_digest": None, "box_policy": "unknown (imported)", "boxes": "unknown",
            **more, "job": {"source_files": [os.path.abspath(f) for f in files]}}
