"""py-bottom-up-attention's weights files (`faster_rcnn_from_caffe[_attr].pkl`), read without running them.

The published checkpoints are Python pickles: {"model": {detectron2 name: numpy array}, ...}. A pickle can
name any global and call it, so this reader admits only what numpy needs to rebuild plain arrays, through
wrappers that check every argument and count every array's bytes before numpy allocates them
(_ArrayUnpickler). Then every entry's name, shape and dtype is checked against the network's table before
anything is converted, and a NaN or infinite weight is refused naming its tensor.

This module knows the file format and the checkpoint's names (reference_to_local / local_to_reference),
not the network: extract/butd.py builds the network, derives its table of names and shapes from it, and
passes that table in (butd.read_weights). So this file imports nothing from extract/.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pickle
import warnings
from collections.abc import Callable

import numpy as np

NAME = "butd_r101_vg"  # the detector these files are for: messages name it (extract/butd.py takes it from here)
ATTR_HEAD_LAST = "roi_heads.box_predictor.attr_score.weight"  # present only in the checkpoint with attributes

Shapes = dict[str, tuple[int, ...]]

class WeightsError(ValueError):
    """A weights file that is not a bottom-up-attention checkpoint, or that tries to run code."""


# What a weights pickle may hold besides its floats (the "__author__" string, a few scalars): the budget
# below is the architecture's values at float64 (the widest dtype a checkpoint may use) plus this.
_METADATA_SLACK = 16 << 20
_FLOAT_ITEMSIZES = (2, 4, 8)  # float16, float32, float64: converted to float32, and said so


class _Admitted:
    """A callable the unpickler hands to the pickle that the pickle cannot change. A plain function would
    do: but pickle's BUILD opcode on an admitted global sets attributes on it (`__defaults__`, its
    `__dict__`), and that change would outlive a refused load and reach every later load in the process.
    No __dict__, no setattr, and __setstate__ refuses, so BUILD on this fails before touching anything."""

    __slots__ = ("_fn", "_name")

    def __init__(self, fn, name: str):
        object.__setattr__(self, "_fn", fn)
        object.__setattr__(self, "_name", name)

    def __call__(self, *args):
        return self._fn(*args)

    def __setattr__(self, key, value):
        raise pickle.UnpicklingError(f"{self._name} cannot be changed by a weights pickle")

    def __delattr__(self, key):
        raise pickle.UnpicklingError(f"{self._name} cannot be changed by a weights pickle")

    def __setstate__(self, state):
        raise pickle.UnpicklingError(f"{self._name} cannot be changed by a weights pickle")


def _numpy_modules():
    try:
        from numpy._core import multiarray as ma
        from numpy._core import numeric
    except ImportError:  # numpy 1.x
        from numpy.core import multiarray as ma
        from numpy.core import numeric
    return ma, numeric


def _latin1_encode(text, encoding="latin1"):
    """_codecs.encode as Python 3 pickles of bytes use it (protocol 2): latin-1 str -> bytes only."""
    if not isinstance(text, str) or encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"_codecs.encode is admitted only for latin-1 text, got {encoding!r}")
    return text.encode("latin1")


def _plain_dtype(d, what: str) -> np.dtype:
    """A dtype a weights pickle may use: bool, integer or float numbers, no fields, no sub-arrays, no
    objects (checked where the dtype is used, not only where it is made: BUILD can change a dtype copy)."""
    if not isinstance(d, np.dtype) or d.kind not in "biuf" or d.fields is not None or d.subdtype is not None \
            or d.itemsize > 8:
        raise pickle.UnpicklingError(f"{what}: dtype {d!r} is not a plain number type")
    return d


def _shape(shape, what: str) -> tuple[int, ...]:
    if not isinstance(shape, tuple) or len(shape) > 8 or not all(type(n) is int and n >= 0 for n in shape):
        raise pickle.UnpicklingError(f"{what}: shape {shape!r} is not a tuple of sizes")
    return shape


class _Budget:
    """Bytes the arrays of one load may take, counted before numpy allocates them."""

    def __init__(self, limit: int):
        self.limit, self.used = limit, 0

    def take(self, shape: tuple[int, ...], dtype: np.dtype, what: str) -> int:
        n = math.prod(shape) * dtype.itemsize  # Python ints: no overflow whatever the shape says
        self.used += n
        if self.used > self.limit:
            raise WeightsError(f"{what}: its arrays would take more than {self.limit:,} bytes, more than the "
                               f"{NAME} architecture holds at float64 (refused before allocating)")
        return n


class _PendingArray(np.ndarray):
    """What `_reconstruct` makes: an empty array whose __setstate__ (pickle's BUILD) checks dtype, shape and
    the load's byte budget before numpy copies or allocates anything. Read out as a plain ndarray."""

    _budget: _Budget
    _what: str

    def __setstate__(self, state):
        if not isinstance(state, tuple) or len(state) not in (4, 5):
            raise pickle.UnpicklingError(f"{self._what}: unexpected array state")
        shape, dtype, _fortran, raw = state[-4:]
        shape, dtype = _shape(shape, self._what), _plain_dtype(dtype, self._what)
        n = self._budget.take(shape, dtype, self._what)
        if not isinstance(raw, (bytes, str)) or len(raw) != n:  # str: Python 2's str, read as latin-1
            raise pickle.UnpicklingError(f"{self._what}: array data of {len(raw) if hasattr(raw, '__len__') else '?'}"
                                         f" bytes for shape {shape} of {dtype}")
        super().__setstate__(state)


class _ArrayUnpickler(pickle.Unpickler):
    """Rebuilds dicts, lists, strings and numpy arrays; any other global is refused before it is imported.

    numpy's own globals are not handed out: the pickle gets _Admitted wrappers that check their arguments.
    `numpy.ndarray` is only a token for `_reconstruct` (calling the class itself would let a 117-byte pickle
    make zero-stride views of any size), `numpy.dtype` always returns a fresh copy of a plain number type
    (never the shared built-in one, which BUILD would otherwise reach), and every array's bytes are counted
    against a budget before they are allocated."""

    def __init__(self, f, source: str, budget: int):
        super().__init__(f, encoding="latin1")  # what the fork passes (pickles written by Python 2 too)
        self.source, self.budget = source, _Budget(budget)
        self.allowed = self._admitted()

    def _admitted(self) -> dict[tuple[str, str], _Admitted]:
        ma, numeric = _numpy_modules()
        src, budget = self.source, self.budget

        def no_direct_array(*args):
            raise WeightsError(f"{src}: numpy.ndarray called directly (a weights pickle rebuilds arrays with "
                               "_reconstruct; a direct call can make views of any size from a few bytes)")

        ndarray_token = _Admitted(no_direct_array, "numpy.ndarray")

        def reconstruct(subtype, shape, typecode):
            # numpy pickles every array as _reconstruct(ndarray, (0,), b'b') + BUILD(state)
            if subtype is not ndarray_token or shape != (0,) or typecode not in (b"b", "b"):
                raise WeightsError(f"{src}: _reconstruct{(shape, typecode)!r} is not how numpy pickles an array")
            a = np.ndarray.__new__(_PendingArray, (0,), np.int8)
            a._budget, a._what = budget, src
            return a

        def dtype(obj, align=False, copy=True):
            if not isinstance(obj, str) or len(obj) > 8:
                raise WeightsError(f"{src}: numpy.dtype({obj!r}) is not a plain number type")
            try:
                d = np.dtype(obj, bool(align), True)  # always a copy: BUILD may change it
            except TypeError as e:
                raise WeightsError(f"{src}: numpy.dtype({obj!r}): {e}") from None
            return _plain_dtype(d, src)

        def scalar(d, data=None):
            d = _plain_dtype(d, src)
            if not isinstance(data, (bytes, str)) or len(data) != d.itemsize:
                raise WeightsError(f"{src}: numpy scalar of {d} with {len(data or '')} bytes")
            budget.take((1,), d, src)
            return ma.scalar(d, data)

        def frombuffer(buf, d, shape, order, *rest):  # protocol 5 (out-of-band buffers are refused below)
            d, shape = _plain_dtype(d, src), _shape(shape, src)
            budget.take(shape, d, src)
            return numeric._frombuffer(buf, d, shape, order, *rest)

        text_budget = _Budget(budget.limit)  # a memoised string encoded again and again is a new copy each time

        def encode(text, encoding="latin1"):
            text_budget.take((len(text) if isinstance(text, str) else 0,), np.dtype(np.uint8), src)
            return _latin1_encode(text, encoding)

        allowed = {("numpy", "ndarray"): ndarray_token, ("numpy", "dtype"): _Admitted(dtype, "numpy.dtype"),
                   ("_codecs", "encode"): _Admitted(encode, "_codecs.encode")}
        for mod in ("numpy.core.multiarray", "numpy._core.multiarray"):
            allowed[(mod, "_reconstruct")] = _Admitted(reconstruct, f"{mod}._reconstruct")
            allowed[(mod, "scalar")] = _Admitted(scalar, f"{mod}.scalar")
        if hasattr(numeric, "_frombuffer"):
            for mod in ("numpy.core.numeric", "numpy._core.numeric"):
                allowed[(mod, "_frombuffer")] = _Admitted(frombuffer, f"{mod}._frombuffer")
        return allowed

    def find_class(self, module, name):
        obj = self.allowed.get((module, name))
        if obj is None:
            raise WeightsError(f"{self.source}: refusing to load global {module}.{name}: a weights pickle needs "
                               "only numpy's array reconstruction (this file may try to run code)")
        return obj

    def persistent_load(self, pid):
        raise WeightsError(f"{self.source}: refusing persistent id {pid!r} (not a plain pickle of numpy arrays)")



def name_mismatch(missing: list[str], unexpected: list[str]) -> str:
    """'missing 3 (e.g. a, b, c); unexpected 1 (e.g. d)': the names a checkpoint lacks or has in excess, in
    its own (detectron2) naming. Shared by the file check here and BUTDDetector.load_reference_state."""
    what = []
    if missing:
        what.append(f"missing {len(missing)} (e.g. {', '.join(missing[:4])})")
    if unexpected:
        what.append(f"unexpected {len(unexpected)} (e.g. {', '.join(unexpected[:4])})")
    return "; ".join(what)


def _check_entries(model: dict, path: str, shapes: dict[str, tuple[int, ...]]) -> None:
    """Names, shapes and dtypes of the checkpoint's entries, before any of them is converted or copied."""
    unknown, wrong = [], []
    for k, v in model.items():
        if not isinstance(k, str) or k not in shapes:
            unknown.append(repr(k) if not isinstance(k, str) else k)
            continue
        if not isinstance(v, np.ndarray) or v.dtype.kind != "f" or v.dtype.itemsize not in _FLOAT_ITEMSIZES:
            raise WeightsError(f"{path}: entry {k!r} is not a float16/32/64 numpy array "
                               f"({type(v).__name__} {getattr(v, 'dtype', '')})")
        if tuple(v.shape) != shapes[k]:
            wrong.append(f"{k} has shape {tuple(v.shape)}, expected {shapes[k]}")
    missing = [k for k in shapes if k not in model]
    if unknown or missing:
        raise WeightsError(f"{path}: not a bottom-up-attention R101-C4 checkpoint: {name_mismatch(missing, unknown)}")
    if wrong:
        raise WeightsError(f"{path}: {wrong[0]}" + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""))


def read_pickle(path: str, budget_shapes: Shapes,
                choose_shapes: Callable[[dict], Shapes]) -> tuple[dict[str, np.ndarray], str]:
    """A detectron2-format .pkl -> (float32 arrays by name, sha256 of the file).

    budget_shapes: the largest table the file may match; the file and its arrays may take no more than
    its values at float64 (+ a little metadata), checked before reading and before each allocation.
    choose_shapes(entries): the table to check the unpickled entries against (e.g. with or without the
    attribute head, decided by which names the file has)."""
    budget = sum(math.prod(s) for s in budget_shapes.values()) * 8 + _METADATA_SLACK
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > budget:  # checked before reading: the file itself is the first allocation
                raise WeightsError(f"{path}: {size:,} bytes, more than a {NAME} checkpoint can hold even at "
                                   f"float64 ({budget:,})")
            raw = f.read(size + 1)  # (read(n) allocates n bytes up front: the size, not the budget)
    except OSError as e:
        raise WeightsError(f"{path}: cannot read weights: {e}") from None
    if len(raw) != size:
        raise WeightsError(f"{path}: changed while it was read ({size:,} bytes, then {len(raw):,})")
    digest = hashlib.sha256(raw).hexdigest()
    try:
        obj = _ArrayUnpickler(io.BytesIO(raw), path, budget).load()
    except WeightsError:
        raise
    except Exception as e:  # noqa: BLE001 - a truncated or foreign file raises many kinds
        raise WeightsError(f"{path}: not a readable weights pickle ({type(e).__name__}: {e})") from None
    del raw
    model = obj.get("model") if isinstance(obj, dict) else None
    if not isinstance(model, dict):
        raise WeightsError(f"{path}: expected a pickle of {{'model': {{name: array}}, ...}} "
                           "(py-bottom-up-attention's faster_rcnn_from_caffe[_attr].pkl)")
    _check_entries(model, path, choose_shapes(model))
    return _to_float32(model, path), digest


def _to_float32(model: dict[str, np.ndarray], path: str) -> dict[str, np.ndarray]:
    """Contiguous float32 copies, each checked finite; says what it converted (how many, from which dtype)."""
    out, converted = {}, {}
    for k, v in model.items():
        with np.errstate(over="ignore"):  # float64 beyond float32's range becomes inf: refused just below
            a = np.ascontiguousarray(np.asarray(v), dtype=np.float32)
        if v.dtype != np.float32:
            converted[v.dtype.str] = converted.get(v.dtype.str, 0) + 1
        bad = a.size - int(np.count_nonzero(np.isfinite(a)))
        if bad:
            how = "" if v.dtype == np.float32 else f" (as float32, converted from {v.dtype.str})"
            raise WeightsError(f"{path}: tensor {k} has {bad:,} non-finite values (NaN or infinite){how}: "
                               "a detector with them finds no boxes")
        out[k] = a
    if converted:
        froms = ", ".join(f"{n} from {d}" for d, n in sorted(converted.items()))
        warnings.warn(f"{path}: converted {sum(converted.values())} of {len(model)} tensors to float32 ({froms})",
                      stacklevel=4)  # the caller of butd.read_weights
    return out


# ----------------------------------------------------------------------------- checkpoint names
def reference_to_local(key: str) -> str | None:
    """detectron2 checkpoint name -> extract/butd.py's BUTDDetector name (None if it is not one of ours)."""
    p = key.split(".")
    if key == "proposal_generator.anchor_generator.cell_anchors.0":
        return "cell_anchors"
    if key.startswith("backbone.stem.conv1."):
        return "stem.1." + p[-1] if p[-2] == "norm" else "stem.0." + p[-1]
    if key.startswith("backbone.res") or key.startswith("roi_heads.res5."):
        # backbone.res4.3.conv2.norm.weight -> res4.3.bn2.weight ; ...shortcut.norm.x -> ...downsample.1.x
        pre, layer, rest = f"{p[1]}.{p[2]}.", p[3], p[4:]
        norm = rest[0] == "norm"
        if layer.startswith("conv"):
            return pre + (f"bn{layer[4:]}.{rest[1]}" if norm else f"{layer}.{rest[0]}")
        if layer == "shortcut":
            return pre + (f"downsample.1.{rest[1]}" if norm else f"downsample.0.{rest[0]}")
        return None
    for ref, local in (("proposal_generator.rpn_head.conv.", "rpn_conv."),
                       ("proposal_generator.rpn_head.objectness_logits.", "rpn_logits."),
                       ("proposal_generator.rpn_head.anchor_deltas.", "rpn_deltas."),
                       ("roi_heads.box_predictor.", "")):
        if key.startswith(ref):
            return local + key[len(ref):]
    return None


def local_to_reference(name: str) -> str:
    """Inverse of reference_to_local, for messages."""
    p = name.split(".")
    if name == "cell_anchors":
        return "proposal_generator.anchor_generator.cell_anchors.0"
    if p[0] == "stem":
        return "backbone.stem.conv1." + ("norm." if p[1] == "1" else "") + p[2]
    if p[0] in ("res2", "res3", "res4", "res5"):
        pre = ("roi_heads." if p[0] == "res5" else "backbone.") + f"{p[0]}.{p[1]}."
        if p[2].startswith("bn"):
            return pre + f"conv{p[2][2:]}.norm.{p[3]}"
        if p[2] == "downsample":
            return pre + "shortcut." + ("norm." if p[3] == "1" else "") + p[4]
        return pre + f"{p[2]}.{p[3]}"
    for local, ref in (("rpn_conv", "proposal_generator.rpn_head.conv"),
                       ("rpn_logits", "proposal_generator.rpn_head.objectness_logits"),
                       ("rpn_deltas", "proposal_generator.rpn_head.anchor_deltas")):
        if p[0] == local:
            return ref + "." + p[1]
    return "roi_heads.box_predictor." + name


def has_attribute_head(arrays: dict) -> bool:
    return ATTR_HEAD_LAST in arrays
