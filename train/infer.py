"""Use a pretrained model: (regions of an image, caption) pairs in, match scores and embeddings out.

    from regionbert.data import ShardSet
    from regionbert.train.infer import Model

    model = Model.load("exported/")          # an exported folder, a run folder or a checkpoint file
    shards = ShardSet("shards/")
    out = model.encode([shards.get("img1"), shards.get("img2")], ["a dog on a sofa", "two cups"])
    out.itm_score      (B,)       logit(match) - logit(no match): what retrieval ranks by
    out.itm_prob       (B,)       softmax probability of "match"
    out.cls            (B, C)     the joint [CLS] output (text and regions attended together)
    out.pooled         (B, C)     tanh(Linear([CLS])), what the ITM head classifies
    out.text_hidden    (B, L, C)  one vector per token ([CLS] words [SEP]); text_lens[b] of them are real
    out.region_hidden  (B, N, C)  one vector per region (the record's first max_regions boxes); region_lens[b]
                                  (padding positions are zero)

The pairs go through exactly the trainer's forward pass (Pretrainer.encode) in float32, eval mode, no
gradient: the same numbers as in training's held-out evaluation. `regionbert-pretrain score` (cli.py)
scores a caption manifest against shards with it, one row per caption.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass

import numpy as np
import torch

from regionbert.data import ShardError
from regionbert.data.checks import check_record

from .bert import bert_tokenizer
from .export import (
    ExportError,
    is_exported,
    load_exported,
    max_regions_of,
    model_from_checkpoint,
    read_hf_config,
    resolve_tokenizer,
    run_checkpoint,
)
from .pretrainer import Pretrainer
from .text import Text, read_manifest


@dataclass
class Encoded:
    itm_score: torch.Tensor
    itm_prob: torch.Tensor
    cls: torch.Tensor
    pooled: torch.Tensor
    text_hidden: torch.Tensor
    text_lens: torch.Tensor
    region_hidden: torch.Tensor
    region_lens: torch.Tensor
    input_ids: torch.Tensor


class Model:
    """A Pretrainer in eval mode with its tokenizer and region cap; see the module docstring."""

    def __init__(self, model: Pretrainer, text: Text, max_regions: int = 100, device="cpu"):
        self.model, self.text, self.max_regions = model.eval().to(device), text, max_regions
        self.device = torch.device(device)
        self.cfg = model.cfg

    @classmethod
    def load(cls, path: str, device="cpu", tokenizer: str | None = None) -> Model:
        """An exported folder (`regionbert-pretrain export`), a run folder (its checkpoint.pt) or a checkpoint
        file. tokenizer: a vocab.txt / tokenizer.json to use instead of the one the folder or run names."""
        if is_exported(path):
            model = load_exported(path)
            hf = read_hf_config(path)
            found = (tokenizer, True) if tokenizer else bert_tokenizer(path)
            if not found:
                raise ExportError(f"{path}: no vocab.txt or tokenizer.json (an exported folder has its tokenizer)")
            max_regions = max_regions_of(hf, os.path.join(path, "config.json"))
        else:
            model, config, _ = model_from_checkpoint(run_checkpoint(path))
            found = resolve_tokenizer(config, path, tokenizer)
            max_regions = int((config.get("data") or {}).get("max_regions", 100))
        text = Text(found[0], model.cfg.max_text_len, found[1])
        if text.vocab_size != model.cfg.vocab_size:
            raise ExportError(f"{found[0]}: {text.vocab_size} tokens, the model has {model.cfg.vocab_size}")
        return cls(model, text, max_regions, device)

    def batch(self, records, captions: list[str]) -> dict:
        """The trainer's batch for these pairs (text padded with [PAD] = 0, regions with zeros, float32)."""
        if len(records) != len(captions):
            raise ValueError(f"{len(records)} records but {len(captions)} captions: one of each per pair")
        if not len(records):
            raise ValueError("no pairs to encode")
        cfg = self.cfg
        tokens = self.text.encode(list(captions))
        regions = [self._regions(r) for r in records]
        B, L, N = len(tokens), max(len(t) for t in tokens), max(len(f) for f, _ in regions)
        ids = np.zeros((B, L), np.int64)
        feats, locs = np.zeros((B, N, cfg.feature_dim), np.float32), np.zeros((B, N, cfg.loc_dim), np.float32)
        for b, (t, (f, loc)) in enumerate(zip(tokens, regions, strict=True)):
            ids[b, :len(t)], feats[b, :len(f)], locs[b, :len(f)] = t, f, loc
        d = self.device
        return {"input_ids": torch.from_numpy(ids).to(d), "features": torch.from_numpy(feats).to(d),
                "locations": torch.from_numpy(locs).to(d),
                "text_lens": torch.tensor([len(t) for t in tokens], device=d),
                "region_lens": torch.tensor([len(f) for f, _ in regions], device=d)}

    def _regions(self, rec) -> tuple[np.ndarray, np.ndarray]:
        """A record's first max_regions (features, locations), checked as the trainer checks what it reads."""
        if rec.features.ndim != 2 or rec.features.shape[1] != self.cfg.feature_dim:
            raise ValueError(f"record {rec.id!r}: features of shape {tuple(rec.features.shape)}; this model takes "
                             f"{self.cfg.feature_dim}-d features")
        problems = check_record(rec)
        if problems:
            raise ShardError(f"record {rec.id!r} breaks the shard format's record rules: {'; '.join(problems)}")
        n = min(rec.num_boxes, self.max_regions)
        loc = rec.loc7 if self.cfg.loc_dim == 7 else rec.loc5
        return np.asarray(rec.features[:n], np.float32), np.asarray(loc[:n], np.float32)

    @torch.no_grad()
    def encode(self, records, captions: list[str]) -> Encoded:
        """Scores and hidden states for the pairs (records[i], captions[i]); see the module docstring."""
        batch = self.batch(records, captions)
        out = self.model.encode(batch)
        logits = self.model.heads["itm"].classify(out.pooled).float()  # (B, 2) [no match, match]
        tl, rl = batch["text_lens"], batch["region_lens"]
        text = out.text * (torch.arange(out.text.shape[1], device=tl.device) < tl.unsqueeze(1)).unsqueeze(-1)
        regions = out.regions * (torch.arange(out.regions.shape[1], device=rl.device) < rl.unsqueeze(1)).unsqueeze(-1)
        cpu = lambda t: t.detach().cpu()  # noqa: E731
        return Encoded(itm_score=cpu(logits[:, 1] - logits[:, 0]), itm_prob=cpu(logits.softmax(-1)[:, 1]),
                       cls=cpu(out.hidden[:, 0]), pooled=cpu(out.pooled), text_hidden=cpu(text), text_lens=cpu(tl),
                       region_hidden=cpu(regions), region_lens=cpu(rl), input_ids=cpu(batch["input_ids"]))

    def score(self, records, captions: list[str]) -> np.ndarray:
        """(B,) ITM match scores, logit(match) - logit(no match)."""
        return self.encode(records, captions).itm_score.numpy()


def score_manifest(model: Model, shards, captions: str, out: str, split: str | None = None,
                   batch_size: int = 64, print_fn=print) -> int:
    """Score every row of a caption manifest (image_id, caption[, split]) against its image in the shards;
    write a CSV with the rows' image_id, caption (and split), score and match_prob, in the manifest's order.
    Returns the number of rows. The file appears whole (written beside, then renamed) or not at all."""
    df = read_manifest(captions, split)
    missing = [(row, i) for row, i in enumerate(df["image_id"]) if i not in shards]
    if missing:
        shown = ", ".join(f"row {r}: {i!r}" for r, i in missing[:5])
        raise KeyError(f"{captions}: {len(missing)} caption(s) name images that are in no shard ({shown})")
    scores, probs = np.zeros(len(df), np.float64), np.zeros(len(df), np.float64)
    ids, caps = df["image_id"].tolist(), df["caption"].tolist()
    for start in range(0, len(df), batch_size):
        rows = slice(start, start + batch_size)
        enc = model.encode([shards.get(i) for i in ids[rows]], caps[rows])
        scores[rows], probs[rows] = enc.itm_score.numpy(), enc.itm_prob.numpy()
    tmp = f"{out}.tmp"
    try:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            has_split = "split" in df.columns
            w.writerow(["image_id", "caption"] + (["split"] if has_split else []) + ["score", "match_prob"])
            for r in range(len(df)):
                w.writerow([ids[r], caps[r]] + ([df["split"].iloc[r]] if has_split else [])
                           + [f"{scores[r]:.6g}", f"{probs[r]:.6g}"])
        os.replace(tmp, out)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return len(df)
