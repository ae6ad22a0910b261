"""The loader's queues (issue 23): DirectQueue writes a message in the calling thread while the pipe has room
for it (no feeder thread woken per batch: keys to a worker, the batch back), falls back to multiprocessing's
feeder thread for good where a message does not fit, never blocking the caller and keeping a writer's order."""

import itertools
import queue
import threading

import pytest
import torch
from helpers import LOADER_TINY as TINY
from train_synth import write_dataset

from regionbert.train.config import load_config
from regionbert.train.data import DirectQueue, direct_context
from regionbert.train.run import build_data


def _feeders() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name == "QueueFeederThread"]


def _get_all(q, n: int) -> list:
    return [q.get(timeout=60) for _ in range(n)]


def test_small_messages_are_written_by_the_caller():
    q = direct_context().Queue()
    assert isinstance(q, DirectQueue)
    for _ in range(3):
        for i in range(10):  # ~10 KB unread: room for more, however the pipe's pages are filled
            q.put(("keys", i, b"x" * 1000))
        assert q._thread is None and q._direct  # no feeder thread was started for them
        assert _get_all(q, 10) == [("keys", i, b"x" * 1000) for i in range(10)]
    with pytest.raises(queue.Empty):  # the poll kept for the queue: nothing there, at once
        q.get(block=False)
    with pytest.raises(queue.Empty):
        q.get(timeout=0.01)
    q.close()
    q.join_thread()


def test_a_full_pipe_never_blocks_the_writer_and_order_is_kept():
    # nothing reads while 2,000 messages (~2 MB, 30x a pipe) are put: a write into the full pipe would block
    # the caller for good; each put that does not fit goes to the feeder thread, and every later one too
    q = direct_context().Queue()
    done = []
    writer = threading.Thread(target=lambda: [q.put((i, b"y" * 1000)) for i in range(2000)] and done.append(1),
                              daemon=True)
    writer.start()
    writer.join(60)
    assert done, "put blocked on a full pipe"
    assert not q._direct and q._thread is not None  # fell back to the feeder thread, for good
    assert [i for i, _ in _get_all(q, 2000)] == list(range(2000))  # in the order put
    big = b"z" * (1 << 20)  # larger than any pipe: through the feeder thread at once
    q2 = direct_context().Queue()
    q2.put(big)
    q2.put("after")
    assert not q2._direct and q2.get(timeout=60) == big and q2.get(timeout=60) == "after"
    for x in (q, q2):
        x.close()
        x.join_thread()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_messages_cross_processes_both_ways(method):
    ctx = direct_context(method)
    to_child, back = ctx.Queue(), ctx.Queue()
    child = ctx.Process(target=_echo, args=(to_child, back))
    child.start()
    try:
        for i in range(20):
            to_child.put((i, "keys" * i))
        to_child.put(None)
        assert _get_all(back, 21) == [(i, "keys" * i, "done") for i in range(20)] + ["bye"]
    finally:
        child.join(60)
    assert child.exitcode == 0 and to_child._thread is None


def _echo(inbox, outbox):
    """A child: sends every message back until None (a test's other process)."""
    while (m := inbox.get(timeout=60)) is not None:
        outbox.put((*m, "done"))
    outbox.put("bye")
    outbox.close()
    outbox.join_thread()


def test_the_worker_loader_runs_without_feeder_threads(tmp_path):
    # before: the main process woke a feeder thread per batch to pickle and write its keys (one per worker)
    data = write_dataset(str(tmp_path / "d"), n_train=80, n_val=0, feature_dim=16, min_boxes=0, max_boxes=30)
    cfg = load_config(None, [f"data.{k}={v}" for k, v in data.items()] + TINY)
    _, _, _, ref = build_data(cfg, None, num_workers=0)
    _, _, _, loader = build_data(cfg, None, num_workers=2)
    before = len(_feeders())
    for a, b in itertools.islice(zip(ref, loader, strict=True), 30):
        assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k]))
    assert len(_feeders()) == before
    assert isinstance(loader._iterator._worker_result_queue, DirectQueue)
    assert all(isinstance(q, DirectQueue) and q._direct for q in loader._iterator._index_queues)
