"""Loader workers hold their batches in shared memory (/dev/shm on Linux), which a container keeps at 64 MB
unless told otherwise: one batch of 2048-d features at the default budget is ~34 MB. A loader that cannot
hold the batches its workers prefetch is refused before any worker starts, with one line that says how much
it needs, how much there is, and what to change; before, a worker died with torch's traceback ("unable to
allocate shared memory(shm) ... No space left on device")."""

import multiprocessing
import os
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest
from train_synth import write_dataset

from regionbert.train.config import load_config
from regionbert.train.run import build_data, check_shared_memory, largest_batch_bytes

MB = 2**20


def _free(path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def test_the_check_refuses_below_what_the_workers_prefetch_and_warns_below_what_they_may_hold(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    free = _free(tmp_path)  # a real file system's free space; the margins below are 2x either way
    workers, slots, prefetch = 2, 8, 4
    with pytest.raises(ValueError) as e:
        check_shared_memory(workers, 2 * free // (workers * prefetch), slots, prefetch, path=str(tmp_path))
    msg = str(e.value)
    assert msg.startswith("data.num_workers=2: ") and str(tmp_path) in msg and "--shm-size" in msg, msg
    assert "data.num_workers=0" in msg and " MB free" in msg, msg
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_shared_memory(workers, free // (workers * slots * 3), slots, prefetch, path=str(tmp_path))  # room
    with pytest.warns(UserWarning, match="may come to hold"):
        check_shared_memory(workers, free // (workers * prefetch * 2), slots, prefetch, path=str(tmp_path))
    # every rank of a node shares its /dev/shm: what one rank may use, eight may not
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    with pytest.raises(ValueError, match="on each of 8 ranks of this node"):
        check_shared_memory(workers, free // (workers * prefetch * 2), slots, prefetch, path=str(tmp_path))
    check_shared_memory(workers, 1, slots, prefetch, path=str(tmp_path / "no-such-folder"))  # no /dev/shm: no check


@pytest.fixture(scope="module")
def wide(tmp_path_factory):
    """2048-d float16 features, 30-60 boxes an image: the detector's real width."""
    return write_dataset(str(tmp_path_factory.mktemp("shm") / "data"), 60, 0, feature_dim=2048, min_boxes=30,
                         max_boxes=60)


def test_the_bound_covers_every_batch_of_an_epoch(wide):
    cfg = load_config(None, [f"data.{k}={v}" for k, v in wide.items()] + [
        "data.split=null", "data.eval_split=null", "data.token_budget=2048", "data.num_workers=0",
        "model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64"])
    pairs, dataset, buckets, _ = build_data(cfg, None)
    bound = largest_batch_bytes(dataset, 2048)
    assert bound >= 2048 * 2048 * 2  # every token a region's 2048-d float16 feature
    widest = 0
    for batch in buckets.batches(0):
        B, N = len(batch), int(pairs.num_boxes[pairs.image[np.asarray(batch)]].max())
        widest = max(widest, B * N * 2048 * 2)
    assert 0 < widest <= bound


def _can_mount_a_private_shm() -> bool:
    if shutil.which("unshare") is None or sys.platform != "linux":
        return False
    r = subprocess.run(["unshare", "-m", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /dev/shm"],
                       capture_output=True)
    return r.returncode == 0


@pytest.mark.skipif(not _can_mount_a_private_shm(), reason="needs `unshare -m` and mount (root or CAP_SYS_ADMIN)")
def test_pretrain_in_a_container_sized_shm_stops_with_one_line_before_training(wide, tmp_path):
    """A 16 MB /dev/shm of its own (a mount namespace: nothing outside this test sees it): with a worker the
    run is refused, exit code 2, one line, nothing trained; without workers the same run trains."""
    config = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.toml")
    exe = os.path.join(os.path.dirname(sys.executable), "regionbert-pretrain")

    def pretrain(workers: int) -> subprocess.CompletedProcess:
        out = tmp_path / f"run{workers}"
        args = [exe, config] + [a for k, v in wide.items() for a in ("--set", f"data.{k}={v}")] + [
            "--set", "data.split=null", "--set", "data.eval_split=null", "--set", "optim.steps=3",
            "--set", f"data.num_workers={workers}", "--set", "data.token_budget=8192", "--set", f"run.out={out}",
            "--set", "run.checkpoint_every=0", "--set", "run.plot=false"]
        script = "mount -t tmpfs -o size=16m tmpfs /dev/shm && exec \"$@\""
        return subprocess.run(["unshare", "-m", "sh", "-c", script, "sh", *args], capture_output=True, text=True,
                              timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})

    r = pretrain(1)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    err = r.stderr.strip()
    lines = [line for line in err.splitlines() if line.startswith("regionbert-pretrain: error: ")]
    assert "Traceback" not in err and len(lines) == 1 and err.endswith(lines[0]), err  # (a warning may precede it)
    err = lines[0]
    assert "/dev/shm has 16 MB free" in err and "--shm-size" in err and "data.num_workers=0" in err, err
    assert not os.path.exists(tmp_path / "run1" / "checkpoint.pt")
    r = pretrain(0)
    assert r.returncode == 0, r.stderr[-3000:]
    assert os.path.exists(tmp_path / "run0" / "checkpoint.pt")


@pytest.mark.skipif(multiprocessing.get_start_method() != "fork", reason="the patch reaches the worker by fork")
def test_a_worker_out_of_shared_memory_mid_run_is_one_clear_error(wide, monkeypatch):
    """A worker whose next buffer cannot be had (another job filled /dev/shm, or the buffers grew past it):
    torch's own error from its own allocator (a 32 TB request here, which no /dev/shm has), raised in a real
    worker, reaches the trainer as one ValueError saying what happened and what to change, not torch's
    wrapped worker traceback."""
    import regionbert.train.data as data_mod
    from regionbert.train.data import DeviceFeed

    cfg = load_config(None, [f"data.{k}={v}" for k, v in wide.items()] + [
        "data.split=null", "data.eval_split=null", "data.token_budget=2048", "data.num_workers=1"])
    _, _, _, loader = build_data(cfg, None)  # (the start-up check passes: it sizes the real batches)
    monkeypatch.setattr(data_mod, "batch_bytes", lambda *a: 2**45)  # the worker's first buffer: 32 TB
    with pytest.raises(ValueError) as e:
        DeviceFeed(loader, "cpu").next()
    msg = str(e.value)
    assert msg.startswith("a loader worker could not get shared memory for its next batch: /dev/shm is full ("), msg
    assert "--shm-size" in msg and "--resume latest" in msg and "Traceback" not in msg and "\n" not in msg, msg
