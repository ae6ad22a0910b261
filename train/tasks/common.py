"""Pieces the heads share."""

import torch
import torch.nn as nn

from ..model import EncoderOutput, ModelConfig


def transform(cfg: ModelConfig) -> nn.Module:
    """BERT's prediction-head transform: Linear, GELU, LayerNorm."""
    return nn.Sequential(nn.Linear(cfg.hidden_size, cfg.hidden_size), nn.GELU(),
                         nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps))


def no_loss(out: EncoderOutput) -> torch.Tensor:
    """A zero that is still part of the graph: for a batch with nothing to predict (e.g. no boxes)."""
    return out.hidden.sum() * 0.0
