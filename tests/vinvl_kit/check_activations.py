#!/usr/bin/env python
"""
Print per-stage activation statistics of a make_weights.py checkpoint on one image, computed with plain
torch / torchvision following docs/vinvl-spec.md. A development check that the generator's scales keep
every stage O(1) (no explosion, no dead ReLUs, spread class distributions); it is not the parity
reference (that must come from the original code, see README.md).

    python check_activations.py --weights vinvl_seed0.pth --image ../../../shared/butd-kit/images/000456.jpg
"""
import argparse
import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import nms, roi_align


def frozen_bn(x, sd, p):
    # maskrcnn_benchmark FrozenBatchNorm2d: no eps (batch_norm.py:22-27)
    scale = sd[p + ".weight"] * sd[p + ".running_var"].rsqrt()
    bias = sd[p + ".bias"] - sd[p + ".running_mean"] * scale
    return x * scale.reshape(1, -1, 1, 1) + bias.reshape(1, -1, 1, 1)


def block(x, sd, p, stride):
    # STRIDE_IN_1X1 False: the stride sits in the grouped 3x3 (resnet.py:281)
    out = F.relu(frozen_bn(F.conv2d(x, sd[p + "conv1.weight"]), sd, p + "bn1"))
    out = F.relu(frozen_bn(F.conv2d(out, sd[p + "conv2.weight"], stride=stride, padding=1, groups=32), sd,
                           p + "bn2"))
    out = frozen_bn(F.conv2d(out, sd[p + "conv3.weight"]), sd, p + "bn3")
    if p + "downsample.0.weight" in sd:
        x = frozen_bn(F.conv2d(x, sd[p + "downsample.0.weight"], stride=stride), sd, p + "downsample.1")
    return F.relu(out + x)


def stage(x, sd, p, first_stride):
    i = 0
    while p + f"{i}.conv1.weight" in sd:
        x = block(x, sd, p + f"{i}.", first_stride if i == 0 else 1)
        i += 1
    return x


def stats(name, t):
    t = t.float()
    shape = str(tuple(t.shape))
    print(f"{name:<28s} {shape:<22s} mean {t.mean():9.4f} std {t.std():9.4f} min {t.min():9.3f} "
          f"max {t.max():9.3f} zero {(t == 0).float().mean():.2f}")


def preprocess(path, min_size=600, max_size=1000):
    img = Image.open(path).convert("RGB")
    w, h = img.size
    size = min_size
    lo, hi = float(min(w, h)), float(max(w, h))
    if hi / lo * size > max_size:
        size = int(round(max_size * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        oh, ow = h, w
    elif w < h:
        ow, oh = size, int(size * h / w)
    else:
        oh, ow = size, int(size * w / h)
    img = img.resize((ow, oh), Image.BILINEAR)
    x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
    x = x[[2, 1, 0]] * 255
    x = (x - torch.tensor([103.530, 116.280, 123.675]).reshape(3, 1, 1))
    return x[None], (ow, oh)


def decode(deltas, boxes, weights):
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    dx, dy = deltas[:, 0::4] / weights[0], deltas[:, 1::4] / weights[1]
    dw = torch.clamp(deltas[:, 2::4] / weights[2], max=math.log(1000.0 / 16))
    dh = torch.clamp(deltas[:, 3::4] / weights[3], max=math.log(1000.0 / 16))
    pcx, pcy = dx * w[:, None] + cx[:, None], dy * h[:, None] + cy[:, None]
    pw, ph = torch.exp(dw) * w[:, None], torch.exp(dh) * h[:, None]
    out = torch.zeros_like(deltas)
    out[:, 0::4], out[:, 1::4] = pcx - 0.5 * pw, pcy - 0.5 * ph
    out[:, 2::4], out[:, 3::4] = pcx + 0.5 * pw - 1, pcy + 0.5 * ph - 1
    return out


def proposals(sd, logits, deltas, size):
    """spec section 3, after the RPN head: the 300 proposals (P, 4) and their objectness (P,) from the head's
    logits (1, 15, H, W) and deltas (1, 60, H, W): the top 6,000 anchors decoded, clipped, NMS 0.7."""
    ow, oh = size
    hf, wf = logits.shape[-2:]
    obj = logits.permute(0, 2, 3, 1).reshape(-1).sigmoid()
    dl = deltas.view(1, 15, 4, hf, wf).permute(0, 3, 4, 1, 2).reshape(-1, 4)
    sy, sx = torch.meshgrid(torch.arange(0, hf * 16, 16.0), torch.arange(0, wf * 16, 16.0), indexing="ij")
    shifts = torch.stack((sx.reshape(-1), sy.reshape(-1), sx.reshape(-1), sy.reshape(-1)), 1)
    anchors = (shifts.view(-1, 1, 4) + sd["rpn.anchor_generator.cell_anchors.0"].view(1, -1, 4)).reshape(-1, 4)
    score, idx = obj.topk(min(6000, obj.numel()))
    props = decode(dl[idx], anchors[idx], (1.0, 1.0, 1.0, 1.0))
    props[:, 0::2] = props[:, 0::2].clamp(0, ow - 1)
    props[:, 1::2] = props[:, 1::2].clamp(0, oh - 1)
    keep = nms(props, score, 0.7)[:300]
    return props[keep], score[keep]


@torch.no_grad()
def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--weights", required=True)
    ap.add_argument("--image", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    sd = torch.load(args.weights, weights_only=True, mmap=True)["model"]
    x, (ow, oh) = preprocess(args.image)
    stats("input", x)
    x = F.relu(frozen_bn(F.conv2d(x, sd["backbone.body.stem.conv1.weight"], stride=2, padding=3), sd,
                         "backbone.body.stem.bn1"))
    x = F.max_pool2d(x, 3, 2, 1)
    stats("stem", x)
    for i, s in ((1, 1), (2, 2), (3, 2)):
        x = stage(x, sd, f"backbone.body.layer{i}.", s)
        stats(f"layer{i}", x)
    t = F.relu(F.conv2d(x, sd["rpn.head.conv.weight"], sd["rpn.head.conv.bias"], padding=1))
    logits = F.conv2d(t, sd["rpn.head.cls_logits.weight"], sd["rpn.head.cls_logits.bias"])
    deltas = F.conv2d(t, sd["rpn.head.bbox_pred.weight"], sd["rpn.head.bbox_pred.bias"])
    stats("rpn logits", logits)
    stats("rpn deltas", deltas)
    props, kept = proposals(sd, logits, deltas, (ow, oh))
    print("proposals", len(props), "distinct sigmoid scores", len(torch.unique(kept)))
    rois = torch.cat([torch.zeros(len(props), 1), props], 1)
    pooled = roi_align(x, rois, (14, 14), 1 / 16.0, 0, aligned=False)
    stats("pooled", pooled)
    r5 = stage(pooled, sd, "roi_heads.box.feature_extractor.head.layer4.", 2)
    stats("res5", r5)
    feat = r5.mean(dim=(2, 3))
    stats("features", feat)
    print(f"feature spread across boxes (mean std over dims): {feat.std(0).mean():.4f}")
    cls = F.linear(feat, sd["roi_heads.box.predictor.cls_score.weight"], sd["roi_heads.box.predictor.cls_score.bias"])
    prob = cls.softmax(-1)
    stats("class logits", cls)
    print(f"argmax background: {int((prob.argmax(1) == 0).sum())}/{len(prob)}, "
          f"max fg prob >= 0.2: {int((prob[:, 1:].max(1).values >= 0.2).sum())}, "
          f"max prob median {float(prob.max(1).values.median()):.3f}")
    bb = F.linear(feat, sd["roi_heads.box.predictor.bbox_pred.weight"], sd["roi_heads.box.predictor.bbox_pred.bias"])
    stats("box deltas", bb)
    labels = prob[:, 1:].argmax(1) + 1
    emb = sd["attribute.predictor.cls_embedding.weight"][labels]
    h = F.relu(F.linear(torch.cat([feat, emb], 1), sd["attribute.predictor.fc_attr.weight"],
                        sd["attribute.predictor.fc_attr.bias"]))
    stats("fc_attr", h)
    al = F.linear(h, sd["attribute.predictor.attr_score.weight"], sd["attribute.predictor.attr_score.bias"])
    ap_ = al.softmax(-1)
    stats("attr logits", al)
    print(f"attr probs > 0.05 (excluding 0) per box: {(ap_[:, 1:] > 0.05).sum(1).float().mean():.1f}")


if __name__ == "__main__":
    main()
