"""ShardWriter: append records to a shard in batched, crash-safe commits; resume by skipping ids."""

from __future__ import annotations

import os

import lmdb
import numpy as np

from .checks import refuse_bad_record
from .errors import ShardError, ShardMismatchError
from .format import (  # noqa: F401 - DB_*, META_*, order_key, comparable_settings: also imported from here
    BOX_CHUNK,
    DB_META,
    DB_ORDER,
    DB_RECORDS,
    FEATURE_DTYPE_CODES,
    META_SHARD,
    META_STATE,
    SCHEMA_MINOR,
    box_chunk_key,
    box_table_chunks,
    comparable_settings,
    content_hash_of,
    decode_box_table,
    decode_meta,
    decode_state,
    encode_box_counts,
    encode_extra,
    encode_json,
    encode_key,
    encode_record,
    header_counts,
    header_num_boxes,
    make_meta,
    now_iso,
    order_key,
    settings_diff,
)
from .handles import check_shard_files, open_for_reading_here, open_pinned
from .lmdbcheck import check_file, write_error
from .lock import WriterLock
from .pagescan import counts_in_order

PROB_SUM_TOLERANCE = 0.02  # float16 rounding over ~1600 classes stays well inside this


class ShardWriter:
    """Write one shard (an LMDB folder). Use as a context manager.

        with ShardWriter("out/shard-000", feature_dim=1024, class_names=names, extractor=info) as w:
            for image_id, ... in work:
                if image_id in w:          # committed by an earlier, interrupted run
                    continue
                w.add(image_id, width=W, height=H, boxes=b, features=f, class_probs=p)

    Records are committed every `commit_every` records or `commit_bytes` bytes, whichever comes first;
    a kill -9 at any moment leaves a valid shard holding every committed record. Opening an existing
    shard resumes it: its settings must match, and ids already stored are skipped by `add`.

    A complete shard is immutable (readers open it without locks): reopening one writes nothing, and
    adding a new record to it is refused unless append=True, which is safe only while nobody reads it.

    Every commit also stores its records' box counts in the shard's box-count table (format 1.1, see
    docs/shard-format.md), in the same transaction, so the table is whole at every commit boundary: after a
    kill -9, on resume, and in a copy. A shard written before the table (format 1.0) gets one, built from its
    records' headers, the first time this writer changes it (resume or append); left alone, it stays 1.0.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        feature_dim: int,
        class_names: list[str] | None,
        feature_dtype: str = "float16",
        attribute_names: list[str] | None = None,
        extractor: dict | None = None,
        commit_every: int = 256,
        commit_bytes: int = 256 << 20,
        map_size: int = 1 << 30,
        append: bool = False,
    ):
        if feature_dtype not in FEATURE_DTYPE_CODES:
            raise ShardError(f"feature_dtype must be one of {sorted(FEATURE_DTYPE_CODES)}, got {feature_dtype!r}")
        if class_names is not None and len(class_names) < 2:
            raise ShardError("class_names must list every class, background included (at least 2)")
        self.path = os.fspath(path)
        self.commit_every, self.commit_bytes = commit_every, commit_bytes
        if open_for_reading_here(self.path):
            raise ShardError(f"{self.path}: this process is reading the shard; write it from another process "
                             "(LMDB allows one open environment per file per process)")
        self._env = None
        self._lock = WriterLock(self.path).acquire()  # one writer per shard; refused at once if taken
        try:
            self._open(map_size, feature_dim, feature_dtype, class_names, attribute_names, extractor, append)
        except BaseException:
            if self._env is not None:
                self._env.close()
            self._lock.release()
            raise

    def _open(self, map_size, feature_dim, feature_dtype, class_names, attribute_names, extractor, append) -> None:
        os.makedirs(self.path, exist_ok=True)
        check_shard_files(self.path, missing_ok=True)  # handles.py: a link in data.mdb's place is never read
        check_file(self.path, empty_ok=True)  # data/lmdbcheck.py: never map a damaged file
        try:
            # data.mdb and LMDB's lock.mdb opened with O_NOFOLLOW, regular files with one link (handles.py): a
            # shard handed over with a link planted there is refused, nothing is written through it
            self._env = open_pinned(self.path, lock=True, write=True, map_size=map_size, max_dbs=3, meminit=False)
        except lmdb.Error as e:
            raise ShardError(f"{self.path}: cannot open for writing: {e}") from None
        self._records = self._env.open_db(DB_RECORDS)
        self._order = self._env.open_db(DB_ORDER)
        self._meta_db = self._env.open_db(DB_META)
        wanted = make_meta(feature_dim, feature_dtype, class_names, attribute_names, extractor or {}, now_iso())
        wanted["schema_minor"] = SCHEMA_MINOR  # a new shard carries the box-count table from its first commit
        with self._env.begin() as txn:
            raw = txn.get(META_SHARD, db=self._meta_db)
            state = txn.get(META_STATE, db=self._meta_db)
            table = box_table_chunks(self.path, txn, self._meta_db, txn.stat(self._order)["entries"])
        if raw is not None:  # resume: the shard's settings win, and must match ours
            self.meta = decode_meta(self.path, raw)
            diff = settings_diff(self.meta, wanted)
            if diff:
                raise ShardMismatchError(
                    f"{self.path}: existing shard differs in {', '.join(diff)}; write to a new shard "
                    "(or delete this one) instead of mixing settings")
        else:
            self.meta = wanted
        with self._env.begin() as txn:
            self.count = txn.stat(self._order)["entries"]
        # the table must cover exactly the committed records (it is written in their transactions); a shard
        # without one (format 1.0) gets it built from its headers when this writer first changes the shard
        self._table_missing = not table and self.count > 0
        if self._table_missing and self.meta.get("schema_minor", 0) >= 1:
            raise ShardError(f"{self.path}: the shard declares a box-count table (schema_minor "
                             f"{self.meta['schema_minor']}) but stores none; it is damaged (`regionbert-shards "
                             "verify`): restore it from its source")
        if table:
            decode_box_table(self.path, table, self.count)  # ShardError if its length is not the shard's
        self._pending: list[tuple[bytes, bytes]] = []
        self._pending_keys: set[bytes] = set()
        self._pending_bytes = 0
        self.added = self.skipped = 0
        self._closed = False
        try:
            self.was_complete = bool(decode_state(self.path, state).get("complete"))
        except ShardError:
            self.was_complete = False
        self.append = append
        self._touched = False  # nothing written yet: a complete shard stays untouched until a record comes
        if not self.was_complete:
            self._touch()

    def _touch(self) -> None:
        """Mark the shard as being written (incomplete) before its first change."""
        if self.was_complete and not self.append:
            raise ShardError(f"{self.path}: shard is complete (finished, maybe published and being read); "
                             "adding records would change it under its readers. Write a new shard, or append "
                             "on purpose (append=True / --append) while nobody reads it")
        counts = None
        if self._table_missing:  # format 1.0: the table, from the headers of the records already there
            counts = self._header_counts()
            self.meta = {**self.meta, "schema_minor": SCHEMA_MINOR}
        self._write_state(complete=False, meta=self.meta, counts=counts)
        self._table_missing = False
        self._touched = True

    # -- queries ------------------------------------------------------------------------------------

    def __contains__(self, image_id: str) -> bool:
        return self._has(encode_key(image_id))

    def _has(self, key: bytes) -> bool:
        if key in self._pending_keys:
            return True
        with self._env.begin() as txn:
            return txn.get(key, db=self._records) is not None

    def __len__(self) -> int:
        return self.count + len(self._pending)

    # -- writing ------------------------------------------------------------------------------------

    def add(
        self,
        image_id: str,
        *,
        width: int,
        height: int,
        boxes,
        features,
        class_probs=None,
        attr_probs=None,
        extra: dict | None = None,
    ) -> bool:
        """Validate, encode and queue one record. Returns False (and writes nothing) if the id is
        already in the shard."""
        if self._closed:
            raise ShardError(f"{self.path}: writer is closed")
        key = encode_key(image_id)
        if self._has(key):
            self.skipped += 1
            return False
        arrays = self._validate(image_id, width, height, boxes, features, class_probs, attr_probs, extra)
        if not self._touched:
            self._touch()
        value = encode_record(key, int(width), int(height), *arrays, extra=extra,
                              feature_dtype=self.meta["feature_dtype"])
        refuse_bad_record(self.path, key, value)  # the record rules (data/checks.py), on the bytes to be stored
        self._pending.append((key, value))
        self._pending_keys.add(key)
        self._pending_bytes += len(value)
        self.added += 1
        if len(self._pending) >= self.commit_every or self._pending_bytes >= self.commit_bytes:
            self.commit()
        return True

    def commit(self) -> None:
        """Write the queued records in one transaction, growing the map as needed."""
        if not self._pending:
            return
        state = encode_json({"count": self.count + len(self._pending), "complete": False, "updated": now_iso()})
        while True:
            try:
                with self._env.begin(write=True) as txn:
                    for i, (key, value) in enumerate(self._pending):
                        txn.put(key, value, db=self._records)
                        txn.put(order_key(self.count + i), key, db=self._order)
                    self._put_counts(txn, self.count, [header_num_boxes(k, v) for k, v in self._pending])
                    txn.put(META_STATE, state, db=self._meta_db)
                break
            except lmdb.MapFullError:
                self._grow()
            except lmdb.Error as e:  # a full disk: nothing of this batch was written; earlier commits are kept
                err = write_error(self.path, e, f"committing records {self.count}..{len(self) - 1}",
                                  self._pending_bytes)
                self._pending.clear()  # (a rerun resumes after the last commit)
                self._pending_keys.clear()
                self._pending_bytes = 0
                raise err from None
        self.count += len(self._pending)
        self._pending.clear()
        self._pending_keys.clear()
        self._pending_bytes = 0

    def close(self, complete: bool = True) -> None:
        """Commit what is queued; mark the shard complete (a finished job) unless told otherwise."""
        if self._closed:
            return
        try:
            self.commit()
            if self._touched:  # a complete shard reopened and left alone is not rewritten
                self._write_state(complete=complete)
            self._env.sync(True)
        finally:
            self._closed = True
            self._env.close()
            self._lock.release()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        # On an error, keep every record that was accepted, but don't call the shard complete.
        self.close(complete=exc_type is None)

    # -- internals ----------------------------------------------------------------------------------

    def _put_counts(self, txn, start: int, counts: list[int]) -> None:
        """Store the box counts of positions start.. in the table: the chunk holding `start` is read (it holds
        exactly start % BOX_CHUNK counts) and it and any later chunks are written whole."""
        k = start // BOX_CHUNK
        head = b""
        if start % BOX_CHUNK:
            head = txn.get(box_chunk_key(k), db=self._meta_db) or b""
            if len(head) != 4 * (start % BOX_CHUNK):  # written in the same transactions as the records: damage
                raise ShardError(f"{self.path}: box-count table chunk {k} holds {len(head) // 4} counts, "
                                 f"{start % BOX_CHUNK} expected; the shard is damaged (`regionbert-shards verify`)")
        data = head + encode_box_counts(counts)
        for off in range(0, len(data), 4 * BOX_CHUNK):
            txn.put(box_chunk_key(k), data[off:off + 4 * BOX_CHUNK], db=self._meta_db)
            k += 1

    def _header_counts(self) -> list[int]:
        """The box counts of the committed records, in order, from their headers (a format 1.0 shard): from
        the file's pages (data/pagescan.py, a page per record; nothing is written before this), else via LMDB."""
        with self._env.begin(buffers=True) as txn:
            counts = counts_in_order(self.path, txn, self._order, self.count)
            if counts is None:
                counts = header_counts(self.path, txn, self._records, self._order, self.count)
        return counts.tolist()

    def _write_state(self, complete: bool, meta: dict | None = None, counts: list[int] | None = None) -> None:
        while True:
            try:
                with self._env.begin(write=True, buffers=True) as txn:  # buffers: the hash reads 8 bytes a record
                    if meta is not None:
                        txn.put(META_SHARD, encode_json(meta), db=self._meta_db)
                    if counts is not None:  # a format 1.0 shard's table, with the metadata that declares it
                        self._put_counts(txn, 0, counts)
                    state = {"count": self.count, "complete": complete, "updated": now_iso()}
                    if complete:  # stored for readers to compare with an index (cheap at open; verify recomputes)
                        state["content_hash"] = content_hash_of(txn, self._records, self._order, self.meta, self.path)
                    txn.put(META_STATE, encode_json(state), db=self._meta_db)
                return
            except lmdb.MapFullError:
                self._grow()
            except lmdb.Error as e:
                raise write_error(self.path, e, "writing the shard's state") from None

    def _grow(self) -> None:
        self._env.set_mapsize(self._env.info()["map_size"] * 2)

    def _fail(self, image_id: str, msg: str, mismatch: bool = False):
        cls = ShardMismatchError if mismatch else ShardError
        return cls(f"{self.path}: record {image_id!r}: {msg}")

    def _validate(self, image_id, width, height, boxes, features, class_probs, attr_probs, extra):
        meta = self.meta
        if not (isinstance(width, (int, np.integer)) and isinstance(height, (int, np.integer))):
            raise self._fail(image_id, f"width and height must be integers, got {width!r} x {height!r}")
        if not (0 < width < 2**32 and 0 < height < 2**32):
            raise self._fail(image_id, f"image size {width}x{height} must be positive")
        try:
            boxes = np.asarray(boxes, dtype=np.float32)
            features = np.asarray(features)
        except (TypeError, ValueError) as e:
            raise self._fail(image_id, f"boxes and features must be numeric arrays: {e}") from None
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise self._fail(image_id, f"boxes must be (N, 4) xyxy, got shape {boxes.shape}")
        n = boxes.shape[0]
        if features.ndim != 2 or features.shape[0] != n:
            raise self._fail(image_id, f"features must be (N={n}, D), got shape {features.shape}")
        if features.shape[1] != meta["feature_dim"]:
            raise self._fail(image_id, f"feature dim {features.shape[1]} != shard's {meta['feature_dim']}",
                             mismatch=True)
        if not np.isfinite(boxes).all():
            raise self._fail(image_id, "boxes contain NaN or inf")
        x1, y1, x2, y2 = boxes.T
        eps = 1e-3
        if (x1 > x2).any() or (y1 > y2).any():
            raise self._fail(image_id, "boxes must be x1 <= x2 and y1 <= y2 (xyxy, not xywh?)")
        if (x1 < -eps).any() or (y1 < -eps).any() or (x2 > width + eps).any() or (y2 > height + eps).any():
            raise self._fail(image_id, f"boxes fall outside the {width}x{height} image")
        features = features.astype(np.dtype(meta["feature_dtype"]), copy=False)
        if not np.isfinite(features).all():
            raise self._fail(image_id, f"features contain NaN or inf (as {meta['feature_dtype']})")
        class_probs = self._probs(image_id, "class_probs", class_probs, meta["class_names"], n)
        attr_probs = self._probs(image_id, "attr_probs", attr_probs, meta["attribute_names"], n)
        if extra is not None:
            if not isinstance(extra, dict):
                raise self._fail(image_id, "extra must be a dict")
            try:
                encode_extra(extra)
            except (TypeError, ValueError) as e:
                raise self._fail(image_id, f"extra must be a JSON object with string keys and finite numbers: "
                                 f"{e}") from None
        return boxes, features, class_probs, attr_probs

    def _probs(self, image_id, what, probs, names, n):
        if names is None:
            if probs is not None:
                raise self._fail(image_id, f"{what} given, but the shard declares no names for them",
                                 mismatch=True)
            return None
        if probs is None:
            raise self._fail(image_id, f"{what} missing; the shard declares {len(names)} classes")
        given = np.asarray(probs)
        probs = given.astype(np.float32, copy=False)  # checked in float32, stored rounded once to float16
        if probs.shape != (n, len(names)):
            raise self._fail(image_id, f"{what} shape {probs.shape} != (N={n}, {len(names)})", mismatch=True)
        if not np.isfinite(probs).all() or (probs < 0).any() or (probs > 1 + 1e-3).any():
            raise self._fail(image_id, f"{what} must be probabilities in [0, 1]")
        if what == "class_probs" and n and np.abs(probs.sum(1) - 1).max() > PROB_SUM_TOLERANCE:
            raise self._fail(image_id, "class_probs rows must sum to 1 (the full distribution, background "
                             "included)")
        return given.astype(np.float16)
