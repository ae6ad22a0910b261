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


def h5_source(path: str, batch: int = 64) -> Source:
    """Our layout (auto-detected by its `format` attribute) or the padded layout."""
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise ConvertError(f"{path}: cannot open as HDF5: {e}") from None
    ours = f.attrs.get("format") == FORMAT
    if ours:
        if int(f.attrs.get("version", 0)) != VERSION:
            raise ConvertError(f"{path}: regionbert-h5 version {f.attrs.get('version')}; this reads {VERSION}")
        meta = json.loads(f.attrs["meta"])
        settings = Settings(meta["feature_dim"], meta["class_names"], meta["extractor"],
                            meta["attribute_names"], meta["feature_dtype"])
        total = f["ids"].shape[0]
        offsets, extra_offsets = f["offsets"][:], f["extra_offsets"][:]
        arrays = [n for n in ("class_probs", "attr_probs") if n in f]

        def fetch(a, b):
            lo, hi = int(offsets[a]), int(offsets[b])
            ids, w, h = (f[k][a:b] for k in ("ids", "width", "height"))
            extra = f["extra"][int(extra_offsets[a]):int(extra_offsets[b])].tobytes()
            block = {k: f[k][lo:hi] for k in ("boxes", "features", *arrays)}
            out = []
            for j in range(b - a):
                s, e = int(offsets[a + j]) - lo, int(offsets[a + j + 1]) - lo
                fields = dict(width=int(w[j]), height=int(h[j]), **{k: v[s:e] for k, v in block.items()})
                x0, x1 = (int(extra_offsets[a + k]) - int(extra_offsets[a]) for k in (j, j + 1))
                fields["extra"] = json.loads(extra[x0:x1]) if x1 > x0 else None
                out.append((_str(ids[j]), Decoded(_str(ids[j]), path, a + j, fields)))
            return out
    else:
        feats, boxes, num = _pick(f, "features", path), _pick(f, "boxes", path), _pick(f, "num_boxes", path)
        ids_ds, probs = _pick(f, "ids", path), _pick(f, "class_probs", path, required=False)
        if "image_wh" in f:
            wh = f["image_wh"][:]
        elif "image_w" in f and "image_h" in f:
            wh = np.stack([f["image_w"][:], f["image_h"][:]], 1)
        else:
            raise ConvertError(f"{path}: no image size (image_w and image_h, or image_wh); boxes are pixels, so "
                               "the shard needs it")
        total, m = feats.shape[0], feats.shape[1]
        if not (boxes.shape[:2] == (total, m) and num.shape == (total,) and wh.shape[0] == total):
            raise ConvertError(f"{path}: padded datasets disagree: features {feats.shape}, boxes {boxes.shape}, "
                               f"num_boxes {num.shape}, sizes {wh.shape}")
        meta = json.loads(f.attrs["meta"]) if "meta" in f.attrs else None
        names = meta["class_names"] if meta and probs is not None else (
            None if probs is None else ["__background__", *(f"class_{i}" for i in range(1, probs.shape[2]))])
        extractor = describe("padded_hdf5", [path], padded_to=int(m),
                             class_distribution="none in the source" if probs is None else f"from {probs.name}")
        settings = Settings(int(feats.shape[2]), names, extractor,
                            feature_dtype=meta["feature_dtype"] if meta else None)

        def fetch(a, b):
            n_all, ids = num[a:b], ids_ds[a:b]
            fb, bb = feats[a:b], boxes[a:b]
            pb = None if probs is None else probs[a:b]
            out = []
            for j in range(b - a):
                n, image_id = int(n_all[j]), _str(ids[j])
                if not 0 <= n <= m:
                    out.append((image_id, RowError(path, a + j, f"num_boxes {n} outside 0..{m}", image_id)))
                    continue
                fields = dict(width=int(wh[a + j, 0]), height=int(wh[a + j, 1]), boxes=bb[j, :n], features=fb[j, :n],
                              extra={"source_file": os.path.basename(path), "source_row": a + j})
                if pb is not None:
                    fields["class_probs"] = pb[j, :n]
                out.append((image_id, Decoded(image_id, path, a + j, fields)))
            return out

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
