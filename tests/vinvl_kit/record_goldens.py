#!/usr/bin/env python
"""
Record the ORIGINAL scene_graph_benchmark's per-stage outputs for a make_weights.py checkpoint: the parity
goldens of issue 25. Runs inside the CPU build described in README.md ("Building the original"), never
inside regionbert's own environment:

    PYTHONPATH=/work/sgb_build/deps:/work/sgb_build/src OMP_NUM_THREADS=1 \
        python record_goldens.py --weights vinvl_seed0.pth --image IMG.jpg --out golden/IMG.npz

Configuration: sgb defaults + sgg_configs/vgattr/vinvl_x152c4.yaml + the README's extraction overrides
(NMS_FILTER 1, SCORE_THRESH 0.2, IGNORE_BOX_REGRESSION True, ATTRIBUTE_ON True, OUTPUT_FEATURE True),
MODEL.DEVICE cpu, float32, one thread, one image per forward. The model is the original AttrRCNN loaded by
the original DetectronCheckpointer; the image goes through the original build_transforms(is_train=False).
Stage outputs are captured with forward hooks, so nothing in the original's code path changes.
A second pass with TEST.IGNORE_BOX_REGRESSION False gives the regressed-box outputs (rb_*), a third with
MODEL.RPN.FORCE_BOXES / ROI_BOX_HEAD.FORCE_BOXES the given-box outputs (gb_*); the original's PostProcessor
is also called on the recorded logits with thresholds 0.05 and 0.9 (sel005_*, sel09_*).
"""
import argparse
import hashlib

import numpy as np
import torch
from maskrcnn_benchmark.config import cfg as base_cfg
from maskrcnn_benchmark.data.transforms import build_transforms
from maskrcnn_benchmark.structures.bounding_box import BoxList
from maskrcnn_benchmark.utils.checkpoint import DetectronCheckpointer
from PIL import Image
from scene_graph_benchmark.AttrRCNN import AttrRCNN
from scene_graph_benchmark.config import sg_cfg

GIVEN_FRACTIONS = [[.1, .1, .6, .7], [.3, .2, .95, .9], [0, 0, 1, 1], [.45, .45, .55, .6], [.213, .517, .411, .983]]
N_SAMPLES = 64
CHAN_MEAN_BOXES = 10
MAP_KEYS = ("input", "stem", "layer1", "layer2", "layer3", "rpn_deltas_map")


def make_cfg(config_file, weights, force_boxes=False, regression=False):
    cfg = base_cfg.clone()
    cfg.set_new_allowed(True)
    cfg.merge_from_other_cfg(sg_cfg)
    cfg.set_new_allowed(False)
    cfg.merge_from_file(config_file)
    opts = ["MODEL.WEIGHT", weights, "MODEL.DEVICE", "cpu", "MODEL.ROI_HEADS.NMS_FILTER", 1,
            "MODEL.ROI_HEADS.SCORE_THRESH", 0.2, "TEST.IGNORE_BOX_REGRESSION", not regression,
            "MODEL.ATTRIBUTE_ON", True, "TEST.OUTPUT_FEATURE", True]
    if force_boxes:
        # with IGNORE_BOX_REGRESSION True the original repeats each forced box once per class (1595x) before
        # the force-box branch (box_head/inference.py:84-92, 104-117) and the attribute head then pools all
        # copies (~8000 boxes, 6 GB for 5 boxes); the given-box scripts in the wild set it False
        opts += ["MODEL.RPN.FORCE_BOXES", True, "MODEL.ROI_BOX_HEAD.FORCE_BOXES", True,
                 "TEST.IGNORE_BOX_REGRESSION", False]
    cfg.merge_from_list(opts)
    cfg.freeze()
    return cfg


def load_model(cfg):
    model = AttrRCNN(cfg)
    model.to("cpu")
    model.eval()
    DetectronCheckpointer(cfg, model, save_dir="").load(cfg.MODEL.WEIGHT)
    return model


class Recorder:
    """Forward hooks that keep every call's output, per name."""

    def __init__(self):
        self.calls, self.handles = {}, []

    def hook(self, name, module):
        def keep(_module, _inputs, output):
            self.calls.setdefault(name, []).append(output)
        self.handles.append(module.register_forward_hook(keep))

    def close(self):
        for h in self.handles:
            h.remove()


def summarise(out, key, t, rng):
    """Statistics and samples of a big tensor (the BUTD kit's golden layout, SPEC.md section 11)."""
    a = t.detach().cpu().numpy().astype(np.float32)
    out[key + "_shape"] = np.array(a.shape)
    out[key + "_mean"] = np.float64(a.mean(dtype=np.float64))
    out[key + "_std"] = np.float64(a.astype(np.float64).std())
    out[key + "_min"], out[key + "_max"] = a.min(), a.max()
    # per-channel means: of the image map, or of the first CHAN_MEAN_BOXES regions (size of the goldens)
    b = a.astype(np.float64)[:CHAN_MEAN_BOXES] if key not in MAP_KEYS else a.astype(np.float64)
    out[key + "_chan_mean"] = b.reshape(b.shape[0], b.shape[1], -1).mean(-1)
    flat = a.reshape(-1)
    pos = np.unique(np.concatenate([[0, flat.size - 1, flat.size // 2],
                                    rng.integers(0, flat.size, N_SAMPLES - 3)]))
    out[key + "_sample_pos"] = np.stack(np.unravel_index(pos, a.shape), 1)
    out[key + "_sample_val"] = flat[pos]


def boxlist_fields(out, prefix, bl):
    out[prefix + "boxes"] = bl.bbox.numpy().astype(np.float32)
    for field in bl.fields():
        v = bl.get_field(field)
        if torch.is_tensor(v):
            out[prefix + field] = v.numpy()


@torch.no_grad()
def record(model, image, out, rng):
    transforms = build_transforms(model.cfg, is_train=False)
    x, _ = transforms(image, target=None)
    out["resized_hw"] = np.array(x.shape[-2:])
    out["input_sha256"] = hashlib.sha256(x.numpy().astype("<f4").tobytes()).hexdigest()
    summarise(out, "input", x[None], rng)
    rec = Recorder()
    body = model.backbone.body
    for name in ("stem", "layer1", "layer2", "layer3"):
        rec.hook(name, getattr(body, name))
    rec.hook("rpn_head", model.rpn.head)
    rec.hook("rpn", model.rpn)
    fe = model.roi_heads.box.feature_extractor
    rec.hook("pooler", fe.pooler)
    rec.hook("res5", fe.head)
    rec.hook("box_predictor", model.roi_heads.box.predictor)
    rec.hook("attr_predictor", model.attribute.predictor)
    preds = model(x)
    rec.close()
    for name in ("stem", "layer1", "layer2", "layer3"):
        summarise(out, name, rec.calls[name][0], rng)
    logits, deltas = rec.calls["rpn_head"][0]
    out["rpn_logits_map"] = logits[0][0].numpy()
    summarise(out, "rpn_deltas_map", deltas[0], rng)
    proposals = rec.calls["rpn"][0][0][0]
    out["proposals"] = proposals.bbox.numpy()
    out["proposal_objectness"] = proposals.get_field("objectness").numpy()
    summarise(out, "pooled", rec.calls["pooler"][0], rng)
    summarise(out, "res5", rec.calls["res5"][0], rng)
    feats = rec.calls["res5"][0].mean(dim=(2, 3))
    out["first50_features"] = feats[:50].numpy()
    cls_logits, _ = rec.calls["box_predictor"][0]
    out["first50_class_probs"] = torch.softmax(cls_logits, -1)[:50].numpy()
    attr_logits, _ = rec.calls["attr_predictor"][0]
    out["det_attr_logits"] = attr_logits.numpy()
    boxlist_fields(out, "det_", preds[0])
    # the same selection function (the original PostProcessor object) with other thresholds, to exercise
    # the 100-box cap (0.05) and the 10-box floor (0.9) that 0.2 does not reach on these images
    post = model.roi_heads.box.post_processor
    for tag, thresh in (("sel005_", 0.05), ("sel09_", 0.9)):
        saved, post.score_thresh = post.score_thresh, thresh
        try:
            sel = post((cls_logits, None), [proposals], rec.calls["res5"][0])[0]
        finally:
            post.score_thresh = saved
        out[tag + "boxes"] = sel.bbox.numpy()
        out[tag + "labels"] = sel.get_field("labels").numpy()
        out[tag + "scores"] = sel.get_field("scores").numpy()
    # the attribute head re-ran pooler + res5 on the detections (spec section 7): same numbers expected
    rerun = rec.calls["res5"][1].mean(dim=(2, 3)).numpy()
    out["det_rerun_feature_maxdiff"] = np.float64(np.abs(rerun - out["det_box_features"]).max())
    del out["det_boxes_all"]  # with IGNORE_BOX_REGRESSION: the proposal repeated 1595 times
    return x


@torch.no_grad()
def record_regressed(model, x, out):
    """TEST.IGNORE_BOX_REGRESSION False (the README's visualisation setting): class-specific boxes."""
    rec = Recorder()
    rec.hook("box_predictor", model.roi_heads.box.predictor)
    rec.hook("res5", model.roi_heads.box.feature_extractor.head)
    rec.hook("attr_predictor", model.attribute.predictor)
    preds = model(x)
    rec.close()
    out["rb_first10_bbox_deltas"] = rec.calls["box_predictor"][0][1][:10].numpy()
    out["rb_det_attr_logits"] = rec.calls["attr_predictor"][0][0].numpy()
    boxlist_fields(out, "rb_det_", preds[0])
    # box_features are the proposals' (attributes come from res5 re-run on the regressed boxes): the first
    # 16 dimensions identify which proposal each detection is; full vectors are in det_/first50_
    out["rb_det_box_features16"] = out.pop("rb_det_box_features")[:, :16]
    del out["rb_det_boxes_all"], out["rb_det_scores_all"]


@torch.no_grad()
def record_given(model, image, x, out, rng):
    h, w = x.shape[-2:]
    raw_w, raw_h = image.size
    boxes = np.array(GIVEN_FRACTIONS) * np.array([raw_w, raw_h, raw_w, raw_h])
    target = BoxList(torch.tensor(boxes, dtype=torch.float32), (raw_w, raw_h), mode="xyxy").resize((w, h))
    out["gb_boxes_raw"] = boxes.astype(np.float32)
    out["gb_boxes_resized"] = target.bbox.numpy()
    rec = Recorder()
    rec.hook("pooler", model.roi_heads.box.feature_extractor.pooler)
    rec.hook("res5", model.roi_heads.box.feature_extractor.head)
    rec.hook("attr_predictor", model.attribute.predictor)
    preds = model(x, [target])
    rec.close()
    summarise(out, "gb_pooled", rec.calls["pooler"][0], rng)
    summarise(out, "gb_res5", rec.calls["res5"][0], rng)
    out["gb_attr_logits"] = rec.calls["attr_predictor"][0][0].numpy()
    boxlist_fields(out, "gb_", preds[0])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="sgg_configs/vgattr/vinvl_x152c4.yaml",
                    help="the original's config file (relative to the source tree or absolute)")
    ap.add_argument("--weights", required=True)
    ap.add_argument("--image", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng(0)
    image = Image.open(args.image).convert("RGB")
    with open(args.image, "rb") as f:
        out = {"image_file_sha256": hashlib.sha256(f.read()).hexdigest(), "image_hw": np.array(image.size[::-1])}
    with open(args.weights, "rb") as f:
        out["weights_sha256"] = hashlib.sha256(f.read()).hexdigest()
    x = record(load_model(make_cfg(args.config, args.weights)), image, out, rng)
    record_regressed(load_model(make_cfg(args.config, args.weights, regression=True)), x, out)
    record_given(load_model(make_cfg(args.config, args.weights, force_boxes=True)), image, x, out, rng)
    out["torch_version"] = torch.__version__
    np.savez_compressed(args.out, **{k: np.asarray(v) for k, v in out.items()})
    print("wrote", args.out, len(out), "keys")


if __name__ == "__main__":
    main()
