import pytest
import torch

from regionbert.data.synth import write_synthetic_shard


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """A test that sets torch's thread count leaves it as it found it: later tests compare what they run in
    this process with what a subprocess runs at the default count (a random detector's calibrated norms,
    so its weights digest and its boxes, differ in the last bits between 1 and 2 threads)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def small_shard(tmp_path):
    """A complete 40-record synthetic shard with 64-dim features."""
    path = str(tmp_path / "shard-000")
    write_synthetic_shard(path, 40, feature_dim=64, min_boxes=0, max_boxes=20, seed=1)
    return path
