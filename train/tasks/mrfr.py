"""Masked region feature regression: reconstruct a hidden region's original feature (L2).

The model saw zeros + the mask embedding instead of the feature of each region in region_mask (B, N);
its output must give back the original feature, batch["features"] (B, N, D). As UNITER's
RegionFeatureRegression: a transform (Linear, GELU, LayerNorm), then the transpose of the region
embedding's feature projection (tied: the same Parameter, (hidden, D)) plus an own bias (D,).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import EncoderOutput, ModelConfig, RegionBert
from .common import no_loss, transform


class MRFRHead(nn.Module):
    def __init__(self, cfg: ModelConfig, encoder: RegionBert):
        super().__init__()
        self.transform = transform(cfg)
        self.weight = encoder.region_embeddings.feature.weight  # (hidden, D), tied
        self.bias = nn.Parameter(torch.zeros(cfg.feature_dim))

    def predict(self, h: torch.Tensor) -> torch.Tensor:  # (M, hidden) -> (M, D)
        return self.transform(h) @ self.weight + self.bias

    def forward(self, out: EncoderOutput, batch: dict) -> dict:
        masked = batch["region_mask"]  # (B, N) bool, False on padding
        if not masked.any():
            return {"mrfr": no_loss(out)}
        pred = self.predict(out.regions[masked]).float()  # (M, D)
        return {"mrfr": F.mse_loss(pred, batch["features"][masked].float())}
