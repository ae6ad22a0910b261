"""Pairs as it was before issue 24 (a dict of every image id, one array per caption), kept verbatim as a
reference: tests/test_captions_table.py checks that the captions table gives the same pairs, batches and
losses."""

from __future__ import annotations

import os

import numpy as np

from regionbert.train.text import read_manifest


class LegacyPairs:
    """Captions joined to shard records: pair p is (tokens[p], image[p]); images index `pool`."""

    def __init__(self, shards, manifest, text, split=None, max_regions: int = 100, cache=None):
        df = read_manifest(manifest, split)
        position = {image_id: i for i, image_id in enumerate(shards.keys())}
        ids = df["image_id"].tolist()
        missing = [(row, i) for row, i in enumerate(ids) if i not in position]
        if missing:
            shown = ", ".join(f"row {r}: {i!r}" for r, i in missing[:5])
            raise KeyError(f"{os.fspath(manifest)}: {len(missing)} caption(s) name images that are in no shard "
                           f"({shown}{', ...' if len(missing) > 5 else ''})")
        names, self.image = np.unique(np.array(ids, dtype=object), return_inverse=True)
        self.pool = np.array([position[n] for n in names], dtype=np.int64)  # image -> ShardSet index
        self.image_ids = list(names)
        self.tokens = text.encode(df["caption"].tolist())
        self.num_boxes = np.minimum(shards.box_counts()[self.pool], max_regions).astype(np.int64)
        self.lengths = np.array([len(t) for t in self.tokens]) + self.num_boxes[self.image]  # text + regions

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def num_images(self) -> int:
        return len(self.pool)
