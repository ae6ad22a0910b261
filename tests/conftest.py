import pytest

from regionbert.data.synth import write_synthetic_shard


@pytest.fixture
def small_shard(tmp_path):
    """A complete 40-record synthetic shard with 64-dim features."""
    path = str(tmp_path / "shard-000")
    write_synthetic_shard(path, 40, feature_dim=64, min_boxes=0, max_boxes=20, seed=1)
    return path
