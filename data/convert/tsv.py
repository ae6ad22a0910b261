"""bottom-up-attention and LXMERT TSV files: import (streamed in blocks of lines, decoded in parallel) and export.

Both are tab-separated, no header, one image per line, arrays as base64 of raw little-endian bytes:

    butd_tsv    image_id  image_w  image_h  num_boxes  boxes  features
    lxmert_tsv  img_id  img_h  img_w  objects_id  objects_conf  attrs_id  attrs_conf  num_boxes  boxes  features

boxes (N, 4) float32 xyxy pixels; features (N, D) float32; objects_id / attrs_id (N,) int64;
objects_conf / attrs_conf (N,) float32. Row numbers in errors are 1-based line numbers of the file
(lines end at \n; a \r before it is part of the line ending, and the first line's ending is recorded so
the export writes the same). Each line must be UTF-8 (in practice ASCII); one that is not is a bad row.

What a shard keeps from an LXMERT TSV: objects_id is only the argmax over the non-background classes
and objects_conf its probability, not the distribution, so the shard stores no class_probs (its
class_names is null) and keeps the hard labels in each record's `extra` (objects_id, objects_conf,
attrs_id, attrs_conf, as in the file: 0-based over the non-background classes). Exporting to LXMERT
TSV derives them from the class distribution (common.record_labels), or takes them from `extra` for
shards that came from an LXMERT TSV. Exporting to bottom-up-attention TSV writes integer ids (numeric_ids).
"""

from __future__ import annotations

import base64
import binascii
import functools
import os
import re
import warnings

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..reader import ShardSet
from .common import (
    LABELS,
    ConvertError,
    Decoded,
    ExportWarning,
    RowError,
    Settings,
    Source,
    check_boxes,
    describe,
    record_labels,
)

FIELDS = {
    "butd_tsv": ["image_id", "image_w", "image_h", "num_boxes", "boxes", "features"],
    "lxmert_tsv": ["img_id", "img_h", "img_w", "objects_id", "objects_conf", "attrs_id", "attrs_conf", "num_boxes",
                   "boxes", "features"],
}
FORMAT_BY_FIELD_COUNT = {len(f): name for name, f in FIELDS.items()}
TRAILING_NUMBER = re.compile(r"([0-9]+)$")


# ---- reading ------------------------------------------------------------------------------------------


def line_ending(path: str) -> str:
    """'crlf' or 'lf': how the file's first line ends (kept in the metadata, so export writes it back)."""
    with open(path, "rb") as f:
        return "crlf" if f.readline().endswith(b"\r\n") else "lf"


def sniff(path: str) -> str | None:
    """'butd_tsv' / 'lxmert_tsv' from the first line's field count, or None."""
    try:
        with open(path, "rb") as f:
            line = f.readline()
    except OSError as e:
        raise ConvertError(f"{path}: cannot read: {e}") from None
    return FORMAT_BY_FIELD_COUNT.get(line.rstrip(b"\r\n").count(b"\t") + 1)


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


def split_lines(buf: bytes) -> list[tuple[bytes, bool]]:
    """A block of whole lines -> [(line without its ending, ended with CRLF)]. Lines end at b"\n" only, as
    scan_blocks counts them, so row numbers agree; a final line without a newline is still a line."""
    parts = buf.split(b"\n")
    if parts and parts[-1] == b"":
        parts.pop()  # the block ends with a newline
    return [(p[:-1], True) if p.endswith(b"\r") else (p, False) for p in parts]


def text_of(file: str, row: int, raw: bytes) -> str:
    """A line's bytes as text, or a RowError naming the row and the first byte that is not UTF-8."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        head = raw[:raw.find(b"\t")] if b"\t" in raw else b""
        raise RowError(file, row, f"not UTF-8 text: byte 0x{raw[e.start]:02x} at column {e.start + 1} "
                       f"({e.reason})", head.decode("utf-8", "replace") or None) from None


def decode_block(batch: list, feature_dim: int, dtype: str, fmt: str) -> list:
    """Worker: [(None, (file, offset, length, first_row, skip_rows))] -> [Decoded | RowError], in file order.
    The worker reads and splits its own block, so the main process never parses base64 text and only the
    decoded arrays cross the process boundary. It never raises: whatever goes wrong with a row (or with
    reading the block) comes back as a RowError in its place, so the driver sees every good row before a
    bad one, whatever the number of workers."""
    out = []
    for _, (file, offset, length, first_row, skip_rows) in batch:
        try:
            with open(file, "rb") as f:
                f.seek(offset)
                buf = f.read(length)
        except OSError as e:
            out.append(RowError(file, first_row, f"cannot read the rows from here on: {e}"))
            continue
        for i, (raw, _crlf) in enumerate(split_lines(buf)):
            row = first_row + i
            if row in skip_rows:
                continue
            try:
                out.append(decode_line(fmt, file, row, text_of(file, row, raw), feature_dim, dtype))
            except RowError as e:
                out.append(e)
            except Exception as e:  # noqa: BLE001 - a row we did not foresee still names its row
                out.append(RowError(file, row, f"unexpected {type(e).__name__}: {e}"))
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

    endings = sorted({line_ending(p) for p in paths})
    extractor = describe(fmt, paths, features_from="float32 base64 in the TSV",
                         line_ending=endings[0] if len(endings) == 1 else "mixed",
                         class_distribution="none in the source" if fmt == "butd_tsv" else
                         "none in the source: hard labels (objects_id, objects_conf, attrs_id, attrs_conf) "
                         "kept in each record's extra, 0-based over the non-background classes")
    return Source(Settings(feature_dim, None, extractor), None, batches,
                  functools.partial(decode_block, fmt=fmt))


def _probe_dim(paths: list[str], fmt: str, rows: int = 64) -> int:
    """The feature dim of the first row that decodes and has boxes (stated in the shard's metadata)."""
    for p in paths:
        with open(p, "rb") as f:
            for row in range(1, rows + 1):
                raw = f.readline()
                if not raw:
                    break
                try:
                    d = decode_line(fmt, p, row, text_of(p, row, split_lines(raw)[0][0]), None, "float32")
                except RowError:
                    continue
                if d.fields["features"].shape[0]:
                    return d.fields["features"].shape[1]
    raise ConvertError(f"{paths[0]}: no row among the first {rows} of each file decodes with at least one box, so "
                       "the feature dim is unknown; pass --feature-dim")


# ---- writing ------------------------------------------------------------------------------------------


def _b64(a, dtype) -> str:
    return base64.b64encode(np.ascontiguousarray(a, dtype=np.dtype(dtype).newbyteorder("<")).tobytes()).decode()


def hard_labels(rec, meta: dict, shard: str) -> dict:
    """objects_id/conf and attrs_id/conf (N,) for LXMERT (see common.record_labels), or a ConvertError."""
    out = record_labels(rec, meta)
    if out is None:
        raise ConvertError(f"{shard}: record {rec.id!r} has no class distribution and no stored objects_id/"
                           "objects_conf, which an LXMERT TSV needs; export --to butd_tsv instead")
    return out


def numeric_ids(ids, out: str) -> dict[str, str]:
    """bottom-up-attention's reader does int(image_id): each id -> the decimal number it ends with
    ('COCO_train2014_000000132417' -> '132417', '42' -> '42'). Refuses (before anything is written) ids
    with no trailing number and two ids that end in the same number."""
    mapped: dict[str, str] = {}
    owner: dict[str, str] = {}
    for image_id in ids:
        m = TRAILING_NUMBER.search(image_id)
        if m is None:
            raise ConvertError(f"{out}: image id {image_id!r} does not end in a number; a bottom-up-attention TSV "
                               "holds integer ids (its reader does int(image_id)). Export --to lxmert_tsv (string "
                               "ids) instead")
        num = str(int(m.group(1)))
        if num in owner:
            raise ConvertError(f"{out}: image ids {owner[num]!r} and {image_id!r} both become {num} in a "
                               "bottom-up-attention TSV (integer ids); export --to lxmert_tsv (string ids) instead")
        owner[num] = image_id
        mapped[image_id] = num
    return mapped


def _line_ending(shards: ShardSet) -> str:
    """The line ending an import recorded (so a CRLF file comes back CRLF), else LF."""
    found = {(s.meta.get("extractor") or {}).get("line_ending") for s in shards.shards}
    return "\r\n" if found == {"crlf"} else "\n"


def _dropped_labels(shards: ShardSet) -> list[str]:
    """What a shard holds that a bottom-up-attention TSV (6 fields) has no column for."""
    meta = shards.meta
    out = []
    if meta.get("class_names"):
        out.append("class distributions (class_probs)")
    if meta.get("attribute_names"):
        out.append("attribute distributions (attr_probs)")
    if not out and any(s.meta.get("extractor", {}).get("source_format") == "lxmert_tsv" for s in shards.shards):
        out.append("the LXMERT object/attribute labels")
    return out


def export_tsv(source, out: str, fmt: str = "lxmert_tsv", progress: bool = True) -> int:
    """Shards -> one TSV file (written to OUT.partial, renamed when complete; removed if the export fails).
    butd_tsv ids become the number each id ends with (see numeric_ids); the original ids go to
    OUT.ids.csv when any differs. Lines end as the imported file's did (CRLF or LF), else LF.
    Returns the record count."""
    if fmt not in FIELDS:
        raise ConvertError(f"unknown TSV format {fmt!r}; one of {sorted(FIELDS)}")
    shards = ShardSet(source)
    ids = numeric_ids(shards.keys(), out) if fmt == "butd_tsv" else None
    if fmt == "butd_tsv" and (dropped := _dropped_labels(shards)):
        warnings.warn(ExportWarning(f"{out}: a bottom-up-attention TSV has no columns for {' and '.join(dropped)}; "
                                    "they are not exported (export --to lxmert_tsv keeps objects_id/objects_conf "
                                    "and attrs_id/attrs_conf)"), stacklevel=2)
    eol = _line_ending(shards)
    tmp = out + ".partial"
    empty = 0
    try:
        with open(tmp, "w", newline="") as f, \
                tqdm(total=len(shards), desc=f"export {fmt} -> {out}", unit="rec", disable=not progress) as bar:
            for shard in shards.shards:
                for i in range(len(shard)):
                    rec = shard[i]
                    empty += rec.num_boxes == 0
                    f.write("\t".join(_row(fmt, shard, rec, ids)) + eol)
                    bar.update(1)
        if ids is not None and any(k != v for k, v in ids.items()):
            pd.DataFrame({"image_id": list(ids.values()), "original_id": list(ids)}).to_csv(
                out + ".ids.csv", index=False)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    if empty:
        warnings.warn(ExportWarning(f"{out}: {empty} records have no boxes; the original readers (LXMERT's "
                                    "load_obj_tsv, bottom-up-attention's read_tsv.py) fail on them: numpy cannot "
                                    "reshape an empty features field to (0, -1)"), stacklevel=2)
    return len(shards)


def _row(fmt: str, shard, rec, ids: dict | None) -> list[str]:
    if any(c in rec.id for c in "\t\r\n"):
        raise ConvertError(f"{shard.path}: record {rec.id!r} has a tab or newline in its id, which a TSV cannot hold")
    boxes, feats = _b64(rec.boxes, np.float32), _b64(rec.features, np.float32)
    n = str(rec.num_boxes)
    if fmt == "butd_tsv":
        return [ids[rec.id], str(rec.width), str(rec.height), n, boxes, feats]
    lab = hard_labels(rec, shard.meta, shard.path)
    return [rec.id, str(rec.height), str(rec.width), *(_b64(lab[k], dt) for k, dt in LABELS), n, boxes, feats]
