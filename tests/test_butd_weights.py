"""butd_r101_vg's weights file: a pickle read by a restricted unpickler that rebuilds numpy arrays and
nothing else. A pickle that would run code is refused before anything runs."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from regionbert.extract import butd


class _RunsCode:
    """Unpickling this calls os.system: what a hostile "checkpoint" does."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def _dump(path, obj, protocol=3):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=protocol)
    return str(path)


def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = _dump(tmp_path / "evil.pkl", {"model": {"backbone.stem.conv1.weight": _RunsCode(marker)}})
    pickle.loads(pickle.dumps(_RunsCode(tmp_path / "control")))  # the payload is real: plain pickle runs it
    assert (tmp_path / "control").exists()
    with pytest.raises(butd.WeightsError, match=r"evil\.pkl: refusing to load global (posix|nt|os)\.system"):
        butd.read_weights(path)
    with pytest.raises(butd.WeightsError, match="refusing"):
        butd.load_detector(path)
    assert not marker.exists()


@pytest.mark.parametrize("payload", [
    {"model": {"x": np.array([1, "a"], dtype=object)}},  # object arrays: no code, but not weights either
    {"model": {"x": [1.0, 2.0]}},
    {"model": {"x": np.arange(3)}},  # integers
    {"weights": {}},
    [np.zeros(3, np.float32)],
])
def test_anything_but_a_dict_of_float_arrays_is_refused(tmp_path, payload):
    path = _dump(tmp_path / "odd.pkl", payload)
    with pytest.raises(butd.WeightsError, match=r"odd\.pkl"):
        butd.read_weights(path)


def test_other_globals_and_broken_files_are_refused(tmp_path):
    import collections

    path = _dump(tmp_path / "od.pkl", {"model": collections.OrderedDict(a=np.zeros(2, np.float32))})
    with pytest.raises(butd.WeightsError, match=r"od\.pkl: refusing to load global collections\.OrderedDict"):
        butd.read_weights(path)
    (tmp_path / "cut.pkl").write_bytes(open(_dump(tmp_path / "full.pkl", {"model": {}}), "rb").read()[:-3])
    with pytest.raises(butd.WeightsError, match=r"cut\.pkl: not a readable weights pickle"):
        butd.read_weights(str(tmp_path / "cut.pkl"))
    with pytest.raises(butd.WeightsError, match=r"absent\.pkl: cannot read"):
        butd.read_weights(str(tmp_path / "absent.pkl"))


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_every_pickle_protocol_of_numpy_arrays_loads(tmp_path, protocol):
    """Protocol 2 from Python 3 spells bytes with _codecs.encode; protocol 5 uses numpy's _frombuffer."""
    arrays = {"a": np.arange(12, dtype=np.float32).reshape(3, 4), "b": np.float64([0.5, -1.5])}
    path = _dump(tmp_path / "ok.pkl", {"model": arrays, "__author__": "test"}, protocol)
    with pytest.warns(UserWarning, match=r"converted 1 of 2 tensors to float32 \(1 from <f8\)"):
        got, digest = butd.read_weights(path, shapes={"a": (3, 4), "b": (2,)})  # our own table: not 65M values
    assert set(got) == {"a", "b"} and all(v.dtype == np.float32 for v in got.values())
    assert (got["a"] == arrays["a"]).all() and (got["b"] == arrays["b"]).all()
    import hashlib

    assert digest == hashlib.sha256(open(path, "rb").read()).hexdigest()


def test_checkpoint_names_map_one_to_one():
    """Every parameter and buffer of the network has one detectron2 name, and back (SPEC.md §10's table)."""
    model = butd.BUTDDetector.empty(attributes=True)
    names = list(model.state_dict())
    refs = [butd.local_to_reference(n) for n in names]
    assert len(set(refs)) == len(names) == 536  # param_shapes.json has 536 entries
    assert all(butd.reference_to_local(r) == n for r, n in zip(refs, names, strict=True))
    assert "backbone.res4.22.conv3.norm.running_var" in refs and "roi_heads.res5.0.shortcut.norm.bias" in refs
    assert "proposal_generator.rpn_head.anchor_deltas.weight" in refs
    assert "roi_heads.box_predictor.cls_embedding.weight" in refs
    no_attr = butd.BUTDDetector.empty(attributes=False).state_dict()
    assert len(no_attr) == 536 - 5


def test_a_partial_checkpoint_names_what_is_missing(tmp_path):
    path = _dump(tmp_path / "part.pkl", {"model": {"backbone.stem.conv1.weight": np.zeros((64, 3, 7, 7), np.float32),
                                                   "roi_heads.foo": np.zeros(2, np.float32)}})
    with pytest.raises(butd.WeightsError, match=r"part\.pkl: .*missing 530 .*unexpected 1 \(e\.g\. roi_heads\.foo"):
        butd.load_detector(path)
    arrays = {butd.local_to_reference(k): v.numpy() for k, v in butd.BUTDDetector.empty(False).state_dict().items()}
    arrays["backbone.stem.conv1.weight"] = np.zeros((64, 3, 5, 5), np.float32)
    model = butd.BUTDDetector.empty(False)
    with pytest.raises(butd.WeightsError, match=r"backbone\.stem\.conv1\.weight has shape \(64, 3, 5, 5\)"):
        model.load_reference_state(arrays, "w.pkl")


def test_cell_anchors_are_detectron2s():
    """SPEC.md §4: size-major, ratio-minor, not rounded (torchvision's AnchorGenerator rounds them)."""
    a = butd.cell_anchors().numpy()
    assert a.shape == (12, 4) and a.dtype == np.float32
    w = a[:, 2] - a[:, 0]
    h = a[:, 3] - a[:, 1]
    np.testing.assert_allclose(w * h, np.repeat([64.0**2, 128.0**2, 256.0**2, 512.0**2], 3), rtol=1e-6)
    np.testing.assert_allclose(h / w, np.tile([0.5, 1.0, 2.0], 4), rtol=1e-6)
    assert a[0, 2] == np.float32(np.sqrt(64 * 64 / 0.5) / 2)  # 45.254833..., not 45
