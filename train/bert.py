"""Start from a BERT a team already has: a local Hugging Face folder (config.json + model.safetensors or
pytorch_model.bin, optionally sharded with an index file). No network, and no pickle execution:
safetensors files hold only tensors, and .bin files are read with torch.load(weights_only=True).

What is loaded, from Hugging Face names onto ours (train/model.py is post-LayerNorm BERT, so the
mapping is one to one, except that query, key and value are one fused qkv matrix here):

    embeddings.word_embeddings            text_embeddings.word
    embeddings.position_embeddings        text_embeddings.position      (the first max_text_len rows)
    embeddings.token_type_embeddings      type_embeddings               (type 0 = text; BERT's sentence-B
                                                                         type starts the region type)
    embeddings.LayerNorm                  text_embeddings.ln
    encoder.layer.i.attention.self.{query,key,value}   layers.i.attn.qkv  (concatenated: q, k, v)
    encoder.layer.i.attention.output.dense             layers.i.attn.proj
    encoder.layer.i.attention.output.LayerNorm         layers.i.ln1
    encoder.layer.i.intermediate.dense                 layers.i.mlp.0
    encoder.layer.i.output.dense                       layers.i.mlp.2
    encoder.layer.i.output.LayerNorm                   layers.i.ln2
    pooler.dense                          pooler
    cls.predictions.transform.{dense,LayerNorm}, cls.predictions.bias   heads.mlm (when present:
                                                                         BertForPreTraining checkpoints)

The region embeddings and the other heads are new and keep their random initialisation. Names may
carry a "bert." prefix (BertForPreTraining) and old TensorFlow-converted LayerNorm.gamma / .beta.
"""

from __future__ import annotations

import json
import os

import torch

from .model import ModelConfig

_ARCH = {"hidden_size": "hidden_size", "num_hidden_layers": "num_layers", "num_attention_heads": "num_heads",
         "intermediate_size": "intermediate_size", "layer_norm_eps": "layer_norm_eps", "vocab_size": "vocab_size"}


def read_bert_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder}: run.init_from is not a folder (a Hugging Face BERT folder)")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (run.init_from must hold a Hugging Face BERT config.json)")
    try:
        with open(path) as f:
            hf = json.load(f)
    except ValueError as e:
        raise ValueError(f"{path}: not valid JSON: {e}") from None
    missing = [k for k in _ARCH if k not in hf]
    if missing:
        raise ValueError(f"{path}: lacks {missing}; is this a BERT config?")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"{path}: hidden_act {hf['hidden_act']!r}; this model uses BERT's exact GELU ('gelu')")
    if hf.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"{path}: position_embedding_type {hf['position_embedding_type']!r}; only 'absolute'")
    return hf


def _arch_value(value, kind: type, path: str, key: str):
    """config.json's value for one of our fields, of its type: an integer field takes an integer (2.0 too), never
    a rounded 2.5, a string or a bool; a float field any number."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int and number and float(value).is_integer():
        return int(value)
    if kind is float and number:
        return float(value)
    if kind not in (int, float) and isinstance(value, kind):
        return value
    raise ValueError(f"{path}: {key} is {value!r}, not {'an integer' if kind is int else 'a ' + kind.__name__}")


def apply_bert_config(cfg: ModelConfig, folder: str) -> list[str]:
    """Set cfg's architecture from the folder's config.json; returns what changed ("model.x: a -> b")."""
    hf = read_bert_config(folder)
    changed = []
    for theirs, ours in _ARCH.items():
        value = _arch_value(hf[theirs], type(getattr(cfg, ours)), os.path.join(folder, "config.json"), theirs)
        if getattr(cfg, ours) != value:
            changed.append(f"model.{ours}: {getattr(cfg, ours)} -> {value}")
            setattr(cfg, ours, value)
    if cfg.max_text_len > hf.get("max_position_embeddings", 512):
        raise ValueError(f"model.max_text_len {cfg.max_text_len} exceeds {folder}'s max_position_embeddings "
                         f"{hf.get('max_position_embeddings')}")
    return changed


def bert_tokenizer(folder: str) -> tuple[str, bool] | None:
    """(vocab.txt or tokenizer.json path, lowercase) of the folder, or None if it has neither."""
    lower = True
    tc = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(tc):
        with open(tc) as f:
            lower = bool(json.load(f).get("do_lower_case", True))
    for name in ("vocab.txt", "tokenizer.json"):
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name), lower
    return None


def read_bert_weights(folder: str) -> dict[str, torch.Tensor]:
    """The folder's tensors by Hugging Face name (model.safetensors, pytorch_model.bin, or sharded)."""
    for index, single in (("model.safetensors.index.json", "model.safetensors"),
                          ("pytorch_model.bin.index.json", "pytorch_model.bin")):
        if os.path.isfile(os.path.join(folder, single)):
            return _read_file(os.path.join(folder, single))
        if os.path.isfile(os.path.join(folder, index)):
            with open(os.path.join(folder, index)) as f:
                files = sorted(set(json.load(f)["weight_map"].values()))
            out = {}
            for name in files:
                out.update(_read_file(os.path.join(folder, name)))
            return out
    raise FileNotFoundError(f"{folder}: no model.safetensors or pytorch_model.bin (or their .index.json)")


def _read_file(path: str) -> dict[str, torch.Tensor]:
    try:
        if path.endswith(".safetensors"):
            from safetensors.torch import load_file  # tensors only, by design

            return load_file(path, device="cpu")
        state = torch.load(path, map_location="cpu", weights_only=True)  # refuses pickled code
    except Exception as e:  # noqa: BLE001 - name the file whatever the reader complains about
        raise ValueError(f"{path}: cannot read BERT weights ({type(e).__name__}: {e})") from None
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a dict of tensors, got {type(state).__name__}")
    return state


def _normalise(name: str) -> str:
    name = name.removeprefix("bert.")
    if name.endswith("LayerNorm.gamma"):
        name = name[: -len("gamma")] + "weight"
    elif name.endswith("LayerNorm.beta"):
        name = name[: -len("beta")] + "bias"
    return name


def bert_to_regionbert(hf: dict[str, torch.Tensor], cfg: ModelConfig, prefix: str = "") -> dict[str, torch.Tensor]:
    """Hugging Face BERT tensors -> our state-dict entries (names under prefix, e.g. "encoder.")."""
    w = {_normalise(k): v for k, v in hf.items()}
    out = {}

    def take(theirs: str, ours: str, rows: int | None = None):
        if theirs not in w:
            raise KeyError(theirs)
        out[prefix + ours] = w[theirs][:rows] if rows else w[theirs]

    e = "embeddings."
    take(e + "word_embeddings.weight", "text_embeddings.word.weight")
    take(e + "position_embeddings.weight", "text_embeddings.position.weight", rows=cfg.max_text_len)
    take(e + "LayerNorm.weight", "text_embeddings.ln.weight")
    take(e + "LayerNorm.bias", "text_embeddings.ln.bias")
    types = w[e + "token_type_embeddings.weight"]  # (type_vocab_size, C)
    out[prefix + "type_embeddings.weight"] = types[:2] if len(types) >= 2 else types[[0, 0]]
    for i in range(cfg.num_layers):
        h, o = f"encoder.layer.{i}.", f"layers.{i}."
        for part in ("weight", "bias"):
            qkv = [w[f"{h}attention.self.{n}.{part}"] for n in ("query", "key", "value")]
            out[f"{prefix}{o}attn.qkv.{part}"] = torch.cat(qkv, dim=0)  # (3C, C) / (3C,): q, k, v as split()
            take(f"{h}attention.output.dense.{part}", f"{o}attn.proj.{part}")
            take(f"{h}attention.output.LayerNorm.{part}", f"{o}ln1.{part}")
            take(f"{h}intermediate.dense.{part}", f"{o}mlp.0.{part}")
            take(f"{h}output.dense.{part}", f"{o}mlp.2.{part}")
            take(f"{h}output.LayerNorm.{part}", f"{o}ln2.{part}")
    if "pooler.dense.weight" in w:  # some exports drop the pooler
        take("pooler.dense.weight", "pooler.weight")
        take("pooler.dense.bias", "pooler.bias")
    return out


def mlm_head_weights(hf: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """BertForPreTraining's MLM transform and output bias, as heads.mlm.* entries (empty if absent)."""
    w = {_normalise(k): v for k, v in hf.items()}
    p = "cls.predictions."
    names = {p + "transform.dense.weight": "transform.0.weight", p + "transform.dense.bias": "transform.0.bias",
             p + "transform.LayerNorm.weight": "transform.2.weight", p + "transform.LayerNorm.bias": "transform.2.bias",
             p + "bias": "bias"}
    if not all(k in w for k in names):
        return {}
    return {f"heads.mlm.{ours}": w[theirs] for theirs, ours in names.items()}


def load_bert(model: torch.nn.Module, folder: str) -> list[str]:
    """Copy a Hugging Face BERT's weights into a Pretrainer (or a bare RegionBert). Returns the names of our
    parameters that were loaded. Shapes are checked; a missing tensor is an error naming the file."""
    cfg = model.cfg
    hf = read_bert_weights(folder)
    is_pretrainer = hasattr(model, "encoder")
    try:
        state = bert_to_regionbert(hf, cfg, "encoder." if is_pretrainer else "")
    except KeyError as e:
        raise ValueError(f"{folder}: the BERT weights lack {e.args[0]!r} (layers expected: {cfg.num_layers})") from None
    if is_pretrainer:
        state.update(mlm_head_weights(hf))
    own = model.state_dict()
    for name, t in state.items():
        if own[name].shape != t.shape:
            raise ValueError(f"{folder}: {name} has shape {tuple(t.shape)} there, {tuple(own[name].shape)} here")
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    return sorted(state)
