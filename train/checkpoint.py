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
    """A checkpoint's contents, checked: the parts any checkpoint has, of the right kinds (ValueError naming
    the file and the part otherwise). `check_resumable` checks them against the model they are for."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: no checkpoint here")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # noqa: BLE001 - name the file whatever torch complains about
        raise ValueError(f"{path}: not a loadable regionbert checkpoint ({type(e).__name__}: {e})") from None
    missing = [k for k in ("model", "step", "config") if not isinstance(state, dict) or k not in state]
    if missing:
        raise ValueError(f"{path}: checkpoint lacks {missing}")
    problems = _part_problems(state)
    if problems:
        raise ValueError(f"{path}: damaged checkpoint: {'; '.join(problems)}")
    return state


def _is_int(v, lo: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= lo


def _part_problems(state: dict) -> list[str]:
    """What is wrong with the parts of a loaded checkpoint, on their own (kinds and ranges)."""
    out = []
    model = state["model"]
    if not isinstance(model, dict) or not model or not all(isinstance(k, str) and torch.is_tensor(v)
                                                           for k, v in model.items()):
        out.append("part 'model' is not a non-empty table of named tensors")
    else:
        bad = [k for k, v in model.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            out.append(f"part 'model' holds NaN or inf in {bad[:5]}")
    if not _is_int(state["step"]):
        out.append(f"part 'step' is {state['step']!r}, not an integer >= 0")
    if not isinstance(state["config"], dict):
        out.append("part 'config' is not a table")
    for k in ("optimizer", "scheduler", "scaler", "data"):
        if state.get(k) is not None and not isinstance(state[k], dict):
            out.append(f"part {k!r} is not a table")
    opt = state.get("optimizer")
    if isinstance(opt, dict) and not (isinstance(opt.get("state"), dict) and isinstance(opt.get("param_groups"), list)):
        out.append("part 'optimizer' lacks its 'state' and 'param_groups'")
    if isinstance(opt, dict) and "task_states" in opt and not (
            isinstance(opt["task_states"], dict) and all(isinstance(k, str) and isinstance(v, dict)
                                                         for k, v in opt["task_states"].items())):
        out.append("part 'optimizer' has 'task_states' that is not a table of task name -> state")
    sched = state.get("scheduler")
    if isinstance(sched, dict) and "last_epoch" in sched and not _is_int(sched["last_epoch"], -1):
        out.append(f"part 'scheduler' has last_epoch {sched['last_epoch']!r}")
    data = state.get("data")
    if isinstance(data, dict):
        for k in ("batches", "world_size"):
            if k in data and not _is_int(data[k], 0 if k == "batches" else 1):
                out.append(f"part 'data' has {k} = {data[k]!r}")
    rng = state.get("rng")
    if rng is not None and not (isinstance(rng, list) and all(isinstance(r, dict) and set(r) >= RNG_KEYS and
                                                              all(torch.is_tensor(t) for t in r.values())
                                                              for r in rng)):
        out.append(f"part 'rng' is not a list of RNG states with tensors {sorted(RNG_KEYS)}")
    return out


def check_resumable(path: str, state: dict, model, optimizer=None, scheduler=None) -> None:
    """Before resuming: the checkpoint has every part a run needs, and its tensors fit this model and
    optimizer. ValueError naming the checkpoint and the part (and the tensor) otherwise."""
    missing = [k for k in ("optimizer", "scheduler") if state.get(k) is None]
    if missing:
        raise ValueError(f"{path}: cannot resume from this checkpoint: it lacks {missing} (a run's checkpoints "
                         "have them)")
    want = model.state_dict()
    have = state["model"]
    problems = []
    if set(have) != set(want):
        lost, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
        problems.append(f"part 'model' lacks {lost[:5]}{'...' if len(lost) > 5 else ''} and has unknown "
                        f"{extra[:5]}{'...' if len(extra) > 5 else ''}")
    for k in sorted(set(have) & set(want)):
        if have[k].shape != want[k].shape:
            problems.append(f"part 'model' tensor {k!r} has shape {tuple(have[k].shape)}, the model's is "
                            f"{tuple(want[k].shape)}")
    if optimizer is not None and not problems:
        problems += _optimizer_problems(state["optimizer"], optimizer)
    if problems:
        raise ValueError(f"{path}: checkpoint does not fit this run: {'; '.join(problems[:8])}")


def _optimizer_problems(saved: dict, optimizer) -> list[str]:
    """The saved optimizer state against this run's optimizer: same groups, per-parameter state of the
    parameters' shapes (Adam's exp_avg, exp_avg_sq)."""
    groups = saved["param_groups"]
    mine = optimizer.state_dict()["param_groups"]
    sizes = [len(g.get("params", [])) if isinstance(g, dict) else -1 for g in groups]
    if sizes != [len(g["params"]) for g in mine]:
        return [f"part 'optimizer' has parameter groups of sizes {sizes}, this run's are "
                f"{[len(g['params']) for g in mine]}"]
    per_task = hasattr(optimizer, "use")
    if per_task != isinstance(saved.get("task_states"), dict):
        have, want = ("per task", "shared") if not per_task else ("shared", "per task")
        return [f"part 'optimizer' holds Adam's moments {have}, this run keeps them {want}: resume with "
                f"--set optim.task_state={'per_task' if have == 'per task' else 'shared'}"]
    params = [p for g in optimizer.param_groups for p in g["params"]]  # state_dict numbers them in this order
    out = []
    # shared: one state; per task: each task's (structure_problems checked they are tables)
    states = [saved["state"], *saved["task_states"].values()] if per_task else [saved["state"]]
    for i, s in (item for st in states for item in st.items()):
        if not (_is_int(i) and i < len(params) and isinstance(s, dict)):
            out.append(f"part 'optimizer' has state for parameter {i!r}, which does not exist")
            continue
        for name, t in s.items():
            if torch.is_tensor(t) and t.dim() and t.shape != params[i].shape:
                out.append(f"part 'optimizer' state {name!r} of parameter {i} has shape {tuple(t.shape)}, the "
                           f"parameter's is {tuple(params[i].shape)}")
            elif torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
                out.append(f"part 'optimizer' state {name!r} of parameter {i} holds NaN or inf")
    return out


RNG_KEYS = {"python", "python_gauss", "numpy", "numpy_gauss", "torch", "cuda"}

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
