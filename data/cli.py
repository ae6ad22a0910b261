"""`regionbert-shards`: inspect, verify, index and synthesize region-feature shards; import and export foreign
feature formats (TSV, npz, HDF5) and normalise caption files (docs/formats.md)."""

from __future__ import annotations

import argparse
import json
import os
import sys

import lmdb
from tqdm import tqdm

from .errors import ShardError
from .index import build_index, summarize
from .isolate import verify_isolated
from .lmdbcheck import describe_failure
from .reader import resolve_sources
from .synth import write_synthetic_shard


def _histogram(counts: dict[int, int], bucket: int = 10, width: int = 40) -> list[str]:
    bins: dict[int, int] = {}
    for n, c in counts.items():
        bins[n // bucket * bucket] = bins.get(n // bucket * bucket, 0) + c
    top = max(bins.values(), default=1)
    return [f"  {lo:>4}-{lo + bucket - 1:<4} {c:>8}  {'#' * max(1, round(width * c / top))}"
            for lo, c in sorted(bins.items())]


def cmd_inspect(args) -> int:
    for path in resolve_sources(args.shards, args.allow_outside)[0]:
        s = summarize(path)
        if args.json:
            print(json.dumps(s, indent=1))
            continue
        names = s["class_names"]
        ex = s["extractor"]
        print(f"shard      {s['path']}")
        print(f"records    {s['count']}  ({'complete' if s['complete'] else 'INCOMPLETE: writer did not finish'})"
              f", {s['bytes_on_disk'] / 2**20:.1f} MiB on disk")
        print(f"created    {s['created']}   updated {s['updated']}")
        print(f"features   {s['feature_dim']} x {s['feature_dtype']}   boxes {s['box_format']}")
        if names:
            shown = ", ".join(names[:12]) + (f", ... ({len(names)} in all)" if len(names) > 12 else "")
            print(f"classes    {len(names)} with background: {shown}")
        else:
            print("classes    none stored (no class distribution in this shard)")
        if s["attribute_names"]:
            print(f"attributes {len(s['attribute_names'])}")
        print("extractor  " + ("\n           ".join(f"{k}: {json.dumps(v)}" for k, v in ex.items()) or "-"))
        print("boxes per image:")
        print("\n".join(_histogram(s["boxes_per_image"])) or "  (no records)")
    return 0


def _indexed(sources, allow_outside: bool) -> dict:
    """{shard path: its index entry} for the sources that are index files."""
    from .index import load_index

    out = {}
    for src in sources:
        if os.path.isfile(src):
            out.update({os.path.abspath(e["path"]): e for e in load_index(src, allow_outside)["shards"]})
    return out


def cmd_verify(args) -> int:
    failed = 0
    indexed = _indexed(args.shards, args.allow_outside)
    paths = resolve_sources(args.shards, args.allow_outside)[0]
    if not paths:  # (load_index refuses an empty index already: never "verified" with nothing checked)
        raise ShardError(f"{' '.join(args.shards)}: no shards to verify")
    for path in paths:
        with tqdm(desc=f"verify {path}", unit="rec", disable=args.quiet, leave=False) as bar:
            # checksums, tables and the record rules (data/checks.py), walked in a child process: a damaged
            # file can kill LMDB's reader, and then the child dies, not this command (data/lmdbcheck.py)
            r = verify_isolated(path, progress=bar.update, total=lambda n: setattr(bar, "total", n))
        entry = indexed.get(os.path.abspath(path))
        if entry is not None:  # the index says what arrived should be
            if entry["count"] != r.count:
                r.problems.append(f"index says {entry['count']} records, the shard has {r.count}")
            if entry.get("content_hash") and r.content_hash and entry["content_hash"] != r.content_hash:
                r.problems.append(f"content hash differs from the index's {entry['content_hash']}")
        status = "OK" if r.ok else "FAILED"
        print(f"{status:6} {r.path}: {r.checked}/{r.count} records checked, {len(r.bad)} bad, {r.content_hash}")
        for p in r.problems:
            print(f"       problem: {p}")
        for key, reason in r.bad:
            print(f"       bad record {key!r}: {reason}")
        failed += not r.ok
    return 1 if failed else 0


def cmd_index(args) -> int:
    paths, _ = resolve_sources(args.shards, args.allow_outside)
    with tqdm(total=len(paths), desc="index", unit="shard", disable=args.quiet, leave=False) as bar:
        index = build_index(paths, args.out, force=args.force, progress=bar.update,
                            allow_outside=args.allow_outside)
    print(f"wrote {args.out}: {len(index['shards'])} shards, {index['total']} records")
    return 0


def cmd_synth(args) -> int:
    with tqdm(total=args.records, desc=f"synth {args.out}", unit="rec", disable=args.quiet) as bar:
        added = write_synthetic_shard(args.out, args.records, feature_dim=args.dim, min_boxes=args.min_boxes,
                                      max_boxes=args.max_boxes, seed=args.seed,
                                      feature_dtype=args.dtype, id_prefix=args.prefix, progress=bar.update)
    print(f"wrote {args.out}: {added} records added")
    return 0


def _lines(path: str | None) -> list[str] | None:
    if path is None:
        return None
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _is_parquet(args) -> bool:
    from .convert.parquet import is_parquet

    return args.source_format == "parquet" or (args.source_format == "auto" and is_parquet(args.inputs[0]))


def cmd_import(args) -> int:
    from .convert import open_source, run_import

    if _is_parquet(args):  # our Parquet export (data/convert/parquet.py): files or export folders
        from .convert.parquet import parquet_source

        source = parquet_source(args.inputs)
    else:
        source = open_source(args.inputs, args.source_format, sizes=args.sizes,
                             class_names=_lines(args.class_names), no_class_probs=args.no_class_probs,
                             feature_dim=args.feature_dim, chunk_rows=args.chunk_rows)
    r = run_import(source, args.out, on_error=args.on_error, report=args.report, n_jobs=args.jobs,
                   feature_dtype=args.dtype, progress=not args.quiet, commit_every=args.commit_every)
    print(f"imported into {args.out}: {r.added} records added, {r.skipped_existing} already there, "
          f"{r.duplicates} identical repeats skipped, {len(r.bad)} bad rows skipped")
    if r.bad:
        for b in r.bad[:10]:
            print(f"  bad: {b['file']}{'' if b['row'] is None else ' row ' + str(b['row'])}: {b['reason']}")
        print(f"  all {len(r.bad)} listed in {r.report}")
    return 1 if r.bad else 0


def cmd_export(args) -> int:
    import warnings

    from .convert import ExportWarning, export

    source = args.shards
    if args.allow_outside:  # checked here (counts, hashes), then handed on as plain shard paths
        from .reader import ShardSet

        source = [s.path for s in ShardSet(args.shards, check_settings=False, allow_outside=True).shards]
    if args.to == "parquet":
        return _export_parquet(args, source)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ExportWarning)
        n = export(source, args.out, args.to, max_boxes=args.max_boxes, progress=not args.quiet)
    print(f"wrote {args.out}: {n} records as {args.to}")
    for w in caught:  # what the format could not carry
        print(f"regionbert-shards export: note: {w.message}", file=sys.stderr)
    return 0


def _export_parquet(args, source) -> int:
    from .convert.parquet import export_parquet

    if args.max_file_mb <= 0 or args.row_group <= 0:
        raise ShardError("--max-file-mb and --row-group must be positive")
    files = export_parquet(source, args.out, max_file_bytes=int(args.max_file_mb * 10**6), row_group=args.row_group,
                           split=args.split, progress=not args.quiet, card=not args.no_card)
    size = sum(os.path.getsize(f) for f in files)
    card = "" if args.no_card else f" and {os.path.join(args.out, 'README.md')}"
    print(f"wrote {args.out}: {len(files)} Parquet file(s), {size / 2**20:.1f} MiB{card}")
    return 0


def cmd_card(args) -> int:
    from .card import write_card

    source = args.shards
    if args.allow_outside:  # as export: checked here, then handed on as plain shard paths
        from .reader import ShardSet

        source = [s.path for s in ShardSet(args.shards, check_settings=False, allow_outside=True).shards]
    write_card(source, args.out, split=args.split, progress=not args.quiet)
    print(f"wrote {args.out}")
    return 0


def cmd_captions(args) -> int:
    from .convert.captions import convert_captions

    report = convert_captions(args.inputs, args.out, key=args.key, split=args.split, shards=args.shards,
                              drop_missing=args.drop_missing, report_path=args.report, raw_splits=args.raw_splits)
    print(report.summary())
    return 0


def cmd_show(args) -> int:
    from .reader import ShardSet
    from .show import draw_record, find_image, random_weights

    shards = ShardSet(args.shards, check_settings=False, allow_outside=args.allow_outside)
    if args.id is not None:
        shard = next((s for s in shards.shards if args.id in s), None)
        if shard is None:
            raise ShardError(f"{args.shards}: no record {args.id!r}")
        rec = shard.get(args.id)
    else:
        try:
            shard, local = shards.locate(args.index)
        except IndexError as e:
            raise ShardError(f"{args.shards}: {e}") from None
        rec = shard[local]
    path = find_image(rec, shard.meta, args.image, args.root)
    try:
        draw_record(rec, path, shard.meta["class_names"], top=args.top, meta=shard.meta).save(args.out)
    except OSError as e:  # missing or unreadable image, unwritable output
        raise ShardError(f"record {rec.id!r}: {e}") from None
    print(f"wrote {args.out}: {rec.id} ({rec.width}x{rec.height}, {min(rec.num_boxes, args.top)} of "
          f"{rec.num_boxes} boxes) over {path}")
    if random_weights(shard.meta):
        print("note: this shard's detector had RANDOM weights (--weights none); the picture says so")
    return 0


def cmd_copy(args) -> int:
    from .index import compact_copy

    digest = compact_copy(args.src, args.dst)
    before = os.path.getsize(os.path.join(args.src, "data.mdb"))
    after = os.path.getsize(os.path.join(args.dst, "data.mdb"))
    print(f"wrote {args.dst}: {after / 2**20:.1f} MiB (source {before / 2**20:.1f} MiB), same content {digest}")
    return 0


def _allow_outside(parser) -> None:
    parser.add_argument("--allow-outside", action="store_true",
                        help="accept index entries (shard paths) outside the index file's folder: absolute, "
                             "climbing out with '..', or through a symlink (refused by default)")


def _add_publish_commands(sub) -> None:
    s = sub.add_parser("show", help="draw a record's image with its stored boxes and top class labels (PNG)")
    s.add_argument("shards", help="a shard, a folder of shards or an index file")
    which = s.add_mutually_exclusive_group()
    which.add_argument("--id", help="image id (default: the record at --index)")
    which.add_argument("--index", type=int, default=0, help="record number (default 0)")
    s.add_argument("-o", "--out", required=True, help="PNG to write")
    s.add_argument("--image", help="the image file (default: found from the id under --root or the folder "
                                   "the extractor read, as the shard records it)")
    s.add_argument("--root", help="folder the image ids are relative to")
    s.add_argument("--top", type=int, default=20, help="draw this many boxes, best first")
    _allow_outside(s)
    s.set_defaults(fn=cmd_show)

    s = sub.add_parser("card", help="write a data-set card (README.md with hub YAML front matter) from the shards' "
                       "metadata; the shards are verified first")
    s.add_argument("shards", nargs="+", help="shard folders, folders of shards, or index files")
    s.add_argument("-o", "--out", required=True, help="card to write (e.g. README.md); Parquet files of an export "
                   "of these shards in its folder's data/ are listed and named in the hub configs")
    s.add_argument("--split", default="train", help="split name of the Parquet files (default train)")
    _allow_outside(s)
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(fn=cmd_card)

    s = sub.add_parser("copy", help="publish a shard: a compacting copy, checked by content hash")
    s.add_argument("src")
    s.add_argument("dst", help="new shard folder (written as DST.partial, then renamed)")
    s.set_defaults(fn=cmd_copy)


def _add_convert_commands(sub) -> None:
    from .convert import EXPORT_FORMATS, IMPORT_FORMATS

    s = sub.add_parser("import", help="bottom-up-attention / LXMERT TSV, UNITER npz folder, HDF5 or our Parquet "
                       "-> a shard")
    s.add_argument("inputs", nargs="+", help="TSV file(s) of one format, one npz folder, one HDF5 file, or the "
                   "Parquet files (or folder) of one `export --to parquet`")
    s.add_argument("-o", "--out", required=True, help="shard folder to write (resumed if it exists)")
    s.add_argument("--from", dest="source_format", choices=["auto", *IMPORT_FORMATS, "parquet"], default="auto",
                   help="source format (default: detect: Parquet signature or a folder holding .parquet files, "
                        "folder = npz, HDF5 signature, TSV field count)")
    s.add_argument("--on-error", choices=["stop", "skip"], default="stop",
                   help="a bad row stops the import (default), or is skipped and listed in --report")
    s.add_argument("--report", help="JSONL of skipped rows (default OUT.import-errors.jsonl)")
    s.add_argument("-j", "--jobs", type=int, default=-1, help="decoding processes (default: all cores)")
    s.add_argument("--dtype", choices=["float16", "float32"], default="float16",
                   help="stored feature type (default float16; HDF5 from our export keeps its own)")
    s.add_argument("--sizes", help="npz: CSV/TSV/JSONL/JSON with image_id,width,height (npz stores no image size)")
    s.add_argument("--class-names", help="npz: text file, one class name per line, background first")
    s.add_argument("--no-class-probs", action="store_true", help="npz: do not store soft_labels")
    s.add_argument("--feature-dim", type=int, help="TSV: feature dim, if the first rows have no boxes")
    s.add_argument("--chunk-rows", type=int, default=8,
                   help="TSV lines per block: each worker reads and parses one block at a time (bounds memory)")
    s.add_argument("--commit-every", type=int, default=256, help="records per commit (a kill -9 loses at most these)")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(fn=cmd_import)

    s = sub.add_parser("export", help="shards -> HDF5 (ours or padded), LXMERT / bottom-up-attention TSV, npz, "
                       "Parquet (+ data-set card)")
    s.add_argument("shards", nargs="+", help="shard folders, folders of shards, or index files")
    s.add_argument("-o", "--out", required=True, help="file to write (a folder for uniter_npz and parquet)")
    s.add_argument("--to", choices=[*EXPORT_FORMATS, "parquet"], required=True)
    s.add_argument("--max-boxes", type=int, help="padded_hdf5: pad to this many boxes (default: the largest record)")
    s.add_argument("--max-file-mb", type=float, default=500,
                   help="parquet: start a new file before one passes this many MB (default 500, for a hub)")
    s.add_argument("--row-group", type=int, default=128,
                   help="parquet: images per row group (the unit written and read at once; bounds memory)")
    s.add_argument("--split", default="train", help="parquet: split name in the file names and card (default train)")
    s.add_argument("--no-card", action="store_true", help="parquet: do not write README.md (the data-set card)")
    _allow_outside(s)
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("captions", help="COCO / Karpathy JSON or a table -> the trainer's caption manifest")
    s.add_argument("inputs", nargs="+", help="captions_*.json, dataset_*.json (Karpathy), .csv/.tsv/.jsonl/.parquet")
    s.add_argument("-o", "--out", required=True, help="manifest to write: .csv, .tsv, .jsonl or .parquet")
    s.add_argument("--key", help="shard key template, e.g. '{stem}' (default), '{id}', '{filepath}/{stem}', "
                   "'coco/{id:012d}'; table inputs: their columns")
    s.add_argument("--split", help="split for every caption (default: Karpathy's, or from captions_<split>.json)")
    s.add_argument("--raw-splits", action="store_true", help="keep the sources' split names (default: train2014 "
                   "-> train, val2014 -> val, Karpathy's restval -> train)")
    s.add_argument("--shards", nargs="+", help="report captions without features and features without captions")
    s.add_argument("--drop-missing", action="store_true", help="leave out captions whose image is in no shard")
    s.add_argument("--report", help="write the full report (JSON) here")
    s.set_defaults(fn=cmd_captions)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="regionbert-shards", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("inspect", help="counts, dims, classes, box-count histogram, extractor settings")
    s.add_argument("shards", nargs="+", help="shard folders, folders of shards, or index files")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    _allow_outside(s)
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("verify", help="decode every record, check its checksum and the record rules "
                       "(docs/shard-format.md); non-zero exit if any is bad")
    s.add_argument("shards", nargs="+")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    _allow_outside(s)
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("index", help="write a JSON index over many shards (paths, counts, hashes, settings)")
    s.add_argument("shards", nargs="+")
    s.add_argument("-o", "--out", required=True, help="index file to write (e.g. shards/index.json)")
    s.add_argument("--force", action="store_true", help="index shards with differing settings or incomplete")
    _allow_outside(s)
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(fn=cmd_index)

    s = sub.add_parser("synth", help="write a synthetic shard shaped like real extractor output")
    s.add_argument("out", help="shard folder to write (resumed if it exists)")
    s.add_argument("-n", "--records", type=int, default=1000)
    s.add_argument("--dim", type=int, default=1024, help="feature dim (default 1024, torchvision's box head)")
    s.add_argument("--min-boxes", type=int, default=10)
    s.add_argument("--max-boxes", type=int, default=100)
    s.add_argument("--dtype", choices=["float16", "float32"], default="float16")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--prefix", default="synth", help="image id prefix")
    s.add_argument("-q", "--quiet", action="store_true")
    s.set_defaults(fn=cmd_synth)

    _add_convert_commands(sub)
    _add_publish_commands(sub)

    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except ShardError as e:  # ConvertError included
        print(f"regionbert-shards {args.cmd}: error: {e}", file=sys.stderr)
        return 2
    except (lmdb.Error, OSError) as e:  # a damaged data.mdb that LMDB noticed, a full disk, an unwritable file
        print(f"regionbert-shards {args.cmd}: error: {describe_failure(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
