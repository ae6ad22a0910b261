"""`regionbert-shards export --to parquet` and its import: an exact round trip, `datasets` reads every field,
files split at a size in row groups, damaged/incomplete shards refused, and Parquet files with missing or
mis-shaped columns refused naming the file, row group and column before anything wrong is written."""

import glob
import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from helpers import random_record

from regionbert.data import ShardReader, ShardWriter, content_hash, verify_shard
from regionbert.data.cli import main
from regionbert.data.convert.parquet import META_KEY
from regionbert.data.format import comparable_settings
from regionbert.data.reader import _handle

ARRAYS = ("boxes", "loc5", "loc7", "features", "class_probs", "attr_probs")
EXTRACTOR = {"name": "regionbert.extract", "detector": "test detector", "weights": "/w/model.pth",
             "weights_digest": "sha256:abc", "weights_file_sha256": "def", "box_policy": "butd",
             "boxes": "proposals", "features_from": "the stored box (the proposal)",
             "thresholds": {"conf_thresh": 0.2, "min_boxes": 0, "max_boxes": 12},
             "job": {"shard_index": 0, "num_shards": 1, "host": "h"}}


def make_shard(path, n=60, dim=48, dtype="float16", attrs=5, seed=0, complete=True):
    """A shard with class and attribute distributions, extra JSON, and some records without boxes."""
    rng = np.random.default_rng(seed)
    names = ["__background__"] + [f"class_{i}" for i in range(1, 9)]
    anames = ["__no_attribute__"] + [f"attr_{i}" for i in range(1, attrs)] if attrs else None
    w = ShardWriter(path, feature_dim=dim, class_names=names, feature_dtype=dtype, attribute_names=anames,
                    extractor=EXTRACTOR, commit_every=16)
    for i in range(n):
        rec = random_record(rng, n=int(rng.integers(0, 13)) if i % 7 else 0, dim=dim, num_classes=len(names),
                            width=int(rng.integers(100, 900)), height=int(rng.integers(100, 900)), attrs=attrs)
        extra = {"source": f"img{i}.jpg", "score": [0.5, 1e-7]} if i % 3 else None
        w.add(f"coco/{i:06d}" if i % 5 else f"ids with spaces and ünïcode {i}", **rec, extra=extra)
    w.close(complete=complete)
    return path


@pytest.fixture
def shard(tmp_path):
    return make_shard(str(tmp_path / "shard-000"))


def export(shard, out, *more):
    return main(["export", shard, "--to", "parquet", "-o", str(out), "-q", *more])


def assert_same_records(a, b):
    assert list(a.keys()) == list(b.keys())  # same ids, same order
    for x, y in zip(a, b, strict=True):
        assert (x.id, x.width, x.height, x.extra) == (y.id, y.width, y.height, y.extra)
        for k in ARRAYS:
            u, v = getattr(x, k), getattr(y, k)
            assert (u is None) == (v is None), k
            if u is not None:  # bit for bit, dtype included
                assert u.dtype == v.dtype and u.shape == v.shape and u.tobytes() == v.tobytes(), (x.id, k)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_is_exact(tmp_path, dtype):
    src = make_shard(str(tmp_path / "s"), dtype=dtype)
    out = tmp_path / "pq"
    assert export(src, out, "--max-file-mb", "0.03", "--row-group", "8") == 0
    files = sorted(glob.glob(str(out / "data" / "train-*.parquet")))
    assert len(files) > 1 and all(f.endswith(f"-of-{len(files):05d}.parquet") for f in files)
    assert (out / "README.md").is_file() and not os.path.exists(str(out) + ".partial")
    rows = 0
    for f in files:
        pf = pq.ParquetFile(f)
        md = json.loads(pf.schema_arrow.metadata[META_KEY])
        assert md["first_row"] == rows and md["total_rows"] == 60 and md["meta"]["class_names"][1] == "class_1"
        assert md["shards"] == [{"name": "s", "count": 60, "content_hash": content_hash(src)}]
        assert pf.schema_arrow.field("features").type.value_type.value_type == pa.from_numpy_dtype(np.dtype(dtype))
        sizes = [pf.metadata.row_group(g).num_rows for g in range(pf.metadata.num_row_groups)]
        assert all(s == 8 for s in sizes[:-1])  # row groups of --row-group images
        # split at the size: a file passes it only when it holds a single row group
        assert os.path.getsize(f) <= 30_000 or len(sizes) == 1
        rows += pf.metadata.num_rows
    assert rows == 60
    back = str(tmp_path / "back")
    assert main(["import", str(out), "-o", back, "-q"]) == 0
    a, b = ShardReader(src), ShardReader(back)
    assert_same_records(a, b)
    assert b.meta["extractor"] == a.meta["extractor"]  # job included
    assert comparable_settings(b.meta) == comparable_settings(a.meta)
    assert content_hash(back) == content_hash(src) and verify_shard(back).ok
    assert _handle(back, refresh=True).complete
    # the files given one by one, in any order, are the same export
    again = str(tmp_path / "again")
    assert main(["import", *reversed(files), "-o", again, "-q", "--from", "parquet"]) == 0
    assert content_hash(again) == content_hash(src)


def test_several_shards_export_as_one_ordered_set(tmp_path):
    a = make_shard(str(tmp_path / "in" / "a"), n=20, seed=1)
    b = make_shard(str(tmp_path / "in" / "b"), n=15, seed=2)
    ids = [*ShardReader(a).keys(), *ShardReader(b).keys()]
    assert len(set(ids)) < len(ids)  # both shards use the same ids: kept as rows, the import sees repeats
    assert export(str(tmp_path / "in"), tmp_path / "pq") == 0
    t = pq.read_table(str(tmp_path / "pq" / "data"))
    assert t.column("image_id").to_pylist() == ids
    md = json.loads(t.schema.metadata[META_KEY])
    assert [s["name"] for s in md["shards"]] == ["a", "b"]


def test_datasets_load_dataset_reads_every_field(shard, tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    out = tmp_path / "pq"
    assert export(shard, out, "--max-file-mb", "0.05", "--row-group", "16") == 0
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cache = str(tmp_path / "hf-cache")
    files = sorted(glob.glob(str(out / "data" / "*.parquet")))
    ds = datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache)
    src = ShardReader(shard)
    assert len(ds) == len(src) and ds.features["features"].feature.length == 48
    arrow = ds.with_format("arrow")
    as_numpy = ds.with_format("numpy")
    for i, rec in enumerate(src):
        row = arrow[i]
        assert row.column("image_id")[0].as_py() == rec.id
        assert (row.column("width")[0].as_py(), row.column("height")[0].as_py()) == (rec.width, rec.height)
        assert row.column("num_boxes")[0].as_py() == rec.num_boxes
        extra = row.column("extra")[0].as_py()
        assert (json.loads(extra) if extra is not None else None) == rec.extra
        for k in ARRAYS:
            want = getattr(rec, k)
            flat = row.column(k).combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False)
            assert flat.dtype == want.dtype and flat.tobytes() == want.tobytes(), (rec.id, k)  # exact bits
            if rec.num_boxes:  # numpy format: (N, K) arrays (float16 comes back as float32: exact values)
                assert np.array_equal(np.asarray(as_numpy[i][k], np.float32), want.astype(np.float32)), k
    # the card's hub configs: load_dataset on the folder finds the files through README.md
    by_card = datasets.load_dataset(str(out), split="train", cache_dir=cache)
    assert by_card["image_id"] == list(src.keys())


def _damage_record(shard, index):
    """Flip one byte in the middle of a stored record (its features), in data.mdb itself."""
    r = ShardReader(shard)
    value = bytes(r.raw(r.key_at(index)))
    path = os.path.join(shard, "data.mdb")
    data = open(path, "rb").read()
    at = data.find(value[:96])
    assert at >= 0
    with open(path, "r+b") as f:
        while at >= 0:  # (copy-on-write may have left an older copy in a free page: damage every copy)
            f.seek(at + len(value) // 2)
            f.write(bytes([value[len(value) // 2] ^ 0x10]))
            at = data.find(value[:96], at + 1)


def _listing(folder):
    """Every path and size under folder (lock.mdb aside: LMDB's reader table grows when a reader takes a lock)."""
    return sorted((str(p), p.stat().st_size) for p in folder.rglob("*") if p.name != "lock.mdb")


def test_a_damaged_shard_is_refused_naming_it(shard, tmp_path, capsys):
    _damage_record(shard, 9)
    before = _listing(tmp_path)
    assert export(shard, tmp_path / "pq") == 2
    err = capsys.readouterr().err
    assert shard in err and "checksum mismatch" in err and "refused" in err and "Traceback" not in err
    assert _listing(tmp_path) == before  # nothing written: no folder, no .partial


def test_an_incomplete_shard_is_refused_naming_it(tmp_path, capsys):
    shard = make_shard(str(tmp_path / "s"), n=10, complete=False)
    before = _listing(tmp_path)
    assert export(shard, tmp_path / "pq") == 2
    err = capsys.readouterr().err
    assert shard in err and "incomplete" in err
    assert _listing(tmp_path) == before


def test_an_existing_output_is_not_touched(shard, tmp_path, capsys):
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "mine.txt").write_text("keep")
    assert export(shard, tmp_path / "pq") == 2
    assert "exists" in capsys.readouterr().err and (tmp_path / "pq" / "mine.txt").read_text() == "keep"


# ---- bad Parquet files on import ---------------------------------------------------------------------


@pytest.fixture
def exported(shard, tmp_path):
    out = tmp_path / "pq"
    assert export(shard, out, "--row-group", "8", "--no-card") == 0
    files = sorted(glob.glob(str(out / "data" / "*.parquet")))
    assert len(files) == 1 and pq.ParquetFile(files[0]).metadata.num_row_groups == 8
    return files[0]


def _rewrite(path, edit):
    """Read the file, edit(table) -> table, write it back with the same metadata and 8-row row groups."""
    t = pq.read_table(path)
    t = edit(t)
    pq.write_table(t.replace_schema_metadata(pq.read_schema(path).metadata), path, row_group_size=8)


def _nested_list(col, fix=None):
    """A list<fixed_size_list> column as list<list> (what other tools write), optionally edited per row."""
    rows = col.to_pylist()
    if fix:
        rows = fix(rows)
    return pa.array(rows, pa.list_(pa.list_(col.type.value_type.value_type)))


def _import_fails(path, tmp_path, capsys, *expect):
    out = tmp_path / "imported"
    assert main(["import", path, "-o", str(out), "-q"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    for e in expect:
        assert e in err, err
    return str(out)


def test_a_missing_column_is_refused_before_writing(exported, tmp_path, capsys):
    _rewrite(exported, lambda t: t.drop_columns(["features"]))
    out = _import_fails(exported, tmp_path, capsys, exported, "no column 'features'")
    assert not os.path.exists(out)  # checked before the shard is created


def test_a_missing_distribution_column_is_refused(exported, tmp_path, capsys):
    _rewrite(exported, lambda t: t.drop_columns(["attr_probs"]))
    assert not os.path.exists(_import_fails(exported, tmp_path, capsys, exported, "no column 'attr_probs'"))


def test_a_column_of_the_wrong_width_is_refused(exported, tmp_path, capsys):
    def narrower(t):
        col = t.column("features").combine_chunks()
        rows = [[box[:47] for box in r] for r in col.to_pylist()]
        typ = pa.list_(pa.list_(pa.float16(), 47))
        return t.set_column(t.schema.get_field_index("features"), "features", pa.array(rows, typ))
    _rewrite(exported, narrower)
    out = _import_fails(exported, tmp_path, capsys, exported, "column 'features'", "expected", "feature_dim 48")
    assert not os.path.exists(out)


def test_a_row_of_the_wrong_width_names_file_row_group_row_and_column(exported, tmp_path, capsys):
    counts = pq.read_table(exported, columns=["num_boxes"]).column("num_boxes").to_pylist()
    bad = next(i for i in range(24, 60) if counts[i])  # a row with boxes in row group 3 or later

    def one_short(t):
        def fix(rows):
            rows[bad][0] = rows[bad][0][:-1]
            return rows
        i = t.schema.get_field_index("class_probs")
        return t.set_column(i, "class_probs", _nested_list(t.column("class_probs").combine_chunks(), fix))
    _rewrite(exported, one_short)
    out = _import_fails(exported, tmp_path, capsys, f"{exported} row group {bad // 8} row {bad} column 'class_probs'",
                        "expected 9")
    # the row groups before it were imported whole and checked; nothing of the bad one; the shard says incomplete
    r = ShardReader(out)
    assert len(r) == bad // 8 * 8 and not _handle(out, refresh=True).complete and verify_shard(out).bad == []


def test_a_list_shorter_than_num_boxes_is_refused(exported, tmp_path, capsys):
    counts = pq.read_table(exported, columns=["num_boxes"]).column("num_boxes").to_pylist()
    bad = next(i for i in range(8, 60) if counts[i] > 1)

    def drop_box(t):
        def fix(rows):
            rows[bad] = rows[bad][:-1]
            return rows
        i = t.schema.get_field_index("features")
        return t.set_column(i, "features", _nested_list(t.column("features").combine_chunks(), fix))
    _rewrite(exported, drop_box)
    _import_fails(exported, tmp_path, capsys, f"row group {bad // 8} row {bad} column 'features'",
                  f"{counts[bad] - 1} rows, but num_boxes is {counts[bad]}")


def test_edited_boxes_with_stale_location_vectors_are_refused(exported, tmp_path, capsys):
    counts = pq.read_table(exported, columns=["num_boxes"]).column("num_boxes").to_pylist()
    bad = next(i for i in range(8, 60) if counts[i])

    def move_box(t):
        rows = t.column("boxes").to_pylist()
        rows[bad][0][2] = rows[bad][0][0]  # a zero-width box: still inside the image, loc vectors now stale
        col = pa.array(rows, t.schema.field("boxes").type)
        return t.set_column(t.schema.get_field_index("boxes"), "boxes", col)
    _rewrite(exported, move_box)
    out = _import_fails(exported, tmp_path, capsys, f"{exported} row group {bad // 8} row {bad}", "column 'loc5'")
    assert bad // 8 * 8 <= len(ShardReader(out)) == bad  # every record before it, none from it on


def test_a_missing_file_of_the_set_is_refused(shard, tmp_path, capsys):
    out = tmp_path / "pq"
    assert export(shard, out, "--max-file-mb", "0.03", "--row-group", "8") == 0
    files = sorted(glob.glob(str(out / "data" / "*.parquet")))
    os.remove(files[1])
    _import_fails(str(out), tmp_path, capsys, files[2], "missing")
    assert not os.path.exists(tmp_path / "imported")


def test_a_foreign_parquet_file_is_refused_naming_it(tmp_path, capsys):
    path = str(tmp_path / "other.parquet")
    pq.write_table(pa.table({"image_id": ["a"], "features": [[[1.0, 2.0]]]}), path)
    _import_fails(path, tmp_path, capsys, path, "no 'regionbert' key-value metadata")


def test_forged_metadata_is_refused_naming_the_file(exported, tmp_path, capsys):
    t = pq.read_table(exported)
    md = json.loads(t.schema.metadata[META_KEY])
    md["meta"]["feature_dim"] = -1
    pq.write_table(t.replace_schema_metadata({META_KEY: json.dumps(md).encode()}), exported)
    _import_fails(exported, tmp_path, capsys, exported, "feature_dim")
