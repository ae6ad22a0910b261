"""Masked region classification: name a hidden region's class (a hard label).

The target is the detector's most likely class other than background (UNITER): a region the detector
thought was background is still some object's piece, and "background" teaches nothing.

The classifier (UNITER's RegionClassification: Linear, GELU, LayerNorm, Linear) is shared with MRC-kl
by default, as in UNITER; model.shared_region_classifier = false gives each task its own.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import EncoderOutput, ModelConfig, RegionBert
from .common import no_loss, transform


def hard_labels(class_probs: torch.Tensor) -> torch.Tensor:
    """(M, C) detector distributions, background at 0 -> (M,) argmax over classes 1..C-1."""
    return class_probs[:, 1:].argmax(dim=-1) + 1


class RegionClassifier(nn.Module):
    """(M, hidden) region outputs -> (M, num_classes) logits."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.transform = transform(cfg)
        self.classify = nn.Linear(cfg.hidden_size, cfg.num_classes)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.classify(self.transform(h))


class MRCHead(nn.Module):
    def __init__(self, cfg: ModelConfig, encoder: RegionBert | None = None, classifier: RegionClassifier | None = None):
        super().__init__()
        self.classifier = classifier or RegionClassifier(cfg)

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # (M, hidden) -> (M, num_classes)
        return self.classifier(h)

    def forward(self, out: EncoderOutput, batch: dict) -> dict:
        masked = batch["region_mask"]  # (B, N) bool
        if not masked.any():
            return {"mrc": no_loss(out)}
        return {"mrc": F.cross_entropy(self.logits(out.regions[masked]), hard_labels(batch["class_probs"][masked]))}
