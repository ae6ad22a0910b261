"""Captions, tokens, batching, config and the `regionbert-pretrain` command, end to end on real shards."""

import itertools
import json
import os
import subprocess
import sys
from collections import Counter

import numpy as np
import pandas as pd
import pytest
import torch
from train_synth import write_dataset

from regionbert.data import ShardSet
from regionbert.train.checkpoint import load_checkpoint
from regionbert.train.cli import main
from regionbert.train.config import load_config
from regionbert.train.data import PairDataset, Pairs, TaskSampler, TokenBucketSampler, collate
from regionbert.train.optim import build_optimizer, warmup_linear
from regionbert.train.pretrainer import Pretrainer
from regionbert.train.text import Text, read_manifest

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
        "model.max_text_len=24", "data.token_budget=600", "optim.warmup_steps=2", "run.log_every=2"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pipe")
    return write_dataset(str(folder / "d"), n_train=160, n_val=40, feature_dim=16, min_boxes=0, max_boxes=30)


@pytest.fixture(scope="module")
def pairs(data):
    text = Text(data["tokenizer"], max_len=24)
    return Pairs(ShardSet(data["shards"]), data["captions"], text, "train"), text


def test_manifest_formats_and_splits(data, tmp_path):
    df = pd.read_csv(data["captions"], dtype=str)
    for ext, write in [(".tsv", lambda p: df.to_csv(p, sep="\t", index=False)),
                       (".jsonl", lambda p: df.to_json(p, orient="records", lines=True)),
                       (".parquet", lambda p: df.to_parquet(p))]:
        got = read_manifest(write(tmp_path / f"m{ext}") or str(tmp_path / f"m{ext}"), "val")
        assert len(got) == 80 and set(got["split"]) == {"val"} and got["image_id"].iloc[0] == "synth/00000160"
    assert len(read_manifest(data["captions"])) == 400
    with pytest.raises(ValueError, match="no rows with split == 'test'"):
        read_manifest(data["captions"], "test")
    df.drop(columns=["caption"]).to_csv(tmp_path / "bad.csv", index=False)
    with pytest.raises(ValueError, match="bad.csv: manifest lacks column"):
        read_manifest(str(tmp_path / "bad.csv"))


def test_captions_naming_missing_images_are_refused_by_row(data, tmp_path):
    df = pd.read_csv(data["captions"], dtype=str)
    df.loc[7, "image_id"] = "coco/nowhere"
    df.to_csv(tmp_path / "m.csv", index=False)
    with pytest.raises(KeyError, match=r"m.csv: 1 caption\(s\) name images that are in no shard "
                                       r"\(row 7: 'coco/nowhere'"):
        Pairs(ShardSet(data["shards"]), str(tmp_path / "m.csv"), Text(data["tokenizer"]))


def test_tokenizer_from_vocab_or_json_truncates_with_cls_and_sep(data, tmp_path):
    text = Text(data["tokenizer"], max_len=6)
    ids = text.encode(["A photo of a Dog, a cat and a teddy bear", "dog"])
    assert [len(i) for i in ids] == [6, 3]
    assert ids[0][0] == text.cls_id and ids[0][-1] == text.sep_id and text.decode(ids[1]) == "[CLS] dog [SEP]"
    text.tok.save(str(tmp_path / "tokenizer.json"))
    assert [list(i) for i in Text(str(tmp_path / "tokenizer.json"), max_len=6).encode(["a dog and a cat"])] == \
        [list(i) for i in text.encode(["a dog and a cat"])]
    (tmp_path / "v.txt").write_text("[PAD]\n[UNK]\ndog\n")
    with pytest.raises(ValueError, match=r"v.txt: vocabulary lacks the special tokens "
                                         r"\['\[CLS\]', '\[SEP\]', '\[MASK\]'\]"):
        Text(str(tmp_path / "v.txt"))


def test_token_bucket_sampler_pads_little_and_keeps_the_budget(pairs):
    p, _ = pairs
    lengths = p.lengths
    sorted_ = TokenBucketSampler(lengths, 600, seed=0)
    plain = TokenBucketSampler(lengths, 600, sort=False, seed=0)
    for s in (sorted_, plain):
        batches = s.batches(3)
        assert sorted(i for b in batches for i in b) == list(range(len(lengths)))  # each pair once per epoch
        assert all(len(b) * lengths[b].max() <= 600 for b in batches)
    assert sorted_.padding_fraction() <= 0.15 < plain.padding_fraction()
    assert sorted_.batches(1) != sorted_.batches(2)  # a new order every epoch
    assert sorted_.batches(1) == TokenBucketSampler(lengths, 600).batches(1)  # the same for the same seed


def test_task_sampler_mixes_tasks_and_makes_negatives(pairs):
    p, _ = pairs
    sampler = TaskSampler(TokenBucketSampler(p.lengths, 600), p, {"mlm": 3, "itm": 1, "mrc": 0}, seed=0,
                          neg_window=10)
    batches = [b for b, _ in zip(sampler, range(400), strict=False)]
    tasks = Counter(b[0][0] for b in batches)
    assert set(tasks) == {"mlm", "itm"} and 0.65 < tasks["mlm"] / 400 < 0.85
    itm = [k for b in batches if b[0][0] == "itm" for k in b]
    negs = [(p.image[k[1]], k[2]) for k in itm if k[2] >= 0]
    assert 0.4 < len(negs) / len(itm) < 0.6
    assert all(own != other for own, other in negs)
    assert np.mean([abs(p.num_boxes[o] - p.num_boxes[n]) for o, n in negs]) <= 3  # near in box count
    again = TaskSampler(TokenBucketSampler(p.lengths, 600), p, {"mlm": 3, "itm": 1}, seed=0, neg_window=10, skip=5)
    assert next(iter(again)) == batches[5]  # resumable: skip reproduces the stream


def _bucket_batches_one_pair_at_a_time(s: TokenBucketSampler, epoch: int) -> list[list[int]]:
    """TokenBucketSampler.batches as it was written before issue 23 (one pair per Python step), for reference."""
    rng = np.random.default_rng([s.seed, epoch])
    order, out = rng.permutation(len(s.lengths)), []
    for start in range(0, len(order), s.bucket_size):
        bucket = order[start:start + s.bucket_size]
        bucket = bucket[np.argsort(-s.lengths[bucket], kind="stable")]
        batch, longest = [], 0
        for i in bucket.tolist():
            n = max(longest, int(s.lengths[i]))
            if batch and (n * (len(batch) + 1) > s.budget or len(batch) >= s.max_batch_size):
                out.append(batch)
                batch, n = [], int(s.lengths[i])
            batch.append(i)
            longest = n
        if batch:
            out.append(batch)
    return [out[i] for i in rng.permutation(len(out))]


def test_token_buckets_cut_a_batch_at_a_time_as_they_cut_a_pair_at_a_time():
    rs = np.random.default_rng(1)  # the same batches (exact resume of runs from before), a batch per Python step
    for t in range(40):
        lengths = rs.integers(0 if t % 5 == 0 else 1, 300, int(rs.integers(1, 2000)))
        for budget, cap in ((1, None), (600, None), (600, 3), (8192, 64)):
            s = TokenBucketSampler(lengths, budget, bucket_size=int(rs.integers(1, 3000)), seed=t, max_batch_size=cap)
            assert s.batches(t % 3) == _bucket_batches_one_pair_at_a_time(s, t % 3)


def _real_length(p, key) -> int:
    """A key's padded length in a batch: its text + the regions of the image it shows (a negative's)."""
    _, pair, other, _ = key
    return int(p.lengths[pair] - p.num_boxes[p.image[pair]] + p.num_boxes[p.image[pair] if other < 0 else other])


def test_every_batch_of_every_task_keeps_the_token_budget(pairs):
    # issue 23: ITM negatives were swapped into batches cut by the pairs' own lengths (up to 3.6x the budget)
    p, _ = pairs
    budget, mix = 300, {"mlm": 1, "itm": 2, "mrfr": 1}
    for world in (1, 2):
        streams = [list(itertools.islice(TaskSampler(TokenBucketSampler(p.lengths, budget), p, mix, seed=0, rank=r,
                                                     world_size=world), 400)) for r in range(world)]
        for s in streams:
            assert [b[0][0] for b in s] == [b[0][0] for b in streams[0]]  # the ranks stay in step
            tasks = Counter(b[0][0] for b in s)
            assert 0.4 < tasks["itm"] / len(s) < 0.6  # one task per step, drawn with the mix's ratios
            for b in s:
                lens = [_real_length(p, k) for k in b]
                assert len(b) == 1 or len(b) * max(lens) <= budget, (b[0][0], len(b), max(lens))
                assert len({k[0] for k in b}) == 1
            itm = [k for b in s if b[0][0] == "itm" for k in b]
            negs = [(p.image[k[1]], k[2]) for k in itm if k[2] >= 0]
            assert 0.4 < len(negs) / len(itm) < 0.6 and all(own != other for own, other in negs)
            far = [abs(int(p.num_boxes[o]) - int(p.num_boxes[n])) for o, n in negs]
            assert max(far) >= 20  # negatives from any image (UNITER), not ones near in box count
            pad = 1 - sum(_real_length(p, k) for b in s for k in b) / sum(
                len(b) * max(_real_length(p, k) for k in b) for b in s)
            assert pad < 0.15
        for skip in (0, 1, 7, 150, 399):  # resumable anywhere, ITM's stream included
            again = TaskSampler(TokenBucketSampler(p.lengths, budget), p, mix, seed=0, rank=world - 1,
                                world_size=world, skip=skip)
            assert list(itertools.islice(again, 1)) == streams[-1][skip:skip + 1]
    # the keys the pair batches would give an ITM step (the way before) break the budget on this data
    sampler = TaskSampler(TokenBucketSampler(p.lengths, budget), p, {"itm": 1}, seed=0)
    old = [sampler.keys(b, 0, i) for i, b in enumerate(sampler.buckets.batches(0))]
    assert max(len(b) * max(_real_length(p, k) for k in b) for b in old) > 1.2 * budget


def test_dataset_masks_by_task_and_collate_measures_padding(data, pairs):
    p, text = pairs
    ds = PairDataset(ShardSet(data["shards"]), p, text, "conditional", max_regions=100)
    with_boxes = int(np.flatnonzero(p.num_boxes[p.image] > 0)[0])
    mlm, mrc = ds[("mlm", with_boxes, -1, 1)], ds[("mrc", with_boxes, -1, 1)]
    assert (mlm["mlm_labels"] != -100).any() and not mlm["region_mask"].any()
    assert (mrc["mlm_labels"] == -100).all() and mrc["region_mask"].any()
    assert ds[("mlm", with_boxes, -1, 1)]["input_ids"].tolist() == mlm["input_ids"].tolist()  # seeded
    samples = [ds[("itm", i, -1, i)] for i in range(8)]
    batch = collate(samples)
    lens = np.array([len(s["input_ids"]) + len(s["features"]) for s in samples])
    assert batch["pad_fraction"] == pytest.approx(1 - lens.sum() / (8 * lens.max()))
    assert batch["features"].shape == (8, max(len(s["features"]) for s in samples), 16)


def test_optimizer_skips_decay_on_bias_and_layernorm_and_schedule_shape():
    from regionbert.train.model import ModelConfig

    m = Pretrainer(ModelConfig(vocab_size=50, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                               feature_dim=8, num_classes=5))
    decay, no_decay = build_optimizer(m, 1e-3, 0.01).param_groups
    ln = m.encoder.layers[0].ln1
    assert any(p is ln.weight for p in no_decay["params"]) and any(p is ln.bias for p in no_decay["params"])
    assert any(p is m.encoder.layers[0].attn.qkv.weight for p in decay["params"]) and no_decay["weight_decay"] == 0
    n = sum(p.numel() for g in (decay, no_decay) for p in g["params"])
    assert n == sum(p.numel() for p in m.parameters())  # the tied weight once
    f = warmup_linear(10, 110)
    assert f(0) == 0.1 and f(9) == 1.0 and f(60) == 0.5 and f(110) == 0.0


def test_config_overrides_and_errors(tmp_path):
    (tmp_path / "c.toml").write_text('[model]\nnum_layers = 3\n[data]\ncaptions = "caps.csv"\n[tasks.mix]\nmrc = 0.5\n')
    cfg = load_config(str(tmp_path / "c.toml"), ["model.hidden_size=96", "optim.lr=1", "tasks.mix.mlm=0",
                                                 "data.split=null", "optim.betas=[0.9, 0.999]"])
    assert cfg.model.num_layers == 3 and cfg.model.hidden_size == 96 and cfg.optim.lr == 1.0
    assert cfg.data.captions == str(tmp_path / "caps.csv") and cfg.data.split is None
    assert cfg.tasks.mix == {"mrc": 0.5, "mlm": 0.0}  # a table replaces the mix; tasks.mix.X=r changes one
    for bad, msg in [("model.layers=2", "unknown setting 'model.layers'"), ("model.num_layers=two", "expected int"),
                     ("tasks.mix.nsp=1", "unknown task 'nsp'"), ("tasks.masking=sometimes", "conditional or joint"),
                     ("model.num_heads=5", "not a multiple of model.num_heads")]:
        with pytest.raises(ValueError, match=msg):
            load_config(None, [bad])


def test_pretrain_command_runs_resumes_and_saves_everything(data, tmp_path, capsys):
    out = tmp_path / "run"
    args = [f"--set=data.{k}={v}" for k, v in data.items()] + [f"--set={o}" for o in TINY]
    args += ["--set=data.num_workers=1", "--set=optim.steps=4",
             '--set=tasks.mix={"mlm":1,"mrfr":1,"mrc":1,"mrc_kl":1,"itm":1}']
    assert main(args + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "step 4/4" in printed and "samples/s" in printed and "padding" in printed
    resolved = json.loads((out / "config.json").read_text())
    vocab_size = len(open(data["tokenizer"]).read().split())
    assert resolved["model"]["feature_dim"] == 16 and resolved["model"]["vocab_size"] == vocab_size
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    train = [r for r in log if "lr" in r]
    assert [r["step"] for r in train] == [2, 4] and all("data_wait" in r and "eta_s" in r for r in train)
    held_out = [r for r in log if "eval" in r]  # the manifest's 'val' rows, after the last step
    assert [r["step"] for r in held_out] == [4]
    assert {"mlm_acc", "itm_acc", "mrc_acc", "i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", "t2i_r5", "t2i_r10"} <= \
        set(held_out[0]["eval"])
    assert "eval step 4: itm_acc" in printed and "retrieval (%)" in printed
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG" and (out / "checkpoints" / "step-00000004.pt").exists()
    state = load_checkpoint(str(out / "checkpoint.pt"))
    assert state["step"] == 4 and state["config"] == resolved
    before = state["model"]["encoder.pooler.weight"].clone()
    assert main(args + ["--out", str(out), "--resume", "--set=optim.steps=6"]) == 0
    assert "resuming at step 4" in capsys.readouterr().out
    after = load_checkpoint(str(out / "checkpoint.pt"))
    assert after["step"] == 6 and not torch.equal(after["model"]["encoder.pooler.weight"], before)


def test_pretrain_command_reports_bad_input(data, tmp_path, capsys):
    assert main(["--set=model.layers=2"]) == 2
    assert "unknown setting 'model.layers'" in capsys.readouterr().err
    assert main([f"--set=data.{k}={v}" for k, v in data.items()] + ["--set=data.shards=/nonexistent"]) == 2
    assert "/nonexistent" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main([f"--set=data.{k}={v}" for k, v in data.items()] + ["--set=run.precision=bf16"]) == 2
        assert "run.precision=bf16 needs a CUDA device" in capsys.readouterr().err
    assert main(["--set=run.precision=fp8"]) == 2
    assert "run.precision must be fp32, bf16 or fp16" in capsys.readouterr().err
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="checkpoint.pt: not a loadable regionbert checkpoint"):
        load_checkpoint(str(tmp_path / "checkpoint.pt"))


def test_pretrain_module_prints_config():
    r = subprocess.run([sys.executable, "-m", "regionbert.train.cli", "--print-config", "--set", "model.num_layers=2"],
                       capture_output=True, text=True, cwd="/", env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["model"]["num_layers"] == 2
