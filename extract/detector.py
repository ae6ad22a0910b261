"""What every detector family shares: the spec of which network to build, the interface a family module
implements (Family), the weights digest recorded in shard metadata, and the random-weights warning.

No family code here, and no import of a family: the families import this module, and extract/families.py
maps a --detector name to its family. docs/extract.md says where each family lives and what a new one
must provide.
"""

from __future__ import annotations

import hashlib
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    import numpy as np

    from .policies import BoxPolicy


@dataclass
class DetectorSpec:
    """Everything that decides which network computes the features."""

    arch: str = "resnet50_fpn_v2"
    weights: str = "DEFAULT"  # torchvision weights name, a local checkpoint path, or "none"
    min_size: int | None = None  # None: the builder's default (800; 320 for the 320 model)
    max_size: int | None = None  # None: the builder's default (1333; 320 for the 320 model)
    seed: int = 0  # initialisation seed when weights == "none"
    labelmap: str | None = None  # a family's class/attribute names file (vinvl_x152c4: VG-SGG-dicts-*.json)


class UnknownDetector(ValueError):
    """A detector name that no family builds (extract/families.py says which names there are)."""


@dataclass(frozen=True)
class ImageInput:
    """How one decoded image (RGB uint8, H x W x 3, as extract.images decodes it) becomes the model's input,
    in a DataLoader worker (so it must pickle: a dataclass or a module-level class, no lambdas)."""

    prepare: Callable[[np.ndarray], torch.Tensor]  # RGB uint8 -> (3, h, w) float, resized, on the CPU
    # images whose prepared shapes round up to the same multiple of this run as one batch (their features
    # do not depend on the batch); None: the family runs each image alone (padding would change results)
    size_divisible: int | None


@dataclass(frozen=True)
class Family:
    """One detector family: everything the generic code (families.py, cli.py, pipeline.py) asks of it.

    Each family module ends with `FAMILY = Family(...)` of its own plain functions; extract/families.py
    lists the families. Contracts:
      build(spec, **overrides) -> (model, class_names, info): the model in eval mode; class names with
          background at index 0 (the shard format's order); info: what the shard metadata records about the
          detector (name, weights source, weights_digest, sizes, ...). Refuses a bad spec or weights file
          with a ValueError naming the file and the entry, before any image is read.
      load_weights(path) -> (tensors by name, what else the file says): reads a weights file without
          running code in it (torch.load(weights_only=True), or a checked unpickler), checks every name and
          shape; a ValueError naming the file otherwise. build uses it for a --weights file.
      image_input(model) -> ImageInput: the model's preprocessing, run in the loader's workers.
      layout(model) -> (feature_dim, attribute_names or None): what each record holds, for the shard header.
      box_policy(name, nms_thresh, conf_thresh, min_boxes, max_boxes, score_thresh) -> the policy object
          (extract/policies.BoxPolicy or a subclass), ValueError for a combination it does not take.
      region_extractor(model, policy) -> extractor: extractor(images, original_sizes, given_boxes) gives per
          image a dict of boxes (N, 4, original pixels), features (N, D), class_probs (N, C, background at
          0), scores, labels, and attr_probs (N, A) if the family has attributes.
    """

    name: str  # "torchvision", "butd": for messages and docs
    detectors: tuple[str, ...]  # the --detector names it builds
    policies: tuple[str, ...]  # the --policy names it takes
    default_sizes: dict[str, tuple[int, int]]  # detector -> (min_size, max_size) unless told (--help says them)
    build: Callable[..., tuple[torch.nn.Module, list[str], dict]]
    load_weights: Callable[[str], tuple[dict, Any]]
    image_input: Callable[[torch.nn.Module], ImageInput]
    layout: Callable[[torch.nn.Module], tuple[int, list[str] | None]]
    box_policy: Callable[..., BoxPolicy]
    region_extractor: Callable[[torch.nn.Module, BoxPolicy], Callable]
    # --amp auto: autocast on CUDA. False: float32 unless --amp names a dtype (the family's outputs are
    # checked against its original code in float32, and autocast would move them past those tolerances)
    autocast: bool = True


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer (names, dtypes, shapes, bytes): identifies the weights
    whatever file or download they came from."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous().reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return "sha256:" + h.hexdigest()


def local_or_random(spec, name: str, random_detector: Callable, load_detector: Callable, needs: str):
    """(model, source, the file's sha256 or None) for a family whose weights are one local file: --weights none
    builds random_detector(spec.seed) with the random-weights warning, a file is load_detector(path) ->
    (model, sha256), anything else is refused: "--weights X: NAME needs <needs>; or 'none' for a dry run"."""
    if spec.weights.lower() == "none":
        warn_random_weights(name, spec.seed, stacklevel=5)  # still names the caller of families.build_detector
        return random_detector(spec.seed), "none", None
    if os.path.isfile(spec.weights):
        model, file_sha = load_detector(spec.weights)
        return model, os.path.abspath(spec.weights), file_sha
    raise ValueError(f"--weights {spec.weights!r}: {name} needs {needs}; or 'none' for a dry run")


def feature_layout(model) -> tuple[int, list[str] | None]:
    """Family.layout for a model that carries its feature_dim and attribute_names."""
    return model.feature_dim, model.attribute_names


def warn_random_weights(detector: str, seed: int, stacklevel: int = 4) -> None:
    """The warning every family gives for --weights none (the CLI shows it always: it must be seen). The
    default stacklevel names the caller of families.build_detector (here <- build <- build_detector)."""
    warnings.warn(f"detector {detector} has RANDOM weights (--weights none, seed {seed}): its boxes, features "
                  "and class distributions are meaningless. Use it for dry runs and tests only.",
                  stacklevel=stacklevel)
