"""Which images to read (a folder or a manifest), how to split them between jobs, and how to decode
any image file into RGB without crashing on the odd ones."""

from __future__ import annotations

import json
import os
import stat
import warnings
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm"}
PATH_COLUMNS = ("path", "image_path", "file", "filename", "image", "file_name")
ID_COLUMNS = ("id", "image_id", "img_id")
DEFAULT_MAX_PIXELS = 89_478_485  # Pillow's decompression-bomb limit


@dataclass(frozen=True)
class ImageItem:
    id: str
    path: str


class ImageError(Exception):
    """An image that cannot be extracted; the reason goes to the failures file."""


def image_id(path: str, root: str) -> str:
    """The default id: the path relative to the root, without extension, with / separators."""
    rel = os.path.relpath(path, root)
    return os.path.splitext(rel)[0].replace(os.sep, "/")


def list_folder(root: str, allow_outside_root: bool = False) -> list[ImageItem]:
    """Every file with an image extension under root (recursive, symlinked folders not followed), sorted
    by path. A symlinked file that resolves outside root is refused unless allow_outside_root."""
    root = os.path.abspath(root)
    real_root = os.path.realpath(root)
    items = []
    for d, dirs, files in os.walk(root):
        dirs.sort()
        for f in sorted(files):
            if os.path.splitext(f)[1].lower() in IMAGE_EXTENSIONS:
                p = os.path.join(d, f)
                try:
                    regular = stat.S_ISREG(os.stat(p).st_mode)  # stat opens nothing: a FIFO cannot block here
                except OSError:  # a dangling link: decode_image says "file not found" for it
                    regular = True
                if not regular:
                    warnings.warn(f"{p}: not a regular file (a FIFO, socket or device named like an image); "
                                  "skipped", stacklevel=2)
                    continue
                real = os.path.realpath(p)
                if not allow_outside_root and os.path.commonpath([real_root, real]) != real_root:
                    raise ValueError(f"{p}: a symlink to {real}, outside the image root {root} (pass "
                                     "--allow-outside-root if that is intended)")
                items.append(ImageItem(image_id(p, root), p))
    return _unique(items, root)


def _read_table(path: str) -> pd.DataFrame:
    ext = os.path.splitext(path)[1].lower()
    try:
        if ext == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        if ext == ".tsv":
            return pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False)
        if ext in (".jsonl", ".ndjson"):
            return pd.read_json(path, lines=True, dtype=False)
        if ext in (".parquet", ".pq"):
            return pd.read_parquet(path)
    except (ValueError, OSError) as e:
        raise ValueError(f"{path}: cannot read manifest: {e}") from None
    raise ValueError(f"{path}: manifest must be .csv, .tsv, .jsonl or .parquet")


def read_manifest(path: str, root: str | None = None, path_column: str | None = None,
                  id_column: str | None = None, allow_outside_root: bool = False) -> list[ImageItem]:
    """Rows of (image path, optional id). Relative paths are under root (default: the manifest's
    folder); a path that resolves outside root is refused unless allow_outside_root."""
    df = _read_table(path)
    root = os.path.realpath(root or os.path.dirname(os.path.abspath(path)))
    path_column = path_column or next((c for c in PATH_COLUMNS if c in df.columns), None)
    if path_column not in df.columns:
        raise ValueError(f"{path}: no image path column (looked for {path_column or ', '.join(PATH_COLUMNS)}; "
                         f"columns are {', '.join(map(str, df.columns))})")
    if id_column is None:
        id_column = next((c for c in ID_COLUMNS if c in df.columns), None)
    elif id_column not in df.columns:
        raise ValueError(f"{path}: no id column {id_column!r}")
    items = []
    for row, rec in enumerate(df.to_dict("records"), start=1):
        p = rec[path_column]
        if not isinstance(p, str) or not p.strip():
            raise ValueError(f"{path}, row {row}: empty image path")
        full = os.path.realpath(os.path.join(root, p))
        if not allow_outside_root and os.path.commonpath([root, full]) != root:
            raise ValueError(f"{path}, row {row}: {p!r} resolves outside the image root {root} "
                             "(pass --allow-outside-root if that is intended)")
        iid = _id_text(rec[id_column]) if id_column else ""
        items.append(ImageItem(iid or image_id(full, root), full))
    return _unique(items, path)


def _id_text(value) -> str:
    """A manifest id cell as text: 42 and 42.0 (pandas' float for an int column with gaps) are "42";
    a missing cell is "" (the path then gives the id)."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value).strip()


def _unique(items: list[ImageItem], source: str) -> list[ImageItem]:
    seen: dict[str, str] = {}
    for it in items:
        if it.id in seen:
            raise ValueError(f"{source}: image id {it.id!r} is used by both {seen[it.id]} and {it.path}")
        seen[it.id] = it.path
    return items


def read_boxes(path: str) -> dict[str, np.ndarray]:
    """User boxes: JSONL rows {"id": ..., "boxes": [[x1, y1, x2, y2], ...]} in original-image pixels."""
    out = {}
    with open(path) as f:
        for row, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                iid = str(rec.get("id", rec.get("image_id")))
                boxes = np.asarray(rec["boxes"], dtype=np.float32).reshape(-1, 4)
            except (ValueError, KeyError, TypeError, AttributeError) as e:
                raise ValueError(f"{path}, row {row}: need {{\"id\": ..., \"boxes\": [[x1, y1, x2, y2], ...]}}: "
                                 f"{e}") from None
            if len(boxes) == 0:
                raise ValueError(f"{path}, row {row}: image {iid!r} has no boxes")
            out[iid] = boxes
    return out


def check_boxes(boxes: np.ndarray, width: int, height: int) -> None:
    x1, y1, x2, y2 = boxes.T
    if not np.isfinite(boxes).all() or (x1 >= x2).any() or (y1 >= y2).any():
        raise ImageError("given boxes must be finite xyxy with x1 < x2 and y1 < y2")
    if (x1 < 0).any() or (y1 < 0).any() or (x2 > width).any() or (y2 > height).any():
        raise ImageError(f"given boxes fall outside the {width}x{height} image")


def partition(items: list, num_shards: int, shard_index: int) -> list:
    """Contiguous, even split: shard i gets items [i*L//n, (i+1)*L//n) (sizes differ by at most 1)."""
    if not 0 <= shard_index < num_shards:
        raise ValueError(f"shard index {shard_index} is not in [0, {num_shards})")
    n = len(items)
    return items[shard_index * n // num_shards:(shard_index + 1) * n // num_shards]


def shard_from_env() -> tuple[int, int] | None:
    """(num_shards, shard_index) from a SLURM array job or a torchrun launch, if present."""
    env = os.environ
    if "SLURM_ARRAY_TASK_ID" in env and "SLURM_ARRAY_TASK_COUNT" in env:
        first = int(env.get("SLURM_ARRAY_TASK_MIN", 0))
        return int(env["SLURM_ARRAY_TASK_COUNT"]), int(env["SLURM_ARRAY_TASK_ID"]) - first
    if "WORLD_SIZE" in env and "RANK" in env:
        return int(env["WORLD_SIZE"]), int(env["RANK"])
    return None


def _open_regular(path: str):
    """The file, opened for reading only if it is a regular file. O_NONBLOCK: opening a FIFO named *.png
    returns at once instead of waiting for a writer (before, it hung the job forever, holding the shard's
    writer lock), and fstat on what was opened leaves no gap for a swap between a check and the open."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ImageError(f"not a regular file ({_KINDS.get(stat.S_IFMT(mode), 'special file')}); not opened")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket", stat.S_IFCHR: "a character device",
          stat.S_IFBLK: "a block device", stat.S_IFDIR: "a folder"}


def decode_image(path: str, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Any image file -> (H, W, 3) uint8 RGB, upright (EXIF orientation applied). Raises ImageError."""
    Image.MAX_IMAGE_PIXELS = max_pixels  # Pillow's own bomb check follows our limit
    try:
        with warnings.catch_warnings(), _open_regular(path) as f:
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(f) as im:
                w, h = im.size
                if w * h > max_pixels:
                    raise ImageError(f"{w}x{h} = {w * h} pixels is past the limit of {max_pixels} "
                                     "(a decompression bomb?); raise --max-pixels if it is real")
                im = ImageOps.exif_transpose(im)
                return _to_rgb(im)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError("file not found") from None
    except UnidentifiedImageError:
        size = os.path.getsize(path) if os.path.exists(path) else 0
        raise ImageError("empty file" if size == 0 else "not an image Pillow can read") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageError(f"decompression bomb: {e}") from None
    except (OSError, SyntaxError, ValueError, TypeError, EOFError) as e:
        raise ImageError(f"cannot decode ({type(e).__name__}: {e})") from None


def _to_rgb(im: Image.Image) -> np.ndarray:
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        # 16-bit (and 32-bit integer) grey: scale to 8 bits instead of clipping at 255
        a = np.asarray(im, dtype=np.float64)
        gray = np.clip(a / 257.0, 0, 255).round().astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode == "F":
        a = np.asarray(im, dtype=np.float64)
        a = a * 255.0 if np.nanmax(a, initial=0) <= 1.0 else a
        gray = np.clip(np.nan_to_num(a), 0, 255).round().astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        # transparent pixels show their colour channels, as OpenCV-based extractors read them
        im = im.convert("RGBA")
    return np.array(im.convert("RGB"), dtype=np.uint8)


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """(H, W, 3) uint8 -> (3, H, W) float32 in [0, 1], what torchvision detectors take."""
    return torch.from_numpy(rgb).permute(2, 0, 1).float().div_(255.0)
