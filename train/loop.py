"""The training loop. One optimizer step = accum_steps batches, each of one task (the same task on every
rank); the model returns a dict of named losses for that task and the loop sums them.

- Mixed precision on CUDA: bf16 autocast, or fp16 autocast with a GradScaler (loss scaling; its
  state is checkpointed). fp32 otherwise.
- DDP: gradients are all-reduced on the last micro-batch of a step only (no_sync before).
- A non-finite loss stops the run (NonFiniteLoss, naming the step and task) before anything is
  saved, so the last checkpoint stays a good one. Checked at every report and before every
  checkpoint, from a flag kept on the device (no per-step GPU sync).
"""

from __future__ import annotations

import contextlib
import time

import torch

from .data import to_device
from .distributed import SINGLE, Dist, gather_tensors
from .metrics import Logger, Meter
from .tasks import TASKS

TASK_IDS = {name: i for i, name in enumerate(TASKS)}


class NonFiniteLoss(RuntimeError):
    pass


def autocast_for(device: torch.device, precision: str):
    """The autocast context of a precision: bf16 / fp16 on CUDA; fp32 (or bf16 on CPU, for tests): as asked."""
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


def train(model, loader, optimizer, scheduler, *, steps: int, start_step: int = 0, accum_steps: int = 1,
          grad_clip: float = 0.0, device="cpu", precision: str = "fp32", scaler=None, log_every_steps: int = 100,
          checkpoint_every: int = 0, eval_every: int = 0, save=None, evaluate=None, logger: Logger | None = None,
          d: Dist = SINGLE) -> dict:
    """Train from start_step to steps; returns the last report.

    save(step): write a checkpoint (called on every rank: it gathers RNG states; rank 0 writes).
    evaluate(step) -> metrics: held-out evaluation (called on every rank; each does its share)."""
    device = torch.device(device)
    autocast = autocast_for(device, precision)
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    logger = logger or Logger(None, d)
    ddp = isinstance(model, torch.nn.parallel.DistributedDataParallel)
    meter = Meter()
    batches = iter(loader)
    # first non-finite loss on this rank: (step, task id), -1 while all is well; stays on the device
    bad = torch.full((2,), -1, dtype=torch.long, device=device)
    t_start = time.perf_counter()

    def check_finite():
        flags = torch.stack(gather_tensors(bad, d)).cpu()  # (world, 2)
        hit = flags[flags[:, 0] >= 0]
        if len(hit):
            step, task = hit[hit[:, 0].argmin()].tolist()
            name = list(TASKS)[task]
            raise NonFiniteLoss(f"step {step}: the {name} loss is not finite (nan or inf); stopping without saving. "
                                f"The last checkpoint (RUN/checkpoints/latest) is from before it: resume from it with "
                                f"a lower optim.lr, more optim.warmup_steps, or run.precision=bf16 instead of fp16")

    model.train()
    for step in range(start_step, steps):
        for i in range(accum_steps):
            t0 = time.perf_counter()
            batch = next(batches)  # the time spent here is time the model waited for data
            meter.add_batch(batch, time.perf_counter() - t0)
            task = batch["task"]
            batch = to_device(batch, device)
            # DDP: all-reduce gradients only once per optimizer step, on its last micro-batch
            sync = contextlib.nullcontext() if not ddp or i == accum_steps - 1 else model.no_sync()
            with sync:
                with autocast:
                    losses = model(batch)  # {name: scalar} for this batch's task
                loss = sum(losses.values())
                scaler.scale(loss / accum_steps).backward()
            finite = torch.isfinite(loss.detach())
            new = (bad[0] < 0) & ~finite
            bad = torch.stack([torch.where(new, step + 1, bad[0]), torch.where(new, TASK_IDS[task], bad[1])])
            meter.add_losses(losses)
        if grad_clip:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        scaler.step(optimizer)  # skips the step if fp16 gradients overflowed
        scaler.update()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        if done % log_every_steps == 0 or done == steps:
            check_finite()
            elapsed = time.perf_counter() - t_start
            values = {"step": done, "steps": steps, "lr": scheduler.get_last_lr()[0],
                      "eta_s": elapsed / (done - start_step) * (steps - done)}
            if scaler.is_enabled():
                values["loss_scale"] = scaler.get_scale()
            logger.train(meter.report(d, **values))
        if save and (done == steps or checkpoint_every and done % checkpoint_every == 0):
            check_finite()
            save(done)
        if evaluate and (done == steps or eval_every and done % eval_every == 0):
            logger.eval(done, evaluate(done))
            model.train()
    return meter.last
