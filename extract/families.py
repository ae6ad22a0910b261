"""The detector families regionbert-extract knows, and which family builds which --detector name.

A plain table: each family module defines FAMILY (extract/detector.py's Family); adding a family is one
import and one entry in FAMILIES. This is the only module that imports the families; the CLI and the
pipeline ask it, never a family module directly, so families never need to know of one another.
"""

from __future__ import annotations

from . import butd, torchvision_rcnn, vinvl
from .detector import DetectorSpec, Family, UnknownDetector

FAMILIES: tuple[Family, ...] = (torchvision_rcnn.FAMILY, butd.FAMILY, vinvl.FAMILY)
BY_DETECTOR: dict[str, Family] = {name: fam for fam in FAMILIES for name in fam.detectors}
DETECTORS = list(BY_DETECTOR)  # --detector choices, in the families' order
# every --policy any family takes, in the order the families list them
POLICY_CHOICES = list(dict.fromkeys(p for fam in FAMILIES for p in fam.policies))
DEFAULT_SIZES = {name: sizes for fam in FAMILIES for name, sizes in fam.default_sizes.items()}
# the family a name outside the table goes to: a `regionbert-detector finetune` checkpoint names its own
# torchvision builder, whatever the spec's name says (and torchvision's build refuses an unknown name)
FALLBACK = torchvision_rcnn.FAMILY


def family_of(detector: str) -> Family:
    return BY_DETECTOR.get(detector, FALLBACK)


def detectors_taking(policy: str) -> list[str]:
    """The detector names whose family takes this box policy."""
    return [name for name, fam in BY_DETECTOR.items() if policy in fam.policies]


def build_detector(spec: DetectorSpec, **overrides):
    """(model in eval mode, class names with background at 0, what the shard metadata records about the
    detector), by spec.arch's family. overrides go to the family's build (torchvision: to the builder,
    e.g. box_score_thresh)."""
    try:
        return family_of(spec.arch).build(spec, **overrides)
    except UnknownDetector:
        raise ValueError(f"unknown detector {spec.arch!r}; choose one of {', '.join(DETECTORS)}") from None
