"""butd_r101_vg on CPU: seconds per image at 600/1000 (max-conf policy, 10-100 boxes), side by side with
the default torchvision detector (resnet50_fpn_v2 at 800/1333, same policy) in one run; and what
batching with padding would do to this C4 model's outputs.

    python bench/bench_butd.py --weights /tmp/weights_seed0.pkl --images ../shared/butd-kit/images

Without --weights the detectors have seeded random weights (speed is the same; the padding figures are
more telling with the kit's calibrated weights, made by ../shared/butd-kit/make_weights.py).
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import time

import numpy as np
import torch

from regionbert.extract import butd
from regionbert.extract.detector import DetectorSpec
from regionbert.extract.families import build_detector
from regionbert.extract.images import decode_image, to_tensor
from regionbert.extract.policies import BoxPolicy
from regionbert.extract.torchvision_rcnn import RegionExtractor, preprocess


def timed(fn):
    w, c = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - w, time.process_time() - c


def speed(images, weights, seed, repeat):
    model = butd.load_detector(weights)[0] if weights else butd.random_detector(seed)
    ext = butd.BUTDExtractor(model, butd.BUTDPolicy("butd"))
    tv, _, _ = build_detector(DetectorSpec("resnet50_fpn_v2", "none", seed=seed))
    tv_ext = RegionExtractor(tv, BoxPolicy("butd"))
    rows = {"butd_r101_vg 600/1000": [], "resnet50_fpn_v2 800/1333": []}
    with torch.inference_mode():
        for _ in range(repeat):
            for path in images:
                rgb = decode_image(path)
                size = rgb.shape[:2]
                x = model.transform.prepare(rgb)
                r, wall, cpu = timed(lambda x=x, size=size: ext([x], [size])[0])
                rows["butd_r101_vg 600/1000"].append((wall, cpu, len(r["boxes"])))
                x = preprocess(tv.transform, to_tensor(rgb))
                r, wall, cpu = timed(lambda x=x, size=size: tv_ext([x], [size])[0])
                rows["resnet50_fpn_v2 800/1333"].append((wall, cpu, len(r["boxes"])))
    return {k: {"s_per_image_wall": round(float(np.mean([a for a, _, _ in v])), 2),
                "cpu_s_per_image": round(float(np.mean([b for _, b, _ in v])), 2),
                "boxes_per_image": float(np.mean([n for _, _, n in v])), "images": len(v)} for k, v in rows.items()}


def padding(image, weights, seed, pad=(8, 100)):
    """One image alone vs the same image zero-padded at the bottom/right (what a padded batch does)."""
    model = butd.load_detector(weights)[0] if weights else butd.random_detector(seed)
    x = model.transform.prepare(decode_image(image))
    h, w = x.shape[1:]
    xp = torch.nn.functional.pad(x, (0, pad[1], 0, pad[0]))  # 0 = the mean pixel after mean subtraction
    with torch.inference_mode():
        r4 = model.backbone(x[None])
        r4p = model.backbone(xp[None])
        r4s = model.backbone(torch.stack([x, x]))  # same shape stacked: no padding
        hf, wf = r4.shape[2:]
        valid = r4p[:, :, :hf, :wf]
        d = (valid - r4).abs()
        edge = d.amax(dim=(0, 1))  # (hf, wf): how far into the map the padding reaches
        p, _ = model.proposals(r4, (h, w))
        pp, _ = model.proposals(r4p, (h, w))  # same image size for clipping: only the features differ
        same = sum(bool(((pp - b).abs().amax(1) < 0.1).any()) for b in p)
        f = model.regions(r4, p[:50]).features
        fp = model.regions(r4p, p[:50]).features
    rows_hit = int((edge.amax(1) > 1e-4).sum())
    cols_hit = int((edge.amax(0) > 1e-4).sum())
    return {"image": os.path.basename(image), "resized": [h, w], "padded_to": [h + pad[0], w + pad[1]],
            "res4_max_abs_diff": float(d.max()), "res4_rows_changed": f"{rows_hit}/{hf}",
            "res4_cols_changed": f"{cols_hit}/{wf}", "proposals_kept_within_0.1px": f"{same}/{len(p)}",
            "features_first50_max_abs_diff": float((f - fp).abs().max()),
            "stacked_same_shape_res4_max_abs_diff": float((r4s - r4).abs().max())}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "butd-kit",
                                                     "images"))
    ap.add_argument("--weights", help="a butd .pkl (default: seeded random weights)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    images = sorted(glob.glob(os.path.join(a.images, "*.jpg")))
    if not images:
        raise SystemExit(f"no .jpg under {a.images}")
    out = {"threads": a.threads, "torch": torch.__version__, "load_average_before": os.getloadavg()}
    out["speed"] = speed(images, a.weights, a.seed, a.repeat)
    out["padding"] = padding(images[0], a.weights, a.seed)
    out["load_average_after"] = os.getloadavg()
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
