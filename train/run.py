"""Build a run from its Config: process group, shards, captions, tokenizer, loader, model, optimizer,
evaluation data; resume from a checkpoint or start from a BERT; then train."""

from __future__ import annotations

import dataclasses
import os
import warnings

import numpy as np
import torch

from regionbert.data import ShardSet

from .bert import apply_bert_config, bert_tokenizer, load_bert
from .captions import default_cache
from .checkpoint import check_resumable, load_checkpoint, resolve_resume, rng_state, save_run_checkpoint, set_rng_state
from .config import Config, check, save_config
from .data import (
    SHM,
    Loader,
    PairDataset,
    Pairs,
    TaskSampler,
    TokenBucketSampler,
    batch_bytes,
    collate,
    shared_memory_remedy,
)
from .distributed import Dist, close_distributed, digests_agree, gather_tensors, init_distributed
from .evaluate import evaluate_held_out
from .loop import autocast_for, train
from .masking import REGION_TASKS
from .metrics import Logger, trim_log
from .model import num_parameters
from .optim import build_optimizer, build_scheduler, task_state_per_task
from .pretrainer import Pretrainer
from .text import NoRows, Text


def resolve_model(cfg: Config, shards: ShardSet, text: Text) -> None:
    """Fill in what the data decides: vocabulary size, feature dim, number of detector classes."""
    names = shards.meta["class_names"]
    if cfg.run.init_from and text.vocab_size != cfg.model.vocab_size:
        raise ValueError(f"data.tokenizer {text.path} has {text.vocab_size} tokens but the BERT in run.init_from "
                         f"({cfg.run.init_from}) has {cfg.model.vocab_size}; use that BERT's vocab.txt")
    cfg.model.vocab_size, cfg.model.feature_dim = text.vocab_size, shards.meta["feature_dim"]
    cfg.model.num_classes = len(names) if names else 0
    wants_classes = [t for t in ("mrc", "mrc_kl") if cfg.tasks.mix.get(t, 0) > 0]
    if not names and wants_classes:
        raise ValueError(f"tasks {wants_classes} need the detector's class distributions, but the shards "
                         f"({shards.shards[0].path}, ...) store none; set their ratios to 0")


def build_data(cfg: Config, split: str | None, skip: int = 0, num_workers: int | None = None, rank: int = 0,
               world_size: int = 1):
    """(pairs, dataset, buckets, loader) for one split of the manifest; the loader yields this rank's batches."""
    d = cfg.data
    if not d.shards or not d.captions or not d.tokenizer:
        raise ValueError("data.shards, data.captions and data.tokenizer must all be set")
    shards = ShardSet(d.shards, verify=d.verify, allow_outside=d.allow_outside)
    text = Text(d.tokenizer, cfg.model.max_text_len, d.lowercase)
    resolve_model(cfg, shards, text)
    pairs = Pairs(shards, d.captions, text, split, d.max_regions, captions_cache(cfg))
    dataset = PairDataset(shards, pairs, text, cfg.tasks.masking, cfg.tasks.mask_prob, d.max_regions, cfg.model.loc_dim)
    buckets = TokenBucketSampler(pairs.lengths, d.token_budget, d.bucket_size, seed=cfg.run.seed,
                                 max_batch_size=d.max_batch_size or None)
    sampler = TaskSampler(buckets, pairs, cfg.tasks.mix, cfg.run.seed, cfg.tasks.itm_neg_prob,
                          cfg.tasks.itm_neg_window, skip=skip, rank=rank, world_size=world_size)
    workers = d.num_workers if num_workers is None else num_workers
    # the loader's own generator: creating its iterator must not draw from the global torch RNG (which
    # drives dropout and is checkpointed), or a resumed run would drift from an uninterrupted one
    # with workers each batch comes in a worker's reused shared buffer (data.WorkerRing), as many per worker
    # as batches can be in flight (prefetch_factor) and held by the trainer (DeviceFeed: 2) plus slack; on
    # CUDA those buffers are pinned where the main process maps them (Loader), not copied into pinned memory
    cuda = torch.cuda.is_available()
    prefetch = 4  # batches each worker keeps ready
    dataset.ring_slots = prefetch + 4
    if workers > 0:
        check_shared_memory(workers, largest_batch_bytes(dataset, d.token_budget), dataset.ring_slots, prefetch)
    loader = Loader(dataset, batch_sampler=sampler, collate_fn=collate, num_workers=workers,
                    persistent_workers=workers > 0, prefetch_factor=prefetch if workers else None,
                    pin_memory=cuda and not workers, pin_buffers=cuda and workers > 0,
                    generator=torch.Generator().manual_seed(cfg.run.seed))
    return pairs, dataset, buckets, loader


def largest_batch_bytes(dataset: PairDataset, token_budget: int) -> int:
    """An upper bound on one batch's bytes in a worker's shared buffer: every token of the budget (or of the
    longest pair, alone in its batch) a region, with its feature, location and class distribution."""
    tokens = max(token_budget, int(dataset.pairs.lengths.max(initial=0)))
    return batch_bytes(tokens, 1, 1, dataset.widths)


def check_shared_memory(workers: int, per_batch: int, slots: int, prefetch: int, path: str = SHM) -> None:
    """Refuse, before any worker starts, a loader whose workers cannot hold the batches they prefetch in
    shared memory (a container's /dev/shm is 64 MB unless told otherwise; one batch of 2048-d features at the
    default budget is ~34 MB, ~60 MB with VG's 1,601 classes): the workers would fail at their first batches
    with torch's 'unable to allocate shared memory', or hours later as their buffers grow (_from_worker then
    says so in one line). Warn where it may run out later. Every rank of a node (torchrun's LOCAL_WORLD_SIZE)
    shares the node's /dev/shm."""
    try:
        st = os.statvfs(path)
    except OSError:  # no /dev/shm: not Linux, torch shares memory another way
        return
    free = st.f_bavail * st.f_frsize
    ranks = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1))
    soon, most = ranks * workers * prefetch * per_batch, ranks * workers * slots * per_batch * 3 // 2

    def mb(n: int) -> str:
        return f"{n / 2**20:,.0f} MB"

    who = f"data.num_workers={workers}" + (f" on each of {ranks} ranks of this node" if ranks > 1 else "")
    remedy = shared_memory_remedy(path)
    if free < soon:
        raise ValueError(f"{who}: the loader's workers hold their batches in shared memory, {prefetch} batches "
                         f"each of up to {mb(per_batch)} at once ({mb(soon)}), but {path} has {mb(free)} free: "
                         f"{remedy}; data.num_workers=0 loads in the training process and needs none")
    if free < most:
        warnings.warn(f"{who}: the loader's workers may come to hold up to {mb(most)} of shared memory as their "
                      f"buffers grow to the largest batches, and {path} has {mb(free)} free; if it runs out the "
                      f"run stops: {remedy}", stacklevel=2)


def captions_cache(cfg: Config) -> str:
    """The folder of the run's tokenized captions tables: data.captions_cache, else the manifest's folder
    where writable (so runs on the same data share them), else RUN/captions."""
    return cfg.data.captions_cache or default_cache(cfg.data.captions, os.path.join(cfg.run.out, "captions"))


def prepare(cfg: Config) -> list[str]:
    """Build (or check) the captions tables of the training and evaluation splits, and stop: what
    `regionbert-pretrain --prepare-only` does before a job, so that its ranks start by reading them."""
    d = cfg.data
    if not d.shards or not d.captions or not d.tokenizer:
        raise ValueError("data.shards, data.captions and data.tokenizer must all be set")
    shards = ShardSet(d.shards, verify=d.verify, allow_outside=d.allow_outside)
    text = Text(d.tokenizer, cfg.model.max_text_len, d.lowercase)
    out = []
    for split in dict.fromkeys([d.split] + ([d.eval_split] if d.eval_split is not None else [])):
        try:
            pairs = Pairs(shards, d.captions, text, split, d.max_regions, captions_cache(cfg))
        except NoRows:
            if split == d.split:
                raise
            continue  # no held-out rows: training goes on without evaluation
        out.append(f"{pairs.table.path}: {len(pairs)} captions of {pairs.num_images} images "
                   f"({'built' if pairs.table.built else 'already built'})")
    return out


def build_model(cfg: Config) -> Pretrainer:
    t = cfg.tasks
    center = t.itm_center_grad == "on" or t.itm_center_grad == "auto" and not cfg.run.init_from
    return Pretrainer(cfg.model, t.wra_weight, t.wra_iterations, t.wra_beta, center)


def apply_init_from(cfg: Config) -> list[str]:
    """run.init_from: the BERT's architecture into cfg.model, its tokenizer into data.tokenizer if unset."""
    if not cfg.run.init_from:
        return []
    source = os.path.join(cfg.run.init_from, "config.json")
    try:
        changed = apply_bert_config(cfg.model, cfg.run.init_from)
    except ValueError as e:
        if str(e).startswith(source):  # read_bert_config's own errors name the file already
            raise
        raise ValueError(f"{source}: {e}") from None
    except (TypeError, AttributeError, OverflowError, RecursionError, KeyError) as e:  # a list, null, 1e999, ...
        raise ValueError(f"{source}: not a BERT config this can read ({type(e).__name__}: {e})") from None
    if cfg.model.itm_head_init == "auto":  # BERT's pooler is loaded; the ITM classifier at 0.02 (UNITER)
        cfg.model.itm_head_init = "bert"
        changed.append("model.itm_head_init: auto -> bert")
    if cfg.tasks.itm_center_grad == "auto":  # ITM's full gradient into the encoder (UNITER)
        cfg.tasks.itm_center_grad = "off"
        changed.append("tasks.itm_center_grad: auto -> off")
    if cfg.optim.task_state == "auto":  # one set of Adam moments for every task (UNITER)
        cfg.optim.task_state = "shared"
        changed.append("optim.task_state: auto -> shared")
    if not cfg.data.tokenizer:
        found = bert_tokenizer(cfg.run.init_from)
        if not found:
            raise ValueError(f"{cfg.run.init_from}: no vocab.txt or tokenizer.json; set data.tokenizer")
        cfg.data.tokenizer, cfg.data.lowercase = found
    try:  # the BERT's values pass the same ranges as the config's own (num_hidden_layers -1 trained no layers)
        check(cfg)
    except ValueError as e:
        raise ValueError(f"{source}: gives a model out of range: {e}") from None
    return changed


def gather_rng(d: Dist) -> list[dict]:
    """Every rank's RNG states (rank order), for the checkpoint. A collective: all ranks call it."""
    mine = rng_state()
    per_key = {k: gather_tensors(v.to(d.device), d) if v.numel() else [v] * d.world_size for k, v in mine.items()}
    return [{k: per_key[k][r].cpu() for k in mine} for r in range(d.world_size)]


def run(cfg: Config, resume: str | None = None, print_fn=print) -> dict:
    """Train as cfg says, in cfg.run.out (config.json, log.jsonl, checkpoint.pt, checkpoints/, curves.png).
    resume: "latest" (RUN/checkpoint.pt if there is one) or a checkpoint file. Under torchrun, one
    process per device. Returns the last training report."""
    started = not torch.distributed.is_initialized()
    d = init_distributed(cfg.run.device)
    try:
        report = _run(cfg, resume, print_fn, d)
    except BaseException:
        if started:
            close_distributed(wait=False)
        raise
    if started:
        close_distributed()
    return report


def _run(cfg: Config, resume, print_fn, d: Dist) -> dict:
    out = cfg.run.out
    logger = Logger(out, d, print_fn, cfg.run.tensorboard)
    if d.is_main:
        os.makedirs(out, exist_ok=True)
    if resume is True:
        resume = "latest"
    ckpt = resolve_resume(resume, out)
    if resume and not ckpt:
        logger.print(f"no checkpoint in {out} yet: starting from step 0")
    state = load_checkpoint(ckpt) if ckpt else None
    for change in apply_init_from(cfg):
        logger.print(f"{cfg.run.init_from}: {change}")
    if cfg.run.precision != "fp32" and d.device.type != "cuda":
        raise ValueError(f"run.precision={cfg.run.precision} needs a CUDA device (this run is on {d.device})")
    start = state["step"] if state else 0
    starts = [int(t) for t in gather_tensors(torch.tensor([start], device=d.device), d)]
    if len(set(starts)) > 1:  # e.g. nodes that do not share the run folder
        raise ValueError(f"the ranks found different checkpoints in {out} (steps {starts}): the run folder must be "
                         "on a filesystem every node shares")
    o = cfg.optim
    position = (state.get("data") or {}) if state else {}
    skip = position.get("batches", start * o.accum_steps)  # batches this rank has consumed
    torch.manual_seed(cfg.run.seed)  # the same initial weights on every rank
    pairs, dataset, buckets, loader = build_data(cfg, cfg.data.split, skip=skip, rank=d.rank,
                                                 world_size=d.world_size)
    if state and state["config"].get("model") != dataclasses.asdict(cfg.model):
        raise ValueError(f"{ckpt}: its model config differs from this run's; resume with the same model")
    if state and position.get("world_size", d.world_size) != d.world_size:
        logger.print(f"note: {ckpt} was written by {position['world_size']} processes, this run has "
                     f"{d.world_size}: the data order from here on differs from the original run's")
    model = build_model(cfg)
    if cfg.run.init_from and not state:
        loaded = load_bert(model, cfg.run.init_from)
        logger.print(f"initialised {len(loaded)} tensors from the BERT in {cfg.run.init_from}")
    model.to(d.device)
    optimizer = build_optimizer(model, o.lr, o.weight_decay, o.betas, o.eps,
                                per_task=task_state_per_task(o.task_state, cfg.run.init_from, o.accum_steps))
    scheduler = build_scheduler(optimizer, o.warmup_steps, o.steps)
    scaler = torch.amp.GradScaler(d.device.type, enabled=cfg.run.precision == "fp16")
    if state:
        check_resumable(ckpt, state, model, optimizer, scheduler)  # parts and shapes, naming the checkpoint
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        rng = state.get("rng") or []
        if len(rng) == d.world_size:
            set_rng_state(rng[d.rank])  # dropout continues exactly where it stopped
    elif d.rank:
        torch.manual_seed(cfg.run.seed + d.rank)  # each rank its own dropout masks
    raw = model
    if d.enabled:
        # a step trains one task, so the other tasks' heads get no gradient: DDP must look for unused
        # parameters (they are unused on every rank alike, so their .grad stays None and AdamW skips them)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.device] if d.device.type == "cuda" else None, find_unused_parameters=True)
    if d.is_main:
        save_config(cfg, os.path.join(out, "config.json"))
        trim_log(os.path.join(out, "log.jsonl"), start)  # a resumed run redoes the steps after the checkpoint
    if set(cfg.tasks.mix) & set(REGION_TASKS) and pairs.num_boxes.min() == 0:
        logger.print(f"note: {(pairs.num_boxes == 0).sum()} images have no boxes; region tasks skip them")
    logger.print(f"regionbert-pretrain: {len(pairs)} captions of {pairs.num_images} images, model "
                 f"{num_parameters(raw.encoder)} parameters on {d.world_size} x {d.device.type}, tasks "
                 + ", ".join(f"{k} {v:g}" for k, v in cfg.tasks.mix.items() if v)
                 + f"; padding with the token-bucket sampler {100 * buckets.padding_fraction():.1f}%"
                 + (f"; resuming at step {start} from {ckpt}" if start else ""), flush=True)

    def save(step: int) -> None:
        rng = gather_rng(d)  # a collective
        if d.is_main:
            save_run_checkpoint(out, step, cfg.run.keep_checkpoints, model=raw, optimizer=optimizer,
                                scheduler=scheduler, config=cfg.to_dict(), scaler=scaler.state_dict(), rng=rng,
                                data={"batches": step * o.accum_steps, "world_size": d.world_size,
                                      "seed": cfg.run.seed})

    evaluate = build_evaluation(cfg, d, logger) if cfg.data.eval_split else None
    report = train(model, loader, optimizer, scheduler, steps=o.steps, start_step=start, accum_steps=o.accum_steps,
                   grad_clip=o.grad_clip, device=d.device, precision=cfg.run.precision, scaler=scaler,
                   log_every_steps=cfg.run.log_every, checkpoint_every=cfg.run.checkpoint_every,
                   eval_every=cfg.run.eval_every, save=save, evaluate=evaluate and (lambda step: evaluate(raw)),
                   logger=logger, d=d)
    if d.enabled:  # the replicas must have stayed identical: say so, or fail loudly
        digests = digests_agree(raw, d)
        if len(set(digests)) != 1:
            raise RuntimeError(f"the {d.world_size} ranks ended with different parameters: {digests}")
        logger.print(f"parameters identical on all {d.world_size} ranks (sha256 {digests[0][:16]})")
        logger.write({"step": o.steps, "replica_digests": digests})
    logger.close()
    if d.is_main and cfg.run.plot:
        try:
            from .plot import plot_run
        except ImportError:
            pass
        else:
            try:
                path = plot_run(out)
                logger.print(f"training curves: {path}")
            except ImportError:
                logger.print("note: matplotlib is not installed; no curves.png")
    return report


def build_evaluation(cfg: Config, d: Dist, logger: Logger):
    """evaluate(model) -> held-out metrics on data.eval_split; None (with a note) when the manifest has no
    such rows."""
    try:
        pairs, dataset, _, _ = build_data(cfg, cfg.data.eval_split, num_workers=0)
    except NoRows as e:  # a manifest without held-out rows: train anyway, and say so
        logger.print(f"note: no held-out evaluation: data.eval_split={cfg.data.eval_split!r}: {e}")
        return None
    tasks = [t for t, r in cfg.tasks.mix.items() if r > 0]
    neg = None
    if "itm" in tasks and pairs.num_images > 1:
        neg = TaskSampler(TokenBucketSampler(pairs.lengths, cfg.data.token_budget), pairs, {"itm": 1},
                          cfg.run.seed, neg_window=cfg.tasks.itm_neg_window).negatives(
            pairs.image, np.random.default_rng(cfg.run.seed))
    autocast = autocast_for(d.device, cfg.run.precision)
    r = cfg.run
    logger.print(f"held-out evaluation: {min(r.eval_pairs, len(pairs))} of {len(pairs)} '{cfg.data.eval_split}' "
                 f"captions for accuracy, {min(r.eval_images, pairs.num_images)} images for retrieval")

    def progress(done, total):
        if total >= 20 and done % (total // 10) == 0:
            logger.print(f"  retrieval: {done}/{total} blocks", flush=True)

    def evaluate(model) -> dict:
        return evaluate_held_out(model, dataset, tasks, eval_pairs=r.eval_pairs, eval_images=r.eval_images,
                                 batch_pairs=r.eval_batch_pairs, token_budget=cfg.data.token_budget, seed=r.seed,
                                 device=d.device, d=d, autocast=autocast, neg_image=neg, progress=progress)
    return evaluate
