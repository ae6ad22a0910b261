"""The training loop. One optimizer step = accum_steps batches, each of one task; the model returns a
dict of named losses for that task and the loop sums them."""

from __future__ import annotations

import contextlib
import os
import time

import torch

from .checkpoint import save_checkpoint
from .data import to_device
from .metrics import Meter, log_every


def train(model, loader, optimizer, scheduler, *, steps: int, start_step: int = 0, accum_steps: int = 1,
          grad_clip: float = 0.0, device="cpu", precision: str = "fp32", log_every_steps: int = 100,
          checkpoint_every: int = 0, run_dir: str | None = None, config: dict | None = None, print_fn=print) -> dict:
    """Train from start_step to steps; returns the last report."""
    device = torch.device(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16"
                else contextlib.nullcontext())
    meter = Meter()
    batches = iter(loader)
    log_path = os.path.join(run_dir, "log.jsonl") if run_dir else None

    def values(step):  # what a progress report says besides the meter's figures
        return {"step": step + 1, "steps": steps, "lr": scheduler.get_last_lr()[0]}

    model.train()
    for step in log_every(range(start_step, steps), log_every_steps, meter, values, log_path, print_fn):
        for _ in range(accum_steps):
            t0 = time.perf_counter()
            batch = next(batches)  # the time spent here is time the model waited for data
            meter.add_batch(batch, time.perf_counter() - t0)
            batch = to_device(batch, device)
            with autocast:
                losses = model(batch)  # {name: scalar} for this batch's task
            loss = sum(losses.values())
            (loss / accum_steps).backward()
            meter.add_losses(losses)
        if grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if run_dir and (done == steps or checkpoint_every and done % checkpoint_every == 0):
            save_checkpoint(os.path.join(run_dir, "checkpoint.pt"), model, optimizer, scheduler, done, config)
    return meter.last
