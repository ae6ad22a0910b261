"""The record and metadata codecs: the only code that knows the bytes of a shard.

Spec: docs/shard-format.md. A record value is

    fixed header (48 bytes) | sections, each 16-byte aligned | checksum (8 bytes)

and decodes into numpy views of the value buffer (no copy). Decoding untrusted bytes either returns a
`Record` or raises `CorruptRecordError`; nothing here unpickles or executes anything.
"""

from __future__ import annotations

import functools
import json
import struct
from datetime import UTC, datetime

import numpy as np
import xxhash

from .errors import CorruptRecordError, ShardError

MAGIC = b"RBRC"
RECORD_VERSION = 1
SCHEMA_VERSION = 1
FORMAT_NAME = "regionbert-shard"
MAX_KEY_BYTES = 511  # LMDB's default compile-time limit

# The container (spec section 1): three named LMDB databases, and the two keys of `meta`.
DB_RECORDS, DB_ORDER, DB_META = b"records", b"order", b"meta"
META_SHARD, META_STATE = b"shard", b"state"

# Format 1.1 (spec section 1, "Box-count table"): meta/shard's `schema_minor` is 1, and the number of boxes of
# every record, in order-table order, is stored in `meta` under BOX_COUNTS + chunk number (uint32
# big-endian), BOX_CHUNK little-endian uint32 per chunk (the last one shorter). Chunks, not one value: a
# commit rewrites only the chunk(s) its records fall in (at most 16 KB each), not a table the size of the
# shard, so writing a million-record shard in 256-record commits costs O(records), not O(records^2).
SCHEMA_MINOR = 1
BOX_COUNTS = b"box_counts/"
BOX_CHUNK = 4096
_BOX_DTYPE = np.dtype("<u4")

# magic, version, header_size, width, height, N, D, C, A, feature dtype, flags, reserved, extra_len, reserved
_HEADER = struct.Struct("<4sHHIIIIIIBBHIQ")
HEADER_SIZE = _HEADER.size  # 48
CHECKSUM_SIZE = 8
ALIGN = 16
_U64 = struct.Struct("<Q")

FEATURE_DTYPES = {1: np.dtype("<f2"), 2: np.dtype("<f4")}
FEATURE_DTYPE_CODES = {"float16": 1, "float32": 2}
_F4 = np.dtype("<f4")
_F2 = np.dtype("<f2")


def _align(n: int) -> int:
    return (n + ALIGN - 1) & ~(ALIGN - 1)


class Record:
    """One image's regions. Arrays are read-only views of the stored bytes unless copied.

    id, width, height     the image (original pixels, upright)
    boxes                 (N, 4) float32, x1 y1 x2 y2 in original-image pixels
    features              (N, D) float16 or float32, region features
    class_probs           (N, C) float16, the detector's distribution, background at 0; None if absent
    loc5                  (N, 5) float32 [x1/W, y1/H, x2/W, y2/H, w*h/(W*H)]
    loc7                  (N, 7) float32 [x1/W, y1/H, x2/W, y2/H, w/W, h/H, (w/W)*(h/H)]
    attr_probs            (N, A) float16, or None
    extra                 small per-record JSON object (source file, row, ...), or None; parsed on access
    """

    __slots__ = ("id", "width", "height", "boxes", "features", "class_probs", "loc5", "loc7", "attr_probs",
                 "_extra")

    def __init__(self, id, width, height, boxes, features, class_probs, loc5, loc7, attr_probs=None,
                 extra=None):
        self.id, self.width, self.height = id, width, height
        self.boxes, self.features, self.class_probs = boxes, features, class_probs
        self.loc5, self.loc7, self.attr_probs, self._extra = loc5, loc7, attr_probs, extra

    @property
    def extra(self) -> dict | None:
        e = self._extra
        if e is None or isinstance(e, dict):
            return e
        try:  # stored bytes: parse once, on first access (most readers never look)
            e = json.loads(bytes(e).decode("utf-8"))
        except (ValueError, RecursionError) as err:
            raise CorruptRecordError(self.id, f"extra field is not valid UTF-8 JSON: {err}") from None
        if not isinstance(e, dict):
            raise CorruptRecordError(self.id, "extra field is not a JSON object")
        self._extra = e
        return e

    @property
    def num_boxes(self) -> int:
        return self.boxes.shape[0]

    def copy(self) -> Record:
        """A record whose arrays own writable memory (safe to keep after the reader is gone)."""
        c = lambda a: None if a is None else np.array(a)  # noqa: E731
        extra = self.extra
        return Record(self.id, self.width, self.height, c(self.boxes), c(self.features),
                      c(self.class_probs), c(self.loc5), c(self.loc7), c(self.attr_probs),
                      None if extra is None else dict(extra))

    def __repr__(self) -> str:
        return (f"Record(id={self.id!r}, {self.width}x{self.height}, boxes={self.num_boxes}, "
                f"features={self.features.shape[1]}x{self.features.dtype})")


def order_key(index: int) -> bytes:
    """The `order` key of record position i: uint64 big-endian, so LMDB's byte order is insertion order."""
    return struct.pack(">Q", index)


def now_iso() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def comparable_settings(meta: dict) -> dict:
    """What must agree between shards that are read or indexed together (spec section 4: the index's
    `settings`, the extractor without its `job`)."""
    extractor = {k: v for k, v in (meta.get("extractor") or {}).items() if k != "job"}
    keys = ("schema_version", "feature_dim", "feature_dtype", "class_names", "attribute_names")
    return {**{k: meta.get(k) for k in keys}, "extractor": extractor}


def settings_diff(a: dict, b: dict) -> list[str]:
    """The settings (`extractor.<name>` for the extractor's members) in which two shards' metadata differ."""
    a, b = comparable_settings(a), comparable_settings(b)
    out = [k for k in a if k != "extractor" and a[k] != b[k]]
    ea, eb = a["extractor"], b["extractor"]
    out += [f"extractor.{k}" for k in sorted(set(ea) | set(eb)) if ea.get(k) != eb.get(k)]
    return out


def content_hasher(meta: dict):
    """The content hash (spec section 4) started with the canonical JSON of the shard's settings."""
    h = xxhash.xxh3_128()
    h.update(json.dumps(comparable_settings(meta), sort_keys=True).encode())
    return h


def hash_entry(h, key: bytes, checksum: int) -> None:
    """Add one `order` position to the content hash: key length (uint32), key, stored checksum (uint64)."""
    h.update(struct.pack("<I", len(key)) + key + struct.pack("<Q", checksum))


def content_hash_of(txn, records, order, meta: dict, where: str) -> str:
    """The content hash of a shard seen through one LMDB transaction: the stored checksums, in order
    (trusted here; `verify` recomputes them)."""
    h = content_hasher(meta)
    for i, (_, key) in enumerate(txn.cursor(db=order)):
        key = bytes(key)
        if not key:
            raise ShardError(f"{where}: order table entry {i} is empty; the shard is damaged")
        value = txn.get(key, db=records)
        if value is None:
            raise ShardError(f"{where}: order table names {key!r}, which has no record")
        hash_entry(h, key, stored_checksum(value))
    return "xxh3_128:" + h.hexdigest()


def encode_key(image_id: str) -> bytes:
    if not isinstance(image_id, str) or not image_id:
        raise ShardError(f"image id must be a non-empty str, got {image_id!r}")
    if "\0" in image_id:
        raise ShardError(f"image id {image_id[:80]!r} contains a NUL character")
    try:
        key = image_id.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates: e.g. a file name in another encoding, read by os.walk
        raise ShardError(f"image id {image_id[:80]!r} is not valid Unicode (a file name that is not "
                         "UTF-8?); rename the file or give ids in a manifest") from None
    if len(key) > MAX_KEY_BYTES:
        raise ShardError(
            f"image id {image_id[:60]!r}... is {len(key)} bytes in UTF-8; LMDB keys hold at most "
            f"{MAX_KEY_BYTES}. Shorten the ids (e.g. relative paths, or a hash of the path)."
        )
    return key


def location_vectors(boxes: np.ndarray, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
    """(N, 4) xyxy pixel boxes -> 5-dim and 7-dim location vectors (float32), computed in float64."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    x1, y1, x2, y2 = (b[:, i] / s for i, s in enumerate((width, height, width, height)))
    w, h = x2 - x1, y2 - y1
    loc5 = np.stack([x1, y1, x2, y2, w * h], axis=1)
    loc7 = np.stack([x1, y1, x2, y2, w, h, w * h], axis=1)
    return loc5.astype(_F4), loc7.astype(_F4)


def encode_extra(extra: dict | None) -> bytes:
    """The extra section: compact, key-sorted, strict JSON (no NaN), or nothing for None / {}."""
    if not extra:
        return b""
    return json.dumps(extra, separators=(",", ":"), sort_keys=True, allow_nan=False).encode()


def record_checksum(key: bytes, body) -> int:
    """XXH3-64 of the body, seeded with XXH3-64 of the key: a value under the wrong key fails."""
    return xxhash.xxh3_64_intdigest(body, seed=xxhash.xxh3_64_intdigest(key))


@functools.lru_cache(maxsize=8192)
def _array_layout(n: int, d: int, c: int, a: int, fcode: int):
    """((name, offset, dtype, shape), ...) of the array sections, and where they end (aligned)."""
    off = HEADER_SIZE
    layout = [("boxes", _F4, (n, 4)), ("loc5", _F4, (n, 5)), ("loc7", _F4, (n, 7)),
              ("features", FEATURE_DTYPES[fcode], (n, d))]
    if c:
        layout.append(("class_probs", _F2, (n, c)))
    if a:
        layout.append(("attr_probs", _F2, (n, a)))
    out = []
    for name, dt, shape in layout:
        out.append((name, off, dt, shape))
        off = _align(off + shape[0] * shape[1] * dt.itemsize)
    return tuple(out), off


def _record_end(n: int, d: int, c: int, a: int, fcode: int, extra_len: int) -> tuple[tuple, int, int]:
    """(array layout, offset of the extra section, end of the last section = checksum offset)."""
    layout, arrays_end = _array_layout(n, d, c, a, fcode)
    return layout, arrays_end, _align(arrays_end + extra_len) if extra_len else arrays_end


def encode_record(
    key: bytes,
    width: int,
    height: int,
    boxes: np.ndarray,
    features: np.ndarray,
    class_probs: np.ndarray | None,
    attr_probs: np.ndarray | None = None,
    extra: dict | None = None,
    feature_dtype: str = "float16",
) -> bytes:
    """Arrays must already be validated (see writer.validate_record). Returns the stored value."""
    fcode = FEATURE_DTYPE_CODES[feature_dtype]
    n, d = features.shape
    c = 0 if class_probs is None else class_probs.shape[1]
    a = 0 if attr_probs is None else attr_probs.shape[1]
    extra_bytes = encode_extra(extra)
    loc5, loc7 = location_vectors(boxes, width, height)
    arrays = {
        "boxes": boxes, "loc5": loc5, "loc7": loc7, "features": features,
        "class_probs": class_probs, "attr_probs": attr_probs,
    }
    layout, extra_off, end = _record_end(n, d, c, a, fcode, len(extra_bytes))
    buf = bytearray(end + CHECKSUM_SIZE)
    _HEADER.pack_into(buf, 0, MAGIC, RECORD_VERSION, HEADER_SIZE, width, height, n, d, c, a, fcode, 0, 0,
                      len(extra_bytes), 0)
    for name, off, dt, shape in layout:
        data = np.ascontiguousarray(arrays[name], dtype=dt).reshape(shape).tobytes()
        buf[off:off + len(data)] = data
    buf[extra_off:extra_off + len(extra_bytes)] = extra_bytes
    struct.pack_into("<Q", buf, end, record_checksum(key, memoryview(buf)[:end]))
    return bytes(buf)


def decode_record(key: bytes, value, verify: bool = True, image_id: str | None = None,
                  expect: tuple[int, int, int, int] | None = None) -> Record:
    """Bytes (or a buffer such as an LMDB memoryview) -> Record of zero-copy views.

    expect: the shard's (feature dim, classes, attributes, feature dtype code), checked against the header.
    Raises CorruptRecordError for anything that is not a well-formed record, whatever the bytes."""
    mv = memoryview(value)
    size = mv.nbytes
    if size < HEADER_SIZE + CHECKSUM_SIZE:
        raise CorruptRecordError(_name(key, image_id),
                                 f"record is {size} bytes, shorter than the {HEADER_SIZE}-byte header")
    (magic, version, header_size, width, height, n, d, c, a, fcode, _flags, _r0, extra_len,
     _r1) = _HEADER.unpack_from(mv, 0)
    if magic != MAGIC or version != RECORD_VERSION or header_size != HEADER_SIZE or fcode not in FEATURE_DTYPES \
            or not width or not height:
        raise CorruptRecordError(_name(key, image_id), _header_problem(magic, version, header_size, fcode,
                                                                       width, height))
    layout, extra_off, end = _record_end(n, d, c, a, fcode, extra_len)
    if end + CHECKSUM_SIZE != size:
        raise CorruptRecordError(_name(key, image_id), f"record is {size} bytes but its header (N={n}, D={d}, "
                                 f"C={c}, A={a}) implies {end + CHECKSUM_SIZE}; truncated or corrupt")
    if expect is not None and (d, c, a, fcode) != expect:
        raise CorruptRecordError(_name(key, image_id), f"header (D={d}, C={c}, A={a}, dtype code {fcode}) "
                                 f"disagrees with the shard's (D, C, A, dtype code) = {expect}")
    if verify:
        stored = _U64.unpack_from(mv, end)[0]
        actual = xxhash.xxh3_64_intdigest(mv[:end], seed=xxhash.xxh3_64_intdigest(key))
        if stored != actual:
            raise CorruptRecordError(_name(key, image_id),
                                     f"checksum mismatch (stored {stored:016x}, computed {actual:016x})")
    arrays = [np.ndarray(shape, dt, mv, off) for _, off, dt, shape in layout]
    extra = mv[extra_off:extra_off + extra_len] if extra_len else None
    return Record(_name(key, image_id), width, height, arrays[0], arrays[3], arrays[4] if c else None,
                  arrays[1], arrays[2], arrays[-1] if a else None, extra)


def _name(key: bytes, image_id: str | None) -> str:
    return image_id if image_id is not None else key.decode("utf-8", "replace")


def _header_problem(magic, version, header_size, fcode, width, height) -> str:
    if magic != MAGIC:
        return f"bad magic {magic!r} (expected {MAGIC!r}); not a regionbert record"
    if version != RECORD_VERSION or header_size != HEADER_SIZE:
        return (f"record version {version} / header size {header_size}: this reader knows version "
                f"{RECORD_VERSION} with a {HEADER_SIZE}-byte header; upgrade regionbert")
    if fcode not in FEATURE_DTYPES:
        return f"unknown feature dtype code {fcode}"
    return f"image size {width}x{height} is empty"


def stored_checksum(value) -> int:
    """The checksum a value carries (its last 8 bytes), without decoding it."""
    mv = memoryview(value)
    if mv.nbytes < CHECKSUM_SIZE:
        raise CorruptRecordError("?", "record shorter than its checksum")
    return struct.unpack_from("<Q", mv, mv.nbytes - CHECKSUM_SIZE)[0]


def peek_num_boxes(value) -> int:
    """N from a record's header without decoding it (-1 if the header is unreadable)."""
    mv = memoryview(value)
    if mv.nbytes < HEADER_SIZE or bytes(mv[:4]) != MAGIC:
        return -1
    return _HEADER.unpack_from(mv, 0)[5]


def header_num_boxes(key: bytes, value, size: int | None = None) -> int:
    """N from a record's header, the header checked as decode_record checks it (magic, version, sizes; the
    length the header implies equals the value's) but without the checksum: looks at the first 48 bytes only.
    size: the whole value's length, when `value` holds only its first bytes (read from the file by
    data/pagescan.py). CorruptRecordError for a header that is not a record's."""
    mv = memoryview(value)
    size = mv.nbytes if size is None else size
    if size < HEADER_SIZE + CHECKSUM_SIZE or mv.nbytes < HEADER_SIZE:
        raise CorruptRecordError(_name(key, None), f"record is {size} bytes, shorter than the {HEADER_SIZE}-byte "
                                 "header")
    (magic, version, header_size, width, height, n, d, c, a, fcode, _flags, _r0, extra_len,
     _r1) = _HEADER.unpack_from(mv, 0)
    if magic != MAGIC or version != RECORD_VERSION or header_size != HEADER_SIZE or fcode not in FEATURE_DTYPES \
            or not width or not height:
        raise CorruptRecordError(_name(key, None), _header_problem(magic, version, header_size, fcode, width, height))
    if _record_end(n, d, c, a, fcode, extra_len)[2] + CHECKSUM_SIZE != size:
        raise CorruptRecordError(_name(key, None), f"record is {size} bytes but its header (N={n}, D={d}, C={c}, "
                                 f"A={a}) implies another length; truncated or corrupt")
    return n


# ---- the box-count table (format 1.1): meta/BOX_COUNTS + chunk number --------------------------------


def header_counts(path: str, txn, records, order, n: int) -> np.ndarray:
    """The box counts of the first n order positions from their records' headers (header_num_boxes; py-lmdb
    still faults each value's pages in as it returns it), as uint32: for a format 1.0 shard, which has no
    table. ShardError naming the shard and the record for a missing record or a header that is not a record's."""
    counts = np.empty(n, dtype=np.uint32)
    i = -1
    for i, (_, key) in enumerate(txn.cursor(db=order)):
        if i == n:
            break
        key = bytes(key)
        value = txn.get(key, db=records) if 0 < len(key) <= MAX_KEY_BYTES else None
        if value is None:
            raise ShardError(f"{path}: order table entry {i} names {key!r}, which has no record; the shard is "
                             "damaged (`regionbert-shards verify`)")
        try:
            counts[i] = header_num_boxes(key, value)
        except CorruptRecordError as e:
            raise e.at(path) from None
    if n and i < n - 1:
        raise ShardError(f"{path}: order table holds {i + 1} entries, {n} expected; the shard is damaged")
    return counts


def box_chunk_key(k: int) -> bytes:
    return BOX_COUNTS + struct.pack(">I", k)


def encode_box_counts(counts) -> bytes:
    """Little-endian uint32 counts (a chunk's value)."""
    return np.asarray(counts, dtype=np.int64).astype(_BOX_DTYPE).tobytes()


def encode_box_table(counts) -> list[tuple[bytes, bytes]]:
    """A whole table as (meta key, value) pairs, chunk 0 first."""
    data = encode_box_counts(counts)
    step = BOX_CHUNK * _BOX_DTYPE.itemsize
    return [(box_chunk_key(k), data[off:off + step]) for k, off in enumerate(range(0, len(data), step))]


def box_table_chunks(path: str, txn, meta_db, count: int | None = None) -> list:
    """The values of the table's chunks, in order, as stored (buffers or bytes); [] if the shard has none.
    ShardError for a key under the table's prefix that is not the next chunk (a gap, a stray key). count: the
    shard's records; the scan stops one chunk past what they need (a forged table of a million chunks is
    refused after one too many, not read whole; decode_box_table then names the excess)."""
    out = []
    most = None if count is None else -(-count // BOX_CHUNK) + 1
    cur = txn.cursor(db=meta_db)
    if not cur.set_range(BOX_COUNTS):
        return out
    for key, value in cur:
        key = bytes(key)
        if not key.startswith(BOX_COUNTS):
            break
        if key != box_chunk_key(len(out)):
            raise ShardError(f"{path}: box-count table: meta key {key!r} is not chunk {len(out)} (expected "
                             f"{box_chunk_key(len(out))!r}); the table is damaged or forged")
        out.append(value)
        if most is not None and len(out) >= most:
            break
    return out


def decode_box_table(path: str, chunks: list, count: int) -> np.ndarray:
    """The stored chunks -> uint32 array of `count` box counts. ShardError naming the shard unless every chunk
    but the last holds exactly BOX_CHUNK counts, the last 1..BOX_CHUNK, and they add up to `count` (the
    order table's length). Sizes are checked before anything is allocated: a chunk is at most 16 KB."""
    if len(chunks) != -(-count // BOX_CHUNK):
        raise ShardError(f"{path}: box-count table has {len(chunks)} chunk(s), the shard's {count} records need "
                         f"{-(-count // BOX_CHUNK)}; the table is damaged or forged (`regionbert-shards verify`)")
    out = np.empty(count, dtype=np.uint32)
    for k, value in enumerate(chunks):
        want = min(BOX_CHUNK, count - k * BOX_CHUNK)
        nbytes = memoryview(value).nbytes
        if nbytes != want * _BOX_DTYPE.itemsize:
            raise ShardError(f"{path}: box-count table chunk {k} is {nbytes} bytes, not {want} uint32 counts "
                             f"(the shard has {count} records); the table is damaged or forged")
        out[k * BOX_CHUNK:k * BOX_CHUNK + want] = np.frombuffer(value, dtype=_BOX_DTYPE)
    return out


def min_box_bytes(meta: dict) -> int:
    """The fewest bytes one box takes in any record of a shard with this metadata (boxes, loc5, loc7, its
    feature row and its class and attribute rows, padding left out): sum(counts) times this cannot exceed
    data.mdb's size."""
    names, attrs = meta.get("class_names"), meta.get("attribute_names")
    feature = meta["feature_dim"] * np.dtype(meta["feature_dtype"]).itemsize
    return (4 + 5 + 7) * 4 + feature + 2 * (len(names or ()) + len(attrs or ()))


def declares_box_table(meta: dict) -> bool:
    """Whether the shard's metadata says it carries the box-count table (format 1.1 and later)."""
    return meta.get("schema_minor", 0) >= 1


# ---- shard metadata: one JSON object under meta/b"shard" -------------------------------------------


def make_meta(feature_dim: int, feature_dtype: str, class_names, attribute_names, extractor: dict,
              created: str) -> dict:
    return {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "feature_dim": int(feature_dim),
        "feature_dtype": feature_dtype,
        "class_names": None if class_names is None else [str(x) for x in class_names],
        "attribute_names": None if attribute_names is None else [str(x) for x in attribute_names],
        "box_format": "xyxy_pixels",
        "extractor": dict(extractor or {}),
        "created": created,
    }


def encode_json(obj: dict) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


MAX_JSON_DEPTH = 32  # metadata nests a few levels; anything deeper is refused before it can recurse


def _json_depth(obj) -> int:
    """Nesting depth of parsed JSON, iteratively (a hostile document cannot exhaust the stack here)."""
    depth, level = 0, [obj]
    while depth <= MAX_JSON_DEPTH:  # stops one level past the limit: deeper is refused whatever its depth
        level = [v for o in level if isinstance(o, (dict, list)) for v in (o.values() if isinstance(o, dict) else o)]
        if not level:
            break
        depth += 1
    return depth


def _load_json_object(path: str, what: str, raw) -> dict:
    try:
        obj = json.loads(bytes(raw).decode("utf-8"))
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
        raise ShardError(f"{path}: {what} is not valid UTF-8 JSON: {str(e)[:200]}") from None
    if not isinstance(obj, dict):
        raise ShardError(f"{path}: {what} must be a JSON object, got {type(obj).__name__}")
    if _json_depth(obj) > MAX_JSON_DEPTH:
        raise ShardError(f"{path}: {what} nests deeper than {MAX_JSON_DEPTH} levels; refused")
    return obj


def decode_meta(path: str, raw) -> dict:
    """Parse and check the shard metadata; raises ShardError naming the shard."""
    if raw is None:
        raise ShardError(f"{path}: no shard metadata; not a regionbert shard (or written by a crashed "
                         "writer before its first commit)")
    meta = _load_json_object(path, "shard metadata", raw)
    if meta.get("format") != FORMAT_NAME:
        raise ShardError(f"{path}: metadata does not describe a {FORMAT_NAME}")
    if meta.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{path}: schema version {meta.get('schema_version')!r}; this regionbert reads "
                         f"version {SCHEMA_VERSION}")
    dim = meta.get("feature_dim")
    if not isinstance(dim, int) or isinstance(dim, bool) or not 0 < dim < 2**32:
        raise ShardError(f"{path}: bad feature_dim {dim!r}")
    if meta.get("feature_dtype") not in FEATURE_DTYPE_CODES:
        raise ShardError(f"{path}: bad feature_dtype {meta.get('feature_dtype')!r}")
    for k in ("class_names", "attribute_names"):
        v = meta.get(k)
        if v is not None and not (isinstance(v, list) and all(isinstance(s, str) for s in v)):
            raise ShardError(f"{path}: {k} must be a list of strings or null")
    if meta.get("extractor") is not None and not isinstance(meta["extractor"], dict):
        raise ShardError(f"{path}: extractor must be a JSON object, got {type(meta['extractor']).__name__}")
    minor = meta.get("schema_minor", 0)
    if not isinstance(minor, int) or isinstance(minor, bool) or minor < 0:  # newer minors: compatible, read as 1
        raise ShardError(f"{path}: schema_minor must be a non-negative integer, got {minor!r}")
    job = (meta.get("extractor") or {}).get("job")
    if job is not None and not isinstance(job, dict):
        raise ShardError(f"{path}: extractor.job must be a JSON object, got {type(job).__name__}")
    return meta


def decode_state(path: str, raw) -> dict:
    """Parse and check the writer state ({} if there is none yet); raises ShardError naming the shard."""
    if raw is None:
        return {}
    state = _load_json_object(path, "shard state", raw)
    count, complete, digest = state.get("count"), state.get("complete"), state.get("content_hash")
    if count is not None and (not isinstance(count, int) or isinstance(count, bool) or count < 0):
        raise ShardError(f"{path}: shard state count must be a non-negative integer, got {count!r}")
    if complete is not None and not isinstance(complete, bool):
        raise ShardError(f"{path}: shard state complete must be true or false, got {complete!r}")
    if digest is not None and not isinstance(digest, str):
        raise ShardError(f"{path}: shard state content_hash must be a string, got {digest!r}")
    return state
