"""VinVL's detector checkpoint (`vinvl_vg_x152c4.pth`) and its label map, read without running anything.

The checkpoint is what maskrcnn_benchmark's Checkpointer saves (docs/vinvl-spec.md section 9): a torch zip
file holding {"model": state_dict, maybe "optimizer", "scheduler", "iteration"}, or a bare state_dict; the
names may carry DDP's "module." prefix (the original strips it when every key has it; so do we). It is read
with torch.load(weights_only=True, mmap=True): torch's restricted unpickler rebuilds tensors and plain
containers and refuses any other global, so a file that would run code is an error, never a call.

Then every name and shape is checked against the network's own table (extract/vinvl.py builds it from the
network on the meta device and passes it in), before anything is copied into the network. The stage depths
are read from the file's names first (the released model: 3, 8, 36 backbone blocks and 3 res5 blocks; the
parity kit's small generator writes 1, 1, 2 and 1), so the table fits the file's depths and everything else
(widths, groups, heads) must be exactly VinVL's.

The label map (`VG-SGG-dicts-vgoi6-clipped.json`, spec section 10) gives the class and attribute names; its
counts must match the checkpoint's classifier and attribute head.

This module knows the file formats, not the network: it imports nothing from extract/.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from collections.abc import Callable

import torch

NAME = "vinvl_x152c4"
Shapes = dict[str, tuple[int, ...]]
RES5_BOX = "roi_heads.box.feature_extractor."
RES5_ATTR = "attribute.feature_extractor."  # the same module as RES5_BOX in the original (AttrRCNN.py:32-35)
RELEASED_DEPTHS = (3, 8, 36, 3)  # layer1..3 of the backbone, layer4 (res5) of the box head
MAX_LABELMAP_BYTES = 64 << 20  # the released label map is ~100 kB; refuse to parse anything absurd
_BLOCK = re.compile(r"^(?:backbone\.body\.layer([123])|roi_heads\.box\.feature_extractor\.head\.layer(4))\.(\d+)\.")


class WeightsError(ValueError):
    """A weights or label-map file that is not VinVL's X152-C4, or that would run code."""


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _regular_file(path: str, what: str) -> None:
    try:
        st = os.stat(path)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read the {what}: {e.strerror or e}") from None
    if not stat.S_ISREG(st.st_mode):
        raise WeightsError(f"{path}: the {what} is not a regular file")


def depths_of(names) -> tuple[int, int, int, int]:
    """Blocks per stage (layer1, layer2, layer3, res5) from checkpoint names: highest block index + 1."""
    top = [0, 0, 0, 0]
    for n in names:
        m = _BLOCK.match(n)
        if m:
            stage = int(m.group(1) or m.group(2)) - 1
            top[stage] = max(top[stage], int(m.group(3)) + 1)
    return tuple(top)


def _state_dict_of(obj, path: str) -> dict[str, torch.Tensor]:
    """The model's entries: obj["model"] when the file is a Checkpointer save, else obj itself; without a
    "module." prefix that every key carries (model_serialization.py:122-129)."""
    if isinstance(obj, dict) and "model" in obj:
        obj = obj["model"]
    if not isinstance(obj, dict) or not obj:
        raise WeightsError(f"{path}: expected a torch checkpoint holding {{'model': {{name: tensor}}}} or "
                           f"{{name: tensor}}, found {type(obj).__name__}")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"{path}: entry {bad[0]!r} is not a named tensor ({type(obj[bad[0]]).__name__})")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _check(sd: dict[str, torch.Tensor], shapes: Shapes, path: str) -> None:
    missing = [k for k in shapes if k not in sd]
    unexpected = [k for k in sd if k not in shapes]
    if missing or unexpected:
        what = []
        if missing:
            what.append(f"missing {len(missing)} (e.g. {', '.join(missing[:4])})")
        if unexpected:
            what.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:4])})")
        raise WeightsError(f"{path}: not a VinVL X152-C4 checkpoint: {'; '.join(what)}")
    for k, want in shapes.items():
        t = sd[k]
        if tuple(t.shape) != want:
            raise WeightsError(f"{path}: {k} has shape {tuple(t.shape)}, expected {want}")
        if not t.is_floating_point():
            raise WeightsError(f"{path}: {k} has dtype {t.dtype}, expected a floating-point tensor")
    # one res5 in the original: its two names must hold the same values (else which one the original used
    # would depend on load order: the attribute copy, spec section 9)
    for k in shapes:
        if k.startswith(RES5_ATTR):
            twin = RES5_BOX + k[len(RES5_ATTR):]
            a, b = sd[k], sd[twin]
            same_storage = a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() and \
                a.storage_offset() == b.storage_offset() and a.stride() == b.stride() and a.dtype == b.dtype
            if not same_storage and not torch.equal(a, b):
                raise WeightsError(f"{path}: {k} differs from {twin}: the attribute head shares the box head's res5 "
                                   "in VinVL, so the two copies must be equal")
    for k, t in sd.items():
        if not bool(torch.isfinite(t).all()):
            raise WeightsError(f"{path}: {k} holds NaN or infinite values")


def read_checkpoint(path: str, shapes_for: Callable[[tuple[int, int, int, int]], Shapes]
                    ) -> tuple[dict[str, torch.Tensor], str, tuple[int, int, int, int]]:
    """-> (float32 tensors by name without "module.", the file's sha256, stage depths). shapes_for(depths)
    gives the network's table of names and shapes for those depths. The tensors are memory-mapped from the
    file (copy them into the network; nothing here keeps them)."""
    _regular_file(path, "weights file")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as e:  # noqa: BLE001 - a foreign, truncated or code-running file raises many kinds
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"{path}: not a torch checkpoint readable with weights_only=True "
                           f"({type(e).__name__}: {msg[:300]})") from None
    sd = _state_dict_of(obj, path)
    depths = depths_of(sd)
    if 0 in depths:
        stage = ("backbone.body.layer1", "backbone.body.layer2", "backbone.body.layer3",
                 RES5_BOX + "head.layer4")[depths.index(0)]
        raise WeightsError(f"{path}: not a VinVL X152-C4 checkpoint: no {stage}.* entries")
    _check(sd, shapes_for(depths), path)
    sd = {k: v.float() for k, v in sd.items()}
    return sd, file_sha256(path), depths


def _index_table(doc: dict, key: str, count: int, path: str) -> list[str]:
    """{name: 1-based index} -> names by index 1..count, each index exactly once."""
    table = doc.get(key)
    if not isinstance(table, dict):
        raise WeightsError(f"{path}: no {key!r} object (a VG-SGG-dicts label map has one)")
    names: list[str | None] = [None] * count
    for name, idx in table.items():
        if not isinstance(idx, int) or isinstance(idx, bool) or not 1 <= idx <= count:
            raise WeightsError(f"{path}: {key}[{name!r}] = {idx!r}; the checkpoint has {count} of them, so "
                               f"indices must be 1..{count}")
        if names[idx - 1] is not None:
            raise WeightsError(f"{path}: {key} gives index {idx} to both {names[idx - 1]!r} and {name!r}")
        names[idx - 1] = name
    if len(table) != count:
        raise WeightsError(f"{path}: {key} has {len(table)} entries, but the checkpoint has {count} (plus "
                           f"background / no-attribute at 0): a label map of another model?")
    return names  # type: ignore[return-value]


def read_labelmap(path: str, num_classes: int, num_attributes: int | None) -> tuple[list[str], list[str] | None]:
    """The label map JSON -> (class names 1..num_classes, attribute names 1..num_attributes or None), counts
    without background / "no attribute" (index 0 in the model, absent from the file)."""
    _regular_file(path, "label map")
    if os.path.getsize(path) > MAX_LABELMAP_BYTES:
        raise WeightsError(f"{path}: larger than {MAX_LABELMAP_BYTES >> 20} MiB: not a label map")
    try:
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise WeightsError(f"{path}: not a JSON label map ({type(e).__name__}: {e})") from None
    if not isinstance(doc, dict):
        raise WeightsError(f"{path}: expected a JSON object with label_to_idx, found {type(doc).__name__}")
    classes = _index_table(doc, "label_to_idx", num_classes, path)
    attrs = _index_table(doc, "attribute_to_idx", num_attributes, path) if num_attributes else None
    return classes, attrs
