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
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import lmdb
import numpy as np
from joblib import Parallel, delayed
from tqdm import tqdm

from ..errors import ShardError, ShardWriteError
from ..writer import DB_ORDER, ShardWriter

BOX_EPS = 1e-3  # the writer's tolerance for boxes on the image border (pixels)
CONVERTER = "regionbert.data.convert"


class ConvertError(ShardError):
    """An import or export that cannot go on; names the file (and row) it is about."""


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
    skipped_existing: int = 0
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


def existing_ids(path: str) -> set[str]:
    """Ids already in a shard (for resuming), read with a short-lived read-only environment so that this
    process can open the shard for writing afterwards. Empty if there is no shard yet."""
    if not os.path.isfile(os.path.join(path, "data.mdb")):
        return set()
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

    on_error "stop": the first bad row raises ConvertError naming file and row; the records before it
    are committed and the shard stays incomplete. "skip": bad rows go to `report` (JSONL: file, row,
    image_id, reason; default OUT.import-errors.jsonl, rewritten by every run) and the import goes on."""
    if on_error not in ("stop", "skip"):
        raise ConvertError(f"on_error must be 'stop' or 'skip', got {on_error!r}")
    s = source.settings
    dtype = s.feature_dtype or feature_dtype
    result = ImportResult(shard=out, report=report or f"{os.path.normpath(out)}.import-errors.jsonl")
    done = existing_ids(out)  # resume: never send these to a worker
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
                    try:
                        if w.add(d.image_id, **d.fields):
                            result.added += 1
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
