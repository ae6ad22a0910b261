"""HDF5 feature files: our own export layout (lossless) and the common padded layout, both ways.

Our layout ("regionbert-h5", version 1): records concatenated along one axis, like the shard itself.

    attrs   format = "regionbert-h5", version = 1, meta = the shard metadata as JSON
    ids       (R,)    fixed-length UTF-8 bytes (|S{longest id}), width, height (R,) uint32
    offsets   (R+1,)  int64: record i owns rows offsets[i]:offsets[i+1] of the arrays below
    boxes     (T, 4)  float32 xyxy pixels  features (T, D) float16/float32 (the shard's dtype)
    class_probs (T, C) float16, attr_probs (T, A) float16: only if the shard has them
    extra     (X,)    uint8: the records' extra JSON, UTF-8, concatenated; record i's is
                      extra[extra_offsets[i]:extra_offsets[i+1]] (empty = none); extra_offsets (R+1,) int64
(Fixed-length and byte arrays rather than variable-length strings, because HDF5 cannot checksum those.)

The padded layout (what many loaders read directly): R images padded to M boxes.

    image_id (R,) strings or ints (we write fixed-length UTF-8 bytes)   num_boxes (R,)
    image_w, image_h (R,) (or image_wh (R, 2))
    boxes (R, M, 4)   features (R, M, D)   class_probs (R, M, C), attr_probs (R, M, A): optional
    objects_id, attrs_id (R, M) int64, objects_conf, attrs_conf (R, M) float32: the hard labels LXMERT's
        loader reads (common.record_labels), written when the shard has a class distribution or labels
        kept from an LXMERT TSV; padding rows are 0

Every dataset we write is chunked with fletcher32 checksums, which HDF5 checks on every read; a damaged
chunk surfaces as an error naming the file and record. Both exports write FILE.partial and rename it
when complete. h5py is not fork-safe, so an HDF5 import reads in this process (no worker decode needed).
"""

from __future__ import annotations

import json
import os

import h5py
import numpy as np
from tqdm import tqdm

from ..format import peek_num_boxes
from ..reader import ShardSet
from .common import LABELS, ConvertError, Decoded, RowError, Settings, Source, describe, record_labels

FORMAT = "regionbert-h5"
VERSION = 1
CHUNK_BYTES = 1 << 20  # ~1 MiB chunks: the unit of fletcher32 checking and of partial reads
ALIASES = {  # padded-layout dataset names seen in the wild, first match wins
    "features": ("features", "image_features", "feats", "feature"),
    "boxes": ("boxes", "image_bb", "bbox", "bboxes", "bbox_pixels"),
    "num_boxes": ("num_boxes", "num_bbox", "num_bb", "num_regions"),
    "ids": ("image_id", "image_ids", "img_id", "ids"),
    "class_probs": ("class_probs", "cls_prob", "soft_labels"),
}


def _ds(f, name, shape_tail, dtype):
    """A resizable, checksummed dataset growing along axis 0."""
    row_bytes = int(np.prod(shape_tail, dtype=np.int64)) * np.dtype(dtype).itemsize or 1
    rows = max(1, min(65536, CHUNK_BYTES // row_bytes))
    return f.create_dataset(name, shape=(0, *shape_tail), maxshape=(None, *shape_tail), dtype=dtype,
                            chunks=(rows, *shape_tail), fletcher32=True)


def _append(ds, data) -> None:
    n = ds.shape[0]
    ds.resize(n + len(data), axis=0)
    ds[n:] = data


def export_h5(source, out: str, progress: bool = True, batch: int = 256) -> int:
    """Shards -> our HDF5 layout (lossless: importing it gives the same shard content hash)."""
    shards = ShardSet(source)
    meta = shards.meta
    dt = np.dtype(meta["feature_dtype"])
    tmp = out + ".partial"
    try:
        _write_ours(tmp, shards, meta, dt, progress, batch, out)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return len(shards)


def _write_ours(tmp: str, shards: ShardSet, meta: dict, dt, progress: bool, batch: int, out: str) -> None:
    with h5py.File(tmp, "w") as f, \
            tqdm(total=len(shards), desc=f"export hdf5 -> {out}", unit="rec", disable=not progress) as bar:
        f.attrs["format"], f.attrs["version"], f.attrs["meta"] = FORMAT, VERSION, json.dumps(meta)
        longest = max((len(k.encode()) for k in shards.keys()), default=1)
        ds = {"ids": _ds(f, "ids", (), f"S{longest}"), "width": _ds(f, "width", (), np.uint32),
              "height": _ds(f, "height", (), np.uint32), "extra": _ds(f, "extra", (), np.uint8),
              "boxes": _ds(f, "boxes", (4,), np.float32), "features": _ds(f, "features", (meta["feature_dim"],), dt)}
        for name, key in (("class_probs", "class_names"), ("attr_probs", "attribute_names")):
            if meta[key] is not None:
                ds[name] = _ds(f, name, (len(meta[key]),), np.float16)
        offsets, extra_offsets = [0], [0]
        for start in range(0, len(shards), batch):
            recs = [shards[i] for i in range(start, min(start + batch, len(shards)))]
            _append(ds["ids"], np.array([r.id.encode() for r in recs], dtype=f"S{longest}"))
            _append(ds["width"], [r.width for r in recs])
            _append(ds["height"], [r.height for r in recs])
            extras = [json.dumps(r.extra).encode() if r.extra else b"" for r in recs]
            _append(ds["extra"], np.frombuffer(b"".join(extras), np.uint8))
            for e in extras:
                extra_offsets.append(extra_offsets[-1] + len(e))
            for name in ("boxes", "features", "class_probs", "attr_probs"):
                if name in ds:
                    _append(ds[name], np.concatenate([getattr(r, name) for r in recs]))
            for r in recs:
                offsets.append(offsets[-1] + r.num_boxes)
            bar.update(len(recs))
        f.create_dataset("offsets", data=np.array(offsets, np.int64), fletcher32=True, chunks=True)
        f.create_dataset("extra_offsets", data=np.array(extra_offsets, np.int64), fletcher32=True, chunks=True)


def _has_labels(shards: ShardSet) -> bool:
    """Whether the records carry hard labels (a class distribution, or objects_id kept from LXMERT)."""
    if shards.meta["class_names"] is not None:
        return True
    return len(shards) > 0 and "objects_id" in (shards[0].extra or {})


def export_padded_h5(source, out: str, max_boxes: int | None = None, progress: bool = True, batch: int = 64) -> int:
    """Shards -> the padded layout. max_boxes: M (default: the largest record). A record with more boxes
    than M is refused (name a bigger --max-boxes), never silently truncated; nothing is left behind."""
    shards = ShardSet(source)
    meta = shards.meta
    if max_boxes is None:  # one cheap pass over the record headers
        max_boxes = max((peek_num_boxes(s.raw(s.key_at(i))) for s in shards.shards for i in range(len(s))),
                        default=0)
    r, m, d = len(shards), max(1, max_boxes), meta["feature_dim"]
    tmp = out + ".partial"
    try:
        with h5py.File(tmp, "w") as f, \
                tqdm(total=r, desc=f"export padded_hdf5 -> {out}", unit="rec", disable=not progress) as bar:
            _write_padded(f, shards, r, m, d, batch, bar)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return r


def _write_padded(f, shards: ShardSet, r: int, m: int, d: int, batch: int, bar) -> None:
    meta = shards.meta
    f.attrs["format"], f.attrs["meta"] = "padded", json.dumps(meta)
    chk = dict(fletcher32=True)
    feats = f.create_dataset("features", (r, m, d), np.dtype(meta["feature_dtype"]), chunks=(1, m, d), **chk)
    arrays = {"features": feats,
              "boxes": f.create_dataset("boxes", (r, m, 4), np.float32, chunks=(min(r, 256) or 1, m, 4), **chk)}
    for name, key in (("class_probs", "class_names"), ("attr_probs", "attribute_names")):
        if meta[key] is not None:
            k = len(meta[key])
            arrays[name] = f.create_dataset(name, (r, m, k), np.float16, chunks=(1, m, k), **chk)
    labels = _has_labels(shards)
    if labels:
        for name, dt in LABELS:
            arrays[name] = f.create_dataset(name, (r, m), dt, chunks=(min(r, 4096) or 1, m), **chk)
    num, wh, ids = np.zeros(r, np.int32), np.zeros((r, 2), np.int32), []
    for start in range(0, r, batch):
        stop = min(start + batch, r)
        buf = {k: np.zeros((stop - start, *ds.shape[1:]), ds.dtype) for k, ds in arrays.items()}
        for i in range(start, stop):
            rec = shards[i]
            n = rec.num_boxes
            if n > m:
                raise ConvertError(f"record {rec.id!r} has {n} boxes, more than --max-boxes {m}")
            num[i], wh[i] = n, (rec.width, rec.height)
            ids.append(rec.id)
            for k in ("features", "boxes", "class_probs", "attr_probs"):
                if k in buf:
                    buf[k][i - start, :n] = getattr(rec, k)
            if labels:
                lab = record_labels(rec, meta)
                if lab is None:
                    raise ConvertError(f"record {rec.id!r} has no class distribution or stored labels, unlike the "
                                       "first record")
                for k, _ in LABELS:
                    buf[k][i - start, :n] = lab[k]
        for k, ds in arrays.items():
            ds[start:stop] = buf[k]
        bar.update(stop - start)
    f.create_dataset("num_boxes", data=num, **chk)
    f.create_dataset("image_w", data=wh[:, 0], **chk)
    f.create_dataset("image_h", data=wh[:, 1], **chk)
    f.create_dataset("image_id", data=np.array([i.encode() for i in ids], dtype=bytes), **chk)  # |S: checksummable


# ---- import -------------------------------------------------------------------------------------------


def _str(x) -> str:
    return x.decode("utf-8") if isinstance(x, bytes) else str(x)


def _pick(f, what: str, path: str, required: bool = True):
    for name in ALIASES[what]:
        if name in f:
            return f[name]
    if required:
        raise ConvertError(f"{path}: no {what} dataset (looked for {', '.join(ALIASES[what])}); it has "
                           f"{sorted(f.keys())}")
    return None


def _read_records(path: str, fetch, start: int, stop: int) -> list:
    """fetch(a, b) -> list of (image_id, item) for records a..b-1. A read error (a fletcher32 mismatch)
    in the batch is narrowed down to the records it hits, which become RowErrors."""
    try:
        return fetch(start, stop)
    except OSError:
        out = []
        for i in range(start, stop):
            try:
                out += fetch(i, i + 1)
            except OSError as e:
                out.append((None, RowError(path, i, f"HDF5 read failed (checksum mismatch or damage): {e}")))
        return out


# Every dataset is checked (present, a dataset, its rank, dtype kind, and its length against the others)
# before a record is read: a file from elsewhere gets an error naming the file and dataset, not a traceback,
# and offsets that decrease or leave their arrays are refused naming the first row they break.
_STRINGS, _INTS, _FLOATS = "SOU", "iu", "f"
_KIND_NAMES = {"S": "string", "O": "string", "U": "string", "i": "integer", "u": "integer", "f": "float"}
_ROW_ERRORS = (ValueError, TypeError, OverflowError, UnicodeDecodeError, RecursionError, IndexError)


def _dataset(f, path: str, name: str, ndim: int, kinds: str, tail: tuple = (), rows: int | None = None):
    """f[name], checked: an HDF5 dataset of rank ndim, dtype kind in kinds, shape (rows, *tail)."""
    if name not in f:
        raise ConvertError(f"{path}: no {name!r} dataset; it has {sorted(f.keys())}")
    ds = f[name]
    if not isinstance(ds, h5py.Dataset):
        raise ConvertError(f"{path}: {name!r} is a {type(ds).__name__}, not a dataset")
    if ds.ndim != ndim or ds.dtype.kind not in kinds:
        raise ConvertError(f"{path}: dataset {name!r} is {ds.dtype} of shape {ds.shape}, expected {ndim}-D "
                           f"{' or '.join(dict.fromkeys(_KIND_NAMES[k] for k in kinds))}")
    if tail and tuple(ds.shape[1:]) != tuple(tail):
        raise ConvertError(f"{path}: dataset {name!r} has shape {ds.shape}, expected (N, {', '.join(map(str, tail))})")
    if rows is not None and ds.shape[0] != rows:
        raise ConvertError(f"{path}: dataset {name!r} has {ds.shape[0]} rows, expected {rows}")
    return ds


def _meta(f, path: str, required: bool) -> dict | None:
    raw = f.attrs.get("meta")
    if raw is None:
        if required:
            raise ConvertError(f"{path}: no 'meta' attribute (a regionbert-h5 file stores the shard metadata there)")
        return None
    try:
        meta = json.loads(raw)
    except (ValueError, TypeError, RecursionError) as e:
        raise ConvertError(f"{path}: attribute 'meta' is not JSON ({type(e).__name__})") from None
    if not isinstance(meta, dict):
        raise ConvertError(f"{path}: attribute 'meta' is JSON {type(meta).__name__}, not an object")
    return meta


def _check_offsets(path: str, name: str, offsets: np.ndarray, total: int) -> None:
    """offsets[0] == 0, never decreasing, offsets[-1] == total: else the row where it first goes wrong."""
    if offsets[0] != 0:
        raise ConvertError(f"{path}: {name}[0] is {int(offsets[0])}, not 0")
    steps = np.diff(offsets)
    if (steps < 0).any():
        i = int(np.flatnonzero(steps < 0)[0])
        raise ConvertError(f"{path} row {i}: {name} decrease ({name}[{i}] = {int(offsets[i])}, "
                           f"{name}[{i + 1}] = {int(offsets[i + 1])}): the file's layout is broken")
    if offsets[-1] != total:
        i = int(np.searchsorted(offsets, total, side="right"))
        where = f" row {i - 1}" if offsets[-1] > total else ""
        raise ConvertError(f"{path}{where}: {name} end at {int(offsets[-1])}, but the data has {total} rows")


def _row(path: str, i: int, make, image_id=None):
    """make() -> (image_id, Decoded), or a RowError naming the row if the file's values do not decode."""
    try:
        return make()
    except _ROW_ERRORS as e:
        return image_id, RowError(path, i, f"cannot read the row ({type(e).__name__}: {e})", image_id)


def _ours(f, path: str):
    meta = _meta(f, path, required=True)
    missing = [k for k in ("feature_dim", "class_names", "extractor", "attribute_names", "feature_dtype")
               if k not in meta]
    if missing or type(meta["feature_dim"]) is not int or meta["feature_dim"] < 1:
        raise ConvertError(f"{path}: attribute 'meta' lacks {missing or 'a positive feature_dim'}")
    settings = Settings(meta["feature_dim"], meta["class_names"], meta["extractor"],
                        meta["attribute_names"], meta["feature_dtype"])
    ids = _dataset(f, path, "ids", 1, _STRINGS)
    total = ids.shape[0]
    for k in ("width", "height"):
        _dataset(f, path, k, 1, _INTS, rows=total)
    offsets = _dataset(f, path, "offsets", 1, _INTS, rows=total + 1)[:].astype(np.int64)
    extra_offsets = _dataset(f, path, "extra_offsets", 1, _INTS, rows=total + 1)[:].astype(np.int64)
    boxes = _dataset(f, path, "boxes", 2, _FLOATS, tail=(4,))
    _dataset(f, path, "features", 2, _FLOATS, tail=(meta["feature_dim"],), rows=boxes.shape[0])
    arrays = []
    for name, key in (("class_probs", "class_names"), ("attr_probs", "attribute_names")):
        if name in f:
            width = len(meta[key]) if isinstance(meta[key], list) else -1
            _dataset(f, path, name, 2, _FLOATS, tail=(width,), rows=boxes.shape[0])
            arrays.append(name)
    extra_ds = _dataset(f, path, "extra", 1, "u")
    _check_offsets(path, "offsets", offsets, boxes.shape[0])
    _check_offsets(path, "extra_offsets", extra_offsets, extra_ds.shape[0])

    def fetch(a, b):
        lo, hi = int(offsets[a]), int(offsets[b])
        ids_b, w, h = (f[k][a:b] for k in ("ids", "width", "height"))
        extra = f["extra"][int(extra_offsets[a]):int(extra_offsets[b])].tobytes()
        block = {k: f[k][lo:hi] for k in ("boxes", "features", *arrays)}
        out = []
        for j in range(b - a):
            def make(j=j):
                s, e = int(offsets[a + j]) - lo, int(offsets[a + j + 1]) - lo
                image_id = _str(ids_b[j])
                fields = dict(width=int(w[j]), height=int(h[j]), **{k: v[s:e] for k, v in block.items()})
                x0, x1 = (int(extra_offsets[a + k]) - int(extra_offsets[a]) for k in (j, j + 1))
                fields["extra"] = json.loads(extra[x0:x1]) if x1 > x0 else None
                return image_id, Decoded(image_id, path, a + j, fields)
            out.append(_row(path, a + j, make))
        return out

    return settings, total, fetch


def _padded(f, path: str):
    feats = _pick(f, "features", path)
    total, m = (feats.shape + (0, 0))[:2]
    feats = _dataset(f, path, feats.name.lstrip("/"), 3, _FLOATS)
    boxes = _dataset(f, path, _pick(f, "boxes", path).name.lstrip("/"), 3, _FLOATS, tail=(m, 4), rows=total)
    num = _dataset(f, path, _pick(f, "num_boxes", path).name.lstrip("/"), 1, _INTS, rows=total)
    ids_ds = _dataset(f, path, _pick(f, "ids", path).name.lstrip("/"), 1, _STRINGS + _INTS, rows=total)
    probs = _pick(f, "class_probs", path, required=False)
    if probs is not None:
        probs = _dataset(f, path, probs.name.lstrip("/"), 3, _FLOATS, rows=total)
        if probs.shape[1] != m:
            raise ConvertError(f"{path}: dataset {probs.name!r} has shape {probs.shape}, expected ({total}, {m}, C)")
    if "image_wh" in f:
        wh = _dataset(f, path, "image_wh", 2, _INTS + _FLOATS, tail=(2,), rows=total)[:]
    elif "image_w" in f and "image_h" in f:
        wh = np.stack([_dataset(f, path, k, 1, _INTS + _FLOATS, rows=total)[:] for k in ("image_w", "image_h")], 1)
    else:
        raise ConvertError(f"{path}: no image size (image_w and image_h, or image_wh); boxes are pixels, so "
                           "the shard needs it")
    meta = _meta(f, path, required=False)
    names = meta.get("class_names") if meta and probs is not None else (
        None if probs is None else ["__background__", *(f"class_{i}" for i in range(1, probs.shape[2]))])
    if names is not None and (not isinstance(names, list) or len(names) != probs.shape[2]):
        raise ConvertError(f"{path}: meta's class_names do not match {probs.name!r}'s {probs.shape[2]} classes")
    extractor = describe("padded_hdf5", [path], padded_to=int(m),
                         class_distribution="none in the source" if probs is None else f"from {probs.name}")
    settings = Settings(int(feats.shape[2]), names, extractor,
                        feature_dtype=meta.get("feature_dtype") if meta else None)

    def fetch(a, b):
        n_all, ids = num[a:b], ids_ds[a:b]
        fb, bb = feats[a:b], boxes[a:b]
        pb = None if probs is None else probs[a:b]
        out = []
        for j in range(b - a):
            def make(j=j):
                n, image_id = int(n_all[j]), _str(ids[j])
                if not 0 <= n <= m:
                    return image_id, RowError(path, a + j, f"num_boxes {n} outside 0..{m}", image_id)
                fields = dict(width=int(wh[a + j, 0]), height=int(wh[a + j, 1]), boxes=bb[j, :n],
                              features=fb[j, :n], extra={"source_file": os.path.basename(path), "source_row": a + j})
                if pb is not None:
                    fields["class_probs"] = pb[j, :n]
                return image_id, Decoded(image_id, path, a + j, fields)
            out.append(_row(path, a + j, make))
        return out

    return settings, total, fetch


def h5_source(path: str, batch: int = 64) -> Source:
    """Our layout (auto-detected by its `format` attribute) or the padded layout."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ConvertError(f"{path}: cannot open as HDF5: {e}") from None
    try:
        if f.attrs.get("format") == FORMAT:
            if int(f.attrs.get("version", 0)) != VERSION:
                raise ConvertError(f"{path}: regionbert-h5 version {f.attrs.get('version')}; this reads {VERSION}")
            settings, total, fetch = _ours(f, path)
        else:
            settings, total, fetch = _padded(f, path)
    except OSError as e:  # a damaged header or index: not one row's fault
        f.close()
        raise ConvertError(f"{path}: cannot read its datasets: {e}") from None
    except BaseException:
        f.close()
        raise

    def batches(skip):
        try:
            for start in range(0, total, batch):
                items = _read_records(path, fetch, start, min(start + batch, total))
                yield [it for it in items if it[0] is None or not skip(it[0])]
        finally:
            f.close()

    return Source(settings, total, batches, _passthrough, parallel=False)


def _passthrough(batch: list, feature_dim: int, dtype: str) -> list:
    """HDF5 items are decoded when read; only the feature dtype may change."""
    out = []
    for _, d in batch:
        if isinstance(d, Decoded):
            d.fields["features"] = np.asarray(d.fields["features"]).astype(dtype, copy=False)
        out.append(d)
    return out
