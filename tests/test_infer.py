"""regionbert.train.infer and `regionbert-pretrain score`: an exported model (or a run) gives the trainer's ITM scores
and hidden states for (regions from a shard, caption) pairs; one score per caption row; bad input exits 2.

Tolerance 1e-5 as in tests/test_export_hf.py: the same float32 operations on the same weights; only the batch
composition (hence the padded length) differs from the trainer's evaluation, which moves results by rounding.
"""

import csv
import os

import numpy as np
import pandas as pd
import pytest
import torch
from train_synth import write_dataset

from regionbert.data import ShardSet
from regionbert.data.synth import write_synthetic_shard
from regionbert.train.cli import main
from regionbert.train.data import PairDataset, Pairs, collate
from regionbert.train.evaluate import itm_scores
from regionbert.train.export import model_from_checkpoint
from regionbert.train.infer import Model
from regionbert.train.text import Text, read_manifest

TOL = 1e-5
TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
        "model.max_text_len=24", "data.token_budget=600", "optim.warmup_steps=2", "optim.steps=4",
        "run.log_every=2", "data.num_workers=0", "run.plot=false", "run.tensorboard=false", "data.max_regions=10"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A 4-step run on a 50-image synthetic shard (up to 12 boxes, 10 used) and its export."""
    folder = tmp_path_factory.mktemp("infer")
    data = write_dataset(str(folder / "data"), n_train=40, n_val=10, feature_dim=16, min_boxes=0, max_boxes=12)
    run = str(folder / "run")
    assert main([f"--set=data.{k}={v}" for k, v in data.items()] + [f"--set={o}" for o in TINY] + ["--out", run]) == 0
    out = str(folder / "model")
    assert main(["export", run, "-o", out]) == 0
    return {"run": run, "out": out, "data": data}


def held_out(data, max_len=24):
    shards = ShardSet(data["shards"])
    text = Text(data["tokenizer"], max_len)
    pairs = Pairs(shards, data["captions"], text, "val", max_regions=10)
    captions = read_manifest(data["captions"], "val")["caption"].tolist()  # pair p is row p
    return shards, text, pairs, captions


def test_encode_gives_the_trainers_scores_and_hidden_states(exported):
    model = Model.load(exported["out"])
    assert model.max_regions == 10 and not model.model.training
    shards, text, pairs, captions = held_out(exported["data"])
    P = len(pairs)
    # every caption with its own image, then with the next caption's image (a mismatch, mostly)
    images = [int(pairs.image[p]) for p in range(P)] + [int(pairs.image[(p + 2) % P]) for p in range(P)]
    records = [shards.get(pairs.image_ids[i]) for i in images]
    enc = model.encode(records, captions + captions)
    # the same from the run folder (checkpoint.pt) and from our exported folder: to the bit
    again = Model.load(exported["run"]).encode(records, captions + captions)
    assert all(torch.equal(getattr(enc, k), getattr(again, k)) for k in vars(enc))
    # the scores are the trainer's held-out retrieval scores (train/evaluate.py) for those pairs
    trained, _, _ = model_from_checkpoint(os.path.join(exported["run"], "checkpoint.pt"))
    dataset = PairDataset(shards, pairs, text, max_regions=10)
    matrix = itm_scores(trained, dataset, np.arange(P), np.arange(pairs.num_images))
    want = matrix[torch.arange(2 * P) % P, torch.tensor(images)]
    assert float((enc.itm_score - want).abs().max()) <= TOL
    assert torch.allclose(enc.itm_prob, torch.sigmoid(enc.itm_score), atol=1e-6)
    # the hidden states are the trainer's forward pass on the trainer's own batch (PairDataset + collate)
    batch = collate([dataset[("itm", p, -1, (0, p))] for p in range(P)])
    batch["features"] = batch["features"].float()
    batch["region_mask"] = None
    with torch.no_grad():
        out = trained.encode(batch)
    C = trained.cfg.hidden_size
    tl, rl = batch["text_lens"], batch["region_lens"]
    assert torch.equal(enc.text_lens[:P], tl) and torch.equal(enc.region_lens[:P], rl)
    assert enc.cls.shape == (2 * P, C) and enc.pooled.shape == (2 * P, C)
    assert float((enc.cls[:P] - out.hidden[:, 0]).abs().max()) <= TOL
    assert float((enc.pooled[:P] - out.pooled).abs().max()) <= TOL
    for b in range(P):
        assert float((enc.text_hidden[b, :tl[b]] - out.text[b, :tl[b]]).abs().max()) <= TOL
        if rl[b]:
            assert float((enc.region_hidden[b, :rl[b]] - out.regions[b, :rl[b]]).abs().max()) <= TOL
        assert not enc.text_hidden[b, tl[b]:].any() and not enc.region_hidden[b, rl[b]:].any()  # padding: zero
    assert int(enc.region_lens.max()) <= 10 and torch.equal(enc.input_ids[:P, :tl.max()], batch["input_ids"])


def test_encode_refuses_mismatched_input(exported, tmp_path):
    model = Model.load(exported["out"])
    shards, _, pairs, captions = held_out(exported["data"])
    rec = shards.get(pairs.image_ids[0])
    with pytest.raises(ValueError, match="2 records but 1 captions"):
        model.encode([rec, rec], ["a dog"])
    write_synthetic_shard(str(tmp_path / "wide"), 2, feature_dim=8)
    other = ShardSet(str(tmp_path / "wide"))[0]
    with pytest.raises(ValueError, match=f"record {other.id!r}: features of shape .*16-d features"):
        model.encode([other], ["a dog"])


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_score_command_writes_one_score_per_caption_row(exported, tmp_path, capsys):
    d = exported["data"]
    out = str(tmp_path / "scores.csv")
    assert main(["score", exported["out"], "--shards", d["shards"], "--captions", d["captions"], "-o", out,
                 "--batch-size", "7"]) == 0
    assert "100 captions scored" in capsys.readouterr().out
    manifest = pd.read_csv(d["captions"], dtype=str)
    rows = _rows(out)
    assert len(rows) == len(manifest) and list(rows[0]) == ["image_id", "caption", "split", "score", "match_prob"]
    assert [r["image_id"] for r in rows] == manifest["image_id"].tolist()
    assert [r["caption"] for r in rows] == manifest["caption"].tolist()
    # the scores are encode's (printed to 6 significant digits), whatever the batch size
    model, shards = Model.load(exported["out"]), ShardSet(d["shards"])
    enc = model.encode([shards.get(i) for i in manifest["image_id"]], manifest["caption"].tolist())
    got = np.array([float(r["score"]) for r in rows])
    assert np.allclose(got, enc.itm_score.numpy(), rtol=1e-5, atol=TOL)
    assert np.allclose([float(r["match_prob"]) for r in rows], enc.itm_prob.numpy(), rtol=1e-5, atol=1e-6)
    # from the run folder, one split only: the same numbers for those rows
    val = str(tmp_path / "val.csv")
    assert main(["score", exported["run"], "--shards", d["shards"], "--captions", d["captions"], "--split", "val",
                 "-o", val]) == 0
    is_val = (manifest["split"] == "val").to_numpy()
    val_rows = _rows(val)
    assert [r["caption"] for r in val_rows] == manifest["caption"][is_val].tolist()
    # other batches (another batch size, other rows): equal within rounding, not to the bit
    assert np.allclose([float(r["score"]) for r in val_rows], got[is_val], rtol=1e-5, atol=TOL)


def test_score_command_refuses_bad_input_with_exit_2_naming_it(exported, tmp_path, capsys):
    d = exported["data"]
    out = tmp_path / "scores.csv"
    bad = tmp_path / "captions.csv"
    pd.DataFrame({"image_id": ["nope", read_manifest(d["captions"])["image_id"][0]],
                  "caption": ["a dog", "a cat"]}).to_csv(bad, index=False)
    cases = [
        (["score", exported["out"], "--shards", d["shards"], "--captions", str(bad), "-o", str(out)],
         f"{bad}: 1 caption(s) name images that are in no shard (row 0: 'nope')"),
        (["score", str(tmp_path / "missing"), "--shards", d["shards"], "--captions", d["captions"], "-o", str(out)],
         f"{tmp_path / 'missing'}: no run folder or checkpoint file here"),
        (["score", exported["out"], "--shards", str(tmp_path / "noshard"), "--captions", d["captions"], "-o",
          str(out)], "noshard"),
        (["score", exported["out"], "--shards", d["shards"], "--captions", d["captions"], "-o", str(out),
          "--batch-size", "0"], "--batch-size 0: must be >= 1"),
    ]
    for argv, says in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("regionbert-pretrain score: error: ") and says in err, err
        assert len(err.strip().splitlines()) == 1 and not out.exists() and not (tmp_path / "scores.csv.tmp").exists()
    # regions of another width: the record is named
    write_synthetic_shard(str(tmp_path / "wide"), 3, feature_dim=8)
    ids = list(ShardSet(str(tmp_path / "wide")).keys())
    pd.DataFrame({"image_id": ids, "caption": ["a dog"] * 3}).to_csv(tmp_path / "wide.csv", index=False)
    assert main(["score", exported["out"], "--shards", str(tmp_path / "wide"), "--captions", str(tmp_path / "wide.csv"),
                 "-o", str(out)]) == 2
    assert f"record {ids[0]!r}: features of shape" in capsys.readouterr().err and not out.exists()


def test_the_config_form_of_the_command_is_unchanged(capsys):
    assert main(["--print-config", "--set", "model.num_layers=2"]) == 0
    assert '"num_layers": 2' in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        main(["score", "--help"])
    assert e.value.code == 0 and "one row per caption" in capsys.readouterr().out.replace("\n", " ")
