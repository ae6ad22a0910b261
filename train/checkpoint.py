"""Checkpoints: everything a run needs to continue exactly where it stopped.

    RUN/checkpoints/step-00005000.pt   model, optimizer, scheduler, loss scaler, step, the data position,
                                       every rank's RNG states (python, numpy, torch, cuda), the config
    RUN/checkpoint.pt                  the newest complete checkpoint (`--resume latest`): a hard link
                                       to the newest step file (a copy where links are not supported)

Writes are atomic: a checkpoint goes to a temporary file, is fsync'ed, and os.replace'd into place;
only then is RUN/checkpoint.pt replaced (the same way). A crash at any moment leaves checkpoint.pt a
complete checkpoint. The newest `keep` step files are kept (a disk full of them helps nobody).

Loading uses torch.load(weights_only=True): a checkpoint holds tensors and plain values, and loading
one never unpickles code. RNG states are stored as tensors for that reason.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil

import numpy as np
import torch

LATEST = "latest"
_NAME = re.compile(r"^step-(\d{8,})\.pt$")


def checkpoint_dir(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def checkpoint_path(run_dir: str, step: int) -> str:
    return os.path.join(checkpoint_dir(run_dir), f"step-{step:08d}.pt")


def _fsync_dir(folder: str) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems (and Windows) can't open a folder: the rename is still atomic
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str, write) -> None:
    """write(file object) into path.tmp, fsync, rename over path: readers see the old file or the new one."""
    tmp = f"{path}.tmp"
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def save_checkpoint(path: str, model, optimizer=None, scheduler=None, step: int = 0, config: dict | None = None,
                    **extra) -> None:
    """One checkpoint file, written atomically. extra: scaler, data position, rng, ... (plain values/tensors)."""
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "config": json.loads(json.dumps(config or {})),  # plain dicts, lists and numbers only
        **extra,
    }
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: torch.save(state, f))


def save_run_checkpoint(run_dir: str, step: int, keep: int = 2, **kwargs) -> str:
    """Save RUN/checkpoints/step-N.pt, make RUN/checkpoint.pt that checkpoint, drop all but the newest
    `keep` step files (0: keep all). Returns the step file's path."""
    path = checkpoint_path(run_dir, step)
    save_checkpoint(path, step=step, **kwargs)
    latest, tmp = os.path.join(run_dir, "checkpoint.pt"), os.path.join(run_dir, "checkpoint.pt.tmp")
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        os.link(path, tmp)  # no second copy on disk
    except OSError:
        with open(path, "rb") as src:
            atomic_write(tmp, lambda f: shutil.copyfileobj(src, f))
    os.replace(tmp, latest)
    _fsync_dir(run_dir)
    if keep > 0:
        for old in list_checkpoints(run_dir)[:-keep]:
            os.remove(old)
    return path


def list_checkpoints(run_dir: str) -> list[str]:
    """Complete checkpoint files of a run, oldest first (temporary files are not listed)."""
    folder = checkpoint_dir(run_dir)
    if not os.path.isdir(folder):
        return []
    names = sorted((int(m.group(1)), n) for n in os.listdir(folder) if (m := _NAME.match(n)))
    return [os.path.join(folder, n) for _, n in names]


def latest_checkpoint(run_dir: str) -> str | None:
    """RUN/checkpoint.pt, or None when the run has none yet."""
    path = os.path.join(run_dir, "checkpoint.pt")
    return path if os.path.isfile(path) else None


def resolve_resume(resume: str | None, run_dir: str) -> str | None:
    """--resume latest -> the run's newest checkpoint (None if it has none); --resume PATH -> PATH."""
    if not resume:
        return None
    if resume == LATEST:
        return latest_checkpoint(run_dir)
    if not os.path.isfile(resume):
        raise FileNotFoundError(f"{resume}: no checkpoint here (--resume takes 'latest' or a checkpoint file)")
    return resume


def load_checkpoint(path: str, map_location="cpu") -> dict:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no checkpoint here")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the file whatever torch complains about
        raise ValueError(f"{path}: not a loadable regionbert checkpoint ({type(e).__name__}: {e})") from None
    missing = [k for k in ("model", "step", "config") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing}")
    return state


# RNG states as tensors (weights_only loading accepts tensors, not numpy or tuples of Python objects).

def rng_state() -> dict:
    """This process's python, numpy, torch and (if any) CUDA generator states, as tensors."""
    version, mt, gauss = random.getstate()  # (3, 625 ints, None or float)
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    assert version == 3 and kind == "MT19937"
    return {
        "python": torch.tensor(mt, dtype=torch.int64),
        "python_gauss": torch.tensor([float("nan") if gauss is None else gauss], dtype=torch.float64),
        "numpy": torch.tensor([*keys.tolist(), pos, has_gauss], dtype=torch.int64),
        "numpy_gauss": torch.tensor([cached], dtype=torch.float64),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available() else torch.zeros(0, dtype=torch.uint8),
    }


def set_rng_state(s: dict) -> None:
    gauss = float(s["python_gauss"][0])
    random.setstate((3, tuple(int(x) for x in s["python"].tolist()), None if np.isnan(gauss) else gauss))
    n = s["numpy"].tolist()
    np.random.set_state(("MT19937", np.array(n[:624], dtype=np.uint32), int(n[624]), int(n[625]),
                         float(s["numpy_gauss"][0])))
    torch.set_rng_state(s["torch"].cpu())
    if torch.cuda.is_available() and s["cuda"].numel():
        torch.cuda.set_rng_state(s["cuda"].cpu())
