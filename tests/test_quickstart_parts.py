"""The quickstart's parts a newcomer reads, without running it: captions with "an", labels that stay inside
the picture and off each other, boxes named right, honest stage times, and a summary that says plainly when
the run fell short of what the quickstart exists to show."""

import json
from types import SimpleNamespace

import numpy as np
from PIL import Image

from regionbert.data import ShardReader, ShardWriter
from regionbert.data.show import draw_record, place_labels
from regionbert.quickstart import main as qs
from regionbert.quickstart.sample_data import article, caption, class_names, write_sample_data


def test_captions_say_an_before_a_vowel(tmp_path):
    assert article("orange circle") == "an" and article("red square") == "a" and article("") == "a"
    rng = np.random.default_rng(0)
    for _ in range(20):
        c = caption(["orange circle", "red square", "yellow triangle"], rng)
        assert "an orange circle" in c and "a red square" in c and "a yellow triangle" in c, c
        assert "a orange" not in c
    data = write_sample_data(str(tmp_path / "d"), 8)
    with open(data["captions"]) as f:
        text = f.read()
    assert "a orange" not in text and " and " in text
    vocab = open(data["vocab"]).read().split()
    # every word a caption can hold, whichever objects were drawn
    assert {"a", "an", "and", ",", "orange", "purple", "circle", "triangle"} <= set(vocab)
    assert len(vocab) == len(set(vocab))


def _inside(r, w, h):
    return 0 <= r[0] and 0 <= r[1] and r[2] <= w and r[3] <= h


def _apart(rects):
    return all(min(a[2], b[2]) <= max(a[0], b[0]) or min(a[3], b[3]) <= max(a[1], b[1])
               for i, a in enumerate(rects) for b in rects[i + 1:])


def test_labels_stay_inside_the_image_and_off_each_other():
    W, H, size = 640, 480, (190, 22)
    # five boxes on one shape at the right edge, their tops at the image's top (the labels of the quickstart's
    # picture ran off the right edge and over each other there)
    crowded = [(450, 0, 640, 480), (460, 5, 640, 300), (470, 10, 600, 260), (455, 30, 640, 250), (500, 0, 640, 40)]
    spots = place_labels(crowded, [size] * 5, W, H)
    assert all(_inside(r, W, H) for r in spots) and _apart(spots), spots
    assert [r[2] - r[0] for r in spots] == [190] * 5
    # the first label sits where one looks for it: just above its box, or inside it when above is out of bounds
    assert place_labels([(100, 100, 200, 200)], [size], W, H) == [(100, 78, 290, 100)]
    assert place_labels([(100, 0, 200, 200)], [size], W, H) == [(100, 200, 290, 222)]  # below it
    assert place_labels([(0, 460, 640, 480)], [size], W, H)[0][1] == 438  # bottom edge: above it
    # something already drawn (a banner) is kept clear
    assert place_labels([(10, 5, 100, 50)], [size], W, H, taken=[(0, 0, 640, 30)])[0][1] >= 30
    rng = np.random.default_rng(0)
    for _ in range(50):  # random boxes, often crossing the edges, 1-10 of them: room for all their labels
        n = int(rng.integers(1, 11))
        xy = rng.uniform(-50, 650, (n, 2))
        boxes = [(x, y, x + rng.uniform(5, 300), y + rng.uniform(5, 300)) for x, y in xy]
        sizes = [(float(rng.uniform(40, 260)), float(rng.uniform(12, 30))) for _ in range(n)]
        spots = place_labels(boxes, sizes, W, H)
        assert all(_inside(r, W, H) for r in spots) and _apart(spots), (boxes, spots)
        assert [(round(r[2] - r[0], 6), round(r[3] - r[1], 6)) for r in spots] == \
            [(round(w, 6), round(h, 6)) for w, h in sizes]
    # no room for all: still every label inside the image
    spots = place_labels([(0, 0, 50, 50)] * 40, [(300, 100)] * 40, 400, 300)
    assert all(_inside(r, 400, 300) for r in spots)


def test_draw_record_with_boxes_at_the_edges(tmp_path):
    names = ["__background__", "red circle", "orange triangle"]
    Image.new("RGB", (224, 168), (200, 200, 200)).save(tmp_path / "img.png")
    boxes = [[0, 0, 224, 168], [150, 0, 224, 40], [160, 2, 224, 60], [0, 130, 60, 168]]
    probs = np.full((4, 3), 0.1)
    probs[np.arange(4), 1 + np.arange(4) % 2] = 0.8
    with ShardWriter(tmp_path / "s", feature_dim=4, class_names=names) as w:
        w.add("img", width=224, height=168, boxes=boxes, features=np.zeros((4, 4)), class_probs=probs)
        w.add("none", width=224, height=168, boxes=np.zeros((0, 4)), features=np.zeros((0, 4)),
              class_probs=np.zeros((0, 3)))
    r = ShardReader(tmp_path / "s")
    im = draw_record(r.get("img"), str(tmp_path / "img.png"), names, meta={"extractor": {"weights": "none"}})
    assert im.size == (640, 480) and np.asarray(im).std() > 10
    assert draw_record(r.get("none"), str(tmp_path / "img.png"), names).size == (640, 480)


def test_boxes_named_right_match_true_shapes_by_iou_and_name():
    names = ["__background__", *class_names()]
    probs = np.zeros((3, len(names)), np.float16)
    probs[0, names.index("red circle")] = probs[1, names.index("blue square")] = probs[2, names.index("red circle")] = 1
    rec = SimpleNamespace(id="x", extra=None, class_probs=probs, num_boxes=3,
                          boxes=np.array([[10, 10, 50, 50], [12, 10, 50, 52], [100, 100, 140, 140]], np.float32))
    truth = {"x": SimpleNamespace(boxes=np.array([[10, 10, 50, 50], [102, 100, 142, 140]], np.float32),
                                  labels=np.array([names.index("red circle"), names.index("red square")]))}
    # box 0: on the red circle, named so; box 1: on it, named blue square; box 2: on the red square, named red circle
    assert qs.boxes_named_right([rec], truth) == {"x": (1, 3)}
    assert qs.boxes_named_right([rec], {}) == {}


GOOD = {"itm_acc": 0.924, "t2i_r1": 0.15, "i2t_r1": 0.15, "mrc_kl_acc": 0.36, "mlm_acc": 0.82,
        "retrieval_images": 100}
FAILED = {"itm_acc": 0.54625, "t2i_r1": 0.02, "i2t_r1": 0.03, "mrc_kl_acc": 0.345, "mlm_acc": 0.80,
          "retrieval_images": 100}
DET = {"recall50": 0.97, "map50": 0.51}


def test_the_summary_says_plainly_when_the_model_did_not_learn_to_match():
    assert qs.shortfalls(GOOD, 100) == []
    good = qs.describe(GOOD, DET, 100, 18, {"found": 0.79, "named": 0.59})
    assert good[0].startswith("Among all its detections") and not any("SHORT" in line for line in good)
    assert "92% of the time (guessing: 50%)" in good[2]

    missed = qs.shortfalls(FAILED, 100)
    assert len(missed) == 3 and "54.6%" in missed[0] and "85%" in missed[0]
    assert "2.0%" in missed[1] and "2.0x guessing" in missed[1] and "5.0%" in missed[1] and "3.0%" in missed[2]
    words = qs.describe(FAILED, DET, 100, 18, {"found": 0.79, "named": 0.59})
    first = words[0]
    assert first.startswith("THIS RUN FELL SHORT") and "did not learn to match captions to images" in first
    assert "54.6%" in first and "bench/README.md" in first and "issue tracker" in first
    assert len(words) == len(good) + 1 and "55% of the time (guessing: 50%)" in words[3]  # the figures still follow
    # each goal alone
    assert len(qs.shortfalls(GOOD | {"itm_acc": 0.849}, 100)) == 1
    assert qs.shortfalls(GOOD | {"itm_acc": 0.85}, 100) == []
    assert len(qs.shortfalls(GOOD | {"i2t_r1": 0.04}, 100)) == 1
    assert qs.shortfalls(GOOD | {"i2t_r1": 0.05}, 100) == []
    assert qs.shortfalls(GOOD | {"t2i_r1": 0.01}, 1000) == []  # 10x guessing among 1,000 images
    assert len(qs.shortfalls({}, 100)) == 3  # no figures: nothing shown


def test_stage_times_count_the_evaluation_inside_pretraining_as_evaluate(tmp_path):
    (tmp_path / "log.jsonl").write_text("\n".join(json.dumps(r) for r in [
        {"step": 25, "lr": 1e-3, "itm": 0.69, "wra": -0.004},
        {"step": 50, "eval": FAILED | {"retrieval_captions": 200, "eval_seconds": 2.5}}]) + "\n")
    assert qs.last_eval(str(tmp_path))["eval_seconds"] == 2.5
    assert qs.final_eval(str(tmp_path)) == FAILED  # the figures only
    s = qs.Stages()
    s.seconds = {"pretrain": 50.0, "evaluate": 0.1}
    s.move(2.5, "pretrain", "evaluate")
    assert s.seconds == {"pretrain": 47.5, "evaluate": 2.6}
    s.move(100, "pretrain", "evaluate")  # never below 0
    assert s.seconds == {"pretrain": 0.0, "evaluate": 50.1}
    assert "wra" in qs.LOSS_LEGEND and "below 0" in qs.LOSS_LEGEND and "\n" not in qs.LOSS_LEGEND
