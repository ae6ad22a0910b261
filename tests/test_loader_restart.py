"""A loader whose workers persist, iterated again and again, keeps reusing its workers' ring buffers (issue 23).

Each new pass makes torch read and drop the batches the workers had prefetched for the pass before
(DataLoader's _reset). Those batches never reached data.Loader's Receiver, so their ring slots stayed busy
for good: by the third pass every slot was lost and every batch came in a fresh shared buffer again, as
before the ring existed. Loader now receives the dropped batches, and their slots are freed.
"""

import itertools
import time

import pytest
import torch
from helpers import LOADER_TINY as TINY
from train_synth import write_dataset

from regionbert.train.config import load_config
from regionbert.train.data import Loader, collate
from regionbert.train.run import build_data


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
    # before: from the third pass on every batch was a fresh buffer (25 more per pass); now the ring's slots,
    # each made once and grown at most a few times, whichever pass first needs it (that depends on timing)
    assert received[-1] <= workers * (slots + 2), received
    assert len(loader.receiver.held) <= 2  # (the last batches: freed when the next arrives)


class _SecondFirst(torch.utils.data.Dataset):
    """A PairDataset whose first batch of a pass (torch sends it to worker 0) is made only once the second
    (worker 1's) has been: the second batch reaches the main process before its turn in every pass, and torch
    keeps it back (DataLoader's _task_info). Shared counters, no timing: worker 0 waits for worker 1's count."""

    def __init__(self, dataset, first: list, second: list):
        self.dataset, self.first, self.second = dataset, first, second
        self.made = torch.zeros(2, dtype=torch.int64).share_memory_()  # [firsts made, seconds made]

    def __len__(self):
        return len(self.dataset)

    def __getitems__(self, keys):
        if keys == self.first:
            deadline = time.monotonic() + 60  # (a safety net against a hang, not a timing assumption)
            while self.made[1] <= self.made[0] and time.monotonic() < deadline:
                time.sleep(0.001)
            self.made[0] += 1
        out = self.dataset.__getitems__(keys)
        if keys == self.second:
            self.made[1] += 1
        return out


def test_a_batch_read_before_its_turn_frees_its_slot_when_a_new_pass_starts(data):
    cfg = load_config(None, [f"data.{k}={v}" for k, v in data.items()] + TINY)
    _, ds, _, ref = build_data(cfg, None, num_workers=0)
    first, second = itertools.islice(iter(ref.batch_sampler), 2)
    loader = Loader(_SecondFirst(ds, first, second), batch_sampler=ref.batch_sampler, collate_fn=collate,
                    num_workers=2, persistent_workers=True, prefetch_factor=4)
    received = []
    for _ in range(14):  # each pass takes its first batch only: the second, read ahead of it, is left behind
        batch = next(iter(loader))
        assert batch["pairs"].tolist() == [k[1] for k in first]
        del batch
        received.append(loader.receiver.received)
    assert int(loader.dataset.made[0]) == 14
    # before: each pass left worker 1's ring a slot short for good; from the 9th on, every batch it made came
    # in a buffer of its own (40 buffers received over the 14 passes; or a KeyError, where the batch left
    # behind was the first of its worker, the one carrying the ring's busy flags). Now every batch comes in
    # a ring slot (a slot may still be made larger once for a larger batch)
    assert loader.receiver.single == 0, received
    assert received[-1] <= 2 * ds.ring_slots + 4, received
