"""Why ITM sits at ln 2 when pretraining from scratch: train the quickstart's pretraining (or any config)
step by step and, every --every steps, measure what ITM's gradient into the encoder looks like.

    python bench/itm_diagnosis.py --data runs/quickstart --out bench/out/itm_diag/base [--set KEY=VALUE ...]

--data: a quickstart output folder (its data/ and shards/; the pretraining settings are the quickstart's own)
or --config FILE --set data.shards=... for any other run. Per report (a JSON line in OUT/diag.jsonl):
- loss per task over the window, held-out ITM accuracy on a fixed set of 400 pairs (half mismatched);
- grad2[task]: mean squared norm of the encoder's gradient (the heads excluded) on that task's steps, and
  each task's share of Adam's second moment (ratio x grad2 over the sum): how large a step ITM can take;
- itm_coherence: cosine between ITM's encoder gradients on two disjoint fixed batches of training pairs
  (0: noise, what one batch says the other does not; near 1: a direction every batch agrees on);
- probe_cls / probe_mean: a logistic regression fitted on the encoder's [CLS] output (and on the mean of
  all outputs) of 800 training pairs, judged on 400 held-out ones: is "match" in the representation
  before the ITM head reads it?
- attention: per layer, the share of a text token's attention that goes to regions, and how much more
  a caption word attends to regions of its own image's objects than uniform (cross-modal specificity).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F

from regionbert.train.config import load_config
from regionbert.train.data import collate
from regionbert.train.optim import build_optimizer, build_scheduler
from regionbert.train.run import apply_init_from, build_data, build_model


def quickstart_config(folder: str, out: str, overrides: list[str]):
    from regionbert.quickstart.main import DEFAULT_STEPS, pretrain_args

    shard_dir = os.path.join(folder, "shards")
    data = {"captions": os.path.join(folder, "data", "captions.csv"),
            "vocab": os.path.join(folder, "data", "vocab.txt")}
    args = pretrain_args(data, shard_dir, out, DEFAULT_STEPS)
    sets = [args[i + 1] for i in range(0, len(args), 2)]
    return load_config(None, sets + ["run.plot=false", "run.tensorboard=false", "data.num_workers=0", *overrides])


def itm_keys(pairs, n: int, seed: int, start: int = 0) -> list[tuple]:
    """n ITM dataset keys (pair, other image): every other one mismatched, from a fixed seed."""
    rng = np.random.default_rng(seed)
    idx = rng.permutation(len(pairs))[start:start + n]
    keys = []
    for j, p in enumerate(idx.tolist()):
        other = -1
        if j % 2:
            own = int(pairs.image[p])
            o = int(rng.integers(pairs.num_images - 1))
            other = o + (o >= own)
        keys.append(("itm", p, other, (seed, p, j)))
    return keys


def batched(dataset, keys, size=100):
    return [collate([dataset[k] for k in keys[i:i + size]]) for i in range(0, len(keys), size)]


def encoder_grad(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in model.encoder.parameters()])


class AttnProbe:
    """Forward hooks on each layer's attention: the (B, h, T, T) softmax weights of the last forward."""

    def __init__(self, model):
        self.weights, self.handles = [], []
        for layer in model.encoder.layers:
            self.handles.append(layer.attn.register_forward_hook(self.hook))

    active = False

    def hook(self, module, inputs, output):
        if not self.active:
            return
        x, keep = inputs
        B, T, C = x.shape
        q, k, _ = module.qkv(x).split(C, dim=2)
        q, k = (t.view(B, T, module.heads, C // module.heads).transpose(1, 2) for t in (q, k))
        logits = q @ k.transpose(-1, -2) / (C // module.heads) ** 0.5
        self.logit_std = getattr(self, "logit_std", []) + [float(logits.std())]
        self.weights.append(logits.masked_fill(~keep, float("-inf")).softmax(-1))

    def clear(self):
        self.weights, self.logit_std = [], []


@torch.no_grad()
def features(model, batches):
    """([CLS] output, mean output, labels, ITM-head prediction) over the batches."""
    cls, mean, labels, pred = [], [], [], []
    for b in batches:
        out = model.encode(b)
        T = out.hidden.shape[1]
        keep = (torch.arange(T) < (b["text_lens"] + b["region_lens"]).unsqueeze(1)).float().unsqueeze(-1)
        cls.append(out.hidden[:, 0])
        mean.append((out.hidden * keep).sum(1) / keep.sum(1))
        labels.append(b["itm_labels"])
        pred.append(model.heads["itm"].classify(out.pooled).argmax(-1))
    return torch.cat(cls), torch.cat(mean), torch.cat(labels), torch.cat(pred)


def probe(x_train, y_train, x_test, y_test) -> float:
    """Held-out accuracy of an L2-regularised logistic regression (standardised inputs)."""
    mu, sd = x_train.mean(0), x_train.std(0) + 1e-6
    a, b = (x_train - mu) / sd, (x_test - mu) / sd
    w = torch.zeros(a.shape[1], requires_grad=True)
    c = torch.zeros(1, requires_grad=True)
    opt = torch.optim.LBFGS([w, c], max_iter=200)

    def closure():
        opt.zero_grad()
        loss = F.binary_cross_entropy_with_logits(a @ w + c, y_train.float()) + 1e-3 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((b @ w + c > 0).long() == y_test).float().mean())


@torch.no_grad()
def attention_stats(model, batches, probe_hooks):
    """Per layer: text tokens' attention share on regions (and the uniform share), and the [CLS] token's."""
    stats = []
    probe_hooks.clear()
    probe_hooks.active = True
    for b in batches[:2]:
        model.encode(b)
    probe_hooks.active = False
    n_layers = len(model.encoder.layers)
    for li in range(n_layers):
        shares, uniform, cls_share = [], [], []
        for bi, b in enumerate(batches[:2]):
            w = probe_hooks.weights[bi * n_layers + li]  # (B, h, T, T)
            tl, rl = b["text_lens"], b["region_lens"]
            T = w.shape[-1]
            t = torch.arange(T)
            is_region = (t >= tl[:, None]) & (t < (tl + rl)[:, None])  # (B, T) keys that are regions
            is_text = (t < tl[:, None]) & (t > 0)  # queries: caption tokens (not [CLS])
            on_regions = (w * is_region[:, None, None, :]).sum(-1).mean(1)  # (B, T) per query
            shares.append(on_regions[is_text])
            uniform.append((rl.float() / (tl + rl).float())[:, None].expand(-1, T)[is_text])
            cls_share.append(on_regions[:, 0])
        stats.append({"text_to_regions": float(torch.cat(shares).mean()),
                      "uniform": float(torch.cat(uniform).mean()),
                      "cls_to_regions": float(torch.cat(cls_share).mean()),
                      "logit_std": probe_hooks.logit_std[li]})
    return stats


def plot(runs: list[str], path: str) -> None:
    """docs/itm-plateau.png: held-out ITM per run; for the first run, ITM's encoder gradient (level vs
    margin), the [CLS] token's attention on regions, and a linear probe on [CLS] against the ITM head."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    logs = {}
    for r in runs:
        name, _, folder = r.partition("=")
        with open(os.path.join(folder or name, "diag.jsonl")) as f:
            logs[name] = [json.loads(line) for line in f]
    fig, ax = plt.subplots(1, 4, figsize=(20, 4.2))
    for name, recs in logs.items():
        ax[0].plot([r["step"] for r in recs], [r["heldout_itm"] for r in recs], marker=".", label=name)
    ax[0].axhline(0.5, color="grey", ls=":", label="guessing")
    ax[0].set(title="held-out ITM accuracy (400 pairs)", xlabel="step", ylim=(0.4, 1))
    ax[0].legend(fontsize=8)
    first, recs = next(iter(logs.items()))
    fig.suptitle(f"panels 2-4: {first}", fontsize=10, x=0.6)
    steps = [r["step"] for r in recs]
    meaning = {"level": "level: moves every score alike", "margin": "margin: tells pairs apart"}
    for part, style in (("level", "-"), ("margin", "--")):
        ax[1].semilogy(steps, [r["itm_grad_norm"][part] for r in recs], style, label=meaning[part])
    ax[1].set(title="ITM's gradient into the encoder", xlabel="step", ylabel="norm")
    ax[1].legend(fontsize=8)
    for layer in range(len(recs[0]["attention"])):
        ax[2].plot(steps, [r["attention"][layer]["cls_to_regions"] for r in recs], label=f"layer {layer + 1}")
    ax[2].plot(steps, [r["attention"][0]["uniform"] for r in recs], ":", color="grey", label="uniform")
    ax[2].set(title="[CLS]'s attention on regions", xlabel="step", ylim=(0, 0.6))
    ax[2].legend(fontsize=8)
    ax[3].plot(steps, [r["probe_cls"] for r in recs], label="linear probe on [CLS]")
    ax[3].plot(steps, [r["probe_mean"] for r in recs], label="linear probe on the mean output")
    ax[3].plot(steps, [r["heldout_itm"] for r in recs], label="the ITM head")
    ax[3].set(title="held-out match / no match: probes vs the head", xlabel="step", ylim=(0.4, 1))
    ax[3].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main() -> int:
    if sys.argv[1:2] == ["--plot"]:  # --plot NAME=RUN_DIR ... -o PNG
        i = sys.argv.index("-o")
        plot(sys.argv[2:i], sys.argv[i + 1])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", help="a quickstart output folder")
    p.add_argument("--config")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=650)
    p.add_argument("--every", type=int, default=25)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", action="append", default=[])
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    os.makedirs(a.out, exist_ok=True)
    overrides = [f"optim.steps={a.steps}", f"run.out={a.out}", "run.checkpoint_every=0", *a.set]
    if a.data:
        cfg = quickstart_config(a.data, a.out, overrides)
    else:
        cfg = load_config(a.config, ["run.plot=false", "run.tensorboard=false", "data.num_workers=0", *overrides])
    cfg.optim.steps = a.steps
    apply_init_from(cfg)
    torch.manual_seed(cfg.run.seed)
    pairs, dataset, _, loader = build_data(cfg, cfg.data.split, num_workers=0)
    vpairs, vdataset, _, _ = build_data(cfg, cfg.data.eval_split, num_workers=0)
    model = build_model(cfg)
    o = cfg.optim
    opt = build_optimizer(model, o.lr, o.weight_decay, o.betas, o.eps)
    sched = build_scheduler(opt, o.warmup_steps, o.steps)
    held = batched(vdataset, itm_keys(vpairs, 400, 1))
    probe_train = batched(dataset, itm_keys(pairs, 800, 2))
    coh_a, coh_b = (collate([dataset[k] for k in itm_keys(pairs, 128, 3, s)]) for s in (0, 128))
    hooks = AttnProbe(model)
    log = open(os.path.join(a.out, "diag.jsonl"), "w")
    window = {"loss": {}, "grad2": {}}
    t0 = time.time()
    it = iter(loader)
    model.train()
    for step in range(1, a.steps + 1):
        batch = next(it)
        task = batch["task"]
        losses = model(batch)
        loss = sum(losses.values())
        loss.backward()
        g2 = float(encoder_grad(model).pow(2).sum())
        window["grad2"].setdefault(task, []).append(g2)
        for k, v in losses.items():
            window["loss"].setdefault(k, []).append(float(v.detach()))
        if o.grad_clip:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % a.every == 0 or step == a.steps:
            model.eval()
            # ITM's gradient on two disjoint fixed batches, in two parts: "margin", the gradient of the mean
            # match score s = logit(match) - logit(no match) of matched pairs minus that of mismatched ones
            # (what ITM's loss asks of the encoder to tell them apart), and "level", the gradient of the
            # mean s over all pairs (what it asks to move every score alike, whatever the pair)
            parts = {"margin": [], "level": [], "loss": []}
            for b in (coh_a, coh_b):
                for part in parts:
                    model.zero_grad(set_to_none=True)
                    out = model.encode(b)
                    logits = model.heads["itm"].classify(out.pooled)
                    y = b["itm_labels"].bool()
                    sc = logits[:, 1] - logits[:, 0]
                    obj = {"margin": sc[y].mean() - sc[~y].mean(), "level": sc.mean(),
                           "loss": F.cross_entropy(logits, b["itm_labels"])}[part]
                    obj.backward()
                    parts[part].append(encoder_grad(model))
            model.zero_grad(set_to_none=True)
            coherence = {k: round(float(F.cosine_similarity(v[0], v[1], dim=0)), 4) for k, v in parts.items()}
            norms = {k: round(float(v[0].norm()), 5) for k, v in parts.items()}
            tc, tm, ty, _ = features(model, probe_train)
            hc, hm, hy, hp = features(model, held)
            attn = attention_stats(model, held, hooks)
            hooks.clear()
            mix = cfg.tasks.mix
            g2 = {t: float(np.mean(v)) for t, v in window["grad2"].items()}
            total = sum(mix.get(t, 0) * g for t, g in g2.items())
            rec = {"step": step, "s": round(time.time() - t0, 1),
                   "loss": {k: round(float(np.mean(v)), 4) for k, v in window["loss"].items()},
                   "heldout_itm": float((hp == hy).float().mean()),
                   "grad2": {t: round(g, 6) for t, g in g2.items()},
                   "adam_share": {t: round(mix.get(t, 0) * g / total, 4) for t, g in g2.items()} if total else {},
                   "itm_grad_norm": norms, "itm_coherence": coherence,
                   "probe_cls": probe(tc, ty, hc, hy), "probe_mean": probe(tm, ty, hm, hy), "attention": attn}
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(step, f"itm {rec['loss'].get('itm', float('nan')):.3f} held {rec['heldout_itm']:.3f} "
                  f"probe cls {rec['probe_cls']:.3f} mean {rec['probe_mean']:.3f} coh {coherence} "
                  f"|g| {norms} share {rec['adam_share'].get('itm', 0):.3f} "
                  f"t2r {[round(x['text_to_regions'], 3) for x in attn]} (uniform {attn[0]['uniform']:.3f}) "
                  f"cls2r {[round(x['cls_to_regions'], 3) for x in attn]} "
                  f"lstd {[round(x['logit_std'], 2) for x in attn]}", flush=True)
            window = {"loss": {}, "grad2": {}}
            model.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
