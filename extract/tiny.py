"""`tiny_shapes`: torchvision's FasterRCNN class around a small backbone of our own, for the quickstart.

The standard builders (ResNet-50 / MobileNet-v3 backbones) need pretrained weights or hours to learn
anything; this one learns the quickstart's coloured shapes from random initialisation in a minute or
two on two CPU cores (`--optimizer adamw`). It is a plain `torchvision.models.detection.FasterRCNN`
(same RPN, RoIAlign, box head and predictor interfaces), so extraction, fine-tuning and checkpoints treat
it like any other builder: `regionbert-detector finetune --detector tiny_shapes`, `regionbert-extract --weights CKPT`.
"""

from __future__ import annotations

from torch import nn
from torchvision.models.detection import FasterRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.ops import MultiScaleRoIAlign

# per stage; each stage halves the resolution: stride 8 at the end. At stride 16 a 40-pixel shape covers 2-3
# cells: trained to classify the shapes' own boxes, held-out accuracy after 150 steps was 0.59, at 8 0.87
CHANNELS = (16, 32, 64)
FEATURE_DIM = 256  # the box head's output: each region's feature in the shard


def _stage(cin: int, cout: int) -> nn.Sequential:
    # GroupNorm, not BatchNorm: small batches, and train/eval behave the same after a short run
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.GroupNorm(8, cout),
                         nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                         nn.GroupNorm(8, cout), nn.ReLU(inplace=True))


class TinyBackbone(nn.Sequential):
    """(B, 3, H, W) -> (B, 64, H/8, W/8)."""

    def __init__(self):
        chans = (3, *CHANNELS)
        super().__init__(*[_stage(a, b) for a, b in zip(chans[:-1], chans[1:], strict=True)])
        self.out_channels = CHANNELS[-1]


def fasterrcnn_tiny_shapes(weights=None, weights_backbone=None, num_classes: int = 91, progress: bool = True,
                           **kwargs) -> FasterRCNN:
    """A Faster R-CNN with a 3-stage, 64-channel backbone (stride 8), one feature map, anchors of 32 to
    128 pixels, a 256-d box head. Same signature as torchvision's builders; it has no pretrained weights."""
    if weights is not None or weights_backbone is not None:
        raise ValueError("tiny_shapes has no pretrained weights: start from none, or load a fine-tuned checkpoint")
    settings = dict(min_size=168, max_size=224,  # the quickstart's images (224 x 168) as they are
                    rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
                    rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=100,
                    # a few objects per image: 8 RoIs, up to half of them positive. With 64 (a quarter
                    # positive) the class signal drowns among background RoIs: on held-out shapes the head
                    # named 0.13 right after 200 AdamW steps, against 0.27 with 8 (0.47 after 400)
                    box_batch_size_per_image=8, box_positive_fraction=0.5)
    settings.update(kwargs)
    anchors = AnchorGenerator(sizes=((32, 64, 128),), aspect_ratios=((0.5, 1.0, 2.0),))
    pool = MultiScaleRoIAlign(featmap_names=["0"], output_size=7, sampling_ratio=1)
    head = TwoMLPHead(CHANNELS[-1] * 7 * 7, FEATURE_DIM)
    return FasterRCNN(TinyBackbone(), num_classes=None, rpn_anchor_generator=anchors, box_roi_pool=pool,
                      box_head=head, box_predictor=FastRCNNPredictor(FEATURE_DIM, num_classes), **settings)
