"""`regionbert-shards`: inspect, verify, index and synthesize region-feature shards."""

from __future__ import annotations

import argparse
import json
import os
import sys

from tqdm import tqdm

from .errors import ShardError
from .index import build_index, summarize, verify_shard
from .reader import _handle, resolve_sources
from .synth import write_synthetic_shard


def _histogram(counts: dict[int, int], bucket: int = 10, width: int = 40) -> list[str]:
    bins: dict[int, int] = {}
    for n, c in counts.items():
        bins[n // bucket * bucket] = bins.get(n // bucket * bucket, 0) + c
    top = max(bins.values(), default=1)
    return [f"  {lo:>4}-{lo + bucket - 1:<4} {c:>8}  {'#' * max(1, round(width * c / top))}"
            for lo, c in sorted(bins.items())]


def cmd_inspect(args) -> int:
    for path in resolve_sources(args.shards)[0]:
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


def cmd_verify(args) -> int:
    failed = 0
    for path in resolve_sources(args.shards)[0]:
        try:
            total = _handle(os.path.abspath(path)).count
        except ShardError:
            total = None  # verify_shard reports why
        with tqdm(total=total, desc=f"verify {path}", unit="rec", disable=args.quiet, leave=False) as bar:
            r = verify_shard(path, progress=bar.update)
        status = "OK" if r.ok else "FAILED"
        print(f"{status:6} {r.path}: {r.checked}/{r.count} records checked, {len(r.bad)} bad, {r.content_hash}")
        for p in r.problems:
            print(f"       problem: {p}")
        for key, reason in r.bad:
            print(f"       bad record {key!r}: {reason}")
        failed += not r.ok
    return 1 if failed else 0


def cmd_index(args) -> int:
    paths, _ = resolve_sources(args.shards)
    with tqdm(total=len(paths), desc="index", unit="shard", disable=args.quiet, leave=False) as bar:
        index = build_index(args.shards, args.out, force=args.force, progress=bar.update)
    print(f"wrote {args.out}: {len(index['shards'])} shards, {index['total']} records")
    return 0


def cmd_synth(args) -> int:
    with tqdm(total=args.records, desc=f"synth {args.out}", unit="rec", disable=args.quiet) as bar:
        added = write_synthetic_shard(args.out, args.records, feature_dim=args.dim, min_boxes=args.min_boxes,
                                      max_boxes=args.max_boxes, seed=args.seed,
                                      feature_dtype=args.dtype, id_prefix=args.prefix, progress=bar.update)
    print(f"wrote {args.out}: {added} records added")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="regionbert-shards", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("inspect", help="counts, dims, classes, box-count histogram, extractor settings")
    s.add_argument("shards", nargs="+", help="shard folders, folders of shards, or index files")
    s.add_argument("--json", action="store_true", help="print JSON instead of text")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("verify", help="decode every record and check its checksum; non-zero exit if any is bad")
    s.add_argument("shards", nargs="+")
    s.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    s.set_defaults(fn=cmd_verify)

    s = sub.add_parser("index", help="write a JSON index over many shards (paths, counts, hashes, settings)")
    s.add_argument("shards", nargs="+")
    s.add_argument("-o", "--out", required=True, help="index file to write (e.g. shards/index.json)")
    s.add_argument("--force", action="store_true", help="index shards with differing settings or incomplete")
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

    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except ShardError as e:
        print(f"regionbert-shards {args.cmd}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
