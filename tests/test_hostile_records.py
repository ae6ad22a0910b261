"""The trainer refuses records that break the record rules, even where nobody ran `verify` (issue 22, item 6).

A hand-made record with a valid checksum and boxes outside the image, location vectors of another image,
or class "distributions" that are negative or do not sum to 1 used to train silently. PairDataset now
checks each batch's used regions (regionbert.data.checks.check_batch, vectorised over the batch) and
raises a ShardError naming the shard, the record and the rules; through DataLoader workers the trainer
still prints that one line and exits 2.
"""

import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from test_deep_verify import HOSTILE, forge, set_boxes
from train_synth import write_dataset

from regionbert.data import ShardError, ShardSet
from regionbert.train.data import PairDataset, Pairs
from regionbert.train.text import Text

# What the trainer uses: boxes (through the location vector), loc7 (loc5 with model.loc_dim 5), class
# distributions, features. The attribute rule is not here: the trainer reads no attributes.
TRAINER_RULES = {rule: (HOSTILE[rule], 7) for rule in HOSTILE if not rule.startswith(("attr_", "loc5"))}
TRAINER_RULES["loc5-matches-boxes"] = (HOSTILE["loc5-matches-boxes"], 5)
TRAINER_RULES["box-inside (whole box left of the image)"] = (
    lambda r: set_boxes(r, np.array([[-30, 5, -10, 20]] * r.num_boxes, np.float32)), 7)
TRAINER_RULES["class_probs-finite"] = (lambda r: r.class_probs.__setitem__((0, 1), np.inf), 7)
TRAINER_RULES["loc7-matches-boxes (xywh boxes)"] = (  # location vectors of xywh boxes read as xyxy
    lambda r: r.loc7.__setitem__((slice(None), slice(2, 4)), r.loc7[:, 4:6]), 7)

RECORDS = 8


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_dataset(str(tmp_path_factory.mktemp("records") / "data"), RECORDS, 0, feature_dim=16,
                         min_boxes=3, max_boxes=12)


def _copy(dataset, tmp_path) -> dict:
    shard = str(tmp_path / "shard-00000")
    shutil.copytree(dataset["shards"], shard)
    return {**dataset, "shards": shard}


def _read_all(data: dict, loc_dim: int = 7):
    """Every pair of the manifest read as the trainer reads a batch (PairDataset.__getitems__)."""
    text = Text(data["tokenizer"], max_len=24)
    shards = ShardSet(data["shards"])
    pairs = Pairs(shards, data["captions"], text, "train")
    ds = PairDataset(shards, pairs, text, loc_dim=loc_dim)
    ds.__getitems__([("mlm", p, -1, (0, 0, 0, p)) for p in range(len(pairs))])
    return ds, pairs


def test_a_verified_shard_reads_clean(dataset):
    ds, pairs = _read_all(dataset)
    for image in range(pairs.num_images):  # the retrieval evaluation's reads too
        ds.regions(image)


@pytest.mark.parametrize("rule", sorted(TRAINER_RULES))
def test_the_trainer_refuses_a_record_that_breaks_a_rule(dataset, tmp_path, rule):
    mutate, loc_dim = TRAINER_RULES[rule]
    data = _copy(dataset, tmp_path)
    forge(data["shards"], 5, mutate)
    with pytest.raises(ShardError) as e:
        _read_all(data, loc_dim)
    name = rule.split(" ")[0]
    assert str(e.value).startswith(f"{data['shards']}: record 'synth/00000005' breaks the shard format's record rules:")
    assert f"rule {name}:" in str(e.value)
    # and the evaluation's path, one image at a time
    text = Text(data["tokenizer"], max_len=24)
    shards = ShardSet(data["shards"])
    pairs = Pairs(shards, data["captions"], text, "train")
    ds = PairDataset(shards, pairs, text, loc_dim=loc_dim)
    image = pairs.image_ids.index("synth/00000005")
    with pytest.raises(ShardError, match=f"record 'synth/00000005' breaks .* rule {name}:"):
        ds.regions(image)


@pytest.mark.parametrize("workers", [0, 2])
def test_the_trainer_stops_naming_shard_record_and_rule(dataset, tmp_path, workers):
    """End to end, every record forged (so the first batch meets one): exit 2 and one line naming the shard,
    the record and the rule, with and without DataLoader workers (whose errors torch wraps in a traceback)."""
    data = _copy(dataset, tmp_path)
    for i in range(RECORDS):
        forge(data["shards"], i, HOSTILE["box-inside"])
    settings = {"data.shards": data["shards"], "data.captions": data["captions"], "data.tokenizer": data["tokenizer"],
                "model.hidden_size": 32, "model.num_layers": 1, "model.num_heads": 2, "model.intermediate_size": 64,
                "model.max_text_len": 24, "data.token_budget": 600, "data.num_workers": workers,
                "optim.warmup_steps": 1, "optim.steps": 2, "run.log_every": 1, "run.eval_every": 0}
    r = subprocess.run([sys.executable, "-m", "regionbert.train.cli", *[f"--set={k}={v}" for k, v in settings.items()],
                        "--out", str(tmp_path / "run")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    line = [x for x in r.stderr.splitlines() if x.startswith("regionbert-pretrain: error:")]
    assert line and f"{data['shards']}: record 'synth/0000000" in line[0] and "rule box-inside:" in line[0], r.stderr
    assert not os.path.exists(os.path.join(str(tmp_path / "run"), "checkpoint.pt"))  # it trained on nothing
