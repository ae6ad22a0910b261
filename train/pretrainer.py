"""The encoder with every task's head: batch in, dict of named losses out (the loop sums them)."""

from __future__ import annotations

import torch.nn as nn

from .model import EncoderOutput, ModelConfig, RegionBert, init_weights
from .tasks import TASKS, RegionClassifier


class Pretrainer(nn.Module):
    def __init__(self, cfg: ModelConfig, wra_weight: float = 0.1, wra_iterations: int = 50, wra_beta: float = 0.5,
                 itm_center_grad: bool = False):
        super().__init__()
        self.cfg = cfg
        self.encoder = RegionBert(cfg)
        shared = RegionClassifier(cfg) if cfg.shared_region_classifier else None  # MRC and MRC-kl (UNITER)
        self.heads = nn.ModuleDict({
            "mlm": TASKS["mlm"](cfg, self.encoder), "mrfr": TASKS["mrfr"](cfg, self.encoder),
            "mrc": TASKS["mrc"](cfg, self.encoder, shared), "mrc_kl": TASKS["mrc_kl"](cfg, self.encoder, shared),
            "itm": TASKS["itm"](cfg, self.encoder, wra_weight, wra_iterations, wra_beta, itm_center_grad)})
        assert set(self.heads) == set(TASKS)
        self.heads.apply(init_weights)  # Linear / LayerNorm modules only: not the tied MLM and MRFR weights
        init = {"auto": "scaled"}.get(cfg.itm_head_init, cfg.itm_head_init)  # run.init_from resolves auto to bert
        if init in ("scaled", "zero"):  # the pooler (C, C) at std 1/sqrt(C): its output varies with the input
            nn.init.normal_(self.encoder.pooler.weight, std=cfg.hidden_size ** -0.5)
        if init == "scaled":  # the classifier (2, C) too
            nn.init.normal_(self.heads["itm"].classify.weight, std=cfg.hidden_size ** -0.5)
        elif init == "zero":  # every pair scored 0 (p = 0.5) at first: no random preference to unlearn
            nn.init.zeros_(self.heads["itm"].classify.weight)

    def encode(self, batch: dict) -> EncoderOutput:
        return self.encoder(batch["input_ids"], batch["text_lens"], batch["features"], batch["locations"],
                            batch["region_lens"], batch.get("region_mask"))

    def forward(self, batch: dict) -> dict:
        """{loss name: scalar} for the batch's task (batch["task"])."""
        return self.heads[batch["task"]](self.encode(batch), batch)
