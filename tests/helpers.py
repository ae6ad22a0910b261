"""Helpers shared by the tests."""

import numpy as np

from regionbert.data.synth import COCO_CLASSES

NUM_CLASSES = len(COCO_CLASSES)


def random_record(rng, n=7, dim=32, num_classes=NUM_CLASSES, width=640, height=480, attrs=0):
    """Writer arguments for one record with arbitrary (valid) content."""
    x1, y1 = rng.uniform(0, width - 1, n), rng.uniform(0, height - 1, n)
    x2, y2 = rng.uniform(x1, width), rng.uniform(y1, height)
    logits = rng.standard_normal((n, num_classes))
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    out = dict(width=width, height=height, boxes=np.stack([x1, y1, x2, y2], 1),
               features=rng.standard_normal((n, dim)).astype(np.float32), class_probs=probs)
    if attrs:
        a = rng.uniform(0, 1, (n, attrs))
        out["attr_probs"] = a / a.sum(1, keepdims=True)  # a distribution per box (the record rules)
    return out


def batches(dataset, keys, size=128, edit=None):
    """Collated batches of a PairDataset's keys, size at a time; edit(sample) first, if given."""
    from regionbert.train.data import collate

    for i in range(0, len(keys), size):
        samples = [dataset[k] for k in keys[i:i + size]]
        if edit:
            samples = [edit(s) for s in samples]
        yield collate(samples)


def negatives(pairs, seed=1):
    """For each pair, another image of the same split, drawn as ITM's negatives are (from any image)."""
    from regionbert.train.data import TaskSampler

    sampler = TaskSampler.__new__(TaskSampler)  # only its negative drawing, over the held-out images
    TaskSampler.__init__(sampler, None, pairs, {"itm": 1}, seed)
    return sampler.negatives(pairs.image, np.random.default_rng(seed))


# A writer that pauses after 10 of its 40 records until told to go on (a line on stdin): a real process
# holding the shard's writer lock (python -c PAUSED_WRITER SHARD).
PAUSED_WRITER = """
import sys
from regionbert.data.synth import write_synthetic_shard
done = [0]
def progress(n):
    done[0] += n
    if done[0] == 10:
        print("ready", flush=True)
        sys.stdin.readline()
write_synthetic_shard(sys.argv[1], 40, feature_dim=16, min_boxes=0, max_boxes=5, seed=3, progress=progress)
print("finished", flush=True)
"""


# a tiny model on tests/train_synth.py write_dataset's data, every task in the mix, no workers unless asked:
# the loader tests' settings
LOADER_TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
        "model.max_text_len=24", "data.token_budget=600", "data.num_workers=0", "data.eval_split=null",
        "run.device=cpu", 'tasks.mix={"mlm":1,"mrfr":1,"mrc":1,"mrc_kl":1,"itm":1}', "data.split=null"]
