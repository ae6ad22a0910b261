"""AdamW without weight decay on biases and LayerNorm, and warmup-then-linear-decay (BERT, UNITER).

One step trains one task, so the heads of the other tasks (and the pooler, which only ITM uses) get no
gradient in it. UNITER (PyTorch 1.x, whose zero_grad() left zero tensors, not None) still gives every
parameter that has been trained its Adam step at every step: the momentum keeps moving it, with a zero
gradient entering the moving averages. torch's AdamW skips a parameter whose .grad is None, so a head
would move only on its own task's steps (ITM's: about a quarter of them), and ITM's head and pooler grow
several times slower than UNITER's; while they are small, so is everything ITM teaches the encoder, and
with the default task mix ITM stayed at chance for a thousand steps and more. `AdamW` below restores
UNITER's behaviour: a parameter that has optimizer state and no gradient gets a zero gradient.
"""

from __future__ import annotations

import torch


def decay_groups(model: torch.nn.Module) -> tuple[list, list]:
    """(decayed, not decayed) parameters. Not decayed: every bias and every LayerNorm weight, which is
    what UNITER's optim/misc.py means by its name filter ('bias', 'LayerNorm.weight'). That filter goes by
    name, so UNITER does decay the LayerNorms it did not call LayerNorm (img_layer_norm, pos_layer_norm and
    those in the region heads); here a LayerNorm is never decayed, whatever its name. Decayed: weight
    matrices, embeddings and the region mask embedding (as UNITER). A tied weight is listed once."""
    decay, no_decay, seen = [], [], set()
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            quiet = isinstance(module, torch.nn.LayerNorm) or name == "bias"
            (no_decay if quiet else decay).append(p)
    return decay, no_decay


class AdamW(torch.optim.AdamW):
    """torch's AdamW, except that a parameter trained before and without a gradient now takes its step
    with a zero gradient (UNITER's optimizer under PyTorch 1.x), instead of being skipped. Only parameters
    with state: one never trained yet stays untouched, and a resumed run steps exactly as the original."""

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None and self.state.get(p):
                    p.grad = torch.zeros_like(p)
        return super().step(closure)


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.98),
                    eps: float = 1e-6) -> AdamW:
    decay, no_decay = decay_groups(model)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def warmup_linear(warmup_steps: int, total_steps: int):
    """lr multiplier at a step: 0 -> 1 over warmup_steps, then 1 -> 0 at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def build_scheduler(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(warmup_steps, total_steps))
