"""The encoder with every task's head: batch in, dict of named losses out (the loop sums them)."""

from __future__ import annotations

import torch.nn as nn

from .model import EncoderOutput, ModelConfig, RegionBert, init_weights
from .tasks import TASKS


class Pretrainer(nn.Module):
    def __init__(self, cfg: ModelConfig, wra_weight: float = 0.1, wra_iterations: int = 50, wra_beta: float = 0.5):
        super().__init__()
        self.cfg = cfg
        self.encoder = RegionBert(cfg)
        word = self.encoder.text_embeddings.word
        self.heads = nn.ModuleDict({name: head(cfg, word) for name, head in TASKS.items() if name != "itm"})
        self.heads["itm"] = TASKS["itm"](cfg, word, wra_weight, wra_iterations, wra_beta)
        self.heads.apply(init_weights)  # touches Linear/LayerNorm modules, not the tied MLM weight

    def encode(self, batch: dict) -> EncoderOutput:
        return self.encoder(batch["input_ids"], batch["text_lens"], batch["features"], batch["locations"],
                            batch["region_lens"], batch.get("region_mask"))

    def forward(self, batch: dict) -> dict:
        """{loss name: scalar} for the batch's task (batch["task"])."""
        return self.heads[batch["task"]](self.encode(batch), batch)
