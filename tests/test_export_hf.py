"""`regionbert-pretrain export`: a run as a Hugging Face model folder, loaded by transformers (remote code) and by
our own loader without transformers, both giving the trained model's outputs; hostile folders refused.

Tolerance: the trained model, our loader and transformers' remote code run the same float32 operations in the
same order on the same weights (on a CPU they agree to the bit; the test does not rely on it). Outputs are
LayerNorm'd, of order 1, where float32 rounding is 6e-8 per operation; a few dozen operations deep that stays
below 1e-6. 1e-5 leaves a margin for other kernels (e.g. the heads applied to every position instead of the
gathered ones) and still catches any real difference: a wrong weight, mask or location moves outputs by 1e-2
or more.
"""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from train_synth import write_dataset

from regionbert.data import ShardSet
from regionbert.train.cli import main
from regionbert.train.data import PairDataset, Pairs, collate
from regionbert.train.export import ExportError, load_exported, model_from_checkpoint, read_exported_weights
from regionbert.train.text import Text, read_manifest

TOL = 1e-5  # see the module docstring
TINY = ["model.hidden_size=32", "model.num_layers=2", "model.num_heads=2", "model.intermediate_size=64",
        "model.max_text_len=24", "data.token_budget=600", "optim.warmup_steps=2", "optim.steps=4",
        "run.log_every=2", "data.num_workers=0", "run.plot=false", "run.tensorboard=false"]
# UNITER's layout, and the named options that change the model's shape: 5-d locations, a classifier per
# MRC task, no mask embedding
VARIANTS = {"uniter": [], "options": ["model.loc_dim=5", "model.shared_region_classifier=false",
                                      "model.region_mask_embedding=false"]}


def tiny_run(folder, extra=()) -> tuple[str, dict]:
    """A run trained 4 steps on a 50-image synthetic shard (a few seconds on a CPU): (run folder, data)."""
    data = write_dataset(os.path.join(folder, "data"), n_train=40, n_val=10, feature_dim=16, min_boxes=0,
                         max_boxes=12)
    run = os.path.join(folder, "run")
    args = [f"--set=data.{k}={v}" for k, v in data.items()] + [f"--set={o}" for o in [*TINY, *extra]]
    assert main(args + ["--out", run]) == 0
    return run, data


@pytest.fixture(scope="module", params=list(VARIANTS))
def exported(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"export-{request.param}")
    run, data = tiny_run(str(folder), VARIANTS[request.param])
    out = str(folder / "model")
    assert main(["export", run, "-o", out]) == 0
    return {"run": run, "out": out, "data": data, "variant": request.param}


def sample_batch(data, model_cfg, mask_regions=False):
    """A batch of held-out pairs as the trainer makes it (PairDataset + collate): real records and captions,
    texts and box counts of different lengths (one image without boxes among them if the shard has one)."""
    shards = ShardSet(data["shards"])
    text = Text(data["tokenizer"], model_cfg.max_text_len)
    pairs = Pairs(shards, data["captions"], text, "val")
    dataset = PairDataset(shards, pairs, text, loc_dim=model_cfg.loc_dim)
    keys = [("itm", p, -1, (0, p)) for p in range(8)]  # no text masking: the captions' own tokens
    batch = collate([dataset[k] for k in keys])
    batch["features"] = batch["features"].float()
    batch["class_probs"] = batch["class_probs"].float()
    if mask_regions:  # hide some regions' features, as MRFR / MRC do
        batch["region_mask"] = (torch.arange(batch["features"].shape[1]) % 3 == 0) & (
            torch.arange(batch["features"].shape[1]) < batch["region_lens"].unsqueeze(1))
    else:
        batch["region_mask"] = None
    return batch, pairs, text


def valid(batch):
    L, N = batch["input_ids"].shape[1], batch["features"].shape[1]
    return (torch.arange(L) < batch["text_lens"].unsqueeze(1), torch.arange(N) < batch["region_lens"].unsqueeze(1))


def head_outputs(model, batch):
    """Every output of our Pretrainer on a batch: encoder states, pooled, and each head on every position."""
    with torch.no_grad():
        out = model.encode(batch)
        h = model.heads
        return {"text": out.text, "regions": out.regions, "pooled": out.pooled, "itm": h["itm"].classify(out.pooled),
                "mlm": h["mlm"].logits(out.text), "mrfr": h["mrfr"].predict(out.regions),
                "mrc": h["mrc"].logits(out.regions), "mrc_kl": h["mrc_kl"].logits(out.regions)}


def max_diff(a: dict, b: dict, batch) -> dict:
    text, regions = valid(batch)
    where = {"text": text, "mlm": text, "regions": regions, "mrfr": regions, "mrc": regions, "mrc_kl": regions}
    return {k: float((a[k][where[k]] - b[k][where[k]]).abs().max()) if k in where else float((a[k] - b[k]).abs().max())
            for k in a}


def test_export_writes_a_folder_with_weights_config_tokenizer_code_and_card(exported):
    out = exported["out"]
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "configuration_regionbert.py", "model.safetensors",
                                       "modeling_regionbert.py", "special_tokens_map.json", "tokenizer_config.json",
                                       "training_config.json", "vocab.txt"]
    cfg = json.load(open(os.path.join(out, "config.json")))
    assert cfg["model_type"] == "regionbert" and cfg["auto_map"]["AutoModel"] == "modeling_regionbert.RegionBertModel"
    assert cfg["auto_map"]["AutoModelForPreTraining"] == "modeling_regionbert.RegionBertForPreTraining"
    assert cfg["feature_dim"] == 16 and cfg["num_hidden_layers"] == 2 and cfg["max_position_embeddings"] == 24
    assert cfg["region_class_names"][0] == "__background__" and len(cfg["region_class_names"]) == cfg[
        "num_region_classes"]
    assert open(os.path.join(out, "vocab.txt")).read() == open(exported["data"]["tokenizer"]).read()
    # the remote code imports torch and transformers only: it must work where regionbert is not installed
    for name in ("configuration_regionbert.py", "modeling_regionbert.py"):
        src = open(os.path.join(out, name)).read()
        assert "import regionbert" not in src and "from regionbert" not in src
    from safetensors import safe_open

    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        names = set(f.keys())
    assert "regionbert.text_embeddings.word.weight" in names and "heads.mlm.weight" not in names  # tied: once
    assert ("heads.mrc_kl.classifier.classify.weight" in names) == (exported["variant"] == "options")


def test_model_card_has_front_matter_data_steps_figures_deviations_and_loading(exported):
    yaml = pytest.importorskip("yaml")
    card = open(os.path.join(exported["out"], "README.md")).read()
    assert card.startswith("---\n")
    front = yaml.safe_load(card.split("---\n")[1])
    assert front["library_name"] == "transformers" and "regionbert" in front["tags"]
    last_eval = [json.loads(x) for x in open(os.path.join(exported["run"], "log.jsonl")) if '"eval"' in x][-1]
    itm = last_eval["eval"]["itm_acc"]
    assert f"| ITM accuracy (matched vs a random other image; chance 0.5) | {itm:.3f} |" in card
    assert f"{last_eval['eval']['t2i_r1']:.3f}" in card and "At step 4" in card
    assert "at step 4 of 4" in card and "4 optimizer steps" in card
    assert exported["data"]["shards"] in card and "| 50 | synthetic |" in card  # the shard, its records, detector
    assert "80 captions of 40 images (trained on)" in card and "20 captions of 10 images (held out" in card
    assert "batch mean removed" in card and "from scratch" in card  # the centred ITM gradient, from scratch
    assert "moments are kept per task" in card  # optim.task_state, from scratch
    assert "AutoModelForPreTraining.from_pretrained" in card and "Model.load" in card
    if exported["variant"] == "options":
        assert "zeros alone, without UNITER's learned mask embedding" in card and "a classifier each" in card


def test_our_loader_gives_the_trained_models_outputs_without_transformers(exported):
    """In a process where transformers cannot be imported: load_exported(DIR) equals the checkpoint's model on
    every output (encoder, pooler, every head), on a real batch with masked regions."""
    code = f"""
import sys, json
class Block:
    def find_spec(self, name, path=None, target=None):
        if name == "transformers" or name.startswith("transformers."):
            raise ImportError("transformers is blocked in this test")
sys.meta_path.insert(0, Block())
sys.path.insert(0, {os.path.dirname(__file__)!r})
import torch
from test_export_hf import head_outputs, max_diff, sample_batch
from regionbert.train.export import load_exported, model_from_checkpoint
trained, _, _ = model_from_checkpoint({exported['run'] + '/checkpoint.pt'!r})
ours = load_exported({exported['out']!r})
batch, _, _ = sample_batch({exported['data']!r}, ours.cfg, mask_regions=True)
print(json.dumps({{"diff": max_diff(head_outputs(trained, batch), head_outputs(ours, batch), batch),
                  "transformers": "transformers" in sys.modules,
                  "same": all(torch.equal(a, b) for a, b in zip(trained.state_dict().values(),
                                                                  ours.state_dict().values()))}}))
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**os.environ,
                       "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr
    got = json.loads(r.stdout.strip().splitlines()[-1])
    assert not got["transformers"] and got["same"], got
    assert max(got["diff"].values()) <= TOL, got["diff"]


def test_importing_regionbert_train_never_imports_transformers():
    code = ("import sys, regionbert.train, regionbert.train.export, regionbert.train.infer, regionbert.train.cli, "
            "regionbert.train.hf; print([m for m in sys.modules if m.split('.')[0] == 'transformers'])")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/")
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stdout + r.stderr


@pytest.mark.parametrize("mask_regions", [False, True])
def test_transformers_loads_the_folder_and_gives_the_trained_models_outputs(exported, mask_regions):
    transformers = pytest.importorskip("transformers", minversion="5.0")  # the remote code's API
    out = exported["out"]
    trained, _, _ = model_from_checkpoint(os.path.join(exported["run"], "checkpoint.pt"))
    batch, pairs, text = sample_batch(exported["data"], trained.cfg, mask_regions)
    tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    captions = read_manifest(exported["data"]["captions"], "val")["caption"][:8].tolist()  # Pairs' order
    # the folder's tokenizer gives the trainer's token ids ([CLS] words [SEP], same WordPiece, same padding)
    enc = tok(captions, padding=True, truncation=True, return_tensors="pt")
    assert torch.equal(enc.input_ids, batch["input_ids"]), (enc.input_ids, batch["input_ids"])
    assert torch.equal(enc.attention_mask.sum(1), batch["text_lens"])
    hf = transformers.AutoModelForPreTraining.from_pretrained(out, trust_remote_code=True).eval()
    base = transformers.AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    assert type(hf).__name__ == "RegionBertForPreTraining" and type(base).__name__ == "RegionBertModel"
    text_ok, regions_ok = valid(batch)
    inputs = {"input_ids": enc.input_ids, "attention_mask": enc.attention_mask, "region_features": batch["features"],
              "region_locations": batch["locations"], "region_attention_mask": regions_ok.long(),
              "region_mask": batch["region_mask"]}
    with torch.no_grad():
        o, b = hf(**inputs), base(**inputs)
    theirs = {"text": o.text_hidden_state, "regions": o.region_hidden_state, "pooled": o.pooler_output,
              "itm": o.itm_logits, "mlm": o.mlm_logits, "mrfr": o.mrfr_features, "mrc": o.mrc_logits,
              "mrc_kl": o.mrc_kl_logits}
    diff = max_diff(head_outputs(trained, batch), theirs, batch)
    assert max(diff.values()) <= TOL, diff
    assert torch.equal(b.last_hidden_state, o.last_hidden_state) and torch.equal(b.pooler_output, o.pooler_output)
    L = batch["input_ids"].shape[1]
    assert torch.equal(o.last_hidden_state[:, :L], o.text_hidden_state)
    assert not o.text_hidden_state[~text_ok].any() and not o.region_hidden_state[~regions_ok].any()  # padding: 0
    assert torch.allclose(o.itm_score, o.itm_logits[:, 1] - o.itm_logits[:, 0])


def test_export_of_a_run_without_a_checkpoint_or_into_an_existing_folder_is_refused(exported, tmp_path, capsys):
    empty = tmp_path / "run"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    assert main(["export", str(empty), "-o", str(tmp_path / "m")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("regionbert-pretrain export: error: ") and f"{empty}/checkpoint.pt: not found" in err
    assert not (tmp_path / "m").exists() and not (tmp_path / "m.partial").exists()
    assert main(["export", exported["run"], "-o", exported["out"]]) == 2
    assert f"{exported['out']}: exists" in capsys.readouterr().err
    assert main(["export", exported["run"], "-o", str(tmp_path / "m"), "--tokenizer", str(tmp_path / "nope.txt")]) == 2
    assert "nope.txt" in capsys.readouterr().err and not (tmp_path / "m").exists()
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    assert main(["export", str(tmp_path / "bad.pt"), "-o", str(tmp_path / "m")]) == 2
    assert "bad.pt: not a loadable regionbert checkpoint" in capsys.readouterr().err


def _copy(exported, tmp_path) -> str:
    folder = str(tmp_path / "copy")
    shutil.copytree(exported["out"], folder)
    return folder


def test_safetensors_whose_names_or_shapes_differ_from_the_config_are_refused_naming_file_and_tensor(exported,
                                                                                                  tmp_path):
    from safetensors.torch import load_file, save_file

    folder = _copy(exported, tmp_path)
    path = os.path.join(folder, "model.safetensors")
    good = load_file(path)
    name = "regionbert.layers.1.attn.qkv.weight"
    cases = {"shape": ({**good, name: torch.zeros(96, 31)}, f"tensor {name!r} has shape (96, 31)"),
             "missing": ({k: v for k, v in good.items() if k != name}, f"lacks tensor {name!r}"),
             "unknown": ({**good, "heads.nsp.weight": torch.zeros(2)}, "has tensor 'heads.nsp.weight'"),
             "nan": ({**good, name: torch.full_like(good[name], float("nan"))}, f"tensor {name!r} holds NaN"),
             "int": ({**good, name: good[name].to(torch.int32)}, f"tensor {name!r} has dtype torch.int32")}
    for what, (tensors, says) in cases.items():
        save_file(tensors, path)
        with pytest.raises(ExportError) as e:
            load_exported(folder)
        assert str(e.value).startswith(f"{path}: ") and says in str(e.value), (what, str(e.value))
    with open(path, "wb") as f:
        f.write(b"\xff" * 64)
    with pytest.raises(ExportError, match="not a readable safetensors file"):
        load_exported(folder)
    # a config that does not fit its weights, or is out of range, is named with its key
    save_file(good, path)
    cfg_path = os.path.join(folder, "config.json")
    cfg = json.load(open(cfg_path))
    for key, value, says in [("num_hidden_layers", 3, "lacks tensor 'regionbert.layers.2"),
                             ("hidden_size", -1, "model.hidden_size"), ("model_type", "bert", "not a regionbert")]:
        json.dump({**cfg, key: value}, open(cfg_path, "w"))
        with pytest.raises(ExportError) as e:
            load_exported(folder)
        assert says in str(e.value) and (cfg_path in str(e.value) or path in str(e.value)), str(e.value)


class Boom:
    """Unpickling this runs code: it writes the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_a_pickle_in_the_folder_is_never_unpickled_and_a_weights_only_one_loads(exported, tmp_path):
    folder = _copy(exported, tmp_path)
    os.remove(os.path.join(folder, "model.safetensors"))
    marker = tmp_path / "pwned"
    with open(os.path.join(folder, "pytorch_model.bin"), "wb") as f:
        torch.save({"regionbert.pooler.weight": Boom(str(marker))}, f)
    with pytest.raises(ExportError) as e:
        load_exported(folder)
    assert "pytorch_model.bin: refused: not a weights-only file" in str(e.value) and not marker.exists()
    assert main(["score", folder, "--shards", exported["data"]["shards"], "--captions", exported["data"]["captions"],
                 "-o", str(tmp_path / "s.csv")]) == 2 and not marker.exists()
    # a plain table of tensors in a .bin (as older exports write) is read, weights only
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(exported["out"], "model.safetensors"))
    torch.save(tensors, os.path.join(folder, "pytorch_model.bin"))
    ours = load_exported(folder)
    assert all(torch.equal(ours.state_dict()[k], v) for k, v in load_exported(exported["out"]).state_dict().items())
    assert set(read_exported_weights(folder, ours.cfg)) == set(tensors)


def test_training_config_and_tokenizer_travel_with_the_folder(exported):
    cfg = json.load(open(os.path.join(exported["out"], "training_config.json")))
    assert cfg == json.load(open(os.path.join(exported["run"], "config.json")))
    tc = json.load(open(os.path.join(exported["out"], "tokenizer_config.json")))
    assert tc["tokenizer_class"] == "BertTokenizer" and tc["do_lower_case"] is True and tc["model_max_length"] == 24
    assert np.array_equal(Text(os.path.join(exported["out"], "vocab.txt"), 24).encode(["a photo of a dog"])[0],
                          Text(exported["data"]["tokenizer"], 24).encode(["a photo of a dog"])[0])


def test_save_pretrained_round_trips_and_a_tokenizer_json_run_exports(exported, tmp_path):
    """What a transformers user does next: save_pretrained gives a folder both loaders read back to the same
    weights; a run trained with a tokenizer.json exports it, and AutoTokenizer gives the trainer's ids."""
    transformers = pytest.importorskip("transformers", minversion="5.0")
    if exported["variant"] != "uniter":
        pytest.skip("one variant is enough")
    hf = transformers.AutoModelForPreTraining.from_pretrained(exported["out"], trust_remote_code=True)
    hf.save_pretrained(str(tmp_path / "saved"))
    again = transformers.AutoModelForPreTraining.from_pretrained(str(tmp_path / "saved"), trust_remote_code=True)
    assert all(torch.equal(a, b) for a, b in zip(hf.state_dict().values(), again.state_dict().values(), strict=True))
    ours, saved = load_exported(exported["out"]), load_exported(str(tmp_path / "saved"))
    assert all(torch.equal(v, saved.state_dict()[k]) for k, v in ours.state_dict().items())
    from tokenizers import BertWordPieceTokenizer

    tj = str(tmp_path / "tokenizer.json")
    BertWordPieceTokenizer(exported["data"]["tokenizer"], lowercase=True).save(tj)
    out = str(tmp_path / "m")
    assert main(["export", exported["run"], "-o", out, "--tokenizer", tj]) == 0
    assert "tokenizer.json" in os.listdir(out) and "vocab.txt" not in os.listdir(out)
    tok = transformers.AutoTokenizer.from_pretrained(out, trust_remote_code=True)
    caption = ["a photo of a dog and a cat"]
    assert tok(caption).input_ids[0] == Text(tj, 24).encode(caption)[0].tolist()
