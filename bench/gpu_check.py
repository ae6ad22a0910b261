"""The GPU check (issue 13), one script, under 8 minutes on one H100/H200: what the CPU-only sessions could
not measure.

    python bench/gpu_check.py                 # on a GPU machine; results in bench/out/gpu_check/results.json
    python bench/gpu_check.py --dry-run       # the same steps, tiny, on the CPU (checks the script runs)

Steps, each in its own subprocess (a failure is reported and the next step still runs):
1. paths: the CUDA code paths of the data feed: the loader's batches are pinned, DeviceFeed copies
   them non-blocking on its side stream and casts float16 -> float32 on the device (equal to the host
   cast), bf16 autocast gives bf16 activations and a finite loss; and NCCL under torchrun with one
   process (init_process_group, all_reduce, all_gather, a DDP step).
2. loader: bench/bench_loader.py, one core (the per-core figure on this machine's CPUs).
3. train: the real trainer (`run(cfg)`), BERT-base (12 x 768) with bf16 autocast on synthetic 2048-d
   float16 shards of 10-100 boxes, the default token budget and task mix, --workers loader processes:
   samples/s, tokens/s, data wait, padding and MFU (as bench/gpu_pretrain.py counts model FLOPs:
   6 x layer parameters + 12 x layers x hidden x mean sequence length per real token; peak dense bf16
   from the device name, H100/H200 989 TFLOP/s).
4. extract: bench/gpu_extract.py, resnet50_fpn_v2 images/s at batch 1, 8 and 32, ours vs model(images).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(ROOT, "tests"))

PEAK_BF16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def step_paths(args) -> dict:
    """The CUDA paths of the data feed (pinned, side-stream copy, cast on device) and bf16 autocast."""
    import torch

    from regionbert.train.config import load_config
    from regionbert.train.data import DeviceFeed
    from regionbert.train.loop import autocast_for
    from regionbert.train.run import build_data, build_model

    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda" if cuda else "cpu")
    paths = _data(args)
    cfg = load_config(None, [f"data.{k}={v}" for k, v in paths.items()] + _model(args) + [
        "data.split=null", "data.num_workers=2", "data.eval_split=null", f"run.device={device.type}"])
    _, _, _, loader = build_data(cfg, None)  # 2 worker processes, batches pinned by the loader's thread
    _, _, _, reference = build_data(cfg, None, num_workers=0)
    pinned = [bool(b["features"].is_pinned()) if cuda else None for b in itertools.islice(loader, 3)]
    host_iter, feed = iter(reference), DeviceFeed(loader, device)
    model = build_model(cfg).to(device)
    out = {"device": torch.cuda.get_device_name() if cuda else "cpu (dry run)"}
    equal = []
    for _ in range(4):
        host = next(host_iter)
        batch, _ = feed.next()
        equal.append(bool(torch.equal(batch["features"].cpu(), host["features"].float())))
        feed.preload()  # the next copy is queued on the side stream while this batch is used
        with autocast_for(device, "bf16" if cuda else "fp32"):
            enc = model.encode(batch)
            losses = model(batch)
        out.setdefault("activation_dtype", str(enc.text.dtype))
        out.setdefault("losses_finite", True)
        out["losses_finite"] &= all(bool(torch.isfinite(v).all()) for v in losses.values())
    out.update(pinned_batches=pinned, feed_equals_host_cast=equal, feed_side_stream=feed.stream is not None)
    out["ok"] = all(equal) and out["losses_finite"] and (not cuda or (all(pinned) and out["activation_dtype"]
                                                                        == "torch.bfloat16"))
    return out


def step_nccl(args) -> dict:
    """Run under torchrun with one process: NCCL (gloo on the CPU) collectives and a DDP step."""
    import torch
    import torch.distributed as dist

    from regionbert.train.distributed import Dist, digests_agree, gather_tensors

    cuda = torch.cuda.is_available() and not args.dry_run
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0"))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    try:
        d = Dist(dist.get_rank(), dist.get_world_size(), 0, device)
        t = torch.arange(4.0, device=device)
        dist.all_reduce(t)
        gathered = [torch.empty_like(t)]
        dist.all_gather(gathered, t)
        model = torch.nn.parallel.DistributedDataParallel(torch.nn.Linear(8, 2).to(device),
                                                          device_ids=[device] if cuda else None)
        model(torch.randn(4, 8, device=device)).sum().backward()
        out = {"backend": dist.get_backend(), "world_size": d.world_size,
               "all_reduce_ok": t.tolist() == [0.0, 1.0, 2.0, 3.0], "all_gather_ok": torch.equal(gathered[0], t),
               "ddp_grad_ok": all(p.grad is not None for p in model.parameters()),
               "gather_tensors_ok": len(gather_tensors(t, d)) == 1, "digest": digests_agree(model.module, d)[0][:16]}
        dist.barrier()
    finally:
        dist.destroy_process_group()
    out["ok"] = out["all_reduce_ok"] and out["all_gather_ok"] and out["ddp_grad_ok"]
    return out


def step_train(args) -> dict:
    """The real trainer, BERT-base bf16 on 2048-d shards: samples/s, data wait, MFU."""
    import numpy as np
    import torch

    from regionbert.train.config import load_config
    from regionbert.train.run import build_data, build_model, run

    cuda = torch.cuda.is_available() and not args.dry_run
    paths = _data(args)
    run_dir = os.path.join(args.out, "run")
    shutil.rmtree(run_dir, ignore_errors=True)
    steps = 6 if args.dry_run else args.steps
    cfg = load_config(None, [f"data.{k}={v}" for k, v in paths.items()] + _model(args) + [
        "data.split=null", f"data.num_workers={args.workers}", "data.eval_split=null",
        f"optim.steps={steps}", "optim.warmup_steps=20", "optim.lr=5e-5",
        f"run.precision={'bf16' if cuda else 'fp32'}", f"run.device={'cuda' if cuda else 'cpu'}",
        f"run.log_every={max(1, steps // 8)}", "run.checkpoint_every=0", "run.plot=false", "run.tensorboard=false",
        f"run.out={run_dir}"])
    if cuda:
        torch.backends.cuda.matmul.allow_tf32 = True
    t = time.perf_counter()
    run(cfg, print_fn=lambda *a, **k: print(*a, **k, file=sys.stderr))
    seconds = time.perf_counter() - t
    reports = [json.loads(x) for x in open(os.path.join(run_dir, "log.jsonl"))]
    reports = [r for r in reports if "lr" in r][1:] or reports[-1:]  # the first includes start-up
    name = torch.cuda.get_device_name() if cuda else "cpu"
    peak = args.peak_tflops or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    enc = build_model(cfg).encoder
    pairs, _, _, _ = build_data(cfg, None, num_workers=0)
    mean_len = float(np.mean(pairs.lengths))
    flops_per_token = 6 * sum(p.numel() for p in enc.layers.parameters()) + \
        12 * cfg.model.num_layers * cfg.model.hidden_size * mean_len
    tps = float(np.mean([r["tokens_per_s"] for r in reports]))
    out = {"device": name, "model": f"{cfg.model.num_layers} x {cfg.model.hidden_size}", "precision": cfg.run.precision,
           "feature_dim": args.dim, "workers": args.workers, "token_budget": cfg.data.token_budget, "steps": steps,
           "train_seconds": seconds, "samples_per_s": float(np.mean([r["samples_per_s"] for r in reports])),
           "tokens_per_s": tps, "data_wait": float(np.mean([r["data_wait"] for r in reports])),
           "data_wait_max": float(max(r["data_wait"] for r in reports)),
           "pad_fraction": float(np.mean([r["pad_fraction"] for r in reports])), "mean_sequence_length": mean_len,
           "model_tflops_per_s": tps * flops_per_token / 1e12, "peak_bf16_tflops": peak}
    out["mfu"] = out["model_tflops_per_s"] / peak if peak and cuda else None
    out["ok"] = bool(np.isfinite([r.get("mlm", 0.0) for r in reports]).all())
    return out


def _model(args) -> list[str]:
    if args.dry_run:
        return ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
                "data.token_budget=1024"]
    return []  # the ModelConfig defaults: BERT-base (12 x 768, 12 heads, 3072); the default token budget


def _data(args) -> dict:
    from train_synth import write_dataset

    images = 40 if args.dry_run else args.images
    folder = os.path.join(args.out, f"data-{images}-{args.dim}")
    if not os.path.exists(os.path.join(folder, "captions.csv")):
        shutil.rmtree(folder, ignore_errors=True)
        write_dataset(folder, images, 0, feature_dim=args.dim, min_boxes=10, max_boxes=100, seed=0)
    return {"shards": os.path.join(folder, "shard-00000"), "captions": os.path.join(folder, "captions.csv"),
            "tokenizer": os.path.join(folder, "vocab.txt")}


def _subprocess(cmd: list[str], timeout: float, json_path: str | None = None) -> dict:
    t = time.perf_counter()
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f}s", "seconds": time.perf_counter() - t}
    out = {"seconds": round(time.perf_counter() - t, 1), "returncode": r.returncode}
    if json_path and os.path.exists(json_path):
        with open(json_path) as f:
            out.update(json.load(f))
    if r.returncode:
        out.update(ok=False, error=(r.stderr or r.stdout)[-2000:])
    out.setdefault("ok", r.returncode == 0)
    return out


STEPS = {"paths": step_paths, "nccl": step_nccl, "train": step_train}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny, on the CPU: checks that every step runs")
    p.add_argument("--images", type=int, default=3000)
    p.add_argument("--dim", type=int, default=2048)
    p.add_argument("--steps", type=int, default=240)
    p.add_argument("--workers", type=int, default=4, help="loader processes for the trainer")
    p.add_argument("--peak-tflops", type=float, default=0.0)
    p.add_argument("--only", default="paths,nccl,loader,train,extract")
    p.add_argument("--out", default=os.path.join(HERE, "out", "gpu_check"))
    p.add_argument("--step", help=argparse.SUPPRESS)  # internal: run one step in this process
    p.add_argument("--json", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.dry_run and not args.step:
        args.out = os.path.join(args.out, "dry-run")
    os.makedirs(args.out, exist_ok=True)
    if args.step:
        result = STEPS[args.step](args)
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        return 0 if result.get("ok") else 1

    me = [sys.executable, os.path.abspath(__file__), "--out", args.out,
          "--images", str(args.images), "--dim", str(args.dim), "--steps", str(args.steps),
          "--workers", str(args.workers), "--peak-tflops", str(args.peak_tflops)]
    me += ["--dry-run"] if args.dry_run else []
    j = {name: os.path.join(args.out, f"{name}.json") for name in ("paths", "nccl", "loader", "train", "extract")}
    for path in j.values():
        if os.path.exists(path):
            os.remove(path)
    commands = {
        "paths": (me + ["--step", "paths", "--json", j["paths"]], 240),
        "nccl": ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"]
                 + me[1:] + ["--step", "nccl", "--json", j["nccl"]], 180),
        "loader": ([sys.executable, os.path.join(HERE, "bench_loader.py"), "--json", j["loader"],
                    "--out", os.path.join(args.out, "loader")]
                   + (["--images", "40", "--batches", "3", "--passes", "1"] if args.dry_run
                      else ["--batches", "60", "--passes", "2"]), 300),
        "train": (me + ["--step", "train", "--json", j["train"]], 420),
        "extract": ([sys.executable, os.path.join(HERE, "gpu_extract.py"), "--out", j["extract"]]
                    + (["--dry-run"] if args.dry_run else []), 420),
    }
    results, start = {}, time.perf_counter()
    for name in args.only.split(","):
        cmd, timeout = commands[name]
        print(f"[{time.perf_counter() - start:5.0f}s] {name}: {' '.join(cmd[1:4])} ...", flush=True)
        results[name] = _subprocess(cmd, timeout, j[name])
        print(json.dumps(results[name], indent=1)[:3000], flush=True)
    results["total_seconds"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    failed = [k for k, v in results.items() if isinstance(v, dict) and not v.get("ok")]
    print(f"gpu_check: {len(results) - 1 - len(failed)} steps ok" + (f", FAILED: {failed}" if failed else "")
          + f"; {results['total_seconds']:.0f}s; results in {os.path.join(args.out, 'results.json')}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
