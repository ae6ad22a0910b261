"""The default recipe learns across modalities: a CPU run of configs/tiny.toml (UNITER's task mix and loss
weights, untouched) on synthetic scenes from an independent generator, judged on held-out images.

The scenes (tests/train_synth.py write_scenes, which shares nothing with regionbert.data.synth) hold 1-3
objects of 16 kinds, each seen by 1-4 overlapping boxes whose sparse features carry the kind; captions
name every object in free order ("look at the owl and a drum here"). Nothing else links words to
regions, so held-out ITM accuracy far above 0.5 means the model checks the caption's objects against
the regions, and it must fall to chance-like scores when the image is shuffled.

The test changes only what a user sets for a tiny model (configs/tiny.toml already holds the size and
learning rate; the test sets the data, the run folder and, to keep CI short, fewer evaluation images).
"""

import json
import os

import numpy as np
import pytest
import torch
from train_synth import write_scenes

from regionbert.train.checkpoint import load_checkpoint
from regionbert.train.config import TaskConfig, load_config
from regionbert.train.data import TaskSampler, collate
from regionbert.train.evaluate import evaluate
from regionbert.train.setup import build_data, build_model, run

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "tiny.toml")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    folder = tmp_path_factory.mktemp("learn")
    paths = write_scenes(str(folder / "data"), n_train=1500, n_val=300, seed=0)
    overrides = [f"data.{k}={v}" for k, v in paths.items()] + [
        f"run.out={folder / 'run'}", "run.checkpoint_every=0", "data.num_workers=0", "run.eval_images=100",
        "run.tensorboard=false"]
    cfg = load_config(CONFIG, overrides)
    assert cfg.tasks.mix == TaskConfig().mix and cfg.tasks.wra_weight == TaskConfig().wra_weight  # the defaults
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model: one thread is as fast, and steady on a busy machine
    try:
        last = run(cfg)
    finally:
        torch.set_num_threads(threads)
    state = load_checkpoint(os.path.join(cfg.run.out, "checkpoint.pt"))  # judge what was saved
    model = build_model(cfg)
    model.load_state_dict(state["model"])
    pairs, dataset, _, _ = build_data(cfg, "val", num_workers=0)
    return {"cfg": cfg, "model": model.eval(), "pairs": pairs, "dataset": dataset, "last": last}


def _batches(dataset, keys, size=128):
    for i in range(0, len(keys), size):
        yield collate([dataset[k] for k in keys[i:i + size]])


def _negatives(pairs, seed=1):
    sampler = TaskSampler.__new__(TaskSampler)  # only its negative drawing, over the held-out images
    TaskSampler.__init__(sampler, None, pairs, {"itm": 1}, seed, neg_window=0)
    return sampler.negatives(pairs.image, np.random.default_rng(seed))


@torch.no_grad()
def _match_probability(model, dataset, keys) -> np.ndarray:
    out = []
    for batch in _batches(dataset, keys):
        out.append(torch.softmax(model.heads["itm"].classify(model.encode(batch).pooled), -1)[:, 1])
    return torch.cat(out).numpy()


def test_run_reports_progress_per_task(trained):
    last = trained["last"]
    assert {"itm", "wra", "mlm", "mrfr", "mrc_kl"} <= set(last), last
    assert last["samples_per_s"] > 0 and 0 <= last["pad_fraction"] < 0.15


def test_itm_accuracy_on_held_out_pairs_far_above_chance(trained):
    pairs, dataset = trained["pairs"], trained["dataset"]
    neg = _negatives(pairs)
    keys = [("itm", p, -1, p) for p in range(len(pairs))] + [("itm", p, int(neg[p]), p) for p in range(len(pairs))]
    acc = evaluate(trained["model"], _batches(dataset, keys))["itm_acc"]
    print(f"ITM accuracy on {len(keys)} held-out pairs (half mismatched): {acc:.3f}")
    assert acc >= 0.8, f"ITM accuracy {acc:.3f} on {len(keys)} held-out pairs, chance 0.5"


def test_shuffling_the_image_takes_the_match_away(trained):
    pairs, dataset, model = trained["pairs"], trained["dataset"], trained["model"]
    shuffled = _negatives(pairs, seed=2)
    own = _match_probability(model, dataset, [("itm", p, -1, p) for p in range(len(pairs))])
    other = _match_probability(model, dataset, [("itm", p, int(shuffled[p]), p) for p in range(len(pairs))])
    print(f"P(match): {own.mean():.3f} with the caption's own image, {other.mean():.3f} with a shuffled one")
    assert own.mean() - other.mean() >= 0.4 and (own > other).mean() >= 0.85, (own.mean(), other.mean())


def test_zero_shot_retrieval_on_held_out_images_beats_chance(trained):
    # the run's own evaluation after its last step: 100 held-out images x their 200 captions, by the ITM head
    log = [json.loads(line) for line in open(os.path.join(trained["cfg"].run.out, "log.jsonl"))]
    m = [r for r in log if "eval" in r][-1]["eval"]
    print({k: round(v, 3) for k, v in m.items()})
    assert m["retrieval_images"] == 100 and m["retrieval_captions"] == 200
    # chance: R@1 = 0.01, R@10 = 0.1 (captions name 1-3 of 16 kinds: some images fit a caption alike)
    assert m["t2i_r10"] >= 0.5 and m["i2t_r10"] >= 0.5, m
