"""The training data path (issue 13): float16 from the shard to the device, masking over the batch with
the same per-sample draws as before, reused host buffers, the device feed, and the record ids a
non-finite loss names."""

import ast
import itertools
import re

import numpy as np
import pytest
import torch
from legacy_loader import LegacyDataset, legacy_collate, legacy_getitem
from train_synth import write_dataset

from regionbert.train.config import load_config
from regionbert.train.data import DeviceFeed, HostBuffers, collate, to_device
from regionbert.train.loop import NonFiniteLoss
from regionbert.train.masking import Generators, TextMasker, mask_regions, mask_regions_batch
from regionbert.train.optim import build_optimizer
from regionbert.train.run import build_data, build_model, run

TINY = ["model.hidden_size=32", "model.num_layers=1", "model.num_heads=2", "model.intermediate_size=64",
        "model.max_text_len=24", "data.token_budget=600", "data.num_workers=0", "data.eval_split=null",
        "run.plot=false", "run.tensorboard=false", "run.device=cpu",
        'tasks.mix={"mlm":1,"mrfr":1,"mrc":1,"mrc_kl":1,"itm":1}']


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("feed")
    return write_dataset(str(folder / "d"), n_train=120, n_val=0, feature_dim=16, min_boxes=0, max_boxes=30)


def _cfg(data, *extra):
    return load_config(None, [f"data.{k}={v}" for k, v in data.items()] + TINY + ["data.split=null", *extra])


def test_generators_and_batch_masking_draw_what_the_per_sample_functions_draw():
    gens, rs = Generators(), np.random.default_rng(0)
    m = TextMasker(4, np.arange(5, 300), frozenset({0, 2, 3}), 0.15)
    for trial in range(60):
        B = int(rs.integers(1, 10))
        seeds = [(trial, int(rs.integers(0, 2**32)), 0, b) for b in range(B)]
        seqs = [np.concatenate([[2], rs.integers(5, 300, rs.integers(0, 20)), [3]]) for _ in range(B)]
        lens = rs.integers(0, 30, B)
        g = gens(seeds)  # text, then regions, from each sample's own stream (joint masking's order)
        inputs, labels = m.batch(seqs, g)
        chosen = mask_regions_batch(lens, g)
        for b, s in enumerate(seqs):
            ref = np.random.default_rng(seeds[b])
            i, lab = m(s, ref)
            assert (inputs[b, :len(s)] == i).all() and (labels[b, :len(s)] == lab).all()
            assert (inputs[b, len(s):] == 0).all() and (labels[b, len(s):] == -100).all()
            assert (chosen[b, :lens[b]] == mask_regions(int(lens[b]), ref)).all() and not chosen[b, lens[b]:].any()
    assert [g.random() for g in gens([5, (1, 2), (2**40, 1)])] == \
        [np.random.default_rng(s).random() for s in [5, (1, 2), (2**40, 1)]]  # the fallback path


@pytest.mark.parametrize("masking", ["conditional", "joint"])
def test_new_data_path_gives_the_old_batches_and_per_step_losses(data, masking):
    cfg = _cfg(data, f"tasks.masking={masking}", "model.dropout=0.0")
    _, ds, _, loader = build_data(cfg, None)
    old_loader = torch.utils.data.DataLoader(LegacyDataset(ds), batch_sampler=loader.batch_sampler,
                                             collate_fn=legacy_collate)
    torch.manual_seed(0)
    models = [build_model(cfg), None]
    models[1] = build_model(cfg)
    models[1].load_state_dict(models[0].state_dict())
    optims = [build_optimizer(m, 1e-3, 0.01) for m in models]
    tasks = set()
    for step, (new, old) in enumerate(zip(loader, old_loader, strict=True)):
        if step >= 12 and len(tasks) == 5 or step == 40:
            break
        assert new["features"].dtype == new["class_probs"].dtype == torch.float16  # as stored: never widened
        new, old = to_device(new, "cpu"), to_device(old, "cpu")
        for k, v in old.items():
            if torch.is_tensor(v):
                assert new[k].dtype == v.dtype and torch.equal(new[k], v), k
        tasks.add(new["task"])
        losses = []
        for model, opt, batch in zip(models, optims, (new, old), strict=True):
            out = model(batch)
            loss = sum(out.values())
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.item())
        assert losses[0] == pytest.approx(losses[1], rel=1e-6, abs=1e-7)
    assert tasks == {"mlm", "mrfr", "mrc", "mrc_kl", "itm"}
    key = next(iter(loader.batch_sampler))[0]
    one = ds[key]  # a single sample is the batch of one: the same masks as the old per-sample path
    ref = legacy_getitem(ds, key)
    arrays = [k for k in ref if isinstance(ref[k], np.ndarray)]
    assert all(np.array_equal(np.asarray(one[k], dtype=ref[k].dtype), ref[k]) for k in arrays)


def test_reused_host_buffers_never_change_a_batch_still_held(data):
    cfg = _cfg(data)
    _, ds, _, loader = build_data(cfg, None)
    keys = list(itertools.islice(iter(loader.batch_sampler), 12))
    held = [b for b, _ in zip(loader, range(12), strict=False)]  # all alive at once: no buffer may be shared
    for batch, k in zip(held, keys, strict=True):
        samples = ds.__getitems__(k)
        again = collate(samples)  # the records were copied into the batch as they were read: taken as they are
        assert again["features"] is samples[0]["_rows"][0]["features"]
        copied = collate([{**s, "_rows": None} for s in samples])  # the general path copies
        edited = collate([{**s, "features": s["features"] + 1} for s in samples])  # an edit is not ignored
        assert torch.equal(edited["features"][0, :1], again["features"][0, :1] + 1)
        assert all(torch.equal(copied[n], again[n]) for n in ("features", "locations", "class_probs"))
        assert all(torch.equal(batch[n], again[n]) for n in ("features", "locations", "class_probs", "region_mask"))
    ptrs = {b["features"].data_ptr() for b in held}
    assert len(ptrs) == len(held)
    del held, again, batch, samples, copied
    pool = HostBuffers(slots=2)
    a = pool.take("f", (4, 5, 6), np.float16)
    b = pool.take("f", (4, 5, 6), np.float16)
    assert a.data_ptr() != b.data_ptr() and len(pool.slots["f"]) == 2
    view = a[1:]
    del a
    c = pool.take("f", (2, 3), np.float32)  # a's buffer is still referenced through its view; no slot is free
    assert c.data_ptr() not in (view.data_ptr() - view.storage_offset() * 2, b.data_ptr())
    assert len(pool.slots["f"]) == 2 and pool.take("g", (2,), np.float16).data_ptr() != c.data_ptr()
    del view, b, c
    d = pool.take("f", (8, 8, 8), np.float16)  # free again, grown to fit
    assert d.shape == (8, 8, 8) and d.dtype == torch.float16 and pool.slots["f"][0].nbytes >= d.numel() * 2
    del d
    e = pool.take("f", (2, 2), np.float16)  # reused without a new allocation
    assert e.data_ptr() == pool.slots["f"][0].ctypes.data


def test_worker_processes_give_the_same_batches_in_shared_memory(data):
    cfg = _cfg(data)
    _, _, _, loader0 = build_data(cfg, None, num_workers=0)
    _, _, _, loader1 = build_data(cfg, None, num_workers=1)
    for a, b in itertools.islice(zip(loader0, loader1, strict=True), 6):
        assert b["features"].is_shared() and b["features"].dtype == torch.float16
        assert all(torch.equal(a[k], b[k]) for k in a if torch.is_tensor(a[k])) and a["ids"] == b["ids"]


def test_device_feed_casts_on_the_device_and_preloads_once(data):
    _, _, _, loader = build_data(_cfg(data), None)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        feed, plain = DeviceFeed(loader, device), iter(loader)
        assert feed.preload() >= 0 and feed.preload() == 0.0  # the second call finds the batch already there
        for _ in range(3):
            batch, _ = feed.next()
            host = next(plain)
            assert batch["features"].dtype == torch.float32 and batch["features"].device.type == device
            assert torch.equal(batch["features"].cpu(), host["features"].float())
            assert torch.equal(batch["input_ids"].cpu(), host["input_ids"]) and batch["ids"] == host["ids"]
            feed.preload()


def test_a_non_finite_loss_names_the_records_of_its_batch(data, tmp_path):
    # a learning rate no model survives: after the first update the weights overflow and the loss is nan.
    # Set past the config's range check (which refuses it, train/ranges.py): this is about the loop.
    cfg = _cfg(data, "optim.warmup_steps=0", "optim.steps=6", "run.log_every=6",
               "run.checkpoint_every=0", f"run.out={tmp_path / 'r'}", "optim.grad_clip=0.0")
    cfg.optim.lr = 1e36
    with pytest.raises(NonFiniteLoss) as e:
        run(cfg, print_fn=lambda *a, **k: None)
    msg = str(e.value)
    step = int(re.search(r"step (\d+): the", msg).group(1))
    named = ast.literal_eval(re.search(r"of records (\[.*?\])", msg).group(1))
    pairs, _, _, loader = build_data(cfg, None)
    keys = next(itertools.islice(iter(loader.batch_sampler), step - 1, None))
    shown = [pairs.image_ids[int(pairs.image[p]) if o < 0 else o] for _, p, o, _ in keys]
    assert named == list(dict.fromkeys(shown))[:20] and f"held {len(keys)} samples" in msg
