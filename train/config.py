"""The run's configuration: dataclasses with UNITER-like defaults, read from TOML or JSON, overridden
from the command line (`--set model.num_layers=2`), saved resolved in the run folder and checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field

from .model import ModelConfig

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: JSON configs only
    tomllib = None


@dataclass
class DataConfig:
    shards: list = field(default_factory=list)  # shard folders, folders of shards or index files
    captions: str = ""  # manifest: image_id, caption[, split] (.csv, .tsv, .jsonl, .parquet)
    tokenizer: str = ""  # a BERT vocab.txt or a tokenizer.json
    lowercase: bool = True  # for vocab.txt (uncased BERT)
    split: str | None = "train"  # manifest rows to train on (None: all)
    max_regions: int = 100  # regions per image beyond this are dropped
    token_budget: int = 8192  # text + regions per batch, padding included
    bucket_size: int = 8192  # pairs sorted together by length
    max_batch_size: int = 0  # 0: no limit but the budget
    num_workers: int = 2
    verify: bool = True  # check each record's checksum as it is read
    allow_outside: bool = False  # accept index entries outside the index file's folder (docs/trust.md)
    eval_split: str | None = "val"  # held-out manifest rows for evaluation (None: no evaluation)
    # folder of the tokenized captions tables (train/captions.py); "": the manifest's folder if writable, else
    # RUN/captions
    captions_cache: str = ""


@dataclass
class TaskConfig:
    # one task per step, drawn with these ratios (UNITER's all-data mix); mrc is the hard-label variant
    mix: dict = field(default_factory=lambda: {"mlm": 0.36, "itm": 0.27, "mrfr": 0.18, "mrc_kl": 0.18, "mrc": 0.0})
    masking: str = "conditional"  # or "joint"
    mask_prob: float = 0.15
    itm_neg_prob: float = 0.5
    itm_neg_window: int = 0  # 0: negatives from any image (UNITER); N: from the 2N images nearest in box count
    wra_weight: float = 0.1  # 0 turns word-region alignment off
    wra_iterations: int = 50
    wra_beta: float = 0.5
    # ITM's gradient into the encoder minus its batch mean (docs/itm-plateau.md): "auto" on from scratch, off
    # with run.init_from (UNITER's); "on"; "off"
    itm_center_grad: str = "auto"


@dataclass
class OptimConfig:
    lr: float = 5e-5
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    weight_decay: float = 0.01
    warmup_steps: int = 10000
    steps: int = 200000  # optimizer steps
    grad_clip: float = 5.0  # 0: off
    accum_steps: int = 1  # batches per optimizer step (each with its own task)
    # Adam's moments: "shared" by every task (UNITER's), or kept "per_task" (each task's steps normalised by
    # its own gradients: docs/itm-plateau.md); "auto": per_task from scratch with accum_steps 1, shared with
    # run.init_from or accum_steps > 1
    task_state: str = "auto"


@dataclass
class RunConfig:
    out: str = "runs/pretrain"
    seed: int = 0
    device: str = "auto"  # auto: cuda when available
    precision: str = "fp32"  # fp32, bf16 (autocast) or fp16 (autocast + loss scaling); bf16/fp16 on CUDA only
    init_from: str = ""  # a local Hugging Face BERT folder: text embeddings, encoder, pooler and MLM head
    log_every: int = 100  # steps
    checkpoint_every: int = 5000  # steps; 0: only at the end
    keep_checkpoints: int = 2  # the newest N in RUN/checkpoints (0: all)
    eval_every: int = 0  # steps; 0: only at the end
    eval_pairs: int = 1000  # held-out captions for MLM / MRC / ITM accuracy
    eval_images: int = 100  # held-out images for retrieval (all their captions); UNITER reports 1000
    eval_batch_pairs: int = 512  # (caption, image) pairs scored per forward pass in retrieval
    tensorboard: bool = True  # RUN/tensorboard when the tensorboard package is installed
    plot: bool = True  # RUN/curves.png at the end of a run (matplotlib)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    tasks: TaskConfig = field(default_factory=TaskConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


SECTIONS = {f.name: f.type for f in dataclasses.fields(Config)}


def _coerce(value, default, where: str):
    """value, checked against the type of the field's default (ints widen to floats)."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise ValueError(f"{where}: expected true or false, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, type(default)) or isinstance(value, bool) and not isinstance(default, bool):
        raise ValueError(f"{where}: expected {type(default).__name__}, got {value!r}")
    return value


def config_from_dict(d: dict, source: str = "config") -> Config:
    """A Config from nested dicts; unknown sections or keys are errors naming them."""
    cfg = Config()
    for section, values in d.items():
        if section not in SECTIONS:
            raise ValueError(f"{source}: unknown section {section!r}; known: {sorted(SECTIONS)}")
        if not isinstance(values, dict):
            raise ValueError(f"{source}: [{section}] must be a table of settings")
        for key, value in values.items():
            set_value(cfg, f"{section}.{key}", value, source)
    return cfg


def set_value(cfg: Config, dotted: str, value, source: str = "--set") -> None:
    """cfg.section.key = value (or cfg.tasks.mix.task = ratio), type-checked."""
    parts = dotted.split(".")
    if len(parts) < 2 or parts[0] not in SECTIONS:
        raise ValueError(f"{source}: {dotted!r} is not section.key with section one of {sorted(SECTIONS)}")
    obj = getattr(cfg, parts[0])
    names = [f.name for f in dataclasses.fields(obj)]
    if parts[1] not in names:
        raise ValueError(f"{source}: unknown setting {dotted!r}; {parts[0]} has {names}")
    where = f"{source}: {dotted}"
    if parts[:2] == ["tasks", "mix"]:
        from .tasks import TASKS

        mix = dict(obj.mix) if len(parts) == 3 else {}
        items = {parts[2]: value} if len(parts) == 3 else value
        if not isinstance(items, dict):
            raise ValueError(f"{where}: expected a table of task ratios")
        for task, ratio in items.items():
            if task not in TASKS:
                raise ValueError(f"{where}: unknown task {task!r}; tasks are {sorted(TASKS)}")
            if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or ratio < 0:
                raise ValueError(f"{where}: ratio of {task} must be a number >= 0, got {ratio!r}")
            mix[task] = float(ratio)
        obj.mix = mix
        return
    if len(parts) != 2:
        raise ValueError(f"{source}: unknown setting {dotted!r}")
    if parts[1] == "shards" and isinstance(value, str):
        value = [value]
    setattr(obj, parts[1], _coerce(value, getattr(obj, parts[1]), where))


def parse_override(text: str) -> tuple[str, object]:
    """'model.num_layers=2' -> ('model.num_layers', 2). Values are JSON (2, 0.1, true, "a", [1, 2],
    {"mlm": 1}, null); anything that does not parse as JSON is taken as a string (paths need no quotes)."""
    if "=" not in text:
        raise ValueError(f"--set {text!r}: expected key=value")
    key, raw = (s.strip() for s in text.split("=", 1))
    try:
        value = json.loads(raw)
    except ValueError:
        value = None if raw.lower() == "none" else raw
    except RecursionError:
        raise ValueError(f"--set {key}: its value is nested too deeply to be a setting") from None
    return key, value


def load_config(path: str | None = None, overrides: list[str] = ()) -> Config:
    d = {}
    if path:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: config file not found")
        if not path.endswith(".json") and tomllib is None:
            raise ValueError(f"{path}: TOML configs need Python 3.11+; use a JSON config")
        with open(path, "rb") as f:
            try:
                d = json.load(f) if path.endswith(".json") else tomllib.load(f)
            except ValueError as e:  # TOMLDecodeError is a ValueError
                raise ValueError(f"{path}: not valid {'JSON' if path.endswith('.json') else 'TOML'}: {e}") from None
            except RecursionError:  # e.g. [[[[... 100,000 deep: no config nests more than a few levels
                raise ValueError(f"{path}: nested too deeply to be a config") from None
        if not isinstance(d, dict):
            raise ValueError(f"{path}: a config is a table of sections (model, data, ...), not a "
                             f"{type(d).__name__}")
        base = os.path.dirname(os.path.abspath(path))  # relative data paths are relative to the config file
        data = d.get("data") if isinstance(d.get("data"), dict) else {}  # (not a table: config_from_dict says so)
        run = d.get("run") if isinstance(d.get("run"), dict) else {}
        for k in ("captions", "tokenizer"):
            if isinstance(data.get(k), str) and data[k]:
                data[k] = os.path.join(base, data[k])
        if isinstance(run.get("init_from"), str) and run["init_from"]:
            run["init_from"] = os.path.join(base, run["init_from"])
        if isinstance(data.get("shards"), (str, list)):
            s = data["shards"]
            data["shards"] = [os.path.join(base, p) if isinstance(p, str) else p
                              for p in ([s] if isinstance(s, str) else s)]
    cfg = config_from_dict(d, path or "config")
    for o in overrides:
        set_value(cfg, *parse_override(o))
    check(cfg)
    return cfg


def check(cfg: Config) -> None:
    from .ranges import check_ranges

    check_ranges(cfg)  # every value in its range, naming the key (train/ranges.py)
    ModelConfig(**dataclasses.asdict(cfg.model))  # re-runs its checks
    if cfg.tasks.itm_center_grad not in ("auto", "on", "off"):
        raise ValueError(f"tasks.itm_center_grad must be auto, on or off, got {cfg.tasks.itm_center_grad!r}")
    if cfg.optim.task_state not in ("auto", "shared", "per_task"):
        raise ValueError(f"optim.task_state must be auto, shared or per_task, got {cfg.optim.task_state!r}")
    if cfg.optim.task_state == "per_task" and cfg.optim.accum_steps > 1:
        raise ValueError("optim.task_state=per_task needs optim.accum_steps=1: a step that sums several tasks' "
                         "batches has no one task whose moments it would update")
    if cfg.tasks.masking not in ("conditional", "joint"):
        raise ValueError(f"tasks.masking must be conditional or joint, got {cfg.tasks.masking!r}")
    if cfg.run.precision not in ("fp32", "bf16", "fp16"):
        raise ValueError(f"run.precision must be fp32, bf16 or fp16, got {cfg.run.precision!r}")
    if not sum(cfg.tasks.mix.values()) > 0:
        raise ValueError(f"tasks.mix gives no task a positive ratio: {cfg.tasks.mix}")
    for k in ("steps", "accum_steps"):
        if getattr(cfg.optim, k) < 1:
            raise ValueError(f"optim.{k} must be >= 1")
    for k in ("log_every", "eval_batch_pairs"):
        if getattr(cfg.run, k) < 1:
            raise ValueError(f"run.{k} must be >= 1")
    for k in ("checkpoint_every", "keep_checkpoints", "eval_every", "eval_pairs", "eval_images"):
        if getattr(cfg.run, k) < 0:
            raise ValueError(f"run.{k} must be >= 0")


def save_config(cfg: Config, path: str) -> None:
    with open(path, "w") as f:
        json.dump(cfg.to_dict(), f, indent=1)
        f.write("\n")
