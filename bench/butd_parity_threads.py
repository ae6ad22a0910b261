"""butd_r101_vg against py-bottom-up-attention's goldens at a given torch thread count: the max |diff| of
every stage that tests/test_butd_parity.py compares, the same comparisons (ROI head on the golden
proposals, proposals matched as sets), and whether each selection is identical (set and order).

    OMP_NUM_THREADS=1 python bench/butd_parity_threads.py --threads 1
    OMP_NUM_THREADS=2 python bench/butd_parity_threads.py --threads 2

The goldens were made with one thread (../shared/butd-kit/SPEC.md, "How the goldens were made"), so one
thread with the same torch build can be bit-exact while two threads accumulate the convolutions in
another order. Also printed: the smallest margin of each exact (ordinal) decision the test asserts
(argmax gaps, max_conf gaps between consecutive ranks, distance to the 0.2 threshold), to set against
the diffs. Cost: one 262 MB checkpoint (made in --workdir), two backbones, 355 regions through res5.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from regionbert.extract import butd

ROOT = Path(__file__).resolve().parents[1]
KIT = Path(os.environ.get("REGIONBERT_BUTD_KIT", ROOT.parent / "shared" / "butd-kit"))
IMAGES = ("000456", "COCO_train2014_000000132417")


def sha(a: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def at(t: torch.Tensor, pos: np.ndarray) -> np.ndarray:
    return t[tuple(torch.from_numpy(pos).T)].numpy()


class Diffs:
    """max |diff| per stage over both images; exact decisions as booleans; margins as minima."""

    def __init__(self):
        self.diff, self.same, self.margin = {}, {}, {}

    def add(self, stage, ours, ref):
        ours, ref = np.asarray(ours, dtype=np.float64), np.asarray(ref, dtype=np.float64)
        assert ours.shape == ref.shape, f"{stage}: shape {ours.shape} != {ref.shape}"
        d = float(np.abs(ours - ref).max()) if ours.size else 0.0
        self.diff[stage] = max(self.diff.get(stage, 0.0), d)

    def check(self, what, ok):
        self.same[what] = self.same.get(what, True) and bool(ok)

    def gap(self, what, value):
        self.margin[what] = min(self.margin.get(what, np.inf), float(value))


def pairs(ids, classes) -> set[tuple[int, int]]:
    return set(zip(np.asarray(ids).tolist(), np.asarray(classes).tolist(), strict=True))


def top2_gap(x: np.ndarray) -> float:
    """Smallest difference between the best and second best value of any row."""
    s = np.sort(np.asarray(x, dtype=np.float64), axis=1)
    return float((s[:, -1] - s[:, -2]).min()) if len(s) else np.inf


def measure(weights: Path) -> Diffs:
    model, _ = butd.load_detector(str(weights))
    golden = {n: dict(np.load(KIT / "golden" / f"{n}.npz", allow_pickle=False)) for n in IMAGES}
    D = Diffs()
    heads = {}
    with torch.inference_mode():
        for n in IMAGES:
            g = golden[n]
            rgb = np.asarray(Image.open(KIT / "images" / f"{n}.jpg").convert("RGB"))
            bgr = rgb[:, :, ::-1]
            resized = butd.resize_bgr(bgr)
            D.check("preprocessing sha256", sha(bgr) == str(g["decoded_bgr_sha256"])
                    and sha(resized) == str(g["resized_bgr_sha256"]))
            x = model.transform.prepare(rgb)[None]
            t = {"stem": model.stem(x)}
            t["res2"] = model.res2(t["stem"])
            t["res3"] = model.res3(t["res2"])
            t["res4"] = model.res4(t["res3"])
            res4 = t["res4"]
            for stage in ("stem", "res2", "res3", "res4"):
                s = t[stage][0]
                D.add(f"{stage} samples", at(s, g[f"{stage}_sample_pos"]), g[f"{stage}_sample_val"])
                D.add(f"{stage} chan_mean", s.double().mean(dim=(1, 2)).numpy(), g[f"{stage}_chan_mean"])
                D.add(f"{stage} mean/std", [s.double().mean().item(), s.double().std(unbiased=False).item()],
                      [g[f"{stage}_mean"], g[f"{stage}_std"]])
            logits_map, deltas_map = model.rpn_maps(res4)
            D.add("rpn logits map", logits_map[0].numpy(), g["rpn_logits_map"])
            D.add("rpn deltas samples", at(deltas_map[0], g["rpn_deltas_map_sample_pos"]),
                  g["rpn_deltas_map_sample_val"])
            props, logits = (a.numpy() for a in model.proposals(res4, resized.shape[:2]))
            d = np.abs(props[None, :, :] - g["proposals"][:, None, :]).max(-1)  # (golden, ours)
            match = d.argmin(1)
            D.check("proposals: set (each golden one within 0.1 px, one to one)",
                    (d.min(1) <= 0.1).all() and len(set(match.tolist())) == len(g["proposals"]) == len(props))
            D.check("proposals: order", (match == np.arange(len(match))).all())
            D.add("proposals px (matched)", props[match], g["proposals"])
            D.add("proposal logits (matched)", logits[match], g["proposal_logits"])
            D.gap("proposal logits: consecutive ranks", np.abs(np.diff(np.sort(logits))).min())

            # ROI head on the golden proposals (all 300 for the first image, the first 50 for the other)
            props_g = g["proposals"] if n == IMAGES[0] else g["proposals"][:50]
            o = model.regions(res4, torch.as_tensor(props_g))
            heads[n] = o
            D.add("first50 features", o.features[:50].numpy(), g["first50_features"])
            D.add("first50 class probs", o.class_probs[:50].numpy(), g["first50_class_probs"])
            D.add("first50 attr logits", o.attr_logits[:50].numpy(), g["first50_attr_logits"])
            D.add("first50 bbox deltas", o.deltas[:50].numpy(), g["first50_bbox_deltas"])
            D.check("first50 attr embedding class (argmax)",
                    (o.cls_logits[:50].argmax(1).numpy() == g["first50_attr_embed_class"]).all())
            D.gap("argmax of cls logits (first 50): top-2 gap", top2_gap(o.cls_logits[:50].numpy()))
            nsub = int(g["subset_nb_num_proposals"])
            sub = butd.RegionOutputs(*(None if a is None else a[:nsub] for a in (
                o.features, o.cls_logits, o.class_probs, o.deltas, o.attr_logits, o.attr_probs)))
            sel = butd.notebook_select(torch.as_tensor(g["proposals"][:nsub]), sub, tuple(g["resized_hw"].tolist()))
            D.check("subset nb: counts and threshold", sel.counts == g["subset_nb_counts"].tolist()
                    and sel.nms_thresh == float(g["subset_nb_nms_thresh_used"]))
            D.check("subset nb: (id, class) set", pairs(sel.ids, sel.classes)
                    == pairs(g["subset_nb_ids"], g["subset_nb_classes"]))
            D.check("subset nb: order", sel.ids.tolist() == g["subset_nb_ids"].tolist()
                    and sel.classes.tolist() == g["subset_nb_classes"].tolist())
            if len(sel.scores) > 1:
                steps = -np.diff(sel.scores.numpy().astype(np.float64))
                D.gap("notebook scores (retry loop): gap between consecutive ranks", steps.min())
            if len(sel.ids) == len(g["subset_nb_ids"]):
                D.add("subset nb scores", sel.scores.numpy(), g["subset_nb_scores"])
                D.add("subset nb boxes (resized px)", sel.boxes_resized.numpy(), g["subset_nb_boxes_resized"])

            # given boxes
            H, W = g["image_hw"].tolist()
            h, w = g["resized_hw"].tolist()
            raw = g["gb_boxes_raw"].astype(np.float32)
            boxes = butd.scale_boxes(torch.from_numpy(raw), w / W, h / H)
            D.add("gb scaled boxes", boxes.numpy(), g["gb_boxes_resized"])
            pooled = model.pool(res4, boxes)
            res5 = model.res5(pooled)
            gb = model.regions(res4, boxes)
            D.add("gb roipool samples", at(pooled, g["gb_roipool_sample_pos"]), g["gb_roipool_sample_val"])
            D.add("gb roipool chan_mean", pooled.double().mean(dim=(2, 3)).numpy(), g["gb_roipool_chan_mean"])
            D.add("gb res5 samples", at(res5, g["gb_res5_sample_pos"]), g["gb_res5_sample_val"])
            D.add("gb features", gb.features.numpy(), g["gb_features"])
            D.add("gb class probs", gb.class_probs.numpy(), g["gb_class_probs"])
            D.add("gb attr logits", gb.attr_logits.numpy(), g["gb_attr_logits"])
            D.add("gb attr probs", gb.attr_probs.numpy(), g["gb_attr_probs"])
            rec = butd.BUTDExtractor(model, butd.BUTDPolicy("given")).select(boxes, gb, (h, w), (H, W),
                                                                               torch.from_numpy(raw))
            D.check("gb classes (argmax)", rec["labels"].tolist() == (g["gb_classes"] + 1).tolist())
            D.check("gb attribute classes (argmax)",
                    rec["attr_probs"].argmax(1).tolist() == g["gb_attr_classes"].tolist())
            D.add("gb scores", rec["scores"].numpy(), g["gb_scores"])
            D.add("gb attr scores", rec["attr_probs"].max(1).values.numpy(), g["gb_attr_scores"])
            D.gap("argmax of class probs (given boxes): top-2 gap", top2_gap(gb.class_probs[:, :-1].numpy()))
            D.gap("argmax of attr probs (given boxes): top-2 gap", top2_gap(gb.attr_probs.numpy()))

        # the three box rules on the first image's 300 golden proposals
        n = IMAGES[0]
        g, o = golden[n], heads[n]
        props = torch.from_numpy(g["proposals"])
        hw, orig = tuple(g["resized_hw"].tolist()), tuple(g["image_hw"].tolist())
        conf = butd.max_conf(props, o.class_probs)
        D.add("mc max_conf", conf.numpy(), g["mc_max_conf"])
        c = conf.numpy().astype(np.float64)
        D.gap("max_conf: distance to the 0.2 threshold", np.abs(c - 0.2).min())
        ranked = np.sort(c)[::-1][:101]
        steps = ranked[:-1] - ranked[1:]
        D.gap("max_conf: gap between consecutive ranks (top 101, ties at 1.0 excluded)",
              steps[(ranked[:-1] < 1.0) | (ranked[1:] < 1.0)].min())
        D.gap("max_conf: gap between ranks 36 and 37", ranked[35] - ranked[36])
        D.gap("max_conf: gap between ranks 100 and 101", ranked[99] - ranked[100])
        ids = butd.max_conf_select(conf)
        D.check("mc ids: set", set(ids.tolist()) == set(g["mc_ids"].tolist()))
        D.check("mc ids: order", ids.tolist() == g["mc_ids"].tolist())
        rec = butd.BUTDExtractor(model, butd.BUTDPolicy("butd")).select(props, o, hw, orig)
        if len(rec["boxes"]) == len(g["mc_boxes"]):
            D.add("mc boxes (original px)", rec["boxes"].numpy(), g["mc_boxes"])
            D.add("mc features", rec["features"].numpy(), g["mc_features"])
            p = rec["class_probs"].numpy()
            D.add("mc class probs", np.concatenate([p[:, 1:], p[:, :1]], 1), g["mc_class_probs"][:, :1601])
            D.add("mc attr probs", rec["attr_probs"].numpy(), g["mc_attr_probs"])
            D.add("mc objects conf", rec["scores"].numpy(), g["mc_objects_conf"])
            D.add("mc attr conf", rec["attr_probs"].max(1).values.numpy(), g["mc_attr_conf"])
            D.check("mc objects id (argmax)", (rec["labels"].numpy() - 1).tolist() == g["mc_objects_id"].tolist())
            D.check("mc attr id (argmax)", rec["attr_probs"].argmax(1).tolist() == g["mc_attr_id"].tolist())
            D.gap("argmax of class probs (max-conf rows): top-2 gap", top2_gap(rec["class_probs"][:, 1:].numpy()))
            D.gap("argmax of attr probs (max-conf rows): top-2 gap", top2_gap(rec["attr_probs"].numpy()))
        fixed = butd.BUTDExtractor(model, butd.BUTDPolicy("fixed", min_boxes=36, max_boxes=36))
        fixed = fixed.select(props, o, hw, orig)
        want = np.argsort(g["mc_max_conf"])[::-1][:36]
        D.check("fixed-36 rows = golden max_conf ranking",
                torch.equal(fixed["features"], o.features[torch.from_numpy(want.copy())]))
        sel = butd.notebook_select(props, o, hw)
        D.check("nb: threshold", sel.nms_thresh == float(g["nb_nms_thresh_used"]))
        D.check("nb: (id, class) set", pairs(sel.ids, sel.classes) == pairs(g["nb_ids"], g["nb_classes"]))
        D.check("nb: order", sel.ids.tolist() == g["nb_ids"].tolist()
                and sel.classes.tolist() == g["nb_classes"].tolist())
        steps = -np.diff(sel.scores.numpy().astype(np.float64))
        D.gap("notebook scores (36): gap between consecutive ranks, ties at 1.0 excluded", steps[steps > 0].min())
        if len(sel.ids) == len(g["nb_ids"]):
            D.add("nb scores", sel.scores.numpy(), g["nb_scores"])
            D.add("nb boxes (resized px)", sel.boxes_resized.numpy(), g["nb_boxes_resized"])
        nb = butd.BUTDExtractor(model, butd.BUTDPolicy("notebook", min_boxes=36, max_boxes=36))
        nb = nb.select(props, o, hw, orig)
        if len(nb["boxes"]) == len(g["nb_boxes"]):
            D.add("nb boxes (original px)", nb["boxes"].numpy(), g["nb_boxes"])
            D.add("nb features", nb["features"].numpy(), g["nb_features"])
            D.add("nb attr scores", nb["attr_probs"].max(1).values.numpy(), g["nb_attr_scores"])
            D.gap("argmax of attr probs (notebook rows): top-2 gap", top2_gap(nb["attr_probs"].numpy()))
            D.check("nb attribute classes (argmax)",
                    nb["attr_probs"].argmax(1).tolist() == g["nb_attr_classes"].tolist())
    return D


# README.md's grouping: the largest diff among the stages of each group
GROUPS = {
    "res4 (samples)": ["res4 samples"],
    "RPN logits": ["rpn logits map", "proposal logits (matched)"],
    "proposals (px)": ["proposals px (matched)"],
    "features": ["first50 features", "gb features", "mc features", "nb features"],
    "class probabilities": ["first50 class probs", "gb class probs", "mc class probs", "gb scores", "mc objects conf",
                            "nb scores", "subset nb scores"],
    "attribute logits": ["first50 attr logits", "gb attr logits"],
    "attribute probabilities": ["gb attr probs", "mc attr probs", "gb attr scores", "mc attr conf", "nb attr scores"],
    "box deltas": ["first50 bbox deltas"],
    "max-confidence scores": ["mc max_conf"],
    "regressed boxes (px)": ["nb boxes (resized px)", "nb boxes (original px)", "subset nb boxes (resized px)"],
}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch.set_num_threads")
    ap.add_argument("--workdir", default=None, help="where to write the checkpoint (default: a temporary folder)")
    ap.add_argument("--json", default=None, help="also write the figures here")
    a = ap.parse_args(argv)
    if not (KIT / "SPEC.md").exists():
        print(f"the parity kit is not at {KIT}", file=sys.stderr)
        return 2
    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(dir=a.workdir) as tmp:
        weights = Path(tmp) / "weights_seed0.pkl"
        subprocess.run([sys.executable, str(KIT / "make_weights.py"), "--calibration",
                        str(KIT / "calibration_seed0.json.gz"), "--out", str(weights)], check=True, capture_output=True)
        t0 = time.perf_counter()
        D = measure(weights)
        secs = time.perf_counter() - t0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s) (OMP_NUM_THREADS="
          f"{os.environ.get('OMP_NUM_THREADS', 'unset')}), float32, {secs:.0f} s")
    print("\nmax |diff| per stage, over both kit images:")
    for k, v in D.diff.items():
        print(f"  {k:<34} {v:.3g}")
    print("\nREADME groups (largest diff in each):")
    groups = {g: max(D.diff.get(s, 0.0) for s in stages) for g, stages in GROUPS.items()}
    for k, v in groups.items():
        print(f"  {k:<34} {v:.2g}")
    print("\nexact decisions, identical to the golden:")
    for k, v in D.same.items():
        print(f"  {k:<62} {'same' if v else 'DIFFERS'}")
    print("\nsmallest margin of each decision (set against the diffs above):")
    for k, v in D.margin.items():
        print(f"  {k:<74} {v:.3g}")
    if a.json:
        Path(a.json).write_text(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__,
                                            "diff": D.diff, "groups": groups, "same": D.same, "margin": D.margin},
                                           indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
