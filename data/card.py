"""The data-set card: a README.md with a Hugging Face hub's YAML front matter, written from shard metadata.

    regionbert-shards card SHARDS -o README.md        (`export --to parquet` writes one beside its files)

What it says comes from the shards themselves, never typed by hand: the detector, its weights (source,
digest of the loaded parameters, file hash), the image sizes it ran at, the box policy and thresholds and
which box each feature was pooled from, the vocabularies, counts, a box-count histogram (from the
box-count table: no features are read), each shard's content hash as `verify` computed it, each Parquet
file's SHA-256, and how to read the data: with our reader, with `datasets`, and with LXMERT's loader
after `regionbert-shards export --to lxmert_tsv`.

A card vouches for the data, so every shard is verified first (data/convert/parquet.verify_for_export):
a damaged or incomplete shard is refused naming it. The job's provenance (host, image folder) stays in
the shard and Parquet metadata and is not printed in a card meant for a public hub.
"""

from __future__ import annotations

import json
import os
import stat

import numpy as np

from .convert.common import ConvertError
from .format import now_iso
from .reader import ShardSet, resolve_sources

DETECTOR_KEYS = ("detector", "weights", "weights_digest", "weights_file_sha256", "torchvision", "min_size",
                 "max_size", "input", "pixel_mean_bgr", "image_mean", "image_std", "feature", "class_probs",
                 "attr_probs", "amp", "batch_grouping")
BOX_KEYS = ("box_policy", "boxes", "features_from", "selection", "thresholds", "labels", "rpn_pre_nms_top_n",
            "rpn_post_nms_top_n", "rpn_nms_thresh", "rpn_score_thresh")
SIZE_CATEGORIES = ((1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10_000_000, "1M<n<10M"), (100_000_000, "10M<n<100M"))
SHOWN_NAMES = 20  # vocabulary names printed (the full lists are in the metadata)


def size_category(n: int) -> str:
    return next((name for limit, name in SIZE_CATEGORIES if n < limit), "n>100M")


def _round_widths():
    """1, 2, 5, 10, 20, 50, ...: bin widths a reader takes in at a glance."""
    w = 1
    while True:
        yield from (w, 2 * w, 5 * w)
        w *= 10


def histogram_rows(counts: np.ndarray, max_rows: int = 16) -> list[tuple[int, int, int]]:
    """(low, high, images) buckets of the box counts: one per count when few distinct counts, else bins of
    a round width (1, 2, 5, 10, 20, 50, ...) giving at most max_rows bins."""
    if len(counts) == 0:
        return []
    lo, hi = int(counts.min()), int(counts.max())
    width = next(w for w in _round_widths() if hi // w - lo // w + 1 <= max_rows)
    first = lo // width * width
    n_bins = (hi - first) // width + 1
    hist = np.bincount(((counts.astype(np.int64) - first) // width), minlength=n_bins)
    return [(first + i * width, first + (i + 1) * width - 1, int(c)) for i, c in enumerate(hist) if c]


def _fmt(v) -> str:
    s = v if isinstance(v, str) else json.dumps(v)
    return s.replace("|", "\\|").replace("\n", " ")


def _table(rows: list[tuple[str, object]]) -> list[str]:
    """A settings table; an object's members get a row each (`thresholds.nms_thresh`), so each reads alone."""
    flat = []
    for k, v in rows:
        flat += [(f"{k}.{m}", x) for m, x in v.items()] if isinstance(v, dict) and v else [(k, v)]
    return ["| setting | value |", "|---|---|"] + [f"| `{k}` | {_fmt(v)} |" for k, v in flat]


def _names(names: list[str] | None, what: str) -> list[str]:
    if not names:
        return [f"- {what}: none stored"]
    shown = ", ".join(f"`{n}`" for n in names[:SHOWN_NAMES])
    more = f", ... ({len(names) - SHOWN_NAMES} more)" if len(names) > SHOWN_NAMES else ""
    return [f"- {what}: {len(names)}: {shown}{more}"]


def _front_matter(title: str, total: int, data_files: str | None, split: str) -> list[str]:
    lines = ["---", "license: unknown", "task_categories:", "- image-feature-extraction",
             "tags:", "- region-features", "- object-detection-features", "- multimodal", "- regionbert",
             f"pretty_name: {json.dumps(title)}", "size_categories:", f"- {size_category(total)}"]
    if data_files:
        lines += ["configs:", "- config_name: default", "  data_files:", f"  - split: {split}",
                  f"    path: {json.dumps(data_files)}"]
    return lines + ["---", ""]


def _parquet_beside(out: str, verified: list[dict]) -> list[str]:
    """Parquet files of an export of these very shards in OUT's folder (data/*.parquet), or []."""
    from .convert.parquet import DATA_DIR, META_KEY

    folder = os.path.join(os.path.dirname(os.path.abspath(out)), DATA_DIR)
    try:
        names = sorted(n for n in os.listdir(folder) if n.endswith(".parquet"))
    except OSError:
        return []
    import pyarrow.parquet as pq

    want = [v["content_hash"] for v in verified]
    found = []
    for n in names:
        p = os.path.join(folder, n)
        if not stat.S_ISREG(os.lstat(p).st_mode):
            continue
        try:
            md = json.loads((pq.read_schema(p).metadata or {}).get(META_KEY, b"null"))
        except (OSError, ValueError, RecursionError):
            continue
        listed = md.get("shards") if isinstance(md, dict) else None
        if isinstance(listed, list) and [s.get("content_hash") for s in listed if isinstance(s, dict)] == want:
            found.append(p)
    return found


def render_card(shards: ShardSet, verified: list[dict], parquet: list[str] | None, card_dir: str,
                split: str = "train") -> str:
    from .convert.parquet import array_columns, sha256_file

    meta = shards.meta
    ex = dict(meta.get("extractor") or {})
    job = ex.pop("job", None)
    counts = shards.box_counts()
    total, boxes = len(shards), int(counts.sum(dtype=np.int64))
    names = [v["name"] for v in verified]
    title = names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more shards"
    rel = [os.path.relpath(p, card_dir).replace(os.sep, "/") for p in parquet or []]
    data_files = None
    if rel:
        parent = os.path.dirname(rel[0])
        data_files = f"{parent + '/' if parent else ''}{split}-*.parquet"
    dim, dtype = meta["feature_dim"], meta["feature_dtype"]
    lines = _front_matter(title, total, data_files, split)
    classes = f"{len(meta['class_names'])} classes, background at 0" if meta["class_names"] else "none stored"
    attrs = f"{len(meta['attribute_names'])} attributes" if meta["attribute_names"] else "none stored"
    lines += [f"# {title}", "",
              f"Region features of {total} images from an object detector, written by regionbert "
              f"(`{ex.get('name', 'unknown')}`) into {len(names)} shard(s)"
              f"{' and exported to Parquet' if rel else ''}. This card was written by `regionbert-shards card` "
              f"from the shards' own metadata on {now_iso()}.", ""]
    if isinstance(ex.get("weights"), str) and ex["weights"].lower() == "none":  # extract's --weights none
        lines += ["> **Warning: the detector had RANDOM weights** (`--weights none`): these boxes, features and "
                  "class distributions are meaningless; for dry runs and tests only.", ""]
    lines += ["## Contents", "", "| | |", "|---|---|", f"| images | {total} |",
              f"| boxes | {boxes} ({counts.min(initial=0)} to {counts.max(initial=0)} per image, mean "
              f"{boxes / max(total, 1):.1f}) |",
              f"| features | {dim}-d {dtype} per box |",
              f"| boxes stored as | `{meta.get('box_format', 'xyxy_pixels')}` (x1, y1, x2, y2 in original-image "
              "pixels), with 5-d and 7-d location vectors |",
              f"| class distribution | {classes} |", f"| attribute distribution | {attrs} |",
              f"| shards | {len(names)} (shard format schema {meta['schema_version']}.{meta.get('schema_minor', 0)}) |",
              f"| created | {meta.get('created', 'unknown')} |", ""]
    lines += ["## Detector", ""] + _table([(k, ex[k]) for k in DETECTOR_KEYS if k in ex]) + [""]
    lines += ["## Boxes", "", f"Which box each feature comes from: **{ex.get('features_from', 'not recorded')}** "
              f"(stored boxes: {ex.get('boxes', 'not recorded')}).", ""]
    lines += _table([(k, ex[k]) for k in BOX_KEYS if k in ex]) + [""]
    rest = [(k, v) for k, v in ex.items() if k not in DETECTOR_KEYS + BOX_KEYS]
    if rest:
        lines += ["Other extractor settings:", ""] + _table(rest) + [""]
    if job is not None:
        lines += ["The extraction job's provenance (`extractor.job`: host, input paths, batch settings) is kept in "
                  "the shard and Parquet metadata and not repeated here.", ""]
    lines += ["## Vocabularies", ""] + _names(meta["class_names"], "classes (index 0 = background)")
    lines += _names(meta["attribute_names"], "attributes") + [
        "", "The full lists are in the metadata (`meta['class_names']`, `meta['attribute_names']`).", ""]
    lines += ["## Boxes per image", "", "| boxes | images | share |", "|---:|---:|---|"]
    for lo, hi, c in histogram_rows(counts):
        share = c / max(total, 1)
        lines.append(f"| {lo if lo == hi else f'{lo}-{hi}'} | {c} | {'#' * max(1, round(30 * share))} "
                     f"{100 * share:.1f}% |")
    lines += ["", "## Integrity", "",
              "Every shard was verified (`regionbert-shards verify`: each record's XXH3-64 checksum, the record "
              "rules, the box-count table, complete) before this card was written. The content hash covers the "
              "settings and every record's checksum in order; a re-import of the Parquet files gives the same.",
              "", "| shard | images | content hash |", "|---|---:|---|"]
    lines += [f"| `{v['name']}` | {v['count']} | `{v['content_hash']}` |" for v in verified]
    if rel:
        lines += ["", "| file | rows | bytes | sha256 |", "|---|---:|---:|---|"]
        import pyarrow.parquet as pq

        for p, r in zip(parquet, rel, strict=True):
            lines.append(f"| `{r}` | {pq.ParquetFile(p).metadata.num_rows} | {os.path.getsize(p)} | "
                         f"`{sha256_file(p)}` |")
        cols = ["image_id", "width", "height", "num_boxes"] + [c[0] for c in array_columns(meta)] + ["extra"]
        lines += ["", "## Parquet columns", "", "One row per image, in the shards' order. N = `num_boxes` "
                  "(varies per image): the per-box arrays are nested lists (N rows of a fixed width).", "",
                  "| column | type |", "|---|---|", "| `image_id` | string (the shard key) |",
                  "| `width`, `height`, `num_boxes` | uint32 |"]
        for name, width, dt in array_columns(meta):
            lines.append(f"| `{name}` | (N, {width}) {dt} |")
        lines += ["| `extra` | string: the record's extra JSON, or null |", "",
                  f"Each file's key-value metadata `regionbert` holds the shard metadata (settings, vocabularies, "
                  f"extractor), the source shards and their content hashes, and the file's first row "
                  f"({len(cols)} columns in all).", ""]
    lines += _how_to_read(meta, names, data_files, split)
    return "\n".join(lines) + "\n"


def _how_to_read(meta: dict, names: list[str], data_files: str | None, split: str) -> list[str]:
    shards = names[0] if len(names) == 1 else "SHARDS_FOLDER"
    files = data_files or "data/train-*.parquet"
    lines = ["## How to read it", "", "With regionbert's reader (LMDB shards; checksums checked on every read):",
             "", "```python", "from regionbert.data import ShardSet", "", f'shards = ShardSet("{shards}")',
             "rec = shards[0]        # or shards.get(image_id)",
             "rec.features           # (N, D) numpy, the stored dtype; rec.boxes (N, 4) xyxy pixels",
             "rec.loc7, rec.class_probs, rec.attr_probs, rec.extra", "```", "",
             "With Hugging Face `datasets` (no regionbert needed):", "", "```python",
             "from datasets import load_dataset", "",
             f'ds = load_dataset("parquet", data_files="{files}", split="{split}")',
             'row = ds.with_format("numpy")[0]   # row["features"]: (N, D) (numpy format gives float32;',
             '                                   # ds.with_format("arrow") keeps float16 exactly)', "```", "",
             "Back into a shard (exact: same ids, order, arrays and content hash):", "", "```bash",
             f"regionbert-shards import {os.path.dirname(files) or '.'} -o shards/imported", "```", ""]
    lxmert = meta["class_names"] is not None
    lines += ["For LXMERT's `load_obj_tsv` (and bottom-up-attention's `read_tsv.py`, UNITER's npz):", "", "```bash",
              f"regionbert-shards export {shards} --to {'lxmert_tsv' if lxmert else 'butd_tsv'} -o features.tsv",
              "```", "", "```python", "from lxmert.src.utils import load_obj_tsv   # LXMERT's own loader",
              'images = load_obj_tsv("features.tsv")   # dicts: img_id, img_h, img_w, boxes, features, '
              'objects_id, ...', "```", ""]
    if lxmert:
        lines += ["LXMERT's `objects_id` is the argmax over classes 1.. (id = class index - 1) and `objects_conf` "
                  "its probability; see docs/formats.md. `--to uniter_npz` and `--to butd_tsv` write the other "
                  "two formats.", ""]
    else:
        lines += ["This data has no class distribution, so LXMERT's TSV (which needs object labels) cannot be "
                  "written; `butd_tsv` carries boxes and features.", ""]
    return lines


def write_card(source, out: str, *, verified: list[dict] | None = None, parquet: list[str] | None = None,
               split: str = "train", progress: bool = True) -> str:
    """Write the card for `source` (shards, a folder of shards, an index file, or an open ShardSet) to `out`.

    verified: the shards' verify results (from verify_for_export; verified here when None: a damaged or
    incomplete shard is refused naming it). parquet: the Parquet files the card describes (None: the
    files of an export of these shards in OUT's folder's data/, if any). Written to OUT.partial and
    renamed; never through a link. Returns the text."""
    from .convert.parquet import verify_for_export

    if isinstance(source, ShardSet):
        shards, paths = source, [s.path for s in source.shards]
    else:
        paths = resolve_sources(source)[0]
        shards = None
    if verified is None:
        verified = verify_for_export(paths, progress, what="card")
    if shards is None:
        shards = ShardSet(source)
    if parquet is None:
        parquet = _parquet_beside(out, verified)
    text = render_card(shards, verified, parquet, os.path.dirname(os.path.abspath(out)), split)
    _write_text(out, text)
    return text


def _write_text(out: str, text: str) -> None:
    if os.path.islink(out) or (os.path.lexists(out) and not os.path.isfile(out)):
        raise ConvertError(f"{out}: exists and is not a regular file (a link?); not written through it")
    tmp = out + ".partial"
    if os.path.lexists(tmp):
        if not stat.S_ISREG(os.lstat(tmp).st_mode):
            raise ConvertError(f"{tmp}: exists and is not a regular file; not touched")
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, out)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise


__all__ = ["histogram_rows", "render_card", "size_category", "write_card"]
