"""AdamW without weight decay on biases and LayerNorm, and warmup-then-linear-decay (BERT, UNITER); optionally
with Adam's moments kept per task (`optim.task_state`).

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

from collections import defaultdict

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


class TaskAdamW(AdamW):
    """AdamW with one set of moments (exp_avg, exp_avg_sq, step) per task: `use(task)` before a step of that
    task, and the step reads and updates that task's moments only. The parameters, their groups, the
    learning rate (one scheduler) and the weight decay are shared.

    Why (docs/itm-plateau.md): one task per step, with the moments shared, a parameter's second moment is
    set by the task with the largest gradients on it (MLM and the region tasks, by 10-1000x on the encoder),
    and every other task's step on that parameter is divided by it; with the momentum carrying the other
    tasks' directions into its steps too. ITM, whose gradient is small until it leaves chance, then moves
    the encoder a small fraction of its own learning rate. Per task, each task's steps are normalised by its
    own gradients, as if it were trained alone, while every task still trains the same weights.

    Costs 2 x 4 bytes per parameter per task in the mix (4 tasks: 32 B a parameter instead of 8)."""

    def __init__(self, params, **kw):
        super().__init__(params, **kw)
        self.task = None
        self.task_states = {}  # task -> its moments (param -> {step, exp_avg, exp_avg_sq}); self.state: the current

    def use(self, task: str) -> None:
        if task == self.task:
            return
        if self.task is not None:
            self.task_states[self.task] = self.state
        self.state = self.task_states.pop(task, None) or defaultdict(dict)
        self.task = task

    def _all(self) -> dict:
        out = dict(self.task_states)
        if self.task is not None:
            out[self.task] = self.state
        return out

    def state_dict(self) -> dict:
        """torch's form, with "state" empty and the moments of each task under "task_states" (each in torch's
        packed form: parameter number -> its tensors), and "task" the current one."""
        current, packed, groups = self.task, {}, None
        for task in sorted(self._all()):
            self.use(task)
            sd = super().state_dict()
            packed[task], groups = sd["state"], sd["param_groups"]
        if current is not None:
            self.use(current)
        if groups is None:
            groups = super().state_dict()["param_groups"]
        return {"state": {}, "param_groups": groups, "task_states": packed, "task": current}

    def load_state_dict(self, state_dict: dict) -> None:
        tasks = state_dict.get("task_states")
        if tasks is None or state_dict.get("state"):
            raise ValueError("the optimizer state holds moments shared by every task (optim.task_state=shared), "
                             "this run keeps them per task: resume with --set optim.task_state=shared")
        self.task, self.task_states = None, {}
        self.state = defaultdict(dict)
        for task, packed in tasks.items():
            super().load_state_dict({"state": packed, "param_groups": state_dict["param_groups"]})
            self.task_states[task] = self.state
        if not tasks:  # no step taken yet: just the groups
            super().load_state_dict({"state": {}, "param_groups": state_dict["param_groups"]})
        self.state = defaultdict(dict)
        if state_dict.get("task") in self.task_states:
            self.use(state_dict["task"])


def task_state_per_task(task_state: str, init_from: str, accum_steps: int) -> bool:
    """optim.task_state resolved: "auto" is per task from scratch with one batch a step, shared (UNITER's)
    with run.init_from or gradient accumulation (a step of several tasks' batches)."""
    if task_state == "auto":
        return not init_from and accum_steps == 1
    return task_state == "per_task"


def build_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, betas=(0.9, 0.98),
                    eps: float = 1e-6, per_task: bool = False) -> AdamW:
    decay, no_decay = decay_groups(model)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return (TaskAdamW if per_task else AdamW)(groups, lr=lr, betas=tuple(betas), eps=eps)


def warmup_linear(warmup_steps: int, total_steps: int):
    """lr multiplier at a step: 0 -> 1 over warmup_steps, then 1 -> 0 at total_steps."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return factor


def build_scheduler(optimizer, warmup_steps: int, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    return torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_linear(warmup_steps, total_steps))
