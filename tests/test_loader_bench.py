"""bench/bench_loader.py's worker measurement (issue 23): a timed pass starts and ends with every worker
idle, each batch asked of it done, so the workers' CPU between the two is exactly the timed number of
batches' work: the batches prefetch_factor x workers positions later in the stream than those consumed."""

import importlib.util
import itertools
import os
import sys

import pytest
from helpers import LOADER_TINY as TINY
from train_synth import write_dataset

from regionbert.train.config import load_config
from regionbert.train.run import build_data

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def bench():
    folder = os.path.join(HERE, "..", "bench")
    sys.path.insert(0, folder)  # (its own imports: gitcheckout, beside it)
    try:
        spec = importlib.util.spec_from_file_location("bench_loader", os.path.join(folder, "bench_loader.py"))
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(folder)
    return module


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    return write_dataset(str(folder / "d"), n_train=60, n_val=0, feature_dim=16, min_boxes=0, max_boxes=30)


@pytest.mark.parametrize("workers", [1, 2])
def test_worker_cpu_is_counted_over_the_batches_the_workers_made(bench, data, workers):
    cfg = load_config(None, [f"data.{k}={v}" for k, v in data.items()] + TINY)
    _, _, _, ref = build_data(cfg, None, num_workers=0)
    sizes = [len(keys) for keys in itertools.islice(iter(ref.batch_sampler), 40)]  # the stream's batch sizes
    _, _, _, loader = build_data(cfg, None, num_workers=workers)
    warm, batches, ahead = 5, 12, 4 * workers  # build_data's prefetch_factor: 4
    r = bench.worker_pass(loader, warm, batches)
    assert r["samples"] == sum(sizes[warm:warm + batches])
    assert r["worker_samples"] == sum(sizes[warm + ahead:warm + ahead + batches])
    assert r["worker_cpu_raw"] > 0 and r["worker_cpu"] == pytest.approx(
        r["worker_cpu_raw"] * r["samples"] / r["worker_samples"])


def test_a_process_cpu_time_counts_its_threads(bench):
    import threading
    before = bench.proc_cpu(os.getpid())
    spin = threading.Thread(target=lambda: sum(range(3_000_000)))
    spin.start()
    spin.join()
    assert bench.proc_cpu(os.getpid()) - before >= 0.01  # the thread's time, counted (not just the main thread's)
