"""optim.task_state: Adam's moments shared by every task (UNITER's) or kept per task (TaskAdamW,
docs/itm-plateau.md): the moments really are separate, a step of one task equals AdamW's on that task
alone, a checkpoint carries every task's moments and resumes exactly, and mismatched checkpoints and
settings are refused by name."""

import pytest
import torch

from regionbert.train.checkpoint import check_resumable
from regionbert.train.config import Config, check
from regionbert.train.optim import AdamW, TaskAdamW, build_optimizer, task_state_per_task


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2))


def _loss(model, task, step):
    g = torch.Generator().manual_seed(1000 * step + len(task))
    x = torch.randn(8, 6, generator=g)
    scale = 100.0 if task == "big" else 0.01  # MLM-sized and ITM-sized gradients
    return scale * (model(x) ** 2).mean()


def _train(model, opt, tasks, start=0):
    for step, task in enumerate(tasks, start):
        _loss(model, task, step).backward()
        if isinstance(opt, TaskAdamW):
            opt.use(task)
        opt.step()
        opt.zero_grad(set_to_none=True)


TASKS = ["big", "small", "big", "big", "small", "big", "small", "small", "big", "small"]


def test_each_task_is_normalised_by_its_own_gradients():
    model = _model()
    opt = TaskAdamW(model.parameters(), lr=1e-2)
    _train(model, opt, TASKS)
    sd = opt.state_dict()
    big, small = sd["task_states"]["big"], sd["task_states"]["small"]
    assert int(big[0]["step"]) == TASKS.count("big") and int(small[0]["step"]) == TASKS.count("small")
    # the second moments differ by about the square of the gradients' ratio (1e4 squared): nothing shared
    ratio = (big[0]["exp_avg_sq"].mean() / small[0]["exp_avg_sq"].mean()).item()
    assert ratio > 1e6, ratio
    # with the moments shared, the small task's steps would be divided by the big one's gradients
    shared = _model()
    opt_shared = AdamW(shared.parameters(), lr=1e-2)
    _train(shared, opt_shared, TASKS)
    assert opt_shared.state_dict()["state"][0]["exp_avg_sq"].mean() > 0.1 * big[0]["exp_avg_sq"].mean()


def test_a_task_alone_steps_as_plain_adamw():
    a, b = _model(), _model()
    _train(a, TaskAdamW(a.parameters(), lr=1e-2), ["small"] * 6)
    _train(b, AdamW(b.parameters(), lr=1e-2), ["small"] * 6)
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))


def test_moments_round_trip_and_the_run_continues_exactly(tmp_path):
    whole = _model()
    opt = TaskAdamW(whole.parameters(), lr=1e-2)
    _train(whole, opt, TASKS)

    part = _model()
    opt1 = TaskAdamW(part.parameters(), lr=1e-2)
    _train(part, opt1, TASKS[:5])
    torch.save({"model": part.state_dict(), "optimizer": opt1.state_dict()}, tmp_path / "c.pt")
    state = torch.load(tmp_path / "c.pt", weights_only=True)
    resumed = _model(seed=5)
    resumed.load_state_dict(state["model"])
    opt2 = TaskAdamW(resumed.parameters(), lr=1e-2)
    opt2.load_state_dict(state["optimizer"])
    _train(resumed, opt2, TASKS[5:], start=5)
    assert all(torch.equal(p, q) for p, q in zip(whole.parameters(), resumed.parameters(), strict=True))


def test_a_checkpoint_of_the_other_kind_is_refused_by_name(tmp_path):
    model = _model()
    per_task, shared = TaskAdamW(model.parameters(), lr=1e-2), AdamW(model.parameters(), lr=1e-2)
    _train(model, per_task, TASKS[:3])
    _train(model, shared, TASKS[:3])
    sched = {"last_epoch": 3}
    for saved, run, setting in ((per_task, AdamW(model.parameters()), "per_task"),
                                (shared, TaskAdamW(model.parameters()), "shared")):
        state = {"model": model.state_dict(), "optimizer": saved.state_dict(), "scheduler": sched}
        with pytest.raises(ValueError, match=f"c.pt: .*optim.task_state={setting}"):
            check_resumable("c.pt", state, model, run)
    with pytest.raises(ValueError, match="optim.task_state=shared"):
        TaskAdamW(model.parameters()).load_state_dict(shared.state_dict())
    # a per-task state with a tensor of the wrong shape is named, as for shared moments
    bad = per_task.state_dict()
    bad["task_states"]["big"][0]["exp_avg"] = torch.zeros(3)
    with pytest.raises(ValueError, match="exp_avg.*parameter 0"):
        check_resumable("c.pt", {"model": model.state_dict(), "optimizer": bad, "scheduler": sched}, model,
                        TaskAdamW(model.parameters()))


def test_the_setting_resolves_and_is_checked():
    assert task_state_per_task("auto", "", 1) is True  # from scratch
    assert task_state_per_task("auto", "bert-folder", 1) is False  # UNITER's with a pretrained BERT
    assert task_state_per_task("auto", "", 4) is False  # a step of several tasks' batches
    assert task_state_per_task("shared", "", 1) is False and task_state_per_task("per_task", "b", 1) is True
    assert isinstance(build_optimizer(_model(), 1e-3, 0.01, per_task=True), TaskAdamW)
    assert type(build_optimizer(_model(), 1e-3, 0.01)) is AdamW
    cfg = Config()
    cfg.optim.task_state = "per_task"
    cfg.optim.accum_steps = 2
    with pytest.raises(ValueError, match="per_task needs optim.accum_steps=1"):
        check(cfg)
    cfg.optim.task_state = "each"
    with pytest.raises(ValueError, match="optim.task_state must be auto, shared or per_task"):
        check(cfg)
