"""Checkpoints and exact resume: kill -9 a real training process, resume it, and get the losses of a run
that was never interrupted; atomic writes; a non-finite loss stops the run and keeps the last good
checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from train_synth import write_dataset

from regionbert.train import checkpoint as ckpt
from regionbert.train.checkpoint import list_checkpoints, load_checkpoint, rng_state, set_rng_state
from regionbert.train.cli import main
from regionbert.train.pretrainer import Pretrainer

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
        "model.max_text_len=24", "data.token_budget=600", "optim.warmup_steps=5", "optim.lr=1e-3",
        "data.num_workers=0", "data.eval_split=null", "run.plot=false", "run.tensorboard=false",
        'tasks.mix={"mlm":1,"mrfr":1,"mrc":1,"mrc_kl":1,"itm":1}']
STEPS, EVERY = 150, 10


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("resume")
    return write_dataset(str(folder / "d"), n_train=160, n_val=40, feature_dim=16, min_boxes=0, max_boxes=30)


def _args(data, out, *extra):
    return ([f"--set=data.{k}={v}" for k, v in data.items()] + [f"--set={o}" for o in TINY]
            + [f"--set=optim.steps={STEPS}", f"--set=run.checkpoint_every={EVERY}", "--set=run.log_every=1",
               "--set=run.keep_checkpoints=2", "--out", str(out), *extra])


def _command(data, out, *extra):
    # dropout stays on (0.1): its RNG must be restored too. One thread: the same sums in the same order.
    return [sys.executable, "-m", "regionbert.train.cli", *_args(data, out, *extra)]


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}


def _losses(run_dir):
    """{step: {loss name: value}} from a run's log.jsonl (training reports only)."""
    out = {}
    for line in open(os.path.join(run_dir, "log.jsonl")):
        r = json.loads(line)
        if "lr" in r:
            assert r["step"] not in out, f"step {r['step']} logged twice"
            out[r["step"]] = {k: v for k, v in r.items() if k in ("mlm", "mrfr", "mrc", "mrc_kl", "itm", "wra")}
    return out


def _steps_logged(run_dir):
    try:
        with open(os.path.join(run_dir, "log.jsonl")) as f:
            return [json.loads(line)["step"] for line in f if line.endswith("\n")]
    except (FileNotFoundError, ValueError):
        return []


def test_killed_run_resumes_with_the_same_losses(data, tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    r = subprocess.run(_command(data, whole), env=ENV, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]

    p = subprocess.Popen(_command(data, killed), env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    try:  # kill it a few steps past a checkpoint, so the resumed run must redo those steps
        while p.poll() is None and time.monotonic() < deadline:
            done = _steps_logged(killed)
            if done and done[-1] >= 2 * EVERY + 3 and os.path.exists(killed / "checkpoint.pt"):
                break
            time.sleep(0.005)
        p.send_signal(signal.SIGKILL)
        p.wait(timeout=30)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == -signal.SIGKILL, f"the run ended by itself before it was killed: {p.stderr.read()[-2000:]}"
    stopped_at = _steps_logged(killed)[-1]
    state = load_checkpoint(str(killed / "checkpoint.pt"))
    saved = state["step"]
    assert saved % EVERY == 0 and 2 * EVERY <= saved < stopped_at < STEPS, (saved, stopped_at)
    assert state["data"] == {"batches": saved, "world_size": 1, "seed": 0}
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "config"} <= set(state)
    # from scratch the moments are per task (optim.task_state=auto): those of every task trained so far are saved
    trained = {k for s, losses in _losses(killed).items() if s <= saved for k in losses if k != "wra"}
    assert sorted(state["optimizer"]["task_states"]) == sorted(trained) and len(trained) >= 3, trained
    assert not any(n.endswith(".tmp") for n in os.listdir(killed / "checkpoints"))

    r = subprocess.run(_command(data, killed, "--resume", "latest"), env=ENV, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"resuming at step {saved}" in r.stdout
    a, b = _losses(whole), _losses(killed)
    assert sorted(a) == sorted(b) == list(range(1, STEPS + 1))  # the redone steps replaced the killed run's
    diff = [(s, a[s], b[s]) for s in a if a[s] != b[s]]
    assert not diff, f"{len(diff)} steps differ after resuming at {saved}, first: {diff[0]}"
    final_a, final_b = load_checkpoint(str(whole / "checkpoint.pt")), load_checkpoint(str(killed / "checkpoint.pt"))
    assert all(torch.equal(final_a["model"][k], final_b["model"][k]) for k in final_a["model"])
    # only the newest two step files are kept; checkpoint.pt is the newest
    assert [os.path.basename(p) for p in list_checkpoints(str(killed))] == [
        f"step-{STEPS - EVERY:08d}.pt", f"step-{STEPS:08d}.pt"]


def test_resume_latest_without_a_checkpoint_starts_fresh_and_bad_paths_are_named(data, tmp_path, capsys):
    short = ["--set=optim.steps=2", "--set=run.log_every=1"]
    assert main(_args(data, tmp_path / "r") + short + ["--resume", "latest"]) == 0
    out = capsys.readouterr().out
    assert "no checkpoint in" in out and "step 2/2" in out
    assert main(_args(data, tmp_path / "r") + ["--resume", str(tmp_path / "nope.pt")]) == 2
    assert "nope.pt: no checkpoint here" in capsys.readouterr().err


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    from regionbert.train.model import ModelConfig

    model = Pretrainer(ModelConfig(vocab_size=20, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8,
                                   feature_dim=4, num_classes=3, max_text_len=8))
    ckpt.save_run_checkpoint(str(tmp_path), 1, model=model)
    good = load_checkpoint(str(tmp_path / "checkpoint.pt"))

    real_save = torch.save

    def crash_halfway(obj, f, *a, **k):  # the process "dies" with half a file written
        real_save(obj, f, *a, **k)
        f.truncate(f.tell() // 2)
        raise KeyboardInterrupt("simulated crash while saving")

    monkeypatch.setattr(torch, "save", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_run_checkpoint(str(tmp_path), 2, model=model)
    monkeypatch.undo()
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"))["step"] == good["step"] == 1  # latest: still step 1
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path))] == ["step-00000001.pt"]
    assert not [n for n in os.listdir(tmp_path / "checkpoints") if n.endswith(".tmp")]
    # a torn file never passes for a checkpoint
    (tmp_path / "torn.pt").write_bytes(open(tmp_path / "checkpoint.pt", "rb").read()[:1000])
    with pytest.raises(ValueError, match="torn.pt: not a loadable regionbert checkpoint"):
        load_checkpoint(str(tmp_path / "torn.pt"))


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    torch.manual_seed(3), np.random.seed(3), random.seed(3)
    torch.save({"rng": rng_state()}, tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    set_rng_state(torch.load(tmp_path / "r.pt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], expected[0]) and np.array_equal(got[1], expected[1]) and got[2] == expected[2]


def test_non_finite_loss_stops_the_run_and_keeps_the_last_good_checkpoint(data, tmp_path, monkeypatch, capsys):
    calls = {"n": 0}
    forward = Pretrainer.forward

    def poisoned(self, batch):  # the 5th step's loss is nan (as after a divergence)
        losses = forward(self, batch)
        calls["n"] += 1
        return {k: v * float("nan") for k, v in losses.items()} if calls["n"] == 5 else losses

    monkeypatch.setattr(Pretrainer, "forward", poisoned)
    args = _args(data, tmp_path / "r") + ["--set=optim.steps=8", "--set=run.checkpoint_every=2",
                                          "--set=run.log_every=4", "--set=run.keep_checkpoints=0"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "step 5: the" in err and "loss is not finite" in err and "last checkpoint" in err
    state = load_checkpoint(str(tmp_path / "r" / "checkpoint.pt"))
    assert state["step"] == 4  # step 6's checkpoint was never written: nan weights never reach the disk
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert [os.path.basename(p) for p in list_checkpoints(str(tmp_path / "r"))] == ["step-00000002.pt",
                                                                                     "step-00000004.pt"]
