"""Import foreign feature and caption formats into shards, and export shards to them (docs/formats.md).

    tsv.py       bottom-up-attention TSV and LXMERT TSV (import and export)
    npz.py       UNITER-style npz folders (import and export)
    oscar.py     Oscar / VinVL feature + label TSVs, 2048 + 6 position values (export)
    hdf5.py      HDF5: our lossless layout and the common padded layout (import and export)
    captions.py  COCO captions JSON, Karpathy split JSON, tables -> the trainer's caption manifest
    common.py    the import driver: parallel decode, ordered writes, bad-row handling, resume

Command line: `regionbert-shards import`, `regionbert-shards export`, `regionbert-shards captions`.
"""

from __future__ import annotations

import os

import h5py

from .common import ConvertError, ExportWarning, ImportResult, RowError, run_import

IMPORT_FORMATS = ("butd_tsv", "lxmert_tsv", "uniter_npz", "hdf5")
EXPORT_FORMATS = ("hdf5", "padded_hdf5", "lxmert_tsv", "butd_tsv", "uniter_npz", "oscar_tsv")


def detect_format(paths: list[str]) -> str:
    """A folder is UNITER npz; an HDF5 signature is hdf5; otherwise the TSV's field count decides."""
    from .tsv import sniff

    first = paths[0]
    if os.path.isdir(first):
        return "uniter_npz"
    if not os.path.exists(first):
        raise ConvertError(f"{first}: no such file or folder")
    if h5py.is_hdf5(first):
        return "hdf5"
    fmt = sniff(first)
    if fmt is None:
        raise ConvertError(f"{first}: not a folder of npz files, not HDF5, and its first line has neither 6 "
                           "(bottom-up-attention) nor 10 (LXMERT) tab-separated fields; name the format with --from")
    return fmt


def open_source(paths: list[str], fmt: str = "auto", *, sizes: str | None = None, class_names: list[str] | None = None,
                no_class_probs: bool = False, feature_dim: int | None = None, chunk_rows: int = 8):
    """The import Source for these inputs (one or more TSV files, one npz folder, or one HDF5 file)."""
    if fmt == "auto":
        fmt = detect_format(paths)
    if fmt in ("butd_tsv", "lxmert_tsv"):
        from .tsv import tsv_source

        return tsv_source(paths, fmt, chunk_rows=chunk_rows, feature_dim=feature_dim)
    if len(paths) != 1:
        raise ConvertError(f"{fmt} imports one {'folder' if fmt == 'uniter_npz' else 'file'} at a time, got {paths}")
    if fmt == "uniter_npz":
        from .npz import npz_source

        return npz_source(paths[0], sizes, class_names=class_names, no_classes=no_class_probs)
    if fmt == "hdf5":
        from .hdf5 import h5_source

        return h5_source(paths[0])
    raise ConvertError(f"unknown import format {fmt!r}; one of {', '.join(IMPORT_FORMATS)}")


def export(source, out: str, fmt: str, *, max_boxes: int | None = None, progress: bool = True) -> int:
    """Shards (a shard, a folder of shards, an index file) -> `out` in format `fmt`. Returns records written."""
    if fmt == "hdf5":
        from .hdf5 import export_h5

        return export_h5(source, out, progress=progress)
    if fmt == "padded_hdf5":
        from .hdf5 import export_padded_h5

        return export_padded_h5(source, out, max_boxes=max_boxes, progress=progress)
    if fmt in ("lxmert_tsv", "butd_tsv"):
        from .tsv import export_tsv

        return export_tsv(source, out, fmt, progress=progress)
    if fmt == "uniter_npz":
        from .npz import export_npz

        return export_npz(source, out, progress=progress)
    if fmt == "oscar_tsv":  # OUT is a prefix: OUT.feature.tsv, OUT.label.tsv (+ .lineidx)
        from .oscar import export_oscar

        return export_oscar(source, out, progress=progress)
    raise ConvertError(f"unknown export format {fmt!r}; one of {', '.join(EXPORT_FORMATS)}")


__all__ = ["ConvertError", "EXPORT_FORMATS", "ExportWarning", "IMPORT_FORMATS", "ImportResult", "RowError",
           "detect_format", "export", "open_source", "run_import"]
