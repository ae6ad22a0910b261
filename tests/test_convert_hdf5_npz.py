"""HDF5 (our layout and the padded one) and UNITER npz: round trips, checksums, bad files."""

import json

import h5py
import numpy as np

from regionbert.data import ShardReader, content_hash
from regionbert.data.cli import main
from regionbert.data.reader import _handle


def test_our_hdf5_round_trip_is_lossless(small_shard, tmp_path):
    out = str(tmp_path / "f.h5")
    assert main(["export", small_shard, "--to", "hdf5", "-o", out, "-q"]) == 0
    with h5py.File(out, "r") as f:  # every dataset checksummed per chunk
        assert all(f[k].fletcher32 for k in f) and f.attrs["format"] == "regionbert-h5"
    back = str(tmp_path / "back")
    assert main(["import", out, "-o", back, "-q"]) == 0
    # same ids, order, arrays, extra and settings: the same content hash (the extractor metadata is kept)
    assert content_hash(back) == content_hash(small_shard)
    assert ShardReader(back).get(ShardReader(small_shard)[3].id).extra == ShardReader(small_shard)[3].extra


def test_padded_hdf5_round_trip(small_shard, tmp_path):
    out = str(tmp_path / "p.h5")
    assert main(["export", small_shard, "--to", "padded_hdf5", "-o", out, "-q"]) == 0
    a = ShardReader(small_shard)
    with h5py.File(out, "r") as f:
        m = max(r.num_boxes for r in a)
        assert f["features"].shape == (len(a), m, 64) and f["num_boxes"][3] == a[3].num_boxes
        assert all(f[k].fletcher32 for k in f)
    back = str(tmp_path / "back")
    assert main(["import", out, "-o", back, "-q"]) == 0
    b = ShardReader(back)
    assert list(b.keys()) == list(a.keys()) and b.meta["class_names"] == a.meta["class_names"]
    for i, x in enumerate(a):
        y = b.get(x.id)
        assert (x.width, x.height) == (y.width, y.height)
        assert np.array_equal(x.boxes, y.boxes) and np.array_equal(x.features, y.features)
        assert np.array_equal(x.class_probs, y.class_probs)
        assert y.extra == {"source_file": "p.h5", "source_row": i}  # the synthetic extra is not in this layout


def test_padded_hdf5_too_many_boxes_is_refused(small_shard, tmp_path, capsys):
    out = tmp_path / "p.h5"
    assert main(["export", small_shard, "--to", "padded_hdf5", "--max-boxes", "3", "-o", str(out), "-q"]) == 2
    assert "more than --max-boxes 3" in capsys.readouterr().err
    assert not out.exists() and not (tmp_path / "p.h5.partial").exists()  # never a file that looks finished


def _damage_chunk(path: str, dataset: str, chunk: int) -> None:
    with h5py.File(path, "r") as f:
        info = f[dataset].id.get_chunk_info(chunk)
    with open(path, "r+b") as f:
        f.seek(info.byte_offset + info.size // 2)
        byte = f.read(1)
        f.seek(info.byte_offset + info.size // 2)
        f.write(bytes([byte[0] ^ 0x40]))


def test_a_damaged_hdf5_chunk_names_file_and_record(small_shard, tmp_path, capsys):
    out = str(tmp_path / "p.h5")
    assert main(["export", small_shard, "--to", "padded_hdf5", "-o", out, "-q"]) == 0
    _damage_chunk(out, "features", 5)  # chunks are (1, M, D): one record each
    assert main(["import", out, "-o", str(tmp_path / "stop"), "-q"]) == 2
    assert f"{out} row 5: HDF5 read failed" in capsys.readouterr().err
    assert not _handle(str(tmp_path / "stop"), refresh=True).complete
    assert main(["import", out, "-o", str(tmp_path / "skip"), "-q", "--on-error", "skip"]) == 1
    report = [json.loads(x) for x in open(str(tmp_path / "skip") + ".import-errors.jsonl")]
    assert [(r["file"], r["row"]) for r in report] == [(out, 5)]
    assert len(ShardReader(str(tmp_path / "skip"))) == len(ShardReader(small_shard)) - 1


def test_uniter_npz_round_trip(small_shard, tmp_path):
    folder = tmp_path / "npz"
    assert main(["export", small_shard, "--to", "uniter_npz", "-o", str(folder), "-q"]) == 0
    a = ShardReader(small_shard)
    with np.load(folder / f"{a[0].id}.npz", allow_pickle=False) as z:
        assert z["norm_bb"].shape == (a[0].num_boxes, 6) and z["soft_labels"].shape == (a[0].num_boxes, 91)
        assert z["features"].dtype == np.float16
    back = str(tmp_path / "back")
    assert main(["import", str(folder), "-o", back, "-q"]) == 0  # finds image_sizes.csv in the folder
    b = ShardReader(back)
    assert sorted(b.keys()) == sorted(a.keys()) and b.meta["class_names"][:2] == ["__background__", "class_1"]
    for x in a:
        y = b.get(x.id)
        assert np.array_equal(x.features, y.features) and np.array_equal(x.class_probs, y.class_probs)
        # boxes pass through x/W and back: equal up to float32 rounding, not bit for bit
        np.testing.assert_allclose(y.boxes, x.boxes, rtol=0, atol=1e-3)


def test_uniter_npz_needs_image_sizes_and_reports_bad_files(small_shard, tmp_path, capsys):
    folder = tmp_path / "npz"
    assert main(["export", small_shard, "--to", "uniter_npz", "-o", str(folder), "-q"]) == 0
    sizes = tmp_path / "sizes.csv"
    (folder / "image_sizes.csv").rename(sizes)
    assert main(["import", str(folder), "-o", str(tmp_path / "s0"), "-q"]) == 2
    assert f"{folder}: UNITER npz files store boxes normalised" in capsys.readouterr().err
    victim = sorted(folder.rglob("*.npz"))[4]
    victim.write_bytes(victim.read_bytes()[:100])  # truncated
    key = next(r.id for r in ShardReader(small_shard) if r.num_boxes)
    too_big = folder / f"{key}.npz"
    with np.load(too_big, allow_pickle=False) as z:
        arrays = dict(z)
    arrays["norm_bb"][0, 2] = 1.5  # x2 at 1.5 image widths
    np.savez(too_big, **arrays)
    assert main(["import", str(folder), "--sizes", str(sizes), "-o", str(tmp_path / "s1"), "-q",
                 "--on-error", "skip"]) == 1
    report = [json.loads(x) for x in open(str(tmp_path / "s1") + ".import-errors.jsonl")]
    assert {r["file"] for r in report} == {str(victim), str(too_big)}
    reasons = " ".join(r["reason"] for r in report)
    assert "not a readable npz" in reasons and "lies outside the" in reasons
    assert len(ShardReader(str(tmp_path / "s1"))) == 38
