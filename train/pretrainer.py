"""The encoder with every task's head: batch in, dict of named losses out (the loop sums them)."""

from __future__ import annotations

import torch.nn as nn

from .model import EncoderOutput, ModelConfig, RegionBert, init_weights
from .tasks import TASKS, RegionClassifier


class Pretrainer(nn.Module):
    def __init__(self, cfg: ModelConfig, wra_weight: float = 0.1, wra_iterations: int = 50, wra_beta: float = 0.5):
        super().__init__()
        self.cfg = cfg
        self.encoder = RegionBert(cfg)
        shared = RegionClassifier(cfg) if cfg.shared_region_classifier else None  # MRC and MRC-kl (UNITER)
        self.heads = nn.ModuleDict({
            "mlm": TASKS["mlm"](cfg, self.encoder), "mrfr": TASKS["mrfr"](cfg, self.encoder),
            "mrc": TASKS["mrc"](cfg, self.encoder, shared), "mrc_kl": TASKS["mrc_kl"](cfg, self.encoder, shared),
            "itm": TASKS["itm"](cfg, self.encoder, wra_weight, wra_iterations, wra_beta)})
        assert set(self.heads) == set(TASKS)
        self.heads.apply(init_weights)  # Linear / LayerNorm modules only: not the tied MLM and MRFR weights
        if cfg.itm_head_init in ("scaled", "auto"):  # "auto" is resolved to "bert" by run.init_from (train/run.py)
            # (C, C) and (2, C) at std 1/sqrt(C): ITM's gradient reaches the encoder unshrunk
            for w in (self.encoder.pooler.weight, self.heads["itm"].classify.weight):
                nn.init.normal_(w, std=cfg.hidden_size ** -0.5)

    def encode(self, batch: dict) -> EncoderOutput:
        return self.encoder(batch["input_ids"], batch["text_lens"], batch["features"], batch["locations"],
                            batch["region_lens"], batch.get("region_mask"))

    def forward(self, batch: dict) -> dict:
        """{loss name: scalar} for the batch's task (batch["task"])."""
        return self.heads[batch["task"]](self.encode(batch), batch)
