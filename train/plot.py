"""RUN/curves.png: the training curves at a glance, drawn from RUN/log.jsonl at the end of a run.

Left: loss per task over steps (log scale when the losses span decades), each task in its own colour.
Middle: held-out accuracies (MLM, MRC, ITM) over steps. Right: zero-shot retrieval R@1/5/10, image to
text (solid) and text to image (dashed). Panels without data are left out. Also `python -m
regionbert.train.plot RUN` to redraw a run's plot, e.g. while it trains.
"""

from __future__ import annotations

import math
import os
import sys

from .metrics import _FIXED, read_log

COLOURS = {"mlm": "tab:blue", "mrfr": "tab:orange", "mrc": "tab:green", "mrc_kl": "tab:red", "itm": "tab:purple",
           "wra": "tab:brown"}


def plot_run(run_dir: str, out: str | None = None) -> str | None:
    """Write the plot; returns its path, or None if the log has no training reports yet."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed (servers, containers)
    import matplotlib.pyplot as plt

    log = read_log(os.path.join(run_dir, "log.jsonl"))
    train = [r for r in log if "lr" in r]  # training reports (not evaluations, not replica digests)
    evals = [r for r in log if "eval" in r]
    if not train:
        return None
    losses = sorted({k for r in train for k in r if k not in _FIXED})
    acc = sorted({k for r in evals for k in r["eval"] if k.endswith("_acc")})
    ret = sorted({k for r in evals for k in r["eval"] if k[:4] in ("i2t_", "t2i_")})
    panels = 1 + bool(acc) + bool(ret)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4.2), squeeze=False)
    axes = list(axes[0])

    ax = axes.pop(0)
    for k in losses:
        pts = [(r["step"], r[k]) for r in train if k in r]
        ax.plot(*zip(*pts, strict=True), label=k, color=COLOURS.get(k), lw=1.5,
                marker="o" if len(pts) < 30 else None, ms=3)  # few reports: show each one
    if "itm" in losses:  # a match / no-match guess at 1:1 costs ln 2: ITM has learned once it is below
        ax.axhline(math.log(2), color=COLOURS["itm"], ls=":", lw=1, label="itm guessing (ln 2)")
    values = [r[k] for r in train for k in losses if k in r]
    if values and min(values) > 0 and max(values) / min(values) > 100:  # wra can be negative: linear then
        ax.set_yscale("log")
    ax.set(title="training loss per task", xlabel="step", ylabel="loss")
    ax.legend(fontsize=8, ncol=2)
    ax.grid(alpha=0.3)

    if acc:
        ax = axes.pop(0)
        for k in acc:
            pts = [(r["step"], r["eval"][k]) for r in evals if k in r["eval"]]
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=k.removesuffix("_acc"),
                    color=COLOURS.get(k.removesuffix("_acc")))
        if "itm_acc" in acc:  # half the pairs mismatched
            ax.axhline(0.5, color=COLOURS["itm"], ls=":", lw=1, label="itm guessing")
        ax.set(title="held-out accuracy", xlabel="step", ylabel="accuracy", ylim=(0, 1))
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    if ret:
        ax = axes.pop(0)
        for k in ret:
            pts = [(r["step"], 100 * r["eval"][k]) for r in evals if k in r["eval"]]
            ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=k, ls="-" if k.startswith("i2t") else "--",
                    color={"r1": "tab:blue", "r5": "tab:orange", "r10": "tab:green"}.get(k.split("_")[1]))
        n = evals[-1]["eval"].get("retrieval_images")
        ax.set(title="zero-shot retrieval" + (f" ({n} images)" if n else ""), xlabel="step", ylabel="recall (%)",
               ylim=(0, 100))
        ax.legend(fontsize=8, ncol=2)
        ax.grid(alpha=0.3)

    last = train[-1]["step"]
    for ax in fig.axes[1:]:  # evaluation panels on the same step axis as the losses
        ax.set_xlim(0, last * 1.03)
    fig.suptitle(os.path.basename(os.path.abspath(run_dir)) + f": step {train[-1]['step']}", fontsize=10)
    fig.tight_layout()
    out = out or os.path.join(run_dir, "curves.png")
    tmp = out + ".tmp.png"
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, out)
    return out


if __name__ == "__main__":
    path = plot_run(sys.argv[1] if len(sys.argv) > 1 else ".")
    print(path or "no training reports in the log yet")
