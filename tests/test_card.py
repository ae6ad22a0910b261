"""`regionbert-shards card`: a data-set card from the shards' metadata, with hub YAML front matter; refused for
damaged or incomplete shards; beside an export it lists the Parquet files (hub configs, SHA-256)."""

import glob
import hashlib
import os
import shlex

import numpy as np
import pytest
import yaml
from helpers import random_record

from regionbert.data import ShardReader, ShardWriter, content_hash
from regionbert.data.card import histogram_rows, size_category
from regionbert.data.cli import main

NAMES = ["__background__", "dog", "cat", "frisbee", "tree"]
ATTRS = ["__no_attribute__", "red", "furry"]
EXTRACTOR = {"name": "regionbert.extract", "detector": "torchvision.fasterrcnn_resnet50_fpn",
             "weights": "/models/frcnn.pth", "weights_digest": "sha256:0123abcd", "weights_file_sha256": "feedbeef",
             "min_size": 600, "max_size": 1000, "box_policy": "butd", "boxes": "proposals",
             "features_from": "the stored box (the proposal)", "rpn_post_nms_top_n": 300,
             "thresholds": {"conf_thresh": 0.2, "nms_thresh": 0.3, "min_boxes": 2, "max_boxes": 9},
             "job": {"host": "secret-host", "images": "/home/someone/images"}}


def make_shard(path, n=30, complete=True, seed=0):
    rng = np.random.default_rng(seed)
    w = ShardWriter(path, feature_dim=16, class_names=NAMES, attribute_names=ATTRS, extractor=EXTRACTOR)
    for i in range(n):
        w.add(f"img/{i}", **random_record(rng, n=2 + i % 8, dim=16, num_classes=len(NAMES), attrs=len(ATTRS)))
    w.close(complete=complete)
    return path


def read_card(path):
    text = open(path).read()
    assert text.startswith("---\n")
    front, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(front), body


def test_card_says_where_the_data_came_from(tmp_path):
    shard = make_shard(str(tmp_path / "shard-a"))
    out = str(tmp_path / "README.md")
    assert main(["card", shard, "-o", out, "-q"]) == 0
    front, body = read_card(out)
    assert front["license"] == "unknown" and front["size_categories"] == ["n<1K"]
    assert front["task_categories"] == ["image-feature-extraction"] and "configs" not in front  # no Parquet here
    for fact in ("torchvision.fasterrcnn_resnet50_fpn", "sha256:0123abcd", "feedbeef", "/models/frcnn.pth",
                 "the stored box (the proposal)", "| `thresholds.conf_thresh` | 0.2 |",
                 "| `thresholds.nms_thresh` | 0.3 |", "| `thresholds.max_boxes` | 9 |",
                 "| `rpn_post_nms_top_n` | 300 |", "16-d float16", "5 classes, background at 0",
                 "3 attributes", "`dog`", "`furry`", content_hash(shard), "| images | 30 |"):
        assert fact in body, fact
    assert "secret-host" not in body and "/home/someone" not in body  # the job's provenance stays in the metadata
    # the histogram: one row per box count here (2..9), the images add up
    counts = np.bincount([r.num_boxes for r in ShardReader(shard)])
    for k in range(2, 10):
        assert f"| {k} | {counts[k]} |" in body
    # how to read it: our reader, datasets, LXMERT's loader after an export whose command line works as written
    assert 'ShardSet("shard-a")' in body and 'load_dataset("parquet"' in body and "load_obj_tsv" in body
    line = next(x for x in body.splitlines() if x.startswith("regionbert-shards export"))
    args = shlex.split(line)[1:]
    args[1], args[-1] = shard, str(tmp_path / "features.tsv")
    assert main([*args, "-q"]) == 0 and os.path.getsize(tmp_path / "features.tsv") > 0


def test_export_writes_the_card_beside_its_files(tmp_path):
    shard = make_shard(str(tmp_path / "s"))
    out = tmp_path / "pq"
    assert main(["export", shard, "--to", "parquet", "-o", str(out), "-q", "--max-file-mb", "0.01",
                 "--row-group", "4"]) == 0
    files = sorted(glob.glob(str(out / "data" / "*.parquet")))
    assert len(files) > 1
    front, body = read_card(out / "README.md")
    assert front["configs"] == [{"config_name": "default",
                                 "data_files": [{"split": "train", "path": "data/train-*.parquet"}]}]
    for f in files:  # each file with its SHA-256 and size
        digest = hashlib.sha256(open(f, "rb").read()).hexdigest()
        assert f"| `data/{os.path.basename(f)}` |" in body and digest in body and str(os.path.getsize(f)) in body
    assert "| `features` | (N, 16) float16 |" in body and "| `attr_probs` | (N, 3) float16 |" in body
    # `card` run again into the export folder finds the files beside it
    again = str(out / "README.md")
    assert main(["card", shard, "-o", again, "-q"]) == 0
    assert read_card(again)[0]["configs"] == front["configs"]
    # but not the files of another shard's export
    other = make_shard(str(tmp_path / "other"), n=5, seed=3)
    assert main(["card", other, "-o", again, "-q"]) == 0
    assert "configs" not in read_card(again)[0]


def test_a_card_of_a_damaged_shard_is_refused(tmp_path, capsys):
    shard = make_shard(str(tmp_path / "s"))
    r = ShardReader(shard)
    value = bytes(r.raw(r.key_at(4)))
    path = os.path.join(shard, "data.mdb")
    data = open(path, "rb").read()
    at = data.find(value[:64])
    with open(path, "r+b") as f:
        while at >= 0:  # every copy (copy-on-write may leave one in a free page)
            f.seek(at + len(value) // 2)
            f.write(bytes([value[len(value) // 2] ^ 0x01]))
            at = data.find(value[:64], at + 1)
    out = tmp_path / "README.md"
    assert main(["card", shard, "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert shard in err and "checksum mismatch" in err and not out.exists()


def test_a_card_of_an_incomplete_shard_is_refused(tmp_path, capsys):
    shard = make_shard(str(tmp_path / "s"), complete=False)
    out = tmp_path / "README.md"
    assert main(["card", shard, "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert shard in err and "incomplete" in err and not out.exists()


def test_a_card_is_never_written_through_a_link(tmp_path, capsys):
    shard = make_shard(str(tmp_path / "s"), n=4)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep")
    os.symlink(victim, tmp_path / "README.md")
    assert main(["card", shard, "-o", str(tmp_path / "README.md"), "-q"]) == 2
    assert "link" in capsys.readouterr().err and victim.read_text() == "keep"


@pytest.mark.parametrize("counts", [[0], [36] * 5, list(range(0, 101)), [3, 3, 250, 1000], []])
def test_histogram_rows_cover_every_image(counts):
    rows = histogram_rows(np.array(counts, np.uint32))
    assert sum(c for _, _, c in rows) == len(counts) and len(rows) <= 16
    for n in counts:  # each count falls in exactly one row
        assert sum(lo <= n <= hi for lo, hi, _ in rows) == 1


def test_size_categories_are_the_hubs():
    assert [size_category(n) for n in (0, 999, 1000, 123_456, 5_000_000)] == [
        "n<1K", "n<1K", "1K<n<10K", "100K<n<1M", "1M<n<10M"]
