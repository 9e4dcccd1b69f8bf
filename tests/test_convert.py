"""diffusers DiT <-> lgframe DiT: outputs match, constraints apply, any size exports."""

import pytest
import torch
from diffusers import DiTTransformer2DModel
from helpers import activate

from lgframe.cli import main
from lgframe.core.registry import constraint_class, constraint_names, get_constraint
from lgframe.errors import LgframeError
from lgframe.models.convert import from_diffusers, to_diffusers
from lgframe.models.files import read_model
from lgframe.models.registry import create_model


def diffusers_dit(layers=3, shared_embedder=True, out_channels=2):
    torch.manual_seed(0)
    d = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=1, out_channels=out_channels,
                              num_layers=layers, sample_size=8, patch_size=2, num_embeds_ada_norm=10).eval()
    sd = d.state_dict()
    with torch.no_grad():
        for k, v in sd.items():
            if v.abs().sum() == 0 or "norm1.linear" in k or "proj_out" in k:
                v.normal_(0, 0.1)  # zero-initialized layers get values, so every part matters
        if shared_embedder:  # as in checkpoints converted from DiT: one embedder copied into every block
            for i in range(1, layers):
                for k in [k for k in sd if k.startswith("transformer_blocks.0.norm1.emb.")]:
                    sd[k.replace(".0.", f".{i}.", 1)].copy_(sd[k])
    return d


INPUTS = (torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 500, 999]),
          torch.tensor([0, 4, 10]))


def rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def test_import_matches_diffusers_outputs(tmp_path):
    d = diffusers_dit()
    d.save_pretrained(tmp_path / "dit")
    assert main(["import", "diffusers", str(tmp_path / "dit"), "--out", str(tmp_path / "m.safetensors")]) == 0
    model, _ = read_model(tmp_path / "m.safetensors")
    x, t, y = INPUTS
    assert rel(model(x, t, y), d(x, timestep=t, class_labels=y).sample) < 1e-4


def test_export_any_size_loads_in_diffusers(tmp_path):
    for model in (from_diffusers(diffusers_dit()), activate(create_model("DiT-Pico/2", depth=3, freq_shift=1))):
        get_constraint("svd").attach(model)  # a constrained model: export materializes a copy
        to_diffusers(model, tmp_path / "out", overwrite=True)
        back = DiTTransformer2DModel.from_pretrained(str(tmp_path / "out"), local_files_only=True)
        x, t, y = INPUTS
        assert rel(back(x, timestep=t, class_labels=y).sample, model(x, t, y)) < 1e-4


@pytest.mark.parametrize("name", [n for n in constraint_names() if n != "scratch"])
def test_constraints_on_an_imported_model(name):
    model = from_diffusers(diffusers_dit(layers=4))
    c = get_constraint(name)
    c.attach(model, init="dense")
    child = constraint_class(name)().descend(c.learngene(model), create_model("DiT-Pico/2", depth=2, width=32, heads=2,
                                                                            out_channels=2, freq_shift=1))
    x, t, y = INPUTS
    assert torch.isfinite(child(x, t, y)).all()


def test_import_refuses_per_block_embedders_and_missing_folders(tmp_path):
    with pytest.raises(LgframeError, match="block 1 has its own timestep/class embedder"):
        from_diffusers(diffusers_dit(shared_embedder=False))
    with pytest.raises(LgframeError, match="is not a diffusers model directory.*Nothing is downloaded"):
        from_diffusers(tmp_path / "nothing")


def test_export_needs_the_diffusers_timestep_convention():
    with pytest.raises(LgframeError, match="frequency shift 0; diffusers' DiT hard-wires 1"):
        to_diffusers(create_model("DiT-Pico/2"))


@pytest.mark.parametrize("name", ["svd", "dwt"])
def test_learngene_of_an_imported_dit_descends_and_trains(tmp_path, name):
    """import -> learngene -> a smaller descendant that trains on digits. The imported DiT has
    learned sigma (2 output channels); the descendant predicts the noise and takes its rows."""
    from lgframe.training.recipes import load_recipe
    from lgframe.training.stages import fit

    diffusers_dit(layers=4).save_pretrained(tmp_path / "dit")
    assert main(["import", "diffusers", str(tmp_path / "dit"), "--out", str(tmp_path / "m.safetensors")]) == 0
    lg = tmp_path / "lg.safetensors"
    # a random model's svd closed form is lossy (refused without --allow-lossy; tests/test_refit.py): the
    # plumbing of import -> learngene -> descend is what this test checks
    assert main(["learngene", str(tmp_path / "m.safetensors"), "--constraint", name, "--out", str(lg), "--allow-lossy"]) == 0
    # the README's third command: descend to a file of another size
    assert main(["descend", str(lg), "--model", "depth=2", "width=32", "heads=2", "--out", str(tmp_path / "d.safetensors")]) == 0
    from lgframe.models.files import read_model

    child, _ = read_model(tmp_path / "d.safetensors")
    assert len(child.blocks) == 2 and child.config.width == 32
    res = fit(load_recipe("dit_digits_descend", [
        f"out_dir={tmp_path}", "name=child", f"constraint={name}", f"init.source={lg}", "model.depth=2",
        "model.width=32", "model.heads=2", "trainer.max_steps=30", "trainer.val_every=30", "init.unfreeze_at=10",
        "trainer.progress=false", "ema.enabled=false"]), extract_learngene=False)
    model = res.task.model
    assert model.out_channels == 1 and len(model.blocks) == 2
    (_, first), (_, last) = res.curve[0], res.curve[-1]
    assert last < 0.9 * first


@pytest.mark.parametrize("name", ["svd", "dct"])
def test_descent_to_other_data_keeps_fresh_data_layers(name):
    """A 10-class, 1-channel, learned-sigma ancestor -> a 3-class, 4-channel latent DiT:
    the patch embedding, output layer and class table stay fresh, the rest is inherited."""
    model = from_diffusers(diffusers_dit(layers=4))
    c = get_constraint(name)
    c.attach(model, init="dense")
    lg = c.learngene(model)
    torch.manual_seed(5)
    target = create_model("DiT-Pico/2", depth=4, width=32, heads=2, in_channels=4, num_classes=3, freq_shift=1)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    child = constraint_class(name)().descend(lg, target)
    sd = get_constraint(name).materialize(child).state_dict()
    for k in ("x_embedder.proj.weight", "final_layer.linear.weight", "y_embedder.embedding_table.weight"):
        assert torch.equal(sd[k], fresh[k]), k
    src = model.state_dict()
    for k in ("x_embedder.proj.bias", "t_embedder.mlp.0.weight", "blocks.1.adaLN_modulation.1.weight"):
        assert torch.allclose(sd[k], src[k], atol=1e-6), k
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    assert torch.isfinite(child(x, t, torch.tensor([0, 3]))).all()
