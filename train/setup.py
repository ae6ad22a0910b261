"""Build a run from its Config: shards, captions, tokenizer, loader, model, optimizer; then train."""

from __future__ import annotations

import dataclasses
import os

import torch

from regionbert.data import ShardSet

from .checkpoint import load_checkpoint
from .config import Config, save_config
from .data import PairDataset, Pairs, TaskSampler, TokenBucketSampler, collate
from .loop import train
from .masking import REGION_TASKS
from .model import num_parameters
from .optim import build_optimizer, build_scheduler
from .pretrainer import Pretrainer
from .text import Text


def resolve_model(cfg: Config, shards: ShardSet, text: Text) -> None:
    """Fill in what the data decides: vocabulary size, feature dim, number of detector classes."""
    names = shards.meta["class_names"]
    cfg.model.vocab_size, cfg.model.feature_dim = text.vocab_size, shards.meta["feature_dim"]
    cfg.model.num_classes = len(names) if names else 0
    wants_classes = [t for t in ("mrc", "mrc_kl") if cfg.tasks.mix.get(t, 0) > 0]
    if not names and wants_classes:
        raise ValueError(f"tasks {wants_classes} need the detector's class distributions, but the shards "
                         f"({shards.shards[0].path}, ...) store none; set their ratios to 0")


def build_data(cfg: Config, split: str | None, skip: int = 0, num_workers: int | None = None):
    """(pairs, dataset, buckets, loader) for one split of the manifest."""
    d = cfg.data
    if not d.shards or not d.captions or not d.tokenizer:
        raise ValueError("data.shards, data.captions and data.tokenizer must all be set")
    shards = ShardSet(d.shards, verify=d.verify)
    text = Text(d.tokenizer, cfg.model.max_text_len, d.lowercase)
    resolve_model(cfg, shards, text)
    pairs = Pairs(shards, d.captions, text, split, d.max_regions)
    dataset = PairDataset(shards, pairs, text, cfg.tasks.masking, cfg.tasks.mask_prob, d.max_regions, cfg.model.loc_dim)
    buckets = TokenBucketSampler(pairs.lengths, d.token_budget, d.bucket_size, seed=cfg.run.seed,
                                 max_batch_size=d.max_batch_size or None)
    sampler = TaskSampler(buckets, pairs, cfg.tasks.mix, cfg.run.seed, cfg.tasks.itm_neg_prob,
                          cfg.tasks.itm_neg_window, skip=skip)
    workers = d.num_workers if num_workers is None else num_workers
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                                         persistent_workers=workers > 0, prefetch_factor=4 if workers else None,
                                         pin_memory=torch.cuda.is_available())
    return pairs, dataset, buckets, loader


def build_model(cfg: Config) -> Pretrainer:
    t = cfg.tasks
    return Pretrainer(cfg.model, t.wra_weight, t.wra_iterations, t.wra_beta)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def run(cfg: Config, resume: bool = False, print_fn=print) -> dict:
    """Train as cfg says, in cfg.run.out (config.json, log.jsonl, checkpoint.pt). Returns the last report."""
    out = cfg.run.out
    os.makedirs(out, exist_ok=True)
    ckpt_path = os.path.join(out, "checkpoint.pt")
    state = load_checkpoint(ckpt_path) if resume and os.path.exists(ckpt_path) else None
    start = state["step"] if state else 0
    torch.manual_seed(cfg.run.seed + start)
    pairs, dataset, buckets, loader = build_data(cfg, cfg.data.split, skip=start * cfg.optim.accum_steps)
    if state and state["config"].get("model") != dataclasses.asdict(cfg.model):
        raise ValueError(f"{ckpt_path}: its model config differs from this run's; resume with the same model")
    device = pick_device(cfg.run.device)
    model = build_model(cfg).to(device)
    o = cfg.optim
    optimizer = build_optimizer(model, o.lr, o.weight_decay, o.betas, o.eps)
    scheduler = build_scheduler(optimizer, o.warmup_steps, o.steps)
    if state:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    save_config(cfg, os.path.join(out, "config.json"))
    if set(cfg.tasks.mix) & set(REGION_TASKS) and pairs.num_boxes.min() == 0:
        print_fn(f"note: {(pairs.num_boxes == 0).sum()} images have no boxes; region tasks skip them")
    print_fn(f"regionbert-pretrain: {len(pairs)} captions of {pairs.num_images} images, model "
             f"{num_parameters(model.encoder)} parameters on {device}, tasks "
             + ", ".join(f"{k} {v:g}" for k, v in cfg.tasks.mix.items() if v)
             + f"; padding with the token-bucket sampler {100 * buckets.padding_fraction():.1f}%"
             + (f"; resuming at step {start}" if start else ""), flush=True)
    return train(model, loader, optimizer, scheduler, steps=o.steps, start_step=start, accum_steps=o.accum_steps,
                 grad_clip=o.grad_clip, device=device, precision=cfg.run.precision, log_every_steps=cfg.run.log_every,
                 checkpoint_every=cfg.run.checkpoint_every, run_dir=out, config=cfg.to_dict(), print_fn=print_fn)
