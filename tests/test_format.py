"""The record codec: exact round trips, location vectors, and untrusted bytes."""

import struct

import numpy as np
import pytest
from helpers import random_record
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from regionbert.data import CorruptRecordError, ShardError, ShardReader, ShardWriter, location_vectors
from regionbert.data.format import HEADER_SIZE, MAX_KEY_BYTES, decode_record, encode_key, encode_record
from regionbert.data.synth import COCO_CLASSES


@pytest.mark.parametrize("dtype", ["float16", "float32"])
@pytest.mark.parametrize("n", [0, 1, 37])
def test_round_trip_every_field(tmp_path, dtype, n):
    rng = np.random.default_rng(n)
    attrs = [f"attr{i}" for i in range(5)]
    ids = ["plain", "café/ünïcode 图像", "a" * MAX_KEY_BYTES]
    inputs = {i: random_record(rng, n=n, attrs=5) | {"extra": {"source": i, "row": k}} for k, i in enumerate(ids)}
    with ShardWriter(tmp_path / "s", feature_dim=32, class_names=COCO_CLASSES, feature_dtype=dtype,
                     attribute_names=attrs, extractor={"detector": "test"}) as w:
        for i, rec in inputs.items():
            assert w.add(i, **rec)
    reader = ShardReader(tmp_path / "s")
    assert len(reader) == len(ids) and list(reader.keys()) == ids
    for k, i in enumerate(ids):
        rec, src = reader.get(i), inputs[i]
        assert rec.id == i and (rec.width, rec.height) == (src["width"], src["height"])
        assert rec.boxes.dtype == np.float32 and np.array_equal(rec.boxes, src["boxes"].astype(np.float32))
        assert rec.features.dtype == np.dtype(dtype)
        assert np.array_equal(rec.features, src["features"].astype(dtype))
        assert rec.class_probs.dtype == np.float16 and rec.class_probs.shape == (n, len(COCO_CLASSES))
        assert np.array_equal(rec.class_probs, src["class_probs"].astype(np.float16))
        assert np.array_equal(rec.attr_probs, src["attr_probs"].astype(np.float16))
        assert rec.extra == {"source": i, "row": k}
        assert reader[k].id == i
        for a in (rec.boxes, rec.features, rec.class_probs, rec.loc5, rec.loc7):
            assert not a.flags.writeable  # zero-copy views of the map


def test_location_vectors_follow_the_definitions():
    boxes = np.array([[10, 20, 110, 70], [0, 0, 640, 480]], np.float32)
    loc5, loc7 = location_vectors(boxes, 640, 480)
    w, h = 100 / 640, 50 / 480
    assert np.allclose(loc5[0], [10 / 640, 20 / 480, 110 / 640, 70 / 480, w * h])
    assert np.allclose(loc7[0], [10 / 640, 20 / 480, 110 / 640, 70 / 480, w, h, w * h])
    assert np.array_equal(loc7[1], np.array([0, 0, 1, 1, 1, 1, 1], np.float32))
    assert loc5.dtype == loc7.dtype == np.float32


def test_stored_locations_match_boxes_and_arrays_are_aligned(small_shard):
    for rec in ShardReader(small_shard):
        loc5, loc7 = location_vectors(rec.boxes, rec.width, rec.height)
        assert np.array_equal(rec.loc5, loc5) and np.array_equal(rec.loc7, loc7)
        for a in (rec.boxes, rec.features, rec.class_probs):
            if rec.num_boxes >= 10:  # values past half a page live in 16-byte aligned overflow pages
                assert a.ctypes.data % 16 == 0


def test_copy_gives_writable_arrays(small_shard):
    rec = ShardReader(small_shard, copy=True)[3]
    rec.features[...] = 0
    assert ShardReader(small_shard)[3].features.any()


def test_key_limits():
    assert encode_key("x" * MAX_KEY_BYTES)
    with pytest.raises(ShardError, match="511"):
        encode_key("é" * 300)  # 600 bytes in UTF-8
    with pytest.raises(ShardError):
        encode_key("")


def _valid_value(n=5, key=b"k"):
    rec = random_record(np.random.default_rng(0), n=n, dim=8, num_classes=4)
    return encode_record(key, rec["width"], rec["height"], rec["boxes"].astype(np.float32),
                         rec["features"].astype(np.float16), rec["class_probs"].astype(np.float16),
                         extra={"a": 1})


def test_decoder_names_the_problem():
    v = _valid_value()
    with pytest.raises(CorruptRecordError, match="checksum"):
        decode_record(b"other-key", v)  # right bytes under the wrong key
    with pytest.raises(CorruptRecordError, match="truncated"):
        decode_record(b"k", v[:-1])
    with pytest.raises(CorruptRecordError, match="magic"):
        decode_record(b"k", b"XXXX" + v[4:])
    with pytest.raises(CorruptRecordError, match="version"):
        decode_record(b"k", v[:4] + struct.pack("<H", 9) + v[6:])
    with pytest.raises(CorruptRecordError, match="shorter"):
        decode_record(b"k", b"RBRC")


def _decode_or_clean_error(value, verify):
    try:
        rec = decode_record(b"k", value, verify=verify)
        rec.extra  # noqa: B018 - parsed on first access: may only raise CorruptRecordError too
    except CorruptRecordError:
        return None
    with np.errstate(all="ignore"):
        for a in (rec.boxes, rec.features, rec.class_probs, rec.loc5, rec.loc7):
            if a is not None:
                a.sum()  # the views must be readable memory
    return rec


FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FUZZ
@given(st.binary(max_size=4096), st.booleans())
def test_fuzz_arbitrary_bytes(data, verify):
    _decode_or_clean_error(data, verify)
    _decode_or_clean_error(b"RBRC\x01\x00\x30\x00" + data, verify)


@FUZZ
@given(st.data())
def test_fuzz_mutated_records(data):
    """Bit flips, overwrites and truncations of a real record, decoded with and without checksums."""
    original = _valid_value(n=data.draw(st.integers(0, 6)))
    v = bytearray(original)
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(v) - 1))
        if data.draw(st.booleans()):
            v[pos] ^= 1 << data.draw(st.integers(0, 7))
        else:
            v[pos:pos + 4] = data.draw(st.binary(min_size=4, max_size=4))
    if data.draw(st.booleans()):
        v = v[:data.draw(st.integers(0, len(v)))]
    if bytes(v) != original:
        assert _decode_or_clean_error(bytes(v), verify=True) is None  # any change breaks the checksum
    _decode_or_clean_error(bytes(v), verify=False)


@FUZZ
@given(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1), st.integers(0, 255))
def test_fuzz_header_sizes_never_allocate_or_overrun(n, d, c, code):
    v = bytearray(_valid_value())
    struct.pack_into("<III", v, 16, n, d, c)
    v[32] = code
    _decode_or_clean_error(bytes(v), verify=False)
    assert len(v) > HEADER_SIZE
