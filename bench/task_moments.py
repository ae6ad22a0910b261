"""How far apart the tasks' Adam second moments are, from a checkpoint trained with optim.task_state=per_task
(docs/itm-plateau.md). For each task, the median over the encoder's weight matrices (of each matrix's
median element) of sqrt(v_task / v_shared), v_shared = sum over tasks of mix ratio x v_task: about the
factor by which moments shared by every task (UNITER's) would scale that task's steps on the encoder
(Adam divides by sqrt(v)), 1 where a task's gradients are as large as the mix's.

    python bench/task_moments.py RUN/checkpoints/step-00000500.pt [RUN/checkpoint.pt ...]
"""

from __future__ import annotations

import sys

import torch

from regionbert.train.checkpoint import load_checkpoint
from regionbert.train.config import Config
from regionbert.train.optim import decay_groups
from regionbert.train.run import build_model


def main(paths: list[str]) -> int:
    for path in paths:
        state = load_checkpoint(path)
        tasks = state["optimizer"].get("task_states")
        if not tasks:
            print(f"{path}: moments shared by every task (optim.task_state=shared): nothing to compare")
            continue
        cfg = Config()
        for k, v in state["config"]["model"].items():
            setattr(cfg.model, k, v)
        model = build_model(cfg)
        decay, no_decay = decay_groups(model)  # the optimizer numbers the parameters in this order
        by_id = {id(p): n for n, p in model.named_parameters()}
        order = [by_id[id(p)] for p in decay + no_decay]
        enc = [i for i, n in enumerate(order) if n.startswith("encoder.layers.") and n.endswith("weight")]
        mix = {t: r for t, r in state["config"]["tasks"]["mix"].items() if r and t in tasks}
        total = sum(mix.values())
        line = [f"{path} (step {state['step']}):"]
        for task, st in sorted(tasks.items()):
            ratios = []
            for i in enc:
                if i not in st or any(i not in tasks[t] for t in mix):
                    continue
                shared = sum(r / total * tasks[t][i]["exp_avg_sq"] for t, r in mix.items())
                ratios.append(float((st[i]["exp_avg_sq"] / shared.clamp_min(1e-30)).sqrt().median()))
            if ratios:
                r = torch.tensor(ratios)
                line.append(f"{task} {r.median():.2g} ({r.min():.2g}-{r.max():.2g})")
        print("  ".join(line))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
