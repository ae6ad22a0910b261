"""
docs/vinvl-spec.md written as plain torch/torchvision code: the smallest implementation of VinVL's X152-C4
test path that the goldens (golden/*.npz, recorded from the original by record_goldens.py) can be checked
against. It proves the spec and the goldens agree; it is not the product implementation (that lives in
regionbert.extract) and it only covers what the goldens record: batch of one, NMS_FILTER 1 with
IGNORE_BOX_REGRESSION True (thresholds 0.2, 0.05, 0.9) and False, and given boxes (FORCE_BOXES, regression off).
"""
import check_activations as ca
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.ops import nms, roi_align

RES5 = "roi_heads.box.feature_extractor.head.layer4."


def backbone(sd, x):
    """spec section 2: stem (max-pool 3/2/1) and layer1..3 -> res4."""
    y = F.relu(ca.frozen_bn(F.conv2d(x, sd["backbone.body.stem.conv1.weight"], stride=2, padding=3), sd,
                            "backbone.body.stem.bn1"))
    y = F.max_pool2d(y, 3, 2, 1)
    for i, s in ((1, 1), (2, 2), (3, 2)):
        y = ca.stage(y, sd, f"backbone.body.layer{i}.", s)
    return y


def rpn(sd, res4, size):
    """spec section 3 -> (logits map 15xHxW, proposals Px4, objectness P)."""
    t = F.relu(F.conv2d(res4, sd["rpn.head.conv.weight"], sd["rpn.head.conv.bias"], padding=1))
    logits = F.conv2d(t, sd["rpn.head.cls_logits.weight"], sd["rpn.head.cls_logits.bias"])
    deltas = F.conv2d(t, sd["rpn.head.bbox_pred.weight"], sd["rpn.head.bbox_pred.bias"])
    props, score = ca.proposals(sd, logits, deltas, size)
    return logits[0], props, score


def box_head(sd, res4, boxes):
    """spec section 4: ROIAlign 14 (aligned=False) -> res5 (stride 2) -> 7x7 mean -> (pooled, 2048-d)."""
    rois = torch.cat([torch.zeros(len(boxes), 1), boxes], 1)
    pooled = roi_align(res4, rois, (14, 14), 1 / 16.0, 0, aligned=False)
    return pooled, ca.stage(pooled, sd, RES5, 2).mean(dim=(2, 3))


def class_probs(sd, feat):
    return F.linear(feat, sd["roi_heads.box.predictor.cls_score.weight"],
                    sd["roi_heads.box.predictor.cls_score.bias"]).softmax(-1)


def select_nms_filter1(boxes, probs, thresh=0.2, lo=10, hi=100):
    """spec section 6a -> (proposal indices in output order, labels, scores). `boxes` is R x 4 (regression
    ignored: the same box for every class) or R x C x 4 (class-specific boxes)."""
    mask = torch.zeros_like(probs)
    for j in range(1, probs.shape[1]):
        mask[nms(boxes if boxes.dim() == 2 else boxes[:, j], probs[:, j], 0.3), j] = 1
    best, label = (mask * probs).max(1)
    ids = best.nonzero().squeeze(1)
    _, order = torch.sort(best[ids], descending=True)
    n = int((best[ids] >= thresh).sum())
    n = lo if n < lo else min(n, hi)
    sel = ids[order[:n]]
    return sel, label[sel], best[sel]


def class_boxes(sd, feat, props, size):
    """spec section 5 with regression on: per-class boxes (R x 1595 x 4), weights (10, 10, 5, 5), legacy +1,
    clipped to [0, w-1] x [0, h-1]; also the raw deltas."""
    ow, oh = size
    deltas = F.linear(feat, sd["roi_heads.box.predictor.bbox_pred.weight"],
                      sd["roi_heads.box.predictor.bbox_pred.bias"])
    boxes = ca.decode(deltas, props, (10.0, 10.0, 5.0, 5.0)).view(len(props), -1, 4)
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0, ow - 1)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0, oh - 1)
    return boxes, deltas


def attribute_logits(sd, feat, labels):
    """spec section 7: embedding of the detected label, fc_attr + ReLU, attr_score (525)."""
    x = torch.cat([feat, sd["attribute.predictor.cls_embedding.weight"][labels]], 1)
    h = F.relu(F.linear(x, sd["attribute.predictor.fc_attr.weight"], sd["attribute.predictor.fc_attr.bias"]))
    return F.linear(h, sd["attribute.predictor.attr_score.weight"], sd["attribute.predictor.attr_score.bias"])


@torch.no_grad()
def run(sd, image_path, given_fractions):
    """Everything the goldens record, as a dict of numpy arrays keyed like golden/*.npz."""
    out = {}
    x, size = ca.preprocess(image_path)
    ow, oh = size
    out["input"] = x[0].numpy()
    res4 = backbone(sd, x)
    out["layer3"] = res4.numpy()
    logits, props, obj = rpn(sd, res4, size)
    out["rpn_logits_map"], out["proposals"], out["proposal_objectness"] = logits.numpy(), props.numpy(), obj.numpy()
    _, feat = box_head(sd, res4, props)
    probs = class_probs(sd, feat)
    out["first50_features"], out["first50_class_probs"] = feat[:50].numpy(), probs[:50].numpy()
    sel, labels, scores = select_nms_filter1(props, probs)
    out["det_boxes"], out["det_labels"], out["det_scores"] = props[sel].numpy(), labels.numpy(), scores.numpy()
    out["det_box_features"], out["det_scores_all"] = feat[sel].numpy(), probs[sel].numpy()
    out["det_attr_logits"] = attribute_logits(sd, feat[sel], labels).numpy()
    for tag, thresh in (("sel005_", 0.05), ("sel09_", 0.9)):
        s_ids, s_labels, s_scores = select_nms_filter1(props, probs, thresh)
        out[tag + "boxes"], out[tag + "labels"], out[tag + "scores"] = \
            props[s_ids].numpy(), s_labels.numpy(), s_scores.numpy()
    # regression on: class boxes; the attribute head re-pools each detection's regressed box
    cboxes, deltas = class_boxes(sd, feat, props, size)
    out["rb_first10_bbox_deltas"] = deltas[:10].numpy()
    r_ids, r_labels, r_scores = select_nms_filter1(cboxes, probs)
    r_boxes = cboxes[r_ids, r_labels]
    out["rb_det_boxes"], out["rb_det_labels"], out["rb_det_scores"] = \
        r_boxes.numpy(), r_labels.numpy(), r_scores.numpy()
    out["rb_det_box_features16"] = feat[r_ids, :16].numpy()
    out["rb_det_attr_logits"] = attribute_logits(sd, box_head(sd, res4, r_boxes)[1], r_labels).numpy()
    # given boxes (spec 6d): original pixels -> resized by one float32 ratio when both axes agree
    raw_w, raw_h = Image.open(image_path).size
    raw = torch.tensor(np.array(given_fractions) * np.array([raw_w, raw_h, raw_w, raw_h]), dtype=torch.float32)
    rw, rh = float(ow) / float(raw_w), float(oh) / float(raw_h)
    gb = raw * rw if rw == rh else raw * torch.tensor([rw, rh, rw, rh], dtype=torch.float32)
    _, gfeat = box_head(sd, res4, gb)
    gprobs = class_probs(sd, gfeat)
    gscores, glabels = gprobs[:, 1:].max(1)
    glabels = glabels + 1
    # the post-processor clips the forced boxes to [0, w-1] x [0, h-1]; the attribute head re-pools those
    clipped = gb.clone()
    clipped[:, 0::2] = clipped[:, 0::2].clamp(0, ow - 1)
    clipped[:, 1::2] = clipped[:, 1::2].clamp(0, oh - 1)
    _, afeat = box_head(sd, res4, clipped)
    out["gb_boxes"], out["gb_box_features"], out["gb_scores_all"] = clipped.numpy(), gfeat.numpy(), gprobs.numpy()
    out["gb_labels"], out["gb_scores"] = glabels.numpy(), gscores.numpy()
    out["gb_attr_logits"] = attribute_logits(sd, afeat, glabels).numpy()
    return out
