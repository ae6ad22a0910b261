"""A worker's batch in its ring buffer (issue 23): the worker fills numpy views of the buffer (Arena.array)
and sends each one's place in it; the main process (Receiver) makes the tensors there, equal to what
was written, without a copy."""

import numpy as np
import torch

from regionbert.train.data import Receiver, WorkerRing


def test_arena_arrays_travel_as_places_in_the_buffer():
    ring = WorkerRing(2)
    arena = ring.arena(4096)
    x = arena.array((3, 5), np.float16)
    y = arena.array((4,), np.int64)
    mask = arena.array((2, 3), bool)
    assert isinstance(x, np.ndarray) and x.flags.c_contiguous
    x[...] = np.arange(15, dtype=np.float16).reshape(3, 5) / 4
    y[...] = [7, -1, 2**40, 0]
    mask[...] = [[True, False, True], [False, False, True]]
    elsewhere = np.arange(3)  # not in the buffer: goes by value
    packed = arena.pack({"x": x, "task": "mlm", "y": y, "mask": mask, "other": elsewhere})
    # each array in its place in the dict as (offset in elements of its dtype, dtype, shape), named in _wire
    assert packed["_wire"][4] == ["x", "y", "mask"]
    assert (packed["x"], packed["y"], packed["mask"]) == \
        ((0, torch.float16, (3, 5)), (64 // 8, torch.int64, (4,)), (128, torch.bool, (2, 3)))
    assert list(packed) == ["x", "task", "y", "mask", "other", "_wire"]
    assert packed["other"] is elsewhere and packed["task"] == "mlm"

    batch = Receiver()(packed)
    assert list(batch) == ["x", "task", "y", "mask", "other"]  # collate's order
    assert torch.equal(batch["x"], torch.from_numpy(x)) and batch["x"].dtype == torch.float16
    assert batch["y"].tolist() == [7, -1, 2**40, 0] and batch["mask"].tolist() == mask.tolist()
    assert batch["x"].data_ptr() == x.ctypes.data  # the buffer itself, no copy
    x[0, 0] = 9
    assert batch["x"][0, 0] == 9


def test_a_copy_or_view_of_an_arena_array_is_not_taken_for_it():
    arena = WorkerRing(1).arena(1024)
    x = arena.array((4, 4), np.float32)
    x[...] = 1
    packed = arena.pack({"copy": x.copy(), "part": x[:, :2], "x": x})
    assert packed["_wire"][4] == ["x"]  # a non-contiguous view or a copy goes by value
    assert packed["copy"].sum() == 16 and packed["part"].shape == (4, 2)
