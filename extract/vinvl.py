"""VinVL's Visual Genome detector (Zhang et al. 2021: ResNeXt-152 32x8d C4, 1,594 objects, 524 attributes)
in plain torch/torchvision, from the released `vinvl_vg_x152c4.pth`, without scene_graph_benchmark.

Every stage follows docs/vinvl-spec.md (section numbers below), which tests/vinvl_kit/ checks against the
original code's own outputs (tests/test_vinvl_parity.py runs this module against those goldens):

  image (RGB) -> PIL bilinear resize, shorter side 600 / longer <= 1000, truncating (§1)
  -> /255, BGR * 255, minus pixel means 103.530/116.280/123.675 (§1)
  -> ResNeXt-152 32x8d stem + layer1..3, stride in the grouped 3x3, FrozenBN without eps (§2)
  -> RPN on res4: 15 anchors (the checkpoint's buffer), sigmoid top 6000, legacy "+1" decode, clip to
     w-1/h-1, NMS 0.7, 300 proposals (§3)
  -> ROIAlign 14x14 (aligned=False, adaptive sampling) -> res5 (stride 2) -> 7x7 mean: 2048-d (§4)
  -> 1595-way classifier (background at 0), class-specific box deltas (§5)
  -> selection: NMS_FILTER 1 / 0 / 2, regression ignored or not, given boxes (§6)
  -> attribute head: embedding of the detected label ++ feature -> 512 -> 525 (§7).

Stored (the shard format): class_probs = the 1595-wide softmax as the model orders it (background at 0,
as the format wants); attr_probs = the softmax over the 524 real attributes' logits ("no attribute", index
0, dropped before the softmax as the BUTD family drops its own: the format's distributions sum to 1), before
the original's 0.05 threshold; boxes in original pixels (the original's BoxList.resize, §8).

Batching (issue 25 item 4): padding changes a C4 network's outputs (a padded image's res4 moves everywhere,
bench/README.md's BUTD measurement), so images are never padded; images of the same resized shape need no
padding and share one backbone pass on CUDA (ImageInput.size_divisible = 1: the pipeline groups by exact
shape). That is exact arithmetic, not necessarily bit-identical (kernels are chosen by batch size), so it is
within the parity tolerances, not at max |diff| 0. On the CPU a stack was slower than one pass per image
(bench/README.md), so there each image runs alone. Regions (ROIAlign, res5, heads) run per image, as in
the original.

The checkpoint and label map readers are extract/vinvl_weights.py.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import lru_cache, partial

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops import nms, roi_align
from torchvision.ops.misc import FrozenBatchNorm2d

from .detector import Family, ImageInput, feature_layout, local_or_random, weights_digest
from .policies import BoxPolicy
from .vinvl_weights import NAME, RELEASED_DEPTHS, WeightsError, read_checkpoint, read_labelmap

NUM_CLASSES = 1595  # classifier outputs, background at 0 (yaml:21)
NUM_ATTRS = 525  # attribute outputs, "no attribute" at 0 (yaml:23)
PIXEL_MEAN_BGR = (103.530, 116.280, 123.675)  # yaml:29; PIXEL_STD 1
ANCHOR_SIZES = (32, 64, 128, 256, 512)
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
STRIDE = 16
RPN_PRE_NMS, RPN_POST_NMS, RPN_NMS = 6000, 300, 0.7
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
SCALE_CLAMP = math.log(1000.0 / 16)
FILTER1_NMS = 0.3  # NMS_FILTER 1's per-class NMS, hard-coded in the original (inference.py:267-269)
ROI_HEADS_NMS = 0.5  # MODEL.ROI_HEADS.NMS: NMS_FILTER 0 and 2 (defaults.py:214)
MAX_RETRIES = 10  # PostProcessor.forward halves the threshold at most this often (inference.py:129-141)
PUBLISHED = ("vinvl_vg_x152c4.pth and its label map VG-SGG-dicts-vgoi6-clipped.json (scene_graph_benchmark's "
             "README, vinvl_model_zoo)")


# ----------------------------------------------------------------------------- preprocessing (§1)
def resized_wh(w: int, h: int, min_size: int = 600, max_size: int = 1000) -> tuple[int, int]:
    """maskrcnn_benchmark Resize.get_size (transforms.py:36-56): the longer side truncated, not rounded."""
    size = min_size
    lo, hi = float(min(w, h)), float(max(w, h))
    if hi / lo * size > max_size:
        size = int(round(max_size * lo / hi))
    if (w <= h and w == size) or (h <= w and h == size):
        return w, h
    if w < h:
        return size, int(size * h / w)
    return int(size * w / h), size


@dataclass
class VinVLTransform:
    """What a DataLoader worker does to one decoded image (RGB uint8, as extract.images decodes it)."""

    min_size: int = 600
    max_size: int = 1000

    def prepare(self, rgb: np.ndarray) -> Tensor:
        h, w = rgb.shape[:2]
        ow, oh = resized_wh(w, h, self.min_size, self.max_size)
        img = Image.fromarray(np.ascontiguousarray(rgb))
        img = np.asarray(img.resize((ow, oh), Image.BILINEAR))  # torchvision F.resize on a PIL image
        x = torch.from_numpy(img.copy()).permute(2, 0, 1).float() / 255  # ToTensor
        x = x[[2, 1, 0]] * 255  # to_bgr255: the float32 round trip is part of the original (spec §1.4)
        return x - torch.tensor(PIXEL_MEAN_BGR, dtype=torch.float32).view(3, 1, 1)


# ----------------------------------------------------------------------------- network (§2-§5, §7)
frozen_bn = partial(FrozenBatchNorm2d, eps=0.0)  # maskrcnn_benchmark's FrozenBatchNorm2d has no eps


def bottleneck(cin: int, planes: int, stride: int) -> Bottleneck:
    """torchvision's ResNeXt bottleneck, 32 groups x 8 * planes/64 wide (width 4 * planes), stride in the 3x3
    (STRIDE_IN_1X1 False), a projection shortcut only when the channel count changes (resnet.py:260-273)."""
    cout = 4 * planes
    down = None
    if cin != cout:
        down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), frozen_bn(cout))
    return Bottleneck(cin, planes, stride, down, groups=32, base_width=8, norm_layer=frozen_bn)


def stage(cin: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    rest = [bottleneck(4 * planes, planes, 1) for _ in range(blocks - 1)]
    return nn.Sequential(bottleneck(cin, planes, stride), *rest)


class Stem(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = frozen_bn(64)

    def forward(self, x: Tensor) -> Tensor:
        return F.max_pool2d(F.relu(self.bn1(self.conv1(x))), 3, 2, 1)


def cell_anchors() -> Tensor:
    """Detectron's generate_anchors(16, sizes, ratios) (anchor_generator.py:220-289): ratio-major, rounded
    widths, "+1" boxes around (7.5, 7.5). The checkpoint holds the same values as a buffer."""
    out = []
    for r in ANCHOR_RATIOS:
        ws = float(np.round(np.sqrt(256.0 / r)))
        hs = float(np.round(ws * r))
        for s in ANCHOR_SIZES:
            w, h = ws * s / 16.0, hs * s / 16.0
            out.append([7.5 - 0.5 * (w - 1), 7.5 - 0.5 * (h - 1), 7.5 + 0.5 * (w - 1), 7.5 + 0.5 * (h - 1)])
    return torch.tensor(out, dtype=torch.float64).float()


def _module(**children) -> nn.Module:
    m = nn.Module()
    for k, v in children.items():
        m.add_module(k, v)
    return m


class VinVLDetector(nn.Module):
    """The network, its submodules named as the checkpoint's entries (backbone.body.layer3.35.conv2, ...), so
    the state_dict is the released file's 841 names. The attribute head's feature extractor IS the box
    head's (AttrRCNN.py:32-35): one res5, listed under both names as in the original."""

    def __init__(self, depths: tuple[int, int, int, int] = RELEASED_DEPTHS):
        super().__init__()
        d1, d2, d3, d5 = depths
        self.depths = tuple(depths)
        self.backbone = _module(body=_module(stem=Stem(), layer1=stage(64, 64, d1, 1), layer2=stage(256, 128, d2, 2),
                                             layer3=stage(512, 256, d3, 2)))
        anchors = nn.Module()
        anchors.register_buffer("0", cell_anchors())
        self.rpn = _module(anchor_generator=_module(cell_anchors=anchors),
                           head=_module(conv=nn.Conv2d(1024, 1024, 3, padding=1), cls_logits=nn.Conv2d(1024, 15, 1),
                                        bbox_pred=nn.Conv2d(1024, 60, 1)))
        res5 = _module(head=_module(layer4=stage(1024, 512, d5, 2)))
        self.roi_heads = _module(box=_module(feature_extractor=res5, predictor=_module(
            cls_score=nn.Linear(2048, NUM_CLASSES), bbox_pred=nn.Linear(2048, 4 * NUM_CLASSES))))
        self.attribute = _module(feature_extractor=res5, predictor=_module(
            cls_embedding=nn.Embedding(NUM_CLASSES, 256), fc_attr=nn.Linear(2048 + 256, 512),
            attr_score=nn.Linear(512, NUM_ATTRS)))
        self.transform = VinVLTransform()
        self.feature_dim = 2048
        self.attribute_names: list[str] | None = None  # set by build
        self.eval()

    @classmethod
    def empty(cls, depths=RELEASED_DEPTHS) -> VinVLDetector:
        """Uninitialised storage (no 148M-value random init) to load weights into; anchors set."""
        with torch.device("meta"):
            model = cls(depths)
        model.to_empty(device="cpu")
        model.anchor_buffer().copy_(cell_anchors())
        return model

    def anchor_buffer(self) -> Tensor:
        return getattr(self.rpn.anchor_generator.cell_anchors, "0")

    # --- image level ------------------------------------------------------------------------
    def res4(self, x: Tensor) -> Tensor:
        """(N, 3, h, w), all of one shape (never padded) -> res4 (N, 1024, Hf, Wf)."""
        b = self.backbone.body
        return b.layer3(b.layer2(b.layer1(b.stem(x))))

    def rpn_maps(self, res4: Tensor) -> tuple[Tensor, Tensor]:
        h = self.rpn.head
        t = F.relu(h.conv(res4))
        return h.cls_logits(t), h.bbox_pred(t)  # (N, 15, Hf, Wf), (N, 60, Hf, Wf)

    def proposals(self, logits: Tensor, deltas: Tensor, wh: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """One image's RPN maps (15, Hf, Wf), (60, Hf, Wf) -> (P, 4) proposals (resized px), (P,) sigmoid
        objectness, objectness-descending, P <= 300 (rpn/inference.py:76-123)."""
        w, h = wh
        hf, wf = logits.shape[-2:]
        obj = logits.permute(1, 2, 0).reshape(-1).sigmoid()
        dl = deltas.view(15, 4, hf, wf).permute(2, 3, 0, 1).reshape(-1, 4)
        dev = logits.device
        sy, sx = torch.meshgrid(torch.arange(0, hf * STRIDE, STRIDE, dtype=torch.float32, device=dev),
                                torch.arange(0, wf * STRIDE, STRIDE, dtype=torch.float32, device=dev), indexing="ij")
        sx, sy = sx.reshape(-1), sy.reshape(-1)
        shifts = torch.stack((sx, sy, sx, sy), 1)
        anchors = (shifts.view(-1, 1, 4) + self.anchor_buffer().view(1, -1, 4)).reshape(-1, 4)
        score, idx = obj.topk(min(RPN_PRE_NMS, obj.numel()))
        props = decode(dl[idx], anchors[idx], (1.0, 1.0, 1.0, 1.0))
        clip_(props, w, h)  # min size 0: boxes clipped to zero width stay (remove_small_boxes keeps them)
        keep = nms(props, score, RPN_NMS)[:RPN_POST_NMS]
        return props[keep], score[keep]

    # --- region level ------------------------------------------------------------------------
    def box_features(self, res4: Tensor, boxes: Tensor) -> Tensor:
        """res4 (1, 1024, Hf, Wf) of one image, (R, 4) resized px -> (R, 2048): ROIAlign 14x14 at 1/16,
        sampling ratio 0, aligned=False (torchvision's op, as maskrcnn_benchmark calls it), res5, mean."""
        rois = torch.cat([boxes.new_zeros(len(boxes), 1), boxes], 1)
        pooled = roi_align(res4, rois, (14, 14), 1.0 / STRIDE, 0, aligned=False)
        return self.roi_heads.box.feature_extractor.head.layer4(pooled).mean(dim=(2, 3))

    def class_probs(self, features: Tensor) -> Tensor:
        return self.roi_heads.box.predictor.cls_score(features).softmax(-1)

    def class_boxes(self, features: Tensor, boxes: Tensor, wh: tuple[int, int]) -> Tensor:
        """Class-specific regressed boxes (R, 1595, 4), clipped to [0, w-1] x [0, h-1] (§5)."""
        deltas = self.roi_heads.box.predictor.bbox_pred(features)
        out = decode(deltas, boxes, BOX_WEIGHTS).view(len(boxes), -1, 4)
        return clip_(out, *wh)

    def attr_logits(self, features: Tensor, labels: Tensor) -> Tensor:
        """§7: the detected label's embedding after the feature, fc_attr + ReLU, attr_score (525)."""
        p = self.attribute.predictor
        x = F.relu(p.fc_attr(torch.cat([features, p.cls_embedding(labels)], 1)))
        return p.attr_score(x)


def decode(deltas: Tensor, boxes: Tensor, weights) -> Tensor:
    """maskrcnn_benchmark BoxCoder.decode (box_coder.py:52-95), legacy "+1" widths and "-1" on x2/y2:
    deltas (R, 4k) against boxes (R, 4) -> (R, 4k)."""
    w = boxes[:, 2] - boxes[:, 0] + 1
    h = boxes[:, 3] - boxes[:, 1] + 1
    cx, cy = boxes[:, 0] + 0.5 * w, boxes[:, 1] + 0.5 * h
    dx, dy = deltas[:, 0::4] / weights[0], deltas[:, 1::4] / weights[1]
    dw = torch.clamp(deltas[:, 2::4] / weights[2], max=SCALE_CLAMP)
    dh = torch.clamp(deltas[:, 3::4] / weights[3], max=SCALE_CLAMP)
    pcx, pcy = dx * w[:, None] + cx[:, None], dy * h[:, None] + cy[:, None]
    pw, ph = torch.exp(dw) * w[:, None], torch.exp(dh) * h[:, None]
    out = torch.zeros_like(deltas)
    out[:, 0::4], out[:, 1::4] = pcx - 0.5 * pw, pcy - 0.5 * ph
    out[:, 2::4], out[:, 3::4] = pcx + 0.5 * pw - 1, pcy + 0.5 * ph - 1
    return out


def clip_(boxes: Tensor, w: int, h: int) -> Tensor:
    """In place, BoxList.clip_to_image(remove_empty=False): x to [0, w-1], y to [0, h-1]; any (..., 4)."""
    boxes[..., 0::2] = boxes[..., 0::2].clamp(0, w - 1)
    boxes[..., 1::2] = boxes[..., 1::2].clamp(0, h - 1)
    return boxes


def to_original(boxes: Tensor, wh: tuple[int, int], original_wh: tuple[int, int]) -> Tensor:
    """BoxList.resize (bounding_box.py:91-127): one float32 multiply when both ratios agree, else per axis."""
    (w, h), (W, H) = wh, original_wh
    rw, rh = float(W) / float(w), float(H) / float(h)
    if rw == rh:
        return boxes * rw
    return boxes * torch.tensor([rw, rh, rw, rh], dtype=boxes.dtype, device=boxes.device)


def attr_distribution(attr_logits: Tensor) -> Tensor:
    """(K, 525) logits -> (K, 524): the softmax over the 524 real attributes, "no attribute" (index 0) dropped
    before it, as the BUTD family drops its own (the shard format wants distributions that sum to 1). The
    original's post-processed values are these times (1 - p(no attribute)): the same ranking per box."""
    return attr_logits[:, 1:].softmax(-1)


# ----------------------------------------------------------------------------- selection (§6)
def select_filter1(boxes: Tensor, probs: Tensor, thresh: float = 0.2, lo: int = 10, hi: int = 100,
                   nms_thresh: float = FILTER1_NMS) -> tuple[Tensor, Tensor, Tensor]:
    """NMS_FILTER 1 (inference.py:246-308) -> (proposal indices in output order, labels, scores). boxes is
    (R, 4) (regression ignored: one box for every class) or (R, C, 4) (class-specific boxes)."""
    mask = torch.zeros_like(probs)
    for j in range(1, probs.shape[1]):  # every foreground class, no score threshold first
        mask[nms(boxes if boxes.dim() == 2 else boxes[:, j], probs[:, j], nms_thresh), j] = 1
    best, label = (mask * probs).max(1)
    ids = best.nonzero().squeeze(1)
    _, order = torch.sort(best[ids], descending=True)
    n = int((best[ids] >= thresh).sum())
    n = lo if n < lo else min(n, hi)
    sel = ids[order[:n]]
    return sel, label[sel], best[sel]


def select_filter0(boxes: Tensor, probs: Tensor, thresh: float = 0.2, lo: int = 10, hi: int = 100,
                   nms_thresh: float = ROI_HEADS_NMS) -> tuple[Tensor, Tensor, Tensor]:
    """NMS_FILTER 0 (inference.py:188-244), with forward's retry at half the threshold while fewer than
    `lo` come out (at most MAX_RETRIES times, l.129-141). Per class: score > thresh, NMS; classes
    concatenated in class order; past `hi`, keep scores >= the (n - hi + 1)-th smallest. A proposal may
    come out once per class."""
    for _ in range(MAX_RETRIES + 1):
        ids, labels = [], []
        for j in range(1, probs.shape[1]):
            cand = (probs[:, j] > thresh).nonzero().squeeze(1)
            if len(cand):
                b = boxes[cand] if boxes.dim() == 2 else boxes[cand, j]
                keep = cand[nms(b, probs[cand, j], nms_thresh)]
                ids.append(keep)
                labels.append(torch.full_like(keep, j))
        ids = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long, device=probs.device)
        labels = torch.cat(labels) if labels else ids.clone()
        scores = probs[ids, labels]
        if len(ids) > hi:
            kth = scores.kthvalue(len(ids) - hi + 1).values
            keep = scores >= kth
            ids, labels, scores = ids[keep], labels[keep], scores[keep]
        if len(ids) >= lo:
            break
        thresh /= 2
    return ids, labels, scores


def select_filter2(boxes: Tensor, probs: Tensor, thresh: float = 0.2, lo: int = 10, hi: int = 100,
                   nms_thresh: float = ROI_HEADS_NMS) -> tuple[Tensor, Tensor, Tensor]:
    """NMS_FILTER 2 (inference.py:310-353), regression ignored (boxes (R, 4)): each proposal's best
    foreground class; score > thresh / 100; one class-agnostic NMS; by score; min(max(#>= thresh, lo), hi)."""
    scores, labels = probs[:, 1:].max(1)
    labels = labels + 1
    cand = ((scores > thresh * 0.01) & (boxes[:, 2] >= boxes[:, 0]) & (boxes[:, 3] >= boxes[:, 1])).nonzero().squeeze(1)
    keep = cand[nms(boxes[cand], scores[cand], nms_thresh)]
    order = torch.sort(scores[keep], descending=True)[1]
    keep = keep[order]
    n = min(max(int((scores[keep] >= thresh).sum()), lo), hi)
    keep = keep[:n]
    return keep, labels[keep], scores[keep]


VINVL_POLICIES = ("butd", "fixed", "given", "regressed", "nms_filter0", "nms_filter2")
_SELECTION = {
    "butd": "scene_graph_benchmark NMS_FILTER 1 (per-class NMS over every class, max surviving score per "
            "proposal, >= conf_thresh, min..max boxes), TEST.IGNORE_BOX_REGRESSION True: VinVL's extraction setting",
    "fixed": "NMS_FILTER 1 with MIN_DETECTIONS_PER_IMG = DETECTIONS_PER_IMG = K (regression ignored)",
    "regressed": "NMS_FILTER 1 with TEST.IGNORE_BOX_REGRESSION False: class-specific regressed boxes; features "
                 "of the proposal each was regressed from, attributes from res5 re-run on the regressed box",
    "nms_filter0": "NMS_FILTER 0: per class score > conf_thresh, NMS 0.5, a proposal once per class, top max_boxes, "
                   "threshold halved (up to 10 times) while fewer than min_boxes",
    "nms_filter2": "NMS_FILTER 2: best foreground class per proposal, one class-agnostic NMS 0.5, "
                   "min(max(#>= conf_thresh, min_boxes), max_boxes)",
}


@dataclass
class VinVLPolicy(BoxPolicy):
    """policies.BoxPolicy's given/fixed, and VinVL's own selections: "butd" is the original's NMS_FILTER 1
    (the same max-confidence idea as bottom-up-attention's generate_tsv, on VinVL's terms: spec §6a), the
    extraction setting of VinVL's README; "regressed" is that with class-regressed boxes; nms_filter0/2 the
    original's other two modes (their NMS is ROI_HEADS.NMS 0.5; --nms-thresh is NMS_FILTER 1's 0.3)."""

    def __post_init__(self):
        if self.name not in VINVL_POLICIES:
            raise ValueError(f"box policy {self.name!r} does not apply to {NAME}; choose one of "
                             f"{', '.join(VINVL_POLICIES)}")
        if self.name in ("butd", "fixed", "given"):
            super().__post_init__()
        elif self.score_thresh is not None:
            raise ValueError(f"a score threshold (--score-thresh) belongs to the torchvision policy; {self.name} "
                             "uses conf_thresh (--conf-thresh)")
        elif not 0 < self.min_boxes <= self.max_boxes:
            raise ValueError(f"need 0 < min_boxes <= max_boxes, got {self.min_boxes}, {self.max_boxes}")

    def describe(self, model=None) -> dict:
        if self.name == "given":
            return {"box_policy": "given", "boxes": "given",
                    "features_from": "the given box (attributes: the box clipped to the resized image's w-1/h-1, "
                                     "as the original's FORCE_BOXES)"}
        nms_thresh = self.nms_thresh if self.name in ("butd", "fixed", "regressed") else ROI_HEADS_NMS
        regressed = self.name == "regressed"
        return {"box_policy": self.name, "boxes": "class_regressed" if regressed else "proposals",
                "features_from": "the proposal each box was regressed from" if regressed else "the proposal",
                "rpn_pre_nms_top_n": RPN_PRE_NMS, "rpn_post_nms_top_n": RPN_POST_NMS, "rpn_nms_thresh": RPN_NMS,
                "selection": _SELECTION[self.name],
                "thresholds": {"score_thresh": self.conf_thresh, "nms_thresh": nms_thresh,
                               "min_boxes": self.min_boxes, "max_boxes": self.max_boxes}}


# ----------------------------------------------------------------------------- the extractor
class VinVLExtractor:
    """VinVLDetector + a policy -> per image: boxes (original px), features (2048), class_probs (1595,
    background at 0), attr_probs (524), scores, labels (1..1594). Same call as the other families'."""

    def __init__(self, model: VinVLDetector, policy: BoxPolicy, stack: bool | None = None):
        if policy.name not in VINVL_POLICIES:
            raise ValueError(f"box policy {policy.name!r} does not apply to {NAME}; choose one of "
                             f"{', '.join(VINVL_POLICIES)}")
        self.model, self.policy = model.eval(), policy
        # stack images of one resized shape into one backbone pass: None = on CUDA only. On the CPU it was
        # slower (one thread, 600x800: 11.4-11.8 s for a stack of two vs 10.0-10.5 s for two passes,
        # bench/README.md), with bit-identical res4, so the CPU runs one image per pass
        self.stack = stack

    @torch.inference_mode()
    def __call__(self, images: list[Tensor], original_sizes: list[tuple[int, int]],
                 given_boxes: list[Tensor] | None = None) -> list[dict[str, Tensor]]:
        if self.policy.name == "given" and (given_boxes is None or len(given_boxes) != len(images)):
            raise ValueError("the 'given' policy needs one (N, 4) box tensor per image")
        if images and images[0].is_cuda:  # TF32 would move features by ~1e-3, past the parity tolerances
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        out: list[dict | None] = [None] * len(images)
        by_shape: dict[tuple, list[int]] = {}
        stack = self.stack if self.stack is not None else bool(images and images[0].is_cuda)
        for i, im in enumerate(images):  # same resized shape: one backbone pass, no padding (exact)
            by_shape.setdefault(tuple(im.shape) if stack else i, []).append(i)
        for ids in by_shape.values():
            res4 = self.model.res4(torch.stack([images[i].float() for i in ids]))
            logits, deltas = self.model.rpn_maps(res4) if self.policy.name != "given" else (None, None)
            for k, i in enumerate(ids):
                maps = None if logits is None else (logits[k], deltas[k])
                out[i] = self.one(res4[k:k + 1], maps, images[i].shape[-2:], original_sizes[i],
                                  None if given_boxes is None else given_boxes[i])
        return out  # type: ignore[return-value]

    def one(self, res4: Tensor, maps, hw, original_hw, given: Tensor | None) -> dict[str, Tensor]:
        """One image: res4 (1, 1024, Hf, Wf), its RPN maps, resized (h, w), original (H, W), given boxes."""
        wh, owh = (int(hw[1]), int(hw[0])), (int(original_hw[1]), int(original_hw[0]))
        if self.policy.name == "given":
            return self.given(res4, given.to(res4.device, torch.float32), wh, owh)
        return self.select(res4, self.regions(res4, maps, wh), wh, owh)

    def regions(self, res4: Tensor, maps, wh) -> tuple[Tensor, Tensor, Tensor]:
        """The box head on one image's proposals: (proposals (P, 4) resized px, features (P, 2048), class
        probabilities (P, 1595)); what every policy but given selects from."""
        m = self.model
        props, _ = m.proposals(maps[0], maps[1], wh)
        feats = m.box_features(res4, props)
        return props, feats, m.class_probs(feats)

    def select(self, res4: Tensor, regions, wh, owh) -> dict[str, Tensor]:
        """The policy's detections from regions(): boxes to original px, attributes of the detected labels."""
        m, p = self.model, self.policy
        props, feats, probs = regions
        attr_feats = None
        if p.name == "regressed":
            cboxes = m.class_boxes(feats, props, wh)
            ids, labels, scores = select_filter1(cboxes, probs, p.conf_thresh, p.min_boxes, p.max_boxes, p.nms_thresh)
            boxes = cboxes[ids, labels]
            attr_feats = m.box_features(res4, boxes)  # the attribute head re-pools the regressed boxes (§7)
        else:
            select = {"butd": select_filter1, "fixed": select_filter1, "nms_filter0": select_filter0,
                      "nms_filter2": select_filter2}[p.name]
            nms_thresh = p.nms_thresh if p.name in ("butd", "fixed") else ROI_HEADS_NMS
            ids, labels, scores = select(props, probs, p.conf_thresh, p.min_boxes, p.max_boxes, nms_thresh)
            boxes = props[ids]
        feats = feats[ids]
        # regression ignored: the attribute head's res5 re-run on the same boxes gives the same numbers
        # (the goldens' det_rerun_feature_maxdiff is 0), so the features are reused, not recomputed
        attr = m.attr_logits(feats if attr_feats is None else attr_feats, labels)
        return {"boxes": to_original(boxes, wh, owh), "features": feats, "class_probs": probs[ids],
                "scores": scores, "labels": labels, "attr_probs": attr_distribution(attr)}

    def given(self, res4: Tensor, boxes: Tensor, wh, owh) -> dict[str, Tensor]:
        """§6d: features and classes of each box as given (scaled to the resized image, not clipped);
        attributes of the box clipped to [0, w-1] x [0, h-1]; label = best foreground class."""
        m = self.model
        (w, h), (W, H) = wh, owh
        rw, rh = float(w) / float(W), float(h) / float(H)
        scaled = boxes * rw if rw == rh else boxes * torch.tensor([rw, rh, rw, rh], device=boxes.device)
        feats = m.box_features(res4, scaled)
        probs = m.class_probs(feats)
        scores, labels = probs[:, 1:].max(1)
        labels = labels + 1
        attr = m.attr_logits(m.box_features(res4, clip_(scaled.clone(), w, h)), labels)
        return {"boxes": boxes, "features": feats, "class_probs": probs, "scores": scores, "labels": labels,
                "attr_probs": attr_distribution(attr)}


# ----------------------------------------------------------------------------- weights and build
@lru_cache(maxsize=4)
def reference_shapes(depths: tuple[int, int, int, int] = RELEASED_DEPTHS) -> dict[str, tuple[int, ...]]:
    """The checkpoint's names and shapes for this network at these depths (841 at the released ones), from a
    model on the meta device: nothing allocated."""
    with torch.device("meta"):
        model = VinVLDetector(depths)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def load_weights(path: str) -> tuple[dict[str, Tensor], dict]:
    """The family's load_weights: (tensors by name, {"sha256", "depths"}); vinvl_weights.read_checkpoint."""
    sd, sha, depths = read_checkpoint(path, reference_shapes)
    return sd, {"sha256": sha, "depths": depths}


def load_detector(path: str) -> tuple[VinVLDetector, str]:
    """The network with a checkpoint's weights, in eval mode, and the file's sha256."""
    sd, what = load_weights(path)
    model = VinVLDetector.empty(what["depths"])
    model.load_state_dict(sd, strict=True)  # both res5 names: equal values (checked), so either order is fine
    return model.eval(), what["sha256"]


def random_detector(seed: int = 0, depths=RELEASED_DEPTHS) -> VinVLDetector:
    """Seeded random weights (dry runs and tests only): He-uniform convs, identity-ish FrozenBN with the stem
    scaling 0..255 pixels down, small residual branches, small heads."""
    g = torch.Generator().manual_seed(seed)
    model = VinVLDetector.empty(depths)
    with torch.no_grad():
        for name, t in model.state_dict(keep_vars=True).items():
            if name.endswith("cell_anchors.0") or name.startswith("attribute.feature_extractor."):
                continue  # the anchors are set; the attribute res5 is the box head's
            leaf = name.rsplit(".", 1)[-1]
            if leaf in ("running_mean", "running_var"):
                t.fill_(0.0 if leaf == "running_mean" else 1.0)
            elif t.dim() >= 2:
                fan_in = t[0].numel()
                var = 1.0 if "cls_embedding" in name else (2.0 if t.dim() == 4 else 1.0) / fan_in
                gain = 0.1 if "bbox_pred" in name else 1.0  # boxes near their anchors / proposals
                t.copy_((torch.rand(t.shape, generator=g) * 2 - 1) * math.sqrt(3 * var) * gain)
            elif leaf == "weight" and t.dim() == 1 and "predictor" not in name and "rpn" not in name:  # FrozenBN
                t.fill_(1 / 80 if "stem" in name else 0.2 if ".bn3" in name else 1.0)
            else:
                t.copy_((torch.rand(t.shape, generator=g) * 2 - 1) * 0.1)
    return model.eval()


def build(spec, **_overrides) -> tuple[VinVLDetector, list[str], dict]:
    """The family's build (--detector vinvl_x152c4): (model, 1595 class names with background at 0, what
    the metadata records). spec.weights: the .pth path or "none" (seeded random, dry runs only);
    spec.labelmap: the label map JSON (names), checked against the checkpoint's counts before any image."""
    labelmap = getattr(spec, "labelmap", None)
    if labelmap is not None:  # a bad label map fails before the 600 MB checkpoint is read
        classes, attrs = read_labelmap(labelmap, NUM_CLASSES - 1, NUM_ATTRS - 1)
    needs = f"the released checkpoint as a local file, --weights PATH.pth: {PUBLISHED}"
    model, source, file_sha = local_or_random(spec, NAME, random_detector, load_detector, needs)
    if labelmap is None:  # names by index: the label map gives the real ones
        classes = [f"vg_class_{i}" for i in range(1, NUM_CLASSES)]
        attrs = [f"vg_attribute_{i}" for i in range(1, NUM_ATTRS)]
    model.transform = VinVLTransform(spec.min_size or 600, spec.max_size or 1000)
    model.attribute_names = list(attrs)
    info = {
        "detector": f"{NAME} (VinVL ResNeXt-152 32x8d C4 AttrRCNN, Visual Genome, scene_graph_benchmark "
                    "vinvl_x152c4.yaml; regionbert.extract.vinvl)",
        "torchvision": torchvision.__version__,
        "weights": source,
        "weights_digest": weights_digest(model),
        "weights_file_sha256": file_sha,
        "depths": list(model.depths),
        "labelmap": None if labelmap is None else os.path.abspath(labelmap),
        "labelmap_sha256": None if labelmap is None else _sha256(labelmap),
        "min_size": model.transform.min_size,
        "max_size": model.transform.max_size,
        "input": "RGB PIL bilinear resize (longer side truncated), /255, BGR * 255, minus pixel means; never "
                 "padded: images of one resized shape share a backbone pass",
        "pixel_mean_bgr": list(PIXEL_MEAN_BGR),
        "feature": "mean of res5 (stride 2) over ROIAlign 14x14 (aligned=False) on res4: 2048-d",
        "class_probs": "softmax over 1595, background at index 0 (the model's own order)",
        "attr_probs": "softmax over the attribute logits 1..524 (index 0, no attribute, dropped before it): 524 "
                      "wide, before the original's 0.05 threshold; index a = attribute_names[a] (model index a + 1)",
        "names": "from the label map" if labelmap is not None else "placeholders vg_class_i / vg_attribute_i "
                 "(model index i); pass --labelmap VG-SGG-dicts-vgoi6-clipped.json for the names",
    }
    return model, ["__background__", *classes], info


def _sha256(path: str) -> str:
    import hashlib

    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ----------------------------------------------------------------------------- the family's interface
def image_input(model: VinVLDetector) -> ImageInput:
    """The original's transform; size_divisible 1: only images of the exact same resized shape share a pass."""
    return ImageInput(model.transform.prepare, 1)


FAMILY = Family(
    name="vinvl", detectors=(NAME,), policies=VINVL_POLICIES, default_sizes={NAME: (600, 1000)}, build=build,
    load_weights=load_weights, image_input=image_input, layout=feature_layout, box_policy=VinVLPolicy,
    region_extractor=VinVLExtractor, autocast=False)

__all__ = ["FAMILY", "VinVLDetector", "VinVLExtractor", "VinVLPolicy", "VinVLTransform", "WeightsError", "build",
           "load_detector", "load_weights", "random_detector", "reference_shapes", "resized_wh"]
