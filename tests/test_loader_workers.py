"""Loader workers (issue 23): batches in each worker's reused shared buffers (data.WorkerRing), put back
together in the main process (data.Receiver), equal to the in-process batches; a buffer is reused only
once nothing in the main process refers to its batch; a bounded number of buffers over many batches."""

import itertools

import numpy as np
import pytest
import torch
from helpers import LOADER_TINY as TINY
from train_synth import write_dataset

from regionbert.train.config import load_config
from regionbert.train.data import Loader, WorkerRing, collate
from regionbert.train.run import build_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("workers")
    return write_dataset(str(folder / "d"), n_train=120, n_val=0, feature_dim=16, min_boxes=0, max_boxes=30)


def _cfg(data, *extra):
    return load_config(None, [f"data.{k}={v}" for k, v in data.items()] + TINY + list(extra))


def _same(a: dict, b: dict) -> bool:
    tensors = [k for k in a if torch.is_tensor(a[k])]
    assert tensors == [k for k in b if torch.is_tensor(b[k])]
    return all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in tensors) and \
        all(a[k] == b[k] for k in a if not torch.is_tensor(a[k]))


@pytest.mark.parametrize("masking", ["conditional", "joint"])
def test_worker_batches_equal_the_in_process_batches(data, masking):
    cfg = _cfg(data, f"tasks.masking={masking}")
    _, _, _, ref = build_data(cfg, None, num_workers=0)
    for workers in (1, 2):
        _, _, _, loader = build_data(cfg, None, num_workers=workers)
        tasks = set()
        for a, b in itertools.islice(zip(ref, loader, strict=True), 60):
            assert b["features"].is_shared() and b["features"].dtype == torch.float16
            assert _same(a, b)
            tasks.add(a["task"])
        assert tasks == {"mlm", "mrfr", "mrc", "mrc_kl", "itm"}


def test_a_worker_reuses_a_bounded_number_of_shared_buffers(data):
    # before: every batch a fresh shared buffer per field (the main process received 3+ new ones per batch)
    cfg = _cfg(data)
    for workers in (1, 2):
        _, _, _, loader = build_data(cfg, None, num_workers=workers)
        receiver = loader.receiver
        counts = []
        for i, batch in enumerate(itertools.islice(loader, 200)):
            assert batch["region_mask"].shape == batch["features"].shape[:2]
            tensors = [v for v in batch.values() if torch.is_tensor(v)]
            assert len(tensors) == 11 and len({t.untyped_storage().data_ptr() for t in tensors}) == 1  # one buffer
            if i in (99, 199):
                counts.append(receiver.received)
        slots = 8  # build_data: prefetch_factor + 4
        assert counts[0] <= workers * slots * 3  # ring buffers (grown at most a few times each)
        assert counts[1] - counts[0] <= workers * 2  # and after that hardly any new one
        assert len(receiver.buffers) <= workers * slots
        assert len(receiver.held) <= 2  # slots are handed back as batches are dropped


def test_a_batch_still_held_is_never_overwritten(data):
    cfg = _cfg(data)
    _, _, _, ref = build_data(cfg, None, num_workers=0)
    expected = list(itertools.islice(ref, 60))
    _, _, _, loader = build_data(cfg, None, num_workers=1)
    it = iter(loader)
    held = [next(it) for _ in range(20)]  # more batches than the ring has slots: later ones get their own buffer
    views = [b["features"][:1] for b in itertools.islice(it, 10)]  # a view alone keeps its batch's buffer
    for i, b in enumerate(itertools.islice(it, 30)):  # the worker keeps filling (reused) buffers meanwhile
        assert _same(b, expected[30 + i])
    for b, e in zip(held, expected, strict=False):
        assert _same(b, e)
    for v, e in zip(views, expected[20:30], strict=True):
        assert torch.equal(v, e["features"][:1])
    assert loader.receiver.held  # the held batches' slots are not free


def test_stream_continues_exactly_after_batches_are_released(data):
    cfg = _cfg(data)
    _, _, _, ref = build_data(cfg, None, num_workers=0)
    expected = list(itertools.islice(ref, 80))
    _, _, _, loader = build_data(cfg, None, num_workers=2)
    got = list(itertools.islice(loader, 25))  # all kept: the ring runs out, buffers of their own follow
    assert all(_same(b, e) for b, e in zip(got, expected, strict=False))
    del got
    for i, b in enumerate(itertools.islice(loader, 80)):  # a fresh iterator: the same stream from its start
        assert _same(b, expected[i])
        del b


def test_ring_marks_slots_busy_and_reuses_free_ones():
    ring = WorkerRing(3)
    a = ring.arena(1000)
    b = ring.arena(1000)
    assert (a.slot, b.slot) == (0, 1) and a.send and b.send and ring.flags[:3].tolist() == [1, 1, 0]
    t = a.array((10, 3), np.float16)
    u = a.array((5,), np.int64)
    assert t.ctypes.data % 64 == 0 == u.ctypes.data % 64 and u.ctypes.data - t.ctypes.data == 64
    assert t.ctypes.data == a.storage.data_ptr() and (t.shape, t.dtype, u.shape, u.dtype) == \
        ((10, 3), np.float16, (5,), np.int64)
    ring.flags[0] = 0  # the main process consumed slot 0's batch
    again = ring.arena(900)
    assert again.slot == 0 and not again.send and again.storage is a.storage  # reused, not sent again
    ring.arena(10)
    extra = ring.arena(10)  # every slot busy: a buffer of its own
    assert extra.slot == -1 and extra.send
    ring.flags[1] = 0
    grown = ring.arena(5000)  # too small: replaced (and sent)
    assert grown.slot == 1 and grown.send and grown.storage.nbytes() >= 5000
    assert ring.allocated == 5
    with pytest.raises(RuntimeError, match="too small"):
        grown.array((8000,), np.uint8)


def test_collate_in_process_takes_the_masked_arrays_as_they_are(data):
    _, ds, _, loader = build_data(_cfg(data, 'tasks.mix={"mlm":1}'), None)
    keys = next(iter(loader.batch_sampler))
    samples = ds.__getitems__(keys)
    batch = collate(samples)
    made = samples[0]["_rows"][0]
    assert np.shares_memory(batch["input_ids"].numpy(), made["_input_ids"])  # no second padding pass
    assert np.shares_memory(batch["region_mask"].numpy(), made["_region_mask"])
    edited = collate([{**s, "input_ids": s["input_ids"] + 0} for s in samples])  # a copy: the general path
    assert torch.equal(edited["input_ids"], batch["input_ids"])


def test_buffers_of_workers_that_are_gone_are_let_go(data):
    # a loader without persistent workers starts new workers (new rings) for each pass over it
    _, ds, _, ref = build_data(_cfg(data), None, num_workers=0)
    expected = list(itertools.islice(ref, 12))
    loader = Loader(ds, batch_sampler=ref.batch_sampler, collate_fn=collate, num_workers=1)
    for _ in range(3):
        got = list(itertools.islice(loader, 12))
        assert all(_same(b, e) for b, e in zip(got, expected, strict=True))
        kept = got[-1]
        del got
    assert len(loader.receiver.buffers) <= 8 + 1  # the last pass's ring and the batch still held
    assert torch.equal(kept["features"], expected[-1]["features"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_worker_buffers_are_pinned_once_and_copied_to_the_device_as_they_are(data):
    from regionbert.train.data import DeviceFeed
    cfg = _cfg(data)
    _, _, _, ref = build_data(cfg, None, num_workers=0)
    _, _, _, loader = build_data(cfg, None, num_workers=2)
    assert not loader.pin_memory and loader.receiver.pin  # no pinned copy per batch: the buffers are pinned
    feed, host = DeviceFeed(loader, "cuda"), iter(ref)
    for _ in range(30):
        batch, _ = feed.next()
        expected = next(host)
        assert torch.equal(batch["features"].cpu(), expected["features"].float())
        assert torch.equal(batch["input_ids"].cpu(), expected["input_ids"])
        feed.preload()
    assert loader.receiver._registered and loader.receiver.received <= 2 * 8 * 3
