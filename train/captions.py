"""The captions table: a manifest's captions tokenized once, in one memory-mapped file of flat integer arrays.

    ids       every caption's token ids ([CLS] words [SEP]) one after the other (uint16, int32 for big vocabularies)
    offsets   caption c's ids are ids[offsets[c]:offsets[c + 1]] (int64, count + 1)
    lengths   offsets' differences: each caption's token count (int16)
    image     each caption's image, an index into pool (int32)
    pool      each image's position in the ShardSet (int64); images sorted by id, as np.unique sorted them

A table is built once per (manifest content, tokenizer file and settings, max length, split, the shards'
identity: their stored content hashes, or their ids where a shard has none) and reused by every rank,
loader worker, evaluation and resume: the file's name carries a digest of those inputs, so a change to any
of them names another file (and the old one is simply not read again: the build of the new one names
the tables of that manifest and split left from other inputs, which the user may remove). Nothing per
caption or per image lives in Python objects: the arrays are views of a read-only shared mapping, so forked
loader workers share its pages (a list of arrays or a dict of ids would be copied page by page as
reference counts are written).

Building streams the manifest in blocks of rows (text.iter_manifest), so its peak memory depends on the
block and on the number of images (an id lookup of a hash, a position and the id bytes per image), not on
the number of captions. The file is written beside as NAME.tmp-PID-RANDOM and renamed when complete and
synced, so a reader sees a whole table or none; a build killed midway leaves only a .tmp- file, which no
reader opens and the next builder removes. Ranks that start together take an exclusive lock on the cache
folder (flock): one builds, the others wait and then read what it wrote. A table is checked when opened
(header, array bounds, a checksum of its bytes, the arrays' invariants) and rebuilt if it fails.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import glob
import hashlib
import json
import mmap
import os
import re
import secrets
import tempfile
import warnings

import numpy as np
import tokenizers
import xxhash

from regionbert.data import ShardError, ShardSet

from .text import Text, iter_manifest
from .text import _manifest_ext as manifest_ext

MAGIC = b"RBCAPTS1"
VERSION = 1
HEADER_BYTES = 4096  # the JSON header, padded; the arrays follow, each at a multiple of ALIGN
ALIGN = 64
CHUNK_ROWS = 65536  # manifest rows tokenized at once while building
BLOCK = 1 << 20  # elements per step when checking or converting arrays (bounded temporaries)
DTYPES = {"ids": ("<u2", "<i4"), "offsets": ("<i8",), "lengths": ("<i2",), "image": ("<i4",), "pool": ("<i8",)}


class CaptionTableError(ValueError):
    """A table file that cannot be trusted (damaged, foreign, truncated): it is rebuilt."""


# ----------------------------------------------------------------------------- inputs and names
def file_digest(path: str) -> str:
    """xxh3_128 of a file's bytes, read in 4 MB blocks."""
    try:
        with open(path, "rb") as f:
            return _digest_rest(f)
    except OSError as e:
        raise ValueError(f"{path}: cannot read it ({e.strerror})") from None


def _digest_rest(f) -> str:
    """xxh3_128 of the rest of an open file, through one 4 MB buffer whatever the file's size."""
    h, buf = xxhash.xxh3_128(), bytearray(4 << 20)
    view = memoryview(buf)
    while n := f.readinto(buf):
        h.update(view[:n])
    return h.hexdigest()


def shard_identity(shards: ShardSet) -> list[str]:
    """Per shard, in order: its record count and stored content hash (complete shards store it at close),
    or, for a shard without one (incomplete), a digest of its ids in order. Paths are left out: a copy of
    the same shards elsewhere is the same table."""
    out = []
    for s in shards.shards:
        state = s.state
        if state.get("complete") and state.get("content_hash"):
            out.append(f"{len(s)}:{state['content_hash']}")
        else:
            h = xxhash.xxh3_128()
            for key in s.keys():
                h.update(key.encode("utf-8") + b"\0")
            out.append(f"{len(s)}:ids:{h.hexdigest()}")
    return out


def table_key(shards: ShardSet, manifest: str, text: Text, split: str | None) -> tuple[str, dict]:
    """(hex digest naming the table, the inputs it digests)."""
    manifest_ext(manifest)  # a manifest that is missing or of no known kind is named as read_manifest names it
    inputs = {"version": VERSION, "manifest": file_digest(manifest),
              "manifest_ext": os.path.splitext(manifest)[1].lower(), "split": split,
              "tokenizer": file_digest(text.path), "tokenizer_kind": os.path.splitext(text.path)[1],
              "lowercase": text.lowercase, "max_len": text.max_len, "tokenizers": tokenizers.__version__,
              "vocab_size": text.vocab_size, "shards": shard_identity(shards)}
    blob = json.dumps(inputs, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest(), inputs


def default_cache(manifest: str, fallback: str | None = None) -> str:
    """Where a manifest's tables go by default: its own folder if this process may write there, else
    fallback (the run folder's captions/), else the user's cache folder."""
    folder = os.path.dirname(os.path.abspath(manifest))
    if os.access(folder, os.W_OK | os.X_OK):
        return folder
    if fallback:
        return fallback
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "regionbert", "captions")


def table_path(cache: str, manifest: str, split: str | None, key: str) -> str:
    name = os.path.basename(manifest)
    return os.path.join(cache, f"{name}.{split or 'all'}.{key[:24]}.captions")


# ----------------------------------------------------------------------------- the table
class CaptionTable:
    """An opened table: read-only array views of one shared mapping. Pickles as its path (a spawned
    worker maps the file again), never as a copy of its arrays."""

    def __init__(self, path: str, key: str, built: bool = False):
        self.path, self.key, self.built = path, key, built
        self._open(check=True)

    def _open(self, check: bool) -> None:
        fd = os.open(self.path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
        try:
            size = os.fstat(fd).st_size
            if size < HEADER_BYTES:
                raise CaptionTableError(f"{self.path}: {size} bytes, shorter than a table's header")
            self._map = mmap.mmap(fd, size, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        header = read_header(self.path, self._map)
        if header["key"] != self.key:
            raise CaptionTableError(f"{self.path}: made for other inputs (key {header['key'][:24]}...)")
        self.count, self.num_images = header["count"], header["num_images"]
        self.max_len, self.vocab_size = header["max_len"], header["vocab_size"]
        arrays, end = {}, HEADER_BYTES
        for name in DTYPES:
            offset, dtype, length = header["arrays"][name]
            if dtype not in DTYPES[name] or not isinstance(offset, int) or not isinstance(length, int) \
                    or offset < end or offset % ALIGN or length < 0 \
                    or offset + length * np.dtype(dtype).itemsize > size:
                raise CaptionTableError(f"{self.path}: array {name} ({offset}, {dtype}, {length}) is out of bounds")
            arrays[name] = np.frombuffer(self._map, dtype=dtype, count=length, offset=offset)
            end = offset + length * np.dtype(dtype).itemsize
        if end != size:
            raise CaptionTableError(f"{self.path}: {size - end} bytes after its last array")
        self.ids, self.offsets, self.lengths = arrays["ids"], arrays["offsets"], arrays["lengths"]
        self.image, self.pool = arrays["image"], arrays["pool"]
        if check:
            digest = xxhash.xxh3_128(memoryview(self._map)[HEADER_BYTES:]).hexdigest()
            if digest != header["checksum"]:
                raise CaptionTableError(f"{self.path}: checksum {digest} is not the header's {header['checksum']}")
            self._check()

    def _check(self) -> None:
        """The invariants every reader relies on (so a damaged file cannot index out of bounds)."""
        n, m, ids, off = self.count, self.num_images, self.ids, self.offsets
        if len(off) != n + 1 or len(self.lengths) != n or len(self.image) != n or len(self.pool) != m:
            raise CaptionTableError(f"{self.path}: array lengths disagree with its {n} captions and {m} images")
        if off[0] != 0 or off[-1] != len(ids):
            raise CaptionTableError(f"{self.path}: offsets do not span its {len(ids)} token ids")
        for a in range(0, n, BLOCK):
            b = min(n, a + BLOCK)
            lens = np.diff(off[a:b + 1])
            if not np.array_equal(lens, self.lengths[a:b]) or (lens < 2).any() or (lens > self.max_len).any():
                raise CaptionTableError(f"{self.path}: caption lengths disagree with offsets in rows {a}..{b - 1}")
            im = self.image[a:b]
            if len(im) and (im.min() < 0 or im.max() >= m):
                raise CaptionTableError(f"{self.path}: an image index outside 0..{m - 1} in rows {a}..{b - 1}")
        for a in range(0, len(ids), BLOCK):
            if ids[a:a + BLOCK].max(initial=0) >= self.vocab_size:
                raise CaptionTableError(f"{self.path}: a token id beyond the vocabulary's {self.vocab_size}")

    def tokens(self, c: int) -> np.ndarray:
        """Caption c's ids as int64, [CLS] words [SEP] (a small copy: the caller may mask it)."""
        return self.ids[self.offsets[c]:self.offsets[c + 1]].astype(np.int64)

    def __getstate__(self) -> dict:
        return {"path": self.path, "key": self.key, "built": self.built}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._open(check=False)  # checked by the process that opened it first; the name carries the key


def read_header(path: str, buf) -> dict:
    if bytes(buf[:8]) != MAGIC:
        raise CaptionTableError(f"{path}: not a captions table (magic {bytes(buf[:8])!r})")
    length = int.from_bytes(buf[8:16], "little")
    if not 0 < length <= HEADER_BYTES - 16:
        raise CaptionTableError(f"{path}: header length {length} out of range")
    try:
        header = json.loads(bytes(buf[16:16 + length]))
    except ValueError as e:
        raise CaptionTableError(f"{path}: header is not JSON ({e})") from None
    need = {"version": int, "key": str, "count": int, "num_images": int, "max_len": int, "vocab_size": int,
            "arrays": dict, "checksum": str}
    if not isinstance(header, dict) or any(not isinstance(header.get(k), t) for k, t in need.items()) \
            or header["version"] != VERSION or set(header["arrays"]) != set(DTYPES) \
            or any(not isinstance(v, list) or len(v) != 3 for v in header["arrays"].values()):
        raise CaptionTableError(f"{path}: header is not a version {VERSION} table's")
    return header


# ----------------------------------------------------------------------------- finding or building
def open_table(shards: ShardSet, manifest: str, text: Text, split: str | None = None,
               cache: str | None = None) -> CaptionTable:
    """The table for these inputs: opened if a valid one exists, else built (one process at a time per
    cache folder) and opened. Raises KeyError naming the manifest rows whose image is in no shard."""
    manifest = os.fspath(manifest)
    key, inputs = table_key(shards, manifest, text, split)
    cache = cache or default_cache(manifest)
    path = table_path(cache, manifest, split, key)
    table = _try_open(path, key)
    if table is not None:
        return table
    try:
        os.makedirs(cache, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{cache}: cannot create the captions table folder ({e.strerror}); set data.captions_cache "
                         "to a writable folder") from None
    try:
        with _folder_lock(cache) as locked:
            table = _try_open(path, key)  # another rank built it while this one waited
            if table is not None:
                return table
            # a build killed midway; only under the lock (without one, another process may be writing its own)
            for stale in glob.glob(glob.escape(path) + ".tmp-*") if locked else ():
                with contextlib.suppress(OSError):
                    os.unlink(stale)
            build_table(shards, manifest, text, split, path, key, inputs)
            _say_other_tables(path, manifest, split)
    except (PermissionError, IsADirectoryError, NotADirectoryError) as e:
        raise ValueError(f"{cache}: cannot write the captions table there ({e.strerror}); set data.captions_cache to "
                         "a writable folder, or prebuild it with `regionbert-pretrain CONFIG --prepare-only`") from None
    return CaptionTable(path, key, built=True)


def other_tables(path: str, manifest: str, split: str | None) -> list[str]:
    """The tables beside path of the same manifest name and split but of other inputs (another key)."""
    folder, name = os.path.dirname(path), os.path.basename(manifest)
    pattern = re.compile(re.escape(f"{name}.{split or 'all'}.") + r"[0-9a-f]{24}\.captions")
    try:
        names = os.listdir(folder)
    except OSError:
        return []
    return sorted(os.path.join(folder, n) for n in names
                  if pattern.fullmatch(n) and n != os.path.basename(path))


def _say_other_tables(path: str, manifest: str, split: str | None) -> None:
    """Once per build (so once per change of inputs, by the one rank that builds): name the tables of this
    manifest and split built for other inputs, which may be stale. They are not removed: a digest cannot
    tell a replaced manifest, tokenizer or shards from another run's settings (another max length, other
    shards) sharing the folder, whose table may be in use or wanted again (rebuilding costs a minute per
    million captions), nor a manifest of the same name in another folder; only the user knows."""
    others = other_tables(path, manifest, split)
    sizes = []
    for p in others:
        with contextlib.suppress(OSError):
            sizes.append(os.lstat(p).st_size)
    if others:
        shown = ", ".join(os.path.basename(p) for p in others[:5]) + (", ..." if len(others) > 5 else "")
        warnings.warn(f"{os.path.dirname(path)}: {len(others)} other captions table(s) of {os.path.basename(manifest)} "
                      f"(split {split or 'all'}), built for other inputs, {sum(sizes) / 2**20:.1f} MiB: {shown}. "
                      "If no run uses them any more (an earlier manifest, tokenizer, max length or shards), they "
                      "can be removed", stacklevel=4)


def _try_open(path: str, key: str) -> CaptionTable | None:
    try:
        return CaptionTable(path, key)
    except (FileNotFoundError, NotADirectoryError):  # not built yet (or no cache folder: said when creating it)
        return None
    except (CaptionTableError, OSError, ValueError) as e:
        warnings.warn(f"{path}: captions table not usable ({e}); building it again", stacklevel=3)
        return None


@contextlib.contextmanager
def _folder_lock(folder: str):
    """An exclusive flock on the folder itself (no lock file left behind); where the file system has no
    locks, each process builds its own copy and renames it into place, which is as correct, only slower."""
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            locked = True
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            locked = False
        yield locked
    finally:
        os.close(fd)  # releases the lock


def build_table(shards: ShardSet, manifest: str, text: Text, split: str | None, path: str, key: str,
                inputs: dict) -> None:
    """Stream the manifest, look each caption's image up, tokenize, and write the table at path
    (atomically). KeyError naming the rows (by their data row in the file) whose image is in no shard."""
    folder = os.path.dirname(path)
    lookup = IdLookup(shards)
    tmp = f"{path}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    ids_dtype = np.dtype("<u2" if text.vocab_size <= 1 << 16 else "<i4")
    if text.max_len >= 1 << 15:
        raise ValueError(f"max text length {text.max_len} is beyond the captions table's 32767")
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0), 0o644)
    try:
        with os.fdopen(fd, "w+b") as out, tempfile.TemporaryFile(dir=folder) as lens_f, \
                tempfile.TemporaryFile(dir=folder) as pos_f:
            out.write(b"\0" * HEADER_BYTES)
            count, n_ids, missing, n_missing = 0, 0, [], 0
            for df in iter_manifest(manifest, split, CHUNK_ROWS):
                if df.empty:
                    continue
                pos = lookup.find(df["image_id"].tolist())
                absent = np.flatnonzero(pos < 0)
                if len(absent):  # found while streaming: go on only to count them
                    n_missing += len(absent)
                    missing += [(int(df.index[i]), df["image_id"].iloc[i]) for i in absent[:5 - len(missing)]]
                if n_missing:
                    continue
                flat, lens = text.encode_flat(df["caption"].tolist())
                out.write(flat.astype(ids_dtype).tobytes())
                lens_f.write(lens.astype("<i2").tobytes())
                pos_f.write(pos.astype("<i8").tobytes())
                count, n_ids = count + len(df), n_ids + len(flat)
            if n_missing:
                shown = ", ".join(f"row {r}: {i!r}" for r, i in missing)
                raise KeyError(f"{manifest}: {n_missing} caption(s) name images that are in no shard "
                               f"({shown}{', ...' if n_missing > 5 else ''})")
            lookup.used = np.zeros(len(shards), dtype=bool)
            pos_map = _mapped(pos_f, "<i8", count)
            for a in range(0, count, BLOCK):
                lookup.used[pos_map[a:a + BLOCK]] = True
            pool = lookup.sorted_by_id(np.flatnonzero(lookup.used))
            arrays = {"ids": (HEADER_BYTES, ids_dtype.str, n_ids)}
            _pad(out)
            arrays["offsets"] = (out.tell(), "<i8", count + 1)
            lens_map, total = _mapped(lens_f, "<i2", count), 0
            out.write(np.zeros(1, "<i8").tobytes())
            for a in range(0, count, BLOCK):
                ends = total + np.cumsum(lens_map[a:a + BLOCK], dtype=np.int64)
                out.write(ends.astype("<i8").tobytes())
                total = int(ends[-1])
            _pad(out)
            arrays["lengths"] = (out.tell(), "<i2", count)
            for a in range(0, count, BLOCK):
                out.write(lens_map[a:a + BLOCK].tobytes())
            _pad(out)
            arrays["image"] = (out.tell(), "<i4", count)
            image_of = np.full(len(shards), -1, dtype=np.int32)
            image_of[pool] = np.arange(len(pool), dtype=np.int32)
            for a in range(0, count, BLOCK):
                out.write(image_of[pos_map[a:a + BLOCK]].astype("<i4").tobytes())
            del pos_map, lens_map, image_of, lookup
            _pad(out)
            arrays["pool"] = (out.tell(), "<i8", len(pool))
            out.write(pool.astype("<i8").tobytes())
            out.flush()
            header = {"version": VERSION, "key": key, "count": count, "num_images": len(pool),
                      "max_len": text.max_len, "vocab_size": text.vocab_size,
                      "arrays": {k: list(v) for k, v in arrays.items()}, "checksum": _checksum(out),
                      "manifest": os.path.basename(manifest), "split": split, "shards": len(inputs["shards"])}
            blob = json.dumps(header).encode()
            if len(blob) > HEADER_BYTES - 16:
                raise ValueError(f"{path}: table header of {len(blob)} bytes does not fit")
            out.seek(0)
            out.write(MAGIC + len(blob).to_bytes(8, "little") + blob)
            out.flush()
            os.fsync(out.fileno())
        os.rename(tmp, path)  # whole or not at all
        _sync_folder(folder)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def _mapped(f, dtype: str, count: int) -> np.ndarray:
    """A temporary file's contents as a read-only array (mapped, not read into memory)."""
    f.flush()
    if count == 0:
        return np.zeros(0, dtype)
    return np.frombuffer(mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ), dtype=dtype, count=count)


def _pad(out) -> None:
    out.write(b"\0" * (-out.tell() % ALIGN))


def _checksum(out) -> str:
    out.seek(HEADER_BYTES)
    return _digest_rest(out)


def _sync_folder(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- the id lookup (while building)
class IdLookup:
    """Image id -> ShardSet position, as arrays: the ids' utf-8 bytes end to end with their offsets, and
    their 64-bit hashes sorted (a hash match is confirmed on the bytes, so collisions cannot mislead).
    Where an id is in several shards the last one wins, as a dict built in order would have it."""

    def __init__(self, shards: ShardSet):
        n = len(shards)
        self.hashes = np.empty(n, dtype=np.uint64)
        self.starts = np.zeros(n + 1, dtype=np.int64)
        blob, i, at = bytearray(), 0, 0
        for s in shards.shards:
            for key in s.keys():
                b = key.encode("utf-8")
                self.hashes[i] = xxhash.xxh3_64_intdigest(b)
                blob += b
                at += len(b)
                i += 1
                self.starts[i] = at
        if i != n:
            raise ShardError(f"{shards.shards[0].path}, ...: {i} ids for {n} records; a shard changed while read")
        self.blob = bytes(blob)
        self.order = np.argsort(self.hashes, kind="stable")
        self.sorted = self.hashes[self.order]

    def find(self, ids: list[str]) -> np.ndarray:
        """Each id's ShardSet position, -1 where no shard has it."""
        enc = [i.encode("utf-8", "surrogatepass") for i in ids]
        h = np.fromiter((xxhash.xxh3_64_intdigest(b) for b in enc), np.uint64, len(enc))
        last = np.searchsorted(self.sorted, h, side="right") - 1  # the last entry of each hash's run
        out = np.full(len(enc), -1, dtype=np.int64)
        blob, starts, order, srt = self.blob, self.starts, self.order, self.sorted
        for j in np.flatnonzero((last >= 0) & (srt[np.maximum(last, 0)] == h)).tolist():
            k, want, b = int(last[j]), h[j], enc[j]
            while k >= 0 and srt[k] == want:  # usually once; more only for a collision or a repeated id
                p = int(order[k])
                if blob[starts[p]:starts[p + 1]] == b:
                    out[j] = max(out[j], p)
                k -= 1
        return out

    def sorted_by_id(self, positions: np.ndarray) -> np.ndarray:
        """positions ordered by their ids' bytes (utf-8 byte order is code point order, so this is the order
        of sorted(str)), via a fixed-width byte array of just these ids."""
        if len(positions) == 0:
            return positions.astype(np.int64)
        lens = self.starts[positions + 1] - self.starts[positions]
        width = int(lens.max())
        keys = np.zeros((len(positions), width), dtype=np.uint8)
        src = np.frombuffer(self.blob, dtype=np.uint8)
        cols = np.arange(width)
        step = 1 << 16
        for a in range(0, len(positions), step):
            p, n = positions[a:a + step], lens[a:a + step]
            idx = self.starts[p][:, None] + cols[None]
            inside = cols[None] < n[:, None]
            keys[a:a + len(p)] = np.where(inside, src[np.minimum(idx, len(src) - 1)], 0)
        # ids hold no NUL, so zero padding sorts a prefix first, as str comparison does
        return positions[np.argsort(keys.view(f"S{width}").ravel(), kind="stable")].astype(np.int64)
