"""How a batch's keys reach a loader worker (issue 23): TaskSampler yields each batch's keys as BatchKeys (the
task, the pairs' and shown images' arrays, the seed's common prefix), a sequence equal to the list of
(task, pair, other image, seed) tuples it stands for, pickled as two byte strings instead of 100+ tuples."""

import itertools
import pickle

import numpy as np
import pytest
from helpers import LOADER_TINY as TINY
from train_synth import write_dataset

from regionbert.train.config import load_config
from regionbert.train.data import BatchKeys
from regionbert.train.run import build_data


@pytest.fixture(scope="module")
def sampler(tmp_path_factory):
    folder = tmp_path_factory.mktemp("keys")
    data = write_dataset(str(folder / "d"), n_train=120, n_val=0, feature_dim=16, min_boxes=0, max_boxes=30)
    cfg = load_config(None, [f"data.{k}={v}" for k, v in data.items()] + TINY)
    _, dataset, _, loader = build_data(cfg, None, num_workers=0)
    return loader.batch_sampler, dataset


def _as_tuples(keys) -> list[tuple]:
    """The keys as the sampler gave them before BatchKeys: a list of plain tuples of Python ints."""
    return [(t, int(p), int(o), tuple(int(x) for x in s)) for t, p, o, s in keys]


def test_batch_keys_are_the_tuples_they_stand_for_and_pickle_small(sampler):
    sampler, _ = sampler
    tasks = set()
    for keys in itertools.islice(iter(sampler), 60):
        assert isinstance(keys, BatchKeys)
        tuples = _as_tuples(keys)
        tasks.add(keys.task)
        assert keys == tuples and tuples == keys and list(keys) == tuples and len(keys) == len(tuples)
        assert all(type(x) is int for k in keys for x in (k[1], k[2], *k[3]))  # Python ints, as before
        assert keys[0] == tuples[0] and keys[-1] == tuples[-1] and keys[1:3] == tuples[1:3]
        with pytest.raises(IndexError):
            keys[len(tuples)]
        wire = pickle.dumps(keys, protocol=pickle.HIGHEST_PROTOCOL)
        # the arrays' bytes and a constant; before: the tuples themselves, 8 objects and 16+ bytes a key
        # (~25 us a batch to pickle and unpickle at 117 keys)
        assert len(wire) <= 120 + 8 * len(keys)
        assert len(keys) < 16 or len(wire) < len(pickle.dumps(tuples, protocol=pickle.HIGHEST_PROTOCOL))
        again = pickle.loads(wire)
        assert isinstance(again, BatchKeys) and again == tuples and again.task == keys.task
    assert tasks == {"mlm", "mrfr", "mrc", "mrc_kl", "itm"}  # ITM's stream (negatives) included
    assert keys != tuples[:-1] and keys != [*tuples[:-1], ("mlm", -5, -1, (0,))] and keys != 3


def test_the_dataset_makes_the_same_samples_from_batch_keys_as_from_tuples(sampler):
    sampler, dataset = sampler
    for keys in itertools.islice(iter(sampler), 0, 40, 4):  # ITM batches with negatives among them
        a = dataset.__getitems__(pickle.loads(pickle.dumps(keys)))
        b = dataset.__getitems__(_as_tuples(keys))
        for x, y in zip(a, b, strict=True):
            assert (x["task"], x["pair"], x["image"], x["itm_label"], x["id"]) == \
                (y["task"], y["pair"], y["image"], y["itm_label"], y["id"])
            for k in ("features", "locations", "class_probs", "input_ids", "mlm_labels", "region_mask"):
                assert np.array_equal(x[k], y[k])
