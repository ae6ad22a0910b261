"""Checkpoints: weights, optimizer and schedule state, the step, and the resolved config.

Saved atomically (a crash mid-save leaves the previous checkpoint), loaded with weights_only=True:
a checkpoint holds tensors and plain values, and loading one never unpickles code.
"""

from __future__ import annotations

import json
import os

import torch


def save_checkpoint(path: str, model, optimizer=None, scheduler=None, step: int = 0, config: dict | None = None,
                    **extra) -> None:
    state = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "step": int(step),
        "config": json.loads(json.dumps(config or {})),  # plain dicts, lists and numbers only
        **extra,
    }
    tmp = f"{path}.tmp"
    torch.save(state, tmp)
    os.replace(tmp, path)


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
