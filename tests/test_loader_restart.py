"""A loader whose workers persist, iterated again and again, keeps reusing its workers' ring buffers (issue 23).

Each new pass makes torch read and drop the batches the workers had prefetched for the pass before
(DataLoader's _reset). Those batches never reached data.Loader's Receiver, so their ring slots stayed busy
for good: by the third pass every slot was lost and every batch came in a fresh shared buffer again, as
before the ring existed. Loader now receives the dropped batches, and their slots are freed.
"""

import itertools

import pytest
import torch
from train_synth import write_dataset

from regionbert.train.config import load_config
from regionbert.train.run import build_data

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
        "model.max_text_len=24", "data.token_budget=600", "data.num_workers=0", "data.eval_split=null",
        "run.device=cpu", 'tasks.mix={"mlm":1,"mrfr":1,"mrc":1,"mrc_kl":1,"itm":1}', "data.split=null"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("restart")
    return write_dataset(str(folder / "d"), n_train=120, n_val=0, feature_dim=16, min_boxes=0, max_boxes=30)


@pytest.mark.parametrize("workers", [1, 2])
def test_passes_over_a_persistent_loader_reuse_the_ring(data, workers):
    cfg = load_config(None, [f"data.{k}={v}" for k, v in data.items()] + TINY)
    _, _, _, ref = build_data(cfg, None, num_workers=0)
    expected = list(itertools.islice(ref, 25))
    _, _, _, loader = build_data(cfg, None, num_workers=workers)
    assert loader.persistent_workers and loader.prefetch_factor == 4
    received = []
    for _ in range(5):  # each pass stops early: the workers have batches prefetched that torch then drops
        for want, got in zip(expected, itertools.islice(loader, 25), strict=True):
            tensors = [k for k in want if torch.is_tensor(want[k])]
            assert all(torch.equal(want[k], got[k]) for k in tensors)  # a new pass starts over, same batches
            del got
        received.append(loader.receiver.received)
    slots = 8  # build_data: prefetch_factor + 4 per worker
    assert received[0] <= workers * slots
    # before: from the third pass on every batch was a fresh buffer (25 more per pass); now a few at most
    assert received[-1] - received[0] <= workers * 2, received
    assert len(loader.receiver.held) <= 2  # (the last batches: freed when the next arrives)
