"""A butd_r101_vg weights file from a hostile stranger (issue 22, item 7): the restricted unpickler and
read_weights must refuse before allocating, refuse NaN/inf weights naming the tensor, say what dtypes they
converted, and nothing a refused pickle does may outlive the refusal (the admitted helpers stay as they
were, and a good file loads afterwards as before)."""

from __future__ import annotations

import os
import pickle
import struct
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from regionbert.extract import butd, butd_weights

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"a": (3, 4), "b": (2,)}  # a table of our own for read_weights: the real one has 65M values


def _reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


class _ZeroStride:
    """numpy.ndarray((2**28,), 'f4', buffer=4 bytes, strides=(0,)): a 1 GiB view of 4 bytes."""

    def __reduce__(self):
        return np.ndarray, ((1 << 28,), "f4", b"\0" * 4, 0, (0,))


class _Array:
    """An array pickled the way numpy does it (_reconstruct + BUILD), with a state of our choosing."""

    def __init__(self, shape, dtype, raw):
        self.state = (1, shape, np.dtype(dtype), False, raw)

    def __reduce__(self):
        return _reconstruct(), (np.ndarray, (0,), b"b"), self.state


def _dump(path, obj, protocol=3) -> str:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return str(path)


def _good(tmp_path, dtype=np.float32, name="good.pkl", **values) -> str:
    arrays = {"a": np.arange(12, dtype=dtype).reshape(3, 4), "b": np.array([0.5, -1.5], dtype=dtype)}
    arrays.update(values)
    return _dump(tmp_path / name, {"model": arrays, "__author__": "test"})


# ----------------------------------------------------------------------------- allocation before checks
def test_zero_stride_views_are_refused_before_anything_is_allocated(tmp_path):
    """The 117-byte attack: before, each key cost 1 GiB in np.ascontiguousarray (3 keys: 3 GiB of peak RSS,
    64 keys: an uncaught _ArrayMemoryError)."""
    view = _ZeroStride()
    path = _dump(tmp_path / "views.pkl", {"model": {f"backbone.res4.{i}.conv1.weight": view for i in range(3)}}, 2)
    assert os.path.getsize(path) < 300
    tracemalloc.start()
    try:
        with pytest.raises(butd.WeightsError, match=r"views\.pkl: numpy\.ndarray called directly"):
            butd.read_weights(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20, peak  # numpy reports its allocations to tracemalloc


def test_a_memoised_buffer_rebuilt_many_times_is_bounded(tmp_path):
    """One 1 MiB buffer, 64 arrays built from it (big-endian: numpy copies each): refused once the arrays
    pass the budget (the table's size at float64 + 16 MiB), not after 64 MiB."""
    raw = b"\0" * (1 << 20)
    arrays = {f"k{i}": _Array((1 << 18,), ">f4", raw) for i in range(64)}
    path = _dump(tmp_path / "memo.pkl", {"model": arrays})
    assert os.path.getsize(path) < (1 << 20) + 10_000  # the buffer is in the file once
    tracemalloc.start()
    try:
        with pytest.raises(butd.WeightsError, match=r"memo\.pkl: its arrays would take more than"):
            butd.read_weights(path, shapes=SMALL)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 40 << 20, peak


def test_repeated_latin1_encoding_of_one_string_is_bounded(tmp_path):
    """Protocol 2 spells bytes as _codecs.encode(str, 'latin1'): 40 calls on one memoised 1 MiB string."""
    text = "\0" * (1 << 20)
    ops = [b"\x80\x02c_codecs\nencode\nq\x00X" + struct.pack("<I", len(text)) + text.encode() + b"q\x01]q\x02("]
    ops += [b"h\x00h\x01X\x06\x00\x00\x00latin1\x86R"] * 40
    ops += [b"e."]
    path = tmp_path / "enc.pkl"
    path.write_bytes(b"".join(ops))
    assert len(pickle.loads(path.read_bytes())) == 40  # the file is what it says: 40 bytes objects
    with pytest.raises(butd.WeightsError, match=r"enc\.pkl: its arrays would take more than"):
        butd.read_weights(str(path), shapes=SMALL)


@pytest.mark.parametrize("state, what", [
    ((1, (1 << 40,), np.dtype("f4"), False, b"\0" * 16), "would take more than"),  # says 4 TiB, holds 16 bytes
    ((1, (4,), np.dtype("f4"), False, b"\0" * 8), "array data of 8 bytes"),
    ((1, (2,), np.dtype("O"), False, [1, 2]), "not a plain number type"),
    ((1, (2,), np.dtype([("x", "f4")]), False, b"\0" * 8), "not a plain number type"),
    ((1, (-1,), np.dtype("f4"), False, b""), "not a tuple of sizes"),
])
def test_array_states_are_checked_before_numpy_sees_them(tmp_path, state, what):
    arr = _Array((1,), "f4", b"")
    arr.state = state
    path = _dump(tmp_path / "state.pkl", {"model": {"a": arr}})
    with pytest.raises(butd.WeightsError, match=r"state\.pkl: .*" + what):
        butd.read_weights(path, shapes=SMALL)


def test_names_shapes_and_dtypes_are_checked_before_conversion(tmp_path):
    with pytest.raises(butd.WeightsError, match=r"n\.pkl: not a bottom-up-attention .*unexpected 1 \(e\.g\. zz\)"):
        butd.read_weights(_good(tmp_path, name="n.pkl", zz=np.zeros(2, np.float32)), shapes=SMALL)
    with pytest.raises(butd.WeightsError, match=r"s\.pkl: b has shape \(3,\), expected \(2,\)"):
        butd.read_weights(_good(tmp_path, name="s.pkl", b=np.zeros(3, np.float32)), shapes=SMALL)
    with pytest.raises(butd.WeightsError, match=r"d\.pkl: entry 'b' is not a float16/32/64"):
        butd.read_weights(_good(tmp_path, name="d.pkl", b=np.zeros(2, np.int32)), shapes=SMALL)


def test_the_file_size_is_bounded_before_reading(tmp_path):
    path = tmp_path / "huge.pkl"
    with open(path, "wb") as f:
        f.truncate((16 << 20) + 4096)  # sparse: bigger than SMALL's budget
    with pytest.raises(butd.WeightsError, match=r"huge\.pkl: 16,781,312 bytes, more than"):
        butd.read_weights(str(path), shapes=SMALL)


# ----------------------------------------------------------------------------- values and dtypes
@pytest.mark.parametrize("bad, dtype, how", [
    (np.nan, np.float32, ""), (np.inf, np.float32, ""), (-np.inf, np.float16, "converted from <f2"),
    (1e300, np.float64, "converted from <f8"),  # finite in float64, infinite in float32
])
def test_non_finite_weights_are_refused_naming_the_tensor(tmp_path, bad, dtype, how):
    b = np.array([0.5, bad], dtype=dtype)
    with pytest.raises(butd.WeightsError, match=r"nan\.pkl: tensor b has 1 non-finite values .*" + how):
        butd.read_weights(_good(tmp_path, dtype=dtype, name="nan.pkl", b=b), shapes=SMALL)


@pytest.mark.parametrize("dtype, says", [(np.float16, r"2 of 2 tensors to float32 \(2 from <f2\)"),
                                         (np.float64, r"2 of 2 tensors to float32 \(2 from <f8\)")])
def test_conversions_are_said(tmp_path, dtype, says):
    path = _good(tmp_path, dtype=dtype)
    with pytest.warns(UserWarning, match=r"good\.pkl: converted " + says):
        got, _ = butd.read_weights(path, shapes=SMALL)
    assert all(v.dtype == np.float32 and v.flags.c_contiguous for v in got.values())
    assert got["a"].tolist() == np.arange(12, dtype=np.float32).reshape(3, 4).tolist()


def test_float32_checkpoints_convert_nothing_and_say_nothing(tmp_path, recwarn):
    got, _ = butd.read_weights(_good(tmp_path), shapes=SMALL)
    assert not [w for w in recwarn if "converted" in str(w.message)]
    assert got["b"].tolist() == [0.5, -1.5]


def test_a_full_checkpoint_with_one_nan_stops_the_extract_naming_it(tmp_path):
    """End to end, the real table (536 tensors, float16 to keep the file at 131 MB): before, a NaN weight
    extracted records with 0 boxes and exited 0. Now exit 2 naming the tensor, no shard written."""
    shapes = butd.reference_shapes(True)
    assert len(shapes) == 536 and sum(int(np.prod(s)) for s in shapes.values()) == 65_545_214  # param_shapes.json
    model = {k: np.zeros(s, np.float16) for k, s in shapes.items()}
    model["roi_heads.box_predictor.cls_score.weight"][7, 3] = np.nan
    weights = _dump(tmp_path / "nan_attr.pkl", {"model": model, "__author__": "hostile"}, 4)
    del model
    images = tmp_path / "images"
    images.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 30), (120, 80, 40)).save(images / "one.png")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "regionbert.extract.cli", str(images), "-o", str(out), "--detector",
                        "butd_r101_vg", "--weights", weights, "--workers", "0", "-q", "--device", "cpu"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "nan_attr.pkl: tensor roi_heads.box_predictor.cls_score.weight has 1 non-finite values" in r.stderr
    assert "converted from <f2" in r.stderr and "Traceback" not in r.stderr
    assert not out.exists() or not any(p.name.endswith(".mdb") for p in out.rglob("*"))


# ----------------------------------------------------------------------------- the admitted helpers
def _build_then_refuse(module: str, name: str, state) -> bytes:
    """A pickle that fetches an admitted global, runs BUILD on it with `state`, then asks for a refused
    global (so the load fails after the BUILD)."""
    return (b"\x80\x02c" + f"{module}\n{name}\n".encode() + pickle.dumps(state, 2)[2:-1] + b"b0"
            + b"ccollections\nOrderedDict\n.")


def _numeric():
    try:
        from numpy._core import numeric
    except ImportError:
        from numpy.core import numeric
    return numeric


@pytest.mark.parametrize("module, name, state", [
    ("_codecs", "encode", (None, {"__defaults__": ("utf-8",)})),  # setattr on the helper
    ("_codecs", "encode", {"pwned": 1}),  # its __dict__
    ("numpy._core.numeric", "_frombuffer", {"pwned": 1}),  # numpy's own function
    ("numpy._core.numeric", "_frombuffer", (None, {"__kwdefaults__": {"x": 1}})),
    ("numpy._core.multiarray", "_reconstruct", {"pwned": 1}),
    ("numpy", "dtype", (None, {"pwned": 1})),
    ("numpy", "ndarray", {"pwned": 1}),
])
def test_a_refused_pickle_cannot_change_the_admitted_helpers(tmp_path, module, name, state):
    numeric = _numeric()
    before = (butd_weights._latin1_encode.__defaults__, dict(butd_weights._latin1_encode.__dict__),
              numeric._frombuffer.__kwdefaults__, dict(numeric._frombuffer.__dict__))
    path = tmp_path / "build.pkl"
    path.write_bytes(_build_then_refuse(module, name, state))
    with pytest.raises(butd.WeightsError, match=r"build\.pkl"):
        butd.read_weights(str(path), shapes=SMALL)
    after = (butd_weights._latin1_encode.__defaults__, dict(butd_weights._latin1_encode.__dict__),
             numeric._frombuffer.__kwdefaults__, dict(numeric._frombuffer.__dict__))
    assert after == before
    assert not hasattr(np.ndarray, "pwned") and not hasattr(np.dtype, "pwned")
    for protocol in (2, 5):  # both helpers still work as before for a good file
        got, _ = butd.read_weights(_dump(tmp_path / f"ok{protocol}.pkl",
                                         {"model": {"a": np.ones((3, 4), np.float32),
                                                    "b": np.array([1.0, 2.0], np.float32)}}, protocol), shapes=SMALL)
        assert got["b"].tolist() == [1.0, 2.0]


def test_a_dtype_from_the_pickle_is_never_numpys_shared_one(tmp_path):
    """numpy.dtype('f4', False, False) is numpy's built-in float32 itself; BUILD on it would reach every
    float32 array of the process. The admitted dtype always returns a copy."""
    f32 = np.dtype("f4")
    p = (b"\x80\x02cnumpy\ndtype\nX\x02\x00\x00\x00f4\x89\x89\x87R"
         + pickle.dumps((3, ">", None, None, None, -1, -1, 0), 2)[2:-1] + b"b0ccollections\nOrderedDict\n.")
    (tmp_path / "dt.pkl").write_bytes(p)
    with pytest.raises(butd.WeightsError, match=r"dt\.pkl: refusing to load global collections\.OrderedDict"):
        butd.read_weights(str(tmp_path / "dt.pkl"), shapes=SMALL)
    assert np.dtype("f4") is f32 and f32.byteorder == "=" and np.ones(1, np.float32).tobytes() == b"\0\0\x80?"


def test_the_published_format_still_loads(tmp_path):
    """The kit's checkpoint format: protocol 2 from Python 2-era detectron2 pickles, a dict of float32
    arrays plus __author__; names of the real table (a few, via shapes=) and a numpy scalar beside."""
    arrays = {"backbone.stem.conv1.norm.bias": np.linspace(-1, 1, 64, dtype=np.float32),
              "proposal_generator.anchor_generator.cell_anchors.0": butd.cell_anchors().numpy()}
    shapes = {k: v.shape for k, v in arrays.items()}
    for protocol in (2, 3, 4, 5):
        path = _dump(tmp_path / f"p{protocol}.pkl", {"model": arrays, "__author__": "Caffe2", "step": np.float32(1)},
                     protocol)
        got, _ = butd.read_weights(path, shapes=shapes)
        assert all((got[k] == v).all() for k, v in arrays.items())
