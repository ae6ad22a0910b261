"""Evaluation on held-out data: accuracy of the pretraining heads, and zero-shot retrieval.

- Accuracy (`evaluate`): ITM (match / no match, half the pairs mismatched), MLM (masked words), MRC
  (masked regions' most likely detector class, by the MRC head, or the MRC-kl head's argmax).
- Retrieval (`itm_scores` + `retrieval_recall`): every caption of a held-out subset of images is scored
  against every image by the ITM head (logit match - logit no-match), UNITER's zero-shot protocol;
  R@1/5/10 for image -> text (an image's query succeeds if any of its captions is in the top k) and
  text -> image. Scoring is batched: each image's regions and each caption's tokens are read once,
  and one forward pass scores a block of (images x captions) pairs, so 1k images x 5k captions (5M
  pairs) is a matter of minutes on a GPU. Ties are counted against the model.

Under torchrun each rank scores its share (batches b with b % world_size == rank) and the results are
summed over ranks.
"""

from __future__ import annotations

import contextlib
import time
from collections import defaultdict

import numpy as np
import torch

from .data import PairDataset, collate, to_device
from .distributed import SINGLE, Dist, all_reduce_sum
from .masking import IGNORE
from .tasks.mrc import hard_labels


def _unwrap(model):
    return model.module if hasattr(model, "module") else model


@torch.no_grad()
def evaluate(model, batches, device="cpu", d: Dist = SINGLE, autocast=None) -> dict:
    """{"itm_acc", "mlm_acc", "mrc_acc", ...: fraction correct} over the batches, by what each holds:
    itm batches: match / no match; any batch with mlm_labels: masked words; mrc and mrc_kl batches:
    the masked regions' most likely detector class (the MRC-kl head's argmax for mrc_kl).
    With d: this rank takes batches d.rank, d.rank + world_size, ...; counts are summed over ranks."""
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    right, total = defaultdict(int), defaultdict(int)
    autocast = autocast or contextlib.nullcontext()

    def count(name, pred, target):
        right[name] += int((pred == target).sum())
        total[name] += int(target.numel())

    for i, batch in enumerate(batches):
        if i % d.world_size != d.rank:
            continue
        batch = to_device(batch, device)
        task, heads = batch["task"], model.heads
        with autocast:  # the heads too: under bf16 autocast the encoder's outputs are bf16
            out = model.encode(batch)
            if task == "itm":
                count("itm_acc", heads["itm"].classify(out.pooled).argmax(-1), batch["itm_labels"])
            chosen = batch["mlm_labels"] != IGNORE
            if chosen.any():
                count("mlm_acc", heads["mlm"].logits(out.text[chosen]).argmax(-1), batch["mlm_labels"][chosen])
            masked = batch["region_mask"]
            if task in ("mrc", "mrc_kl") and masked.any():
                # the target is the best non-background class, so the prediction is too (the MRC-kl head
                # also models background, which can be its argmax when the detector is unsure)
                logits = heads[task].logits(out.regions[masked])  # (M, C)
                count(f"{task}_acc", logits[:, 1:].argmax(-1) + 1, hard_labels(batch["class_probs"][masked]))
    model.train(was_training)
    if d.enabled:
        names = ["itm_acc", "mlm_acc", "mrc_acc", "mrc_kl_acc"]
        t = torch.tensor([[right[k], total[k]] for k in names], dtype=torch.float64, device=d.device)
        all_reduce_sum(t, d)
        return {k: r / n for k, (r, n) in zip(names, t.tolist(), strict=True) if n}
    return {k: right[k] / total[k] for k in total}


def held_out_keys(pairs, tasks: list[str], seed: int = 0, neg_image=None) -> list[tuple]:
    """Dataset keys for accuracy: per pair, one sample per task (itm: the true image and, if neg_image
    is given, a mismatched one); seeds fixed by the pair, so every evaluation sees the same masks."""
    keys = []
    for p in range(len(pairs)):
        for t in tasks:
            if t == "itm":
                keys.append(("itm", p, -1, (seed, p, 0)))
                if neg_image is not None:
                    keys.append(("itm", p, int(neg_image[p]), (seed, p, 1)))
            else:
                keys.append((t, p, -1, (seed, p, 2)))
    return keys


def budget_batches(dataset: PairDataset, keys: list[tuple], token_budget: int):
    """Collated batches of the keys, one task each, sorted by length and cut by the token budget."""
    p = dataset.pairs

    def length(k):  # text + the regions of the image shown (a negative's, if any)
        return len(p.tokens[k[1]]) + int(p.num_boxes[k[2] if k[2] >= 0 else p.image[k[1]]])

    by_task = defaultdict(list)
    for k in keys:
        by_task[k[0]].append(k)
    for task in sorted(by_task):
        ks = sorted(by_task[task], key=lambda k: -length(k))
        batch, longest = [], 0
        for k in ks:
            n = max(longest, length(k))
            if batch and n * (len(batch) + 1) > token_budget:
                yield collate([dataset[x] for x in batch])
                batch, n = [], length(k)
            batch.append(k)
            longest = n
        if batch:
            yield collate([dataset[x] for x in batch])


def _pad(arrays: list[np.ndarray], width: int) -> torch.Tensor:
    """Stack (n_i, ...) arrays into (len, width, ...) zeros-padded."""
    out = np.zeros((len(arrays), width, *arrays[0].shape[1:]), dtype=arrays[0].dtype)
    for i, a in enumerate(arrays):
        out[i, : len(a)] = a
    return torch.from_numpy(out)


@torch.no_grad()
def itm_scores(model, dataset: PairDataset, captions, images, batch_pairs: int = 512, device="cpu",
               d: Dist = SINGLE, autocast=None, progress=None) -> torch.Tensor:
    """(len(captions), len(images)) ITM match scores: logit(match) - logit(no match).

    captions: pair indices (their tokens); images: image indices of dataset.pairs. A forward pass
    scores a block of ni images x nc captions, ni * nc <= batch_pairs, images and captions sorted by
    size so a block pads little. progress(done, total) is called after each block of this rank."""
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    autocast = autocast or contextlib.nullcontext()
    captions, images = np.asarray(captions), np.asarray(images)
    pairs = dataset.pairs
    tokens = [pairs.tokens[c] for c in captions]
    regions = [dataset.regions(int(i)) for i in images]  # (features (n, D), locations (n, loc)) each, read once
    cap_order = np.argsort([-len(t) for t in tokens], kind="stable")
    img_order = np.argsort([-len(f) for f, _ in regions], kind="stable")
    nc = max(1, min(len(captions), batch_pairs))
    ni = max(1, batch_pairs // nc)
    scores = torch.zeros(len(captions), len(images), dtype=torch.float32, device=device)
    blocks = [(i0, c0) for i0 in range(0, len(images), ni) for c0 in range(0, len(captions), nc)]
    mine = [b for j, b in enumerate(blocks) if j % d.world_size == d.rank]
    for done, (i0, c0) in enumerate(mine, 1):
        ii, cc = img_order[i0:i0 + ni], cap_order[c0:c0 + nc]
        feats = [regions[i][0] for i in ii]
        N = max(1, max(len(f) for f in feats))
        F_ = _pad(feats, N)  # (ni, N, D)
        Lc = _pad([regions[i][1] for i in ii], N)  # (ni, N, loc)
        rl = torch.tensor([len(f) for f in feats])
        ids = _pad([tokens[c] for c in cc], max(len(tokens[c]) for c in cc))  # (nc, L)
        tl = torch.tensor([len(tokens[c]) for c in cc])
        a, b = len(ii), len(cc)
        # pair k = (image k // b, caption k % b): (a * b, ...) by repeating captions and images
        batch = {"input_ids": ids.repeat(a, 1), "text_lens": tl.repeat(a),
                 "features": F_.repeat_interleave(b, 0), "locations": Lc.repeat_interleave(b, 0),
                 "region_lens": rl.repeat_interleave(b, 0)}
        batch = to_device(batch, device)
        with autocast:
            logits = model.heads["itm"].classify(model.encode(batch).pooled).float()  # (a * b, 2)
        s = (logits[:, 1] - logits[:, 0]).view(a, b)  # (images, captions)
        rows, cols = torch.as_tensor(cc, device=device), torch.as_tensor(ii, device=device)
        scores[rows.unsqueeze(1), cols.unsqueeze(0)] = s.t()
        if progress:
            progress(done, len(mine))
    model.train(was_training)
    return all_reduce_sum(scores, d).cpu()  # each pair was scored by exactly one rank


def _rank_of(scores: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """scores (Q, K), target (Q,) column -> (Q,) 0-based rank of the target, ties counted against it."""
    t = scores.gather(1, target.unsqueeze(1))  # (Q, 1)
    return (scores > t).sum(1) + (scores == t).sum(1) - 1


def retrieval_recall(scores: torch.Tensor, caption_image, ks=(1, 5, 10)) -> dict:
    """Recall@k from a (captions, images) score matrix; caption_image[c] = column of caption c's image.

    t2i_rk: share of captions whose own image is among the k best-scored images.
    i2t_rk: share of images (those with a caption) having at least one own caption among the k best."""
    scores = scores.float()
    own = torch.as_tensor(np.asarray(caption_image), dtype=torch.long)
    C, n_img = scores.shape
    t2i = _rank_of(scores, own)  # (C,)
    # image -> text: the rank of an image's best own caption = how many other images' captions score at
    # least as high (its own captions never count against it; other ties do)
    cols = scores.t()  # (images, captions)
    is_own = own.unsqueeze(0) == torch.arange(n_img).unsqueeze(1)  # (images, captions)
    best = torch.where(is_own, cols, float("-inf")).max(1).values  # (images,)
    i2t = ((cols >= best.unsqueeze(1)) & ~is_own).sum(1)[is_own.any(1)]
    out = {}
    for k in ks:
        out[f"i2t_r{k}"] = float((i2t < k).float().mean())
    for k in ks:
        out[f"t2i_r{k}"] = float((t2i < k).float().mean())
    return out


def evaluate_held_out(model, dataset: PairDataset, tasks: list[str], *, eval_pairs: int = 1000,
                      eval_images: int = 100, batch_pairs: int = 512, token_budget: int = 8192, seed: int = 0,
                      device="cpu", d: Dist = SINGLE, autocast=None, neg_image=None, progress=None) -> dict:
    """Accuracy on up to eval_pairs held-out captions and retrieval over up to eval_images held-out images
    (all their captions). tasks: the tasks being trained (accuracy only for those with a head to judge)."""
    t0 = time.perf_counter()
    pairs = dataset.pairs
    rng = np.random.default_rng(seed)
    out = {}
    acc_tasks = [t for t in ("mlm", "itm") if t in tasks] + (["mrc"] if "mrc" in tasks else
                                                           ["mrc_kl"] if "mrc_kl" in tasks else [])
    if eval_pairs and acc_tasks:
        chosen = np.sort(rng.permutation(len(pairs))[:eval_pairs])
        keys = [k for k in held_out_keys(pairs, acc_tasks, seed, neg_image) if k[1] in set(chosen.tolist())]
        out.update(evaluate(model, budget_batches(dataset, keys, token_budget), device, d, autocast))
    if eval_images and "itm" in tasks and pairs.num_images > 1:
        images = np.sort(rng.permutation(pairs.num_images)[:eval_images])
        column = {int(i): j for j, i in enumerate(images)}
        captions = np.flatnonzero(np.isin(pairs.image, images))
        scores = itm_scores(model, dataset, captions, images, batch_pairs, device, d, autocast, progress)
        out.update(retrieval_recall(scores, [column[int(pairs.image[c])] for c in captions]))
        out.update(retrieval_images=len(images), retrieval_captions=len(captions))
    out["eval_seconds"] = time.perf_counter() - t0
    return out
