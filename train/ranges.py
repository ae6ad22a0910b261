"""The range of every config value: a value out of range is an error naming the key, before anything runs.

Types are checked when the config is read (config.py); this checks meaning. Without it `optim.grad_clip
= -1` trains by gradient ascent and exits 0, `tasks.wra_iterations = 10**15` never finishes a step, and
`data.num_workers = 10**6` tries to start a million processes. The upper bounds are far beyond any real
run and only stop values that can only be typos or hangs.

    RULES["section.key"] = Range(lo, hi, ...)  numbers (ints or floats; NaN and inf are never in range)
                         = one of a few plain checks for strings, lists, booleans
A test checks that every field of every section has a rule here.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

BIG = 10**9  # counts of steps, tokens, pairs: more is a typo


@dataclass(frozen=True)
class Range:
    lo: float
    hi: float
    lo_open: bool = False  # lo itself is out of range
    hi_open: bool = False
    integer: bool = False
    why: str = ""

    def describe(self) -> str:
        lo = f"> {self.lo:g}" if self.lo_open else f">= {self.lo:g}"
        hi = f"< {self.hi:g}" if self.hi_open else f"<= {self.hi:g}"
        return f"{'an integer' if self.integer else 'a number'} {lo} and {hi}"

    def holds(self, v) -> bool:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if self.integer and not isinstance(v, int):
            return False
        above = v > self.lo if self.lo_open else v >= self.lo
        below = v < self.hi if self.hi_open else v <= self.hi
        return above and below


def Int(lo, hi, why=""):  # noqa: N802 - reads like a type in the table
    return Range(lo, hi, integer=True, why=why)


def Float(lo, hi, lo_open=False, hi_open=False, why=""):  # noqa: N802
    return Range(lo, hi, lo_open, hi_open, why=why)


BOOL, TEXT, OPTIONAL_TEXT, PATHS, MIX, BETAS, DEVICE, NAME = ("bool", "text", "optional text", "paths", "mix",
                                                              "betas", "device", "name")

RULES = {
    # model (most are set from the data or from run.init_from, and checked again after that)
    "model.vocab_size": Int(1, 10**7),
    "model.hidden_size": Int(1, 2**16),
    "model.num_layers": Int(1, 1000),
    "model.num_heads": Int(1, 2**16),
    "model.intermediate_size": Int(1, 2**20),
    "model.max_text_len": Int(3, 2**16, "[CLS], one word and [SEP] at least"),
    "model.feature_dim": Int(1, 2**20),
    "model.num_classes": Int(0, 2**20),
    "model.loc_dim": Int(5, 7),  # 5 or 7: ModelConfig says which
    "model.dropout": Float(0, 1, hi_open=True),
    "model.layer_norm_eps": Float(0, 1, lo_open=True),
    "model.region_mask_embedding": BOOL,
    "model.shared_region_classifier": BOOL,
    "model.itm_head_init": NAME,  # auto / bert / scaled / zero: ModelConfig says which
    # data
    "data.shards": PATHS,
    "data.captions": TEXT,
    "data.tokenizer": TEXT,
    "data.lowercase": BOOL,
    "data.split": OPTIONAL_TEXT,
    "data.max_regions": Int(1, 10_000),
    "data.token_budget": Int(1, 2**24, "text + regions per batch per GPU"),
    "data.bucket_size": Int(1, 2**31),
    "data.max_batch_size": Int(0, 2**24, "0: no limit but data.token_budget"),
    "data.num_workers": Int(0, 256, "loader processes per GPU"),
    "data.verify": BOOL,
    "data.allow_outside": BOOL,
    "data.eval_split": OPTIONAL_TEXT,
    "data.captions_cache": TEXT,
    # tasks
    "tasks.mix": MIX,
    "tasks.masking": NAME,  # conditional / joint: config.check says which
    "tasks.mask_prob": Float(0, 1, lo_open=True, hi_open=True, why="a share of the words or regions"),
    "tasks.itm_neg_prob": Float(0, 1, why="a probability"),
    "tasks.itm_neg_window": Int(0, BIG, "0: negatives from all images"),
    "tasks.wra_weight": Float(0, 1e3, why="0 turns word-region alignment off"),
    "tasks.wra_iterations": Int(1, 10_000, "IPOT iterations in every ITM step"),
    "tasks.wra_beta": Float(0, 1e3, lo_open=True),
    "tasks.itm_center_grad": NAME,  # auto / on / off: config.check says which
    # optim
    "optim.lr": Float(0, 10, why="the peak learning rate; 0 leaves the weights as they are"),
    "optim.betas": BETAS,
    "optim.eps": Float(0, 1, lo_open=True, hi_open=True),
    "optim.weight_decay": Float(0, 1, why="AdamW's decoupled decay per unit of learning rate"),
    "optim.warmup_steps": Int(0, BIG),
    "optim.steps": Int(1, BIG),
    "optim.grad_clip": Float(0, 1e6, why="the largest gradient norm, 0: no clipping; a negative norm would flip "
                             "every gradient, training by gradient ascent"),
    "optim.accum_steps": Int(1, 2**16),
    "optim.task_state": NAME,  # auto / shared / per_task: config.check says which
    # run
    "run.out": TEXT,
    "run.seed": Int(0, 2**63 - 1),
    "run.device": DEVICE,
    "run.precision": NAME,  # fp32 / bf16 / fp16: config.check says which
    "run.init_from": TEXT,
    "run.log_every": Int(1, BIG),
    "run.checkpoint_every": Int(0, BIG, "0: only at the end"),
    "run.keep_checkpoints": Int(0, 10**6, "0: keep all"),
    "run.eval_every": Int(0, BIG, "0: only at the end"),
    "run.eval_pairs": Int(0, BIG),
    "run.eval_images": Int(0, BIG),
    "run.eval_batch_pairs": Int(1, 2**24),
    "run.tensorboard": BOOL,
    "run.plot": BOOL,
}


def _problem(key: str, rule, value) -> str | None:
    """Why value is not allowed for key, or None."""
    if isinstance(rule, Range):
        if rule.holds(value):
            return None
        why = f" ({rule.why})" if rule.why else ""
        return f"{key} = {value!r} is out of range: it must be {rule.describe()}{why}"
    if rule == BOOL:
        return None if isinstance(value, bool) else f"{key} = {value!r} must be true or false"
    if rule == TEXT:
        return None if isinstance(value, str) else f"{key} = {value!r} must be a string"
    if rule in (OPTIONAL_TEXT, NAME):
        return None if value is None and rule == OPTIONAL_TEXT or isinstance(value, str) and value else \
            f"{key} = {value!r} must be a non-empty string{' or null' if rule == OPTIONAL_TEXT else ''}"
    if rule == PATHS:
        ok = isinstance(value, list) and all(isinstance(p, str) and p for p in value)
        return None if ok else f"{key} = {value!r} must be a list of paths"
    if rule == MIX:
        if not isinstance(value, dict):
            return f"{key} = {value!r} must be a table of task ratios"
        for task, r in value.items():
            if isinstance(r, bool) or not isinstance(r, (int, float)) or not (math.isfinite(r) and 0 <= r <= 1e6):
                return f"{key}.{task} = {r!r} is out of range: a ratio is a finite number >= 0"
        return None
    if rule == BETAS:
        ok = isinstance(value, list) and len(value) == 2 and all(Float(0, 1, hi_open=True).holds(b) for b in value)
        return None if ok else f"{key} = {value!r} must be two numbers >= 0 and < 1 (Adam's beta1, beta2)"
    if rule == DEVICE:
        return None if value == "auto" or _is_device(value) else \
            f"{key} = {value!r} is not a device: auto, cpu, cuda, cuda:N"
    raise AssertionError(f"no check for rule {rule!r}")


def _is_device(value) -> bool:
    if not isinstance(value, str):
        return False
    import torch

    try:
        torch.device(value)
    except (RuntimeError, ValueError):
        return False
    return True


def check_ranges(cfg) -> None:
    """Raise ValueError naming every config value that is out of range (all at once)."""
    problems = []
    for section in dataclasses.fields(cfg):
        obj = getattr(cfg, section.name)
        for f in dataclasses.fields(obj):
            key = f"{section.name}.{f.name}"
            rule = RULES.get(key)
            if rule is None:  # a setting added without a rule: at least no NaN, inf or negative number
                rule = Float(0, math.inf) if isinstance(getattr(obj, f.name), (int, float)) else None
                if rule is None or isinstance(getattr(obj, f.name), bool):
                    continue
            problem = _problem(key, rule, getattr(obj, f.name))
            if problem:
                problems.append(problem)
    if problems:
        raise ValueError("; ".join(problems))
