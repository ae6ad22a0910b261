"""`regionbert-shards`: verify catches corruption, index refuses mixed settings, inspect reports."""

import json
import shutil
import subprocess

import numpy as np
import pytest

from regionbert.data import ShardReader
from regionbert.data.cli import main
from regionbert.data.format import HEADER_SIZE
from regionbert.data.synth import write_synthetic_shard


def _flip(shard: str, image_id: str, where) -> None:
    """Flip one byte of one record, in the data file itself."""
    value = bytes(ShardReader(shard, verify=False).raw(image_id.encode()))
    data = bytearray(open(f"{shard}/data.mdb", "rb").read())
    start = data.find(value)
    assert start >= 0 and data.find(value, start + 1) < 0
    offset = where(len(value))
    data[start + offset] ^= 0x10
    with open(f"{shard}/data.mdb", "r+b") as f:
        f.seek(start + offset)
        f.write(data[start + offset:start + offset + 1])


POSITIONS = {
    "magic": lambda n: 1,
    "num_boxes": lambda n: 16,
    "box": lambda n: HEADER_SIZE + 3,
    "middle": lambda n: n // 2,
    "class_probs": lambda n: n - 200,
    "checksum": lambda n: n - 1,
}


@pytest.mark.parametrize("where", POSITIONS)
@pytest.mark.parametrize("which", [0, 17, 39])
def test_verify_catches_a_flipped_byte_in_any_record(small_shard, tmp_path, capsys, where, which):
    shard = str(tmp_path / "copy")
    shutil.copytree(small_shard, shard)
    assert main(["verify", "-q", shard]) == 0
    victim = list(ShardReader(shard).keys())[which]
    _flip(shard, victim, POSITIONS[where])
    capsys.readouterr()
    assert main(["verify", "-q", shard]) == 1
    out = capsys.readouterr().out
    assert out.startswith("FAILED") and f"bad record {victim!r}" in out and "1 bad" in out


def test_index_refuses_mixed_settings_unless_forced(tmp_path, capsys):
    write_synthetic_shard(str(tmp_path / "a"), 5, feature_dim=32)
    write_synthetic_shard(str(tmp_path / "b"), 5, feature_dim=48)
    out = str(tmp_path / "index.json")
    assert main(["index", "-q", str(tmp_path / "a"), str(tmp_path / "b"), "-o", out]) == 2
    assert "feature_dim" in capsys.readouterr().err
    assert main(["index", "-q", "--force", str(tmp_path / "a"), str(tmp_path / "b"), "-o", out]) == 0
    index = json.load(open(out))
    assert index["total"] == 10 and [s["path"] for s in index["shards"]] == ["a", "b"]
    assert index["shards"][1]["settings_differ"] == ["feature_dim"]
    assert all(s["content_hash"].startswith("xxh3_128:") for s in index["shards"])


def test_inspect_and_synth_from_the_installed_command(tmp_path):
    shard = str(tmp_path / "s")
    run = lambda *a: subprocess.run(["regionbert-shards", *a], capture_output=True, text=True, check=True)  # noqa: E731
    run("synth", shard, "-n", "30", "--dim", "128", "-q")
    out = run("inspect", shard).stdout
    assert "records    30  (complete)" in out and "features   128 x float16" in out
    assert "91 with background: __background__, person" in out and "boxes per image:" in out
    info = json.loads(run("inspect", "--json", shard).stdout)
    assert info["count"] == 30 and sum(info["boxes_per_image"].values()) == 30
    assert run("verify", "-q", shard).stdout.startswith("OK")
    r = subprocess.run(["regionbert-shards", "verify", str(tmp_path / "nope")], capture_output=True, text=True)
    assert r.returncode != 0 and "nope" in r.stderr


def test_random_damage_to_the_lmdb_file_never_crashes_verify(tmp_path):
    """Bytes flipped anywhere in data.mdb (B-tree pages included): verify exits 0, 1 or 2, never by a signal."""
    import random

    src = str(tmp_path / "src")
    write_synthetic_shard(src, 120, feature_dim=64, max_boxes=30)
    rng = random.Random(0)
    data = open(f"{src}/data.mdb", "rb").read()
    codes = []
    for t in range(12):
        bad = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            bad[rng.randrange(min(len(bad), 1 << 16))] = rng.randrange(256)
        shard = tmp_path / f"t{t}"
        shard.mkdir()
        (shard / "data.mdb").write_bytes(bytes(bad))
        r = subprocess.run(["regionbert-shards", "verify", "-q", str(shard)], capture_output=True, text=True,
                           timeout=120)
        assert r.returncode in (0, 1, 2), f"trial {t}: exit {r.returncode}\n{r.stderr[-500:]}"
        codes.append(r.returncode)
    assert codes.count(1) >= 6  # most damage is reported, not silently passed


def test_show_draws_the_boxes_over_the_image(tmp_path, capsys):
    from PIL import Image

    from regionbert.data import ShardWriter
    from regionbert.data.synth import COCO_CLASSES

    Image.new("RGB", (200, 100), (255, 255, 255)).save(tmp_path / "img.png")
    probs = np.full((1, len(COCO_CLASSES)), 0.01 / (len(COCO_CLASSES) - 1))
    probs[0, 18] = 0.99  # a confident dog
    with ShardWriter(tmp_path / "s", feature_dim=8, class_names=COCO_CLASSES) as w:
        w.add("img", width=200, height=100, boxes=[[20, 10, 120, 90]], features=np.zeros((1, 8)), class_probs=probs)
    out = tmp_path / "show.png"
    assert main(["show", str(tmp_path / "s"), "--id", "img", "--root", str(tmp_path), "-o", str(out)]) == 0
    assert "1 of 1 boxes" in capsys.readouterr().out
    with Image.open(out) as im:
        scale = im.size[0] / 200  # small images are drawn at least 640 wide
        px = np.asarray(im.convert("RGB"))
    assert im.size == (640, 320)
    edge = px[int(50 * scale), int(20 * scale)]  # on the box's left edge, below its label
    assert tuple(edge) != (255, 255, 255) and tuple(px[5, 630]) == (255, 255, 255)
    assert main(["show", str(tmp_path / "s"), "--id", "nope", "-o", str(out)]) == 2


def test_copy_publishes_a_compact_identical_shard(small_shard, tmp_path, capsys):
    dst = tmp_path / "pub" / "shard-000"
    assert main(["copy", small_shard, str(dst)]) == 0
    from regionbert.data import content_hash

    assert content_hash(str(dst)) == content_hash(small_shard)
    assert "same content" in capsys.readouterr().out and not (tmp_path / "pub" / "shard-000.partial").exists()
    assert main(["copy", small_shard, str(dst)]) == 2  # never over an existing shard


def test_verify_against_an_index_catches_a_replaced_shard(tmp_path, capsys):
    for name in ("a", "b"):
        write_synthetic_shard(str(tmp_path / "pub" / name), 4, feature_dim=16, max_boxes=11, id_prefix=name)
    index = str(tmp_path / "pub" / "index.json")
    assert main(["index", "-q", str(tmp_path / "pub"), "-o", index]) == 0
    assert main(["verify", "-q", index]) == 0
    shutil.rmtree(tmp_path / "pub" / "b")  # replaced by a different, valid shard with the same count
    write_synthetic_shard(str(tmp_path / "pub" / "b"), 4, feature_dim=16, max_boxes=11, id_prefix="other")
    capsys.readouterr()
    assert main(["verify", "-q", index]) == 1
    assert "content hash differs from the index's" in capsys.readouterr().out
