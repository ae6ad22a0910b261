"""A pretraining run as a Hugging Face model folder, and loading such a folder back without transformers.

    regionbert-pretrain export RUN -o DIR

    DIR/model.safetensors             the weights (float32): the encoder under `regionbert.`, the heads under
                                      `heads.`; tied weights (MLM decoder = word embeddings, MRFR regressor =
                                      region feature projection) and the shared MRC / MRC-kl classifier once
    DIR/config.json                   RegionBertConfig (model_type "regionbert", auto_map -> the files below)
    DIR/configuration_regionbert.py   remote code for transformers (trust_remote_code=True): torch +
    DIR/modeling_regionbert.py        transformers only, the trainer's forward line for line (train/hf/)
    DIR/vocab.txt (or tokenizer.json), tokenizer_config.json, special_tokens_map.json: the run's tokenizer
    DIR/training_config.json          the run's resolved config (what trained it)
    DIR/README.md                     the model card (model_card, below)

Three ways to load it: transformers (AutoModel / AutoModelForPreTraining, trust_remote_code=True); ours,
`load_exported(DIR)` -> Pretrainer, without transformers; regionbert.train.infer.Model.load(DIR) for
scores and embeddings. Nothing is unpickled: model.safetensors holds tensors only; a folder that has
only a pytorch_model.bin is read with torch.load(weights_only=True). Names, shapes and dtypes are
checked against config.json before a tensor is read.

The folder is written in DIR.partial and renamed into place, so a DIR that exists is a complete export.
"""

from __future__ import annotations

import json
import os
import shutil

import torch

from .checkpoint import load_checkpoint
from .model import ModelConfig
from .optim import task_state_per_task
from .pretrainer import Pretrainer

HF_FILES = ("configuration_regionbert.py", "modeling_regionbert.py")
WEIGHTS = "model.safetensors"
PICKLE = "pytorch_model.bin"
ENCODER, HF_ENCODER = "encoder.", "regionbert."
TIED = ("heads.mlm.weight", "heads.mrfr.weight")  # the same Parameters as the encoder's: stored once, there

# ModelConfig field -> config.json key (BERT's names where BERT has the thing)
_NAMES = {"vocab_size": "vocab_size", "hidden_size": "hidden_size", "num_layers": "num_hidden_layers",
          "num_heads": "num_attention_heads", "intermediate_size": "intermediate_size",
          "max_text_len": "max_position_embeddings", "feature_dim": "feature_dim", "num_classes": "num_region_classes",
          "loc_dim": "loc_dim", "dropout": "hidden_dropout_prob", "layer_norm_eps": "layer_norm_eps",
          "region_mask_embedding": "region_mask_embedding", "shared_region_classifier": "shared_region_classifier",
          "itm_head_init": "itm_head_init"}


class ExportError(ValueError):
    """A run that cannot be exported or a model folder that cannot be loaded; the message names the file."""


# ---- names: our Pretrainer's state dict <-> the exported file's -------------------------------------------

def _skipped(name: str, cfg: ModelConfig) -> bool:
    """Entries not stored: tied weights, and MRC-kl's classifier when it is MRC's (the same module)."""
    return name in TIED or (cfg.shared_region_classifier and name.startswith("heads.mrc_kl."))


def to_hf_state(model: Pretrainer) -> dict[str, torch.Tensor]:
    """The tensors model.safetensors holds, by exported name (each its own contiguous float32 copy)."""
    out = {}
    for name, t in model.state_dict().items():
        if not _skipped(name, model.cfg):
            hf = HF_ENCODER + name[len(ENCODER):] if name.startswith(ENCODER) else name
            out[hf] = t.detach().to("cpu", torch.float32).contiguous().clone()
    return out


def expected_hf_shapes(cfg: ModelConfig) -> dict[str, tuple]:
    """Exported name -> shape, for a model of this config (built on the meta device: nothing allocated)."""
    with torch.device("meta"):
        model = Pretrainer(cfg)
    return {(HF_ENCODER + n[len(ENCODER):] if n.startswith(ENCODER) else n): tuple(t.shape)
            for n, t in model.state_dict().items() if not _skipped(n, cfg)}


def from_hf_name(name: str) -> str:
    return ENCODER + name[len(HF_ENCODER):] if name.startswith(HF_ENCODER) else name


# ---- config ---------------------------------------------------------------------------------------------------

def hf_config(model: ModelConfig, max_regions: int, class_names: list | None) -> dict:
    out = {"architectures": ["RegionBertForPreTraining"], "model_type": "regionbert",
           "auto_map": {"AutoConfig": "configuration_regionbert.RegionBertConfig",
                        "AutoModel": "modeling_regionbert.RegionBertModel",
                        "AutoModelForPreTraining": "modeling_regionbert.RegionBertForPreTraining"}}
    for ours, theirs in _NAMES.items():
        out[theirs] = getattr(model, ours)
    out.update(attention_probs_dropout_prob=model.dropout, hidden_act="gelu", type_vocab_size=2, pad_token_id=0,
               max_regions=max_regions, region_class_names=class_names, dtype="float32")
    return out


def checked_model_config(values: dict, path: str) -> ModelConfig:
    """A ModelConfig from a table of its fields, each checked against the trainer's types and ranges
    (train/ranges.py), naming the file and the key: nothing is built from a config out of range."""
    from .config import Config, check, set_value

    cfg = Config()
    try:
        for k, v in values.items():
            set_value(cfg, f"model.{k}", v, path)
        check(cfg)
    except ValueError as e:
        raise ExportError(str(e) if str(e).startswith(path) else f"{path}: {e}") from None
    return cfg.model


def model_config_from_hf(hf: dict, path: str) -> ModelConfig:
    """Our ModelConfig from an exported config.json."""
    if not isinstance(hf, dict) or hf.get("model_type") != "regionbert":
        got = hf.get("model_type") if isinstance(hf, dict) else type(hf).__name__
        raise ExportError(f"{path}: not a regionbert model config (model_type {got!r})")
    missing = [k for k in _NAMES.values() if k not in hf]
    if missing:
        raise ExportError(f"{path}: lacks {missing}")
    if hf.get("hidden_act", "gelu") != "gelu":
        raise ExportError(f"{path}: hidden_act {hf['hidden_act']!r}; this model has exact GELU ('gelu') only")
    return checked_model_config({ours: hf[theirs] for ours, theirs in _NAMES.items()}, path)


def max_regions_of(hf: dict, path: str) -> int:
    v = hf.get("max_regions", 100)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 10_000:
        raise ExportError(f"{path}: max_regions {v!r} is not an integer in 1..10000")
    return v


# ---- export ---------------------------------------------------------------------------------------------------

def run_checkpoint(run: str) -> str:
    """RUN/checkpoint.pt (or the checkpoint file given); an error naming what is missing otherwise."""
    if os.path.isfile(run):
        return run
    if not os.path.isdir(run):
        raise FileNotFoundError(f"{run}: no run folder or checkpoint file here")
    path = os.path.join(run, "checkpoint.pt")
    if not os.path.isfile(path):
        raise ExportError(f"{path}: not found: the run has saved no checkpoint yet (and {run} is no exported model "
                          f"folder either: no {WEIGHTS})")
    return path


def model_from_checkpoint(path: str) -> tuple[Pretrainer, dict, dict]:
    """(Pretrainer with the checkpoint's weights in eval mode, the run's config dict, the checkpoint state)."""
    state = load_checkpoint(path)  # weights_only=True, parts checked
    config = state["config"]
    if not isinstance(config.get("model"), dict):
        raise ExportError(f"{path}: its config has no model section")
    cfg = checked_model_config(config["model"], path)
    with torch.device("meta"):  # the shapes this config gives, before anything is allocated
        want = {k: tuple(v.shape) for k, v in Pretrainer(cfg).state_dict().items()}
    _check_names_shapes(path, {k: tuple(v.shape) for k, v in state["model"].items()}, want)
    model = Pretrainer(cfg)
    model.load_state_dict(state["model"])
    return model.eval(), config, state


def _check_names_shapes(path: str, have: dict, want: dict) -> None:
    lost, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if lost:
        raise ExportError(f"{path}: lacks tensor {lost[0]!r} (shape {want[lost[0]]})"
                          + (f" and {len(lost) - 1} more" if len(lost) > 1 else ""))
    if extra:
        raise ExportError(f"{path}: has tensor {extra[0]!r}, which this config's model does not have"
                          + (f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""))
    for k in sorted(want):
        if tuple(have[k]) != tuple(want[k]):
            raise ExportError(f"{path}: tensor {k!r} has shape {tuple(have[k])}, the config's model has "
                              f"{tuple(want[k])}")


def resolve_tokenizer(config: dict, run: str, tokenizer: str | None) -> tuple[str, bool]:
    """(tokenizer file, lowercase) of the run: --tokenizer if given, else the run config's data.tokenizer."""
    data = config.get("data") or {}
    path = tokenizer or data.get("tokenizer") or ""
    if not path or not os.path.isfile(path):
        raise ExportError(f"{run}: the run's tokenizer {path!r} (data.tokenizer) is not there; pass --tokenizer "
                          "with the vocab.txt or tokenizer.json it was trained with")
    return path, bool(data.get("lowercase", True))


def _tokenizer_files(out: str, path: str, lowercase: bool, max_len: int, vocab_size: int) -> None:
    from .text import Text

    text = Text(path, max_len, lowercase)  # checks the special tokens are there
    if text.vocab_size != vocab_size:
        raise ExportError(f"{path}: {text.vocab_size} tokens, but the model was trained with {vocab_size}: not "
                          "the run's tokenizer")
    specials = {"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]", "cls_token": "[CLS]",
                "mask_token": "[MASK]"}
    if path.endswith(".json"):
        shutil.copyfile(path, os.path.join(out, "tokenizer.json"))
        tc = {"tokenizer_class": "PreTrainedTokenizerFast"}
    else:  # BertTokenizer(Fast) from vocab.txt encodes as our Text does ([CLS] words [SEP], same WordPiece)
        shutil.copyfile(path, os.path.join(out, "vocab.txt"))
        tc = {"tokenizer_class": "BertTokenizer", "do_lower_case": lowercase, "tokenize_chinese_chars": True,
              "strip_accents": None}
    tc.update(specials, model_max_length=max_len, clean_up_tokenization_spaces=True)
    _write_json(os.path.join(out, "tokenizer_config.json"), tc)
    _write_json(os.path.join(out, "special_tokens_map.json"), specials)


def _write_json(path: str, value) -> None:
    with open(path, "w") as f:
        json.dump(value, f, indent=1)
        f.write("\n")


def export(run: str, out: str, tokenizer: str | None = None, print_fn=print) -> str:
    """Write the model folder `out` from a run folder (or a checkpoint file). Returns out."""
    from safetensors.torch import save_file

    ckpt = run_checkpoint(run)
    if os.path.lexists(out):
        raise ExportError(f"{out}: exists; export writes a new folder (remove it or choose another -o)")
    model, config, state = model_from_checkpoint(ckpt)
    tok, lowercase = resolve_tokenizer(config, run, tokenizer)
    cfg = model.cfg
    max_regions = int((config.get("data") or {}).get("max_regions", 100))
    class_names = _class_names(config)
    partial = f"{out.rstrip(os.sep)}.partial"
    if os.path.lexists(partial):
        shutil.rmtree(partial)  # an export that died half-way: ours to redo
    os.makedirs(partial)
    try:
        save_file(to_hf_state(model), os.path.join(partial, WEIGHTS), metadata={"format": "pt"})
        hf = hf_config(cfg, max_regions, class_names)
        _write_json(os.path.join(partial, "config.json"), hf)
        here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "hf")
        for name in HF_FILES:
            shutil.copyfile(os.path.join(here, name), os.path.join(partial, name))
        _tokenizer_files(partial, tok, lowercase, cfg.max_text_len, cfg.vocab_size)
        _write_json(os.path.join(partial, "training_config.json"), config)
        with open(os.path.join(partial, "README.md"), "w") as f:
            f.write(model_card(run if os.path.isdir(run) else os.path.dirname(ckpt), config, state["step"], hf,
                               print_fn=print_fn))
        os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return out


def _class_names(config: dict) -> list | None:
    """The detector's class names from the run's shards (for MRC's logits), None where they cannot be read."""
    from regionbert.data import ShardError, ShardSet

    d = config.get("data") or {}
    try:
        return ShardSet(d.get("shards") or [], verify=False, allow_outside=bool(d.get("allow_outside"))).meta.get(
            "class_names")
    except (ShardError, OSError, ValueError, KeyError):
        return None


# ---- load -----------------------------------------------------------------------------------------------------

def is_exported(folder: str) -> bool:
    """A model folder (config.json and weights), not a run folder (whose config.json is the run's)."""
    has = lambda name: os.path.isfile(os.path.join(folder, name))  # noqa: E731
    return os.path.isdir(folder) and has("config.json") and (has(WEIGHTS) or has(PICKLE)) and not has("checkpoint.pt")


def read_hf_config(folder: str) -> dict:
    path = os.path.join(folder, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not found (an exported regionbert model folder has one)")
    try:
        with open(path) as f:
            return json.load(f)
    except (ValueError, RecursionError) as e:
        raise ExportError(f"{path}: not valid JSON ({e})") from None


def read_exported_weights(folder: str, cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The folder's tensors by exported name, checked against cfg: names and shapes from the file's header
    before any tensor is read (safetensors), floating dtypes, finite values."""
    want = expected_hf_shapes(cfg)
    st, pt = os.path.join(folder, WEIGHTS), os.path.join(folder, PICKLE)
    if os.path.isfile(st):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(st, framework="pt", device="cpu") as f:
                _check_names_shapes(st, {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}, want)
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ExportError(f"{st}: not a readable safetensors file ({type(e).__name__}: {e})") from None
        path = st
    elif os.path.isfile(pt):
        # a pickle: read with weights_only=True, which refuses anything but tensors and plain containers
        try:
            tensors = torch.load(pt, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 - name the file whatever torch complains about
            raise ExportError(f"{pt}: refused: not a weights-only file ({type(e).__name__}: {e}); nothing in it "
                              "was run") from None
        if not isinstance(tensors, dict) or not all(isinstance(k, str) and torch.is_tensor(v)
                                                    for k, v in tensors.items()):
            raise ExportError(f"{pt}: not a table of named tensors")
        _check_names_shapes(pt, {k: tuple(v.shape) for k, v in tensors.items()}, want)
        path = pt
    else:
        raise FileNotFoundError(f"{folder}: no {WEIGHTS} (or {PICKLE})")
    for k, t in tensors.items():
        if not t.is_floating_point():
            raise ExportError(f"{path}: tensor {k!r} has dtype {t.dtype}, not a floating type")
        if not torch.isfinite(t).all():
            raise ExportError(f"{path}: tensor {k!r} holds NaN or inf")
    return tensors


def load_exported(folder: str, device="cpu") -> Pretrainer:
    """An exported folder as our Pretrainer (eval mode), without transformers."""
    hf = read_hf_config(folder)
    cfg = model_config_from_hf(hf, os.path.join(folder, "config.json"))
    tensors = read_exported_weights(folder, cfg)
    model = Pretrainer(cfg)
    state = {from_hf_name(k): v.to(torch.float32) for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    # what the file does not hold is tied to what it holds (or MRC-kl's classifier is MRC's): nothing else
    assert not unexpected and all(_skipped(n, cfg) for n in missing), (missing, unexpected)
    return model.to(device).eval()


# ---- the model card -------------------------------------------------------------------------------------------

_FIGURES = {"itm_acc": "ITM accuracy (matched vs a random other image; chance 0.5)",
            "mlm_acc": "masked word accuracy", "mrc_acc": "masked region class accuracy (detector's best class)",
            "mrc_kl_acc": "masked region class accuracy (MRC-kl head)",
            "t2i_r1": "text-to-image R@1", "t2i_r5": "text-to-image R@5", "t2i_r10": "text-to-image R@10",
            "i2t_r1": "image-to-text R@1", "i2t_r5": "image-to-text R@5", "i2t_r10": "image-to-text R@10"}


def _last_eval(run_dir: str) -> dict | None:
    """The last held-out evaluation in RUN/log.jsonl ({"step", "eval": {...}}), or None."""
    path = os.path.join(run_dir, "log.jsonl")
    last = None
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                try:
                    row = json.loads(line)
                except ValueError:  # a line cut by a crash: the rest still counts
                    continue
                if isinstance(row, dict) and isinstance(row.get("eval"), dict):
                    last = row
    return last


def _data_section(config: dict) -> list[str]:
    """The shards' provenance (their metadata) and the caption counts, or why they could not be read."""
    from regionbert.data import ShardError, ShardSet

    from .text import read_manifest

    d = config.get("data") or {}
    out = ["## Data it saw", ""]
    try:
        shards = ShardSet(d.get("shards") or [], verify=False, allow_outside=bool(d.get("allow_outside")))
    except (ShardError, OSError, ValueError, KeyError) as e:
        out += [f"Shards: {d.get('shards')} (not readable at export time: {e})", ""]
        shards = None
    if shards is not None:
        out += ["| shard | records | detector | weights | weights digest | box policy | features |",
                "|---|---|---|---|---|---|---|"]
        for s in shards.shards:
            m = s.meta
            ex = m.get("extractor") or {}
            out.append(f"| `{s.path}` | {len(s)} | {ex.get('detector')} | {ex.get('weights')} | "
                       f"{ex.get('weights_digest')} | {ex.get('box_policy')} | {m.get('feature_dim')} x "
                       f"{m.get('feature_dtype')} |")
        m = shards.meta
        ex = m.get("extractor") or {}
        names = m.get("class_names")
        out += ["", f"Extractor `{ex.get('name')}`, settings `{json.dumps(ex.get('settings'), sort_keys=True)}`; "
                f"{len(names) if names else 0} detector classes (background at 0), box format "
                f"{m.get('box_format')}; at most {d.get('max_regions')} regions per image were used.", ""]
    captions = d.get("captions")
    try:
        df = read_manifest(captions)
    except (ValueError, OSError) as e:
        out += [f"Captions: `{captions}` (not readable at export time: {e})", ""]
        return out
    out.append(f"Captions: `{captions}`, {len(df)} rows, {df['image_id'].nunique()} images.")
    if "split" in df.columns:
        for split, rows in df.groupby(df["split"].astype(str)):
            role = ("trained on" if split == d.get("split") else "held out for evaluation"
                    if split == d.get("eval_split") else "not used")
            out.append(f"- split `{split}`: {len(rows)} captions of {rows['image_id'].nunique()} images ({role})")
    out.append("")
    return out


def _deviations(config: dict) -> list[str]:
    """The objectives as trained, and where they depart from UNITER (README, 'The objectives')."""
    m, t = config.get("model") or {}, config.get("tasks") or {}
    scratch = not (config.get("run") or {}).get("init_from")
    center = t.get("itm_center_grad") == "on" or (t.get("itm_center_grad") == "auto" and scratch)
    head = {"auto": "scaled" if scratch else "bert"}.get(m.get("itm_head_init"), m.get("itm_head_init"))
    o = config.get("optim") or {}
    per_task = task_state_per_task(o.get("task_state", "shared"), (config.get("run") or {}).get("init_from", ""),
                                   o.get("accum_steps", 1))
    mix = ", ".join(f"{k} {v:g}" for k, v in (t.get("mix") or {}).items() if v)
    out = ["## Objectives and how they differ from UNITER", "",
           f"One task per step, drawn by the ratios {mix}; {t.get('masking')} masking at {t.get('mask_prob')}. "
           "MLM (decoder tied to the word embeddings), MRFR (regression through the transpose of the region "
           "feature projection), MRC / MRC-kl (the detector's best class / its distribution, "
           f"{'one shared classifier' if m.get('shared_region_classifier', True) else 'a classifier each'}), "
           f"ITM on the pooled [CLS] with word-region alignment by IPOT (weight {t.get('wra_weight')}, "
           f"{t.get('wra_iterations')} iterations, beta {t.get('wra_beta')}); negatives "
           + ("from any image (UNITER's)." if not t.get("itm_neg_window") else
              f"among the {2 * t['itm_neg_window']} images nearest in box count (not UNITER's)."), "",
           "Not UNITER's:"]
    if center:
        out.append("- ITM's gradient reaches the encoder with its batch mean removed (`tasks.itm_center_grad`): "
                   "from scratch it was mostly a part that moves every pair's score alike, and held-out ITM sat at "
                   "chance for a seed-dependent number of steps. The forward pass, the loss and the head's own "
                   "gradients are UNITER's.")
    if per_task:
        out.append("- Adam's moments are kept per task (`optim.task_state`): each task's steps are normalised by its "
                   "own gradients, not by those of the task with the largest ones (MLM), which held ITM's steps "
                   "on the shared encoder to a small fraction of the learning rate. UNITER shares them.")
    if head in ("scaled", "zero"):
        out.append(f"- ITM's pooler{' and classifier' if head == 'scaled' else ''} drawn at std 1/sqrt(hidden) "
                   f"{'' if head == 'scaled' else '(classifier at zero) '}instead of BERT's 0.02 "
                   f"(`model.itm_head_init = \"{head}\"`): UNITER starts from BERT's trained pooler.")
    if scratch:
        out.append("- Trained from scratch (UNITER always starts from BERT weights).")
    if not m.get("region_mask_embedding", True):
        out.append("- A masked region's feature is zeros alone, without UNITER's learned mask embedding.")
    if t.get("masking") == "joint":
        out.append("- Joint masking (text and regions masked in the same sample); UNITER's is conditional.")
    if not t.get("wra_weight"):
        out.append("- Word-region alignment off (`tasks.wra_weight = 0`).")
    out += ["- MLM's at-least-one rule masks a random word where the 15% draw chose none (UNITER: the first word).",
            "- Weight decay spares every LayerNorm (UNITER's name filter decays some by accident of naming).", ""]
    return out


def model_card(run_dir: str, config: dict, step: int, hf: dict, print_fn=print) -> str:
    """README.md for an exported folder: YAML front matter for the hub, then what the model is, what it saw,
    how far it trained, its last held-out figures, its objectives and how to load it."""
    o, r, d = config.get("optim") or {}, config.get("run") or {}, config.get("data") or {}
    lines = ["---", "library_name: transformers", "pipeline_tag: feature-extraction",
             "tags:", *(f"- {t}" for t in ("regionbert", "uniter", "vision-language", "multimodal",
                                             "image-text-matching", "region-features", "custom_code")),
             "---", "",
             f"# RegionBert: a {hf['num_hidden_layers']}-layer, {hf['hidden_size']}-wide single-stream multimodal BERT",
             "",
             "Text tokens and detector regions in one transformer (UNITER's design), pretrained with "
             f"`regionbert-pretrain` and exported from `{run_dir}` at step {step} of {o.get('steps')}"
             f"{' (the run had not finished)' if step < (o.get('steps') or 0) else ''}.", "",
             "## Model", "", "| setting | value |", "|---|---|"]
    for k in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "feature_dim", "loc_dim", "num_region_classes", "max_regions",
              "hidden_dropout_prob", "region_mask_embedding", "shared_region_classifier"):
        lines.append(f"| {k} | {hf[k]} |")
    lines += ["", "A region enters as LayerNorm(Linear(feature)) + LayerNorm(Linear(location)) + the region type "
              f"embedding; its location is the {hf['loc_dim']}-d vector "
              + ("[x1/W, y1/H, x2/W, y2/H, w/W, h/H, w*h/(W*H)]" if hf["loc_dim"] == 7 else
                 "[x1/W, y1/H, x2/W, y2/H, w*h/(W*H)]") + " of its box.", ""]
    lines += _data_section(config)
    lines += ["## Training", "",
              f"{step} optimizer steps, lr {o.get('lr')} (warm-up {o.get('warmup_steps')} steps, then linear decay), "
              f"AdamW betas {o.get('betas')}, weight decay {o.get('weight_decay')}, {d.get('token_budget')} tokens "
              f"(text + regions) per batch per process, precision {r.get('precision')}, seed {r.get('seed')}, "
              + (f"initialised from the BERT in `{r['init_from']}`." if r.get("init_from") else "from scratch."),
              "The whole resolved config is in `training_config.json`.", ""]
    ev = _last_eval(run_dir)
    lines += ["## Held-out figures", ""]
    if ev is None:
        lines += ["No held-out evaluation in the run's log.jsonl.", ""]
    else:
        e = ev["eval"]
        lines += [f"At step {ev['step']}, on the manifest's `{d.get('eval_split')}` captions "
                  f"(retrieval among {e.get('retrieval_images', '?')} images, {e.get('retrieval_captions', '?')} "
                  "captions):", "", "| figure | value |", "|---|---|"]
        lines += [f"| {desc} | {e[k]:.3f} |" for k, desc in _FIGURES.items() if isinstance(e.get(k), (int, float))]
        lines.append("")
    lines += _deviations(config)
    lines += ["## How to load", "", "With transformers (this folder carries its own model code):", "", "```python",
              "from transformers import AutoModel, AutoModelForPreTraining, AutoTokenizer",
              "tok = AutoTokenizer.from_pretrained(DIR, trust_remote_code=True)  # a BertTokenizer",
              "model = AutoModelForPreTraining.from_pretrained(DIR, trust_remote_code=True).eval()",
              "enc = tok(captions, padding=True, truncation=True, return_tensors='pt')",
              "out = model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, region_features=features,",
              "            region_locations=locations, region_attention_mask=boxes_mask)",
              "out.itm_score, out.pooler_output, out.text_hidden_state, out.region_hidden_state", "```", "",
              "`features` (B, N, feature_dim) and `locations` (B, N, loc_dim) are a detector's regions as the shards "
              "store them (`record.features`, `record.loc7`), at most max_regions per image.", "",
              "With regionbert (no transformers needed):", "", "```python",
              "from regionbert.data import ShardSet",
              "from regionbert.train.infer import Model",
              "model = Model.load(DIR)",
              "shards = ShardSet(SHARDS)",
              "out = model.encode([shards.get(image_id) for image_id in ids], captions)",
              "out.itm_score, out.cls, out.text_hidden, out.region_hidden", "```", "",
              "or `regionbert-pretrain score DIR --shards SHARDS --captions captions.csv -o scores.csv`.", ""]
    return "\n".join(lines)
