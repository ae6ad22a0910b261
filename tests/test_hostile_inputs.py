"""Inputs from a careless or hostile stranger (issue 22, item 8): malformed HDF5 files, configs, caption
files, image folders and output paths get a clean error naming the file (and row), exit code 2, never a
traceback or a hang; nothing already written is lost and nothing outside the output changes."""

from __future__ import annotations

import re
import shutil

import h5py
import numpy as np
import pytest

from regionbert.data import ShardReader
from regionbert.data.cli import main as shards_main


# ----------------------------------------------------------------------------- HDF5 import
def _replace(f, name, data):
    del f[name]
    f.create_dataset(name, data=data)


def _swap_offsets(f):
    o = f["offsets"][:]
    o[5], o[6] = o[6], o[5]  # one step back in the middle: before, 40 records imported, some with 0 boxes
    assert o[5] > o[6]
    _replace(f, "offsets", o)


OURS = {  # mutation, what the error must say (after the file name)
    "decreasing_offsets": (_swap_offsets, r" row 5: offsets decrease \(offsets\[5\] = \d+, offsets\[6\] = \d+\)"),
    "offsets_past_the_data": (lambda f: _replace(f, "offsets", f["offsets"][:] * 1000), r".*offsets end at \d+"),
    "offsets_too_short": (lambda f: _replace(f, "offsets", f["offsets"][:-5]), r": dataset 'offsets' has 36 rows, "
                          "expected 41"),
    "no_boxes": (lambda f: f.__delitem__("boxes"), r": no 'boxes' dataset"),
    "string_features": (lambda f: _replace(f, "features", np.zeros(f["features"].shape, "S4")),
                        r": dataset 'features' is \|S4 of shape \(\d+, 64\), expected 2-D float"),
    "float_ids": (lambda f: _replace(f, "ids", np.arange(40.0)), r": dataset 'ids' is float64 .* expected 1-D string"),
    "meta_not_json": (lambda f: f.attrs.__setitem__("meta", "{not json"), r": attribute 'meta' is not JSON"),
    "meta_a_list": (lambda f: f.attrs.__setitem__("meta", "[1]"), r": attribute 'meta' is JSON list"),
    "boxes_a_group": (lambda f: (f.__delitem__("boxes"), f.create_group("boxes")), r": 'boxes' is a Group"),
    "decreasing_extra_offsets": (lambda f: _replace(f, "extra_offsets", f["extra_offsets"][:][::-1].copy()),
                                 r".*extra_offsets"),
}
PADDED = {
    "features_2d": (lambda f: _replace(f, "features", f["features"][:, :, 0]),
                    r": dataset 'features' is float16 of shape \(40, \d+\), expected 3-D float"),
    "boxes_of_3": (lambda f: _replace(f, "boxes", f["boxes"][:, :, :3]), r": dataset 'boxes' has shape"),
    "widths_too_short": (lambda f: _replace(f, "image_w", f["image_w"][:5]), r": dataset 'image_w' has 5 rows"),
    "float_num_boxes": (lambda f: _replace(f, "num_boxes", f["num_boxes"][:] + 0.5), r": dataset 'num_boxes' is "
                        "float64"),
    "ids_2d": (lambda f: _replace(f, "image_id", np.zeros((40, 2), "S3")), r": dataset 'image_id' is \|S3"),
    "probs_2d": (lambda f: _replace(f, "class_probs", f["class_probs"][:, 0]), r": dataset 'class_probs' is"),
    "meta_a_list": (lambda f: f.attrs.__setitem__("meta", "[1]"), r": attribute 'meta' is JSON list"),
}


@pytest.fixture(scope="module")
def h5_files(tmp_path_factory):
    from regionbert.data.synth import write_synthetic_shard

    d = tmp_path_factory.mktemp("h5")
    write_synthetic_shard(str(d / "s"), 40, feature_dim=64, min_boxes=0, max_boxes=20, seed=1)
    assert shards_main(["export", str(d / "s"), "--to", "hdf5", "-o", str(d / "ours.h5"), "-q"]) == 0
    assert shards_main(["export", str(d / "s"), "--to", "padded_hdf5", "-o", str(d / "padded.h5"), "-q"]) == 0
    return d


def _import_mutated(h5_files, tmp_path, layout: str, mutate):
    bad = tmp_path / f"bad-{layout}.h5"
    shutil.copy(h5_files / f"{layout}.h5", bad)
    with h5py.File(bad, "r+") as f:
        mutate(f)
    before = bad.read_bytes()
    out = tmp_path / "out"
    rc = shards_main(["import", str(bad), "-o", str(out), "-q"])
    assert bad.read_bytes() == before  # the source is only read
    return rc, out, bad


@pytest.mark.parametrize("layout, case", [("ours", k) for k in OURS] + [("padded", k) for k in PADDED])
def test_malformed_hdf5_is_refused_naming_file_and_dataset(h5_files, tmp_path, capsys, layout, case):
    mutate, says = (OURS if layout == "ours" else PADDED)[case]
    rc, out, bad = _import_mutated(h5_files, tmp_path, layout, mutate)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"regionbert-shards import: error: {bad}"), err
    assert re.search(re.escape(str(bad)) + says, err), err
    assert not out.exists()  # refused before the shard was created


@pytest.mark.parametrize("layout", ["ours", "padded"])
def test_nan_boxes_in_hdf5_stop_at_the_row_keeping_what_came_before(h5_files, tmp_path, capsys, layout):
    def nan_row_3(f):
        b = f["boxes"][:]
        if layout == "ours":
            o = f["offsets"][:]
            k = next(i for i in range(3, 40) if o[i + 1] > o[i])  # the first record from row 3 with a box
            b[o[k]] = np.nan
        else:
            k = next(i for i in range(3, 40) if f["num_boxes"][i] > 0)
            b[k, 0] = np.nan
        _replace(f, "boxes", b)
        f.attrs["nan_row"] = k

    rc, out, bad = _import_mutated(h5_files, tmp_path, layout, nan_row_3)
    with h5py.File(bad, "r") as f:
        k = int(f.attrs["nan_row"])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad} row {k}: " in err and "NaN" in err, err
    with pytest.warns(UserWarning, match="incomplete"):
        assert len(ShardReader(str(out))) == k  # the rows before it are committed


def test_bad_extra_json_in_hdf5_is_a_row_error(h5_files, tmp_path, capsys):
    def garble(f):
        e = f["extra"][:]
        e[:] = ord("x")
        _replace(f, "extra", e)

    rc, out, bad = _import_mutated(h5_files, tmp_path, "ours", garble)
    err = capsys.readouterr().err
    assert rc == 2 and f"{bad} row 0: cannot read the row (JSONDecodeError" in err and "Traceback" not in err, err


# ----------------------------------------------------------------------------- configs
BERT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64,
        "layer_norm_eps": 1e-12, "vocab_size": 30, "max_position_embeddings": 64}


def _bert_folder(tmp_path, **changes):
    import json

    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({**BERT, **changes}))
    (bert / "vocab.txt").write_text("\n".join(f"t{i}" for i in range(30)) + "\n")
    return bert


@pytest.mark.parametrize("changes, says", [
    ({"num_hidden_layers": -1}, "model.num_layers = -1 is out of range"),
    ({"hidden_size": 0}, "model.hidden_size = 0 is out of range"),
    ({"layer_norm_eps": -1.0}, "model.layer_norm_eps"),
    ({"vocab_size": None}, "config.json: vocab_size is None, not an integer"),
    ({"num_attention_heads": 1e999}, "config.json: num_attention_heads is inf, not an integer"),
])
def test_init_from_config_json_passes_the_same_ranges(tmp_path, capsys, changes, says):
    """Before, num_hidden_layers -1 trained a model with no layers and exited 0."""
    from regionbert.train.cli import main as pretrain_main

    bert = _bert_folder(tmp_path, **changes)
    out = tmp_path / "run"
    rc = pretrain_main(["--set", f"run.init_from={bert}", "--set", "model.max_text_len=24", "--set", "run.device=cpu",
                        "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and f"{bert / 'config.json'}: " in err and says in err, err
    assert not (out / "checkpoint.pt").exists() and not (out / "config.json").exists()


@pytest.mark.parametrize("text, says", [
    ("[" * 100_000 + "]" * 100_000, "nested too deeply to be a config"),
    ('{"a":' * 100_000 + "1" + "}" * 100_000, "nested too deeply to be a config"),
    ("[1, 2]", "a config is a table of sections (model, data, ...), not a list"),
    ('"model"', "not a str"),
    ('{"data": [1], "run": 3}', "[data] must be a table of settings"),
])
def test_configs_that_are_not_tables_are_refused_naming_the_file(tmp_path, capsys, text, says):
    from regionbert.train.cli import main as pretrain_main

    path = tmp_path / "hostile.json"
    path.write_text(text)
    assert pretrain_main([str(path), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"regionbert-pretrain: error: {path}: ") and says in err, err


def test_a_deeply_nested_toml_config_and_override_are_refused(tmp_path, capsys):
    from regionbert.train.cli import main as pretrain_main

    path = tmp_path / "hostile.toml"
    path.write_text("a = " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert pretrain_main([str(path), "--print-config"]) == 2
    assert f"{path}: nested too deeply" in capsys.readouterr().err
    assert pretrain_main(["--print-config", "--set", "tasks.mix=" + "[" * 100_000 + "]" * 100_000]) == 2
    assert "--set tasks.mix: its value is nested too deeply" in capsys.readouterr().err


# ----------------------------------------------------------------------------- the extract job
FAST = ["--weights", "none", "--detector", "mobilenet_v3_large_320_fpn", "--min-size", "96", "--max-size", "128",
        "--workers", "0", "--batch-size", "2", "-q"]


def _extract(*args, timeout=240):
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "regionbert.extract.cli", *map(str, args)], capture_output=True,
                          text=True, timeout=timeout)  # a hang fails the test instead of hanging the suite


def _images(root, n=2):
    from PIL import Image

    root.mkdir()
    for i in range(n):
        Image.new("RGB", (40 + i, 30), (120, 80, 40 * i)).save(root / f"img{i}.png")
    return root


def test_a_fifo_named_like_an_image_is_skipped_without_opening_it(tmp_path):
    """Before, `open` on the FIFO waited for a writer forever, with the shard's writer lock held."""
    import os

    images = _images(tmp_path / "images")
    os.mkfifo(images / "pipe.png")
    r = _extract(images, "-o", tmp_path / "out", *FAST)
    assert r.returncode == 0, r.stderr
    assert f"{images / 'pipe.png'}: not a regular file" in r.stderr
    assert len(ShardReader(str(tmp_path / "out" / "shard-00000-of-00001"))) == 2


def test_a_fifo_in_a_manifest_is_a_failure_not_a_hang(tmp_path):
    import json
    import os

    images = _images(tmp_path / "images")
    os.mkfifo(images / "pipe.png")
    manifest = images / "list.jsonl"
    manifest.write_text("".join(json.dumps({"path": p}) + "\n" for p in ("img0.png", "pipe.png", "img1.png")))
    r = _extract(manifest, "-o", tmp_path / "out", *FAST, "--max-failure-fraction", "0.5")
    assert r.returncode == 0, r.stderr
    failures = (tmp_path / "out" / "shard-00000-of-00001.failures.jsonl").read_text()
    assert "pipe" in failures and "not a regular file (a FIFO); not opened" in failures
    assert len(ShardReader(str(tmp_path / "out" / "shard-00000-of-00001"))) == 2


def test_out_naming_an_existing_file_is_refused(tmp_path):
    images = _images(tmp_path / "images", 1)
    out = tmp_path / "results.txt"
    out.write_text("someone's file\n")
    r = _extract(images, "-o", out, *FAST)
    assert r.returncode == 2 and f"--out {out}: exists and is not a folder" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr and out.read_text() == "someone's file\n"
    r = _extract(images, "-o", out / "sub", *FAST)  # a parent that is a file
    assert r.returncode == 2 and f"--out {out / 'sub'}: cannot create the folder" in r.stderr, r.stderr


BUSY = r"another writer is writing|is being written"  # data/lock.py's ShardBusyError


def test_a_second_extract_is_refused_before_its_detector_is_built(tmp_path):
    """The lock is taken before the detector: with the shard held, even weights that do not exist are never
    looked at (before, the job built its detector, 10-24 s for butd, and only then met the lock)."""
    import subprocess
    import sys

    images = _images(tmp_path / "images", 1)
    shard = tmp_path / "out" / "shard-00000-of-00001"
    holder = subprocess.Popen([sys.executable, "-c", "import sys; from regionbert.data.lock import WriterLock; "
                               "WriterLock(sys.argv[1]).acquire(); print('held', flush=True); sys.stdin.read()",
                               str(shard)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        r = _extract(images, "-o", tmp_path / "out", "--detector", "butd_r101_vg", "--weights",
                     tmp_path / "absent.pkl", "-q")
        assert r.returncode == 2 and re.search(BUSY, r.stderr), r.stderr
        assert "absent.pkl" not in r.stderr  # the detector was never built
    finally:
        holder.stdin.close()
        holder.wait(timeout=60)
    r = _extract(images, "-o", tmp_path / "out", "--detector", "butd_r101_vg", "--weights", tmp_path / "absent.pkl",
                 "-q")
    assert r.returncode == 2 and "absent.pkl" in r.stderr and not re.search(BUSY, r.stderr)  # lock released


# ----------------------------------------------------------------------------- caption files
def test_an_empty_caption_in_a_csv_is_refused_naming_the_row(tmp_path):
    """Before, read with keep_default_na=False, an empty field was "" and trained as an empty caption."""
    from regionbert.train.text import read_manifest

    for body, row in (("a,a dog\nb,\nc,a cat\n", 1), ("a,a dog\nb,   \n", 1), (",a dog\n", 0)):
        path = tmp_path / "captions.csv"
        path.write_text("image_id,caption\n" + body)
        with pytest.raises(ValueError, match=rf"captions\.csv: data row {row} has an empty image_id or caption"):
            read_manifest(path)
    path.write_text("image_id,caption\na,a dog\n")
    assert read_manifest(path)["caption"].tolist() == ["a dog"]


UNPARSABLE = {"captions.csv": b'image_id,caption\na,"unclosed\nb,c,d,e\n' + b"x,y\n" * 3,
              "binary.csv": b"image_id,caption\n\xff\xfe\x00\x81,\xc3\x28\n",
              "garbage.parquet": b"PAR1 this is not parquet",
              "lines.jsonl": b'{"image_id": "a", "caption": "x"}\n{not json\n',
              "deep.jsonl": b"[" * 100_000 + b"]" * 100_000 + b"\n"}


@pytest.mark.parametrize("name", UNPARSABLE)
def test_caption_files_pandas_cannot_parse_are_errors_naming_the_file(tmp_path, capsys, name):
    from regionbert.train.text import read_manifest

    path = tmp_path / name
    path.write_bytes(UNPARSABLE[name])
    with pytest.raises(ValueError, match=re.escape(str(path)) + ": "):
        read_manifest(path)
    rc = shards_main(["captions", str(path), "-o", str(tmp_path / "out.csv")])  # the captions converter too
    err = capsys.readouterr().err
    assert rc == 2 and str(path) in err and "Traceback" not in err, err
    assert not (tmp_path / "out.csv").exists()


# ----------------------------------------------------------------------------- full disk (copy, index)
def _limit_file_size(n):
    def apply():  # test_damage.py's file_size_limit way of filling the disk: EFBIG instead of SIGXFSZ
        import resource
        import signal

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (n, n))
    return apply


@pytest.mark.parametrize("cmd, limit, says", [
    (["copy", "s", "dst"], 1 << 20, "dst: cannot write the copy (dst.partial/data.mdb: "),
    (["index", "s", "-o", "idx.json", "-q"], 100, "idx.json: cannot write the index (File too large)"),
])
def test_copy_and_index_on_a_full_disk_name_the_file(tmp_path, cmd, limit, says):
    import os
    import subprocess
    import sys

    from regionbert.data import content_hash
    from regionbert.data.synth import write_synthetic_shard

    write_synthetic_shard(str(tmp_path / "s"), 300, feature_dim=64, seed=1)
    before = content_hash(str(tmp_path / "s"))
    r = subprocess.run([sys.executable, "-m", "regionbert.data.cli", *cmd], capture_output=True, text=True,
                       cwd=tmp_path, preexec_fn=_limit_file_size(limit), timeout=120)
    assert r.returncode == 2 and says in r.stderr and "Traceback" not in r.stderr, r.stderr
    assert "damaged" not in r.stderr  # before, copy blamed the source
    assert content_hash(str(tmp_path / "s")) == before  # nothing lost
    assert not [p for p in os.listdir(tmp_path) if p.endswith((".partial", ".tmp")) or p in ("dst", "idx.json")]
