"""Masking rules and every objective's loss on hand-made inputs."""

import dataclasses
import itertools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from regionbert.train.masking import IGNORE, TextMasker, mask_regions, modalities
from regionbert.train.model import EncoderOutput, ModelConfig, RegionBert
from regionbert.train.optim import build_optimizer
from regionbert.train.ot import cosine_cost, ipot, ot_distance
from regionbert.train.pretrainer import Pretrainer
from regionbert.train.tasks.itm_wra import text_and_region_validity
from regionbert.train.tasks.mrc import hard_labels
from regionbert.train.tasks.mrc_kl import MRCKLHead

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


def test_masked_region_input_is_zeros_plus_the_learned_mask_embedding():
    # UNITER: the collate zeroes a masked region's feature, img_embeddings adds mask_embedding (N(0, 0.02))
    torch.manual_seed(0)
    cfg = dataclasses.replace(CFG, feature_dim=4096)
    enc = RegionBert(cfg).eval()
    mask = enc.region_embeddings.mask_embedding
    assert mask.shape == (4096,) and abs(mask.std().item() - 0.02) < 1e-3 and abs(mask.mean().item()) < 2e-3
    b = _batch("mrfr")
    feats = torch.rand(3, 4, 4096)
    b["region_mask"][0, 1] = True
    emb = enc.region_embeddings
    t = enc.type_embeddings.weight[1]
    masked = emb(feats, b["locations"], b["region_mask"], t)
    shown = feats.clone()
    shown[0, 1] = mask  # the same as showing the mask embedding as the feature
    torch.testing.assert_close(masked, emb(shown, b["locations"], None, t))
    torch.testing.assert_close(masked[1:], emb(feats, b["locations"], None, t)[1:])  # others untouched
    zeros = RegionBert(dataclasses.replace(cfg, region_mask_embedding=False)).region_embeddings.eval()
    assert zeros.mask_embedding is None
    shown[0, 1] = 0.0
    torch.testing.assert_close(zeros(feats, b["locations"], b["region_mask"], t), zeros(shown, b["locations"], None, t))


def _gradient_norms(cfg, seed=0):
    """{task: global gradient norm} at initialisation, one batch each (realistic non-negative features)."""
    torch.manual_seed(seed)
    model = Pretrainer(cfg)
    g = torch.Generator().manual_seed(seed)
    B, L, N, D = 16, 12, 20, cfg.feature_dim
    ids = torch.randint(5, cfg.vocab_size, (B, L), generator=g)
    ids[:, 0], ids[:, -1] = CLS, SEP
    prototypes = torch.rand(cfg.num_classes, D, generator=g) * 2
    owner = torch.randint(1, cfg.num_classes, (B, N), generator=g)
    features = torch.relu(prototypes[owner] + torch.randn(B, N, D, generator=g) * 0.5)
    logits = torch.randn(B, N, cfg.num_classes, generator=g)
    logits.scatter_add_(2, owner.unsqueeze(-1), torch.full((B, N, 1), 5.0))
    region_mask = torch.rand(B, N, generator=g) < 0.15
    region_mask[:, 0] = True
    mlm_labels = torch.full((B, L), IGNORE)
    mlm_labels[:, 2] = ids[:, 2]
    base = {"input_ids": ids, "text_lens": torch.full((B,), L), "region_lens": torch.full((B,), N),
            "features": features, "locations": torch.rand(B, N, 7, generator=g),
            "class_probs": torch.softmax(logits, -1), "mlm_labels": mlm_labels, "itm_labels": torch.arange(B) % 2}
    norms = {}
    for task in ("mlm", "mrfr", "mrc", "mrc_kl", "itm"):
        hide = task in ("mrfr", "mrc", "mrc_kl")
        batch = dict(base, task=task, region_mask=region_mask if hide else torch.zeros(B, N, dtype=torch.bool))
        model.zero_grad()
        sum(model(batch).values()).backward()
        norms[task] = float(torch.nn.utils.get_total_norm([p.grad for p in model.parameters() if p.grad is not None]))
    return norms


@pytest.mark.parametrize("feature_dim", [64, 2048])
def test_per_task_gradient_norms_at_initialisation_are_comparable(feature_dim):
    # With a zero vector alone for a masked region, LayerNorm saw a constant (the feature bias, zero at
    # init) and back-propagated with a gain of 1/sqrt(eps): MRFR / MRC / MRC-kl gradient norms were
    # 10^4 x MLM's, and global clipping then shrank every other gradient of those steps by 10^-4.
    cfg = dataclasses.replace(CFG, vocab_size=200, hidden_size=128, num_heads=4, intermediate_size=256,
                              feature_dim=feature_dim, num_classes=91, dropout=0.1, itm_head_init="bert")
    norms = _gradient_norms(cfg)
    print({k: round(v, 4) for k, v in norms.items()})
    assert all(math.isfinite(v) and v > 0 for v in norms.values()), norms
    assert max(norms.values()) <= 10 * norms["mlm"], norms  # was 10^4 x
    scaled = _gradient_norms(dataclasses.replace(cfg, itm_head_init="auto"))  # the default from scratch
    assert norms["itm"] < scaled["itm"] <= 10 * scaled["mlm"], scaled
    # UNITER's own reductions set the spread: MRC-kl is averaged over 91 classes, and ITM's signal into
    # the encoder is weak while matching and mismatching pairs still look alike
    assert max(norms.values()) <= 1000 * min(norms.values()), norms
    norms_zero_fill = _gradient_norms(dataclasses.replace(cfg, region_mask_embedding=False))
    assert norms_zero_fill["mrfr"] >= 100 * norms_zero_fill["mlm"], norms_zero_fill  # the hazard the option keeps


def test_no_weight_decay_on_biases_and_layer_norms_and_tied_weights_once(model):
    opt = build_optimizer(model, 1e-3, 0.01)
    decayed, quiet = ({id(p) for p in g["params"]} for g in opt.param_groups)
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    named = dict(model.named_parameters())
    assert len(decayed) + len(quiet) == len(named) and not decayed & quiet  # every parameter, once
    for name, p in named.items():
        is_ln = any(isinstance(m, torch.nn.LayerNorm) and any(q is p for q in m.parameters(recurse=False))
                    for m in model.modules())
        quiet_expected = is_ln or name.endswith("bias")
        assert (id(p) in quiet) == quiet_expected, name
    # the LayerNorms UNITER's name filter missed (img_layer_norm / pos_layer_norm) are not decayed here
    for ln in (model.encoder.region_embeddings.feature_ln, model.encoder.region_embeddings.location_ln):
        assert id(ln.weight) in quiet
    assert id(model.encoder.region_embeddings.mask_embedding) in decayed  # an embedding, as UNITER's
    assert id(model.encoder.text_embeddings.word.weight) in decayed  # tied to the MLM decoder: once


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
    kl = (probs * (probs.log() - q)).mean()  # UNITER: averaged over regions x classes
    torch.testing.assert_close(model(b)["mrc_kl"], kl, atol=1e-6, rtol=1e-4)
    b["task"] = "mrfr"
    head = model.heads["mrfr"]
    target = torch.stack([b["features"][0, 1], b["features"][2, 0]])
    torch.testing.assert_close(model(b)["mrfr"], ((head.predict(h) - target) ** 2).mean())
    b["region_mask"][:] = False  # e.g. a batch of images without boxes
    assert model(b)["mrfr"].item() == 0


def test_mrfr_regressor_is_the_transpose_of_the_feature_projection_plus_a_bias(model):
    # UNITER's RegionFeatureRegression: F.linear(transform(h), img_linear.weight.t(), own bias)
    head, proj = model.heads["mrfr"], model.encoder.region_embeddings.feature
    assert head.weight is proj.weight and head.weight.shape == (CFG.hidden_size, CFG.feature_dim)
    assert head.bias is not proj.bias and head.bias.shape == (CFG.feature_dim,)
    h = torch.randn(5, CFG.hidden_size)
    torch.testing.assert_close(head.predict(h), F.linear(head.transform(h), proj.weight.t(), head.bias))
    names = [n for n, _ in model.named_parameters()]
    assert "heads.mrfr.weight" not in names  # one parameter, listed (and optimised) once
    assert not any(n.startswith("heads.mrfr.regress") for n in model.state_dict())


def test_mrc_and_mrc_kl_share_one_region_classifier_unless_asked():
    torch.manual_seed(0)
    shared = Pretrainer(CFG)
    assert shared.heads["mrc"].classifier is shared.heads["mrc_kl"].classifier  # UNITER's region_classifier
    separate = Pretrainer(dataclasses.replace(CFG, shared_region_classifier=False))
    assert separate.heads["mrc"].classifier is not separate.heads["mrc_kl"].classifier
    n = sum(p.numel() for p in separate.parameters()) - sum(p.numel() for p in shared.parameters())
    assert n == sum(p.numel() for p in shared.heads["mrc"].classifier.parameters())


def test_mrc_kl_equals_uniters_formula_on_a_hand_batch():
    # UNITER: F.kl_div(log_softmax(logits), soft_labels, reduction='none'), then pretrain.py's loss.mean()
    logits = torch.tensor([[2.0, 0.0, -1.0, 0.5], [0.0, 1.0, 0.0, 3.0]])
    p = torch.tensor([[0.7, 0.2, 0.1, 0.0], [0.1, 0.1, 0.2, 0.6]])
    q = torch.softmax(logits, -1)
    by_hand = sum(float(p[m, c] * math.log(p[m, c] / q[m, c])) for m in range(2) for c in range(4) if p[m, c] > 0) / 8
    head = MRCKLHead(dataclasses.replace(CFG, num_classes=4))
    head.logits = lambda h: logits  # the head's loss on these logits: what is reduced, and how
    out = EncoderOutput(torch.zeros(1, 2, 4), torch.zeros(1, 0, 4), torch.zeros(1, 2, 4), torch.zeros(1, 4))
    got = head(out, {"region_mask": torch.ones(1, 2, dtype=torch.bool), "class_probs": p.unsqueeze(0)})["mrc_kl"]
    assert math.isclose(got.item(), by_hand, rel_tol=1e-5)
    assert math.isclose(F.kl_div(q.log(), p, reduction="batchmean").item(), 4 * by_hand, rel_tol=1e-5)  # not this


def test_itm_and_wra_signs_and_wra_aligns_every_text_token(model):
    b = _batch("itm")
    b["itm_labels"] = torch.tensor([1, 1, 0])
    losses = model(b)
    out = model.encode(b)
    torch.testing.assert_close(losses["itm"], F.cross_entropy(model.heads["itm"].classify(out.pooled), b["itm_labels"]))
    # sample 1 has no regions: it aligns nothing; samples 0 (match) and 2 (mismatch) count with opposite signs.
    # The text side is every text token, [CLS] and [SEP] included (UNITER's itm_ot_collate): text_lens 6 and 3
    text_lens, region_lens = [6, 4, 3], [4, 0, 2]

    def alone(i, first, last):  # the OT distance of sample i over its text tokens first..last-1
        x, y = out.text[i:i + 1, first:last], out.regions[i:i + 1, :region_lens[i]]
        return float(ot_distance(x, y, torch.ones(1, last - first, dtype=torch.bool),
                                 torch.ones(1, region_lens[i], dtype=torch.bool)))

    with torch.no_grad():
        d = [alone(0, 0, 6), 0.0, alone(2, 0, 3)]
        words_only = [alone(0, 1, 5), 0.0, alone(2, 1, 2)]  # without [CLS] and [SEP]: not what is computed
    assert d[0] > 0 and d[2] > 0
    assert math.isclose(losses["wra"].item(), 0.1 * (d[0] - d[2]) / 3, rel_tol=1e-4, abs_tol=1e-6)
    assert not math.isclose(losses["wra"].item(), 0.1 * (words_only[0] - words_only[2]) / 3, rel_tol=1e-2)
    assert torch.isfinite(losses["wra"])
    words, regions = text_and_region_validity(b, 6, 4, "cpu")
    assert words.sum(1).tolist() == text_lens and regions.sum(1).tolist() == region_lens


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


def test_adamw_keeps_moving_a_trained_parameter_on_steps_without_its_gradient_as_uniter():
    # UNITER's optimizer (PyTorch 1.x zero_grad left zeros) steps every trained parameter at every step;
    # ours must match torch's AdamW given explicit zero gradients, and leave never-trained ones alone
    torch.manual_seed(0)
    head, other, fresh = (torch.nn.Parameter(torch.randn(4)) for _ in range(3))
    ref_head = torch.nn.Parameter(head.detach().clone())
    ours = build_optimizer(torch.nn.ParameterList([head, other, fresh]), 1e-2, 0.01)
    ref = torch.optim.AdamW([ref_head], lr=1e-2, betas=(0.9, 0.98), eps=1e-6, weight_decay=0.01)
    fresh_before = fresh.detach().clone()
    for step in range(4):
        ours.zero_grad(set_to_none=True)
        ref.zero_grad(set_to_none=True)
        other.grad = torch.ones(4)  # another task's parameter, trained every step
        g = torch.full((4,), 0.5) if step == 0 else None  # head: trained at step 0 only
        head.grad = g
        ref_head.grad = g.clone() if g is not None else torch.zeros(4)
        ours.step()
        ref.step()
        torch.testing.assert_close(head.detach(), ref_head.detach())
        if step == 0:
            after_its_own_step = head.detach().clone()
    assert (head.detach() - after_its_own_step).abs().min() > 1e-3  # moved on steps 1-3 (momentum)
    assert torch.equal(fresh.detach(), fresh_before)  # no state, no gradient: untouched


def test_scaled_itm_head_redraws_only_the_pooler_and_itm_classifier():
    cfg = dataclasses.replace(CFG, vocab_size=200, hidden_size=128, num_heads=4, intermediate_size=256,
                              num_classes=91, itm_head_init="bert")
    torch.manual_seed(0)
    bert = Pretrainer(cfg).state_dict()
    for init in ("scaled", "auto"):  # from scratch, "auto" (the default) is "scaled"
        torch.manual_seed(0)
        scaled = Pretrainer(dataclasses.replace(cfg, itm_head_init=init))
        changed = {k for k, v in scaled.state_dict().items() if not torch.equal(v, bert[k])}
        assert changed == {"encoder.pooler.weight", "heads.itm.classify.weight"}, (init, changed)
        for w in (scaled.encoder.pooler.weight, scaled.heads["itm"].classify.weight):
            assert abs(float(w.detach().std()) * 128 ** 0.5 - 1) < 0.15
    # so ITM's gradient reaches the encoder several times stronger than from two N(0, 0.02) layers
    weak, strong = _gradient_norms(cfg)["itm"], _gradient_norms(dataclasses.replace(cfg, itm_head_init="scaled"))["itm"]
    print(f"ITM gradient norm at initialisation: {weak:.4f} (0.02), {strong:.4f} (1/sqrt(hidden))")
    assert strong > 3 * weak
    with pytest.raises(ValueError, match="itm_head_init"):
        dataclasses.replace(cfg, itm_head_init="large")


def test_zero_itm_head_scores_every_pair_alike():
    cfg = dataclasses.replace(CFG, itm_head_init="bert")
    torch.manual_seed(0)
    bert = Pretrainer(cfg).state_dict()
    for init in ("zero",):
        torch.manual_seed(0)
        zero = Pretrainer(dataclasses.replace(cfg, itm_head_init=init))
        changed = {k for k, v in zero.state_dict().items() if not torch.equal(v, bert[k])}
        assert changed == {"encoder.pooler.weight", "heads.itm.classify.weight"}, (init, changed)
        assert abs(float(zero.encoder.pooler.weight.detach().std()) * 32 ** 0.5 - 1) < 0.15
        assert not zero.heads["itm"].classify.weight.any()
    batch = _batch("itm")
    out = zero.heads["itm"].classify(zero.encode(batch).pooled)
    assert torch.equal(out, torch.zeros_like(out))  # p = 0.5 for every pair: nothing to unlearn
    zero.zero_grad()
    zero(batch)["itm"].backward()
    # the first step moves the classifier toward telling the batch's matched pairs from the others
    assert zero.heads["itm"].classify.weight.grad.abs().sum() > 0


def test_centered_itm_gradient_removes_the_batch_mean_and_changes_nothing_else():
    cfg = dataclasses.replace(CFG, itm_head_init="scaled")
    torch.manual_seed(0)
    plain = Pretrainer(cfg, wra_weight=0.0)
    centered = Pretrainer(cfg, wra_weight=0.0, itm_center_grad=True)
    centered.load_state_dict(plain.state_dict())
    batch = _batch("itm")
    grads, losses = {}, {}
    for name, m in (("plain", plain), ("centered", centered)):
        out = m.encode(batch)
        out.pooled.retain_grad()
        loss = m.heads["itm"](out, batch)["itm"]
        loss.backward()
        losses[name], grads[name] = loss.detach(), out.pooled.grad.clone()
    assert torch.equal(losses["plain"], losses["centered"])  # the same forward pass
    g, c = grads["plain"], grads["centered"]  # (B, C) the gradient each pair's pooled output receives
    torch.testing.assert_close(c, g - g.mean(0, keepdim=True))
    assert c.mean(0).abs().max() < 1e-7 and g.mean(0).abs().max() > 10 * c.mean(0).abs().max()
    for (n, p), q in zip(plain.heads["itm"].named_parameters(), centered.heads["itm"].parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, msg=n)  # the head itself learns as before
