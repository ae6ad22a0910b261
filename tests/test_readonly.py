"""Read-only, non-owner reading: a complete shard (and one published with `regionbert-shards copy`) with files
0444 and folders 0555 is read by inspect, verify, show, export, ShardReader/ShardSet and the trainer, as a
process that may not write there, and no lock file is created or needed.

The reading processes run either as an unprivileged uid (when the interpreter and its packages are
readable by it) or as root without the DAC capabilities, which makes the file modes bind root too (CI
runs as root with the interpreter in root's private home). As a non-root user the modes bind already.
"""

import json
import os
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile

import numpy as np
import pytest
from PIL import Image
from train_synth import write_dataset

from regionbert.data import ShardWriter
from regionbert.data.cli import main as shards_main
from regionbert.data.synth import write_synthetic_shard

NOBODY = 65534
DROP_DAC = ["--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]


def _restricted() -> tuple[list[str], int | None, str]:
    """(command prefix, uid the command runs as or None for ours, how) for a process that file modes bind."""
    if os.geteuid() != 0:
        return [], None, "a non-root user"
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv(1): cannot drop to an unprivileged uid or drop DAC capabilities")
    as_nobody = [setpriv, "--reuid", str(NOBODY), "--regid", str(NOBODY), "--clear-groups"]
    probe = [sys.executable, "-c", "import regionbert.data, regionbert.train.cli, lmdb, torch"]
    if subprocess.run(as_nobody + probe, capture_output=True, cwd="/").returncode == 0:
        return as_nobody, NOBODY, f"uid {NOBODY}"
    r = subprocess.run([setpriv, *DROP_DAC, *probe], capture_output=True, text=True, cwd="/")
    if r.returncode != 0:
        pytest.skip(f"the interpreter is not readable by uid {NOBODY}, and dropping DAC capabilities failed: "
                    f"{r.stderr.strip()[-300:]}")
    return [setpriv, *DROP_DAC], None, "root without DAC capabilities"


def _freeze(path: str) -> None:
    """Files 0444, folders 0555, as a publisher hands them out."""
    for root, _dirs, files in os.walk(path):
        for f in files:
            os.chmod(os.path.join(root, f), 0o444)
        os.chmod(root, 0o555)


def _thaw(path: str) -> None:
    for root, _dirs, files in os.walk(path):
        os.chmod(root, 0o755)
        for f in files:
            os.chmod(os.path.join(root, f), 0o644)


def _listing(path: str) -> list[tuple[str, int]]:
    return sorted((os.path.relpath(os.path.join(r, f), path), stat.S_IMODE(os.stat(os.path.join(r, f)).st_mode))
                  for r, _, fs in os.walk(path) for f in fs)


@pytest.fixture(scope="module")
def published():
    prefix, uid, how = _restricted()
    base = tempfile.mkdtemp(prefix="regionbert-readonly-")  # under /tmp: reachable by another uid
    os.chmod(base, 0o755)
    try:
        d = write_dataset(os.path.join(base, "src"), n_train=24, n_val=8, feature_dim=16, min_boxes=1, max_boxes=8)
        src = d["shards"]
        assert os.path.exists(os.path.join(src, "lock.mdb"))  # the writer's; readers must not need it
        pub = os.path.join(base, "pub")
        os.makedirs(pub)
        assert shards_main(["copy", src, os.path.join(pub, "shard-00000")]) == 0
        assert shards_main(["index", os.path.join(pub, "shard-00000"), "-o", os.path.join(pub, "index.json"),
                            "-q"]) == 0
        assert not os.path.exists(os.path.join(pub, "shard-00000", "lock.mdb"))
        partial = os.path.join(base, "partial")  # a crashed writer's shard, handed out as it is
        w = ShardWriter(partial, feature_dim=16, class_names=None)
        for i in range(5):
            w.add(f"p{i}", width=10, height=10, boxes=np.zeros((1, 4)), features=np.ones((1, 16)))
        w.close(complete=False)
        _freeze(partial)
        out = os.path.join(base, "out")  # the only place the reading processes may write
        os.makedirs(out)
        if uid is not None:
            os.chown(out, uid, uid)
        for p in (d["captions"], d["tokenizer"]):
            os.chmod(p, 0o444)
        _freeze(src)
        _freeze(pub)
        yield {**d, "pub": pub, "out": out, "partial": partial, "prefix": prefix, "how": how}
    finally:
        _thaw(base)
        shutil.rmtree(base)


def _run(pub_env: dict, *args: str):
    env = {**os.environ, "HOME": pub_env["out"], "MPLCONFIGDIR": os.path.join(pub_env["out"], "mpl"),
           "PYTHONDONTWRITEBYTECODE": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.run([*pub_env["prefix"], sys.executable, *args], capture_output=True, text=True, cwd="/",
                          env=env, timeout=600)


def test_the_restriction_binds(published):
    """The control: the reading process really cannot write into the shard folders."""
    for folder in (published["shards"], os.path.join(published["pub"], "shard-00000")):
        r = _run(published, "-c", f"open({os.path.join(folder, 'probe')!r}, 'w')")
        assert r.returncode != 0 and "Permission denied" in r.stderr, (published["how"], r.stderr)


def test_shard_commands_read_a_read_only_shard_without_a_lock(published):
    pub, src, out = published["pub"], published["shards"], published["out"]
    before = {p: _listing(p) for p in (pub, src)}
    shard = os.path.join(pub, "shard-00000")
    cli = ["-m", "regionbert.data.cli"]
    for args in (["inspect", shard], ["inspect", src, "--json"], ["verify", "-q", os.path.join(pub, "index.json")],
                 ["verify", "-q", src], ["export", os.path.join(pub, "index.json"), "--to", "hdf5", "-q",
                                         "-o", os.path.join(out, "all.h5")]):
        r = _run(published, *cli, *args)
        assert r.returncode == 0, f"{published['how']}: {args}: {r.stdout}{r.stderr}"
        if args[0] == "verify":
            assert r.stdout.startswith("OK"), r.stdout
    # show: the record's image, drawn with its boxes
    r = _run(published, "-c", "import json, sys; from regionbert.data import ShardReader; r = ShardReader(sys.argv[1])"
             "[0]; print(json.dumps([r.id, r.width, r.height]))", shard)
    assert r.returncode == 0, r.stderr
    _, w, h = json.loads(r.stdout)
    Image.fromarray(np.zeros((h, w, 3), np.uint8)).save(os.path.join(out, "image.png"))
    r = _run(published, *cli, "show", shard, "--image", os.path.join(out, "image.png"), "-o",
             os.path.join(out, "show.png"))
    assert r.returncode == 0, r.stderr
    assert open(os.path.join(out, "show.png"), "rb").read(4) == b"\x89PNG"
    # the reader API over both, every record decoded with its checksum
    code = ("import sys; from regionbert.data import ShardReader, ShardSet\n"
            "s = ShardSet(sys.argv[1]); a = [s[i].features.sum() for i in range(len(s))]\n"
            "r = ShardReader(sys.argv[2]); b = [r.get(k).features.sum() for k in r.keys()]\n"
            "assert a == b and len(a) == 32, (len(a), len(b)); print(len(a))")
    r = _run(published, "-c", code, os.path.join(pub, "index.json"), src)
    assert r.returncode == 0 and r.stdout.strip() == "32", r.stderr
    assert {p: _listing(p) for p in (pub, src)} == before  # nothing created, nothing changed


def test_trainer_reads_a_read_only_published_index(published):
    out = os.path.join(published["out"], "run")
    settings = {"data.shards": os.path.join(published["pub"], "index.json"), "data.captions": published["captions"],
                "data.tokenizer": published["tokenizer"], "model.hidden_size": 32, "model.num_layers": 1,
                "model.num_heads": 2, "model.intermediate_size": 64, "model.max_text_len": 24,
                "data.token_budget": 600, "data.num_workers": 1, "optim.warmup_steps": 1, "optim.steps": 2,
                "run.log_every": 1, "run.eval_every": 0, "run.eval_images": 4}
    r = _run(published, "-m", "regionbert.train.cli", *[f"--set={k}={v}" for k, v in settings.items()], "--out", out)
    assert r.returncode == 0, f"{published['how']}: {r.stdout[-2000:]}{r.stderr[-3000:]}"
    assert "step 2/2" in r.stdout
    assert not os.path.exists(os.path.join(published["pub"], "shard-00000", "lock.mdb"))


def test_incomplete_shard_reads_without_its_lock_where_none_can_be_taken(published):
    partial = published["partial"]
    before = _listing(partial)
    r = _run(published, "-W", "default", "-c", "import sys; from regionbert.data import ShardReader; "
             "r = ShardReader(sys.argv[1]); print(len(r), r[4].id, list(r.keys())[0])", partial)
    assert r.returncode == 0 and r.stdout.split() == ["5", "p4", "p0"], r.stderr
    assert "shard is incomplete" in r.stderr and "without LMDB's lock" in r.stderr
    assert _listing(partial) == before


def test_read_only_file_system(tmp_path):
    """The same on a read-only mount (a bind mount remounted ro in a private mount namespace), modes untouched."""
    unshare = shutil.which("unshare")
    if os.geteuid() != 0 or unshare is None:
        pytest.skip("needs root and unshare(1) to make a read-only bind mount")
    d = str(tmp_path / "ro")
    write_synthetic_shard(os.path.join(d, "s"), 8, feature_dim=8, min_boxes=0, max_boxes=3)
    assert shards_main(["index", d, "-o", os.path.join(d, "index.json"), "-q"]) == 0
    w = ShardWriter(os.path.join(d, "partial"), feature_dim=8, class_names=None)
    w.add("p0", width=10, height=10, boxes=np.zeros((1, 4)), features=np.ones((1, 8)))
    w.close(complete=False)
    for name in ("s", "partial"):  # a reader of a read-only mount finds no lock file it could use either
        for lock in ("lock.mdb", "writer.lock"):  # (LMDB's, and the writer's own: data/lock.py)
            os.remove(os.path.join(d, name, lock))
    read = ("import sys; from regionbert.data import ShardReader, ShardSet; from regionbert.data.cli import main; "
            "assert main(['verify', '-q', sys.argv[1] + '/index.json']) == 0; "
            "print(len(ShardSet(sys.argv[1] + '/index.json')), ShardReader(sys.argv[1] + '/partial')[0].id)")
    script = (f'mount --bind "$1" "$1" && mount -o remount,bind,ro "$1" || exit 77; '
              f'touch "$1/s/probe" 2>/dev/null && exit 78; exec {shlex.quote(sys.executable)} -W ignore -c "$2" "$1"')
    r = subprocess.run([unshare, "-m", "sh", "-c", script, "sh", d, read], capture_output=True, text=True, cwd="/",
                       env={**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}, timeout=300)
    if r.returncode == 77:
        pytest.skip(f"cannot make a read-only bind mount here: {r.stderr.strip()[-200:]}")
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.split()[-2:] == ["8", "p0"]
    assert sorted(os.listdir(os.path.join(d, "s"))) == ["data.mdb"]
