"""Masking rules and every objective's loss on hand-made inputs."""

import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from regionbert.train.masking import IGNORE, TextMasker, mask_regions, modalities
from regionbert.train.model import ModelConfig, RegionBert
from regionbert.train.ot import cosine_cost, ipot, ot_distance
from regionbert.train.pretrainer import Pretrainer
from regionbert.train.tasks.mrc import hard_labels

CLS, SEP, MASK = 2, 3, 4
MASKER = TextMasker(MASK, np.arange(5, 100), frozenset({0, 1, CLS, SEP, MASK}))


def _caption(n_words, rng):
    return np.array([CLS, *rng.integers(5, 100, n_words), SEP])


def test_mlm_masks_at_least_one_word_and_never_cls_or_sep():
    rng = np.random.default_rng(0)
    for _ in range(2000):
        ids = _caption(int(rng.integers(1, 4)), rng)  # short captions: 15% often picks nothing
        inputs, labels = MASKER(ids, rng)
        chosen = labels != IGNORE
        assert chosen.sum() >= 1
        assert not chosen[0] and not chosen[-1] and inputs[0] == CLS and inputs[-1] == SEP
        assert (labels[chosen] == ids[chosen]).all()  # the target is the original word
        assert (inputs[~chosen] == ids[~chosen]).all()  # nothing else changes


def test_mlm_rate_and_80_10_10_split():
    rng = np.random.default_rng(1)
    chosen = masked = replaced = kept = total = 0
    for _ in range(3000):
        ids = _caption(40, rng)
        inputs, labels = MASKER(ids, rng)
        c = labels != IGNORE
        chosen, total = chosen + c.sum(), total + 40
        masked += (inputs[c] == MASK).sum()
        same = inputs[c] == ids[c]
        kept += same.sum()
        replaced += (~same & (inputs[c] != MASK)).sum()
        assert np.isin(inputs[c & (inputs != MASK)], MASKER.random_ids).all()  # random words are real words
    assert abs(chosen / total - 0.15) < 0.005
    # a random word equals the original 1% of the time here: "kept" is 10% + 0.1%
    assert abs(masked / chosen - 0.8) < 0.01 and abs(replaced / chosen - 0.1) < 0.01 and abs(kept / chosen - 0.1) < 0.01


def test_empty_caption_masks_nothing():
    inputs, labels = MASKER(np.array([CLS, SEP]), np.random.default_rng(0))
    assert (labels == IGNORE).all() and (inputs == [CLS, SEP]).all()


def test_regions_at_least_one_and_rate():
    rng = np.random.default_rng(2)
    assert all(mask_regions(n, rng).sum() >= 1 for n in [1, 2, 3] for _ in range(500))
    assert mask_regions(0, rng).shape == (0,)
    rate = np.mean([mask_regions(100, rng).mean() for _ in range(500)])
    assert abs(rate - 0.15) < 0.01


def test_conditional_masking_never_hides_both_modalities():
    for task in ("mlm", "mrfr", "mrc", "mrc_kl", "itm"):
        text, regions = modalities(task, "conditional")
        assert not (text and regions)
    assert modalities("mlm", "conditional") == (True, False)
    assert all(modalities(t, "conditional") == (False, True) for t in ("mrfr", "mrc", "mrc_kl"))
    assert modalities("itm", "conditional") == (False, False) == modalities("itm", "joint")
    assert modalities("mrc", "joint") == (True, True)
    with pytest.raises(ValueError, match="masking"):
        modalities("mlm", "sometimes")


# ---- losses, on a tiny model --------------------------------------------------------------------------------

CFG = ModelConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                  max_text_len=16, feature_dim=8, num_classes=5, dropout=0.0)


def _batch(task, B=3, L=6, N=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    text_lens, region_lens = torch.tensor([6, 4, 3][:B]), torch.tensor([4, 0, 2][:B])
    ids = torch.randint(5, 100, (B, L), generator=g)
    ids[:, 0] = CLS
    probs = torch.softmax(torch.randn(B, N, 5, generator=g) * 3, -1)
    return {"task": task, "input_ids": ids, "text_lens": text_lens, "region_lens": region_lens,
            "features": torch.rand(B, N, 8, generator=g), "locations": torch.rand(B, N, 7, generator=g),
            "class_probs": probs, "region_mask": torch.zeros(B, N, dtype=torch.bool),
            "mlm_labels": torch.full((B, L), IGNORE), "itm_labels": torch.tensor([1, 0, 1][:B])}


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return Pretrainer(CFG).eval()


def test_padding_does_not_change_outputs():
    torch.manual_seed(0)
    enc = RegionBert(CFG).eval()
    b = _batch("itm")
    out = enc(b["input_ids"], b["text_lens"], b["features"], b["locations"], b["region_lens"])
    one = enc(b["input_ids"][2:, :3], b["text_lens"][2:], b["features"][2:, :2], b["locations"][2:, :2],
              b["region_lens"][2:])  # sample 2 alone, unpadded
    torch.testing.assert_close(out.text[2, :3], one.text[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.regions[2, :2], one.regions[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled[2], one.pooled[0], atol=1e-5, rtol=1e-5)


def test_masked_region_shows_only_its_box():
    torch.manual_seed(0)
    enc = RegionBert(CFG).eval()
    b = _batch("mrfr")
    b["region_mask"][0, 1] = True
    f2 = b["features"].clone()
    f2[0, 1] = 123.0  # a masked region's feature cannot matter
    args = (b["input_ids"], b["text_lens"])
    o1 = enc(*args, b["features"], b["locations"], b["region_lens"], b["region_mask"])
    o2 = enc(*args, f2, b["locations"], b["region_lens"], b["region_mask"])
    o3 = enc(*args, f2, b["locations"], b["region_lens"])  # unmasked, it does
    torch.testing.assert_close(o1.hidden, o2.hidden)
    assert not torch.allclose(o1.hidden[0], o3.hidden[0])


def test_mlm_loss_is_cross_entropy_on_chosen_words_with_tied_head(model):
    b = _batch("mlm")
    b["mlm_labels"][0, 2], b["mlm_labels"][1, 1] = 17, 42
    out = model.encode(b)
    head = model.heads["mlm"]
    assert head.weight is model.encoder.text_embeddings.word.weight
    logits = head.logits(torch.stack([out.text[0, 2], out.text[1, 1]]))
    expected = F.cross_entropy(logits, torch.tensor([17, 42]))
    torch.testing.assert_close(model(b)["mlm"], expected)
    b["mlm_labels"][:] = IGNORE  # nothing chosen: zero, but still differentiable
    loss = model(b)["mlm"]
    assert loss.item() == 0 and loss.requires_grad


def test_mrc_targets_exclude_background():
    probs = torch.tensor([[0.7, 0.1, 0.2, 0.0], [0.1, 0.6, 0.2, 0.1], [0.97, 0.0, 0.01, 0.02]])
    assert hard_labels(probs).tolist() == [2, 1, 3]  # background (0) is never a target


def test_region_losses_on_masked_regions_only(model):
    b = _batch("mrc")
    b["region_mask"][0, 1] = b["region_mask"][2, 0] = True
    out = model.encode(b)
    h = torch.stack([out.regions[0, 1], out.regions[2, 0]])
    probs = torch.stack([b["class_probs"][0, 1], b["class_probs"][2, 0]])
    mrc = F.cross_entropy(model.heads["mrc"].logits(h), hard_labels(probs))
    torch.testing.assert_close(model(b)["mrc"], mrc)
    b["task"] = "mrc_kl"
    q = F.log_softmax(model.heads["mrc_kl"].logits(h), -1)
    kl = (probs * (probs.log() - q)).sum(-1).mean()
    torch.testing.assert_close(model(b)["mrc_kl"], kl, atol=1e-5, rtol=1e-4)
    b["task"] = "mrfr"
    head = model.heads["mrfr"]
    target = torch.stack([b["features"][0, 1], b["features"][2, 0]])
    torch.testing.assert_close(model(b)["mrfr"], ((head.regress(head.transform(h)) - target) ** 2).mean())
    b["region_mask"][:] = False  # e.g. a batch of images without boxes
    assert model(b)["mrfr"].item() == 0


def test_itm_and_wra_signs(model):
    b = _batch("itm")
    b["itm_labels"] = torch.tensor([1, 1, 0])
    losses = model(b)
    out = model.encode(b)
    torch.testing.assert_close(losses["itm"], F.cross_entropy(model.heads["itm"].classify(out.pooled), b["itm_labels"]))
    # sample 1 has no regions: it aligns nothing; samples 0 (match) and 2 (mismatch) count with opposite signs
    words = [slice(1, 5), None, slice(1, 2)]
    with torch.no_grad():
        d = [float(ot_distance(out.text[i:i + 1, words[i]], out.regions[i:i + 1, :[4, 0, 2][i]],
                               torch.ones(1, 4 if i == 0 else 1, dtype=torch.bool),
                               torch.ones(1, [4, 0, 2][i], dtype=torch.bool))) if words[i] else 0.0 for i in range(3)]
    assert d[0] > 0 and d[2] > 0
    assert math.isclose(losses["wra"].item(), 0.1 * (d[0] + 0 - d[2]) / 3, rel_tol=1e-4, abs_tol=1e-6)
    assert torch.isfinite(losses["wra"])


def test_ipot_plan_has_uniform_marginals_and_finds_the_exact_optimum():
    torch.manual_seed(0)
    for n in (3, 4, 5):
        x, y = torch.randn(1, n, 8), torch.randn(1, n, 8)
        valid = torch.ones(1, n, dtype=torch.bool)
        cost = cosine_cost(x, y)[0]
        best = min(sum(cost[i, p[i]] for i in range(n)) for p in itertools.permutations(range(n))) / n
        plan = ipot(cosine_cost(x, y), valid, valid)[0]
        torch.testing.assert_close(plan.sum(0), torch.full((n,), 1 / n), atol=1e-4, rtol=0)
        torch.testing.assert_close(plan.sum(1), torch.full((n,), 1 / n), atol=1e-4, rtol=0)
        assert abs(float(ot_distance(x, y, valid, valid)) - float(best)) < 2e-3


def test_ot_distance_zero_for_a_permutation_and_ignores_padding():
    e = torch.eye(4)
    x, y = e[None, :3], e[None, [2, 0, 1]]  # the same three directions, reordered
    ones = torch.ones(1, 3, dtype=torch.bool)
    assert float(ot_distance(x, y, ones, ones)) < 1e-3
    assert abs(float(ot_distance(x, e[None, 3:].expand(1, 3, 4), ones, ones)) - 1) < 1e-4  # orthogonal: cost 1
    y_pad = torch.cat([y, torch.randn(1, 2, 4)], 1)  # two padded regions change nothing
    valid = torch.tensor([[True, True, True, False, False]])
    assert float(ot_distance(x, y_pad, ones, valid)) < 1e-3
    assert float(ot_distance(x, y_pad, ones, torch.zeros(1, 5, dtype=torch.bool))) == 0  # nothing to align
