"""Masked region classification with KL divergence: match the detector's whole class distribution.

A soft label keeps what the detector was unsure about (UNITER's best MRM variant). Background is
part of the distribution here.
"""

import torch.nn as nn
import torch.nn.functional as F

from ..model import EncoderOutput, ModelConfig
from .common import no_loss, transform


class MRCKLHead(nn.Module):
    def __init__(self, cfg: ModelConfig, word_embeddings: nn.Embedding | None = None):
        super().__init__()
        self.transform = transform(cfg)
        self.classify = nn.Linear(cfg.hidden_size, cfg.num_classes)

    def logits(self, h):  # (M, C_hidden) -> (M, num_classes)
        return self.classify(self.transform(h))

    def forward(self, out: EncoderOutput, batch: dict) -> dict:
        masked = batch["region_mask"]  # (B, N) bool
        if not masked.any():
            return {"mrc_kl": no_loss(out)}
        log_q = F.log_softmax(self.logits(out.regions[masked]).float(), dim=-1)  # (M, num_classes)
        p = batch["class_probs"][masked].float()  # (M, num_classes) the detector's distribution
        # KL(p || q), averaged over masked regions
        return {"mrc_kl": F.kl_div(log_q, p, reduction="batchmean")}
