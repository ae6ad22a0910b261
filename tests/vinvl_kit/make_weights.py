#!/usr/bin/env python
"""
Deterministic random-weight checkpoint for VinVL's X152-C4 detector (microsoft/scene_graph_benchmark,
sgg_configs/vgattr/vinvl_x152c4.yaml, AttrRCNN), written in the released `vinvl_vg_x152c4.pth` layout.
numpy + the Python standard library only: no torch import.

    python make_weights.py --out vinvl_seed0.pth              # full model, 841 entries (docs/vinvl-spec.md)
    python make_weights.py --out tiny.pth --small             # same family, 1/1/2 + 1 blocks: fast tests

The output is a torch zip checkpoint (what torch.save writes): `archive/data.pkl` (pickle protocol 2 of
{"model": OrderedDict(name -> tensor)} with the OrderedDict's `_metadata`), `archive/byteorder`,
`archive/data/<key>` (raw little-endian float32 storages, 64-byte aligned) and `archive/version`.
The pickle references exactly these globals: collections.OrderedDict, torch._utils._rebuild_tensor_v2,
torch.FloatStorage -- so `torch.load(path, weights_only=True)` reads it.

Names, shapes and order follow the original's modules (docs/vinvl-spec.md, section 9):
backbone.body.{stem,layer1..3}, rpn.{anchor_generator,head}, roi_heads.box.{feature_extractor.head.layer4,
predictor}, attribute.{feature_extractor.head.layer4,predictor}. As in a state_dict of the original model,
`attribute.feature_extractor.*` and `roi_heads.box.feature_extractor.*` are the same tensors (the attribute
head shares the box head's res5, AttrRCNN.py:34-35) and point at the same storages in the file.

How every array is produced (rng = numpy.random.default_rng(seed), PCG64; entries in state_dict order):
  * rpn.anchor_generator.cell_anchors.0: the original's generate_anchors(16, (32..512), (0.5, 1, 2)) in
    float64, then float32 (no draws).
  * FrozenBatchNorm2d buffers (weight, bias, running_mean, running_var), one layer at a time, drawing
        g = U(lo, hi) per channel, t = N(0, 0.2^2) (as 2u-1 uniforms, see _normal), rm = N(0, 0.5^2),
        rv = U(0.5, 2);   weight = g * base * sqrt(rv),  bias = t + rm * g * base
    so that the layer computes y = x * (g * base) + t exactly as the original's FrozenBatchNorm2d
    (x * w / sqrt(rv) + (b - rm * w / sqrt(rv)); no eps, batch_norm.py:22-27). All four buffers are
    non-trivial, so an implementation that adds eps or forgets running_mean is caught.
    `base` undoes the expected gain of the preceding convolution (section "scales" below).
  * conv / linear weights: U(-a, a) with variance gain^2 * 2 / fan_in (fan_in = in/groups * kh * kw);
    biases U with standard deviation 0.1; cls_embedding U with variance 1.
  * the six head layers in CALIBRATED (RPN objectness and deltas, class scores, box deltas, attribute
    hidden layer and scores) are drawn with variance 1/fan_in and then, from calibration_seed0.json.gz
    (calibrate.py), each output unit's weight row is multiplied by its scale (float32) and its bias is
    replaced, so that objectness logits have std ~1.2, class logits ~4 with background the argmax on ~20 %
    of proposals, box deltas ~1, attribute logits ~2.5 on the kit images. --small and --uncalibrated skip it.
Only IEEE-exact operations touch the draws (+, -, *, sqrt, float64 -> float32 rounding), so the bytes are
the same on every platform and numpy >= 1.17.
"""
import argparse
import base64
import collections
import gzip
import hashlib
import io
import json
import math
import os
import pickle
import struct
import sys
import zipfile

import numpy as np

NUM_CLASSES = 1595      # 1594 Visual Genome objects + background at index 0 (vinvl_x152c4.yaml:21)
NUM_ATTRIBUTES = 525    # 524 attributes + "no attribute" at index 0 (vinvl_x152c4.yaml:23)
FULL_BLOCKS = (3, 8, 36, 3)   # R-152-C4 stages layer1..layer3 (resnet.py:82-85) + res5 head (3 blocks)
SMALL_BLOCKS = (1, 1, 2, 1)
GROUPS, WIDTH_PER_GROUP = 32, 8   # vinvl_x152c4.yaml:9-10
ANCHOR_NAME = "rpn.anchor_generator.cell_anchors.0"
HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_FROM, SHARED_TO = "roi_heads.box.feature_extractor.", "attribute.feature_extractor."

# per-layer scales (see the module docstring); chosen so that activations stay O(1) through 50 blocks
STEM_BASE = 1.0 / 80.0          # mean-subtracted 0..255 pixels have std ~60, a He conv doubles the variance
BRANCH_G = (0.2, 0.5)           # bn3 closing each residual branch: damped, as the BUTD kit does
PLAIN_G = (0.5, 1.0)
# the layers whose per-output-unit scale and bias come from the calibration file (calibrate.py)
CALIBRATED = ("rpn.head.cls_logits", "rpn.head.bbox_pred", "roi_heads.box.predictor.cls_score",
              "roi_heads.box.predictor.bbox_pred", "attribute.predictor.fc_attr", "attribute.predictor.attr_score")


# ----------------------------------------------------------------------------- names and shapes
def _conv(name, cout, cin, k):
    return [(name + ".weight", (cout, cin, k, k))]


def _bn(name, c):
    return [(name + "." + f, (c,)) for f in ("weight", "bias", "running_mean", "running_var")]


def _block(prefix, cin, cb, cout):
    """One BottleneckWithFixedBatchNorm (resnet.py:245-350) in registration order: downsample first
    (it is assigned before conv1 when in != out), then conv1/bn1, conv2/bn2 (grouped), conv3/bn3."""
    out = []
    if cin != cout:
        out += _conv(prefix + "downsample.0", cout, cin, 1) + _bn(prefix + "downsample.1", cout)
    out += _conv(prefix + "conv1", cb, cin, 1) + _bn(prefix + "bn1", cb)
    out += _conv(prefix + "conv2", cb, cb // GROUPS, 3) + _bn(prefix + "bn2", cb)
    out += _conv(prefix + "conv3", cout, cb, 1) + _bn(prefix + "bn3", cout)
    return out


def _stage(prefix, n, cin, cb, cout):
    out = []
    for i in range(n):
        out += _block(f"{prefix}{i}.", cin if i == 0 else cout, cb, cout)
    return out


def param_shapes(blocks=FULL_BLOCKS, num_classes=NUM_CLASSES, num_attributes=NUM_ATTRIBUTES):
    """[(name, shape)] of the original AttrRCNN's state_dict, in its order."""
    b2 = GROUPS * WIDTH_PER_GROUP  # 256: stage-2 bottleneck width; doubles per stage (resnet.py:107-115)
    out = _conv("backbone.body.stem.conv1", 64, 3, 7) + _bn("backbone.body.stem.bn1", 64)
    out += _stage("backbone.body.layer1.", blocks[0], 64, b2, 256)
    out += _stage("backbone.body.layer2.", blocks[1], 256, 2 * b2, 512)
    out += _stage("backbone.body.layer3.", blocks[2], 512, 4 * b2, 1024)
    out += [(ANCHOR_NAME, (15, 4))]
    out += [("rpn.head.conv.weight", (1024, 1024, 3, 3)), ("rpn.head.conv.bias", (1024,)),
            ("rpn.head.cls_logits.weight", (15, 1024, 1, 1)), ("rpn.head.cls_logits.bias", (15,)),
            ("rpn.head.bbox_pred.weight", (60, 1024, 1, 1)), ("rpn.head.bbox_pred.bias", (60,))]
    res5 = _stage("roi_heads.box.feature_extractor.head.layer4.", blocks[3], 1024, 8 * b2, 2048)
    out += res5
    out += [("roi_heads.box.predictor.cls_score.weight", (num_classes, 2048)),
            ("roi_heads.box.predictor.cls_score.bias", (num_classes,)),
            ("roi_heads.box.predictor.bbox_pred.weight", (num_classes * 4, 2048)),
            ("roi_heads.box.predictor.bbox_pred.bias", (num_classes * 4,))]
    out += [(SHARED_TO + n[len(SHARED_FROM):], s) for n, s in res5]
    out += [("attribute.predictor.cls_embedding.weight", (num_classes, 256)),
            ("attribute.predictor.fc_attr.weight", (512, 2048 + 256)),
            ("attribute.predictor.fc_attr.bias", (512,)),
            ("attribute.predictor.attr_score.weight", (num_attributes, 512)),
            ("attribute.predictor.attr_score.bias", (num_attributes,))]
    return out


# ----------------------------------------------------------------------------- values
def cell_anchors():
    """maskrcnn_benchmark generate_anchors(stride=16, sizes=(32,64,128,256,512), ratios=(0.5,1,2))
    (anchor_generator.py:220-289): ratio-major, size-minor, rounded widths, legacy '+1' boxes."""
    stride, sizes, ratios = 16, np.array([32, 64, 128, 256, 512], float), np.array([0.5, 1.0, 2.0])
    base = np.array([1, 1, stride, stride], float) - 1

    def whctrs(a):
        w, h = a[2] - a[0] + 1, a[3] - a[1] + 1
        return w, h, a[0] + 0.5 * (w - 1), a[1] + 0.5 * (h - 1)

    def mk(ws, hs, x, y):
        ws, hs = ws[:, None], hs[:, None]
        return np.hstack((x - 0.5 * (ws - 1), y - 0.5 * (hs - 1), x + 0.5 * (ws - 1), y + 0.5 * (hs - 1)))

    w, h, x, y = whctrs(base)
    ws = np.round(np.sqrt(w * h / ratios))
    rat = mk(ws, np.round(ws * ratios), x, y)
    out = []
    for a in rat:
        w, h, x, y = whctrs(a)
        out.append(mk(w * sizes / stride, h * sizes / stride, x, y))
    return np.vstack(out).astype(np.float32)


def _uniform(rng, n, std):
    return (2.0 * rng.random(n) - 1.0) * (std * math.sqrt(3.0))


def _normal(rng, n, std):
    # sum of 4 uniforms (Irwin-Hall): IEEE-exact, unlike Box-Muller's log/cos whose last bits vary by libm
    return (rng.random((4, n)).sum(axis=0) - 2.0) * (std * math.sqrt(3.0))


def _bn_base(layer):
    if layer.endswith("stem.bn1"):
        return STEM_BASE
    # a He-initialised conv maps E[x^2] = q to variance 2q; post-ReLU unit-ish inputs have q ~ 0.5
    return 1.0


def _bn_values(rng, layer, c):
    lo, hi = BRANCH_G if layer.endswith("bn3") else PLAIN_G
    if layer.endswith("downsample.1"):
        lo, hi = 0.5, 0.7    # the shortcut carries the trunk: keep it below the branch sum
    g = lo + (hi - lo) * rng.random(c)
    t = _normal(rng, c, 0.2)
    rm = _normal(rng, c, 0.5)
    rv = 0.5 + 1.5 * rng.random(c)
    scale = g * _bn_base(layer)
    return {"weight": scale * np.sqrt(rv), "bias": t + rm * scale, "running_mean": rm, "running_var": rv}


def _dense_values(rng, name, shape):
    layer, field = name.rsplit(".", 1)
    n = int(np.prod(shape))
    if field == "bias":
        return _uniform(rng, n, 0.1)
    if layer.endswith("cls_embedding"):
        return _uniform(rng, n, 1.0)
    fan_in = int(np.prod(shape[1:]))
    if layer in CALIBRATED:   # variance 1/fan_in, then rescaled per output unit by the calibration
        return _uniform(rng, n, math.sqrt(1.0 / fan_in))
    return _uniform(rng, n, math.sqrt(2.0 / fan_in))


def decode_f32(text):
    return np.frombuffer(base64.b64decode(text), dtype="<f4").astype(np.float32)


def encode_f32(a):
    return base64.b64encode(np.ascontiguousarray(a, dtype="<f4").tobytes()).decode("ascii")


def load_calibration(path):
    with gzip.open(path, "rt") as f:
        return json.load(f)


def _calibrate(name, a, shape, calibration):
    """weight rows times the unit's scale (float32 multiply); bias replaced by the calibrated bias."""
    layer, field = name.rsplit(".", 1)
    entry = calibration["heads"][layer]
    if field == "weight":
        scale = decode_f32(entry["scale"])
        return a.astype(np.float32).reshape(shape) * scale.reshape((-1,) + (1,) * (len(shape) - 1))
    return decode_f32(entry["bias"])


def build_state(params, seed, calibration=None):
    """{name: float32 C-contiguous ndarray} in params order; shared entries are the same array.
    calibration=None leaves the CALIBRATED head layers as drawn (what calibrate.py measures)."""
    rng = np.random.default_rng(seed)
    state, bn_cache = collections.OrderedDict(), {}
    for name, shape in params:
        if name.startswith(SHARED_TO) and SHARED_FROM + name[len(SHARED_TO):] in state:
            state[name] = state[SHARED_FROM + name[len(SHARED_TO):]]
            continue
        layer, field = name.rsplit(".", 1)
        if name == ANCHOR_NAME:
            a = cell_anchors()
        elif field in ("weight", "bias", "running_mean", "running_var") and len(shape) == 1 and (
                ".bn" in layer or layer.endswith("downsample.1")):
            if layer not in bn_cache:
                bn_cache[layer] = _bn_values(rng, layer, shape[0])
            a = bn_cache[layer][field]
        else:
            a = _dense_values(rng, name, shape)   # drawn even when calibrated: the stream stays aligned
            if calibration is not None and layer in CALIBRATED:
                a = _calibrate(name, a, shape, calibration)
        a = np.ascontiguousarray(np.asarray(a, dtype=np.float64).astype(np.float32).reshape(shape))
        state[name] = a
    return state


# ----------------------------------------------------------------------------- torch zip writer
class _Global:
    """A reference to a global by name, pickled as GLOBAL without importing it (no torch here)."""

    def __init__(self, module, name):
        self.module, self.name = module, name

    def __call__(self, *args):  # pickle requires reduce functions to be callable
        raise TypeError(f"placeholder for {self.module}.{self.name}")


ORDERED_DICT = _Global("collections", "OrderedDict")
REBUILD_TENSOR = _Global("torch._utils", "_rebuild_tensor_v2")
FLOAT_STORAGE = _Global("torch", "FloatStorage")


class _Storage:
    def __init__(self, key, numel):
        self.key, self.numel = key, numel


class _Tensor:
    def __init__(self, storage, shape):
        self.storage, self.shape = storage, tuple(shape)

    def __reduce__(self):
        stride, acc = [], 1
        for d in reversed(self.shape):
            stride.append(acc)
            acc *= d
        return (REBUILD_TENSOR, (self.storage, 0, self.shape, tuple(reversed(stride)), False,
                                 _OrderedDict()))


class _OrderedDict:
    """Pickles as collections.OrderedDict(items) with optional instance state (torch's `_metadata`)."""

    def __init__(self, items=(), state=None):
        self.items, self.state = list(items), state

    def __reduce__(self):
        return (ORDERED_DICT, (), self.state, None, iter(self.items))


class _CheckpointPickler(pickle._Pickler):
    """The pure-Python pickler, protocol 2 (torch.save's), emitting _Global as GLOBAL module\\nname\\n and
    storages as persistent ids ('storage', torch.FloatStorage, key, 'cpu', numel), as torch does."""

    def save(self, obj, save_persistent_id=True):
        if isinstance(obj, _Global):
            x = self.memo.get(id(obj))
            if x is not None:
                self.write(self.get(x[0]))
                return
            self.write(pickle.GLOBAL + (obj.module + "\n" + obj.name + "\n").encode("ascii"))
            self.memoize(obj)
            return
        super().save(obj, save_persistent_id)

    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", FLOAT_STORAGE, obj.key, "cpu", obj.numel)
        return None


def _metadata(names):
    """torch's state_dict `_metadata`: {module prefix: {"version": 1}} for '' and every module above a
    tensor (parameterless modules such as the pooler are left out: nothing reads them back)."""
    prefixes = {""}
    for n in names:
        parts = n.split(".")[:-1]
        prefixes.update(".".join(parts[:i]) for i in range(1, len(parts) + 1))
    return _OrderedDict([(p, {"version": 1}) for p in sorted(prefixes)])


def checkpoint_pickle(state, prefix=""):
    """(data.pkl bytes, [(storage key, float32 array)]) for {"model": state}; arrays that are the same
    object share one storage, as torch.save does for tensors sharing memory."""
    storages, by_id, items = [], {}, []
    for name, a in state.items():
        if id(a) not in by_id:
            by_id[id(a)] = _Storage(str(len(storages)), a.size)
            storages.append((by_id[id(a)].key, a))
        items.append((prefix + name, _Tensor(by_id[id(a)], a.shape)))
    model = _OrderedDict(items, state={"_metadata": _metadata([n for n, _ in items])})
    buf = io.BytesIO()
    _CheckpointPickler(buf, protocol=2).dump({"model": model})
    return buf.getvalue(), storages


def _aligned_info(zf, arcname, fh_offset):
    """A stored ZipInfo whose local-header extra field pads the data start to 64 bytes (torch's layout:
    an 'FB' extra record of 'Z' bytes, caffe2/serialize/inline_container.cc)."""
    info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 0
    header = 30 + len(arcname.encode("utf-8"))
    pad = (-(fh_offset + header + 4)) % 64
    info.extra = b"FB" + struct.pack("<H", pad) + b"Z" * pad
    return info


def write_checkpoint(path, state, prefix=""):
    data_pkl, storages = checkpoint_pickle(state, prefix)
    records = [("archive/data.pkl", data_pkl), ("archive/byteorder", b"little")]
    records += [("archive/data/" + key, a.astype("<f4").tobytes()) for key, a in storages]
    records += [("archive/version", b"3\n")]
    tmp = path + ".part"
    with open(tmp, "wb") as f, zipfile.ZipFile(f, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for arcname, payload in records:
            zf.writestr(_aligned_info(zf, arcname, f.tell()), payload)
    os.replace(tmp, path)


def file_sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ----------------------------------------------------------------------------- main
def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True, help="output .pth")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--small", action="store_true",
                    help="blocks 1/1/2 + res5 1 (same widths, classes and names pattern): fast tests only")
    ap.add_argument("--calibration", default=os.path.join(HERE, "calibration_seed0.json.gz"),
                    help="head-layer scales and biases (calibrate.py); ignored with --small")
    ap.add_argument("--uncalibrated", action="store_true", help="heads as drawn (calibrate.py's input)")
    ap.add_argument("--module-prefix", action="store_true",
                    help="write names with 'module.' (a DistributedDataParallel save; the original strips it)")
    args = ap.parse_args(argv)
    params = param_shapes(SMALL_BLOCKS if args.small else FULL_BLOCKS)
    calibration = None
    if not args.small and not args.uncalibrated:
        calibration = load_calibration(args.calibration)
        if calibration["seed"] != args.seed:
            sys.exit(f"seed {args.seed} does not match the calibration file (seed {calibration['seed']}): "
                     "its scales were measured on the draws of that seed")
    state = build_state(params, args.seed, calibration)
    write_checkpoint(args.out, state, "module." if args.module_prefix else "")
    values = sum(v.size for k, v in state.items() if not k.startswith(SHARED_TO))
    print(f"wrote {args.out}: {len(state)} entries, {values} values, sha256 {file_sha256(args.out)}")


if __name__ == "__main__":
    sys.exit(main())
