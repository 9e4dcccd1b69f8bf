"""Training at scale, on CPU: learning-rate schedules (diffusers' curves), gradient
accumulation, and Lightning loggers beside the CSV the reports read."""

import csv
import importlib.util
import math

import pytest
import torch

from lgframe.errors import LgframeError
from lgframe.models.registry import model_from_config
from lgframe.training.recipes import load_recipe, to_plain
from lgframe.training.stages import fit, recipe_model_config
from lgframe.training.tasks import make_task

QUIET = ["trainer.progress=false", "sample.n=0"]


def _lrs(over: list[str], steps: int) -> dict[str, list[float]]:
    """Each parameter group's learning rate at optimizer steps 0..steps-1."""
    cfg = load_recipe("dit_digits_descend", ["model.name=DiT-Pico/2", *over])
    task = make_task(to_plain(cfg), model_from_config(recipe_model_config(cfg)))
    task.configure_model()
    o = task.configure_optimizers()
    opt, sched = o["optimizer"], o["lr_scheduler"]["scheduler"]
    out: dict[str, list[float]] = {g["name"]: [] for g in opt.param_groups}
    for _ in range(steps):
        for g in opt.param_groups:
            out[g["name"]].append(g["lr"])
        opt.step()
        sched.step()
    return out


def test_cosine_schedule_follows_the_warmup_then_diffusers_cosine():
    lrs = _lrs(["optim.schedule=cosine", "optim.warmup_steps=4", "trainer.max_steps=20", "init.unfreeze_at=8",
                "optim.lr=1e-3"], 20)
    free = lrs["free"]
    assert free[:4] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3])  # linear warmup, (step + 1) / 4
    for s in range(4, 20):  # then 0.5 (1 + cos(pi t)), t the share of the 16 steps after the warmup
        assert free[s] == pytest.approx(1e-3 * 0.5 * (1 + math.cos(math.pi * (s - 4) / 16)))
    assert lrs["learngene"][:8] == [0.0] * 8  # phase 1: frozen
    # phase 2 at 8: its own warmup (init.unfreeze_warmup, default optim.warmup_steps = 4) times the cosine
    assert lrs["learngene"][8:12] == pytest.approx([free[s] * (s - 7) / 4 for s in range(8, 12)])
    assert lrs["learngene"][12:] == pytest.approx(free[12:])


def test_linear_and_constant_schedules():
    lin = _lrs(["optim.schedule=linear", "optim.warmup_steps=0", "trainer.max_steps=10", "optim.lr=1e-3"], 10)["free"]
    assert lin == pytest.approx([1e-3 * (10 - s) / 10 for s in range(10)])
    const = _lrs(["optim.warmup_steps=0", "trainer.max_steps=10", "optim.lr=1e-3"], 10)["free"]
    assert const == pytest.approx([1e-3] * 10)


def test_bad_schedule_and_logger_names_fail_at_load_time():
    with pytest.raises(LgframeError, match="optim.schedule='cosin'; valid: constant, cosine, linear"):
        load_recipe("dit_digits_pretrain", ["optim.schedule=cosin"])
    with pytest.raises(LgframeError, match="trainer.logger has 'mlflow'; valid: csv, tensorboard, wandb"):
        load_recipe("dit_digits_pretrain", ["trainer.logger=[csv,mlflow]"])
    with pytest.raises(LgframeError, match="trainer.accumulate_grad_batches"):
        load_recipe("dit_digits_pretrain", ["trainer.accumulate_grad_batches=0"])


def _vit(tmp_path, name, *over):
    cfg = load_recipe("vit_digits_pretrain", [f"out_dir={tmp_path}", f"name={name}", "model.name=ViT-Pico/2",
                                              "model.depth=2", "constraint=scratch", "ema.enabled=false",
                                              "data.augment=false", "optim.name=sgd", "optim.lr=0.05",
                                              "optim.weight_decay=0", "optim.warmup_steps=0", "trainer.max_steps=6",
                                              "trainer.val_every=3", "seed=0", *QUIET, *over])
    return fit(cfg, extract_learngene=False)


def test_accumulating_two_batches_of_16_is_one_batch_of_32(tmp_path):
    """SGD, no dropout or augmentation: 2 x 16 accumulated is the same step as 32 (same
    images in the same order); validation at the same optimizer steps."""
    big = _vit(tmp_path, "big", "data.batch_size=32")
    acc = _vit(tmp_path, "acc", "data.batch_size=16", "trainer.accumulate_grad_batches=2")
    assert [s for s, _ in acc.curve] == [s for s, _ in big.curve] == [0, 3, 6]
    a, b = big.task.model.state_dict(), acc.task.model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    assert acc.curve[-1][1] == pytest.approx(big.curve[-1][1], rel=1e-4)
    # and the check can fail: 6 plain steps of 16 end elsewhere
    small = _vit(tmp_path, "small", "data.batch_size=16").task.model.state_dict()
    assert max(float((small[k] - a[k]).abs().max()) for k in a) > 1e-3


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed (lgframe[tensorboard])")
def test_tensorboard_logger_writes_event_files(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    r = _vit(tmp_path, "tb", "trainer.logger=[csv,tensorboard]", "trainer.log_every=1")
    events = list((r.run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert events, list(r.run_dir.iterdir())
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    assert "train/loss" in acc.Tags()["scalars"] and "val/acc" in acc.Tags()["scalars"]
    with open(r.run_dir / "metrics.csv") as f:  # the same values as the CSV the reports read
        csv_loss = [float(row["train/loss"]) for row in csv.DictReader(f) if row.get("train/loss")]
    assert len(csv_loss) >= 5 and [e.value for e in acc.Scalars("train/loss")] == pytest.approx(csv_loss, rel=1e-6)
    assert [e.value for e in acc.Scalars("val/acc")] == pytest.approx([a for _, a in r.acc_curve])  # steps 0, 3, 6
    assert (r.run_dir / "metrics.csv").is_file() and r.curve[-1][0] == 6  # the CSV is still written and read


@pytest.mark.skipif(importlib.util.find_spec("wandb") is not None, reason="wandb is installed")
def test_wandb_without_the_package_is_one_clear_error(tmp_path):
    with pytest.raises(LgframeError, match=r'needs the wandb package: pip install "lgframe\[wandb\]"'):
        _vit(tmp_path, "wb", "trainer.logger=[csv,wandb]")
    assert not (tmp_path / "wb").exists()  # refused before the run folder is made


def _grads_and_saved_bytes(model, x, t, y) -> tuple[dict, int]:
    """Gradients of one forward-backward and the bytes autograd kept for the backward (the
    activations, parameters' own storages excluded)."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(x, t, y)
    out.square().mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}, sum(saved.values())


@pytest.mark.parametrize("constraint", ["scratch", "svd", "tucker"])
def test_activation_checkpointing_same_gradients_less_memory(constraint):
    from lgframe.core.registry import get_constraint
    from lgframe.models.registry import create_model
    from lgframe.training.speed import set_activation_checkpointing

    torch.manual_seed(0)
    model = create_model("DiT-Pico/2", depth=4, image_size=8, in_channels=1)
    get_constraint(constraint).attach(model, init="random")
    for block in model.blocks:  # adaLN-Zero blocks start as the identity: give them something to compute
        torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.05)
    x, t, y = torch.randn(8, 1, 8, 8), torch.randint(0, 1000, (8,)), torch.randint(0, 10, (8,))
    plain, plain_bytes = _grads_and_saved_bytes(model, x, t, y)
    assert set_activation_checkpointing(model) == 4
    ckpt, ckpt_bytes = _grads_and_saved_bytes(model, x, t, y)
    assert plain.keys() == ckpt.keys()
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], rtol=1e-5, atol=1e-7)
    # only each block's inputs are kept: under a third of the activations at depth 4
    assert ckpt_bytes < plain_bytes / 3, (ckpt_bytes, plain_bytes)
    with torch.no_grad():  # inference is unchanged
        set_activation_checkpointing(model, False)
        ref = model(x, t, y)
        set_activation_checkpointing(model, True)
        assert torch.equal(model(x, t, y), ref)


def test_activation_checkpointing_in_a_run(tmp_path):
    """The recipe switch reaches the model: a run with activation checkpointing is the same run (SGD)."""
    plain = _vit(tmp_path, "plain", "data.batch_size=16")
    ac = _vit(tmp_path, "ac", "data.batch_size=16", "trainer.activation_checkpointing=true")
    assert all(b.activation_checkpointing for b in ac.task.model.blocks)
    a, b = plain.task.model.state_dict(), ac.task.model.state_dict()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # a cold inductor compile on 2 cores: about 90 s
def test_compile_in_a_run(tmp_path):
    """trainer.compile: the blocks are compiled in place (same names) and the run ends where the
    plain one does; or the test says why the compiler does not work on this machine."""
    try:
        torch.compile(lambda v: v * 2)(torch.ones(2))
    except Exception as e:  # no working compiler on this machine
        pytest.skip(f"torch.compile does not work here: {type(e).__name__}: {str(e)[:200]}")
    plain = _vit(tmp_path, "plain", "data.batch_size=16")
    a = plain.task.model.state_dict()
    comp = _vit(tmp_path, "comp", "data.batch_size=16", "trainer.compile=true")
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in comp.task.model.blocks)
    c = comp.task.model.state_dict()
    assert c.keys() == a.keys()  # compiling in place keeps the parameter names
    assert comp.curve[-1][1] == pytest.approx(plain.curve[-1][1], rel=1e-3)
