"""One forward pass of a torchvision Faster R-CNN that returns region features with the boxes.

backbone, RPN and the box head run once per batch. Every feature is the box head's output (1024-d) for
one box pooled from the feature maps (RoIAlign), and its class distribution is the softmax over all
classes, background included, from that same pass: nothing is pooled twice and no backbone runs twice.

Box policies (which boxes an image keeps), and which box each stored feature was pooled from:
  butd         as in bottom-up-attention: per-class NMS over the proposals, each proposal scored by
               its best surviving class, keep conf >= 0.2, at least 10 and at most 100, each proposal
               once; the stored box is the RPN proposal, and the feature is pooled from that same box
  fixed        the same ranking, exactly K boxes per image (K = min_boxes = max_boxes, e.g. 36)
  torchvision  exactly what model(images) returns: the stored box is the class-regressed detection box
               (a proposal can appear once per label), but the feature and class distribution are those
               of the PROPOSAL it was regressed from (pooled from the proposal, not from the stored box),
               as in torchvision; each detection's label and score go to the record's extra
  given        boxes the caller supplies per image (xyxy pixels of the original image); the feature is
               pooled from that box
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.models.detection.image_list import ImageList
from torchvision.models.detection.transform import resize_boxes
from torchvision.ops import boxes as box_ops

POLICIES = ("butd", "fixed", "torchvision", "given")


@dataclass
class BoxPolicy:
    name: str = "butd"
    nms_thresh: float = 0.3  # butd/fixed: per-class NMS IoU over proposals
    conf_thresh: float = 0.2  # butd: keep proposals whose best class scores at least this
    min_boxes: int = 10
    max_boxes: int = 100
    score_thresh: float | None = None  # torchvision: the model's box_score_thresh (None: the model's own, 0.05)

    def __post_init__(self):
        if self.name not in POLICIES:
            raise ValueError(f"unknown box policy {self.name!r}; choose one of {', '.join(POLICIES)}")
        if self.name == "fixed" and self.min_boxes != self.max_boxes:
            raise ValueError("the fixed policy keeps exactly K boxes: set min_boxes == max_boxes")
        if self.score_thresh is not None and self.name != "torchvision":
            raise ValueError("a score threshold (--score-thresh) belongs to the torchvision policy; the butd and "
                             "fixed policies use conf_thresh (--conf-thresh)")
        if not 0 < self.min_boxes <= self.max_boxes:
            raise ValueError(f"need 0 < min_boxes <= max_boxes, got {self.min_boxes}, {self.max_boxes}")

    def apply(self, model) -> None:
        """Settings of this policy that live in the model (torchvision: its score threshold)."""
        if self.name == "torchvision" and self.score_thresh is not None:
            model.roi_heads.score_thresh = float(self.score_thresh)

    def describe(self, model) -> dict:
        """What the shard metadata records about the boxes: the policy, which box each feature was pooled
        from, the thresholds, and the RPN settings that decide the proposals (all but 'given')."""
        if self.name == "given":
            return {"box_policy": "given", "boxes": "given", "features_from": "the given box"}
        rpn = rpn_settings(model)
        if self.name == "torchvision":
            rh = model.roi_heads
            return {"box_policy": "torchvision", "boxes": "class_regressed",
                    "features_from": "the proposal each detection was regressed from", **rpn,
                    "labels": "extra.labels, extra.scores: model(images)'s label (class index) and score per box",
                    "thresholds": {"score_thresh": float(rh.score_thresh), "nms_thresh": float(rh.nms_thresh),
                                   "detections_per_img": int(rh.detections_per_img)}}
        thresholds = {k: v for k, v in asdict(self).items() if k not in ("name", "score_thresh")}
        return {"box_policy": self.name, "boxes": "proposals", "features_from": "the stored box (the proposal)",
                **rpn, "thresholds": thresholds}


def rpn_settings(model) -> dict:
    """The RPN settings (test mode) that decide which proposals the box head sees."""
    rpn = getattr(model, "rpn", None)
    if rpn is None:
        return {}
    return {"rpn_pre_nms_top_n": int(rpn._pre_nms_top_n["testing"]),
            "rpn_post_nms_top_n": int(rpn._post_nms_top_n["testing"]),
            "rpn_nms_thresh": float(rpn.nms_thresh), "rpn_score_thresh": float(rpn.score_thresh)}


def preprocess(transform, image: Tensor) -> Tensor:
    """(3, H, W) float in [0, 1] -> normalized and resized exactly as model(images) does it."""
    image, _ = transform.resize(transform.normalize(image))
    return image


def butd_select(boxes: Tensor, probs: Tensor, policy: BoxPolicy) -> Tensor:
    """Indices of the kept proposals, best first.

    max_conf[p] = the highest score among classes in which proposal p survives per-class NMS. NMS keeps
    or drops an entry by looking only at higher-scoring entries of its class, so running it on the
    entries scoring >= t gives the exact max_conf of every proposal whose max_conf >= t. The first pass
    uses t = conf_thresh (few entries with a trained detector); only when fewer than min_boxes pass
    does a second pass over all entries rank the rest."""
    scores = probs[:, 1:]  # background is never a class to keep a box for
    n = boxes.shape[0]
    for t in (policy.conf_thresh, 0.0):
        p, c = torch.nonzero(scores >= t, as_tuple=True) if t > 0 else _all_pairs(scores)
        s = scores[p, c]
        keep = box_ops.batched_nms(boxes[p], s, c, policy.nms_thresh)
        max_conf = torch.zeros(n, dtype=scores.dtype, device=scores.device)
        max_conf.scatter_reduce_(0, p[keep], s[keep], reduce="amax")
        confident = int((max_conf >= policy.conf_thresh).sum())
        if confident >= policy.min_boxes or t == 0.0:
            break
    order = torch.argsort(max_conf, descending=True, stable=True)
    k = min(max(confident, policy.min_boxes), policy.max_boxes)
    return order[:k]


def _all_pairs(scores: Tensor) -> tuple[Tensor, Tensor]:
    n, c = scores.shape
    p = torch.arange(n, device=scores.device).repeat_interleave(c)
    return p, torch.arange(c, device=scores.device).repeat(n)


def torchvision_select(roi_heads, class_logits, box_regression, proposals, image_shape):
    """roi_heads.postprocess_detections for one image, step for step, also returning each detection's
    proposal index (which torchvision throws away)."""
    boxes = roi_heads.box_coder.decode(box_regression, [proposals])  # (P, C, 4)
    scores = F.softmax(class_logits, -1)
    boxes = box_ops.clip_boxes_to_image(boxes, image_shape)
    num_props, num_classes = scores.shape
    labels = torch.arange(num_classes, device=scores.device).view(1, -1).expand_as(scores)
    props = torch.arange(num_props, device=scores.device).view(-1, 1).expand_as(scores)
    boxes, scores, labels, props = boxes[:, 1:], scores[:, 1:], labels[:, 1:], props[:, 1:]
    boxes, scores = boxes.reshape(-1, 4), scores.reshape(-1)
    labels, props = labels.reshape(-1), props.reshape(-1)
    inds = torch.where(scores > roi_heads.score_thresh)[0]
    boxes, scores, labels, props = boxes[inds], scores[inds], labels[inds], props[inds]
    keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
    boxes, scores, labels, props = boxes[keep], scores[keep], labels[keep], props[keep]
    keep = box_ops.batched_nms(boxes, scores, labels, roi_heads.nms_thresh)[: roi_heads.detections_per_img]
    return boxes[keep], scores[keep], labels[keep], props[keep]


class RegionExtractor:
    """Faster R-CNN + box policy -> per-image boxes, features and class distributions."""

    def __init__(self, model, policy: BoxPolicy):
        self.model, self.policy = model.eval(), policy

    @torch.inference_mode()
    def __call__(self, images: list[Tensor], original_sizes: list[tuple[int, int]],
                 given_boxes: list[Tensor] | None = None) -> list[dict[str, Tensor]]:
        """images: preprocessed (3, h, w) tensors on the model's device (see `preprocess`).
        original_sizes: (H, W) of each image before resizing. Returns per image, on the same device:
        boxes (N, 4) in original pixels, features (N, D), class_probs (N, C), scores (N,), labels (N,)."""
        m, policy = self.model, self.policy
        sizes = [(int(im.shape[-2]), int(im.shape[-1])) for im in images]
        batch = ImageList(m.transform.batch_images(images, size_divisible=m.transform.size_divisible), sizes)
        feats = m.backbone(batch.tensors)
        if isinstance(feats, Tensor):
            feats = OrderedDict([("0", feats)])
        if policy.name == "given":
            if given_boxes is None or len(given_boxes) != len(images):
                raise ValueError("the 'given' policy needs one (N, 4) box tensor per image")
            proposals = [resize_boxes(b.to(batch.tensors.device, torch.float32), o, s)
                         for b, o, s in zip(given_boxes, original_sizes, sizes, strict=True)]
        else:
            proposals, _ = m.rpn(batch, feats)
        rh = m.roi_heads
        x = rh.box_head(rh.box_roi_pool(feats, proposals, sizes))  # (sum P, D): one row per proposal
        class_logits, box_regression = rh.box_predictor(x)  # (sum P, C), (sum P, 4C)
        counts = [len(p) for p in proposals]
        out = []
        for i, (xi, logits, reg) in enumerate(zip(x.split(counts), class_logits.split(counts),
                                                  box_regression.split(counts), strict=True)):
            logits, props = logits.float(), proposals[i].float()
            probs = F.softmax(logits, -1)
            if policy.name == "torchvision":
                boxes, scores, labels, idx = torchvision_select(rh, logits, reg.float(), props, sizes[i])
            else:
                idx = (butd_select(props, probs, policy) if policy.name != "given"
                       else torch.arange(len(props), device=props.device))
                boxes = props[idx]
                scores, labels = probs[idx, 1:].max(1)
                labels = labels + 1
            boxes = (given_boxes[i].to(boxes.device, torch.float32) if policy.name == "given"
                     else resize_boxes(boxes, sizes[i], original_sizes[i]))
            out.append({"boxes": boxes, "features": xi[idx], "class_probs": probs[idx],
                        "scores": scores, "labels": labels})
        return out
