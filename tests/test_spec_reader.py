"""An independent shard reader written only from docs/shard-format.md, checked against the real writer/reader.

The reader below (everything above the "Tests" banner) deliberately uses only lmdb, struct, json, xxhash and
numpy -- no regionbert code -- so that it proves the specification alone is enough to decode a shard.
Where the bytes disagree with, or are not pinned down by, the spec's wording, a comment marked "SPEC:" quotes
the sentence and says what the bytes actually are.
"""

import json
import re
import struct

import lmdb
import numpy as np
import pytest
import xxhash

# ---------------------------------------------------------------------------------------------------------------
# Independent reader (spec only)
# ---------------------------------------------------------------------------------------------------------------

HEADER = struct.Struct("<4sHHIIIIIIBBHIQ")  # spec section 3: magic .. reserved uint64, 48 bytes
assert HEADER.size == 48
FEATURE_DTYPES = {1: np.dtype("<f2"), 2: np.dtype("<f4")}
SETTINGS_KEYS = ("schema_version", "feature_dim", "feature_dtype", "class_names", "attribute_names", "extractor")


class SpecError(ValueError):
    pass


def up16(n):
    return (n + 15) & ~15


def load_shard(path):
    """Copy everything out of the LMDB environment and close it: (shard meta, state, [(key, value)] in order)."""
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=3, subdir=True)
    try:
        with env.begin() as txn:
            records, order, meta = (env.open_db(n, txn=txn, create=False) for n in (b"records", b"order", b"meta"))
            shard = json.loads(bytes(txn.get(b"shard", db=meta)).decode("utf-8"))
            state = json.loads(bytes(txn.get(b"state", db=meta)).decode("utf-8"))
            items = []
            for i, (pos, key) in enumerate(txn.cursor(db=order)):
                if len(pos) != 8 or struct.unpack(">Q", pos)[0] != i:
                    raise SpecError(f"order position {bytes(pos)!r} is not big-endian uint64 {i}")
                value = txn.get(bytes(key), db=records)
                if value is None:
                    raise SpecError(f"order entry {i} names a missing record {bytes(key)!r}")
                items.append((bytes(key), bytes(value)))
            n_records = txn.stat(records)["entries"]
    finally:
        env.close()
    if shard.get("format") != "regionbert-shard" or shard.get("schema_version") != 1:
        raise SpecError(f"unknown shard format/schema: {shard.get('format')!r} {shard.get('schema_version')!r}")
    if not (len(items) == n_records == state["count"]):
        raise SpecError(f"counts disagree: order {len(items)}, records {n_records}, state {state['count']}")
    return shard, state, items


def record_checksum(key, value, end):
    return xxhash.xxh3_64_intdigest(value[:end], seed=xxhash.xxh3_64_intdigest(key, seed=0))


def decode_record(key, value, verify=True):
    """Decode one `records` value per spec section 3 ("Reading a record", steps 1-4)."""
    if len(value) < 56:
        raise SpecError("record shorter than 56 bytes")
    magic, version, hsize, W, H, N, D, C, A, dtype_code, flags, _res16, E, _res64 = HEADER.unpack_from(value)
    if magic != b"RBRC" or version != 1 or hsize != 48:
        raise SpecError(f"bad magic/version/header size: {magic!r} {version} {hsize}")
    if dtype_code not in FEATURE_DTYPES:
        raise SpecError(f"unknown feature dtype code {dtype_code}")
    f32, f16 = np.dtype("<f4"), np.dtype("<f2")
    layout = [("boxes", f32, 4), ("loc5", f32, 5), ("loc7", f32, 7), ("features", FEATURE_DTYPES[dtype_code], D),
              ("class_probs", f16, C), ("attr_probs", f16, A)]
    pos, offsets = 48, {}
    for name, dt, cols in layout:
        size = N * cols * dt.itemsize
        offsets[name] = pos
        if size:  # a zero-size section is absent: no space, no padding
            pos = up16(pos + size)
    offsets["extra"] = pos
    if E:
        pos = up16(pos + E)
    end = pos  # SPEC: "end of the last present section rounded up": with no section present this is 48
    if len(value) != end + 8:
        raise SpecError(f"record length {len(value)} != end + 8 = {end + 8}")
    stored = struct.unpack_from("<Q", value, end)[0]
    if verify and record_checksum(key, value, end) != stored:
        raise SpecError("checksum mismatch")
    rec = {"id": key.decode("utf-8"), "width": W, "height": H, "N": N, "D": D, "C": C, "A": A,
           "dtype_code": dtype_code, "flags": flags, "reserved16": _res16, "reserved64": _res64, "E": E,
           "end": end, "checksum": stored}
    for name, dt, cols in layout:
        rec[name] = np.frombuffer(value, dtype=dt, count=N * cols, offset=offsets[name]).reshape(N, cols)
    if C == 0:
        rec["class_probs"] = None
    if A == 0:
        rec["attr_probs"] = None
    rec["extra"] = json.loads(value[offsets["extra"]:offsets["extra"] + E].decode("utf-8")) if E else None
    return rec


def settings_of(shard):
    settings = {k: shard[k] for k in SETTINGS_KEYS}
    # SPEC: section 4 only shows `"extractor": {...without job...}` inside the index example; the content hash
    # really does drop extractor.job (see test_content_hash_*), which the prose should state outright.
    settings["extractor"] = {k: v for k, v in shard["extractor"].items() if k != "job"}
    return settings


def spec_content_hash(path):
    shard, _state, items = load_shard(path)
    # SPEC: "json.dumps(..., sort_keys=True) with default separators" -- also implies Python's default
    # ensure_ascii=True (non-ASCII as \\uXXXX escapes) and Python float repr (1e-05); the bytes use exactly that.
    data = bytearray(json.dumps(settings_of(shard), sort_keys=True).encode("ascii"))
    for key, value in items:
        data += struct.pack("<I", len(key)) + key + value[-8:]
    # SPEC: "The hex digest" -- it is the canonical big-endian form (high 64 bits first), 32 lowercase hex digits.
    return "xxh3_128:" + xxhash.xxh3_128_hexdigest(bytes(data))


# ---------------------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------------------

from regionbert.data import ShardReader, ShardWriter, content_hash  # noqa: E402

ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
UNICODE_IDS = ["coco/train2017/000000001", "café/Ünïcode", "目录/图像-7", "emoji-🙂-4byte", "é" * 255 + "x"]


def random_boxes(rng, n, W, H):
    x = np.sort(rng.random((n, 2)) * W, axis=1)
    y = np.sort(rng.random((n, 2)) * H, axis=1)
    boxes = np.stack([x[:, 0], y[:, 0], x[:, 1], y[:, 1]], axis=1)
    if n >= 3:  # edge cases: whole image, zero-area box, integer box
        boxes[:3] = [[0, 0, W, H], [W / 3, H / 7, W / 3, H / 7], [1, 2, 3, 4]]
    return boxes


def spec_locations(boxes32, W, H):
    b = boxes32.astype(np.float64)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    loc5 = np.stack([b[:, 0] / W, b[:, 1] / H, b[:, 2] / W, b[:, 3] / H, w * h / (W * H)], axis=1)
    loc7 = np.stack([b[:, 0] / W, b[:, 1] / H, b[:, 2] / W, b[:, 3] / H, w / W, h / H, (w / W) * (h / H)], axis=1)
    return loc5.astype(np.float32), loc7.astype(np.float32)


CASES = {
    "f16_classes_attrs_extra": dict(feature_dim=16, feature_dtype="float16", class_names=["__bg__", "cat", "dög", "狗"],
                                    attribute_names=["red", "furry", "wet"], extra=True, sizes=[5, 0, 700, 1, 3]),
    "f32_no_classes": dict(feature_dim=7, feature_dtype="float32", class_names=None, attribute_names=None,
                           extra=False, sizes=[0, 2, 300, 1, 9]),
    "f32_classes_extra": dict(feature_dim=3, feature_dtype="float32", class_names=["bg", "a"], attribute_names=None,
                              extra=True, sizes=[4, 0, 1, 120, 2]),
}
EXTRACTOR = {"name": "synthetic", "detector": "frcnn-ü", "weights": "w.pth", "weights_digest": "sha256:00",
             "box_policy": "nms", "boxes": "proposals", "score_thresh": 1e-05, "iou": 0.3,
             "job": {"shard": 2, "host": "h"}}


def write_case(path, case, seed=0, extractor=EXTRACTOR):
    rng = np.random.default_rng(seed)
    inputs = []
    C = len(case["class_names"] or [])
    A = len(case["attribute_names"] or [])
    with ShardWriter(path, feature_dim=case["feature_dim"], class_names=case["class_names"],
                     feature_dtype=case["feature_dtype"], attribute_names=case["attribute_names"],
                     extractor=extractor) as w:
        for image_id, n in zip(UNICODE_IDS, case["sizes"], strict=True):
            W, H = int(rng.integers(1, 2000)), int(rng.integers(1, 2000))
            boxes = random_boxes(rng, n, W, H)
            features = rng.standard_normal((n, case["feature_dim"])) * 4  # float64 on purpose
            # float32 probabilities: float64 -> float16 rounding is the writer's business, not the format's
            cp = rng.random((n, C)).astype(np.float32) + np.float32(1e-3) if C else None
            if cp is not None:
                cp /= cp.sum(axis=1, keepdims=True)
            ap = rng.random((n, A)).astype(np.float32) if A else None
            if ap is not None:  # a distribution per box, like class_probs (the record rules)
                ap /= ap.sum(axis=1, keepdims=True)
            extra = {"src": image_id, "row": int(n), "note": "ünï"} if case["extra"] else None
            w.add(image_id, width=W, height=H, boxes=boxes, features=features, class_probs=cp, attr_probs=ap,
                  extra=extra)
            inputs.append(dict(id=image_id, width=W, height=H, boxes=boxes, features=features, class_probs=cp,
                               attr_probs=ap, extra=extra))
    return inputs


@pytest.mark.parametrize("name", sorted(CASES))
def test_records_match_writer_input_and_shard_reader(tmp_path, name):
    case = CASES[name]
    path = tmp_path / "shard"
    inputs = write_case(path, case)
    # our reader first: py-lmdb refuses a second open of one environment in a process, and ShardReader keeps its own
    shard, state, items = load_shard(path)
    ours = [decode_record(k, v) for k, v in items]
    fdtype = np.dtype(case["feature_dtype"])
    assert [r["id"] for r in ours] == [i["id"] for i in inputs]
    for rec, inp in zip(ours, inputs, strict=True):
        n = len(inp["boxes"])
        assert (rec["width"], rec["height"], rec["N"]) == (inp["width"], inp["height"], n)
        assert rec["D"] == case["feature_dim"]
        assert rec["C"] == len(case["class_names"] or []) and rec["A"] == len(case["attribute_names"] or [])
        assert rec["dtype_code"] == {"float16": 1, "float32": 2}[case["feature_dtype"]]
        assert rec["flags"] == rec["reserved16"] == rec["reserved64"] == 0
        assert (rec["E"] == 0) == (inp["extra"] is None)
        boxes32 = inp["boxes"].astype(np.float32)
        assert rec["boxes"].dtype == np.float32 and np.array_equal(rec["boxes"], boxes32)
        assert rec["features"].dtype == fdtype and np.array_equal(rec["features"], inp["features"].astype(fdtype))
        loc5, loc7 = spec_locations(boxes32, inp["width"], inp["height"])
        # tightest true statement: float64 formulas rounded once to float32 reproduce the stored vectors bit-exactly
        assert np.array_equal(rec["loc5"], loc5) and np.array_equal(rec["loc7"], loc7)
        for field in ("class_probs", "attr_probs"):
            if inp[field] is None:
                assert rec[field] is None
            else:
                assert rec[field].dtype == np.float16 and np.array_equal(rec[field], inp[field].astype(np.float16))
        assert rec["extra"] == inp["extra"]

    r = ShardReader(path)
    assert len(r) == len(ours) == state["count"]
    for i, rec in enumerate(ours):
        for theirs in (r[i], r.get(rec["id"])):
            assert (theirs.id, theirs.width, theirs.height) == (rec["id"], rec["width"], rec["height"])
            for field in ("boxes", "features", "loc5", "loc7", "class_probs", "attr_probs"):
                a, b = getattr(theirs, field), rec[field]
                assert (a is None) == (b is None), field
                if b is not None:
                    assert a.dtype == b.dtype and np.array_equal(a, b), field
            assert theirs.extra == rec["extra"]


def test_checksum_and_corruption(tmp_path):
    path = tmp_path / "shard"
    write_case(path, CASES["f16_classes_attrs_extra"])
    _shard, _state, items = load_shard(path)
    for key, value in items:
        rec = decode_record(key, value)
        assert rec["checksum"] == record_checksum(key, value, rec["end"])
        with pytest.raises(SpecError, match="checksum"):  # seeded with the key: the same value under another key
            decode_record(key + b"!", value)
        with pytest.raises(SpecError, match="length"):
            decode_record(key, value + b"\0")
        # flip one byte at a time (in a copy): in the body (checksum covers padding too) and in the checksum itself
        for pos in sorted({48, len(value) // 2, rec["end"] - 1, rec["end"], len(value) - 1}):
            bad = bytearray(value)
            bad[pos] ^= 0x01
            assert record_checksum(key, bytes(bad), rec["end"]) != struct.unpack_from("<Q", bad, rec["end"])[0]
            with pytest.raises(SpecError, match="checksum"):
                decode_record(key, bytes(bad))
        bad = bytearray(value)
        bad[0] ^= 0x01
        with pytest.raises(SpecError, match="magic"):
            decode_record(key, bytes(bad))


def test_content_hash_matches_and_ignores_job(tmp_path):
    case = CASES["f16_classes_attrs_extra"]
    a, b = tmp_path / "a", tmp_path / "b"
    write_case(a, case)
    write_case(b, case, extractor={**EXTRACTOR, "job": {"shard": 3, "host": "other"}})
    ours_a, ours_b = spec_content_hash(a), spec_content_hash(b)
    shard, _state, items = load_shard(a)
    assert content_hash(a) == ours_a and content_hash(b) == ours_b
    assert ours_a == ours_b  # same content, different job (and possibly `created`)
    assert re.fullmatch(r"xxh3_128:[0-9a-f]{32}", ours_a)

    # pin down what the spec leaves implicit: each alternative reading gives a different hash
    tail = b"".join(struct.pack("<I", len(k)) + k + v[-8:] for k, v in items)
    s = settings_of(shard)
    assert ours_a == f"xxh3_128:{xxhash.xxh3_128_intdigest(json.dumps(s, sort_keys=True).encode() + tail):032x}"
    alternatives = [
        json.dumps({**s, "extractor": shard["extractor"]}, sort_keys=True).encode(),  # job kept
        json.dumps(s, sort_keys=True, ensure_ascii=False).encode("utf-8"),  # raw UTF-8 instead of \\u escapes
        json.dumps(s, sort_keys=True, separators=(",", ":")).encode(),  # compact, as meta/shard itself is stored
    ]
    for alt in alternatives:
        assert "xxh3_128:" + xxhash.xxh3_128_hexdigest(alt + tail) != ours_a


def test_metadata_fields(tmp_path):
    case = CASES["f16_classes_attrs_extra"]
    path = tmp_path / "shard"
    write_case(path, case)
    shard, state, items = load_shard(path)
    assert shard["format"] == "regionbert-shard" and shard["schema_version"] == 1
    assert shard["feature_dim"] == case["feature_dim"] and shard["feature_dtype"] == case["feature_dtype"]
    assert shard["class_names"] == case["class_names"] and shard["attribute_names"] == case["attribute_names"]
    assert shard["box_format"] == "xyxy_pixels" and shard["extractor"] == EXTRACTOR
    assert ISO_UTC.match(shard["created"])
    assert state["count"] == len(items) == len(case["sizes"]) and state["complete"] is True
    assert ISO_UTC.match(state["updated"]) and state["updated"] >= shard["created"]

    path2 = tmp_path / "shard2"
    case2 = CASES["f32_no_classes"]
    write_case(path2, case2, extractor={"name": "x"})
    shard2, _, items2 = load_shard(path2)
    assert shard2["class_names"] is None and shard2["attribute_names"] is None and shard2["feature_dtype"] == "float32"
    assert all(decode_record(k, v)["C"] == decode_record(k, v)["A"] == 0 for k, v in items2)


def test_large_values_are_16_byte_aligned_in_the_map(tmp_path):
    # SPEC: "LMDB places values of more than half a page at 16-byte aligned addresses, so views are aligned for
    # their dtypes" -- true for values > psize/2 (overflow pages); values that fit in a leaf page can sit at any
    # address, even odd ones, so zero-copy views of small records may be unaligned.
    path = tmp_path / "shard"
    write_case(path, CASES["f16_classes_attrs_extra"])
    env = lmdb.open(str(path), readonly=True, lock=False, max_dbs=3)
    try:
        psize = env.stat()["psize"]
        with env.begin(buffers=True) as txn:
            db = env.open_db(b"records", txn=txn, create=False)
            big = [np.frombuffer(v, np.uint8).ctypes.data for _k, v in txn.cursor(db=db) if len(v) > psize // 2]
    finally:
        env.close()
    assert big and all(addr % 16 == 0 for addr in big)
