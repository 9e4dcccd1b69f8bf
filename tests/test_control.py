"""DivControl (lgframe.apps.control): identity at step 0, the instruction gate routes per
sample, the alignment loss falls, few-shot adaptation touches only tailors and gate,
conditions and instructions, the control file, bad input."""

import pytest
import torch
from helpers import activate
from omegaconf import OmegaConf

from lgframe.apps.control.conditions import FAMILIES, fidelity, parse_instruction
from lgframe.apps.control.model import ControlledDiT, ControlSpec, tailor_parameters
from lgframe.apps.control.run import (
    ControlTask,
    control_trainer,
    few_shot_loader,
    load_control,
    load_control_recipe,
    prepare_adaptation,
    read_condition_image,
    run_control_sample,
    save_control,
    shipped_control_recipes,
    with_new_family,
)
from lgframe.cli import main
from lgframe.data.datasets import load_digits_arrays
from lgframe.errors import LgframeError
from lgframe.models.files import save_model
from lgframe.models.registry import create_model

TRAIN = ["edges:threshold=0.2", "lowres:factor=2", "mask:threshold=-0.5", "blur:radius=1"]


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def base_dit(seed=0):
    """A trained-looking DiT-Pico/2: its zero-initialized layers (adaLN gates) at std 0.2, so every block acts."""
    torch.manual_seed(seed)
    return activate(create_model("DiT-Pico/2"), seed=seed, std=0.2).eval()


def nudge(model, seed=1, std=0.05):
    """Trained-looking control weights: zero layers and the tailors' sigma made nonzero."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.startswith(("base.", "gate.")):  # the gate keeps its starting (hard-pattern) routing
                continue
            if n.endswith(".sT"):  # as large as the learngene's sigma
                sG = model.get_parameter(n[: -len("sT")] + "sG")
                p.copy_(sG.abs().mean() * (0.5 + torch.rand(p.shape, generator=g)))
            elif p.abs().sum() == 0:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return model


def digits(n, seed=0):
    x, y = load_digits_arrays()
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:n]
    return x[idx], y[idx]


def inputs(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = digits(n, seed)
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 1000, (n,), generator=g), y, x


def plain_recipe(**over):
    cfg, _ = load_control_recipe("divcontrol_digits", ["trainer.progress=false", "trainer.logger=[csv]"])
    r = OmegaConf.to_container(cfg, resolve=True)
    for k, v in over.items():
        sect, key = k.split(".")
        r[sect][key] = v
    return r


def conditions_of(texts, x):
    ins = [parse_instruction(t) for t in texts]
    cond = torch.cat([i.apply(x[j:j + 1]) for j, i in enumerate(ins)])
    return cond, torch.stack([i.embedding() for i in ins])


# ------------------------------------------------------------------ identity at step 0
@pytest.mark.parametrize("method, init", [("divcontrol", "copy"), ("divcontrol", "random"), ("dense", "copy")])
def test_the_controlled_model_is_the_base_at_step_0(method, init):
    base = base_dit()
    model = ControlledDiT(base, ControlSpec(method=method, align=method == "divcontrol"), init=init)
    x, t, y, x0 = inputs(6)
    cond, e = conditions_of(["edges", "blur:radius=1", "mask", "lowres:factor=2", "edges+blur", "outline"], x0)
    want = base(x, t, y)
    assert torch.equal(model(x, t, y, cond, e), want)  # bit for bit: the zero layers add exact zeros
    assert torch.equal(model(x, t, y), want)  # no condition: the base's own forward
    # and the branch is wired in: once its zero layers move, the output moves
    nudge(model)
    assert (model(x, t, y, cond, e) - want).abs().max() > 1e-3


# ------------------------------------------------------------------ the gate routes
def test_the_instruction_gate_routes_each_sample():
    model = nudge(ControlledDiT(base_dit(), ControlSpec()))
    x, t, y, x0 = inputs(5)
    cond = parse_instruction("blur:radius=1").apply(x0)  # the same condition images under two instructions
    e_edges = parse_instruction("edges").embedding().expand(5, -1)
    e_blur = parse_instruction("blur:radius=1").embedding().expand(5, -1)
    a, b = model(x, t, y, cond, e_edges), model(x, t, y, cond, e_blur)
    assert (a - b).abs().max() > 1e-3  # the instruction alone changes the output (through the tailors)
    # a mixed batch equals each sample alone
    texts = ["edges", "blur:radius=1", "mask:threshold=0", "edges", "lowres:factor=2+mask"]
    cond, e = conditions_of(texts, x0)
    together = model(x, t, y, cond, e)
    alone = torch.cat([model(x[i:i + 1], t[i:i + 1], y[i:i + 1], cond[i:i + 1], e[i:i + 1]) for i in range(5)])
    assert (together - alone).abs().max() < 1e-5
    # soft routing: one family ~95% on its own group; two families split; an untrained family slot is uniform
    g = model.gate_weights(torch.stack([parse_instruction(s).embedding() for s in ["mask", "blur+mask", "outline"]])).detach()
    assert torch.allclose(g.sum(1), torch.ones(3))
    assert g[0, 2] > 0.94 and abs(float(g[1, 2] - g[1, 3])) < 1e-6 and g[1, 2] > 0.48
    assert torch.allclose(g[2], torch.full((4,), 0.25))


def test_one_tailor_group_per_family_and_the_learngene_always_on():
    model = ControlledDiT(base_dit(), ControlSpec(tailor_rank=3))
    bank = model.branch.lg_bank
    f = bank.factors["attn__qkv"]
    assert f["UG"].shape == (192, 32) and f["UT"].shape == (192, 4 * 3)  # rank 0.5 of 64; 4 families x k_T 3
    bank.routing = torch.tensor([[1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5]])
    g = bank.gate(2)
    bank.routing = None
    assert g.tolist()[0] == [1.0] * 3 + [0.0] * 9 and g.tolist()[1] == [0.0] * 6 + [0.5] * 6


# ------------------------------------------------------------------ alignment
def test_the_alignment_loss_falls_during_training():
    torch.manual_seed(0)
    model = ControlledDiT(base_dit(), ControlSpec())
    task = ControlTask(plain_recipe(), model, [parse_instruction(t) for t in TRAIN], align_weight=0.5)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    x, y = digits(512)
    g = torch.Generator().manual_seed(0)
    aligns = []
    for _ in range(40):
        idx = torch.randint(0, len(x), (32,), generator=g)
        loss, parts = task.control_loss(x[idx], y[idx], generator=g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        aligns.append(float(parts["align"]))
    first, last = sum(aligns[:5]) / 5, sum(aligns[-5:]) / 5
    assert first > 0.9  # a fresh head: about orthogonal to the (batch-centred) target
    assert last < 0.7 * first, (first, last)


# ------------------------------------------------------------------ few-shot adaptation
def test_adaptation_trains_only_the_new_tailors_and_the_gate(tmp_path):
    old = nudge(ControlledDiT(base_dit(), ControlSpec()))
    model = with_new_family(old, "outline")
    x, t, y, x0 = inputs(4)
    cond, e = conditions_of(["edges", "blur:radius=1", "mask", "lowres:factor=2"], x0)
    # adding a family changes nothing yet (its tailors at sigma 0, its gate row away from the old instructions)
    assert (model(x, t, y, cond, e) - old(x, t, y, cond, e)).abs().max() < 1e-6
    guards = prepare_adaptation(model, len(old.spec.groups))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ins = parse_instruction("outline:threshold=-0.5")
    task = ControlTask(plain_recipe(**{"trainer.max_steps": 4, "optim.lr": 1e-2}), model, [ins], 0.5, guards)
    xs, ys = digits(10)
    control_trainer(task.recipe, tmp_path).fit(task, few_shot_loader(xs, ys, 8, 4, seed=0))
    after = model.state_dict()
    tailors = {n for n, _, _ in tailor_parameters(model)}
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and changed <= tailors | {"gate.proj.weight", "gate.proj.bias"}
    assert "gate.proj.weight" in changed
    k, n_old = model.spec.tailor_rank, len(old.spec.groups)
    for name, _, axis in tailor_parameters(model):
        assert torch.equal(after[name].narrow(axis, 0, n_old * k), before[name].narrow(axis, 0, n_old * k)), name
    new_parts = [after[n].narrow(a, n_old * k, k) - before[n].narrow(a, n_old * k, k) for n, _, a in tailor_parameters(model)]
    assert max(float(d.abs().max()) for d in new_parts) > 1e-4  # the new tailors did learn
    assert all(not p.requires_grad for n, p in model.named_parameters() if n not in tailors and not n.startswith("gate."))


def test_adapting_a_family_the_model_has_or_a_dense_model_is_refused():
    model = ControlledDiT(base_dit(), ControlSpec())
    with pytest.raises(LgframeError, match="'edges' already owns tailors"):
        with_new_family(model, "edges")
    dense = ControlledDiT(base_dit(), ControlSpec(method="dense", align=False))
    with pytest.raises(LgframeError, match="needs a DivControl model"):
        with_new_family(dense, "outline")


# ------------------------------------------------------------------ conditions and instructions
def test_operators_on_a_square_and_fidelity_of_the_images_themselves():
    x = torch.full((1, 1, 8, 8), -1.0)
    x[..., 2:6, 2:6] = 1.0
    border = torch.zeros(8, 8, dtype=torch.bool)
    border[2:6, 2:6] = True
    border[3:5, 3:5] = False
    assert torch.equal(parse_instruction("outline:threshold=0").apply(x)[0, 0] > 0, border)
    assert torch.equal(parse_instruction("mask:threshold=0").apply(x), x)
    e = parse_instruction("edges:threshold=0.3").apply(x)[0, 0] > 0
    assert e[2:6, 2:6].sum() < 16 and e[1, 3] and not e[4, 4] and not e[0, 0]  # around the square's border only
    assert torch.equal(parse_instruction("lowres:factor=2").apply(x), x)  # 2x2-aligned blocks survive exactly
    low4 = parse_instruction("lowres:factor=4").apply(x)
    assert torch.allclose(low4[0, 0], torch.full((8, 8), -0.5))  # a quarter of each 4x4 block is bright
    b = parse_instruction("blur:radius=1").apply(x)
    assert b.max() < 1 and b[0, 0, 0, 0] > -1 and abs(float(b.mean() - x.mean())) < 0.05  # mass kept
    for text in ("edges", "mask", "blur:radius=1", "lowres:factor=2", "outline", "blur+mask:threshold=0"):
        ins = parse_instruction(text)
        f = fidelity(ins, x, ins.apply(x))
        assert f["mse"] == 0.0 and f.get("f1", 1.0) == 1.0


def test_instruction_embeddings_share_one_space():
    names = list(FAMILIES)
    e = parse_instruction("blur:radius=0.3").embedding()
    assert e.shape == (2 * len(FAMILIES),) and e[names.index("blur")] == 1 and e[len(names) + names.index("blur")] == 0
    mid = parse_instruction("blur:radius=2.15").embedding()[len(names) + names.index("blur")]
    assert abs(float(mid) - 0.5) < 1e-6  # an unseen value: in between
    both = parse_instruction("blur:radius=1+mask:threshold=0").embedding()
    assert both[names.index("blur")] == 1 and both[names.index("mask")] == 1 and both[:len(names)].sum() == 2
    assert parse_instruction("lowres").settings[0].value == 2
    assert str(parse_instruction("edges:threshold=0.25+mask")) == "edges:threshold=0.25+mask:threshold=-0.5"


@pytest.mark.parametrize("text, message", [
    ("edgez", "unknown condition family 'edgez' \\(did you mean 'edges'\\?\\); valid families: edges"),
    ("blur:sigma=1", "family 'blur' has the parameter 'radius' \\(0.3..4\\), not 'sigma'"),
    ("blur:radius=9", "radius=9 is outside the valid range 0.3..4"),
    ("lowres:factor=3", "factor must be a power of two"),
    ("mask:threshold=high", "is not a number"),
    ("", "an instruction is a family with its parameter"),
])
def test_bad_instructions_name_what_is_valid(text, message):
    with pytest.raises(LgframeError, match=message):
        parse_instruction(text, "--instruction")


# ------------------------------------------------------------------ files and bad input
def test_the_control_file_round_trips_and_refuses_another_base(tmp_path):
    base = base_dit()
    save_model(base, tmp_path / "base.safetensors")
    model = nudge(ControlledDiT(base, ControlSpec()))
    path = save_control(model, tmp_path / "c.safetensors", tmp_path / "base.safetensors", [parse_instruction(t) for t in TRAIN],
                        plain_recipe())
    again, meta = load_control(path)
    x, t, y, x0 = inputs(3)
    cond, e = conditions_of(["edges", "mask", "blur:radius=1"], x0)
    assert torch.equal(again(x, t, y, cond, e), model(x, t, y, cond, e))
    assert meta["instructions"] == TRAIN and meta["spec"]["groups"] == ["edges", "lowres", "mask", "blur"]
    save_model(base_dit(seed=5), tmp_path / "other.safetensors")
    with pytest.raises(LgframeError, match="was trained for another base.*Give the base it was trained on"):
        load_control(path, tmp_path / "other.safetensors")
    save_model(create_model("ViT-Pico/2"), tmp_path / "vit.safetensors")
    with pytest.raises(LgframeError, match="control needs a DiT as its base.*holds a vit model"):
        load_control(path, tmp_path / "vit.safetensors")


def test_bad_condition_images_and_outputs_are_refused(tmp_path):
    from PIL import Image

    base = base_dit()
    save_model(base, tmp_path / "base.safetensors")
    model = ControlledDiT(base, ControlSpec())
    ckpt = save_control(model, tmp_path / "c.safetensors", tmp_path / "base.safetensors", [], plain_recipe())
    Image.new("L", (16, 16)).save(tmp_path / "big.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "rgb.png")
    Image.new("L", (8, 8), 255).save(tmp_path / "ok.png")
    for name, message in (("big.png", "is 16x16 with 1 channel.*takes 8x8 grayscale"),
                          ("rgb.png", "is 8x8 with 3 channel.*takes 8x8 grayscale")):
        with pytest.raises(LgframeError, match=message):
            read_condition_image(tmp_path / name, base.config)
    assert torch.equal(read_condition_image(tmp_path / "ok.png", base.config), torch.ones(1, 1, 8, 8))
    (tmp_path / "out.png").write_bytes(b"keep")
    with pytest.raises(LgframeError, match="exists; choose another path"):
        run_control_sample(ckpt, tmp_path / "out.png", condition=tmp_path / "ok.png", instruction="edges")
    assert (tmp_path / "out.png").read_bytes() == b"keep"
    with pytest.raises(LgframeError, match="routes by the instruction: give --instruction"):
        run_control_sample(ckpt, tmp_path / "new.png", condition=tmp_path / "ok.png")
    with pytest.raises(LgframeError, match="unknown condition family 'sketch'"):
        run_control_sample(ckpt, tmp_path / "new.png", condition=tmp_path / "ok.png", instruction="sketch")
    assert not (tmp_path / "new.png").exists()
    with pytest.raises(LgframeError, match=r"condition images have shape \(1, 1, 4, 4\); this model takes \(N, 1, 8, 8\)"):
        model(torch.zeros(1, 1, 8, 8), torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long),
              torch.zeros(1, 1, 4, 4), parse_instruction("edges").embedding()[None])


def test_control_recipes_validate_and_name_their_command(tmp_path):
    paths = shipped_control_recipes()
    assert {p.name for p in paths} >= {"divcontrol_digits.yaml", "divcontrol_adapt_digits.yaml"}
    for p in paths:
        cfg, ctl = load_control_recipe(p)
        assert p.read_text().splitlines()[0].startswith("# lgframe control ") and p.name in p.read_text().splitlines()[0]
        assert cfg.trainer.max_steps > 0 and ctl.conditions
    with pytest.raises(LgframeError, match="valid keys in control: base, method"):
        load_control_recipe("divcontrol_digits", ["control.align=1"])
    with pytest.raises(LgframeError, match="unknown condition family 'edgez'"):
        load_control_recipe("divcontrol_digits", ["control.conditions=[edgez]"])
    with pytest.raises(LgframeError, match="control.method='sparse'; valid: divcontrol, dense"):
        load_control_recipe("divcontrol_digits", ["control.method=sparse"])
    with pytest.raises(LgframeError, match="unknown recipe key 'trainer.max_stepz'"):
        load_control_recipe("divcontrol_digits", ["trainer.max_stepz=3"])
    for key in ("trainer.compile=true", "trainer.checkpoint_every=5", "trainer.activation_checkpointing=true"):
        cfg, _ = load_control_recipe("divcontrol_digits", [key])
        with pytest.raises(LgframeError, match=f"{key.split('=')[0]}=.*: control .*; valid: "):
            control_trainer(OmegaConf.to_container(cfg, resolve=True), tmp_path)


def test_cli_train_sample_adapt(tmp_path, capsys):
    from PIL import Image

    save_model(base_dit(), tmp_path / "base.safetensors")
    save_model(base_dit(seed=5), tmp_path / "base2.safetensors")
    common = [f"out_dir={tmp_path}/runs", "trainer.progress=false", "trainer.max_steps=3", "trainer.val_every=3",
              "control.samples=2"]
    assert main(["control", "train", "divcontrol_digits", f"control.base={tmp_path}/base.safetensors", *common]) == 0
    ckpt = tmp_path / "runs" / "divcontrol_digits" / "control.safetensors"
    assert ckpt.is_file() and (ckpt.parent / "samples.png").stat().st_size > 100
    Image.new("L", (8, 8), 0).save(tmp_path / "src.png")
    assert main(["control", "sample", str(ckpt), "--source", str(tmp_path / "src.png"), "--instruction", "edges",
                 "--n", "2", "--steps", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 100
    assert main(["control", "adapt", str(ckpt), "--instruction", "outline", "--shots", "4", "--out",
                 str(tmp_path / "a.safetensors"), f"out_dir={tmp_path}/runs", "trainer.progress=false",
                 "trainer.max_steps=2", "control.samples=2"]) == 0
    adapted, meta = load_control(tmp_path / "a.safetensors")
    assert adapted.spec.groups[-1] == "outline" and meta["adapted"]["shots"] == 4
    capsys.readouterr()
    assert main(["control", "sample", str(ckpt), "--condition", str(tmp_path / "src.png"), "--instruction", "edges",
                 "--base", str(tmp_path / "base2.safetensors"), "--out", str(tmp_path / "t.png")]) == 1
    assert "was trained for another base" in " ".join(capsys.readouterr().err.split())
    assert main(["control"]) == 1
