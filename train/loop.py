"""The training loop. One optimizer step = accum_steps batches, each of one task (the same task on every
rank); the model returns a dict of named losses for that task and the loop sums them.

- Mixed precision on CUDA: bf16 autocast, or fp16 autocast with a GradScaler (loss scaling; its
  state is checkpointed). fp32 otherwise.
- DDP: gradients are all-reduced on the last micro-batch of a step only (no_sync before).
- A non-finite loss stops the run (NonFiniteLoss, naming the step, the task and the record ids of the
  batch) before anything is saved, so the last checkpoint stays a good one. Checked at every report
  and before every checkpoint, from a flag kept on the device (no per-step GPU sync); the ids of the
  batches since the last check are kept on the host until then.
- Data: DeviceFeed (data.py) moves each batch to the device, float16 features cast there; on CUDA
  batch i+1 is fetched and its copy queued on a side stream once step i's work is queued.
"""

from __future__ import annotations

import contextlib
import time

import torch

from .data import DeviceFeed
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
    feed = DeviceFeed(loader, device)
    # first non-finite loss on this rank: (step, task id, micro-batch), -1 while all is well; on the device
    bad = torch.full((3,), -1, dtype=torch.long, device=device)
    recent = {}  # (step, micro-batch) -> the batch's record ids, since the last check
    t_start = time.perf_counter()

    def check_finite():
        flags = torch.stack(gather_tensors(bad, d)).cpu()  # (world, 3)
        ranks = torch.nonzero(flags[:, 0] >= 0).flatten()
        if len(ranks):
            rank = int(ranks[flags[ranks, 0].argmin()])
            step, task, micro = flags[rank].tolist()
            name = list(TASKS)[task]
            ids = recent.get((step, micro))
            if rank != d.rank or ids is None:
                where = f" on rank {rank} (its error names the batch's records)"
            else:
                shown = list(dict.fromkeys(ids))  # each image once, in batch order
                where = (f"; the batch held {len(ids)} samples of records {shown[:20]}"
                         + (f" and {len(shown) - 20} more" if len(shown) > 20 else ""))
            raise NonFiniteLoss(f"step {step}: the {name} loss is not finite (nan or inf){where}; stopping without "
                                f"saving. The last checkpoint (RUN/checkpoints/latest) is from before it: resume from "
                                f"it with a lower optim.lr, more optim.warmup_steps, or run.precision=bf16 instead of "
                                f"fp16, or leave out the records named if their features are wrong")
        recent.clear()

    model.train()
    waited = 0.0  # seconds the loop spent waiting for the loader since the last batch was counted
    for step in range(start_step, steps):
        for i in range(accum_steps):
            batch, wait = feed.next()  # on the device
            meter.add_batch(batch, waited + wait)
            task = batch["task"]
            recent[(step + 1, i)] = batch.get("ids")
            # DDP: all-reduce gradients only once per optimizer step, on its last micro-batch
            sync = contextlib.nullcontext() if not ddp or i == accum_steps - 1 else model.no_sync()
            with sync:
                with autocast:
                    losses = model(batch)  # {name: scalar} for this batch's task
                loss = sum(losses.values())
                scaler.scale(loss / accum_steps).backward()
            finite = torch.isfinite(loss.detach())
            new = (bad[0] < 0) & ~finite
            bad = torch.stack([torch.where(new, step + 1, bad[0]), torch.where(new, TASK_IDS[task], bad[1]),
                               torch.where(new, i, bad[2])])
            meter.add_losses(losses)
            if step + 1 < steps or i + 1 < accum_steps:
                waited = feed.preload()  # batch i+1 copies while this step's queued work runs
        if grad_clip:
            scaler.unscale_(optimizer)  # clip the true gradients, not the scaled ones
            torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
        if hasattr(optimizer, "use"):  # optim.task_state=per_task: this step's task's moments (accum_steps 1)
            optimizer.use(task)
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
