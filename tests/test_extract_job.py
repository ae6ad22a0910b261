"""The extraction job end to end: odd images, manifests, scale-out, resume after kill -9."""

import io
import json
import signal
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from regionbert.data import ShardError, ShardReader, ShardSet, build_index, location_vectors
from regionbert.data.reader import _handle
from regionbert.extract.cli import main
from regionbert.extract.images import decode_image, partition, read_manifest, shard_from_env

pytestmark = pytest.mark.filterwarnings("ignore:detector .* has RANDOM weights")
FAST = ["--weights", "none", "--detector", "mobilenet_v3_large_320_fpn", "--min-size", "96", "--max-size", "128",
        "--workers", "2", "--batch-size", "4", "-q"]


def _rgb(rng, h, w):
    return Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))


def make_odd_images(root):
    """Every kind of image the issue lists; returns {id: expected (width, height) or None if it must fail}."""
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    expect = {}
    _rgb(rng, 60, 80).save(root / "plain.jpg")
    expect["plain"] = (80, 60)
    Image.fromarray(rng.integers(0, 255, (50, 40), dtype=np.uint8)).save(root / "gray.png")
    expect["gray"] = (40, 50)
    _rgb(rng, 30, 70).convert("CMYK").save(root / "cmyk.jpg")
    expect["cmyk"] = (70, 30)
    Image.fromarray(rng.integers(0, 255, (40, 40, 4), dtype=np.uint8), "RGBA").save(root / "rgba.png")
    expect["rgba"] = (40, 40)
    pal = _rgb(rng, 33, 44).convert("P")
    pal.info["transparency"] = 0
    pal.save(root / "palette.png", transparency=0)
    expect["palette"] = (44, 33)
    _rgb(rng, 20, 20).convert("P").save(root / "anim.gif")
    expect["anim"] = (20, 20)
    Image.fromarray(rng.integers(0, 65535, (24, 36)).astype(np.uint16)).save(root / "deep16.png")
    expect["deep16"] = (36, 24)
    _rgb(rng, 1, 1).save(root / "tiny.png")
    expect["tiny"] = (1, 1)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90: stored 80 wide x 40 high, shown 40 wide x 80 high
    _rgb(rng, 40, 80).save(root / "sub" / "rotated.jpg" if (root / "sub").mkdir() or True else None, exif=exif)
    expect["sub/rotated"] = (40, 80)
    buf = io.BytesIO()
    _rgb(rng, 64, 64).save(buf, "JPEG")
    (root / "truncated.jpg").write_bytes(buf.getvalue()[:400])
    expect["truncated"] = None
    (root / "zero.png").write_bytes(b"")
    expect["zero"] = None
    (root / "text.jpg").write_text("this is not an image")
    expect["text"] = None
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(rng.integers(0, 255, 300, dtype=np.uint8)))
    expect["corrupt"] = None
    _rgb(rng, 120, 120).save(root / "bomb.png")  # past the --max-pixels 10000 the test sets
    expect["bomb"] = None
    (root / "notes.txt").write_text("not an image extension: never listed")
    return expect


def test_odd_images_are_extracted_or_reported(tmp_path):
    expect = make_odd_images(tmp_path / "imgs")
    out = tmp_path / "out"
    args = [str(tmp_path / "imgs"), "-o", str(out), "--max-pixels", "10000", *FAST]
    assert main([*args, "--max-failure-fraction", "0.5"]) == 0
    shard = out / "shard-00000-of-00001"
    r = ShardReader(shard)
    good = {k: v for k, v in expect.items() if v}
    assert sorted(r.keys()) == sorted(good)
    for image_id, (w, h) in good.items():
        rec = r.get(image_id)
        assert (rec.width, rec.height) == (w, h), image_id
        assert rec.num_boxes >= 1 and rec.features.shape[1] == 1024 and rec.class_probs.shape[1] == 91
        assert (rec.boxes[:, 2] <= w).all() and (rec.boxes[:, 3] <= h).all() and (rec.boxes >= 0).all()
        loc5, loc7 = location_vectors(rec.boxes, w, h)  # against the upright original size
        assert np.array_equal(rec.loc5, loc5) and np.array_equal(rec.loc7, loc7)
    failures = [json.loads(line) for line in open(str(shard) + ".failures.jsonl")]
    assert sorted(f["id"] for f in failures) == sorted(k for k, v in expect.items() if v is None)
    reasons = {f["id"]: f["reason"] for f in failures}
    assert reasons["zero"] == "empty file" and "limit of 10000" in reasons["bomb"]
    assert reasons["text"] == "not an image Pillow can read"
    assert all(f["path"].startswith(str(tmp_path / "imgs")) for f in failures)
    meta = r.meta["extractor"]
    assert meta["box_policy"] == "butd" and meta["boxes"] == "proposals" and meta["weights"] == "none"
    assert meta["min_size"] == 96 and meta["max_size"] == 128 and meta["weights_digest"].startswith("sha256:")
    # the same failures past the allowed fraction: non-zero exit; committed images are skipped. (Another
    # process: this one holds the shard open for reading, and LMDB allows one open per file per process.)
    cli = [sys.executable, "-m", "regionbert.extract.cli", *args, "--max-failure-fraction", "0.1"]
    refused = subprocess.run(cli, capture_output=True, text=True)  # the shard is complete: left alone
    assert refused.returncode == 2 and "is complete, and 5 of the images are not in it" in refused.stderr
    rerun = subprocess.run([*cli, "--append"], capture_output=True, text=True)
    assert rerun.returncode == 1 and "9 already done, 5 failed of 14" in rerun.stdout
    assert "RANDOM weights" in rerun.stderr and "more than the allowed 10.0%" in rerun.stderr


def test_sixteen_bit_and_exif_decoding(tmp_path):
    a = np.array([[0, 257, 65535, 32896]], dtype=np.uint16)
    Image.fromarray(a).save(tmp_path / "d.png")
    rgb = decode_image(str(tmp_path / "d.png"))
    assert rgb.shape == (1, 4, 3) and rgb[0, :, 0].tolist() == [0, 1, 255, 128]  # scaled, not clipped
    exif = Image.Exif()
    exif[0x0112] = 8
    Image.new("RGB", (30, 10), (255, 0, 0)).save(tmp_path / "r.jpg", exif=exif)
    assert decode_image(str(tmp_path / "r.jpg")).shape == (30, 10, 3)


@pytest.mark.parametrize("fmt", ["csv", "tsv", "jsonl", "parquet"])
def test_manifests(tmp_path, fmt):
    rng = np.random.default_rng(1)
    (tmp_path / "root" / "a").mkdir(parents=True)
    for name in ("x", "y"):
        _rgb(rng, 40, 50).save(tmp_path / "root" / "a" / f"{name}.jpg")
    df = pd.DataFrame({"image_path": ["a/x.jpg", "a/y.jpg"], "image_id": ["COCO_1", ""]})
    path = tmp_path / f"m.{fmt}"
    {"csv": lambda: df.to_csv(path, index=False), "tsv": lambda: df.to_csv(path, sep="\t", index=False),
     "jsonl": lambda: df.to_json(path, orient="records", lines=True),
     "parquet": lambda: df.to_parquet(path)}[fmt]()
    items = read_manifest(str(path), root=str(tmp_path / "root"))
    assert [i.id for i in items] == ["COCO_1", "a/y"]  # a blank id falls back to the relative path
    assert items[1].path == str(tmp_path / "root" / "a" / "y.jpg")


def test_manifest_paths_cannot_escape_the_root(tmp_path):
    (tmp_path / "root").mkdir()
    pd.DataFrame({"path": ["ok.jpg", "../../etc/passwd"]}).to_csv(tmp_path / "root" / "m.csv", index=False)
    with pytest.raises(ValueError, match=r"m.csv, row 2: '../../etc/passwd' resolves outside"):
        read_manifest(str(tmp_path / "root" / "m.csv"))
    assert len(read_manifest(str(tmp_path / "root" / "m.csv"), allow_outside_root=True)) == 2
    pd.DataFrame({"file": ["a.jpg", "b.jpg"], "id": ["same", "same"]}).to_csv(tmp_path / "d.csv", index=False)
    with pytest.raises(ValueError, match="'same' is used by both"):
        read_manifest(str(tmp_path / "d.csv"))
    pd.DataFrame({"nothing": [1]}).to_csv(tmp_path / "n.csv", index=False)
    with pytest.raises(ValueError, match="no image path column"):
        read_manifest(str(tmp_path / "n.csv"))


def test_partition_is_even_deterministic_and_complete(monkeypatch):
    items = list(range(103))
    parts = [partition(items, 8, i) for i in range(8)]
    assert sum(parts, []) == items and {len(p) for p in parts} == {12, 13}
    with pytest.raises(ValueError):
        partition(items, 8, 8)
    for k in ("SLURM_ARRAY_TASK_ID", "SLURM_ARRAY_TASK_COUNT", "SLURM_ARRAY_TASK_MIN", "RANK", "WORLD_SIZE"):
        monkeypatch.delenv(k, raising=False)
    assert shard_from_env() is None
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert shard_from_env() == (4, 3)
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "11")
    monkeypatch.setenv("SLURM_ARRAY_TASK_MIN", "10")
    monkeypatch.setenv("SLURM_ARRAY_TASK_COUNT", "5")
    assert shard_from_env() == (5, 1)  # SLURM wins over torchrun


def _folder(tmp_path, n, size=(64, 80)):
    rng = np.random.default_rng(2)
    root = tmp_path / "imgs"
    root.mkdir()
    for i in range(n):
        _rgb(rng, *size).save(root / f"img{i:03d}.png")
    return root


def test_scale_out_shards_join_into_the_whole(tmp_path):
    root = _folder(tmp_path, 9)
    for i in range(3):
        assert main([str(root), "-o", str(tmp_path / "out"), "--num-shards", "3", "--shard-index", str(i), *FAST]) == 0
    assert main([str(root), "-o", str(tmp_path / "single"), *FAST]) == 0
    build_index(str(tmp_path / "out"), str(tmp_path / "out" / "index.json"))
    joined, single = ShardSet(str(tmp_path / "out" / "index.json")), ShardSet(str(tmp_path / "single"))
    assert list(joined.keys()) == list(single.keys()) == [f"img{i:03d}" for i in range(9)]
    for i in range(9):
        assert np.allclose(joined[i].features.astype(np.float32), single[i].features.astype(np.float32), atol=1e-2)


def test_given_boxes_job(tmp_path):
    root = _folder(tmp_path, 2)
    rows = [{"id": "img000", "boxes": [[0, 0, 80, 64], [5, 5, 20, 30]]}, {"id": "img001", "boxes": [[1, 1, 2, 2]]}]
    (tmp_path / "boxes.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main([str(root), "-o", str(tmp_path / "out"), "--policy", "given", "--boxes",
                 str(tmp_path / "boxes.jsonl"), *FAST]) == 0
    r = ShardReader(tmp_path / "out" / "shard-00000-of-00001")
    assert r.get("img000").boxes.tolist() == rows[0]["boxes"] and r.get("img001").num_boxes == 1
    assert r.meta["extractor"]["boxes"] == "given"
    rows[1]["boxes"] = [[1, 1, 200, 2]]  # outside the 80x64 image: a failure naming the reason
    (tmp_path / "boxes.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert main([str(root), "-o", str(tmp_path / "out2"), "--policy", "given", "--boxes",
                 str(tmp_path / "boxes.jsonl"), *FAST]) == 1
    fail = json.loads(open(tmp_path / "out2" / "shard-00000-of-00001.failures.jsonl").read())
    assert fail["id"] == "img001" and "outside the 80x64 image" in fail["reason"]


def test_kill_9_then_rerun_gives_the_uninterrupted_result(tmp_path):
    root = _folder(tmp_path, 24)
    cmd = [sys.executable, "-m", "regionbert.extract.cli", str(root), "-o", str(tmp_path / "killed"), *FAST,
           "--batch-size", "1", "--commit-every", "2"]
    shard = str(tmp_path / "killed" / "shard-00000-of-00001")
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 900  # a guard against a hang, not a speed bound
    while time.time() < deadline and proc.poll() is None:
        try:
            if _handle(shard, refresh=True).count >= 6:
                break
        except ShardError:  # not created yet, or its tables not yet committed
            pass
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = _handle(shard, refresh=True).count
    assert 6 <= done < 24 and not _handle(shard).complete
    subprocess.run(cmd, check=True, capture_output=True)
    assert main([str(root), "-o", str(tmp_path / "clean"), *FAST, "--batch-size", "1"]) == 0
    resumed, clean = ShardReader(shard), ShardReader(tmp_path / "clean" / "shard-00000-of-00001")
    assert resumed.state["complete"] and sorted(resumed.keys()) == sorted(clean.keys())
    for image_id in clean.keys():
        a, b = resumed.get(image_id), clean.get(image_id)
        assert np.array_equal(a.boxes, b.boxes) and np.array_equal(a.features, b.features)
        assert np.array_equal(a.class_probs, b.class_probs)


def test_manifest_ids_keep_their_text(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"path": "a.jpg", "id": 42}\n{"path": "b.jpg"}\n{"path": "c.jpg", "id": "x"}\n')
    assert [i.id for i in read_manifest(str(tmp_path / "m.jsonl"))] == ["42", "b", "x"]
