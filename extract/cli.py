"""`regionbert-extract`: a folder or manifest of images -> region-feature shards."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from regionbert.data import ShardError

from .detector import DetectorSpec
from .families import DEFAULT_SIZES, DETECTORS, POLICY_CHOICES, detectors_taking, family_of
from .images import DEFAULT_MAX_PIXELS
from .pipeline import ExtractConfig, run, summary_dict

# DEFAULT_SIZES: each detector's own resize settings (shorter side, cap on the longer side), from its family,
# shown in --help; tests/test_extract_fidelity.py checks them against the built models.


def _sizes_help(which: int) -> str:
    """'800 (resnet50_fpn_v2, ...), 320 (mobilenet_v3_large_320_fpn)' for min (0) or max (1) size."""
    by_value: dict[int, list[str]] = {}
    for arch, sizes in DEFAULT_SIZES.items():
        by_value.setdefault(sizes[which], []).append(arch)
    return ", ".join(f"{v} for {', '.join(archs)}" for v, archs in by_value.items())


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except None (those options say in words what they default to)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


def parse_args(argv=None) -> ExtractConfig:
    p = argparse.ArgumentParser(prog="regionbert-extract", description=__doc__, formatter_class=_Help)
    p.add_argument("images", help="folder of images (recursive) or manifest (.csv .tsv .jsonl .parquet)")
    p.add_argument("-o", "--out", required=True, help="output folder; this job writes shard-IIIII-of-NNNNN in it")
    g = p.add_argument_group("detector")
    g.add_argument("--detector", default=os.environ.get("REGIONBERT_DETECTOR", "resnet50_fpn_v2"),
                   choices=DETECTORS, help="default: $REGIONBERT_DETECTOR or resnet50_fpn_v2; butd_r101_vg: "
                   "bottom-up-attention's Visual Genome detector (2048-d, 1600 classes, 400 attributes), "
                   "--weights faster_rcnn_from_caffe_attr.pkl, 600/1000 by default")
    g.add_argument("--weights", default=os.environ.get("REGIONBERT_WEIGHTS", "DEFAULT"),
                   help="torchvision weights name (DEFAULT, COCO_V1, ...; downloaded to the torch cache), a "
                        "local checkpoint file (butd_r101_vg: the published .pkl), or 'none' (random init: dry runs "
                        "and tests only)")
    g.add_argument("--labelmap", help="vinvl_x152c4: the label map JSON (VG-SGG-dicts-vgoi6-clipped.json) whose "
                                      "class and attribute names go in the shard (default: names by index)")
    g.add_argument("--seed", type=int, default=0, help="init seed for --weights none")
    g.add_argument("--min-size", type=int, help=f"resize shorter side to this (default: the detector's own: "
                                                f"{_sizes_help(0)})")
    g.add_argument("--max-size", type=int, help=f"cap on the longer side (default: the detector's own: "
                                                f"{_sizes_help(1)})")
    g = p.add_argument_group("boxes")
    g.add_argument("--policy", default="butd", choices=POLICY_CHOICES,
                   help="notebook (butd_r101_vg only): py-bottom-up-attention's attribute notebook, "
                        "--boxes-per-image class-regressed detections (default 36)")
    g.add_argument("--boxes-per-image", type=int, help="fixed policy: exactly this many boxes (e.g. 36)")
    g.add_argument("--min-boxes", type=int, default=10)
    g.add_argument("--max-boxes", type=int, default=100)
    g.add_argument("--conf-thresh", type=float, default=0.2)
    g.add_argument("--nms-thresh", type=float, default=0.3)
    g.add_argument("--score-thresh", type=float,
                   help="torchvision policy: the model's box score threshold (default: the model's own, 0.05)")
    g.add_argument("--boxes", dest="boxes_file",
                   help="given policy: JSONL rows {\"id\": ..., \"boxes\": [[x1, y1, x2, y2], ...]}")
    g = p.add_argument_group("manifest")
    g.add_argument("--image-root", help="manifest paths are relative to this (default: the manifest's folder)")
    g.add_argument("--path-column")
    g.add_argument("--id-column")
    g.add_argument("--allow-outside-root", action="store_true",
                   help="accept manifest paths (and symlinked files in a folder) that resolve outside the root")
    g = p.add_argument_group("job")
    g.add_argument("--num-shards", type=int, help="split the input into N jobs (default: SLURM array / torchrun, or 1)")
    g.add_argument("--shard-index", type=int, help="this job's part, 0..N-1")
    g.add_argument("--batch-size", type=int, default=8,
                   help="images per forward pass; a batch holds images of one padded shape only, so features do "
                        "not depend on it")
    g.add_argument("--group-window", type=int,
                   help="decoded images that may wait for a same-shape batch (default: 4 x batch size; each "
                        "holds a resized image in memory)")
    g.add_argument("--workers", type=int, default=4, help="decoding and resizing processes")
    g.add_argument("--device", default="auto")
    g.add_argument("--amp", default="auto", choices=["auto", "bf16", "fp16", "none"], help="autocast on CUDA")
    g.add_argument("--feature-dtype", default="float16", choices=["float16", "float32"])
    g.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, help="refuse larger images (bombs)")
    g.add_argument("--max-failure-fraction", type=float, default=0.01,
                   help="exit non-zero only if more than this fraction of images fail")
    g.add_argument("--commit-every", type=int, default=256, help="records per shard commit")
    g.add_argument("--append", action="store_true",
                   help="add images missing from a complete shard (new or failed before); only while nobody reads it")
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    a = p.parse_args(argv)
    if (a.num_shards is None) != (a.shard_index is None):
        p.error("--num-shards and --shard-index go together")
    for name in ("batch_size", "commit_every", "max_pixels"):
        if getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if a.workers < 0:
        p.error("--workers must be 0 or more")
    policy = a.policy
    lo, hi = a.min_boxes, a.max_boxes
    family = family_of(a.detector)
    if policy == "notebook":  # K detections, 36 unless --boxes-per-image says
        if a.detector not in detectors_taking(policy):
            p.error(f"--policy notebook is {', '.join(detectors_taking(policy))}'s")
        lo = hi = a.boxes_per_image or 36
    elif a.boxes_per_image is not None:
        policy, lo, hi = "fixed", a.boxes_per_image, a.boxes_per_image
    if a.labelmap is not None and a.detector not in family_of("vinvl_x152c4").detectors:
        p.error("--labelmap belongs to --detector vinvl_x152c4")
    if policy not in family.policies:
        p.error(f"--detector {a.detector} takes --policy {', '.join(family.policies)}")
    return ExtractConfig(
        images=a.images, out=a.out,
        detector=DetectorSpec(a.detector, a.weights, a.min_size, a.max_size, a.seed, a.labelmap),
        policy=family.box_policy(policy, a.nms_thresh, a.conf_thresh, lo, hi, a.score_thresh),
        image_root=a.image_root, path_column=a.path_column, id_column=a.id_column,
        allow_outside_root=a.allow_outside_root, boxes_file=a.boxes_file, num_shards=a.num_shards,
        shard_index=a.shard_index, batch_size=a.batch_size, workers=a.workers, device=a.device, amp=a.amp,
        feature_dtype=a.feature_dtype, max_pixels=a.max_pixels, max_failure_fraction=a.max_failure_fraction,
        commit_every=a.commit_every, append=a.append, progress=not a.quiet, group_window=a.group_window)


def main(argv=None) -> int:
    warnings.simplefilter("always", UserWarning)  # the random-weights warning must be seen
    try:
        cfg = parse_args(argv)
        s = run(cfg)
    except (ValueError, ShardError) as e:
        print(f"regionbert-extract: error: {e}", file=sys.stderr)
        return 2
    print(f"{s.shard}: {s.written} written, {s.already_done} already done, {s.failed} failed of {s.total} "
          f"in {s.seconds:.1f}s ({s.images_per_second:.2f} images/s)")
    if s.failures_file:
        print(f"failures (id, path, reason): {s.failures_file}")
    print(json.dumps(summary_dict(s)), file=sys.stderr)
    if s.failure_fraction > cfg.max_failure_fraction:
        print(f"regionbert-extract: {s.failure_fraction:.1%} of images failed, more than the allowed "
              f"{cfg.max_failure_fraction:.1%}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
