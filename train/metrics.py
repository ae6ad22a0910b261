"""Progress: loss per task, samples/s, time spent waiting for data, padding. One `log_every` helper."""

from __future__ import annotations

import json
import time
from collections import defaultdict


class Meter:
    """Sums since the last report. Losses are kept as tensors (no GPU sync per step) until reported."""

    def __init__(self):
        self.last = {}  # the latest report
        self.reset()

    def reset(self) -> None:
        self.losses, self.counts = defaultdict(float), defaultdict(int)
        self.samples = self.tokens = self.padded = 0
        self.data_time, self.start = 0.0, time.perf_counter()
        self.values = {}

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

    def report(self, **values) -> dict:
        elapsed = time.perf_counter() - self.start
        out = {**values, "samples_per_s": self.samples / elapsed, "data_wait": self.data_time / elapsed,
               "pad_fraction": 1 - self.tokens / self.padded if self.padded else 0.0}
        out.update({k: float(v) / self.counts[k] for k, v in sorted(self.losses.items())})
        self.reset()
        self.last = out
        return out


def format_report(r: dict) -> str:
    losses = "  ".join(f"{k} {v:.4f}" for k, v in r.items() if k not in _FIXED)
    return (f"step {r['step']}/{r['steps']}  lr {r['lr']:.2e}  {r['samples_per_s']:.1f} samples/s  "
            f"data wait {100 * r['data_wait']:.1f}%  padding {100 * r['pad_fraction']:.1f}%  {losses}")


_FIXED = ("step", "steps", "lr", "samples_per_s", "data_wait", "pad_fraction")


def log_every(steps, every: int, meter: Meter, values, log_path: str | None = None, print_fn=print):
    """Yield each step; after every `every` steps (and the last) print a report and append it as JSON
    to log_path. values(): the extra fields of a report (step, steps, lr)."""
    steps = list(steps)
    for i, step in enumerate(steps):
        yield step
        if (i + 1) % every == 0 or i + 1 == len(steps):
            r = meter.report(**values(step))
            print_fn(format_report(r), flush=True)
            if log_path:
                with open(log_path, "a") as f:
                    f.write(json.dumps(r) + "\n")
