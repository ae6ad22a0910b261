"""UNITER-style npz folders: one `.npz` per image; the image id is its path relative to the folder, without
`.npz` (UNITER's folders are flat, so that is the file name; ids with '/' become subfolders on export).

    norm_bb      (N, 6) or (N, 7) float: x1/W, y1/H, x2/W, y2/H, w/W, h/H[, area]  (normalised, no W or H)
    features     (N, D) float16
    conf         (N,) float32, the best non-background class probability (convert_imgdir.py's box threshold)
    soft_labels  (N, C) float32, the full class distribution, background (index 0) included (UNITER's MRC)

UNITER's matching and masked-language paths need only norm_bb and features. A shard without a class
distribution exports those, `conf` where the records keep LXMERT's objects_conf, and no soft_labels; the
export says what is missing (run convert_imgdir.py with --keep_all or --conf_th -1 when there is no conf,
and leave out the region-classification tasks that read soft_labels). Such npz import back without a
class distribution.

The npz holds no image size, and a shard stores boxes in pixels, so the import needs the sizes from
elsewhere: `sizes`, a CSV/TSV/JSONL/JSON file with columns image_id, width, height (the export writes
one next to the npz files). Without it the import refuses, naming the file. `conf` is not stored: it is
the maximum of soft_labels over classes 1.. and the export recomputes it. Files are read with
allow_pickle=False: an npz holding Python objects is rejected, never unpickled.
"""

from __future__ import annotations

import functools
import json
import os
import warnings
import zipfile

import numpy as np
import pandas as pd
from tqdm import tqdm

from ..reader import ShardSet
from .common import ConvertError, Decoded, ExportWarning, RowError, Settings, Source, check_boxes, describe

KEYS = ("norm_bb", "features")  # required; conf and soft_labels are optional
SIZES_NAME = "image_sizes.csv"


def read_sizes(path: str) -> dict[str, tuple[int, int]]:
    """image_id -> (width, height) from a CSV/TSV/JSONL/JSON table."""
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".json":
            df = pd.DataFrame(json.load(open(path)))
        elif ext == ".jsonl":
            df = pd.read_json(path, lines=True, dtype=False)
        else:
            df = pd.read_csv(path, sep="\t" if ext == ".tsv" else ",", dtype={"image_id": str})
    except (OSError, ValueError) as e:
        raise ConvertError(f"{path}: cannot read image sizes: {e}") from None
    missing = [c for c in ("image_id", "width", "height") if c not in df.columns]
    if missing:
        raise ConvertError(f"{path}: image size table lacks column(s) {missing}; it has {list(df.columns)}")
    return {str(i): (int(w), int(h)) for i, w, h in zip(df["image_id"], df["width"], df["height"], strict=True)}


def decode_file(path: str, image_id: str, size, feature_dim: int, dtype: str, with_classes: bool) -> Decoded:
    name = os.path.basename(path)
    if size is None:
        raise RowError(path, None, "no image size for this id in the sizes file", image_id)
    w, h = size
    try:
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in KEYS if k not in z.files]
            if missing:
                raise RowError(path, None, f"lacks key(s) {missing}; it has {sorted(z.files)}", image_id)
            nbb, feats = z["norm_bb"], z["features"]
            probs = z["soft_labels"] if with_classes and "soft_labels" in z.files else None
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise RowError(path, None, f"not a readable npz ({e})", image_id) from None
    n = feats.shape[0] if feats.ndim == 2 else -1
    if n < 0 or nbb.ndim != 2 or nbb.shape[0] != n or nbb.shape[1] not in (6, 7):
        raise RowError(path, None, f"norm_bb {nbb.shape} and features {feats.shape} must be (N, 6 or 7) and "
                       "(N, D)", image_id)
    if n and feats.shape[1] != feature_dim:
        raise RowError(path, None, f"features have {feats.shape[1]} values per box; the shard's feature dim is "
                       f"{feature_dim} (taken from the first file)", image_id)
    # (N, 4) normalised -> pixels, computed in float64 and rounded once
    boxes = (np.asarray(nbb[:, :4], np.float64) * np.array([w, h, w, h], np.float64)).astype(np.float32)
    check_boxes(path, None, boxes, w, h, image_id)
    fields = dict(width=w, height=h, boxes=boxes, features=np.asarray(feats).astype(dtype).reshape(n, feature_dim),
                  extra={"source_file": name})
    if with_classes:
        if probs is None:
            raise RowError(path, None, "no soft_labels, unlike the first file", image_id)
        if probs.ndim != 2 or probs.shape[0] != n:
            raise RowError(path, None, f"soft_labels {probs.shape} must be (N={n}, C)", image_id)
        fields["class_probs"] = probs
    return Decoded(image_id, path, None, fields)


def decode_batch(batch: list, feature_dim: int, dtype: str, with_classes: bool) -> list:
    out = []
    for image_id, (path, size) in batch:
        try:
            out.append(decode_file(path, image_id, size, feature_dim, dtype, with_classes))
        except RowError as e:
            out.append(e)
    return out


def npz_source(folder: str, sizes: str | None, class_names: list[str] | None = None, no_classes: bool = False,
               batch_files: int = 8) -> Source:
    if not os.path.isdir(folder):
        raise ConvertError(f"{folder}: not a folder of npz files")
    files = sorted(os.path.relpath(os.path.join(root, n), folder).replace(os.sep, "/")
                   for root, _, names in os.walk(folder) for n in names if n.endswith(".npz"))
    if not files:
        raise ConvertError(f"{folder}: no .npz files")
    if sizes is None and os.path.isfile(os.path.join(folder, SIZES_NAME)):
        sizes = os.path.join(folder, SIZES_NAME)
    if sizes is None:
        raise ConvertError(f"{folder}: UNITER npz files store boxes normalised by an image size they do not record; "
                           f"pass --sizes FILE (columns image_id,width,height) or put {SIZES_NAME} in the folder")
    size_of = read_sizes(sizes)
    with np.load(os.path.join(folder, files[0]), allow_pickle=False) as z:
        if any(k not in z.files for k in KEYS):
            raise ConvertError(f"{os.path.join(folder, files[0])}: not a UNITER npz (keys {sorted(z.files)})")
        dim = z["features"].shape[-1]
        num_classes = z["soft_labels"].shape[-1] if "soft_labels" in z.files else None
    if num_classes is None and class_names is not None:
        raise ConvertError(f"--class-names given, but {files[0]} has no soft_labels")
    no_classes = no_classes or num_classes is None
    if no_classes:
        class_names = None
    elif class_names is None:  # the npz has no names: number them, and say so in the metadata
        class_names = ["__background__", *(f"class_{i}" for i in range(1, num_classes))]
        named = f"generic names class_1..class_{num_classes - 1} (the npz holds none; pass --class-names)"
    elif len(class_names) != num_classes:
        raise ConvertError(f"--class-names lists {len(class_names)} classes, but {files[0]} has soft_labels over "
                           f"{num_classes} (background included)")
    else:
        named = "from --class-names"

    def batches(skip):
        todo = [f[:-4] for f in files if not skip(f[:-4])]
        for j in range(0, len(todo), batch_files):
            yield [(i, (os.path.join(folder, i + ".npz"), size_of.get(i))) for i in todo[j:j + batch_files]]

    extractor = describe("uniter_npz", [folder], image_sizes_from=os.path.abspath(sizes),
                         class_distribution=("none in the source" if num_classes is None else
                                             "dropped (--no-class-probs)") if no_classes else
                         f"soft_labels; class names: {named}")
    return Source(Settings(int(dim), class_names, extractor, feature_dtype=None), len(files), batches,
                  functools.partial(decode_batch, with_classes=not no_classes))


def export_npz(source, out: str, progress: bool = True) -> int:
    """Shards -> a folder of UNITER npz files plus image_sizes.csv. Each file is written under a temporary
    name and renamed, so a file with the final name is always whole; the sizes file comes last. A shard
    without a class distribution exports what it has and warns about the rest (module docstring)."""
    shards = ShardSet(source)
    classes = shards.meta["class_names"] is not None
    if not classes:
        first = shards[0].extra if len(shards) else None
        has_conf = bool(first) and "objects_conf" in first
        missing = "soft_labels" if has_conf else "soft_labels and conf"
        warnings.warn(ExportWarning(
            f"{out}: the shard stores no class distribution, so the npz files have norm_bb and features"
            f"{' and conf (LXMERT objects_conf)' if has_conf else ''} but no {missing}: UNITER's matching and "
            "masked-language tasks work; region classification (soft_labels) does not"
            + ("" if has_conf else "; run convert_imgdir.py with --keep_all or --conf_th -1 (no conf)")),
            stacklevel=2)
    os.makedirs(out, exist_ok=True)
    rows = []
    with tqdm(total=len(shards), desc=f"export uniter_npz -> {out}", unit="rec", disable=not progress) as bar:
        for i in range(len(shards)):
            rec = shards[i]
            if rec.id.startswith("/") or any(p in ("", ".", "..") for p in rec.id.split("/")):
                raise ConvertError(f"record {rec.id!r}: this id cannot be a file path inside {out}")
            arrays = {"norm_bb": np.concatenate([rec.loc7[:, :4], rec.loc7[:, 4:6]], axis=1),  # x1 y1 x2 y2 w h
                      "features": np.asarray(rec.features, np.float16)}
            if classes:
                probs = np.asarray(rec.class_probs, np.float32)
                arrays["conf"] = probs[:, 1:].max(1) if rec.num_boxes else np.zeros(0, np.float32)
                arrays["soft_labels"] = probs
            elif rec.extra and "objects_conf" in rec.extra:
                arrays["conf"] = np.asarray(rec.extra["objects_conf"], np.float32).reshape(rec.num_boxes)
            path = os.path.join(out, rec.id + ".npz")
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                with open(path + ".partial", "wb") as f:
                    np.savez(f, **arrays)
                os.replace(path + ".partial", path)
            finally:
                if os.path.exists(path + ".partial"):
                    os.remove(path + ".partial")
            rows.append((rec.id, rec.width, rec.height))
            bar.update(1)
    pd.DataFrame(rows, columns=["image_id", "width", "height"]).to_csv(os.path.join(out, SIZES_NAME + ".partial"),
                                                                      index=False)
    os.replace(os.path.join(out, SIZES_NAME + ".partial"), os.path.join(out, SIZES_NAME))
    return len(shards)
