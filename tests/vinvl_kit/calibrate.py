#!/usr/bin/env python
"""
Produce calibration_seed<N>.json.gz: per-output-unit scale and bias of the six head layers of the random
checkpoint, measured once on the kit's images so that the heads' outputs are spread like a trained detector's
(RPN objectness not saturating the sigmoid, class distributions neither flat nor one-hot, about 20 % of
proposals with background as the argmax, half of the attribute hidden units active). This is the BUTD kit's
recipe (../../../shared/butd-kit/SPEC.md section 9.2) applied to the heads only: the backbone's scales are
data-independent (make_weights.py). Needs torch; make_weights.py itself does not.

    python make_weights.py --uncalibrated --out raw.pth
    python calibrate.py --weights raw.pth --image ../../../shared/butd-kit/images/*.jpg \
        --out calibration_seed0.json.gz

For each layer, with z = W x the raw pre-bias output of unit j over the calibration set:
    scale_j = target_std / std(z_j),   bias_j = target_mean_j - mean(z_j) * scale_j
(target means drawn from numpy.random.default_rng([seed, 1])). Layers are calibrated in forward order, each
on the outputs of the already calibrated layers before it. Values are stored as float32.
"""
import argparse
import gzip
import hashlib
import json

import check_activations as ca
import numpy as np
import torch
import torch.nn.functional as F
from make_weights import encode_f32
from torchvision.ops import roi_align

TARGETS = {  # layer: (target std, std of the per-unit target means)
    "rpn.head.cls_logits": (1.2, 0.5),
    "rpn.head.bbox_pred": (0.1, 0.0),
    "roi_heads.box.predictor.cls_score": (4.0, 1.0),
    "roi_heads.box.predictor.bbox_pred": (1.0, 0.0),
    "attribute.predictor.fc_attr": (1.0, 0.5),
    "attribute.predictor.attr_score": (2.5, 1.0),
}
BACKGROUND_FRACTION = 0.2


def fit(z, layer, rng):
    """(scale, bias) float32 per unit from raw outputs z (samples x units)."""
    std, mean = TARGETS[layer]
    z = z.double()
    scale = (std / z.std(0).clamp_min(1e-12)).float()
    target_mean = torch.from_numpy(rng.standard_normal(z.shape[1]) * mean)
    bias = (target_mean - z.mean(0) * scale.double()).float()
    return scale, bias


def apply(x, sd, layer, scale, bias):
    w = sd[layer + ".weight"] * scale.reshape((-1,) + (1,) * (sd[layer + ".weight"].dim() - 1))
    return (F.conv2d(x, w, bias) if w.dim() == 4 else F.linear(x, w, bias)), w


def backbone(sd, path):
    """(res4 map, ReLU(RPN conv) map, resized (w, h)) of one image."""
    x, size = ca.preprocess(path)
    x = F.relu(ca.frozen_bn(F.conv2d(x, sd["backbone.body.stem.conv1.weight"], stride=2, padding=3), sd,
                            "backbone.body.stem.bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    for i, s in ((1, 1), (2, 2), (3, 2)):
        x = ca.stage(x, sd, f"backbone.body.layer{i}.", s)
    t = F.relu(F.conv2d(x, sd["rpn.head.conv.weight"], sd["rpn.head.conv.bias"], padding=1))
    return x, t, size


def features(sd, heads, x, t, size):
    """2048-d features of the 300 proposals of the calibrated RPN (docs/vinvl-spec.md sections 4-6)."""
    logits, _ = apply(t, sd, "rpn.head.cls_logits", *heads["rpn.head.cls_logits"])
    deltas, _ = apply(t, sd, "rpn.head.bbox_pred", *heads["rpn.head.bbox_pred"])
    props, _ = ca.proposals(sd, logits, deltas, size)
    rois = torch.cat([torch.zeros(len(props), 1), props], 1)
    r5 = ca.stage(roi_align(x, rois, (14, 14), 1 / 16.0, 0, aligned=False), sd,
                  "roi_heads.box.feature_extractor.head.layer4.", 2)
    return r5.mean(dim=(2, 3))


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True, help="make_weights.py --uncalibrated output")
    ap.add_argument("--image", required=True, nargs="+", help="calibration images (pooled)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    rng = np.random.default_rng([args.seed, 1])
    sd = dict(torch.load(args.weights, weights_only=True)["model"])
    out = {}

    trunks = [backbone(sd, path) for path in args.image]
    heads = {}
    for layer in ("rpn.head.cls_logits", "rpn.head.bbox_pred"):
        z = torch.cat([F.conv2d(t, sd[layer + ".weight"]).permute(0, 2, 3, 1).reshape(
            -1, sd[layer + ".weight"].shape[0]) for _, t, _ in trunks])
        heads[layer] = fit(z, layer, rng)
    feat = torch.cat([features(sd, heads, x, t, size) for x, t, size in trunks])

    layer = "roi_heads.box.predictor.cls_score"
    scale, bias = fit(F.linear(feat, sd[layer + ".weight"]), layer, rng)
    cls, _ = apply(feat, sd, layer, scale, bias)
    # background (index 0) wins on BACKGROUND_FRACTION of the calibration proposals
    margin = cls[:, 1:].max(1).values - (cls[:, 0] - bias[0])
    bias[0] = float(torch.quantile(margin.double(), BACKGROUND_FRACTION))  # bg wins where margin < bias
    heads[layer] = (scale, bias)
    cls, _ = apply(feat, sd, layer, scale, bias)
    layer = "roi_heads.box.predictor.bbox_pred"
    heads[layer] = fit(F.linear(feat, sd[layer + ".weight"]), layer, rng)
    labels = cls[:, 1:].argmax(1) + 1
    xa = torch.cat([feat, sd["attribute.predictor.cls_embedding.weight"][labels]], 1)
    layer = "attribute.predictor.fc_attr"
    heads[layer] = fit(F.linear(xa, sd[layer + ".weight"]), layer, rng)
    h = F.relu(apply(xa, sd, layer, *heads[layer])[0])
    layer = "attribute.predictor.attr_score"
    heads[layer] = fit(F.linear(h, sd[layer + ".weight"]), layer, rng)

    for layer, (scale, bias) in heads.items():
        out[layer] = {"scale": encode_f32(scale.numpy()), "bias": encode_f32(bias.numpy())}
    images = {}
    for path in args.image:
        with open(path, "rb") as f:
            images[path.rsplit("/", 1)[-1]] = hashlib.sha256(f.read()).hexdigest()
    doc = {"seed": args.seed, "images_sha256": images,
           "min_max_size": [600, 1000], "targets": TARGETS, "background_fraction": BACKGROUND_FRACTION,
           "torch": torch.__version__, "heads": out}
    with gzip.GzipFile(args.out, "wb", mtime=0) as f:   # mtime 0: the same values give the same bytes
        f.write(json.dumps(doc, sort_keys=True, indent=0).encode("utf-8"))
    print("wrote", args.out, f"background bias {float(heads['roi_heads.box.predictor.cls_score'][1][0]):.3f}")


if __name__ == "__main__":
    main()
