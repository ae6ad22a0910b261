"""Distributed training: `torchrun --nproc_per_node 2` on the CPU (gloo), each rank reading its own
batches, the same task on every rank at every step, only rank 0 writing, identical replicas at the end."""

import json
import os
import shutil
import subprocess
from collections import Counter

import numpy as np
import pytest
from train_synth import write_dataset

from regionbert.data import ShardSet
from regionbert.train.checkpoint import load_checkpoint
from regionbert.train.data import Pairs, TaskSampler, TokenBucketSampler
from regionbert.train.text import Text

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
        "model.max_text_len=24", "data.token_budget=600", "optim.warmup_steps=2", "data.num_workers=0",
        "run.plot=false", "run.tensorboard=false", "run.eval_images=20", "run.eval_pairs=40",
        'tasks.mix={"mlm":1,"mrfr":1,"mrc":1,"mrc_kl":1,"itm":1}']


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ddp")
    return write_dataset(str(folder / "d"), n_train=160, n_val=40, feature_dim=16, min_boxes=0, max_boxes=30)


def _sampler(data, rank, world, skip=0):
    pairs = Pairs(ShardSet(data["shards"]), data["captions"], Text(data["tokenizer"], 24), "train")
    mix = {"mlm": 1, "itm": 1, "mrc": 1, "mrfr": 1}
    return TaskSampler(TokenBucketSampler(pairs.lengths, 600, seed=0), pairs, mix, seed=0, rank=rank,
                       world_size=world, skip=skip)


def test_each_rank_reads_its_own_batches_with_the_same_task(data):
    n = 60  # more than one epoch (about 25 steps per epoch on 2 ranks)
    streams = [[b for b, _ in zip(_sampler(data, r, 2), range(n), strict=False)] for r in range(2)]
    tasks = [[b[0][0] for b in s] for s in streams]
    assert tasks[0] == tasks[1] and len(set(tasks[0])) == 4  # same task per step, every task drawn
    epoch = len(TokenBucketSampler(_sampler(data, 0, 1).pairs.lengths, 600, seed=0).batches(0)) // 2
    # the ranks' batches are exactly one process's batches of that epoch, dealt out: b -> rank b % 2; ITM
    # steps take theirs from ITM's own stream (bucketed by the lengths with the negatives, issue 23)
    one = _sampler(data, 0, 1)
    batches, itm = one.buckets.batches(0), one.itm_batches(0, 0)[0]
    for r in range(2):
        j = 0
        for g, b in enumerate(streams[r][:epoch]):
            if b[0][0] == "itm":
                assert [k[1] for k in b] == itm[2 * j + r]
                j += 1
            else:
                assert [k[1] for k in b] == batches[2 * g + r]
    for is_itm in (False, True):
        seen = [k[1] for s in streams for b in s[:epoch] if (b[0][0] == "itm") == is_itm for k in b]
        assert len(seen) == len(set(seen))  # within an epoch no pair is read by both ranks (for one task kind)
    seen = {k[1] for s in streams for b in s[:epoch] for k in b}
    assert len(seen) >= 0.75 * 320  # together they read most of it
    assert Counter(t for t in tasks[0]).most_common(1)[0][1] < n  # a mix, not one task
    again = _sampler(data, 1, 2, skip=7)  # resumable: skip reproduces each rank's stream
    assert next(iter(again)) == streams[1][7]
    with pytest.raises(ValueError, match="rank 2 is not in 0..1"):
        _sampler(data, 2, 2)


@pytest.mark.skipif(shutil.which("torchrun") is None, reason="torchrun (from torch) is not on PATH")
def test_torchrun_two_processes_train_identical_replicas(data, tmp_path):
    out = tmp_path / "run"
    args = [f"--set=data.{k}={v}" for k, v in data.items()] + [f"--set={o}" for o in TINY]
    # 2 batches per step: gradients all-reduced on the second only (no_sync on the first)
    args += ["--set=optim.steps=6", "--set=optim.accum_steps=2", "--set=run.log_every=2",
             "--set=run.checkpoint_every=3", "--out", str(out)]
    cmd = [shutil.which("torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "regionbert.train.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert r.stdout.count("regionbert-pretrain: ") == 1, r.stdout  # only rank 0 prints
    assert "on 2 x cpu" in r.stdout and "parameters identical on all 2 ranks" in r.stdout
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [x["step"] for x in log if "lr" in x] == [2, 4, 6]  # one writer
    digests = [x for x in log if "replica_digests" in x][0]["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]
    assert {"itm_acc", "mlm_acc", "t2i_r1", "i2t_r10"} <= set([x for x in log if "eval" in x][-1]["eval"])
    state = load_checkpoint(str(out / "checkpoint.pt"))
    assert state["step"] == 6 and state["data"] == {"batches": 12, "world_size": 2, "seed": 0}
    assert len(state["rng"]) == 2 and not np.array_equal(state["rng"][0]["torch"], state["rng"][1]["torch"])
    # and it resumes under torchrun
    r = subprocess.run(cmd + ["--set=optim.steps=8", "--resume", "latest"], capture_output=True, text=True,
                       timeout=300, env=env, cwd=str(tmp_path))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "resuming at step 6" in r.stdout and load_checkpoint(str(out / "checkpoint.pt"))["step"] == 8
