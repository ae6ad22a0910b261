"""Caption files -> the trainer's caption manifest (columns image_id, caption, split; train/text.py).

Inputs (any mix, concatenated in the order given):
    COCO captions JSON   annotations/captions_<split>.json: images [{id, file_name}], annotations [{image_id, caption}]
    Karpathy split JSON  dataset_<name>.json: images [{filename, filepath?, cocoid?/imgid, split, sentences [{raw}]}]
    tables               .csv / .tsv / .jsonl / .parquet with an image id column (image_id, image, img_id, id,
                         cocoid, filename, file_name) and a caption column (caption, sentence, text, raw)

The manifest's image_id must be the shard key, so each caption's key comes from a template (`--key`)
over the image's fields:
    id         COCO image id / Karpathy cocoid (or imgid), an int: '{id}', '{id:012d}'
    file_name  e.g. COCO_val2014_000000000042.jpg;  stem: the same without extension
    filepath   Karpathy's folder (val2014), '' when absent;  split
    tables: every column, and stem (the id column without folder and extension)
Default: '{stem}' for COCO and Karpathy (the image file name without extension, which is the key of
an LXMERT TSV and of `regionbert-extract` run on the image folder itself); the id column for tables.
E.g. features extracted from coco/images with val2014/ and train2014/ inside have keys
'val2014/COCO_val2014_000000000042': use --key '{filepath}/{stem}' with Karpathy, or '{split}/{stem}'
with COCO files named captions_val2014.json ({split} in a key template is the source's split name).

Split names: the trainer reads splits `train` and `val`, so the manifest's split column maps the sources'
names (SPLIT_NAMES; --raw-splits keeps them): COCO's train2014/val2014 (and 2017) -> train/val, and
Karpathy's restval -> train, the usual Karpathy convention (train + restval = 113,287 COCO training
images, val 5,000, test 5,000). The report counts captions and images per split and says what was mapped.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field

import pandas as pd

from .common import ConvertError

ID_COLUMNS = ("image_id", "image", "img_id", "id", "cocoid", "filename", "file_name")
CAPTION_COLUMNS = ("caption", "sentence", "text", "raw")
TABLES = (".csv", ".tsv", ".jsonl", ".parquet")
SPLIT_NAMES = {"train2014": "train", "val2014": "val", "test2014": "test", "test2015": "test",
               "train2017": "train", "val2017": "val", "test2017": "test", "restval": "train"}


@dataclass
class CaptionReport:
    out: str
    captions: int = 0
    images: int = 0
    dropped: int = 0
    shards_checked: bool = False
    without_features: list[str] = field(default_factory=list)  # caption keys that are in no shard
    without_captions: list[str] = field(default_factory=list)  # shard keys that no caption names
    captions_without_features: int = 0
    splits: dict = field(default_factory=dict)  # split -> {"captions": n, "images": n, "from": [source names]}

    def summary(self) -> str:
        lines = [f"wrote {self.out}: {self.captions} captions of {self.images} images"
                 + (f" ({self.dropped} captions without features left out)" if self.dropped else "")]
        for name, c in self.splits.items():
            mapped = [s for s in c["from"] if s != name]
            lines.append(f"  split {name}: {c['captions']} captions of {c['images']} images"
                         + (f" (from {' + '.join(c['from'])})" if mapped else ""))
        if self.shards_checked:
            lines.append(f"  captions without features: {self.captions_without_features} captions of "
                         f"{len(self.without_features)} images, e.g. {self.without_features[:5]}")
            lines.append(f"  features without captions: {len(self.without_captions)} images, "
                         f"e.g. {self.without_captions[:5]}")
        return "\n".join(lines)


def _stem(name: str) -> str:
    return os.path.splitext(os.path.basename(str(name)))[0]


def _key(template: str, fields: dict, where: str) -> str:
    try:
        key = template.format(**fields)
    except KeyError as e:
        raise ConvertError(f"{where}: --key {template!r} names {e}, which is not one of {sorted(fields)}") from None
    except (ValueError, IndexError) as e:
        raise ConvertError(f"{where}: --key {template!r} does not apply to {fields}: {e}") from None
    if not key:
        raise ConvertError(f"{where}: --key {template!r} gives an empty image id")
    return key


def _caption(text, where: str) -> str:
    text = " ".join(str(text).split()) if text is not None else ""  # COCO captions carry stray newlines/spaces
    if not text:
        raise ConvertError(f"{where}: empty caption")
    return text


def _coco(path: str, data: dict, key: str | None, split: str | None) -> list[tuple]:
    if split is None:
        m = re.match(r"captions_(\w+)\.json$", os.path.basename(path))
        split = m.group(1) if m else None
    images = {}
    for i, im in enumerate(data["images"]):
        if "id" not in im:
            raise ConvertError(f"{path}: images[{i}] has no id")
        name = im.get("file_name", "")
        images[im["id"]] = {"id": im["id"], "file_name": name, "stem": _stem(name) if name else str(im["id"]),
                            "filepath": "", "split": split or ""}
    template = key or "{stem}"
    out = []
    for i, a in enumerate(data["annotations"]):
        where = f"{path} annotations[{i}]"
        if a.get("image_id") not in images:
            raise ConvertError(f"{where}: image_id {a.get('image_id')!r} is not in the file's images list")
        out.append((_key(template, images[a["image_id"]], where), _caption(a.get("caption"), where), split))
    return out


def _karpathy(path: str, data: dict, key: str | None, split: str | None) -> list[tuple]:
    template = key or "{stem}"
    out = []
    for i, im in enumerate(data["images"]):
        where = f"{path} images[{i}]"
        name = im.get("filename", "")
        fields = {"id": im.get("cocoid", im.get("imgid")), "file_name": name, "stem": _stem(name),
                  "filepath": im.get("filepath", ""), "split": split or im.get("split", "")}
        k = _key(template, fields, where)
        for j, s in enumerate(im.get("sentences", [])):
            out.append((k, _caption(s.get("raw"), f"{where}.sentences[{j}]"), fields["split"] or None))
    return out


def _table(path: str, key: str | None, split: str | None) -> list[tuple]:
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".parquet":
            df = pd.read_parquet(path)
        elif ext == ".jsonl":
            df = pd.read_json(path, lines=True, dtype=False)
        else:
            df = pd.read_csv(path, sep="\t" if ext == ".tsv" else ",", dtype=str, keep_default_na=False)
    except (OSError, ValueError, TypeError, RecursionError) as e:
        raise ConvertError(f"{path}: cannot read caption table ({type(e).__name__}: {e})") from None
    id_col = next((c for c in ID_COLUMNS if c in df.columns), None)
    cap_col = next((c for c in CAPTION_COLUMNS if c in df.columns), None)
    if id_col is None or cap_col is None:
        raise ConvertError(f"{path}: needs an image id column (one of {ID_COLUMNS}) and a caption column (one of "
                           f"{CAPTION_COLUMNS}); it has {list(df.columns)}")
    out = []
    for i, row in enumerate(df.astype(object).where(df.notna(), None).to_dict("records")):
        where = f"{path} row {i + 1}"
        fields = {k: ("" if v is None else v) for k, v in row.items()}
        fields["stem"] = _stem(fields[id_col])
        fields.setdefault("image_id", fields[id_col])
        k = _key(key, fields, where) if key else str(fields[id_col])
        out.append((k, _caption(row[cap_col], where), split or (str(row["split"]) if row.get("split") else None)))
    return out


def read_captions(path: str, key: str | None = None, split: str | None = None) -> list[tuple]:
    """[(image key, caption, split or None)] from one caption file."""
    if not os.path.isfile(path):
        raise ConvertError(f"{path}: no such caption file")
    if os.path.splitext(path)[1].lower() in TABLES:
        return _table(path, key, split)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError, RecursionError) as e:  # RecursionError: JSON nested 100,000 deep
        raise ConvertError(f"{path}: not a JSON caption file ({type(e).__name__}: {e})") from None
    images = data.get("images") if isinstance(data, dict) else None
    if isinstance(images, list) and isinstance(data.get("annotations"), list):
        return _coco(path, data, key, split)
    if isinstance(images, list) and (not images or "sentences" in images[0]):
        return _karpathy(path, data, key, split)
    raise ConvertError(f"{path}: neither COCO captions JSON (images + annotations) nor a Karpathy split JSON "
                       "(images with sentences)")


def write_manifest(df: pd.DataFrame, out: str) -> None:
    """Write by extension, to OUT.partial then renamed: never a half-written manifest."""
    ext = os.path.splitext(out)[1].lower()
    if ext not in TABLES:
        raise ConvertError(f"{out}: the manifest must be .csv, .tsv, .jsonl or .parquet")
    tmp = out + ".partial"
    if ext == ".parquet":
        df.to_parquet(tmp, index=False)
    elif ext == ".jsonl":
        df.to_json(tmp, orient="records", lines=True, force_ascii=False)
    else:
        df.to_csv(tmp, sep="\t" if ext == ".tsv" else ",", index=False)
    os.replace(tmp, out)


def _split_counts(df: pd.DataFrame, source: pd.Series | None) -> dict:
    """split -> captions, images and the source split names that went into it, in order of appearance."""
    if "split" not in df.columns:
        return {}
    out = {}
    for name, g in df.groupby("split", sort=False):
        names = list(dict.fromkeys(source[g.index])) if source is not None else [name]
        out[name] = {"captions": len(g), "images": int(g["image_id"].nunique()), "from": names}
    return out


def convert_captions(inputs: list[str], out: str, key: str | None = None, split: str | None = None,
                     shards=None, drop_missing: bool = False, report_path: str | None = None,
                     raw_splits: bool = False) -> CaptionReport:
    """Caption files -> one manifest; with `shards`, report (and optionally drop) what does not match.
    Split names are mapped by SPLIT_NAMES (train2014 -> train, restval -> train, ...) unless raw_splits."""
    rows = [r for p in inputs for r in read_captions(p, key, split)]
    if not rows:
        raise ConvertError(f"{', '.join(inputs)}: no captions")
    df = pd.DataFrame(rows, columns=["image_id", "caption", "split"])
    source = None
    if df["split"].isna().all():
        df = df.drop(columns="split")
    elif df["split"].isna().any():
        raise ConvertError(f"{', '.join(inputs)}: some captions have a split and some do not; pass --split")
    elif not raw_splits:
        source = df["split"]
        df = df.assign(split=source.map(lambda s: SPLIT_NAMES.get(s, s)))
    report = CaptionReport(out)
    if shards:
        from ..reader import ShardSet

        shard_keys = set(ShardSet(shards, check_settings=False).keys())
        has = df["image_id"].isin(shard_keys)
        report.shards_checked = True
        report.without_features = sorted(set(df.loc[~has, "image_id"]))
        report.captions_without_features = int((~has).sum())
        report.without_captions = sorted(shard_keys - set(df["image_id"]))
        if not has.any():
            raise ConvertError(f"no caption's image key is a shard key (caption key {df['image_id'].iloc[0]!r}, "
                               f"shard key {next(iter(shard_keys), None)!r}); choose the mapping with --key")
        if drop_missing:
            report.dropped = report.captions_without_features
            df = df[has]
    report.splits = _split_counts(df, source)
    write_manifest(df.reset_index(drop=True), out)
    report.captions, report.images = len(df), df["image_id"].nunique()
    if report_path:
        with open(report_path, "w") as f:
            json.dump({"manifest": out, "captions": report.captions, "images": report.images,
                       "dropped": report.dropped, "splits": report.splits,
                       "captions_without_features": report.captions_without_features,
                       "images_without_features": report.without_features,
                       "images_without_captions": report.without_captions}, f, indent=1)
    return report
