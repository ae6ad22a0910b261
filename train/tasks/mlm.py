"""Masked language modelling: predict the hidden words from the other words and the image.

The batch carries mlm_labels (B, L): the original id where a word was chosen (train/masking.py),
-100 elsewhere. The decoder is tied to the word embeddings (BERT, UNITER), plus an output bias.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..masking import IGNORE
from ..model import EncoderOutput, ModelConfig, RegionBert
from .common import no_loss, transform


class MLMHead(nn.Module):
    def __init__(self, cfg: ModelConfig, encoder: RegionBert):
        super().__init__()
        self.transform = transform(cfg)
        self.weight = encoder.text_embeddings.word.weight  # (V, C), tied: the same Parameter as the embedding's
        self.bias = nn.Parameter(torch.zeros(cfg.vocab_size))

    def logits(self, h: torch.Tensor) -> torch.Tensor:  # (M, C) -> (M, V)
        return self.transform(h) @ self.weight.t() + self.bias

    def forward(self, out: EncoderOutput, batch: dict) -> dict:
        labels = batch["mlm_labels"]  # (B, L)
        chosen = labels != IGNORE
        if not chosen.any():
            return {"mlm": no_loss(out)}
        # only the chosen positions go through the (vocabulary-sized) decoder
        return {"mlm": F.cross_entropy(self.logits(out.text[chosen]), labels[chosen])}
