"""The bottom-up-attention Visual Genome detector (Anderson et al. 2018) in plain torch/torchvision.

Reproduces py-bottom-up-attention's "R101-C4 caffemaxpool" Faster R-CNN with its attribute head
(configs/VG-Detection/faster_rcnn_R_101_C4_attr_caffemaxpool.yaml) from the published detectron2-format
weights `faster_rcnn_from_caffe_attr.pkl` (or `faster_rcnn_from_caffe.pkl`, no attribute head), without
detectron2 or Caffe (the .pkl is read by extract/butd_weights.py, which runs nothing in it). Every
stage follows the parity kit's SPEC.md (section numbers below):

  image (BGR uint8) -> PIL bilinear resize, shortest side 600 / longest 1000 (§2)
  -> R101 stem with the Caffe max-pool, res2..res4, stride in the 1x1 conv, FrozenBN (§3)
  -> RPN on res4: 12 anchors/position, top 6000 by logit, NMS 0.7, 300 proposals, no sigmoid (§4)
  -> RoIPool 14x14 on res4 (§5) -> res5 per region, dilation 2, stride 1 -> mean -> 2048-d (§6)
  -> 1601-way classifier (background LAST, index 1600), per-class box deltas, attribute head (§7)
  -> box selection: max-confidence 10..100 (caffe generate_tsv), fixed K (LXMERT's 36), the attribute
     notebook's 36 regressed boxes, or given boxes (§8).

Output convention for shards: class distributions are stored with background at index 0 (the shard
format's rule), i.e. stored index = (original index + 1) % 1601: original class c (0..1599) is stored at
c + 1 and original background 1600 at 0. Attribute distributions are the 400-way softmax over the first
400 attribute logits (the 401st, "no attribute", is dropped before the softmax, as both reference
notebooks do); stored index a is attribute a of attributes_vocab.txt.

Batching: images are never padded. Padding a C4 network changes results (bench/README.md): zero padding
after mean subtraction is not each conv's own zero padding once a FrozenBN has added its bias, the
receptive field of res4 covers the whole image, so every res4 value moves (by up to 4.7 on a kit image
padded 8 x 100 px) and a quarter of the proposals change. Stacking images of one resized shape (no padding)
gave bit-identical res4 at 600x800 but not at 32x48 (CPU kernels are chosen by batch and shape), so each
image gets its own backbone pass; the regions of an image run as one batch, as in the reference.
"""

from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import Tensor, nn
from torchvision.models.resnet import Bottleneck
from torchvision.ops import batched_nms, nms, roi_pool

from .butd_weights import (
    NAME,
    WeightsError,
    has_attribute_head,
    local_to_reference,
    name_mismatch,
    read_pickle,
    reference_to_local,
)
from .detector import Family, ImageInput, feature_layout, local_or_random, weights_digest
from .policies import BoxPolicy

NUM_CLASSES = 1600  # foreground; the classifier has 1601 outputs, background last
NUM_ATTRS = 400  # the attribute head has 401 outputs, "no attribute" last
PIXEL_MEAN_BGR = (102.9801, 115.9465, 122.7717)  # yaml l.4; PIXEL_STD is 1
ANCHOR_SIZES = (64, 128, 256, 512)
ANCHOR_RATIOS = (0.5, 1.0, 2.0)
STRIDE = 16
RPN_PRE_NMS, RPN_POST_NMS, RPN_NMS = 6000, 300, 0.7
BOX_WEIGHTS = (10.0, 10.0, 5.0, 5.0)
SCALE_CLAMP = math.log(1000.0 / 16)
VOCAB_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "butd_vocab")


# ----------------------------------------------------------------------------- weights file (butd_weights.py reads it)
@functools.lru_cache(maxsize=2)
def reference_shapes(attributes: bool = True) -> dict[str, tuple[int, ...]]:
    """The checkpoint's names and shapes for this network (SPEC.md §10; 536 with the attribute head),
    from a model on the meta device: no storage is allocated."""
    with torch.device("meta"):
        model = BUTDDetector(attributes)
    return {local_to_reference(k): tuple(v.shape) for k, v in model.state_dict().items()}


def _expected_shapes(model: dict) -> dict[str, tuple[int, ...]]:
    """The table to check against: with the attribute head if the file has its last layer, else without."""
    return reference_shapes(has_attribute_head(model))


def read_weights(path: str, shapes: dict[str, tuple[int, ...]] | None = None) -> tuple[dict[str, np.ndarray], str]:
    """A detectron2-format .pkl ({"model": {name: ndarray}, ...}) -> (float32 arrays by name, sha256 of the
    file). Never executes anything the file names (see butd_weights._ArrayUnpickler). Every entry's name, shape and
    dtype is checked against `shapes` (default: this network's, with or without the attribute head)
    before anything is converted, the file and its arrays may take no more than the network at float64,
    and a NaN or infinite weight is refused naming its tensor. float16/float64 tensors are converted to
    float32 with a warning that says how many."""
    if shapes is not None:
        return read_pickle(path, shapes, lambda _: shapes)
    return read_pickle(path, reference_shapes(True), _expected_shapes)


# ----------------------------------------------------------------------------- preprocessing (§2)
def resized_hw(h: int, w: int, min_size: int = 600, max_size: int = 1000) -> tuple[int, int]:
    """detectron2's ResizeShortestEdge target size, in Python float64 arithmetic, rounded half up."""
    scale = min_size / min(h, w)
    newh, neww = (min_size, scale * w) if h < w else (scale * h, min_size)
    if max(newh, neww) > max_size:
        s = max_size / max(newh, neww)
        newh, neww = newh * s, neww * s
    return int(newh + 0.5), int(neww + 0.5)


def resize_bgr(bgr: np.ndarray, min_size: int = 600, max_size: int = 1000) -> np.ndarray:
    """(H, W, 3) uint8 BGR -> resized uint8 BGR with PIL bilinear, exactly as the reference."""
    newh, neww = resized_hw(bgr.shape[0], bgr.shape[1], min_size, max_size)
    return np.asarray(Image.fromarray(np.ascontiguousarray(bgr)).resize((neww, newh), Image.BILINEAR))


def to_input(bgr_resized: np.ndarray) -> Tensor:
    """(h, w, 3) uint8 BGR -> (3, h, w) float32 minus the pixel means (values 0..255, std 1)."""
    x = torch.from_numpy(np.ascontiguousarray(bgr_resized.transpose(2, 0, 1))).float()
    return x - torch.tensor(PIXEL_MEAN_BGR, dtype=torch.float32).view(3, 1, 1)


@dataclass
class BUTDTransform:
    """What a DataLoader worker does to one decoded image (RGB uint8, as extract.images decodes it)."""

    min_size: int = 600
    max_size: int = 1000

    def prepare(self, rgb: np.ndarray) -> Tensor:
        return to_input(resize_bgr(rgb[:, :, ::-1], self.min_size, self.max_size))


# ----------------------------------------------------------------------------- network (§3-§7)
class FrozenBN(nn.Module):
    """detectron2's FrozenBatchNorm2d at inference: F.batch_norm with fixed statistics, eps 1e-5 (not folded
    into scale/shift as torchvision.ops.FrozenBatchNorm2d does: that differs in the last bits)."""

    def __init__(self, n: int):
        super().__init__()
        for k, v in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(k, torch.full((n,), v))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, 1e-5)


def caffe_bottleneck(cin: int, width: int, stride: int = 1, dilation: int = 1) -> Bottleneck:
    """torchvision's Bottleneck with the stride moved to conv1 (MSRA/Caffe style, STRIDE_IN_1X1) and a
    projection shortcut when the channel count changes. Output channels: 4 * width."""
    cout = 4 * width
    down = None
    if cin != cout:
        down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), FrozenBN(cout))
    block = Bottleneck(cin, width, stride=1, downsample=down, dilation=dilation, norm_layer=FrozenBN)
    block.conv1.stride = (stride, stride)  # conv2 (3x3) keeps stride 1, padding = dilation
    return block


def stage(cin: int, width: int, blocks: int, stride: int, dilation: int = 1) -> nn.Sequential:
    layers = [caffe_bottleneck(cin, width, stride, dilation)]
    layers += [caffe_bottleneck(4 * width, width, 1, dilation) for _ in range(blocks - 1)]
    return nn.Sequential(*layers)


def cell_anchors() -> Tensor:
    """(12, 4) anchors centred at 0, size-major / ratio-minor, float64 math stored as float32, not rounded."""
    out = []
    for size in ANCHOR_SIZES:
        for ratio in ANCHOR_RATIOS:
            w = math.sqrt(size * size / ratio)
            h = ratio * w
            out.append([-w / 2.0, -h / 2.0, w / 2.0, h / 2.0])
    return torch.tensor(out, dtype=torch.float32)


def decode(deltas: Tensor, boxes: Tensor, weights=(1.0, 1.0, 1.0, 1.0)) -> Tensor:
    """detectron2 Box2BoxTransform.apply_deltas, op for op: deltas (R, 4k) against boxes (R, 4) -> (R, 4k)."""
    deltas = deltas.float()
    boxes = boxes.to(deltas.dtype)
    widths = boxes[:, 2] - boxes[:, 0]
    heights = boxes[:, 3] - boxes[:, 1]
    ctr_x = boxes[:, 0] + 0.5 * widths
    ctr_y = boxes[:, 1] + 0.5 * heights
    wx, wy, ww, wh = weights
    dx = deltas[:, 0::4] / wx
    dy = deltas[:, 1::4] / wy
    dw = torch.clamp(deltas[:, 2::4] / ww, max=SCALE_CLAMP)
    dh = torch.clamp(deltas[:, 3::4] / wh, max=SCALE_CLAMP)
    pcx = dx * widths[:, None] + ctr_x[:, None]
    pcy = dy * heights[:, None] + ctr_y[:, None]
    pw = torch.exp(dw) * widths[:, None]
    ph = torch.exp(dh) * heights[:, None]
    out = torch.zeros_like(deltas)
    out[:, 0::4] = pcx - 0.5 * pw
    out[:, 1::4] = pcy - 0.5 * ph
    out[:, 2::4] = pcx + 0.5 * pw
    out[:, 3::4] = pcy + 0.5 * ph
    return out


def clip_(boxes: Tensor, h: int, w: int) -> Tensor:
    """In place, detectron2 Boxes.clip: x to [0, w], y to [0, h]."""
    boxes[:, 0].clamp_(min=0, max=w)
    boxes[:, 1].clamp_(min=0, max=h)
    boxes[:, 2].clamp_(min=0, max=w)
    boxes[:, 3].clamp_(min=0, max=h)
    return boxes


@dataclass
class RegionOutputs:
    """Per-region outputs of the ROI head for R boxes (reference order: class index 1600 = background)."""

    features: Tensor  # (R, 2048) mean-pooled res5
    cls_logits: Tensor  # (R, 1601)
    class_probs: Tensor  # (R, 1601) softmax over all
    deltas: Tensor  # (R, 6400) per-class box deltas
    attr_logits: Tensor | None  # (R, 401)
    attr_probs: Tensor | None  # (R, 400) softmax over the first 400 logits


class BUTDDetector(nn.Module):
    """The network. Parameter names are torchvision-style; `load_reference_state` maps the checkpoint's."""

    def __init__(self, attributes: bool = True):
        super().__init__()
        self.attributes = attributes
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False), FrozenBN(64), nn.ReLU(),
                                  nn.MaxPool2d(3, stride=2, padding=0, ceil_mode=True))  # the Caffe max-pool
        self.res2 = stage(64, 64, 3, 1)
        self.res3 = stage(256, 128, 4, 2)
        self.res4 = stage(512, 256, 23, 2)
        self.rpn_conv = nn.Conv2d(1024, 512, 3, padding=1)
        self.rpn_logits = nn.Conv2d(512, 12, 1)
        self.rpn_deltas = nn.Conv2d(512, 48, 1)
        self.register_buffer("cell_anchors", cell_anchors())
        self.res5 = stage(1024, 512, 3, 1, dilation=2)  # RES5HALVE False: stride 1, dilation 2 in all blocks
        self.cls_score = nn.Linear(2048, NUM_CLASSES + 1)
        self.bbox_pred = nn.Linear(2048, 4 * NUM_CLASSES)
        if attributes:
            self.cls_embedding = nn.Embedding(NUM_CLASSES + 1, 256)
            self.fc_attr = nn.Linear(2048 + 256, 512)
            self.attr_score = nn.Linear(512, NUM_ATTRS + 1)
        self.transform = BUTDTransform()  # what extract.pipeline's workers call (prepare)
        self.feature_dim = 2048
        self.attribute_names: list[str] | None = None  # set by build_butd
        self.eval()

    @classmethod
    def empty(cls, attributes: bool = True) -> BUTDDetector:
        """Uninitialised storage (no 65M-value random init): for loading weights into. Anchors are set."""
        with torch.device("meta"):
            model = cls(attributes)
        model.to_empty(device="cpu")
        model.cell_anchors.copy_(cell_anchors())
        return model

    # --- backbone and RPN (one image) -------------------------------------------------------
    def backbone(self, x: Tensor) -> Tensor:
        """(1, 3, h, w) -> res4 (1, 1024, ceil(h/16)-ish, ...)."""
        return self.res4(self.res3(self.res2(self.stem(x))))

    def rpn_maps(self, res4: Tensor) -> tuple[Tensor, Tensor]:
        t = F.relu(self.rpn_conv(res4))
        return self.rpn_logits(t), self.rpn_deltas(t)  # (1, 12, Hf, Wf), (1, 48, Hf, Wf)

    def anchors(self, hf: int, wf: int) -> Tensor:
        """(Hf*Wf*12, 4): index (y*Wf + x)*12 + a."""
        dev = self.cell_anchors.device
        sx = torch.arange(0, wf * STRIDE, step=STRIDE, dtype=torch.float32, device=dev)
        sy = torch.arange(0, hf * STRIDE, step=STRIDE, dtype=torch.float32, device=dev)
        yy, xx = torch.meshgrid(sy, sx, indexing="ij")
        xx, yy = xx.reshape(-1), yy.reshape(-1)
        shifts = torch.stack((xx, yy, xx, yy), dim=1)
        return (shifts.view(-1, 1, 4) + self.cell_anchors.view(1, -1, 4)).reshape(-1, 4)

    def proposals(self, res4: Tensor, image_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
        """res4 of one image -> (P, 4) proposals in resized pixels, (P,) logits, best first (P <= 300)."""
        logits_map, deltas_map = self.rpn_maps(res4)
        _, _, hf, wf = logits_map.shape
        logits = logits_map.permute(0, 2, 3, 1).reshape(-1)
        deltas = deltas_map.view(1, 12, 4, hf, wf).permute(0, 3, 4, 1, 2).reshape(-1, 4)
        boxes = decode(deltas, self.anchors(hf, wf))
        logits, idx = logits.sort(descending=True)
        k = min(RPN_PRE_NMS, logits.numel())
        logits, boxes = logits[:k], boxes[idx[:k]]
        clip_(boxes, *image_hw)
        keep = ((boxes[:, 2] - boxes[:, 0]) > 0) & ((boxes[:, 3] - boxes[:, 1]) > 0)
        boxes, logits = boxes[keep], logits[keep]
        keep = nms(boxes, logits, RPN_NMS)[:RPN_POST_NMS]
        boxes, logits = boxes[keep], logits[keep]
        order = logits.sort(descending=True)[1]
        return boxes[order], logits[order]

    # --- ROI head ---------------------------------------------------------------------------
    def pool(self, res4: Tensor, boxes: Tensor) -> Tensor:
        """RoIPool 14x14 at 1/16 on res4 of one image: (R, 4) resized px -> (R, 1024, 14, 14)."""
        return roi_pool(res4, [boxes.to(res4.dtype)], output_size=14, spatial_scale=1.0 / STRIDE)

    def predict(self, features: Tensor) -> RegionOutputs:
        """(R, 2048) pooled features -> classifier, box deltas and attribute head."""
        cls_logits = self.cls_score(features)
        deltas = self.bbox_pred(features)
        attr_logits = attr_probs = None
        if self.attributes:
            emb = self.cls_embedding(cls_logits.argmax(dim=1))  # background (1600) included
            h = F.relu(self.fc_attr(torch.cat([features, emb], dim=1)))
            attr_logits = self.attr_score(h)
            attr_probs = F.softmax(attr_logits[:, :-1], dim=-1)  # drop "no attribute", then softmax
        return RegionOutputs(features, cls_logits, F.softmax(cls_logits, dim=-1), deltas, attr_logits, attr_probs)

    def regions(self, res4: Tensor, boxes: Tensor, chunk: int = 0) -> RegionOutputs:
        """Pool, res5, mean, predict for (R, 4) boxes in resized px. chunk > 0 runs res5 that many
        regions at a time (less memory; conv results per region do not depend on the batch on CPU)."""
        if len(boxes) == 0:
            return self.predict(res4.new_zeros((0, 2048)))
        parts = [boxes] if chunk <= 0 else boxes.split(chunk)
        feats = torch.cat([self.res5(self.pool(res4, b)).mean(dim=[2, 3]) for b in parts])
        return self.predict(feats)

    # --- weights ----------------------------------------------------------------------------
    def load_reference_state(self, arrays: dict[str, np.ndarray], source: str = "weights") -> None:
        """Load detectron2 names (backbone.res4.3.conv2.norm.weight, ...) strictly: every parameter of
        this network must be present with its shape; names the network lacks are an error too."""
        own = self.state_dict()
        mapped, unknown = {}, []
        for k, v in arrays.items():
            name = reference_to_local(k)
            if name is None or name not in own:
                unknown.append(k)
            else:
                mapped[name] = v
        missing = sorted(set(own) - set(mapped))
        if missing or unknown:
            raise WeightsError(f"{source}: not a bottom-up-attention R101-C4 checkpoint "
                               f"({'with' if self.attributes else 'without'} attributes): "
                               f"{name_mismatch([local_to_reference(m) for m in missing], unknown)}")
        for name, v in mapped.items():
            if tuple(v.shape) != tuple(own[name].shape):
                raise WeightsError(f"{source}: {local_to_reference(name)} has shape {tuple(v.shape)}, "
                                   f"expected {tuple(own[name].shape)}")
        self.load_state_dict({k: torch.from_numpy(v) for k, v in mapped.items()}, strict=True)


def load_detector(path: str) -> tuple[BUTDDetector, str]:
    """The network with the weights of a .pkl, in eval mode, and the file's sha256."""
    arrays, digest = read_weights(path)
    model = BUTDDetector.empty(attributes=has_attribute_head(arrays))
    model.load_reference_state(arrays, path)
    return model.eval(), digest


def random_detector(seed: int = 0, attributes: bool = True) -> BUTDDetector:
    """Seeded random weights (dry runs and tests): He-uniform convs, small heads, identity-ish FrozenBN."""
    g = torch.Generator().manual_seed(seed)
    model = BUTDDetector.empty(attributes)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name == "cell_anchors":
                continue
            if name.split(".")[-1] in ("running_mean", "running_var"):
                t.fill_(0.0 if name.endswith("mean") else 1.0)
                continue
            if t.dim() >= 2:
                fan_in = t[0].numel()
                var = 1.0 if name == "cls_embedding.weight" else (2.0 if t.dim() == 4 else 1.0) / fan_in
                gain = 0.1 if name.startswith("rpn_deltas") else 1.0  # small deltas: proposals near the anchors
                t.copy_((torch.rand(t.shape, generator=g) * 2 - 1) * math.sqrt(3 * var) * gain)
            elif name.endswith(".weight") and ("bn" in name or "stem.1" in name or "downsample.1" in name):
                # pixels are 0..255: the stem's norm scales them to ~1; residual branches small; finite to res4
                t.fill_(0.01 if name.startswith("stem") else 0.2 if ".bn3." in name else 1.0)
            else:
                t.copy_((torch.rand(t.shape, generator=g) * 2 - 1) * 0.1)
    return model.eval()


# ----------------------------------------------------------------------------- vocabularies
def read_vocab(path: str) -> list[str]:
    """One name per line; py-bottom-up-attention uses the first comma-separated synonym."""
    with open(path) as f:
        return [line.strip().split(",")[0] for line in f if line.strip()]


def class_names() -> list[str]:
    """1601 names in the shard's order: "__background__" at 0, then the 1600 VG objects."""
    return ["__background__", *read_vocab(os.path.join(VOCAB_DIR, "objects_vocab.txt"))]


def attribute_names() -> list[str]:
    """The 400 VG attributes, in the order of the stored attr_probs."""
    return read_vocab(os.path.join(VOCAB_DIR, "attributes_vocab.txt"))


def to_shard_order(probs: Tensor) -> Tensor:
    """(R, 1601) with background last -> background first (stored index = (original + 1) % 1601)."""
    return torch.cat([probs[:, -1:], probs[:, :-1]], dim=1)


# ----------------------------------------------------------------------------- box selection (§8)
def max_conf(proposals: Tensor, class_probs: Tensor, nms_thresh: float = 0.3) -> Tensor:
    """bottom-up-attention generate_tsv.py:84-89: per foreground class, NMS over all proposals; each
    proposal's max_conf is its best score among the classes in which it survives. (R,) float32."""
    scores = class_probs[:, :NUM_CLASSES].float()
    boxes = proposals.float()
    best = torch.zeros(len(boxes), dtype=torch.float32, device=boxes.device)
    for c in range(scores.shape[1]):
        keep = nms(boxes, scores[:, c], nms_thresh)
        best[keep] = torch.maximum(best[keep], scores[keep, c])
    return best


def max_conf_select(conf: Tensor, conf_thresh: float = 0.2, min_boxes: int = 10, max_boxes: int = 100) -> np.ndarray:
    """generate_tsv.py:91-95, numpy for numpy: proposals with conf >= thresh in index order, else the
    top by numpy's argsort reversed when fewer than min_boxes or more than max_boxes pass."""
    c = conf.detach().cpu().numpy()
    keep = np.where(c >= conf_thresh)[0]
    if len(keep) < min_boxes:
        keep = np.argsort(c)[::-1][:min_boxes]
    elif len(keep) > max_boxes:
        keep = np.argsort(c)[::-1][:max_boxes]
    return keep


@dataclass
class NotebookSelection:
    ids: Tensor  # (K,) proposal index of each detection
    classes: Tensor  # (K,) 0..1599
    scores: Tensor  # (K,)
    boxes_resized: Tensor  # (K, 4) regressed, clipped, resized px
    nms_thresh: float
    counts: list[int]  # detections at each threshold tried


def notebook_select(proposals: Tensor, out: RegionOutputs, image_hw: tuple[int, int], num_objects: int = 36,
                    score_thresh: float = 0.2) -> NotebookSelection:
    """demo_feature_extraction_attr.ipynb's loop over fast_rcnn_inference_single_image: class-regressed
    boxes, per-class NMS at 0.5, 0.6, ... until exactly num_objects detections (else the last try)."""
    boxes = decode(out.deltas, proposals, BOX_WEIGHTS)  # (R, 6400)
    scores = out.class_probs[:, :-1]
    counts = []
    for t in np.arange(0.5, 1.0, 0.1):
        b = clip_(boxes.reshape(-1, 4).clone(), *image_hw).view(-1, NUM_CLASSES, 4)
        mask = scores > score_thresh
        inds = mask.nonzero()
        keep = batched_nms(b[mask], scores[mask], inds[:, 1], float(t))[:num_objects]
        sel = NotebookSelection(inds[keep, 0], inds[keep, 1], scores[mask][keep], b[mask][keep], float(t), counts)
        counts.append(len(keep))
        if len(keep) == num_objects:
            break
    return sel


def scale_boxes(boxes: Tensor, sx: float, sy: float) -> Tensor:
    """detectron2 Boxes.scale on a copy: x *= sx, y *= sy (float32)."""
    b = boxes.clone().float()
    b[:, 0::2] *= sx
    b[:, 1::2] *= sy
    return b


# ----------------------------------------------------------------------------- the extractor
BUTD_POLICIES = ("butd", "fixed", "notebook", "given")


@dataclass
class BUTDPolicy(BoxPolicy):
    """policies.BoxPolicy plus "notebook": py-bottom-up-attention's attribute notebook, K = max_boxes
    class-regressed detections (score > conf_thresh, per-class NMS 0.5, 0.6, ... until exactly K)."""

    def __post_init__(self):
        if self.name != "notebook":
            super().__post_init__()
        elif self.min_boxes != self.max_boxes or self.max_boxes < 1:
            raise ValueError("the notebook policy keeps K boxes: set min_boxes == max_boxes (e.g. 36)")

    def describe(self, model=None) -> dict:
        d = super().describe(model) if self.name != "notebook" else {
            "box_policy": "notebook", "boxes": "class_regressed",
            "thresholds": {"score_thresh": self.conf_thresh, "nms_thresh": "first of 0.5..0.9 giving K",
                           "boxes_per_image": self.max_boxes}}
        if self.name in ("butd", "fixed"):
            d["selection"] = "bottom-up-attention generate_tsv.py max-conf rule"
        return d


class BUTDExtractor:
    """BUTDDetector + a box policy -> per image: boxes (original px), features, class_probs (shard order,
    background at 0), attr_probs (400), scores, labels (shard order). Same call as torchvision_rcnn.RegionExtractor.

    Policies: butd (max-conf, conf_thresh, min..max boxes; boxes are the unregressed proposals), fixed
    (the same with min = max = K, LXMERT's 36), notebook (the attribute notebook's K regressed boxes),
    given (boxes supplied per image)."""

    def __init__(self, model: BUTDDetector, policy):
        if policy.name not in BUTD_POLICIES:
            raise ValueError(f"box policy {policy.name!r} does not apply to {NAME}; "
                             f"choose one of {', '.join(BUTD_POLICIES)}")
        self.model, self.policy = model.eval(), policy

    @torch.inference_mode()
    def __call__(self, images: list[Tensor], original_sizes: list[tuple[int, int]],
                 given_boxes: list[Tensor] | None = None) -> list[dict[str, Tensor]]:
        if self.policy.name == "given" and (given_boxes is None or len(given_boxes) != len(images)):
            raise ValueError("the 'given' policy needs one (N, 4) box tensor per image")
        if images and images[0].is_cuda:  # TF32 convolutions/matmuls would move features by ~1e-3
            torch.backends.cuda.matmul.allow_tf32 = False
            torch.backends.cudnn.allow_tf32 = False
        # one image per backbone pass: padding changes a C4 model's outputs, and even stacking images of
        # one shape is not bit-identical in general (CPU kernels are chosen by batch and shape)
        return [self.one(im, hw, None if given_boxes is None else given_boxes[i])
                for i, (im, hw) in enumerate(zip(images, original_sizes, strict=True))]

    def one(self, image: Tensor, original_hw: tuple[int, int], given: Tensor | None) -> dict[str, Tensor]:
        """image: (3, h, w) from BUTDTransform.prepare, on the model's device; given: (N, 4) original px."""
        m = self.model
        hw = (int(image.shape[-2]), int(image.shape[-1]))
        res4 = m.backbone(image[None].float())
        if self.policy.name == "given":
            (H, W), (h, w) = original_hw, hw
            boxes = scale_boxes(given.to(res4.device, torch.float32), w / W, h / H)  # not clipped, as the notebook
        else:
            boxes, _ = m.proposals(res4, hw)
        return self.select(boxes, m.regions(res4, boxes), hw, original_hw, given)

    def select(self, boxes: Tensor, out: RegionOutputs, hw: tuple[int, int], original_hw: tuple[int, int],
               given: Tensor | None = None) -> dict[str, Tensor]:
        """The policy's boxes from the ROI head's outputs for (R, 4) boxes (proposals or scaled given
        boxes, resized px) of an image resized from original_hw to hw."""
        p, (h, w), (H, W) = self.policy, hw, original_hw
        if p.name == "given":
            idx = torch.arange(len(boxes), device=boxes.device)
            kept = given.to(boxes.device, torch.float32)
        elif p.name == "notebook":
            sel = notebook_select(boxes, out, hw, p.max_boxes, p.conf_thresh)
            idx = sel.ids
            kept = clip_(scale_boxes(sel.boxes_resized, W / w, H / h), H, W)
        else:  # butd, fixed: the unregressed proposals, as caffe's generate_tsv.py
            conf = max_conf(boxes, out.class_probs, p.nms_thresh)
            idx = torch.from_numpy(max_conf_select(conf, p.conf_thresh, p.min_boxes, p.max_boxes).copy())
            idx = idx.to(boxes.device)
            kept = scale_boxes(boxes[idx], W / w, H / h)
        probs = to_shard_order(out.class_probs[idx])
        scores, labels = probs[:, 1:].max(1)
        r = {"boxes": kept, "features": out.features[idx], "class_probs": probs, "scores": scores,
             "labels": labels + 1}
        if out.attr_probs is not None:
            r["attr_probs"] = out.attr_probs[idx]
        return r


# ----------------------------------------------------------------------------- regionbert-extract entry
PUBLISHED = ("faster_rcnn_from_caffe_attr.pkl (with attributes) or faster_rcnn_from_caffe.pkl, from "
             "https://nlp1.cs.unc.edu/models/ (py-bottom-up-attention's README)")


def build_butd(spec, **_overrides) -> tuple[BUTDDetector, list[str], dict]:
    """The family's build (extract.families.build_detector for --detector butd_r101_vg): (model, 1601 class
    names with background at 0, what to record). spec.weights: a .pkl path, or "none" (seeded random
    weights, dry runs only). Keyword overrides are torchvision builder settings: ignored here, as before the
    families were split."""
    needs = f"the published checkpoint as a local file, --weights PATH.pkl: {PUBLISHED}"
    model, source, file_sha = local_or_random(spec, NAME, random_detector, load_detector, needs)
    model.transform = BUTDTransform(spec.min_size or 600, spec.max_size or 1000)
    model.attribute_names = attribute_names() if model.attributes else None
    info = {
        "detector": f"{NAME} (py-bottom-up-attention R101-C4 caffemaxpool, Visual Genome, regionbert.extract.butd)",
        "torchvision": torchvision.__version__,
        "weights": source,
        "weights_digest": weights_digest(model),
        "weights_file_sha256": file_sha,
        "min_size": model.transform.min_size,
        "max_size": model.transform.max_size,
        "input": "BGR 0..255 minus pixel means, PIL bilinear resize, one image per forward (no padding)",
        "pixel_mean_bgr": list(PIXEL_MEAN_BGR),
        "rpn_pre_nms_top_n": RPN_PRE_NMS,
        "rpn_post_nms_top_n": RPN_POST_NMS,
        "rpn_nms_thresh": RPN_NMS,
        "feature": "mean of res5 (dilation 2) over RoIPool 14x14 on res4: 2048-d",
        "class_probs": "softmax over 1601; the original's background (index 1600) is stored at 0, class c at c + 1",
        "attr_probs": (None if not model.attributes else
                       "softmax over the first 400 attribute logits (the 401st, no-attribute, dropped); index a = "
                       "attribute_names[a]"),
    }
    return model, class_names(), info


# ----------------------------------------------------------------------------- the family's interface
def image_input(model: BUTDDetector) -> ImageInput:
    """BGR, PIL resize, pixel means (BUTDTransform.prepare); never batched with other images (see above)."""
    return ImageInput(model.transform.prepare, None)


FAMILY = Family(
    name="butd", detectors=(NAME,), policies=BUTD_POLICIES, default_sizes={NAME: (600, 1000)}, build=build_butd,
    load_weights=read_weights, image_input=image_input, layout=feature_layout, box_policy=BUTDPolicy,
    region_extractor=BUTDExtractor, autocast=False)
