"""Progress and metrics: loss per task, samples/s, data wait, padding, ETA; to the console, to
RUN/log.jsonl (one JSON object per report), and to TensorBoard when the tensorboard package is
installed. Held-out evaluations go to the same places ({"step": N, "eval": {...}} in the JSONL).

Only rank 0 writes; reports are averaged over all ranks first (Meter.report is a collective).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict

import torch

from .distributed import SINGLE, Dist, all_reduce_sum


class Meter:
    """Sums since the last report. Losses are kept as tensors (no GPU sync per step) until reported."""

    def __init__(self):
        self.last = {}  # the latest report
        self.reset()

    def reset(self) -> None:
        self.losses, self.counts = defaultdict(float), defaultdict(int)
        self.samples = self.tokens = self.padded = 0
        self.data_time, self.start = 0.0, time.perf_counter()

    def add_losses(self, losses: dict) -> None:
        for name, value in losses.items():
            self.losses[name] = self.losses[name] + value.detach().float()
            self.counts[name] += 1

    def add_batch(self, batch: dict, data_time: float) -> None:
        B = len(batch["text_lens"])
        self.samples += B
        self.tokens += batch["num_tokens"]
        self.padded += round(batch["num_tokens"] / (1 - batch["pad_fraction"])) if batch["pad_fraction"] < 1 else 0
        self.data_time += data_time

    def report(self, d: Dist = SINGLE, **values) -> dict:
        """The averages since the last report, over all ranks (every rank must call this, with the same
        loss names: every rank trains the same tasks at the same steps)."""
        elapsed = time.perf_counter() - self.start
        names = sorted(self.losses)
        device = d.device
        losses = torch.stack([torch.as_tensor(self.losses[k], device=device).float() for k in names]) if names \
            else torch.zeros(0, device=device)
        counts = torch.tensor([float(self.counts[k]) for k in names], device=device)
        sums = torch.tensor([self.samples, self.tokens, self.padded, self.data_time], dtype=torch.float64,
                            device=device)
        for t in (losses, counts, sums):
            all_reduce_sum(t, d)
        samples, tokens, padded, data_time = sums.tolist()
        out = {**values, "samples_per_s": samples / elapsed, "tokens_per_s": tokens / elapsed,
               "data_wait": data_time / d.world_size / elapsed,
               "pad_fraction": 1 - tokens / padded if padded else 0.0}
        out.update({k: v / c for k, v, c in zip(names, losses.tolist(), counts.tolist(), strict=True)})
        self.reset()
        self.last = out
        return out


_FIXED = ("step", "steps", "lr", "samples_per_s", "tokens_per_s", "data_wait", "pad_fraction", "eta_s", "loss_scale")


def format_duration(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "?"
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_report(r: dict) -> str:
    losses = "  ".join(f"{k} {v:.4f}" for k, v in r.items() if k not in _FIXED)
    eta = f"  eta {format_duration(r['eta_s'])}" if "eta_s" in r else ""
    return (f"step {r['step']}/{r['steps']}  lr {r['lr']:.2e}  {r['samples_per_s']:.1f} samples/s  "
            f"data wait {100 * r['data_wait']:.1f}%  padding {100 * r['pad_fraction']:.1f}%{eta}  {losses}")


def format_eval(step: int, m: dict) -> str:
    acc = "  ".join(f"{k} {v:.3f}" for k, v in m.items() if k.endswith("_acc"))
    ret = "  ".join(f"{k} {100 * v:.1f}" for k, v in m.items() if "_r" in k and not k.endswith("_acc"))
    return f"eval step {step}: {acc}" + (f"  retrieval (%) {ret}" if ret else "") + \
        (f"  ({m['eval_seconds']:.1f}s)" if "eval_seconds" in m else "")


def read_log(path: str) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def trim_log(path: str, step: int) -> None:
    """Drop log records after `step` (a resumed run redoes those steps), atomically."""
    if not os.path.exists(path):
        return
    kept = [r for r in read_log(path) if r.get("step", 0) <= step]
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    os.replace(tmp, path)


class Logger:
    """Rank 0's outputs: console lines, RUN/log.jsonl, RUN/tensorboard (if installed). Other ranks: silent."""

    def __init__(self, run_dir: str | None, d: Dist = SINGLE, print_fn=print, tensorboard: bool = True):
        self.main, self.print_fn = d.is_main, print_fn
        self.path = os.path.join(run_dir, "log.jsonl") if run_dir and d.is_main else None
        self.tb = None
        if run_dir and d.is_main and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package
            except ImportError:
                pass  # optional: the JSONL log and the PNG plot hold the same figures
            else:
                self.tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))

    def print(self, *args, **kw) -> None:
        if self.main:
            self.print_fn(*args, **kw)

    def write(self, record: dict) -> None:
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def train(self, r: dict) -> None:
        if not self.main:
            return
        self.print_fn(format_report(r), flush=True)
        self.write(r)
        if self.tb:
            for k, v in r.items():
                if k not in ("step", "steps"):
                    self.tb.add_scalar(f"{'train' if k not in _FIXED else 'progress'}/{k}", v, r["step"])

    def eval(self, step: int, metrics: dict) -> None:
        if not self.main:
            return
        self.print_fn(format_eval(step, metrics), flush=True)
        self.write({"step": step, "eval": metrics})
        if self.tb:
            for k, v in metrics.items():
                self.tb.add_scalar(f"eval/{k}", v, step)

    def close(self) -> None:
        if self.tb:
            self.tb.close()
            self.tb = None
