"""Caption files -> the trainer's manifest: COCO JSON, Karpathy JSON, tables; key mapping and the report."""

import json

import pandas as pd
import pytest

from regionbert.data.cli import main
from regionbert.data.synth import write_synthetic_shard
from regionbert.train.text import read_manifest


def coco_json(tmp_path, split="val2014", ids=(42, 73, 74)):
    images = [{"id": i, "file_name": f"COCO_{split}_{i:012d}.jpg", "width": 640, "height": 480} for i in ids]
    anns = [{"id": 10 * i + k, "image_id": i, "caption": f" A photo {i}\nnumber {k}. "} for i in ids for k in range(2)]
    path = tmp_path / f"captions_{split}.json"
    path.write_text(json.dumps({"images": images, "annotations": anns}))
    return str(path)


def test_coco_json_to_manifest_with_shard_report(tmp_path, capsys):
    shard = str(tmp_path / "shard")  # features for 42 and 73 (and an image with no caption)
    write_synthetic_shard(shard, 3, feature_dim=8, min_boxes=1, max_boxes=3, id_prefix="val2014")
    keys = ["val2014/00000000", "val2014/00000001", "val2014/00000002"]
    images = [{"id": i, "file_name": f"{k.split('/')[1]}.jpg"} for i, k in zip((42, 73, 99), keys, strict=True)]
    images.append({"id": 5, "file_name": "missing.jpg"})
    anns = [{"image_id": i, "caption": f"caption of {i}"} for i in (42, 73, 5, 5)]
    src = tmp_path / "captions_val2014.json"
    src.write_text(json.dumps({"images": images, "annotations": anns}))
    out = str(tmp_path / "m.csv")
    report = str(tmp_path / "report.json")
    assert main(["captions", str(src), "-o", out, "--key", "{split}/{stem}", "--shards", shard,
                 "--report", report]) == 0
    printed = capsys.readouterr().out
    assert "captions without features: 2 captions of 1 images" in printed
    assert "features without captions: 1 images" in printed and "val2014/00000002" in printed
    df = read_manifest(out)  # what the trainer reads
    assert list(df.image_id) == ["val2014/00000000", "val2014/00000001", "val2014/missing", "val2014/missing"]
    assert set(df.split) == {"val"}  # the trainer's name; the key template still sees the file's val2014
    assert "split val: 4 captions of 3 images (from val2014)" in printed
    r = json.load(open(report))
    assert r["splits"] == {"val": {"captions": 4, "images": 3, "from": ["val2014"]}}
    assert r["images_without_features"] == ["val2014/missing"] and r["images_without_captions"] == [keys[2]]
    assert main(["captions", str(src), "-o", out, "--key", "{split}/{stem}", "--shards", shard,
                 "--drop-missing"]) == 0
    assert list(read_manifest(out).image_id) == keys[:2]


def test_coco_default_key_is_the_file_stem_and_captions_are_normalised(tmp_path):
    out = str(tmp_path / "m.jsonl")
    assert main(["captions", coco_json(tmp_path), coco_json(tmp_path, "train2014", ids=(9,)), "-o", out]) == 0
    df = read_manifest(out)
    assert df.image_id[0] == "COCO_val2014_000000000042" and df.caption[0] == "A photo 42 number 0."
    assert list(df.split) == ["val"] * 6 + ["train"] * 2
    assert main(["captions", coco_json(tmp_path), "-o", out, "--key", "coco/{id:012d}"]) == 0
    assert read_manifest(out).image_id[0] == "coco/000000000042"


def test_karpathy_split_json(tmp_path):
    data = {"images": [
        {"filepath": "val2014", "filename": "COCO_val2014_000000000042.jpg", "cocoid": 42, "split": "test",
         "sentences": [{"raw": "A dog.", "tokens": ["a", "dog"]}, {"raw": "A brown dog."}]},
        {"filepath": "train2014", "filename": "COCO_train2014_000000000009.jpg", "cocoid": 9, "split": "restval",
         "sentences": [{"raw": "Food."}]}]}
    src = tmp_path / "dataset_coco.json"
    src.write_text(json.dumps(data))
    out = str(tmp_path / "m.parquet")
    assert main(["captions", str(src), "-o", out, "--key", "{filepath}/{stem}"]) == 0
    df = read_manifest(out)
    assert list(df.image_id) == ["val2014/COCO_val2014_000000000042"] * 2 + ["train2014/COCO_train2014_000000000009"]
    assert list(df.split) == ["test", "test", "train"] and list(read_manifest(out, split="test").caption) == [
        "A dog.", "A brown dog."]  # Karpathy's convention: train + restval -> train
    assert list(read_manifest(out, split="train").image_id) == ["train2014/COCO_train2014_000000000009"]
    assert main(["captions", str(src), "-o", out, "--raw-splits"]) == 0
    assert list(read_manifest(out).split) == ["test", "test", "restval"]


@pytest.mark.parametrize("ext", [".csv", ".tsv", ".jsonl", ".parquet"])
def test_tables_with_other_column_names(tmp_path, ext):
    df = pd.DataFrame({"filename": ["a/img1.jpg", "a/img2.jpg"], "sentence": ["one", "two"]})
    src = str(tmp_path / f"t{ext}")
    {".csv": lambda: df.to_csv(src, index=False), ".tsv": lambda: df.to_csv(src, sep="\t", index=False),
     ".jsonl": lambda: df.to_json(src, orient="records", lines=True),
     ".parquet": lambda: df.to_parquet(src)}[ext]()
    out = str(tmp_path / "m.tsv")
    assert main(["captions", src, "-o", out, "--key", "{stem}", "--split", "train"]) == 0
    m = read_manifest(out)
    assert list(m.image_id) == ["img1", "img2"] and list(m.caption) == ["one", "two"] and set(m.split) == {"train"}


def test_bad_caption_input_names_file_and_entry(tmp_path, capsys):
    src = coco_json(tmp_path)
    assert main(["captions", src, "-o", str(tmp_path / "m.csv"), "--key", "{nope}"]) == 2
    assert "'nope'" in capsys.readouterr().err
    data = json.load(open(src))
    data["annotations"][3]["caption"] = "  "
    open(src, "w").write(json.dumps(data))
    assert main(["captions", src, "-o", str(tmp_path / "m.csv")]) == 2
    assert f"{src} annotations[3]: empty caption" in capsys.readouterr().err
    assert not (tmp_path / "m.csv").exists()
