"""How much a region's features depend on the other images in its batch, before and after grouping batches
by padded shape (regionbert.extract.pipeline.ShapeBatcher).

    python bench/bench_batching.py                                  # mobilenet_v3_large_320_fpn, resnet50_fpn_v2
    python bench/bench_batching.py --archs resnet50_fpn_v2 --min-size 480 --max-size 800

torchvision pads every image of a batch to the batch's largest (then to a multiple of 32). For each detector
(seeded random weights, with random biases and batch-norm means: torchvision initialises those to 0, which
makes zero padding invisible, and trained weights are not like that), COCO-sized images are run with the
same given boxes (the 'given' policy, so every run pools the very same boxes):
  alone   each image in a batch of its own: the reference
  before  batches of --batch-size in input order, whatever their shapes (what the extractor did)
  after   the batches ShapeBatcher makes: one padded shape per batch (what the extractor does now)
and each image's features are compared with its reference: max |difference| / max |reference feature|,
over all boxes and over the boxes touching the image's right or bottom edge (next to the padding).
Also printed: batches run and seconds per image (CPU, so only indicative).
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch

from regionbert.extract.detector import DetectorSpec
from regionbert.extract.families import build_detector
from regionbert.extract.pipeline import ShapeBatcher, padded_shape
from regionbert.extract.policies import BoxPolicy
from regionbert.extract.torchvision_rcnn import RegionExtractor, preprocess

SIZES = [(480, 640), (375, 500), (427, 640), (640, 480), (480, 640), (333, 500)]  # (h, w), COCO-like


def random_detector(arch: str, seed: int, min_size: int | None, max_size: int | None):
    """Seeded random weights, biases and batch-norm means included (see the module docstring)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _, _ = build_detector(DetectorSpec(arch, "none", min_size, max_size, seed=seed))
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith(("running_mean", ".bias")) and t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    return model.eval()


def boxes_for(h: int, w: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """12 boxes: the whole image, 3 along the right and bottom edges, 8 random. And which touch an edge."""
    fixed = [[0, 0, w, h], [w * 0.75, 0, w, h * 0.5], [0, h * 0.75, w * 0.5, h], [w * 0.8, h * 0.8, w, h]]
    xy = torch.rand(8, 2, generator=g) * torch.tensor([w * 0.6, h * 0.6])
    wh = torch.rand(8, 2, generator=g) * torch.tensor([w * 0.35, h * 0.35]) + 8
    boxes = torch.cat([torch.tensor(fixed, dtype=torch.float32), torch.cat([xy, xy + wh], 1)])
    edge = (boxes[:, 2] >= w - 1) | (boxes[:, 3] >= h - 1)
    return boxes, edge


def run(extractor, pre, sizes, boxes, batches: list[list[int]]) -> tuple[dict[int, torch.Tensor], float]:
    feats, start = {}, time.perf_counter()
    for batch in batches:
        out = extractor([pre[i] for i in batch], [sizes[i] for i in batch], [boxes[i] for i in batch])
        for i, r in zip(batch, out, strict=True):
            feats[i] = r["features"].float()
    return feats, time.perf_counter() - start


def compare(ref: dict, got: dict, edges: list) -> tuple[float, float]:
    """max over images of max|got - ref| / max|ref|: all boxes, and the boxes at the right/bottom edge."""
    all_, edge = 0.0, 0.0
    for i, a in ref.items():
        d = (got[i] - a).abs().max(1).values / a.abs().max()
        all_, edge = max(all_, d.max().item()), max(edge, d[edges[i]].max().item())
    return all_, edge


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", nargs="+", default=["mobilenet_v3_large_320_fpn", "resnet50_fpn_v2"])
    p.add_argument("--min-size", type=int, help="default: each detector's own")
    p.add_argument("--max-size", type=int)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(a.seed)
    images = [torch.rand(3, h, w, generator=g) for h, w in SIZES]
    made = [boxes_for(h, w, g) for h, w in SIZES]
    boxes, edges = [b for b, _ in made], [e for _, e in made]
    print("| detector | resized (h x w) | run | batches | max diff / max feature, all boxes | at the edge | s/image |")
    print("|---|---|---|---|---|---|---|")
    for arch in a.archs:
        model = random_detector(arch, a.seed, a.min_size, a.max_size)
        extractor = RegionExtractor(model, BoxPolicy("given"))
        with torch.inference_mode():
            pre = [preprocess(model.transform, im) for im in images]
        shapes = [tuple(x.shape[-2:]) for x in pre]
        n, bs = len(images), a.batch_size
        batcher = ShapeBatcher(bs, 4 * bs)
        grouped = [b for i in range(n) for b in batcher.add(i, padded_shape(pre[i], 32), i)] + batcher.flush()
        plans = {"alone": [[i] for i in range(n)],
                 "before": [list(range(i, min(i + bs, n))) for i in range(0, n, bs)],
                 "after": [[i for i, _ in b] for b in grouped]}
        ref, t_ref = run(extractor, pre, SIZES, boxes, plans["alone"])
        resized = ", ".join(sorted({f"{h}x{w}" for h, w in shapes}))
        for name, plan in plans.items():
            feats, t = (ref, t_ref) if name == "alone" else run(extractor, pre, SIZES, boxes, plan)
            d_all, d_edge = compare(ref, feats, edges)
            print(f"| {arch} | {resized} | {name} | {plan} | {d_all:.2%} | {d_edge:.2%} | {t / n:.2f} |",
                  flush=True)


if __name__ == "__main__":
    main()
