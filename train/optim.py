"""AdamW without weight decay on biases and LayerNorm, and warmup-then-linear-decay (BERT, UNITER)."""

from __future__ import annotations

import torch


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.98),
                    eps: float = 1e-6) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]  # parameters() lists a tied weight once
    decay = [p for p in params if p.ndim >= 2]  # matrices and embeddings
    no_decay = [p for p in params if p.ndim < 2]  # biases, LayerNorm scales and shifts
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)


def warmup_linear(warmup_steps: int, total_steps: int):
    """lr multiplier at a step: 0 -> 1 over warmup_steps, then 1 -> 0 at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def build_scheduler(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(warmup_steps, total_steps))
