"""GPU extraction throughput (issue 3): resnet50_fpn_v2 at the default size (800/1333) with autocast,
batch sizes 1, 8 and 32, ours (butd policy, features and class distributions) vs model(images).

    python bench/gpu_extract.py            # about 3-5 minutes on one modern GPU
    python bench/gpu_extract.py --dry-run  # the same code on the CPU: 2 small images, batch 1 and 2

Images are decoded once into pinned host memory (decode is measured by bench_extract.py on CPU);
each timed step copies the batch to the GPU, as the extraction job does. Random weights (the GPU
machine has no network); a random resnet50_fpn_v2 gives peaked class scores, so the butd policy
takes the same fast path as with trained weights.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch

from regionbert.extract.detector import DetectorSpec
from regionbert.extract.families import build_detector
from regionbert.extract.policies import BoxPolicy
from regionbert.extract.torchvision_rcnn import RegionExtractor, preprocess

warnings.filterwarnings("ignore", message="detector .* has RANDOM weights")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch-sizes", default="1,8,32")
    ap.add_argument("--images", type=int, default=128, help="images per timed pass")
    ap.add_argument("--amp", default="bf16", choices=["bf16", "fp16"])
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    ap.add_argument("--dry-run", action="store_true", help="on the CPU, tiny: checks that the script runs")
    args = ap.parse_args()
    if args.dry_run:
        dev, args.batch_sizes, args.images = torch.device("cpu"), "1,2", 2
        spec = DetectorSpec("resnet50_fpn_v2", "none", min_size=128, max_size=160)
    else:
        assert torch.cuda.is_available(), "this benchmark needs a GPU (or --dry-run)"
        dev, spec = torch.device("cuda"), DetectorSpec("resnet50_fpn_v2", "none")
        torch.backends.cudnn.benchmark = True
    model, _, info = build_detector(spec)
    model.to(dev)
    ex = RegionExtractor(model, BoxPolicy("butd"))
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.amp]
    g = torch.Generator().manual_seed(0)
    size = (3, 96, 128) if args.dry_run else (3, 480, 640)
    host = [torch.rand(*size, generator=g) for _ in range(args.images)]
    if dev.type == "cuda":
        host = [x.pin_memory() for x in host]

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()
    rows = []
    for bs in [int(b) for b in args.batch_sizes.split(",")]:
        batches = [host[i:i + bs] for i in range(0, len(host), bs)]

        def model_step(b):
            return model([x.to(dev, non_blocking=True) for x in b])

        def ours_step(b):
            imgs = [preprocess(model.transform, x.to(dev, non_blocking=True)) for x in b]
            out = ex(imgs, [tuple(x.shape[-2:]) for x in b])
            return [{k: v.float().cpu() for k, v in r.items()} for r in out]  # what the job copies back

        row = {"batch_size": bs}
        for name, step in (("model", model_step), ("ours", ours_step)):
            with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dev.type == "cuda"):
                step(batches[0])
                sync()
                start = time.perf_counter()
                for b in batches:
                    step(b)
                sync()
            row[f"{name}_images_per_s"] = round(len(host) / (time.perf_counter() - start), 2)
        row["ours_vs_model"] = round(row["model_images_per_s"] / row["ours_images_per_s"], 3)
        if dev.type == "cuda":
            row["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"gpu": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (dry run)", "amp": args.amp,
              "torch": torch.__version__,
              "min_size": info["min_size"], "max_size": info["max_size"], "rows": rows}
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
