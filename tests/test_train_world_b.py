"""The default recipe learns on data it was not tuned for (issue 27 item 3): configs/tiny.toml as shipped,
trained on CPU on a second, independent synthetic world (tests/world_b.py write_rooms: 20 nouns x 8
colours, 96-d dense Gaussian features, 2-6 objects and 1-6 clutter boxes a room, a detector wrong 25% of
the time at a per-box temperature, captions naming 2-3 of a room's 2-4 kinds of object with counts,
colours, sizes and spatial relations), judged on 300 held-out rooms.

The fast tests at the top check the generator alone (no training).

The training tests are expected failures: issue 27 item 3 is open. With UNITER's optimizer (Adam's moments
shared by every task) held-out ITM stayed at 0.50-0.51 through 1,500 steps on this world, while ITM
trained alone leaves chance at step 300 and reaches 0.90 by 900. With the default from scratch now
(`optim.task_state` = per task, docs/itm-plateau.md) and configs/tiny.toml as shipped (lr 2e-3, no dropout,
UNITER's in-domain mix: docs/itm-plateau.md, "A tiny model's settings") it leaves chance by step 600 / 800 /
700 and ends at 0.83 / 0.77 / 0.88 by 1,500 (seeds 0 / 1 / 2, `python bench/world_b.py 1500 SEED`): the
first half of the issue's target met on three seeds (seed 1 at the limit), the >= 0.9 not. To keep CI short
the run here is 800 steps of the same config (optim.steps=800: the warm-up is the same, the decay faster);
the day the recipe learns this world with a margin they XPASS, and get their floors.
"""

import json
import os

import numpy as np
import pandas as pd
import pytest
import torch
import world_b
from helpers import batches, negatives
from train_synth import SCENE_KINDS, TEMPLATES
from world_b import COLOURS, MAX_WORDS, NOUNS, PLURAL, write_rooms

from regionbert.data import ShardSet, verify_shard
from regionbert.train.checkpoint import load_checkpoint
from regionbert.train.config import load_config
from regionbert.train.evaluate import evaluate
from regionbert.train.masking import IGNORE
from regionbert.train.run import build_data, build_model, run
from regionbert.train.text import Text

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.toml")
# Held-out thresholds, TBD from the robustness runs (seeds, data seeds); for now the targets. Chance:
# ITM 0.5, R@1 0.01 (100 images), a masked noun 1/20.
LEFT_CHANCE_ITM, LEFT_CHANCE_BY = 0.6, 800  # ITM has left chance at an evaluation at or before this step
ITM_ACC = 0.9                               # by 1,500 steps (bench/world_b.py; not run here, see above)
NOUN_ACC, NOUN_GAP = 0.4, 0.25              # a masked noun: with the true image; true minus a shuffled image's
EVAL_EVERY = 100


# ---- the generator alone --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def small_world(tmp_path_factory):
    return write_rooms(str(tmp_path_factory.mktemp("world_b") / "data"), 60, 20, seed=3)


def test_generator_writes_a_valid_shard(small_world):
    report = verify_shard(small_world["shards"])
    assert report.count == report.checked == 80 and not report.bad and not report.problems, report
    shards = ShardSet(small_world["shards"])
    assert shards.meta["class_names"] == ["background"] + NOUNS and shards.meta["feature_dim"] == 96
    counts = []
    for i in range(len(shards)):
        r = shards[i]
        counts.append(r.num_boxes)
        p = np.asarray(r.class_probs, np.float32)
        assert p.shape == (r.num_boxes, len(NOUNS) + 1) and np.allclose(p.sum(1), 1, atol=1e-2)
        b = np.asarray(r.boxes)
        assert (b[:, :2] >= 0).all() and (b[:, 2] <= r.width).all() and (b[:, 3] <= r.height).all()
        assert (b[:, 2] > b[:, 0]).all() and (b[:, 3] > b[:, 1]).all()
    assert 3 <= min(counts) and max(counts) <= 18


def test_captions_fit_the_vocabulary_and_the_model(small_world):
    df = pd.read_csv(small_world["captions"])
    assert sorted(df["split"].unique()) == ["train", "val"] and len(df) == 2 * 80
    assert (df["split"] == "val").sum() == 2 * 20 and df.groupby("image_id").size().eq(2).all()
    vocab = open(small_world["tokenizer"]).read().split("\n")[:-1]
    assert vocab[:5] == ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] and len(set(vocab)) == len(vocab)
    words = {w for c in df["caption"] for w in c.split()}
    assert words <= set(vocab), words - set(vocab)
    cfg = load_config(CONFIG, [])
    text = Text(small_world["tokenizer"], cfg.model.max_text_len)
    tokens = text.encode(df["caption"].tolist())
    assert max(len(t) for t in tokens) <= cfg.model.max_text_len and MAX_WORDS + 2 <= cfg.model.max_text_len
    assert all(text.unk_id not in t for t in tokens)
    assert all(len(t) == len(c.split()) + 2 for t, c in zip(tokens, df["caption"], strict=True))  # whole words


def test_captions_name_a_subset_of_the_room():
    rng = np.random.default_rng(0)
    protos = np.random.default_rng(1)
    nouns, colours = protos.normal(0, 1, (len(NOUNS), 96)), protos.normal(0, 0.7, (len(COLOURS), 96))
    noun_of = {w: n for n in NOUNS for w in (n, PLURAL[n])}
    for _ in range(200):
        room = world_b._room(rng, nouns, colours, 96)
        groups = room["groups"]
        n_objects = sum(len(g["boxes"]) for g in groups)
        assert 2 <= n_objects <= 6 and 2 <= len(groups) <= 4 and all(1 <= len(g["boxes"]) <= 3 for g in groups)
        regions = len(room["boxes"])
        assert n_objects + 1 <= regions <= 2 * n_objects + 6
        caption = world_b._caption(groups, rng)
        named = [noun_of[w] for w in caption.split() if w in noun_of]
        held = {NOUNS[g["noun"]] for g in groups}
        assert 2 <= len(named) <= 3 and len(set(named)) == len(named) and set(named) <= held, (caption, held)
        assert len(named) < len(groups) or len(groups) == 2, (caption, held)


def test_the_world_shares_no_kinds_or_templates_with_the_learning_tests():
    assert not set(NOUNS) & set(SCENE_KINDS)
    assert not any(t.replace("{}", "").strip() in c for t in TEMPLATES
                   for c in ["there are two red lamps near a rug", "we can see a red jar with a rug"])


# ---- the default recipe, trained (expected failures: issue 27 item 3) ------------------------------------

# not strict: an XPASS is reported (-ra) without failing CI on a machine where one run gets lucky
OPEN = pytest.mark.xfail(strict=False, reason="issue 27 item 3: world_b ends under 0.9; "
                          "chance left by step 800 with no margin (seed 1)")
STEPS = 800


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("world_b_run")
    paths = write_rooms(str(folder / "data"), 1500, 300, seed=0)
    overrides = [f"data.{k}={v}" for k, v in paths.items()] + [
        f"run.out={folder / 'run'}", "run.checkpoint_every=0", "data.num_workers=0", "run.plot=false",
        f"run.eval_every={EVAL_EVERY}", "run.eval_pairs=400", f"optim.steps={STEPS}"]
    cfg = load_config(CONFIG, overrides)
    assert cfg.run.seed == 0
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run(cfg)
    finally:
        torch.set_num_threads(threads)
    state = load_checkpoint(os.path.join(cfg.run.out, "checkpoint.pt"))
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    pairs, dataset, _, _ = build_data(cfg, "val", num_workers=0)
    log = [json.loads(line) for line in open(os.path.join(cfg.run.out, "log.jsonl"))]
    curve = {r["step"]: r["eval"] for r in log if "eval" in r}
    print({s: round(e["itm_acc"], 3) for s, e in curve.items()})
    return {"cfg": cfg, "model": model.eval(), "pairs": pairs, "dataset": dataset, "curve": curve}


def masked_word_accuracy(model, pairs, dataset, word_ids, seed=0) -> tuple[float, float]:
    """Mask one of each held-out caption's words among word_ids (the same position for both): the masked
    word's accuracy with the caption's own image, and with a shuffled one."""
    rng = np.random.default_rng(seed)
    where = {}

    def mask_one(s):
        ids = s["input_ids"]
        if s["pair"] not in where:
            where[s["pair"]] = int(rng.choice(np.flatnonzero(np.isin(ids, word_ids))))
        pos = where[s["pair"]]
        s["mlm_labels"] = np.full_like(ids, IGNORE)
        s["mlm_labels"][pos] = ids[pos]
        s["input_ids"] = ids.copy()
        s["input_ids"][pos] = dataset.masker.mask_id
        return s

    shuffled = negatives(pairs, seed=seed + 2)
    true_keys = [("itm", p, -1, p) for p in range(len(pairs))]  # itm: nothing masked by the dataset
    shuffled_keys = [("itm", p, int(shuffled[p]), p) for p in range(len(pairs))]
    acc_true = evaluate(model, batches(dataset, true_keys, edit=mask_one))["mlm_acc"]
    acc_shuffled = evaluate(model, batches(dataset, shuffled_keys, edit=mask_one))["mlm_acc"]
    return acc_true, acc_shuffled


@OPEN
def test_itm_leaves_chance_early(trained):
    curve = trained["curve"]
    early = {s: e["itm_acc"] for s, e in curve.items() if s <= LEFT_CHANCE_BY}
    assert len(early) == LEFT_CHANCE_BY // EVAL_EVERY, sorted(curve)
    assert max(early.values()) >= LEFT_CHANCE_ITM, f"held-out ITM by step {LEFT_CHANCE_BY}: {early}"


@OPEN
def test_masked_nouns_need_the_image(trained):
    vocab = {w: i for i, w in enumerate(open(trained["cfg"].data.tokenizer).read().split())}
    ids = np.array([vocab[w] for n in NOUNS for w in (n, PLURAL[n])])
    acc_true, acc_shuffled = masked_word_accuracy(trained["model"], trained["pairs"], trained["dataset"], ids)
    print(f"masked nouns: accuracy {acc_true:.3f} with the true image, {acc_shuffled:.3f} with a shuffled one")
    assert acc_true >= NOUN_ACC and acc_true - acc_shuffled >= NOUN_GAP, (acc_true, acc_shuffled)
