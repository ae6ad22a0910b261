"""Box policies, shared by the detector families: which boxes an image keeps, and which box each stored
feature was pooled from:

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

The torchvision policy is the torchvision family's (extract/torchvision_rcnn.py); bottom-up-attention adds
its notebook policy (extract/butd.py's BUTDPolicy). A family says which policies it takes (its Family's
policies) and selects boxes in its own region extractor; butd_select here is the max-conf rule on
class distributions with background at index 0.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor
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
