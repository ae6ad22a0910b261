"""Parquet: shards as files a Hugging Face hub hosts and `datasets.load_dataset("parquet", ...)` reads, both ways.

Layout of an export folder (docs/formats.md, "Parquet"):

    OUT/README.md                                   the data-set card (data/card.py), hub YAML front matter
    OUT/data/train-00000-of-00003.parquet ...       one row per image, in the shards' order, split at a size

Columns (one row per image; N = the image's box count, which varies, so arrays are nested lists):

    image_id   string                                     the shard key
    width, height, num_boxes  uint32
    boxes      list<fixed_size_list<float32, 4>>          (N, 4) xyxy pixels
    loc5, loc7 list<fixed_size_list<float32, 5 / 7>>      the location vectors the shard stores
    features   list<fixed_size_list<float16, D>>          (N, D), the shard's dtype (float16 stays float16)
    class_probs list<fixed_size_list<float16, C>>         only when the shard has a class distribution
    attr_probs  list<fixed_size_list<float16, A>>         only when it has an attribute distribution
    extra      string (null)                              the record's extra, as the JSON the shard stores

`datasets` reads these as List(List(Value(dtype), length=K)) from the Arrow schema that pyarrow stores in
each file. Each file's key-value metadata holds, under b"regionbert", JSON: {format, version, meta (the
shard metadata, vocabularies included), shards (the source shards: name, count, content hash), total_rows,
first_row (this file's first row in the whole export)}, so any one file says what it is and where it fits.

Export streams: row groups of `row_group` images are built and written one at a time (memory is one row
group, never the shard), and a new file starts when the next row group would take the current one past
`max_file_bytes`. Every shard is verified first (data/isolate.py: checksums, record rules, complete):
a damaged, incomplete or unverifiable shard is refused naming it, before anything is written, since a
published copy of a bad shard spreads the damage. Files are written into OUT.partial/ and the folder is
renamed to OUT when whole, so OUT is never a half export.

Import checks every file's metadata and schema before anything is written (columns present, types as the
metadata's feature_dim, class and attribute counts say, the files covering rows 0..total_rows-1 once), then
reads one row group at a time and checks each row's shapes (every list as long as num_boxes, each inner
list as wide as its column) and that its location vectors are the ones its boxes give; a row that is not
is an error naming the file, row group, row and column, and nothing of it is written. Records go through
the import driver (common.run_import, ShardWriter): the writer lock, resume and commit rules hold, and a
round trip is exact (same ids in the same order, same arrays bit for bit, same extra, same metadata, so the
same content hash).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat

import numpy as np
from tqdm import tqdm

from ..format import decode_meta, encode_extra, location_vectors
from ..reader import ShardSet, resolve_sources
from .common import ConvertError, Decoded, RowError, Settings, Source

FORMAT = "regionbert-parquet"
VERSION = 1
META_KEY = b"regionbert"
DATA_DIR = "data"
DEFAULT_FILE_BYTES = 500 * 10**6  # the hub's advice: Parquet files of a few hundred MB
DEFAULT_ROW_GROUP = 128  # images per row group: the unit of writing, reading and memory
ARRAYS = (("boxes", 4), ("loc5", 5), ("loc7", 7))  # float32 arrays every record has, and their widths


def _pa():
    """pyarrow, at least 15: earlier versions cannot write float16 to Parquet."""
    import pyarrow as pa

    if int(pa.__version__.split(".")[0]) < 15:
        raise ConvertError(f"Parquet export/import needs pyarrow >= 15 (float16 in Parquet), this is {pa.__version__}; "
                           "pip install -e '.[hf]'")
    return pa


# ---- the schema ---------------------------------------------------------------------------------------


def array_columns(meta: dict) -> list[tuple[str, int, str]]:
    """(column, width, numpy dtype) of the per-box array columns this shard's metadata implies, in order."""
    cols = [(name, w, "float32") for name, w in ARRAYS]
    cols.append(("features", meta["feature_dim"], meta["feature_dtype"]))
    if meta.get("class_names") is not None:
        cols.append(("class_probs", len(meta["class_names"]), "float16"))
    if meta.get("attribute_names") is not None:
        cols.append(("attr_probs", len(meta["attribute_names"]), "float16"))
    return cols


def schema(meta: dict):
    pa = _pa()
    fields = [pa.field("image_id", pa.string(), nullable=False)]
    fields += [pa.field(k, pa.uint32(), nullable=False) for k in ("width", "height", "num_boxes")]
    for name, width, dt in array_columns(meta):
        fields.append(pa.field(name, pa.list_(pa.list_(pa.from_numpy_dtype(np.dtype(dt)), width)), nullable=False))
    fields.append(pa.field("extra", pa.string()))
    return pa.schema(fields)


def _nested(pa, arrays: list[np.ndarray], width: int, dtype: str):
    """(N_i, width) arrays -> one list<fixed_size_list<dtype, width>> array, without a per-value Python loop."""
    flat = np.concatenate([np.asarray(a, dtype=dtype).reshape(-1) for a in arrays]) if arrays else np.zeros(0, dtype)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat, type=pa.from_numpy_dtype(np.dtype(dtype))), width)
    offsets = np.zeros(len(arrays) + 1, np.int32)
    np.cumsum([len(a) for a in arrays], out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), inner)


def _table(pa, recs: list, sch, meta: dict):
    cols = {"image_id": pa.array([r.id for r in recs], pa.string()),
            "width": pa.array([r.width for r in recs], pa.uint32()),
            "height": pa.array([r.height for r in recs], pa.uint32()),
            "num_boxes": pa.array([r.num_boxes for r in recs], pa.uint32())}
    for name, width, dt in array_columns(meta):
        cols[name] = _nested(pa, [getattr(r, name) for r in recs], width, dt)
    # the exact bytes the shard stores (compact, key-sorted): re-importing gives the same record checksum
    cols["extra"] = pa.array([encode_extra(r.extra).decode() or None for r in recs], pa.string())
    return pa.Table.from_arrays([cols[f.name] for f in sch], schema=sch)


# ---- export -------------------------------------------------------------------------------------------


def verify_for_export(paths: list[str], progress: bool = True, what: str = "export") -> list[dict]:
    """Run `verify` (in a child process, data/isolate.py) on every shard; refuse the first that is damaged,
    incomplete or otherwise not OK, naming it. Returns [{name, path, count, content_hash}] of the verified."""
    from ..isolate import verify_isolated

    out = []
    for path in paths:
        with tqdm(desc=f"verify {path}", unit="rec", disable=not progress, leave=False) as bar:
            r = verify_isolated(path, progress=bar.update, total=lambda n, bar=bar: setattr(bar, "total", n))
        if not r.ok:
            why = r.problems[:1] or [f"record {k!r}: {reason}" for k, reason in r.bad[:1]]
            more = len(r.problems) + len(r.bad) - 1
            raise ConvertError(f"{path}: refused: `regionbert-shards verify` finds it not OK ({why[0]}"
                               f"{f'; and {more} more' if more > 0 else ''}); a {what} must not publish a damaged "
                               "or incomplete shard: restore or finish it first")
        out.append({"name": os.path.basename(os.path.normpath(path)), "path": os.path.abspath(path),
                    "count": r.count, "content_hash": r.content_hash})
    return out


def _clear_partial(tmp: str) -> None:
    """Remove OUT.partial left by an interrupted export: only the files an export writes there, never
    following a link; anything else in it is refused (it is not ours to delete)."""
    try:
        st = os.lstat(tmp)
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise ConvertError(f"{tmp}: exists and is not a folder (a link or a file); not touched: move it away")
    data = os.path.join(tmp, DATA_DIR)
    names = sorted(os.listdir(tmp))
    files = sorted(os.listdir(data)) if "data" in names and stat.S_ISDIR(os.lstat(data).st_mode) else []
    ours = set(names) <= {"README.md", DATA_DIR} and all(n.endswith(".parquet") for n in files)
    if not ours or any(not stat.S_ISREG(os.lstat(os.path.join(data, n)).st_mode) for n in files):
        raise ConvertError(f"{tmp}: exists (an interrupted export?) but holds files this export does not write; "
                           "not touched: remove it yourself")
    for n in files:
        os.unlink(os.path.join(data, n))
    if DATA_DIR in names:
        os.rmdir(data)
    if "README.md" in names:
        os.unlink(os.path.join(tmp, "README.md"))
    os.rmdir(tmp)


def export_parquet(source, out: str, *, max_file_bytes: int = DEFAULT_FILE_BYTES, row_group: int = DEFAULT_ROW_GROUP,
                   split: str = "train", progress: bool = True, card: bool = True) -> list[str]:
    """Shards (a shard, a folder of shards, an index file, or a list) -> the folder `out` (layout above).
    Returns the Parquet files written. `out` must not exist."""
    pa = _pa()
    if row_group < 1 or max_file_bytes < 1:
        raise ConvertError(f"row group ({row_group}) and file size ({max_file_bytes}) must be positive")
    if not split or not split.replace("_", "").replace("-", "").isalnum():
        raise ConvertError(f"split name {split!r}: letters, digits, '-' and '_' only (it becomes a file name)")
    out = os.path.normpath(out)
    if os.path.lexists(out):
        raise ConvertError(f"{out}: exists; a Parquet export writes a new folder (remove it or name another)")
    paths, _ = resolve_sources(source)
    verified = verify_for_export(paths, progress)
    shards = ShardSet(source)  # (checks index entries' counts and hashes, and that the shards agree)
    tmp = out + ".partial"
    _clear_partial(tmp)
    os.mkdir(tmp)
    try:
        files = _write_files(pa, shards, verified, os.path.join(tmp, DATA_DIR), max_file_bytes, row_group, split,
                             progress, out)
        if card:
            from ..card import write_card

            write_card(shards, os.path.join(tmp, "README.md"), verified=verified,
                       parquet=[os.path.join(tmp, DATA_DIR, f) for f in files], split=split)
        os.rename(tmp, out)
    except BaseException:
        _clear_partial(tmp)
        raise
    return [os.path.join(out, DATA_DIR, f) for f in files]


def file_metadata(meta: dict, verified: list[dict], total: int, first_row: int) -> dict:
    return {"format": FORMAT, "version": VERSION, "meta": meta, "total_rows": total, "first_row": first_row,
            "shards": [{k: v[k] for k in ("name", "count", "content_hash")} for v in verified]}


def _write_files(pa, shards: ShardSet, verified, folder: str, max_bytes: int, row_group: int, split: str,
                 progress: bool, out: str) -> list[str]:
    import pyarrow.parquet as pq

    os.mkdir(folder)
    meta, total = shards.meta, len(shards)
    sch = schema(meta)
    parts: list[str] = []
    writer = f = None
    # room for the footer: the key-value metadata, stored twice (as itself and in the Arrow schema), and the
    # row groups' column statistics
    footer = 2 * len(json.dumps(file_metadata(meta, verified, total, 0))) + (64 << 10)
    try:
        with tqdm(total=total, desc=f"export parquet -> {out}", unit="rec", disable=not progress) as bar:
            for start in range(0, max(total, 1), row_group):  # (an empty shard still gives one file)
                stop = min(start + row_group, total)
                table = _table(pa, [shards[i] for i in range(start, stop)], sch, meta)
                # a new file when this row group would take the current one past the limit (a row group
                # bigger than the limit gets a file of its own: files are split between row groups only)
                if writer is not None and f.tell() + table.nbytes + footer > max_bytes:
                    writer.close()
                    f.close()
                    writer = None
                if writer is None:
                    parts.append(os.path.join(folder, f"part-{len(parts):05d}.parquet"))
                    md = file_metadata(meta, verified, total, start)
                    f = open(parts[-1], "xb")  # (exclusive: a fresh folder of ours, nothing is overwritten)
                    writer = pq.ParquetWriter(f, sch.with_metadata({META_KEY: json.dumps(md).encode()}))
                writer.write_table(table, row_group_size=row_group)
                bar.update(stop - start)
        writer.close()
        writer = None
    finally:
        if writer is not None:
            writer.close()
        if f is not None:
            f.close()
    names = []
    for i, p in enumerate(parts):  # the hub's naming, once the number of files is known
        names.append(f"{split}-{i:05d}-of-{len(parts):05d}.parquet")
        os.rename(p, os.path.join(folder, names[-1]))
    return names


def sha256_file(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


# ---- import -------------------------------------------------------------------------------------------


def is_parquet(path: str) -> bool:
    """A Parquet file (magic PAR1), or a folder holding one (an export folder)."""
    if os.path.isdir(path):
        return bool(_find_files(path, strict=False))
    try:
        with open(path, "rb") as f:
            return f.read(4) == b"PAR1"
    except OSError:
        return False


def _find_files(folder: str, strict: bool = True) -> list[str]:
    """The *.parquet files under folder (sorted), never through a link: a linked file or folder is refused."""
    out = []
    for root, dirs, files in os.walk(folder):  # (os.walk does not descend into linked folders)
        dirs.sort()
        for n in sorted(files):
            if not n.endswith(".parquet"):
                continue
            p = os.path.join(root, n)
            if not stat.S_ISREG(os.lstat(p).st_mode):
                if strict:
                    raise ConvertError(f"{p}: not a regular file (a link?); refused")
                continue
            out.append(p)
    return out


def _loads(path: str, raw: bytes) -> dict:
    try:
        obj = json.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ConvertError(f"{path}: its {META_KEY.decode()!r} metadata is not JSON ({type(e).__name__})") from None
    if not isinstance(obj, dict):
        raise ConvertError(f"{path}: its {META_KEY.decode()!r} metadata is not a JSON object")
    return obj


def _read_header(pq, path: str) -> tuple:
    """(ParquetFile, our metadata) of one file, or ConvertError naming it."""
    try:
        pf = pq.ParquetFile(path)
        kv = pf.schema_arrow.metadata or {}
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise ConvertError(f"{path}: cannot read as Parquet: {e}") from None
    if META_KEY not in kv:
        raise ConvertError(f"{path}: no {META_KEY.decode()!r} key-value metadata: not written by "
                           "`regionbert-shards export --to parquet` (the shard metadata is needed to import it)")
    md = _loads(path, kv[META_KEY])
    if md.get("format") != FORMAT or md.get("version") != VERSION:
        raise ConvertError(f"{path}: metadata says format {md.get('format')!r} version {md.get('version')!r}; "
                           f"this reads {FORMAT} version {VERSION}")
    md["meta"] = decode_meta(path, json.dumps(md.get("meta")).encode())  # the shard's own checks (format.py)
    for k in ("total_rows", "first_row"):
        v = md.get(k)
        if type(v) is not int or v < 0:
            raise ConvertError(f"{path}: metadata {k} is {v!r}, not a non-negative integer")
    return pf, md


def _check_schema(pa, path: str, pf, meta: dict) -> None:
    """Every column the metadata implies is there with its type (inner lists fixed at their width, or plain
    lists checked row by row), and no array column the metadata does not imply."""
    got = pf.schema_arrow
    want = schema(meta)
    for f in want:
        i = got.get_field_index(f.name)
        if i < 0:
            raise ConvertError(f"{path}: no column {f.name!r} (the metadata implies it); the file has "
                               f"{got.names}")
        t = got.field(i).type
        if f.name in ("image_id", "extra"):
            ok = pa.types.is_string(t) or pa.types.is_large_string(t)
        elif f.name in ("width", "height", "num_boxes"):
            ok = pa.types.is_integer(t)
        else:
            ok = _nested_ok(pa, t, f.type)
        if not ok:
            raise ConvertError(f"{path}: column {f.name!r} is {t}, expected {f.type} (metadata: feature_dim "
                               f"{meta['feature_dim']}, {meta['feature_dtype']}, "
                               f"{len(meta['class_names'] or ())} classes, "
                               f"{len(meta['attribute_names'] or ())} attributes)")
    extra = {"class_probs", "attr_probs"} & set(got.names) - set(want.names)
    if extra:
        raise ConvertError(f"{path}: column(s) {sorted(extra)} but the metadata has no "
                           f"{'class_names' if 'class_probs' in extra else 'attribute_names'} for them")


def _nested_ok(pa, t, want) -> bool:
    """list<fixed_size_list<T, W>> as written, or list<list<T>> (another tool's rewrite; widths checked per row)."""
    if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
        return False
    inner, w_inner = t.value_type, want.value_type
    if pa.types.is_fixed_size_list(inner):
        return inner.list_size == w_inner.list_size and inner.value_type == w_inner.value_type
    return (pa.types.is_list(inner) or pa.types.is_large_list(inner)) and inner.value_type == w_inner.value_type


def _plan(pq, pa, paths: list[str]) -> tuple[dict, list]:
    """Open and check every file before anything is written: its header and schema, one shard metadata for
    all, and rows 0..total-1 covered exactly once. Returns (metadata, [(first_row, path, ParquetFile)])."""
    files, first = [], None
    for path in paths:
        pf, md = _read_header(pq, path)
        if first is None:
            first = md
        elif md["meta"] != first["meta"] or md["total_rows"] != first["total_rows"]:
            raise ConvertError(f"{path}: its metadata differs from {files[0][1]}'s (files of different exports?)")
        _check_schema(pa, path, pf, md["meta"])
        files.append((md["first_row"], path, pf))
    files.sort(key=lambda x: x[0])
    row = 0
    for start, path, pf in files:
        if start != row:
            what = "overlaps the file before" if start < row else f"leaves rows {row}..{start - 1} missing"
            raise ConvertError(f"{path}: starts at row {start}, which {what} (a file missing or given twice?)")
        row += pf.metadata.num_rows
    if row != first["total_rows"]:
        raise ConvertError(f"{files[-1][1]}: the files hold {row} rows, their metadata says {first['total_rows']} "
                           "(a file missing?)")
    return first, files


class _Bad(Exception):
    """A column of a row group that is not as its schema and metadata say: (column, row in group, reason)."""

    def __init__(self, column: str, row: int | None, reason: str):
        self.column, self.row, self.reason = column, row, reason
        super().__init__(reason)


def _lists(pa, col, name: str, width: int, dtype: str, num: np.ndarray) -> list:
    """One nested column of a row group -> a list of (n_i, width) numpy arrays (views of Arrow's buffers),
    after checking: no nulls, each row's length its num_boxes, each inner list `width` long."""
    arr = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    if arr.null_count:
        raise _Bad(name, int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0]), "null instead of a list")
    lengths = arr.value_lengths().to_numpy(zero_copy_only=False).astype(np.int64)
    wrong = np.flatnonzero(lengths != num)
    if len(wrong):
        i = int(wrong[0])
        raise _Bad(name, i, f"{lengths[i]} rows, but num_boxes is {num[i]}")
    inner = arr.flatten()
    if inner.null_count:
        raise _Bad(name, None, "a null box row")
    if pa.types.is_fixed_size_list(inner.type):
        values = inner.flatten()
    else:
        widths = inner.value_lengths().to_numpy(zero_copy_only=False)
        bad = np.flatnonzero(widths != width)
        if len(bad):
            row = int(np.searchsorted(np.cumsum(lengths), bad[0], side="right"))
            raise _Bad(name, row, f"a box row of {widths[bad[0]]} values, expected {width}")
        values = inner.flatten()
    if values.null_count:
        raise _Bad(name, None, "null values")
    flat = values.to_numpy(zero_copy_only=False)
    if flat.dtype != np.dtype(dtype) or flat.size != int(lengths.sum()) * width:
        raise _Bad(name, None, f"{flat.size} {flat.dtype} values for {int(lengths.sum())} boxes of {width} {dtype}")
    flat = flat.reshape(-1, width)
    ends = np.cumsum(lengths)
    return [flat[e - n:e] for n, e in zip(lengths, ends, strict=True)]


def _ints(col, name: str) -> np.ndarray:
    arr = col.combine_chunks() if hasattr(col, "combine_chunks") else col
    if arr.null_count:
        raise _Bad(name, int(np.flatnonzero(arr.is_null().to_numpy(zero_copy_only=False))[0]), "null")
    a = arr.to_numpy(zero_copy_only=False).astype(np.int64)
    bad = np.flatnonzero((a < (0 if name == "num_boxes" else 1)) | (a >= 2**32))
    if len(bad):
        raise _Bad(name, int(bad[0]), f"{a[bad[0]]} is not a {'count' if name == 'num_boxes' else 'size'} in uint32")
    return a


def _row_group(pa, path: str, pf, g: int, first: int, meta: dict) -> list:
    """Row group g of one file (its rows first.. of the file) -> [(image_id, Decoded)]. Structure errors
    (nulls, lengths, widths) raise ConvertError naming file, row group, row and column; a row whose location
    vectors are not its boxes' becomes a RowError of that row (its record is not written)."""
    cols = array_columns(meta)
    try:
        t = pf.read_row_group(g, columns=["image_id", "width", "height", "num_boxes", *(c[0] for c in cols), "extra"])
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path} row group {g}: cannot read it: {e}") from None
    rows = t.num_rows
    try:
        ids = t.column("image_id").to_pylist()
        if any(i is None for i in ids):
            raise _Bad("image_id", ids.index(None), "null")
        w, h, num = (_ints(t.column(k), k) for k in ("width", "height", "num_boxes"))
        arrays = {name: _lists(pa, t.column(name), name, width, dt, num) for name, width, dt in cols}
        extras = t.column("extra").to_pylist()
    except _Bad as e:
        at = "" if e.row is None else f" row {first + e.row}"
        raise ConvertError(f"{path} row group {g}{at} column {e.column!r}: {e.reason} (metadata: feature_dim "
                           f"{meta['feature_dim']}, {len(meta['class_names'] or ())} classes, "
                           f"{len(meta['attribute_names'] or ())} attributes); nothing of this row group was "
                           "written") from None
    out = []
    for j in range(rows):
        where = f"{path} row group {g}"
        fields = dict(width=int(w[j]), height=int(h[j]), **{k: v[j] for k, v in arrays.items()
                                                          if k not in ("loc5", "loc7")})
        problem = _check_row(fields, arrays["loc5"][j], arrays["loc7"][j], extras[j])
        if problem:
            out.append((ids[j], RowError(where, first + j, problem, ids[j])))
            continue
        fields["extra"] = json.loads(extras[j]) if extras[j] is not None else None
        out.append((ids[j], Decoded(ids[j], where, first + j, fields)))
    return out


def _check_row(fields: dict, loc5: np.ndarray, loc7: np.ndarray, extra) -> str | None:
    """Why the row cannot be the record it claims (a column named), or None."""
    if extra is not None:
        try:
            e = json.loads(extra)
        except (ValueError, RecursionError) as err:
            return f"column 'extra': not JSON ({type(err).__name__})"
        if not isinstance(e, dict):
            return "column 'extra': not a JSON object"
    boxes = fields["boxes"]
    if not np.isfinite(boxes).all():
        return "column 'boxes': NaN or inf"
    want5, want7 = location_vectors(boxes, fields["width"], fields["height"])
    for name, got, want in (("loc5", loc5, want5), ("loc7", loc7, want7)):
        if not np.array_equal(got.view(np.uint32), want.view(np.uint32)):
            return (f"column {name!r}: not the location vectors of the row's boxes and image size (the file was "
                    "edited: boxes, size and location vectors disagree)")
    return None


def parquet_source(inputs: list[str], batch_rows: int | None = None) -> Source:
    """The import Source for Parquet files or export folders (all files of one export, any order)."""
    pa = _pa()
    import pyarrow.parquet as pq

    paths = []
    for p in inputs:
        if os.path.isdir(p):
            found = _find_files(p)
            if not found:
                raise ConvertError(f"{p}: no .parquet files in this folder")
            paths += found
        elif os.path.isfile(p):
            paths.append(p)
        else:
            raise ConvertError(f"{p}: no such file or folder")
    if len({os.path.realpath(p) for p in paths}) != len(paths):
        raise ConvertError(f"{inputs}: a Parquet file given twice")
    md, files = _plan(pq, pa, paths)
    meta = md["meta"]
    settings = Settings(meta["feature_dim"], meta["class_names"], meta["extractor"], meta["attribute_names"],
                        meta["feature_dtype"])

    def batches(skip):
        for _, path, pf in files:
            row = 0  # rows are numbered within their file (0-based, as pyarrow counts them)
            for g in range(pf.metadata.num_row_groups):
                items = _row_group(pa, path, pf, g, row, meta)
                row += len(items)
                yield [it for it in items if not skip(it[0])]

    return Source(settings, md["total_rows"], batches, _passthrough, parallel=False)


def _passthrough(batch: list, feature_dim: int, dtype: str) -> list:
    return [d for _, d in batch]


__all__ = ["DEFAULT_FILE_BYTES", "DEFAULT_ROW_GROUP", "FORMAT", "META_KEY", "array_columns", "export_parquet",
           "file_metadata", "is_parquet", "parquet_source", "schema", "sha256_file", "verify_for_export"]
