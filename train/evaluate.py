"""Accuracy of the pretraining heads on given batches: ITM, MLM (masked words), MRC (masked regions)."""

from __future__ import annotations

from collections import defaultdict

import torch

from .data import to_device
from .masking import IGNORE
from .tasks.mrc import hard_labels


@torch.no_grad()
def evaluate(model, batches, device="cpu") -> dict:
    """{"itm_acc", "mlm_acc", "mrc_acc", ...: fraction correct} over the batches, by what each holds:
    itm batches: match / no match; any batch with mlm_labels: masked words; mrc and mrc_kl batches:
    the masked regions' most likely detector class (the MRC-kl head's argmax for mrc_kl)."""
    was_training = model.training
    model.eval()
    right, total = defaultdict(int), defaultdict(int)

    def count(name, pred, target):
        right[name] += int((pred == target).sum())
        total[name] += int(target.numel())

    for batch in batches:
        batch = to_device(batch, device)
        out, task, heads = model.encode(batch), batch["task"], model.heads
        if task == "itm":
            count("itm_acc", heads["itm"].classify(out.pooled).argmax(-1), batch["itm_labels"])
        chosen = batch["mlm_labels"] != IGNORE
        if chosen.any():
            count("mlm_acc", heads["mlm"].logits(out.text[chosen]).argmax(-1), batch["mlm_labels"][chosen])
        masked = batch["region_mask"]
        if task in ("mrc", "mrc_kl") and masked.any():
            count(f"{task}_acc", heads[task].logits(out.regions[masked]).argmax(-1),
                  hard_labels(batch["class_probs"][masked]))
    model.train(was_training)
    return {k: right[k] / total[k] for k in total}
