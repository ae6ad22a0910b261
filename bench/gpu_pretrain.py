"""GPU pretraining throughput: samples/s and model FLOPs utilisation (MFU) of a BERT-base-sized model
(12 layers, hidden 768, 12 heads, UNITER-base) with bf16 autocast and fused attention, at the default
token budget (8192 text + region tokens per batch), through the real trainer; then the time to score
a retrieval block with the ITM head, extrapolated to UNITER's 1k images x 5k captions. Under 10 minutes
on one H100/H200-class GPU.

    python bench/gpu_pretrain.py                  # writes bench/out/gpu_pretrain/results.json

MFU = achieved model FLOPs / peak dense bf16 FLOPs of the GPU (--peak-tflops, default: looked up from
the device name; H100/H200 SXM 989). Model FLOPs per real (non-padding) token, training (PaLM's count):
6 x (transformer-layer parameters) + 12 x layers x hidden x mean packed sequence length (attention
scores and values); embeddings, padding tokens and the task heads are not counted (conservative).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from train_synth import write_dataset  # noqa: E402

from regionbert.train.config import load_config  # noqa: E402
from regionbert.train.evaluate import itm_scores  # noqa: E402
from regionbert.train.loop import autocast_for  # noqa: E402
from regionbert.train.run import build_data, build_model, run  # noqa: E402

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def peak_tflops(name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--images", type=int, default=4000)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--token-budget", type=int, default=8192)
    p.add_argument("--workers", type=int, default=6)
    p.add_argument("--peak-tflops", type=float, default=0.0)
    p.add_argument("--out", default=os.path.join(HERE, "out", "gpu_pretrain"))
    args = p.parse_args()
    if not torch.cuda.is_available():
        sys.exit("gpu_pretrain.py needs a CUDA GPU")
    name = torch.cuda.get_device_name()
    peak = args.peak_tflops or peak_tflops(name)
    os.makedirs(args.out, exist_ok=True)
    t = time.perf_counter()
    data_dir = os.path.join(args.out, f"data-{args.images}")
    if not os.path.exists(os.path.join(data_dir, "captions.csv")):
        shutil.rmtree(data_dir, ignore_errors=True)
        write_dataset(data_dir, args.images, args.images // 10, feature_dim=1024, min_boxes=10, max_boxes=100,
                      seed=0)
    print(f"data ready in {time.perf_counter() - t:.0f}s", flush=True)
    paths = {"shards": os.path.join(data_dir, "shard-00000"), "captions": os.path.join(data_dir, "captions.csv"),
             "tokenizer": os.path.join(data_dir, "vocab.txt")}
    run_dir = os.path.join(args.out, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    cfg = load_config(None, [f"data.{k}={v}" for k, v in paths.items()] + [
        # BERT-base / UNITER-base: the ModelConfig defaults (12 x 768, 12 heads, 3072)
        f"data.token_budget={args.token_budget}", f"data.num_workers={args.workers}", "data.eval_split=val",
        f"optim.steps={args.steps}", "optim.warmup_steps=50", "optim.lr=5e-5", "run.precision=bf16",
        f"run.log_every={max(1, args.steps // 6)}", "run.checkpoint_every=0", "run.eval_every=0",
        "run.eval_images=0", "run.eval_pairs=200", "run.plot=false", "run.tensorboard=false",
        f"run.out={run_dir}"])
    # fused attention: SDPA's memory-efficient / cuDNN / flash kernels only, if they take our padding mask
    # (a probe with the model's shapes); otherwise say so and let SDPA pick (the math fallback)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    fused = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    q = torch.randn(8, 12, 77, 64, device="cuda", dtype=torch.bfloat16)
    keep = torch.rand(8, 1, 1, 77, device="cuda") > 0.1
    try:
        with sdpa_kernel(fused):
            torch.nn.functional.scaled_dot_product_attention(q, q, q, attn_mask=keep, dropout_p=0.1)
        attention = "fused (SDPA memory-efficient / cuDNN / flash kernels only)"
    except RuntimeError as e:
        fused = [SDPBackend.MATH, *fused]
        attention = f"SDPA default: no fused kernel takes the padding mask here ({str(e)[:120]})"
    print(f"attention: {attention}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = True
    t = time.perf_counter()
    with sdpa_kernel(fused):
        run(cfg)
    train_seconds = time.perf_counter() - t
    reports = [json.loads(x) for x in open(os.path.join(run_dir, "log.jsonl"))]
    reports = [r for r in reports if "lr" in r][1:]  # the first includes start-up and compilation of kernels
    sps = float(np.mean([r["samples_per_s"] for r in reports]))
    tps = float(np.mean([r["tokens_per_s"] for r in reports]))
    pad = float(np.mean([r["pad_fraction"] for r in reports]))

    model = build_model(cfg)
    enc = model.encoder
    n_layer_params = sum(p.numel() for p in enc.layers.parameters())
    C, L = cfg.model.hidden_size, cfg.model.num_layers
    pairs, dataset, _, _ = build_data(cfg, "train", num_workers=0)
    mean_len = float(np.mean(pairs.lengths))  # sequence length a token attends over (sorted batches: ~its own)
    flops_per_token = 6 * n_layer_params + 12 * L * C * mean_len
    achieved = tps * flops_per_token
    results = {
        "device": name, "model": "12 layers, hidden 768, 12 heads (BERT-base / UNITER-base)",
        "parameters_encoder": sum(p.numel() for p in enc.parameters()), "precision": "bf16 autocast",
        "attention": attention,
        "token_budget": args.token_budget, "steps": args.steps, "train_seconds": train_seconds,
        "samples_per_s": sps, "tokens_per_s": tps, "pad_fraction": pad,
        "data_wait": float(np.mean([r["data_wait"] for r in reports])),
        "mean_sequence_length": mean_len, "model_tflops_per_s": achieved / 1e12,
        "peak_bf16_tflops": peak, "mfu": achieved / (peak * 1e12) if peak else None,
    }
    print(f"{name}: {sps:.0f} samples/s, {tps / 1e3:.0f}k tokens/s, {achieved / 1e12:.0f} model TFLOP/s"
          + (f", MFU {100 * results['mfu']:.1f}% of {peak:.0f}" if peak else "")
          + f", padding {100 * pad:.1f}%, data wait {100 * results['data_wait']:.1f}%", flush=True)

    # retrieval: a block of 100 images x 1000 captions scored by the ITM head, extrapolated to 1k x 5k
    model.to("cuda")
    images = np.arange(min(100, pairs.num_images))
    captions = np.arange(min(1000, len(pairs)))
    autocast = autocast_for(torch.device("cuda"), "bf16")
    itm_scores(model, dataset, captions[:50], images[:10], batch_pairs=1024, device="cuda", autocast=autocast)
    torch.cuda.synchronize()
    t = time.perf_counter()
    itm_scores(model, dataset, captions, images, batch_pairs=1024, device="cuda", autocast=autocast)
    torch.cuda.synchronize()
    sec = time.perf_counter() - t
    per_s = len(images) * len(captions) / sec
    results.update(retrieval_pairs_per_s=per_s, retrieval_1k_x_5k_minutes=5e6 / per_s / 60)
    print(f"retrieval scoring: {per_s:.0f} pairs/s -> 1k images x 5k captions in "
          f"{results['retrieval_1k_x_5k_minutes']:.1f} min on this GPU", flush=True)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
