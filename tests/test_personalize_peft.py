"""Personalization (#25 item 6): the LoRA as a PEFT adapter folder, the optimizer, EMA,
precision and device keys, an inherited position table kept, and step_memory's
activations without the weights autograd saves."""

import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import activate
from safetensors.torch import load_file

from lgframe.apps.personalize import (
    PersonalizeTask,
    PositionTable,
    add_lora,
    at_image_size,
    check_settings,
    dit_forward,
    load_personalized,
    lora_layers,
    personalize_model,
    personalize_trainer,
    run_personalize,
    save_adapter,
    save_lora,
    saved_bytes,
    step_memory,
    subject_base,
    subject_images,
    with_subject_class,
)
from lgframe.errors import LgframeError
from lgframe.models.files import save_model
from lgframe.models.registry import create_model
from lgframe.training.ema import WarmupEMA
from lgframe.training.recipes import load_recipe, to_plain

P = {"lora_rank": 4, "lora_alpha": 4.0}


def base_model(size=8):
    torch.manual_seed(0)
    return activate(create_model("DiT-Pico/2", image_size=size))


def trained_lora(base, blocks=range(1, 3)):
    """A LoRA model whose adapters and subject row have moved off their start."""
    model, subject = with_subject_class(base)
    model = add_lora(model, 4, 4.0, blocks)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in lora_layers(model):
            for p in m.lora_B.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        model.y_embedder.embedding_table.weight[subject] += 0.3
    return model, subject


def recipe(over=(), **p):
    cfg = to_plain(load_recipe("dit_personalize_shapes", ["trainer.progress=false", *over]))
    cfg["personalize"] |= p
    return cfg


def inputs(subject, size=8):
    g = torch.Generator().manual_seed(3)
    return torch.randn(2, 1, size, size, generator=g), torch.tensor([10, 800]), torch.tensor([subject, 3])


# ------------------------------------------------------------------ 1. the adapter folder
def test_the_adapter_folder_loads_with_peft_onto_the_base_and_matches_load_personalized(tmp_path):
    from peft import PeftModel

    base = base_model()
    model, subject = trained_lora(base)
    folder = save_adapter(model, subject, tmp_path / "lora", base.config.to_dict(), P, range(1, 3))
    names = {p.name for p in folder.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "subject.safetensors", "subject.json"} <= names
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 4.0
    assert all(k.startswith("base_model.model.blocks.") for k in load_file(folder / "adapter_model.safetensors"))
    meta = json.loads((folder / "subject.json").read_text())
    assert meta["subject"] == subject and meta["base_config"] == base.config.to_dict() and meta["blocks"] == [1, 2]

    # peft alone: the base gains the subject's saved class row, PeftModel.from_pretrained, merge
    onto, s = with_subject_class(base)
    assert s == meta["subject"]
    with torch.no_grad():
        onto.y_embedder.embedding_table.weight[s] = load_file(folder / "subject.safetensors")["embedding"]
    by_peft = PeftModel.from_pretrained(onto, str(folder)).merge_and_unload()
    ours, s2 = load_personalized(base, folder)
    x, t, y = inputs(subject)
    with torch.no_grad():
        out = ours(x, t, y)
        assert s2 == subject and not lora_layers(ours) and type(ours.blocks[1].attn.qkv) is nn.Linear
        assert torch.allclose(by_peft(x, t, y), out, atol=1e-6)
        assert torch.allclose(model(x, t, y), out, atol=1e-5)  # both are the trained model, merged
        assert torch.allclose(subject_base(base, folder)[0].y_embedder.embedding_table.weight,
                              onto.y_embedder.embedding_table.weight)
        # the earlier single lora.safetensors (lgframe-lora/1) still loads, to the same output
        old = save_lora(model, subject, tmp_path / "lora.safetensors", base.config.to_dict(), P, range(1, 3))
        legacy, s3 = load_personalized(base, old)
        assert s3 == subject and torch.allclose(legacy(x, t, y), out, atol=1e-6)
        big, _ = load_personalized(base, folder, image_size=16)  # sampling side s_max
        assert big(torch.randn(2, 1, 16, 16), t, y).shape == (2, 1, 16, 16)


def test_the_adapter_folder_is_written_atomically_and_checked_on_load(tmp_path, monkeypatch):
    import lgframe.apps.personalize as pz

    base = base_model()
    model, subject = trained_lora(base)
    folder = save_adapter(model, subject, tmp_path / "lora", base.config.to_dict(), P, range(1, 3))
    with pytest.raises(LgframeError, match="exists and is not empty"):
        save_adapter(model, subject, folder, base.config.to_dict(), P, range(1, 3))

    def broken(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(pz, "write_json", broken)  # the last file of the folder fails
    with pytest.raises(OSError, match="disk full"):
        save_adapter(model, subject, tmp_path / "other", base.config.to_dict(), P, range(1, 3))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lora"]  # no half folder, no temporary one
    monkeypatch.undo()
    with pytest.raises(LgframeError, match="was trained on another base model"):
        load_personalized(create_model("DiT-Pico/2", depth=3), folder)
    (folder / "subject.json").unlink()
    with pytest.raises(LgframeError, match="subject.json is missing"):
        load_personalized(base, folder)


# ------------------------------------------------------------------ 2. optimizer, EMA, precision, devices
def steps(task, n=3, batch=4):
    """n optimizer steps through the task's own optimizer_step (as Lightning calls it)."""
    opt = task.configure_optimizers()["optimizer"]
    x0 = subject_images("shapes:3", batch, 8, 1)
    for step in range(n):
        torch.manual_seed(step)

        def closure(step=step):
            opt.zero_grad()
            loss = task.training_step((x0,), step)
            loss.backward()
            return loss

        task.optimizer_step(0, step, opt, closure)
    return opt


def lora_vector(model):
    return torch.cat([p.detach().flatten() for n, p in model.named_parameters() if ".lora_" in n])


@pytest.mark.filterwarnings("ignore:You are trying to `self.log")
def test_optim_name_and_weight_decay_are_honoured_and_other_class_rows_never_move():
    out = {}
    for name, wd in (("adamw", 0.0), ("adamw", 0.5), ("sgd", 0.5)):
        model, subject = with_subject_class(base_model())
        model = add_lora(model, 4, 4.0, range(4))
        before = model.y_embedder.embedding_table.weight.detach().clone()
        task = PersonalizeTask(recipe([f"optim.name={name}", f"optim.weight_decay={wd}", "optim.lr=0.01"],
                                      patch_sampling=False, s_min=8, image_size=8, skip_front=0, skip_back=0),
                               model, subject)
        opt = steps(task)
        assert type(opt).__name__ == {"adamw": "AdamW", "sgd": "SGD"}[name]
        assert opt.param_groups[0]["weight_decay"] == wd
        table = model.y_embedder.embedding_table.weight.detach()
        others = torch.arange(table.shape[0]) != subject
        assert torch.equal(table[others], before[others])  # bit for bit, decay or not
        assert not torch.equal(table[subject], before[subject])
        out[(name, wd)] = lora_vector(model)
        if wd:  # without the restore, decay would have moved the frozen rows
            opt.step()
            assert not torch.equal(model.y_embedder.embedding_table.weight[others], before[others])
            task.restore_class_rows()
            assert torch.equal(model.y_embedder.embedding_table.weight[others], before[others])
    # weight decay changes the adapters: AdamW's decoupled decay shrinks them by about lr * wd per step
    diff = (out[("adamw", 0.5)] - out[("adamw", 0.0)]).abs().max().item()
    assert diff > 1e-4, diff
    assert out[("adamw", 0.5)].norm() < out[("adamw", 0.0)].norm()
    assert not torch.allclose(out[("sgd", 0.5)], out[("adamw", 0.5)])


@pytest.mark.parametrize("key,value,message", [
    ("optim.name", "adam", "optim.name='adam'; valid for personalize: adamw, sgd"),
    ("optim.weight_decay", -1.0, "optim.weight_decay=-1.0; valid: a finite number >= 0"),
    ("trainer.precision", "8-true", r"valid for personalize: 32-true, bf16-mixed, 16-mixed \(the DiT computes"),
    ("trainer.precision", "bf16-true", "valid for personalize: 32-true, bf16-mixed, 16-mixed"),
    ("trainer.precision", "64-true", "valid for personalize: 32-true, bf16-mixed, 16-mixed"),
    ("trainer.devices", 2, r"trainer.devices=2: personalize trains on one device; valid: 1, or a list of one device id"),
    ("trainer.devices", "auto", "trainer.devices='auto': personalize trains on one device"),
    ("trainer.devices", [0, 1], "valid: 1, or a list of one device id"),
    ("trainer.strategy", "ddp", "trainer.strategy='ddp': personalize trains on one device; valid: auto"),
    ("trainer.num_nodes", 2, "trainer.num_nodes=2: personalize trains on one device; valid: 1"),
])
def test_settings_personalize_cannot_honour_are_refused_naming_what_is_valid(key, value, message, tmp_path):
    r = recipe()
    section, leaf = key.split(".")
    r[section][leaf] = value
    with pytest.raises(LgframeError, match=message):
        check_settings(r)
    model, subject = with_subject_class(base_model())
    with pytest.raises(LgframeError, match=message):
        PersonalizeTask(r, add_lora(model, 4, 4.0, range(1, 3)), subject)
    with pytest.raises(LgframeError, match=message):
        personalize_trainer(r, tmp_path)
    for ok in ("32", "16-mixed", "bf16-mixed"):  # Lightning's alias and the mixed precisions pass
        check_settings(recipe([f"trainer.precision={ok}"]))


class Record(__import__("lightning.pytorch", fromlist=["Callback"]).Callback):
    """The LoRA weights after every optimizer step."""

    def __init__(self):
        self.seen = []

    def on_train_batch_end(self, trainer, pl_module, *args):
        self.seen.append(lora_vector(pl_module.model).clone())


def fitted(tmp_path, over, max_steps=5):
    torch.manual_seed(0)
    r = recipe([f"trainer.max_steps={max_steps}", f"trainer.val_every={max_steps}", "optim.lr=0.01",
                "optim.warmup_steps=0", "data.batch_size=4", *over], patch_sampling=False, s_min=8, image_size=8,
               skip_front=0, skip_back=0)
    model, subject = with_subject_class(base_model())
    task = PersonalizeTask(r, add_lora(model, 4, 4.0, range(4)), subject)
    x = subject_images("shapes:3", 8, 8, 1)
    dl = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x), batch_size=4, sampler=torch.utils.data.RandomSampler(
        x, replacement=True, num_samples=4 * max_steps, generator=torch.Generator().manual_seed(0)))
    rec = Record()
    trainer = personalize_trainer(r, tmp_path / "_".join(over).replace("=", "-"), [rec])
    trainer.fit(task, dl, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x[:2]), batch_size=2))
    return task, trainer, rec.seen


def test_ema_is_fits_warmup_ema_and_the_run_keeps_the_average(tmp_path):
    task, trainer, seen = fitted(tmp_path, ["ema.enabled=true", "ema.decay=0.6", "ema.warmup=false"])
    assert any(isinstance(c, WarmupEMA) for c in trainer.callbacks)
    ema = seen[0]  # torch's AveragedModel: the first update copies, then avg += (w - avg) (1 - decay)
    for w in seen[1:]:
        ema = ema + (w - ema) * (1 - 0.6)
    final = lora_vector(task.model)
    assert torch.allclose(final, ema, atol=1e-6) and not torch.allclose(final, seen[-1], atol=1e-4)
    task, trainer, seen = fitted(tmp_path, ["ema.enabled=false"])
    assert not any(isinstance(c, WarmupEMA) for c in trainer.callbacks)
    assert torch.equal(lora_vector(task.model), seen[-1])  # without EMA: the last weights


def test_precision_is_honoured_in_training_memory_and_the_saved_adapter(tmp_path):
    plain, _, _ = fitted(tmp_path, ["ema.enabled=false"], max_steps=3)
    mixed, trainer, _ = fitted(tmp_path, ["ema.enabled=false", "trainer.precision=bf16-mixed"], max_steps=3)
    assert trainer.precision == "bf16-mixed"
    a, b = lora_vector(plain.model), lora_vector(mixed.model)
    assert torch.isfinite(b).all() and not torch.equal(a, b)  # bf16 matmuls: another, nearby result
    assert (a - b).norm() < 0.1 * a.norm()
    # a whole run in bf16-mixed with SGD and decay: trainer, optimizer, counted step (under autocast), adapter
    save_model(base_model(), tmp_path / "base.safetensors")
    over = [f"personalize.base={tmp_path / 'base.safetensors'}", f"out_dir={tmp_path}", "trainer.max_steps=3",
            "trainer.val_every=3", "trainer.progress=false", "personalize.samples=1", "sample.steps=2",
            "optim.name=sgd", "optim.weight_decay=0.1", "ema.enabled=false"]
    res = run_personalize(load_recipe("dit_personalize_shapes", [*over, "trainer.precision=bf16-mixed"]))
    tr = res.task.trainer
    assert tr.precision == "bf16-mixed" and type(tr.optimizers[0]).__name__ == "SGD"
    assert tr.optimizers[0].param_groups[0]["weight_decay"] == 0.1
    assert not any(isinstance(c, WarmupEMA) for c in tr.callbacks)
    g_bytes = res.memory["grads"]
    assert res.memory["optimizer"] == g_bytes and res.memory["ema"] == 0  # SGD: one momentum buffer; no EMA copy
    full = run_personalize(load_recipe("dit_personalize_shapes", [*over, "name=fp32"])).memory
    assert res.memory["params"] == full["params"] and res.memory["activations"] != full["activations"]
    assert {v.dtype for v in load_file(res.lora / "adapter_model.safetensors").values()} == {torch.float32}
    merged, s = load_personalized(tmp_path / "base.safetensors", res.lora)
    with torch.no_grad():
        assert torch.isfinite(merged(*inputs(s))).all()
    text = res.report.read_text()
    assert "precision bf16-mixed" in text and "Optimizer sgd (weight decay 0.1)" in text and "EMA off" in text


# ------------------------------------------------------------------ 3. an inherited position table
def test_a_base_with_its_own_position_table_keeps_it(tmp_path):
    assert not PositionTable(base_model()).inherited  # DiT's sin-cos table: computed for any grid, as before
    base = base_model()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        base.pos_embed.add_(0.1 * torch.randn(base.pos_embed.shape, generator=g))
    altered = base.pos_embed.detach().clone()
    p = recipe()["personalize"] | {"s_min": None, "image_size": 16}
    model, subject, middle, table = personalize_model(base, p)
    assert table.inherited and torch.equal(model.pos_embed, altered)  # trained at the base's own grid: its table
    # other grids: the table read over the image, bilinear
    big = at_image_size(with_subject_class(base)[0], 16, table)  # = the LoRA model: B is zero at the start
    expect = F.interpolate(altered.view(1, 4, 4, 64).permute(0, 3, 1, 2), size=(8, 8), mode="bilinear",
                           align_corners=False).permute(0, 2, 3, 1).reshape(1, 64, 64)
    assert torch.allclose(big.pos_embed, expect, atol=1e-6)
    assert torch.allclose(table.at_boxes(8, 16, [(0, 0, 16)])[0], altered[0], atol=1e-6)  # the whole image at s_min
    native = table.at_boxes(8, 16, [(4, 6, 8)])[0]  # a native crop: its rows of the s_max table
    assert torch.allclose(native, big.pos_embed.view(8, 8, 64)[2:6, 3:7].reshape(16, 64), atol=1e-6)
    # validation at s_max sees what sampling at s_max sees
    task = PersonalizeTask(recipe(**p), model, subject, table)
    x, t, y = inputs(subject, 16)
    with torch.no_grad():
        assert torch.allclose(dit_forward(task.model, x, t, y, pos=table.at_grid(8)), big(x, t, y), atol=1e-5)
    got = []
    task.total_loss = lambda loss, stage: got.append(loss)
    x0 = subject_images("shapes:3", 2, 16, 1)
    with torch.no_grad():
        task.validation_step((x0,), 0)  # held-out loss at s_max: the base's table read at the s_max grid
        gen, want = torch.Generator().manual_seed(1000), []
        for _ in range(4):
            tt = torch.randint(0, 1000, (2,), generator=gen)
            noise = torch.randn(x0.shape, generator=gen)
            want.append(F.mse_loss(big(task.noise_scheduler.add_noise(x0, noise, tt), tt, torch.full((2,), subject)), noise))
    assert torch.allclose(got[0], torch.stack(want).mean(), atol=1e-6)
    # and the merged model of a run keeps the table
    folder = save_adapter(model, subject, tmp_path / "lora", base.config.to_dict(), P, middle)
    merged, _ = load_personalized(base, folder)
    assert torch.equal(merged.pos_embed, altered)
    assert torch.allclose(load_personalized(base, folder, image_size=16)[0].pos_embed, expect, atol=1e-6)


# ------------------------------------------------------------------ 4. step_memory
def test_saved_bytes_leave_out_the_weights_autograd_saves():
    """A hand count: u = x * s (s trainable: saves x, 2x4 floats), y = u W^T with W frozen
    (F.linear saves W, 8x4, to give u its gradient; W is a parameter, not an
    activation), (y ** 2).sum() (saves y, 2x8)."""
    lin = nn.Linear(4, 8, bias=False).requires_grad_(False)
    s = nn.Parameter(torch.ones(4))
    x = torch.randn(2, 4)

    def f():
        return (lin(x * s) ** 2).sum()

    assert saved_bytes(f, [lin.weight, s])[1] == (2 * 4 + 2 * 8) * 4
    assert saved_bytes(f)[1] == (2 * 4 + 2 * 8 + 8 * 4) * 4  # the old count: W's 128 bytes as an activation


def old_count(model, x_t, t, y, noise):
    """The count before the fix: every saved storage, the weights included."""
    return saved_bytes(lambda: F.mse_loss(dit_forward(model, x_t, t, y), noise))[1]


def test_step_memory_activations_are_proportional_to_the_batch():
    """Without the weights, every saved tensor scales with the batch; the old count had
    the frozen weights F.linear saves on top, once per step."""
    counted, old = {}, {}
    for batch in (2, 4):
        model, subject = with_subject_class(base_model())
        model = add_lora(model, 4, 4.0, range(4))
        task = PersonalizeTask(recipe(patch_sampling=False, s_min=8, image_size=8, skip_front=0, skip_back=0),
                               model, subject)
        x0 = subject_images("shapes:3", batch, 8, 1)
        counted[batch] = step_memory(task, x0)["activations"]
        g = torch.Generator().manual_seed(0)
        x_t, t, noise, pos = task.training_inputs(x0, g)
        old[batch] = old_count(model, x_t, t, torch.full((batch,), subject), noise)
    assert counted[4] == 2 * counted[2]
    linear = sum(m.get_base_layer().weight.numel() * 4 for m in lora_layers(model))  # the blocks' frozen projections
    assert old[2] - counted[2] >= linear and 2 * old[2] - old[4] == old[2] - counted[2]
