"""Record rules (deep verify): what a decoded record must mean, beyond a valid layout and checksum.

Spec: docs/shard-format.md, "Record rules (deep verify)". A checksum proves the bytes are the ones the
writer stored; these rules prove the writer stored something sane: a hand-made record with a valid
checksum and boxes outside the image, NaN features, location vectors of another image size, or class
"distributions" that do not sum to 1 fails here.

    check_record(record, key) -> ["rule <name>: what is wrong", ...]   (empty: the record obeys every rule)

Used by `verify` on every stored record (data/index.py), and by ShardWriter.add on every record before
it is queued (`refuse_bad_record`), so a shard written by us never breaks them. All checks are
vectorised numpy over the record's arrays: a few microseconds for a typical record.

    check_batch(...) -> rows    the same rules over what a trainer uses of a batch (boxes, one location
                                vector, class distributions, features), at once for the whole padded batch:
                                the rows that break one. The trainer (train/data.py) checks every batch it
                                reads, so a shard nobody verified cannot train it on nonsense; a bad row is
                                then explained by check_record.
"""

from __future__ import annotations

import numpy as np

from .errors import ShardError
from .format import Record, box_table_chunks, declares_box_table, decode_box_table, decode_record

BOX_SLACK = 1.0  # pixels: a box may overhang the image by at most this (detector rounding)
LOC_TOLERANCE = 2.0 ** -20  # |stored - exact| <= LOC_TOLERANCE * max(1, |exact|) for loc5 / loc7
FP16_UNIT_ROUNDOFF = 2.0 ** -11  # float16 keeps 11 significant bits: rounding moves a value by <= 2^-11 of it
FP32_UNIT_ROUNDOFF = 2.0 ** -24


def prob_sum_tolerance(c: int) -> float:
    """How far a row of C float16 probabilities may sum from 1.

    Rounding p_i to float16 moves it by at most 2^-11 * p_i (normal numbers) or 2^-25 (subnormals, below
    2^-14), so the rounded row's sum is within 2^-11 * sum(p) + C * 2^-25 of the exact one, whatever C
    is. The source row (a float32 softmax) is itself within about C * 2^-24 of 1. Hence 2^-11 + C * 2^-24:
    for COCO's 91 classes 4.9e-4 + 5e-6, for Visual Genome's 1601 classes 4.9e-4 + 9.5e-5. A row with one
    class missing, or logits instead of probabilities, is off by far more."""
    return FP16_UNIT_ROUNDOFF + c * FP32_UNIT_ROUNDOFF


def check_id(key: bytes) -> list[str]:
    """The id rules: the key is valid UTF-8 and holds no NUL (C readers, file names and logs cut at NUL)."""
    out = []
    try:
        bytes(key).decode("utf-8")
    except UnicodeDecodeError as e:
        out.append(f"rule id-utf8: the id is not valid UTF-8 ({e.reason} at byte {e.start})")
    if b"\x00" in bytes(key):
        out.append(f"rule id-nul: the id holds a NUL byte at {bytes(key).index(0)}")
    return out


def _first(mask: np.ndarray) -> str:
    """'row 3 (and 2 more)' for a boolean mask over rows (or over rows x columns)."""
    rows = np.flatnonzero(mask.reshape(mask.shape[0], -1).any(1))
    more = f" (and {len(rows) - 1} more)" if len(rows) > 1 else ""
    return f"{int(rows[0])}{more}"


def _all_finite(a) -> bool:
    """No NaN or inf. float16 (features, probabilities): an integer test of the exponent bits, ~40x faster
    than np.isfinite, which has no vectorised float16 loop."""
    if a.dtype == np.float16:
        bits = a.view(np.uint16)
        if int(bits.max(initial=0)) < 0x7C00:  # all >= 0 and finite (ReLU features, probabilities): one pass
            return True
        return int((bits & 0x7C00).max()) < 0x7C00  # exponent all ones: inf or NaN
    return bool(np.isfinite(a).all())


all_finite = _all_finite  # for readers that check what they use (train/data.py)


def _finite(name: str, a) -> list[str]:
    if a is None or a.size == 0 or _all_finite(a):
        return []
    return [f"rule {name}-finite: {name} hold NaN or inf in box {_first(~np.isfinite(a))}"]


def _geometry_rules(rec: Record) -> list[str]:
    """Boxes in order and inside the image; loc5 / loc7 as the spec's formulas give them from the float32
    boxes and the image size (computed exactly, in float64). One pass of whole-array operations."""
    b = np.asarray(rec.boxes, dtype=np.float64)  # (N, 4)
    size = np.array([rec.width, rec.height, rec.width, rec.height], dtype=np.float64)
    out = []
    order = (b[:, :2] > b[:, 2:]).any(1)
    if order.any():
        i = int(np.flatnonzero(order)[0])
        out.append(f"rule box-order: box {_first(order)} {b[i].tolist()} has x1 > x2 or y1 > y2 (xyxy, not xywh?)")
    outside = (np.abs(b - size / 2) > size / 2 + BOX_SLACK).any(1)  # x < -slack or x > W + slack, and so on
    if outside.any():
        i = int(np.flatnonzero(outside)[0])
        out.append(f"rule box-inside: box {_first(outside)} {b[i].tolist()} lies more than {BOX_SLACK:g} pixel "
                   f"outside the {rec.width}x{rec.height} image")
    xy = b / size  # x1/W, y1/H, x2/W, y2/H
    wh = xy[:, 2:] - xy[:, :2]  # w/W, h/H
    area = wh[:, :1] * wh[:, 1:]
    exact = np.concatenate([xy, area, xy, wh, area], axis=1)  # (N, 12): loc5 then loc7
    stored = np.concatenate([rec.loc5, rec.loc7], axis=1).astype(np.float64)
    bad = np.abs(stored - exact) > LOC_TOLERANCE * np.maximum(1.0, np.abs(exact))
    for name, cols in (("loc5", slice(0, 5)), ("loc7", slice(5, 12))):
        if bad[:, cols].any():
            i = int(np.flatnonzero(bad[:, cols].any(1))[0])
            out.append(f"rule {name}-matches-boxes: {name} of box {_first(bad[:, cols])} is "
                       f"{np.round(stored[i, cols], 6).tolist()}, but box {np.round(b[i], 3).tolist()} in a "
                       f"{rec.width}x{rec.height} image gives {np.round(exact[i, cols], 6).tolist()}")
    return out


def _distribution_rules(name: str, p) -> list[str]:
    """Each row is a probability distribution: finite, >= 0, summing to 1 within float16 rounding."""
    if p is None or p.size == 0:
        return []
    if not _all_finite(p):
        return [f"rule {name}-finite: {name} hold NaN or inf in box {_first(~np.isfinite(p))}"]
    out = []
    negative = int(p.view(np.uint16).max()) > 0x8000 if p.dtype == np.float16 else p.min() < 0  # sign bit, not -0
    if negative:
        out.append(f"rule {name}-nonnegative: {name} of box {_first(np.asarray(p) < 0)} hold negative values")
    sums = p.astype(np.float32).sum(1, dtype=np.float64)  # float16 -> float32 is exact; summed in float64
    tol = prob_sum_tolerance(p.shape[1])
    off = np.abs(sums - 1.0) > tol
    if off.any():
        i = int(np.flatnonzero(off)[0])
        out.append(f"rule {name}-sum: {name} of box {_first(off)} sum to {sums[i]:.6f}, not 1 within float16 "
                   f"rounding (+-{tol:.2g} for {p.shape[1]} values)")
    return out


def check_record(rec: Record, key: bytes | None = None) -> list[str]:
    """Every rule a record breaks, as 'rule <name>: ...' strings (empty: none). key: the stored key bytes
    (default: the record's id in UTF-8)."""
    out = check_id(rec.id.encode("utf-8", "surrogatepass") if key is None else key)
    out += _finite("features", rec.features)
    boxes_ok = not (bad := _finite("boxes", rec.boxes))
    out += bad + _finite("loc5", rec.loc5) + _finite("loc7", rec.loc7)
    if boxes_ok and rec.boxes.size:
        out += _geometry_rules(rec)
    out += _distribution_rules("class_probs", rec.class_probs)
    out += _distribution_rules("attr_probs", rec.attr_probs)
    return out


def refuse_bad_record(path: str, key: bytes, value) -> None:
    """The writer's last check, on the exact bytes it is about to store: raise ShardError naming the
    shard, the id and every rule the record breaks."""
    problems = check_record(decode_record(key, value, verify=False), key)
    if problems:
        name = bytes(key).decode("utf-8", "replace")
        raise ShardError(f"{path}: record {name!r} breaks the shard format's record rules: {'; '.join(problems)}")


def check_batch(boxes: np.ndarray, sizes: np.ndarray, lens: np.ndarray, loc: np.ndarray,
                probs: np.ndarray | None = None, features: np.ndarray | None = None) -> np.ndarray:
    """The rows of a padded batch whose used regions break a record rule (empty: none), vectorised.

    boxes (B, N, 4) float32, sizes (B, 2) image width and height, lens (B,) regions used in each row (the
    rest is padding, never looked at), loc (B, N, 5 or 7) the location vector the trainer uses (loc5 or
    loc7), probs (B, N, C) float16 class distributions or None, features (B, N, D) or None. The rules and
    tolerances are check_record's (boxes finite, in order, inside the image; loc matching the boxes;
    distributions finite, >= 0, summing to 1; features finite), on the first lens[b] regions of row b."""
    B, N = boxes.shape[:2]
    valid = np.arange(N)[None, :] < np.asarray(lens)[:, None]  # (B, N)
    b = boxes.astype(np.float64)
    size = np.tile(np.asarray(sizes, dtype=np.float64), 2).reshape(B, 1, 4)  # W H W H
    with np.errstate(invalid="ignore", divide="ignore", over="ignore"):
        bad = ~np.isfinite(b).all(-1) | (b[..., :2] > b[..., 2:]).any(-1)
        bad |= (np.abs(b - size / 2) > size / 2 + BOX_SLACK).any(-1)
        xy = b / size
        wh = xy[..., 2:] - xy[..., :2]
        area = wh[..., :1] * wh[..., 1:]
        exact = np.concatenate([xy, area] if loc.shape[-1] == 5 else [xy, wh, area], axis=-1)
        # not (<=): a NaN stored value fails too
        bad |= ~(np.abs(loc.astype(np.float64) - exact) <= LOC_TOLERANCE * np.maximum(1.0, np.abs(exact))).all(-1)
    bad &= valid
    if probs is not None and probs.shape[-1]:
        if probs.dtype == np.float16:
            # a row's largest bit pattern: below 0x7C00 all are >= 0 and finite; 0x8000 is -0 (fine); anything
            # else is a negative value (sign bit) or +inf / NaN (exponent all ones): as _distribution_rules
            top = probs.view(np.uint16).max(-1)
            bad |= valid & (top >= 0x7C00) & (top != 0x8000)
        else:
            bad |= valid & ~((probs >= 0).all(-1) & np.isfinite(probs).all(-1))
        sums = probs.sum(-1, dtype=np.float64)
        bad |= valid & ~(np.abs(sums - 1.0) <= prob_sum_tolerance(probs.shape[-1]))
    if features is not None and features.size and not _all_finite(features):  # padding is 0: finite
        bad |= valid & ~_finite_rows(features)
    return np.flatnonzero(bad.any(1))


def _finite_rows(a: np.ndarray) -> np.ndarray:
    """(B, N) whether each region's values are all finite (only computed once a batch holds a non-finite)."""
    return np.isfinite(a.astype(np.float32)).all(-1)


def box_table_problems(path: str, txn, meta_db, meta: dict, headers: np.ndarray, key_at) -> list[str]:
    """What `verify` reports about the box-count table (format 1.1): missing where the metadata declares it,
    malformed (docs/shard-format.md section 1), or disagreeing with the records. headers: each order
    position's N as its record's header gives it (-1 where the record could not be read: reported already);
    key_at(i): the id at position i (bytes), for the message. Empty: the table matches every record, or
    the shard (1.0) has none."""
    try:
        chunks = box_table_chunks(path, txn, meta_db, len(headers))
        if not chunks:
            if len(headers) and declares_box_table(meta):
                return [f"box-count table: missing, though the metadata declares it (schema_minor "
                        f"{meta['schema_minor']}); the shard is damaged"]
            return []
        table = decode_box_table(path, chunks, len(headers)).astype(np.int64)
    except ShardError as e:
        return [str(e).removeprefix(f"{path}: ")]
    wrong = np.flatnonzero((table != headers) & (headers >= 0))
    if not len(wrong):
        return []
    i = int(wrong[0])
    more = f" (and {len(wrong) - 1} more)" if len(wrong) > 1 else ""
    name = key_at(i).decode("utf-8", "replace")
    return [f"box-count table: position {i} ({name!r}) says {int(table[i])} boxes, the record holds "
            f"{int(headers[i])}{more}; the table is damaged or forged (readers trust its counts)"]
