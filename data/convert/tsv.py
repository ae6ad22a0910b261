"""bottom-up-attention and LXMERT TSV files: import (streamed in pandas chunks, decoded in parallel) and export.

Both are tab-separated, no header, one image per line, arrays as base64 of raw little-endian bytes:

    butd_tsv    image_id  image_w  image_h  num_boxes  boxes  features
    lxmert_tsv  img_id  img_h  img_w  objects_id  objects_conf  attrs_id  attrs_conf  num_boxes  boxes  features

boxes (N, 4) float32 xyxy pixels; features (N, D) float32; objects_id / attrs_id (N,) int64;
objects_conf / attrs_conf (N,) float32. Row numbers in errors are 1-based line numbers of the file.

What a shard keeps from an LXMERT TSV: objects_id is only the argmax over the non-background classes
and objects_conf its probability, not the distribution, so the shard stores no class_probs (its
class_names is null) and keeps the hard labels in each record's `extra` (objects_id, objects_conf,
attrs_id, attrs_conf, as in the file: 0-based over the non-background classes). Exporting to LXMERT
TSV derives them from the class distribution (argmax over classes 1.., id = class index - 1), or
takes them from `extra` for shards that came from an LXMERT TSV.
"""

from __future__ import annotations

import base64
import binascii
import csv
import functools
import io
import os

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..reader import ShardSet
from .common import ConvertError, Decoded, RowError, Settings, Source, check_boxes, describe

FIELDS = {
    "butd_tsv": ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"],
    "lxmert_tsv": ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes",
                   "boxes", "features"],
}
FORMAT_BY_FIELD_COUNT = {len(f): name for name, f in FIELDS.items()}
LABELS = (("objects_id", np.int64), ("objects_conf", np.float32), ("attrs_id", np.int64), ("attrs_conf", np.float32))
NO_ATTRIBUTE = ("__no_attribute__", "no_attribute", "__background__", "")  # BUTD: attribute 0 means none


# ---- reading ------------------------------------------------------------------------------------------


def sniff(path: str) -> str | None:
    """'butd_tsv' / 'lxmert_tsv' from the first line's field count, or None."""
    try:
        with open(path, "rb") as f:
            line = f.readline()
    except OSError as e:
        raise ConvertError(f"{path}: cannot read: {e}") from None
    return FORMAT_BY_FIELD_COUNT.get(line.rstrip(b"\r\n").count(b"\t") + 1)


def read_lines(path, chunk_rows: int, name: str | None = None):
    """Yield (first row number, [lines]) chunks of a file (a path or a binary buffer). Each line is read as ONE
    string column (the separator is a control character that base64 never contains) and split on tabs by us:
    pandas' C parser would otherwise pad short rows with NaN or stop the whole file at a long one, where we
    want a per-row error.
    The C parser has no field size limit (csv.field_size_limit only concerns the csv module)."""
    row = 1
    try:
        chunks = pd.read_csv(path, sep="\x1f", header=None, names=["line"], dtype=str, quoting=csv.QUOTE_NONE,
                             na_filter=False, skip_blank_lines=False, engine="c", chunksize=chunk_rows,
                             encoding="utf-8")
        for chunk in chunks:
            lines = chunk["line"].tolist()
            yield row, lines
            row += len(lines)
    except (pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise ConvertError(f"{name or path}: cannot read as a TSV near row {row}: {e}") from None


def _int(file, row, image_id, name, text) -> int:
    try:
        v = float(text)
    except ValueError:
        raise RowError(file, row, f"field {name} is {text[:40]!r}, not a number", image_id) from None
    if not v.is_integer():
        raise RowError(file, row, f"field {name} is {text[:40]!r}, not an integer", image_id)
    return int(v)


def _array(file, row, image_id, name, text, dtype, n, cols) -> np.ndarray:
    """base64 -> array. cols: an int for (n, cols), 0 for (n,), None for (n, D) with D inferred."""
    try:
        raw = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as e:
        raise RowError(file, row, f"field {name} is not valid base64 ({e})", image_id) from None
    dtype = np.dtype(dtype).newbyteorder("<")
    values, rest = divmod(len(raw), dtype.itemsize)
    if cols is None:
        fits = not rest and (values % n == 0 and values >= n if n else values == 0)
        shape, want = (n, values // n if n else 0), f"{n} x D"
    else:
        fits = not rest and values == n * max(cols, 1)
        shape, want = ((n, cols) if cols else (n,)), (f"{n} x {cols}" if cols else str(n))
    if not fits:
        raise RowError(file, row, f"field {name} holds {len(raw)} bytes ({len(raw) / dtype.itemsize:g} "
                       f"{dtype.name} values), which does not fit num_boxes={n} ({want} values)", image_id)
    return np.frombuffer(raw, dtype=dtype).reshape(shape)


def decode_line(fmt: str, file: str, row: int, line: str, feature_dim: int | None, dtype: str) -> Decoded:
    """One TSV line -> Decoded, or RowError naming file and row."""
    names = FIELDS[fmt]
    parts = line.split("\t")
    if len(parts) != len(names):
        raise RowError(file, row, f"{len(parts)} tab-separated fields, expected {len(names)} ({' '.join(names)})")
    f = dict(zip(names, parts, strict=True))
    image_id = f[names[0]]
    if not image_id:
        raise RowError(file, row, f"empty {names[0]}")
    w, h, n = (_int(file, row, image_id, k, f[k]) for k in (names[1], names[2], "num_boxes"))
    w, h = (w, h) if fmt == "butd_tsv" else (h, w)  # LXMERT writes img_h first
    if w <= 0 or h <= 0 or n < 0:
        raise RowError(file, row, f"image size {w}x{h} / num_boxes {n} must be positive", image_id)
    boxes = _array(file, row, image_id, "boxes", f["boxes"], np.float32, n, 4)
    feats = _array(file, row, image_id, "features", f["features"], np.float32, n, None)
    if n == 0:
        feats = np.zeros((0, feature_dim or 0), np.float32)
    if feature_dim is not None and n and feats.shape[1] != feature_dim:
        raise RowError(file, row, f"features have {feats.shape[1]} values per box; this shard's feature dim is "
                       f"{feature_dim} (taken from the first row)", image_id)
    check_boxes(file, row, boxes, w, h, image_id)
    out = feats.astype(dtype)  # convert in the worker: half the bytes to send back for float16
    if not np.isfinite(out).all():
        raise RowError(file, row, f"features contain NaN or inf as {dtype} (|x| > 65504 overflows float16; "
                       "import with --dtype float32)", image_id)
    extra = {"source_file": os.path.basename(file), "source_row": row}
    if fmt == "lxmert_tsv":
        for name, dt in LABELS:
            extra[name] = _array(file, row, image_id, name, f[name], dt, n, 0).tolist()
    return Decoded(image_id, file, row, dict(width=w, height=h, boxes=boxes, features=out, extra=extra))


def decode_block(batch: list, feature_dim: int, dtype: str, fmt: str) -> list:
    """Worker: [(None, (file, offset, length, first_row, skip_rows))] -> [Decoded | RowError], in file order.
    The worker reads and parses its own block (pandas), so the main process never parses base64 text and
    only the decoded arrays cross the process boundary."""
    out = []
    for _, (file, offset, length, first_row, skip_rows) in batch:
        with open(file, "rb") as f:
            f.seek(offset)
            buf = f.read(length)
        for first, lines in read_lines(io.BytesIO(buf), len(buf) + 1, name=file):
            for i, line in enumerate(lines):
                row = first_row + first - 1 + i
                if row in skip_rows:
                    continue
                try:
                    out.append(decode_line(fmt, file, row, line, feature_dim, dtype))
                except RowError as e:
                    out.append(e)
    return out


def scan_blocks(path: str, block_rows: int, skip):
    """Main process: split the file into blocks of block_rows lines, by byte offset. Reads each line once in
    binary (at memory speed, one line in memory at a time) only to find the boundaries and the ids; rows whose
    id is already in the shard are listed so the worker skips them."""
    with open(path, "rb") as f:
        row, start = 1, 0
        while True:
            skip_rows, first = set(), row
            for _ in range(block_rows):
                line = f.readline()
                if not line:
                    break
                image_id = line[:line.find(b"\t")].decode("utf-8", "replace") if b"\t" in line else ""
                if image_id and skip(image_id):
                    skip_rows.add(row)
                row += 1
            end = f.tell()
            if end == start:
                return
            if len(skip_rows) < row - first:
                yield [(None, (path, start, end - start, first, skip_rows))]
            start = end


def tsv_source(paths: list[str], fmt: str | None = None, chunk_rows: int = 8, feature_dim: int | None = None) -> Source:
    """An import Source over one or more TSV files of the same format (e.g. BUTD's .tsv.0 ... .tsv.3).
    chunk_rows: lines per block handed to a worker (and read by it as one pandas chunk)."""
    for p in paths:
        if not os.path.isfile(p):
            raise ConvertError(f"{p}: no such file")
    found = {p: sniff(p) for p in paths}
    fmt = fmt or found[paths[0]]
    if fmt not in FIELDS:
        raise ConvertError(f"{paths[0]}: first line has a field count of neither a bottom-up-attention TSV "
                           f"(6) nor an LXMERT TSV (10); name the format with --from")
    if feature_dim is None:
        feature_dim = _probe_dim(paths, fmt)

    def batches(skip):
        for p in paths:
            yield from scan_blocks(p, chunk_rows, skip)

    extractor = describe(fmt, paths, features_from="float32 base64 in the TSV",
                         class_distribution="none in the source" if fmt == "butd_tsv" else
                         "none in the source: hard labels (objects_id, objects_conf, attrs_id, attrs_conf) "
                         "kept in each record's extra, 0-based over the non-background classes")
    return Source(Settings(feature_dim, None, extractor), None, batches,
                  functools.partial(decode_block, fmt=fmt))


def _probe_dim(paths: list[str], fmt: str) -> int:
    """The feature dim of the first row that decodes and has boxes (stated in the shard's metadata)."""
    for p in paths:
        for first, lines in read_lines(p, 64):
            for i, line in enumerate(lines):
                try:
                    d = decode_line(fmt, p, first + i, line, None, "float32")
                except RowError:
                    continue
                if d.fields["features"].shape[0]:
                    return d.fields["features"].shape[1]
            break  # only the first chunk of each file
    raise ConvertError(f"{paths[0]}: no row among the first of each file decodes with at least one box, so the "
                       "feature dim is unknown; pass --feature-dim")


# ---- writing ------------------------------------------------------------------------------------------


def _b64(a, dtype) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).decode()


def hard_labels(rec, meta: dict, shard: str) -> dict:
    """objects_id/conf and attrs_id/conf (N,) for LXMERT, from the distributions or the record's extra."""
    n, extra = rec.num_boxes, rec.extra or {}
    out = {}
    if rec.class_probs is not None:
        p = np.asarray(rec.class_probs[:, 1:], np.float32)  # background (class 0) never wins
        ids = p.argmax(1) if n else np.zeros(0, np.int64)
        out["objects_id"], out["objects_conf"] = ids, p[np.arange(n), ids]
    elif "objects_id" in extra and "objects_conf" in extra:
        out["objects_id"], out["objects_conf"] = extra["objects_id"], extra["objects_conf"]
    else:
        raise ConvertError(f"{shard}: record {rec.id!r} has no class distribution and no stored objects_id/"
                           "objects_conf, which an LXMERT TSV needs; export --to butd_tsv instead")
    names = meta.get("attribute_names")
    if rec.attr_probs is not None:
        skip = 1 if names and names[0] in NO_ATTRIBUTE else 0
        p = np.asarray(rec.attr_probs[:, skip:], np.float32)
        ids = p.argmax(1) if n else np.zeros(0, np.int64)
        out["attrs_id"], out["attrs_conf"] = ids, p[np.arange(n), ids]  # 0-based after "no attribute"
    elif "attrs_id" in extra and "attrs_conf" in extra:
        out["attrs_id"], out["attrs_conf"] = extra["attrs_id"], extra["attrs_conf"]
    else:  # no attributes in the shard: confidence 0 (LXMERT weights the attribute loss by it)
        out["attrs_id"], out["attrs_conf"] = np.zeros(n, np.int64), np.zeros(n, np.float32)
    return out


def export_tsv(source, out: str, fmt: str = "lxmert_tsv", progress: bool = True) -> int:
    """Shards -> one TSV file (written to OUT.partial, renamed when complete). Returns the record count."""
    if fmt not in FIELDS:
        raise ConvertError(f"unknown TSV format {fmt!r}; one of {sorted(FIELDS)}")
    shards = ShardSet(source)
    tmp = out + ".partial"
    with open(tmp, "w", newline="\n") as f, \
            tqdm(total=len(shards), desc=f"export {fmt} -> {out}", unit="rec", disable=not progress) as bar:
        for shard in shards.shards:
            for i in range(len(shard)):
                rec = shard[i]
                if any(c in rec.id for c in "\t\r\n"):
                    raise ConvertError(f"{shard.path}: record {rec.id!r} has a tab or newline in its id, which a "
                                       "TSV cannot hold")
                boxes, feats = _b64(rec.boxes, np.float32), _b64(rec.features, np.float32)
                n = str(rec.num_boxes)
                if fmt == "butd_tsv":
                    row = [rec.id, str(rec.width), str(rec.height), n, boxes, feats]
                else:
                    lab = hard_labels(rec, shard.meta, shard.path)
                    row = [rec.id, str(rec.height), str(rec.width), *(_b64(lab[k], dt) for k, dt in LABELS),
                           n, boxes, feats]
                f.write("\t".join(row) + "\n")
                bar.update(1)
    os.replace(tmp, out)
    return len(shards)
