"""Masked region classification with KL divergence: match the detector's whole class distribution.

A soft label keeps what the detector was unsure about (UNITER's best MRM variant). Background is
part of the distribution here, as in UNITER. The loss is UNITER's: F.kl_div(..., reduction='none')
averaged over masked regions x classes (pretrain.py's loss.mean()), so it is num_classes times smaller
than a per-region ("batchmean") KL.
"""

import torch.nn as nn
import torch.nn.functional as F

from ..model import EncoderOutput, ModelConfig, RegionBert
from .common import no_loss
from .mrc import RegionClassifier


class MRCKLHead(nn.Module):
    def __init__(self, cfg: ModelConfig, encoder: RegionBert | None = None, classifier: RegionClassifier | None = None):
        super().__init__()
        self.classifier = classifier or RegionClassifier(cfg)

    def logits(self, h):  # (M, hidden) -> (M, num_classes)
        return self.classifier(h)

    def forward(self, out: EncoderOutput, batch: dict) -> dict:
        masked = batch["region_mask"]  # (B, N) bool
        if not masked.any():
            return {"mrc_kl": no_loss(out)}
        log_q = F.log_softmax(self.logits(out.regions[masked]).float(), dim=-1)  # (M, num_classes)
        p = batch["class_probs"][masked].float()  # (M, num_classes) the detector's distribution
        # KL(p || q) per region and class, averaged over both (UNITER)
        return {"mrc_kl": F.kl_div(log_q, p, reduction="none").mean()}
