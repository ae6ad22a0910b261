"""Configs and checkpoints in range: every config value out of its range is an error naming the key; a
loadable checkpoint with a negative step, missing parts or tensors of the wrong shape is an error naming
the checkpoint and the part, before anything trains."""

import dataclasses
import glob
import os

import pytest
import torch
from train_synth import write_dataset

from regionbert.train import checkpoint as ckpt
from regionbert.train.cli import main
from regionbert.train.config import Config, load_config
from regionbert.train.model import ModelConfig
from regionbert.train.optim import build_optimizer, build_scheduler
from regionbert.train.pretrainer import Pretrainer
from regionbert.train.ranges import RULES

CONFIGS = sorted(glob.glob(os.path.join(os.path.dirname(__file__), "..", "configs", "*.toml")))


def test_every_setting_has_a_range():
    cfg = Config()
    keys = {f"{s.name}.{f.name}" for s in dataclasses.fields(cfg) for f in dataclasses.fields(getattr(cfg, s.name))}
    assert keys - set(RULES) == set(), "settings without a rule in train/ranges.py"
    assert set(RULES) - keys == set(), "rules for settings that do not exist"


@pytest.mark.parametrize("path", [None, *CONFIGS])
def test_defaults_and_shipped_configs_are_in_range(path):
    load_config(path)


BAD = [  # (override, what the error must say)
    ("optim.grad_clip=-1", "optim.grad_clip = -1.0 is out of range"),  # gradient ascent, exit 0, before
    ("tasks.wra_iterations=1000000000000000", "tasks.wra_iterations"),  # a step that never ends
    ("data.num_workers=1000000", "data.num_workers"),
    ("data.token_budget=0", "data.token_budget"),
    ("data.max_regions=0", "data.max_regions"),
    ("data.max_batch_size=-1", "data.max_batch_size"),
    ("data.bucket_size=0", "data.bucket_size"),
    ("optim.lr=NaN", "optim.lr = nan"),
    ("optim.lr=-0.001", "optim.lr = -0.001 is out of range"),
    ("optim.eps=Infinity", "optim.eps"),
    ("optim.betas=[0.9, 1.5]", "optim.betas"),
    ("optim.betas=[0.9]", "optim.betas"),
    ("optim.weight_decay=-0.1", "optim.weight_decay"),
    ("optim.warmup_steps=-5", "optim.warmup_steps"),
    ("optim.steps=0", "optim.steps"),
    ("optim.accum_steps=0", "optim.accum_steps"),
    ("tasks.mask_prob=0", "tasks.mask_prob"),
    ("tasks.mask_prob=1.5", "tasks.mask_prob"),
    ("tasks.itm_neg_prob=2", "tasks.itm_neg_prob"),
    ("tasks.itm_neg_window=-1", "tasks.itm_neg_window"),
    ("tasks.wra_weight=-1", "tasks.wra_weight"),
    ("tasks.wra_beta=0", "tasks.wra_beta"),
    ("tasks.mix.mlm=Infinity", "tasks.mix.mlm = inf"),
    ("model.dropout=1", "model.dropout"),
    ("model.layer_norm_eps=0", "model.layer_norm_eps"),
    ("model.num_layers=0", "model.num_layers"),
    ("model.max_text_len=2", "model.max_text_len"),
    ("run.seed=-1", "run.seed"),
    ("run.device=gpu7", "run.device = 'gpu7' is not a device"),
    ("run.log_every=0", "run.log_every"),
    ("run.keep_checkpoints=-2", "run.keep_checkpoints"),
    ("run.eval_batch_pairs=0", "run.eval_batch_pairs"),
    ("run.eval_images=-1", "run.eval_images"),
    ("data.split=\"\"", "data.split"),
]


@pytest.mark.parametrize("override,says", BAD, ids=[b[0].split("=")[0] + "=" + b[0].split("=")[1][:8] for b in BAD])
def test_out_of_range_values_are_errors_naming_the_key(override, says):
    with pytest.raises(ValueError, match="out of range|must be|is not a device") as e:
        load_config(None, [override])
    assert says in str(e.value)


def test_all_problems_at_once_and_the_command_exits_2(capsys):
    assert main(["--print-config", "--set", "optim.grad_clip=-1", "--set", "tasks.wra_iterations=0"]) == 2
    err = capsys.readouterr().err
    assert "optim.grad_clip = -1.0 is out of range" in err and "tasks.wra_iterations = 0 is out of range" in err


# ---- checkpoints -------------------------------------------------------------------------------------

TINY = ModelConfig(vocab_size=20, hidden_size=8, num_layers=1, num_heads=2, intermediate_size=8, feature_dim=4,
                   num_classes=3, max_text_len=8)


def _parts(cfg=TINY):
    torch.manual_seed(0)
    model = Pretrainer(cfg)
    opt = build_optimizer(model, 1e-3, 0.01, [0.9, 0.98], 1e-6)
    sched = build_scheduler(opt, 2, 10)
    # one step, so the optimizer has per-parameter state
    sum(p.sum() for p in model.parameters()).backward()
    opt.step()
    sched.step()
    return model, opt, sched


def _save(path, step=1, **parts):
    model, opt, sched = _parts()
    kw = dict(model=model, optimizer=opt, scheduler=sched, step=step, config={"model": {}})
    kw.update(parts)
    ckpt.save_checkpoint(str(path), **kw)
    return str(path)


def test_a_good_checkpoint_fits_its_run(tmp_path):
    path = _save(tmp_path / "good.pt")
    state = ckpt.load_checkpoint(path)
    model, opt, sched = _parts()
    ckpt.check_resumable(path, state, model, opt, sched)


def test_negative_step_and_broken_parts_are_named(tmp_path):
    with pytest.raises(ValueError, match=r"neg.pt: damaged checkpoint: part 'step' is -3"):
        ckpt.load_checkpoint(_save(tmp_path / "neg.pt", step=-3))
    state = torch.load(_save(tmp_path / "a.pt"), weights_only=True)
    state["model"]["encoder.pooler.weight"] = torch.full((8, 8), float("nan"))
    state["data"] = {"batches": -1}
    state["rng"] = [{"python": 1}]
    torch.save(state, tmp_path / "b.pt")
    with pytest.raises(ValueError) as e:
        ckpt.load_checkpoint(str(tmp_path / "b.pt"))
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'b.pt'}: damaged checkpoint")
    assert "part 'model' holds NaN or inf in ['encoder.pooler.weight']" in msg
    assert "part 'data' has batches = -1" in msg and "part 'rng'" in msg


def test_missing_parts_are_named(tmp_path):
    path = _save(tmp_path / "noopt.pt", optimizer=None)
    model, opt, sched = _parts()
    with pytest.raises(ValueError, match=r"noopt.pt: cannot resume from this checkpoint: it lacks \['optimizer'\]"):
        ckpt.check_resumable(path, ckpt.load_checkpoint(path), model, opt, sched)
    state = torch.load(path, weights_only=True)
    del state["model"]
    torch.save(state, tmp_path / "nomodel.pt")
    with pytest.raises(ValueError, match=r"nomodel.pt: checkpoint lacks \['model'\]"):
        ckpt.load_checkpoint(str(tmp_path / "nomodel.pt"))


def test_wrong_shapes_are_named(tmp_path):
    path = _save(tmp_path / "small.pt")
    bigger = dataclasses.replace(TINY, intermediate_size=16)
    model, opt, sched = _parts(bigger)
    with pytest.raises(ValueError, match=r"small.pt: checkpoint does not fit this run: .*part 'model' tensor "
                                         r"'encoder.layers.0.mlp.0.weight' has shape \(8, 8\), the model's is "
                                         r"\(16, 8\)"):
        ckpt.check_resumable(path, ckpt.load_checkpoint(path), model, opt, sched)
    # the model fits but the optimizer state does not (e.g. a checkpoint assembled from two runs)
    state = torch.load(path, weights_only=True)
    first = min(state["optimizer"]["state"])
    state["optimizer"]["state"][first]["exp_avg"] = torch.zeros(3)
    torch.save(state, tmp_path / "mixed.pt")
    model, opt, sched = _parts()
    with pytest.raises(ValueError, match=rf"mixed.pt: .*part 'optimizer' state 'exp_avg' of parameter {first} "
                                         r"has shape \(3,\)"):
        ckpt.check_resumable(str(tmp_path / "mixed.pt"), ckpt.load_checkpoint(str(tmp_path / "mixed.pt")), model,
                             opt, sched)


def test_resuming_from_a_checkpoint_of_the_wrong_shape_exits_2_naming_it(tmp_path, capsys):
    """End to end: a run, its checkpoint edited to a wrong shape (same config), `--resume` refuses it cleanly
    (before: a RuntimeError traceback from load_state_dict)."""
    data = write_dataset(str(tmp_path / "d"), n_train=24, n_val=0, feature_dim=8, min_boxes=1, max_boxes=6)
    args = [f"--set=data.{k}={v}" for k, v in data.items()] + [
        "--set=model.hidden_size=16", "--set=model.num_layers=1", "--set=model.num_heads=2",
        "--set=model.intermediate_size=16", "--set=model.max_text_len=16", "--set=data.num_workers=0",
        "--set=data.eval_split=null", "--set=run.plot=false", "--set=run.tensorboard=false",
        "--set=optim.steps=1", "--set=run.log_every=1", "--out", str(tmp_path / "run")]
    assert main(args) == 0
    path = str(tmp_path / "run" / "checkpoint.pt")
    state = torch.load(path, weights_only=True)
    state["model"]["encoder.pooler.weight"] = torch.zeros(4, 4)
    os.remove(path)  # a hard link to the step file: replace, don't write through it
    torch.save(state, path)
    capsys.readouterr()
    assert main(args + ["--resume", path, "--set=optim.steps=2"]) == 2
    err = capsys.readouterr().err
    assert f"{path}: checkpoint does not fit this run: part 'model' tensor 'encoder.pooler.weight' has shape (4, 4)" \
        in err
