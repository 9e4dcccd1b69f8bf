"""DiT-BlockSkip personalization: LoRA (peft), patch sampling, block skipping with a residual cache."""

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import activate

from lgframe.apps.personalize import (
    PersonalizeTask,
    add_lora,
    at_image_size,
    block_ranges,
    crop_side,
    dit_forward,
    load_personalized,
    lora_layers,
    patch_batch,
    run_personalize,
    save_lora,
    step_memory,
    subject_images,
    with_subject_class,
)
from lgframe.errors import LgframeError
from lgframe.models.files import save_model
from lgframe.models.registry import create_model
from lgframe.training.recipes import load_recipe

T = 1000


def base_model(size=8):
    torch.manual_seed(0)
    return activate(create_model("DiT-Pico/2", image_size=size))


def lora_model(front=0, back=0, size=8):
    model, subject = with_subject_class(base_model(size))
    _, middle, _ = block_ranges(4, front, back)
    return add_lora(model, 4, 4.0, middle), subject


def nudge_lora(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in lora_layers(model):
            for p in m.lora_B.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def recipe(**p):
    cfg = load_recipe("dit_personalize_shapes", ["trainer.progress=false"])
    for k, v in p.items():
        cfg.personalize[k] = v
    from omegaconf import OmegaConf

    return OmegaConf.to_container(cfg, resolve=True)


def test_the_subject_is_a_new_class_before_the_null_class():
    base = base_model()
    model, subject = with_subject_class(base)
    assert subject == 10 and model.config.num_classes == 11
    old, new = base.y_embedder.embedding_table.weight, model.y_embedder.embedding_table.weight
    assert torch.equal(new[:10], old[:10]) and torch.equal(new[11], old[10])  # classes, then the null class
    assert torch.allclose(new[10], old[:10].mean(0))


def test_without_savers_the_task_is_plain_lora_fine_tuning():
    """n = m = 0, patch sampling off, s_min = s_max: PersonalizeTask's loss and update are
    those of a plain peft-LoRA fine-tuning loop on model(x_t, t, y), at the same seed."""
    model, subject = lora_model()
    task = PersonalizeTask(recipe(patch_sampling=False, s_min=8, image_size=8, skip_front=0, skip_back=0), model, subject)
    plain = copy.deepcopy(model)
    x0 = subject_images("shapes:3", 4, 8, 1)
    y = torch.full((4,), subject)
    opt_t = torch.optim.AdamW([p for p in task.model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0)
    opt_p = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-2, weight_decay=0)
    for step in range(3):
        torch.manual_seed(step)
        a = task.training_step((x0,), step)
        torch.manual_seed(step)
        t = torch.randint(0, T, (4,))
        noise = torch.randn(x0.shape)
        b = F.mse_loss(plain(task.noise_scheduler.add_noise(x0, noise, t), t, y), noise)
        assert abs(a.item() - b.item()) < 1e-6, step
        for opt, loss in ((opt_t, a), (opt_p, b)):
            opt.zero_grad()
            loss.backward()
            opt.step()
    ours, theirs = dict(task.model.named_parameters()), dict(plain.named_parameters())
    assert max((ours[k] - theirs[k]).abs().max().item() for k in ours) < 1e-6


def test_only_the_subject_row_of_the_class_table_learns():
    model, subject = lora_model()
    task = PersonalizeTask(recipe(patch_sampling=False, s_min=8, image_size=8), model, subject)
    before = model.y_embedder.embedding_table.weight.detach().clone()
    task.training_step((subject_images("shapes:3", 4, 8, 1),), 0).backward()
    g = model.y_embedder.embedding_table.weight.grad
    assert g[subject].abs().sum() > 0 and g[torch.arange(12) != subject].abs().sum() == 0
    assert torch.equal(before, model.y_embedder.embedding_table.weight)


@pytest.mark.parametrize("front,back", [(1, 1), (2, 1), (0, 2)])
def test_residual_cache_equals_running_the_skipped_blocks_at_zero_lora_update(front, back):
    model, subject = lora_model(front, back)
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([5, 400, 990]), torch.tensor([subject, 2, 11])
    full = model(x, t, y)
    assert (dit_forward(model, x, t, y, front, back) - full).abs().max() < 1e-5  # LoRA B = 0 at init
    nudge_lora(model)
    skipped, run = dit_forward(model, x, t, y, front, back), dit_forward(model, x, t, y)
    assert (skipped - run).abs().max() > 1e-4  # with an update the skipped blocks' reaction is not modelled
    assert (run - model(x, t, y)).abs().max() < 1e-6  # dit_forward without skipping is the model's forward


def test_skipping_keeps_gradients_out_of_the_skipped_blocks_and_cuts_saved_activations():
    x0 = subject_images("shapes:3", 8, 16, 1)
    mem = {}
    for name, (front, back, patch, s_min) in {"full": (0, 0, False, 16), "patch": (0, 0, True, 8),
                                               "skip": (1, 1, False, 16), "both": (1, 1, True, 8)}.items():
        model, subject = lora_model(front, back, size=s_min)
        task = PersonalizeTask(recipe(patch_sampling=patch, s_min=s_min, image_size=16, skip_front=front, skip_back=back), model, subject)
        mem[name] = step_memory(task, x0)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        if front:  # no LoRA in the skipped blocks
            assert not any(n.startswith(("blocks.0.", "blocks.3.")) for n in trainable)
    act = {k: v["activations"] / mem["full"]["activations"] for k, v in mem.items()}
    assert act["patch"] < 0.35 and act["skip"] < 0.7 and act["both"] < 0.2, act
    assert mem["both"]["total"] < 0.6 * mem["full"]["total"]


def test_crop_side_follows_the_schedule_and_crops_are_resized_to_s_min():
    t = torch.tensor([0, 333, 999])
    assert crop_side(t, T, 8, 16).tolist() == [8, 11, 16]
    assert crop_side(torch.arange(T), T, 8, 16).diff().min() >= 0  # monotone in t
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 1, 16, 16, generator=g)
    out = patch_batch(x, t, T, 8, 16, torch.Generator().manual_seed(1))
    assert out.shape == (3, 1, 8, 8)
    assert torch.allclose(out[2], F.interpolate(x[2:3], size=(8, 8), mode="area")[0])  # t = T-1: the whole image
    windows = x[0, 0].unfold(0, 8, 1).unfold(1, 8, 1).reshape(-1, 8, 8)  # t = 0: an 8x8 window at native resolution
    assert (windows - out[0, 0]).flatten(1).abs().max(1).values.min() == 0
    # crops keep their full-resolution positions: a native 8x8 crop at (4, 6) has the 8x8 grid's rows 2..5 x 3..6
    from lgframe.apps.personalize import crop_positions
    from lgframe.models.dit import sincos_pos_embed

    full = sincos_pos_embed(64, 8).view(8, 8, 64)
    assert torch.allclose(crop_positions(64, 2, 8, [(4, 6, 8)])[0], full[2:6, 3:7].reshape(16, 64), atol=1e-6)
    whole = crop_positions(64, 2, 8, [(0, 0, 16)])[0].view(4, 4, 64)  # the whole image, downsampled: between grid rows
    assert torch.allclose(whole[0, 0], sincos_at_ref(64, 0.5, 0.5), atol=1e-6)
    with pytest.raises(LgframeError, match="expected 16x16"):
        patch_batch(torch.zeros(1, 1, 12, 12), t[:1], T, 8, 16)


def sincos_at_ref(dim, y, x):
    from lgframe.apps.personalize import sincos_at

    return sincos_at(dim, torch.tensor([y]), torch.tensor([x]))[0]


def test_lora_file_loads_and_merges_into_a_plain_dit(tmp_path):
    base = base_model()
    model, subject = with_subject_class(base)
    model = add_lora(model, 4, 4.0, range(1, 3))
    nudge_lora(model)
    with torch.no_grad():
        model.y_embedder.embedding_table.weight[subject] += 0.3
    path = save_lora(model, subject, tmp_path / "lora.safetensors", base.config.to_dict(), {"lora_rank": 4, "lora_alpha": 4.0}, range(1, 3))
    merged, s = load_personalized(base, path)
    assert s == subject and not lora_layers(merged)
    assert type(merged.blocks[1].attn.qkv) is torch.nn.Linear
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([10, 800]), torch.tensor([subject, 3])
    assert (merged(x, t, y) - model(x, t, y)).abs().max() < 1e-5
    big, _ = load_personalized(base, path, image_size=16)  # the same weights sample at s_max
    assert big(torch.randn(2, 1, 16, 16), t, y).shape == (2, 1, 16, 16)
    other = create_model("DiT-Pico/2", depth=3)
    with pytest.raises(LgframeError, match="was trained on another base model"):
        load_personalized(other, path)
    assert at_image_size(base, 16).config.image_size == 16


def test_activation_checkpointing_keeps_the_gradients_and_cuts_saved_activations():
    """trainer.activation_checkpointing: the blocks recompute themselves in the backward;
    the loss and every gradient are those of the plain step, the saved activations shrink."""
    x0 = subject_images("shapes:3", 8, 16, 1)
    out = {}
    for ckpt in (False, True):
        model, subject = lora_model(0, 1, size=16)
        nudge_lora(model)
        r = recipe(patch_sampling=False, s_min=16, image_size=16, skip_front=0, skip_back=1)
        r["trainer"]["activation_checkpointing"] = ckpt
        task = PersonalizeTask(r, model, subject)
        task.configure_model()
        assert all(b.activation_checkpointing == ckpt for b in model.blocks)
        mem = step_memory(task, x0)
        torch.manual_seed(0)
        loss = task.training_step((x0,), 0)
        loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        out[ckpt] = loss.item(), grads, mem["activations"]
    assert abs(out[True][0] - out[False][0]) < 1e-6
    assert max((out[True][1][n] - g).abs().max().item() for n, g in out[False][1].items()) < 1e-6
    assert out[True][2] < 0.5 * out[False][2], (out[True][2], out[False][2])


def test_bad_settings_name_what_is_valid(tmp_path):
    with pytest.raises(LgframeError, match=r"at least one block left to train \(front \+ back <= 3\)"):
        block_ranges(4, 2, 2)
    with pytest.raises(LgframeError, match=r"valid: shapes:K with K in 0..9"):
        subject_images("shapes:12", 4, 16, 1)
    with pytest.raises(LgframeError, match="not a folder of images and not shapes:K"):
        subject_images(str(tmp_path / "nope"), 4, 16, 1)
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"), pytest.raises(LgframeError, match="0 readable images"):
        subject_images(str(tmp_path / "imgs"), 3, 16, 1)
    with pytest.raises(LgframeError, match="personalize.base is required"):
        run_personalize(load_recipe("dit_personalize_shapes", []))
    for key, match in (("trainer.compile=true", "does not compile its blocks.*valid: false"),
                       ("trainer.checkpoint_every=10", "writes its own file once.*valid: 0")):
        with pytest.raises(LgframeError, match=match):
            run_personalize(load_recipe("dit_personalize_shapes", [key, "personalize.base=x.safetensors"]))


def test_personalize_end_to_end(tmp_path):
    save_model(base_model(), tmp_path / "base.safetensors")
    cfg = load_recipe("dit_personalize_shapes", [f"personalize.base={tmp_path / 'base.safetensors'}", f"out_dir={tmp_path}",
                                                 "trainer.max_steps=40", "trainer.val_every=20", "trainer.progress=false",
                                                 "personalize.samples=4", "sample.steps=4", "optim.lr=3e-3"])
    res = run_personalize(cfg)
    assert [s for s, _ in res.val_curve] == [0, 20, 40]
    assert res.val_curve[-1][1] < res.val_curve[0][1] - 0.02, res.val_curve  # the held-out subject loss falls
    assert res.lora.is_dir() and (res.lora / "adapter_model.safetensors").is_file()  # a PEFT adapter folder
    assert sum(f.stat().st_size for f in res.lora.iterdir()) < 200_000 and res.samples.stat().st_size > 0
    text = res.report.read_text()
    assert "skip front 1, back 1" in text and "![samples](samples.png)" in text
