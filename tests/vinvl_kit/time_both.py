#!/usr/bin/env python
"""
CPU seconds per image of VinVL's X152-C4 at 600/1000, NMS_FILTER 1 (the README's extraction setting),
preprocessing included, model loaded once, each image twice: the ORIGINAL (run inside the CPU build of
README.md) or ours (regionbert.extract.vinvl, as regionbert-extract builds it). bench/README.md's VinVL
section runs the two interleaved, one process per side at a time:

    # original (in /work/sgb_build/src, PYTHONPATH=/work/sgb_build/deps:/work/sgb_build/src)
    python time_both.py original --weights vinvl_seed0.pth --threads 1
    # ours (in regionbert's .venv)
    python time_both.py ours --weights vinvl_seed0.pth --threads 1
"""
import argparse
import json
import os
import time
from pathlib import Path

import torch
from PIL import Image

IMAGES = Path(__file__).resolve().parents[3] / "shared" / "butd-kit" / "images"
NAMES = ("000456", "COCO_train2014_000000132417")


def original(weights):
    import record_goldens as rg  # the original's own config, checkpointer and transforms

    cfg = rg.make_cfg("sgg_configs/vgattr/vinvl_x152c4.yaml", weights)
    model, tf = rg.load_model(cfg), rg.build_transforms(cfg, is_train=False)

    def run(path):
        x, _ = tf(Image.open(path).convert("RGB"), target=None)
        with torch.no_grad():
            return len(model(x)[0])
    return run


def ours(weights):
    from regionbert.extract import families
    from regionbert.extract.detector import DetectorSpec
    from regionbert.extract.images import decode_image

    model, _, _ = families.build_detector(DetectorSpec("vinvl_x152c4", weights))
    fam = families.family_of("vinvl_x152c4")
    prepare = fam.image_input(model).prepare
    ex = fam.region_extractor(model, fam.box_policy("butd", 0.3, 0.2, 10, 100, None))

    def run(path):
        rgb = decode_image(str(path))
        return len(ex([prepare(rgb)], [rgb.shape[:2]])[0]["boxes"])
    return run


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("side", choices=["original", "ours"])
    ap.add_argument("--weights", required=True)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--reps", type=int, default=2)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    run = (original if a.side == "original" else ours)(a.weights)
    for name in NAMES:
        for rep in range(a.reps):
            t0, c0 = time.perf_counter(), time.process_time()
            n = run(IMAGES / f"{name}.jpg")
            print(json.dumps({"side": a.side, "image": name, "rep": rep, "boxes": n,
                              "cpu_s": round(time.process_time() - c0, 2), "wall_s": round(time.perf_counter() - t0, 2),
                              "load": round(os.getloadavg()[0], 1)}), flush=True)


if __name__ == "__main__":
    main()
