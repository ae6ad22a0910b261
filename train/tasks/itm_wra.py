"""Image-text matching, with word-region alignment by optimal transport (UNITER).

ITM: half the pairs in an ITM batch had their image swapped for another one (train/data.py);
a 2-way classifier on the pooled [CLS] output says which pairs match (itm_labels 1) and which don't.
WRA: the optimal-transport distance between the text's outputs and the regions' outputs (train/ot.py)
should be small for matching pairs and large for the others:
    wra = (sum of distances over matches - sum over mismatches) / B, times a weight (0.1),
as UNITER's pretrain.py. So the logged wra is negative whenever the mismatched pairs of a batch lie
farther apart than the matched ones, which is what it trains for; it has no floor at 0. The text side
is every text token, [CLS] and [SEP] included (UNITER's itm_ot_collate pads the transport at the full
text length).

center_grad (tasks.itm_center_grad; on from scratch, off with run.init_from; docs/itm-plateau.md): ITM's
gradient reaches the encoder with its mean over the batch's pairs removed, at the pooled output. That mean
can only move every pair's score alike (the head's bias does that), and from scratch it is 10-100x the part
that tells matched pairs from mismatched ones. The forward pass, the loss and the head's gradients are as
without it.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..model import EncoderOutput, ModelConfig, RegionBert
from ..ot import ot_distance


def text_and_region_validity(batch: dict, L: int, N: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, L) True on text tokens ([CLS] and [SEP] too, not padding), (B, N) True on real regions."""
    t, r = torch.arange(L, device=device), torch.arange(N, device=device)
    return t < batch["text_lens"].unsqueeze(1), r < batch["region_lens"].unsqueeze(1)


class ITMHead(nn.Module):
    def __init__(self, cfg: ModelConfig, encoder: RegionBert | None = None, wra_weight: float = 0.1,
                 wra_iterations: int = 50, wra_beta: float = 0.5, center_grad: bool = False):
        super().__init__()
        self.classify = nn.Linear(cfg.hidden_size, 2)
        self.wra_weight, self.wra_iterations, self.wra_beta = wra_weight, wra_iterations, wra_beta
        self.center_grad = center_grad

    def forward(self, out: EncoderOutput, batch: dict) -> dict:
        labels = batch["itm_labels"]  # (B,) 1 = the caption's own image, 0 = another image
        pooled = out.pooled  # (B, C)
        if self.center_grad and pooled.shape[0] > 1:
            mean = pooled.mean(0, keepdim=True)  # the same values forward; backward, each row's gradient
            pooled = pooled - mean + mean.detach()  # minus the batch's mean gradient
        losses = {"itm": F.cross_entropy(self.classify(pooled), labels)}
        if self.wra_weight:
            text, regions = text_and_region_validity(batch, out.text.shape[1], out.regions.shape[1], labels.device)
            dist = ot_distance(out.text, out.regions, text, regions, self.wra_beta, self.wra_iterations)  # (B,)
            usable = text.any(1) & regions.any(1)  # a pair without boxes aligns nothing
            sign = torch.where(labels == 1, 1.0, -1.0)
            losses["wra"] = self.wra_weight * (sign * dist * usable).sum() / labels.numel()
        return losses
