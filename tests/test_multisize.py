"""WeiT multi-size pre-training (recipe section `multisize`, #24 item 4): each optimizer step
trains one nested sub-network (depth and width drawn from the recipe's lists by (seed, step)),
validation the full model; kronecker's bank runs a nested width as the narrower WeiT layer
(the same templates, the scaler blocks of the kept heads)."""

import copy
import types

import pytest
import torch
from helpers import activate

from lgframe.core.constraint import BANK
from lgframe.core.layout import model_dims, select_width, width_index
from lgframe.core.registry import get_constraint
from lgframe.errors import LgframeError
from lgframe.models.nested import depth_layers, nested_size, nested_subnetwork, sample_size
from lgframe.models.registry import create_model
from lgframe.training.recipes import load_recipe, to_plain
from lgframe.training.stages import fit
from lgframe.training.tasks import DiffusionTask, make_task

QUIET = ["trainer.progress=false", "trainer.log_every=1", "sample.n=0", "ema.enabled=false"]
SIZE = ["model.name=DiT-Pico/2"]  # depth 4, width 64, 2 heads of 32
MULTI = ["multisize.depths=[2,3]", "multisize.widths=[32]"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def recipe(*extra):
    return to_plain(load_recipe("dit_digits_pretrain", ["constraint=kronecker", *SIZE, *QUIET, *extra]))


def kronecker_task(*extra, seed=0):
    """A DiffusionTask over an attached, trained-looking kronecker DiT-Pico/2."""
    torch.manual_seed(seed)
    model = activate(create_model("DiT-Pico/2", image_size=8, in_channels=1, num_classes=10), seed=seed)
    task = make_task(recipe(*MULTI, *extra), model)
    task.configure_model()
    with torch.no_grad():  # off the random init, so every parameter moves the loss
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 1)))
    return task


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 8, 8, generator=g) * 2 - 1, torch.randint(0, 10, (n,), generator=g)


def smaller_dense(model, depth, width, heads, name="DiT-Pico/2"):
    """The dense model of that size holding the ancestor's slices: every tensor the layout's
    consistent width selection (first heads, first hidden units, first features) of the
    materialized ancestor, the blocks of `depth_layers` (as tests/test_nested.py and
    tests/test_tucker.py build it)."""
    dense = get_constraint("kronecker").materialize(copy.deepcopy(model))
    wide = create_model(name, image_size=8, in_channels=1, num_classes=10, width=width, heads=heads)
    a, b, sd = model_dims(dense), model_dims(wide), dense.state_dict()
    with torch.no_grad():
        for n, p in wide.named_parameters():
            p.copy_(select_width(sd[n], p.detach(), a, b, n))
    keep = depth_layers(len(dense.blocks), depth)
    small = create_model(name, image_size=8, in_channels=1, num_classes=10, width=width, heads=heads, depth=depth)
    state = {}
    for k, v in wide.state_dict().items():
        if k.startswith("blocks."):
            i = int(k.split(".")[1])
            if i in keep:
                state[k.replace(f"blocks.{i}.", f"blocks.{keep.index(i)}.", 1)] = v
        else:
            state[k] = v
    small.load_state_dict(state)
    return small


# ------------------------------------------------------------------ the draw
def test_sizes_are_a_function_of_seed_and_step_and_equal_on_every_rank():
    rank0 = kronecker_task(seed=0)
    rank1 = kronecker_task(seed=5)  # another instance, other weights: a second rank
    assert rank0.multisize_sizes() == ([2, 3, 4], [0.5, 1.0])  # include_full adds depth 4 and width 64
    rng = torch.get_rng_state()
    draws = [rank0.multisize_choice(s) for s in range(60)]
    assert torch.equal(torch.get_rng_state(), rng)  # the global generator (noise, dropout) is untouched
    assert draws == [rank1.multisize_choice(s) for s in range(60)]
    assert draws == [rank0.multisize_choice(s) for s in range(60)]  # drawn again: the same
    assert draws[:6] == [(4, 1.0), (4, 0.5), (3, 1.0), (3, 1.0), (3, 0.5), (2, 1.0)]
    assert set(draws) == {(d, r) for d in (2, 3, 4) for r in (0.5, 1.0)}  # the whole grid is drawn
    other = kronecker_task("seed=1").multisize_choice
    assert [other(s) for s in range(60)] != draws  # the recipe seed changes the stream
    every = kronecker_task("multisize.every=3")
    assert [every.multisize_choice(s) for s in range(9)] == [draws[0], None, None, draws[3], None, None, draws[6],
                                                             None, None]
    assert make_task(recipe(), create_model("DiT-Pico/2")).multisize_choice(0) is None  # off by default


# ------------------------------------------------------------------ one nested step
def test_a_nested_step_trains_only_its_sub_network_and_is_the_smaller_model():
    task = kronecker_task()
    model = task.model
    step = next(s for s in range(60) if task.multisize_choice(s) == (2, 0.5))
    x, y = batch()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731  the same noise and timesteps for both models
    full = task.diffusion_loss((x, y), generator=g()).item()
    model.train()
    with task.multisize_context(step):
        loss = task.diffusion_loss((x, y), generator=g())
    loss.backward()
    small = smaller_dense(model, depth=2, width=32, heads=1)
    small_loss = DiffusionTask(recipe(), small).diffusion_loss((x, y), generator=g()).item()
    assert abs(loss.item() - small_loss) < 1e-5, (loss.item(), small_loss)
    assert abs(loss.item() - full) > 1e-3  # the full model computes something else
    assert task.diffusion_loss((x, y), generator=g()).item() == full  # outside the context: full again

    keep = depth_layers(4, 2)
    assert keep == [0, 3]
    dims, nd = model_dims(model), model_dims(small)
    for i, block in enumerate(model.blocks):
        for name, p in block.named_parameters():
            if i not in keep:  # skipped blocks: no gradient at all
                assert p.grad is None, (i, name)
                continue
            if name.endswith(".S"):  # kronecker scalers (k, P, Q): the blocks of the kept rows and columns only
                mod = block.get_submodule(name[: -len(".S")])
                rows = width_index(mod.out_features, nested_size(mod.out_features, dims, nd), dims, nd, name) // 32
                cols = width_index(mod.in_features, nested_size(mod.in_features, dims, nd), dims, nd, name) // 32
                inside = torch.zeros(p.shape[1:], dtype=torch.bool)
                inside[rows.unique()[:, None], cols.unique()[None, :]] = True
                inside = inside.expand_as(p)
            else:  # free parameters: the layout's selection of the smaller model
                inside = selection_mask(p, f"blocks.{i}.{name}", dims, nd)
            assert torch.all(p.grad[~inside] == 0), (i, name)
            assert p.grad[inside].abs().sum() > 0, (i, name)
    for name, p in model.named_parameters():
        if name.startswith("blocks.") or not p.requires_grad:
            continue
        if name.startswith(BANK):  # the templates: shared by every size, trained by this one
            assert p.grad.abs().sum() > 0, name
            continue
        inside = selection_mask(p, name, dims, nd)
        assert torch.all(p.grad[~inside] == 0), name
        assert p.grad[inside].abs().sum() > 0, name


NARROW = dict(create_model("DiT-Pico/2", image_size=8, in_channels=1, num_classes=10, width=32, heads=1)
              .named_parameters())  # the parameter shapes of the narrower model


def selection_mask(p, name, a, b):
    """The elements of parameter `name` that the narrower model (dims b) holds."""
    ids = torch.arange(p.numel(), dtype=torch.float64).view(p.shape)
    picked = select_width(ids, torch.zeros(NARROW[name].shape, dtype=torch.float64), a, b, name).long().flatten()
    mask = torch.zeros(p.numel(), dtype=torch.bool)
    mask[picked] = True
    return mask.view(p.shape)


def test_the_classification_training_step_runs_the_drawn_sub_network():
    """ViT: training_step itself enters the drawn size (here step 0 of a seed that draws depth 2,
    width 32) and its loss is the smaller ViT's (affine norms and the class token included)."""
    seed = next(s for s in range(100) if sample_size([2, 3, 4], [0.5, 1.0], s, 0) == (2, 0.5))
    torch.manual_seed(0)
    model = activate(create_model("ViT-Pico/2", image_size=8, in_channels=1, num_classes=10))
    task = make_task(to_plain(load_recipe("vit_digits_pretrain", ["constraint=kronecker", "model.name=ViT-Pico/2",
                                                                  *QUIET, *MULTI, f"seed={seed}"])), model)
    task.configure_model()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(1)))
    x, y = batch()
    model.train()
    loss = task.training_step((x, y), 0)
    small = smaller_dense(model, depth=2, width=32, heads=1, name="ViT-Pico/2")
    ref = torch.nn.functional.cross_entropy(small(x), y)
    assert abs(loss.item() - ref.item()) < 1e-5, (loss.item(), ref.item())
    model.eval()
    assert abs(torch.nn.functional.cross_entropy(model(x), y).item() - ref.item()) > 1e-3  # eval: the full model


def test_nested_sub_network_is_the_same_depth_descendant():
    """At depth 2 of 4 (layers 0 and 3: the descent's depth resampling is exact there) and one
    head, the nested sub-network is the kronecker descendant of that size: what a multi-size
    step trains is what that descendant inherits."""
    task = kronecker_task()
    model = task.model
    lg = get_constraint("kronecker").learngene(model)
    child = get_constraint("kronecker").descend(lg, create_model("DiT-Pico/2", image_size=8, in_channels=1,
                                                                 num_classes=10, depth=2, width=32, heads=1))
    with torch.no_grad():  # a descendant computes its own sin-cos table for its width; give it the ancestor's slice
        child.pos_embed.copy_(model.pos_embed[..., :32])
    g = torch.Generator().manual_seed(1)
    args = (torch.randn(4, 1, 8, 8, generator=g), torch.randint(0, 1000, (4,), generator=g),
            torch.randint(0, 11, (4,), generator=g))
    with nested_subnetwork(model, 2, 0.5) as (kept, dims):
        nested = model(*args)
    assert kept == [0, 3] and (dims.width, dims.heads, dims.hidden) == (32, 1, 128)
    ref = child(*args)
    assert ((nested - ref).norm() / ref.norm()).item() < 1e-5


def test_kronecker_bank_runs_only_the_nested_blocks():
    """The bank's nested path is the narrower WeiT layer: its output equals the dense slice
    W[rows][:, cols] on the kept inputs, zeros elsewhere; weight() is W with the other blocks zero."""
    task = kronecker_task()
    mod = task.model.blocks[1].mlp.fc2  # 64 x 256: rows one head's features, columns its MLP units
    bank = getattr(task.model, BANK)
    W = bank.weight(mod).detach()
    x = torch.randn(5, 256)
    rows, cols = torch.arange(32), torch.arange(128)
    object.__setattr__(mod, "_lg_nested", bank.nested_index(mod, rows, cols, "fc2"))
    try:
        y = bank.linear(mod, x)
        Wn = bank.weight(mod)
    finally:
        object.__delattr__(mod, "_lg_nested")
    ref = x[:, cols] @ W[rows][:, cols].T + mod.bias[rows]
    assert torch.allclose(y[:, rows], ref, atol=1e-5) and torch.all(y[:, 32:] == 0)
    assert torch.allclose(Wn[:32, :128], W[:32, :128], atol=1e-6) and Wn[32:].abs().sum() == 0
    assert Wn[:, 128:].abs().sum() == 0
    with pytest.raises(LgframeError, match="not whole 32x32 template blocks"):
        bank.nested_index(mod, torch.arange(16), cols, "fc2")


# ------------------------------------------------------------------ refusals
def test_invalid_sizes_and_constraints_are_refused_naming_the_valid_values():
    base = ["constraint=kronecker", *SIZE, *QUIET]
    with pytest.raises(LgframeError, match=r"multisize.depths has 5: a model of 4 layers has nested depths 1\.\.4"):
        load_recipe("dit_digits_pretrain", base + ["multisize.depths=[2,5]"])
    with pytest.raises(LgframeError, match="valid widths for this model: 32, 64"):
        load_recipe("dit_digits_pretrain", base + ["multisize.widths=[48]"])
    with pytest.raises(LgframeError, match="valid ratios for this model: 0.5, 1"):
        load_recipe("dit_digits_pretrain", base + ["multisize.width_ratios=[0.75]"])
    with pytest.raises(LgframeError, match="constraint 'svd' cannot nest width.*that nest width: kronecker, tucker"):
        load_recipe("dit_digits_pretrain", ["constraint=svd", *SIZE, *QUIET, "multisize.widths=[32]"])
    load_recipe("dit_digits_pretrain", ["constraint=svd", *SIZE, *QUIET, "multisize.depths=[2]"])  # depth: any
    with pytest.raises(LgframeError, match="not both"):
        load_recipe("dit_digits_pretrain", base + ["multisize.widths=[32]", "multisize.width_ratios=[0.5]"])
    with pytest.raises(LgframeError, match="activation_checkpointing=false"):
        load_recipe("dit_digits_pretrain", base + MULTI + ["trainer.activation_checkpointing=true"])
    # the task checks the model it trains (here deeper and wider than the recipe's)
    task = make_task(recipe("model.name=DiT-Nano/2", "multisize.depths=[6]"), create_model("DiT-Nano/2", image_size=8, in_channels=1,
                                                                  num_classes=10))
    task.configure_model()
    assert task.multisize_sizes() == ([6], [1.0])
    with pytest.raises(LgframeError, match=r"nested depths 1\.\.4"):
        make_task(recipe("model.name=DiT-Nano/2", "multisize.depths=[5]"),
                  create_model("DiT-Pico/2", image_size=8, in_channels=1, num_classes=10)).configure_model()
    # plain DDP cannot train a step whose skipped blocks get no gradient
    from lightning.pytorch.strategies import DDPStrategy

    task = kronecker_task()
    task._trainer = types.SimpleNamespace(strategy=DDPStrategy(), world_size=2)
    with pytest.raises(LgframeError, match="ddp_find_unused_parameters_true"):
        task.check_multisize()
    task._trainer = types.SimpleNamespace(strategy=DDPStrategy(find_unused_parameters=True), world_size=2)
    task.check_multisize()
    task._trainer = None


# ------------------------------------------------------------------ in a real fit
def old_training_step(self, batch, batch_idx):
    """DiffusionTask.training_step before multisize existed (commit abc0054)."""
    with self.constraint.step_context(self.model, self.global_step, self.recipe["seed"]):
        loss = self.diffusion_loss(batch, dropout=self.label_dropout, stage="train")
    return self.total_loss(loss, "train")


def test_multisize_off_is_bit_identical_and_on_trains_the_drawn_sizes(tmp_path, monkeypatch):
    common = [f"out_dir={tmp_path}", "trainer.max_steps=6", "trainer.val_every=6", "data.batch_size=16",
              "data.val_subset=32", "optim.warmup_steps=0"]

    def train(name, *extra):
        cfg = load_recipe("dit_digits_pretrain", ["constraint=kronecker", *SIZE, *QUIET, *common, f"name={name}", *extra])
        res = fit(cfg, extract_learngene=False)
        return {n: p.detach().clone() for n, p in res.task.model.named_parameters()}, res

    off, _ = train("off")
    full_only, _ = train("full", "multisize.depths=[4]", "multisize.widths=[64]")
    on, res = train("on", *MULTI)
    with monkeypatch.context() as m:
        m.setattr(DiffusionTask, "training_step", old_training_step)
        before, _ = train("before")
    assert all(torch.equal(off[n], before[n]) for n in off)  # off: the old code's training, bit for bit
    assert all(torch.equal(full_only[n], off[n]) for n in off)  # drawing only the full size changes nothing
    assert any(not torch.equal(on[n], off[n]) for n in off)
    import csv

    rows = [r for r in csv.DictReader(open(res.run_dir / "metrics.csv")) if r.get("train/depth")]
    drawn = [(int(float(r["train/depth"])), int(float(r["train/width"]))) for r in rows]
    choice = res.task.multisize_choice
    assert drawn == [(choice(s)[0], round(choice(s)[1] * 64)) for s in range(6)]
    assert res.curve[-1][0] == 6  # validation ran (the full model)
