"""The record rules are checked once per image for the whole loader (issue 23): the flags of the images
that passed are shared by the main process and every loader worker, so an image one worker checked is
read straight into its batch (read_into) by the others, not checked again by each."""

import itertools
import pickle

import numpy as np
import pytest
from helpers import LOADER_TINY as TINY
from train_synth import write_dataset

from regionbert.train.config import load_config
from regionbert.train.run import build_data


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("checks")
    return write_dataset(str(folder / "d"), n_train=60, n_val=0, feature_dim=16, min_boxes=0, max_boxes=30)


def _cfg(data):
    return load_config(None, [f"data.{k}={v}" for k, v in data.items()] + TINY)


@pytest.mark.parametrize("workers", [1, 2])
def test_images_checked_in_workers_are_checked_for_every_process(data, workers):
    _, ds, _, loader = build_data(_cfg(data), None, num_workers=workers)
    assert not ds._checked.any()
    shown = set()
    for batch in itertools.islice(loader, 12):
        shown.update(batch["images"].tolist())  # the image each sample showed (its own or an ITM negative)
        del batch
    # the main process read nothing itself: its flags are the workers' (before: each process had its own)
    assert shown and ds._checked[sorted(shown)].all()
    assert ds._checked.sum() == len(shown)


def test_a_pickled_dataset_shares_the_flags_it_was_made_with(data):
    # (a spawned worker gets the dataset pickled by multiprocessing's ForkingPickler: the same shared memory)
    from multiprocessing.reduction import ForkingPickler
    _, ds, _, _ = build_data(_cfg(data), None, num_workers=0)
    copy = pickle.loads(ForkingPickler.dumps(ds))
    copy._checked[3] = True
    assert ds._checked[3] and ds._checked.sum() == 1
    assert isinstance(copy._checked, np.ndarray) and len(copy._checked) == ds.pairs.num_images
