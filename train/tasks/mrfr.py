"""Masked region feature regression: reconstruct a hidden region's original feature (L2).

The model saw zeros instead of the feature of each region in region_mask (B, N); a linear map of its
output must give back the original feature, batch["features"] (B, N, D).
"""

import torch.nn as nn
import torch.nn.functional as F

from ..model import EncoderOutput, ModelConfig
from .common import no_loss, transform


class MRFRHead(nn.Module):
    def __init__(self, cfg: ModelConfig, word_embeddings: nn.Embedding | None = None):
        super().__init__()
        self.transform = transform(cfg)
        self.regress = nn.Linear(cfg.hidden_size, cfg.feature_dim)

    def forward(self, out: EncoderOutput, batch: dict) -> dict:
        masked = batch["region_mask"]  # (B, N) bool, False on padding
        if not masked.any():
            return {"mrfr": no_loss(out)}
        pred = self.regress(self.transform(out.regions[masked]))  # (M, D)
        return {"mrfr": F.mse_loss(pred, batch["features"][masked].to(pred.dtype))}
