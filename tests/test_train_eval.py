"""Held-out evaluation and metrics: retrieval recall on hand-made scores, batched ITM scoring equal to
scoring each pair alone, the JSONL / TensorBoard / PNG outputs."""

import importlib.util
import json

import numpy as np
import pytest
import torch
from train_synth import write_dataset

from regionbert.data import ShardSet
from regionbert.train.data import PairDataset, Pairs, collate, to_device
from regionbert.train.evaluate import evaluate_held_out, itm_scores, retrieval_recall
from regionbert.train.metrics import Logger, format_duration, read_log, trim_log
from regionbert.train.model import ModelConfig
from regionbert.train.plot import plot_run
from regionbert.train.pretrainer import Pretrainer
from regionbert.train.text import Text


def test_retrieval_recall_on_a_hand_made_score_matrix():
    # 4 images; captions 0,1 -> image 0, 2 -> image 1, 3 -> image 2, 4,5 -> image 3
    own = [0, 0, 1, 2, 3, 3]
    s = torch.tensor([
        [9., 1., 2., 3.],   # caption 0: own image first                        t2i rank 0
        [1., 2., 9., 3.],   # caption 1: own image last (0 < 2 < 3 < 9)         rank 3
        [5., 4., 3., 2.],   # caption 2: own image 2nd                          rank 1
        [1., 2., 0., 3.],   # caption 3: own image last                         rank 3
        [0., 0., 0., 0.],   # caption 4: all tied: ties count against the model rank 3
        [1., 2., 3., 4.],   # caption 5: own image first                        rank 0
    ])
    r = retrieval_recall(s, own, ks=(1, 2, 5))
    assert r["t2i_r1"] == pytest.approx(2 / 6) and r["t2i_r2"] == pytest.approx(3 / 6) and r["t2i_r5"] == 1.0
    # image -> text, per column: image 0 best own caption 0 (9 is top): rank 0; image 1: column
    # [1,2,4,2,0,2], own caption 2 (4) is top: rank 0; image 2: [2,9,3,0,0,3], own caption 3 (0) is
    # below 5 others, tied with caption 4 -> rank 5; image 3: [3,3,2,3,0,4], caption 5 (4) top: rank 0
    assert r["i2t_r1"] == pytest.approx(3 / 4) and r["i2t_r2"] == pytest.approx(3 / 4) and r["i2t_r5"] == 3 / 4
    perfect = retrieval_recall(torch.eye(4)[[0, 0, 1, 2, 3, 3]], own, ks=(1,))
    assert perfect == {"i2t_r1": 1.0, "t2i_r1": 1.0}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    d = write_dataset(str(tmp_path_factory.mktemp("ev") / "d"), n_train=12, n_val=0, feature_dim=16, min_boxes=0,
                      max_boxes=12, captions_per_image=2, seed=2)  # seed 2: one image has no boxes
    text = Text(d["tokenizer"], 24)
    shards = ShardSet(d["shards"])
    pairs = Pairs(shards, d["captions"], text, "train")
    dataset = PairDataset(shards, pairs, text, max_regions=100)
    torch.manual_seed(0)
    model = Pretrainer(ModelConfig(vocab_size=text.vocab_size, hidden_size=32, num_layers=2, num_heads=2,
                                   intermediate_size=64, max_text_len=24, feature_dim=16, num_classes=91)).eval()
    return pairs, dataset, model


def test_batched_itm_scores_equal_scoring_each_pair_alone(small):
    pairs, dataset, model = small
    captions, images = np.arange(len(pairs)), np.arange(pairs.num_images)
    assert pairs.num_boxes.min() == 0  # an image without boxes is scored too
    with torch.no_grad():
        alone = torch.zeros(len(captions), len(images))
        for c in captions:
            batch = to_device(collate([dataset[("itm", int(c), int(i), 0)] for i in images]), "cpu")  # float16 -> 32
            logits = model.heads["itm"].classify(model.encode(batch).pooled)
            alone[c] = logits[:, 1] - logits[:, 0]
    for batch_pairs in (1, 7, 10_000):
        got = itm_scores(model, dataset, captions, images, batch_pairs=batch_pairs)
        torch.testing.assert_close(got, alone, atol=1e-5, rtol=1e-5)
    sub = itm_scores(model, dataset, captions[[5, 2]], images[[3, 0, 7]], batch_pairs=4)
    torch.testing.assert_close(sub, alone[[5, 2]][:, [3, 0, 7]], atol=1e-5, rtol=1e-5)


def test_the_eval_record_in_the_log_says_how_long_it_took(small, tmp_path):
    """The quickstart counts these seconds as its "evaluate" stage (the evaluation runs inside pretraining)."""
    pairs, dataset, model = small
    m = evaluate_held_out(model, dataset, ["mlm", "itm"], eval_pairs=8, eval_images=4, batch_pairs=8)
    assert {"mlm_acc", "itm_acc", "t2i_r1", "i2t_r1"} <= set(m) and 0 < m["eval_seconds"] < 60, m
    lines = []
    log = Logger(str(tmp_path), print_fn=lambda *a, **k: lines.append(a[0]), tensorboard=False)
    log.eval(7, m)
    assert read_log(str(tmp_path / "log.jsonl")) == [{"step": 7, "eval": m}]
    assert lines[0].endswith(f"({m['eval_seconds']:.1f}s)")


def _fake_log(path, steps=40):
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for s in range(2, steps + 1, 2):
            r = {"step": s, "steps": steps, "lr": 1e-4, "samples_per_s": 100.0, "data_wait": 0.01,
                 "pad_fraction": 0.02, "eta_s": 1.0, "mlm": 5 / s + rng.random() * 0.1, "itm": 0.7 - s / 100}
            f.write(json.dumps(r) + "\n")
            if s % 10 == 0:
                f.write(json.dumps({"step": s, "eval": {"mlm_acc": s / 50, "itm_acc": 0.5 + s / 100, "t2i_r1": 0.1,
                                                        "t2i_r5": 0.3, "t2i_r10": 0.5, "i2t_r1": 0.2,
                                                        "retrieval_images": 100}}) + "\n")


def test_plot_writes_a_png_of_losses_accuracy_and_retrieval(tmp_path):
    pytest.importorskip("matplotlib")
    _fake_log(tmp_path / "log.jsonl")
    path = plot_run(str(tmp_path))
    data = open(path, "rb").read()
    assert path.endswith("curves.png") and data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    from PIL import Image

    with Image.open(path) as im:
        assert im.size[0] > 2.5 * im.size[1]  # three panels side by side


def test_log_trimming_and_durations(tmp_path):
    _fake_log(tmp_path / "log.jsonl")
    trim_log(str(tmp_path / "log.jsonl"), 20)
    log = read_log(str(tmp_path / "log.jsonl"))
    assert max(r["step"] for r in log) == 20 and sum("eval" in r for r in log) == 2
    assert format_duration(59) == "0m59s" and format_duration(3725) == "1h02m" and format_duration(float("nan")) == "?"


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_events_when_installed(tmp_path):
    lines = []
    log = Logger(str(tmp_path), print_fn=lambda *a, **k: lines.append(a[0]))
    log.train({"step": 1, "steps": 2, "lr": 1e-4, "samples_per_s": 10.0, "data_wait": 0.0, "pad_fraction": 0.0,
               "mlm": 3.0})
    log.eval(1, {"mlm_acc": 0.25, "t2i_r1": 0.5})
    log.close()
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 100
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert {"train/mlm", "eval/mlm_acc", "eval/t2i_r1", "progress/lr"} <= set(acc.Tags()["scalars"])
    assert "mlm 3.0000" in lines[0] and "mlm_acc 0.250" in lines[1]
    assert [json.loads(x)["step"] for x in open(tmp_path / "log.jsonl")] == [1, 1]
