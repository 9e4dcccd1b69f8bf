"""Hub-style folders: a model as config.json + model.safetensors, a learngene as
learngene.safetensors + learngene.json + README.md; round trips, plain weights, the
card, and folders that are not lgframe's are never replaced."""

import hashlib
import json
from pathlib import Path

import pytest
import torch
from helpers import activate
from safetensors import safe_open
from safetensors.torch import load_file

import lgframe
from lgframe.cli import main
from lgframe.core.registry import get_constraint
from lgframe.errors import LgframeError
from lgframe.formats.learngene import Learngene
from lgframe.models.files import model_meta, read_model, save_model
from lgframe.models.registry import create_model
from lgframe.training.recipes import load_recipe
from lgframe.training.stages import fit, read_curve


def model_of(constraint: str | None):
    torch.manual_seed(0)
    model = create_model("DiT-Pico/2")
    if constraint:
        get_constraint(constraint).attach(model)
    return activate(model)


def outputs(model):
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(3, 1, 8, 8, generator=g), torch.tensor([1, 400, 999]), torch.tensor([0, 3, 9])
    with torch.no_grad():
        return model.eval()(x, t, y)


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished 2-step svd pretrain (EMA on), to export and extract from."""
    d = tmp_path_factory.mktemp("runs")
    return fit(load_recipe("dit_digits_pretrain", [f"out_dir={d}", "name=hubrun", "model.name=DiT-Pico/2",
                                                   "trainer.max_steps=2", "trainer.val_every=2",
                                                   "trainer.progress=false", "sample.n=0"]))


@pytest.mark.parametrize("constraint", [None, "svd"])
def test_model_folder_round_trip_is_exact(constraint, tmp_path):
    model = model_of(constraint)
    folder = lgframe.save_pretrained(model, tmp_path / "m")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    for back in (lgframe.from_pretrained(folder), lgframe.load_model(folder),
                 lgframe.load_model(folder / "model.safetensors")):
        assert torch.equal(outputs(back), outputs(model))
        assert model_meta(back) == model_meta(model)  # config, constraint and options, frozen list
    assert json.loads((folder / "config.json").read_text()) == model_meta(model)
    save_model(model, tmp_path / "one.safetensors")  # the single-file form still loads
    assert torch.equal(outputs(lgframe.load_model(tmp_path / "one.safetensors")), outputs(model))


def test_model_safetensors_is_plain_and_matches_the_state_dict(tmp_path):
    model = model_of("svd")
    folder = lgframe.save_pretrained(model, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")  # safetensors alone, no lgframe
    state = model.state_dict()
    assert list(tensors) and set(tensors) == set(state)
    assert all(torch.equal(tensors[k], state[k]) for k in state)
    assert "blocks.0.attn.qkv.sigma" in tensors
    with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
        assert f.metadata() == {"format": "pt"}


def test_export_folder_from_a_checkpoint_keeps_its_ema_weights_and_recipe(run, tmp_path, capsys):
    out = tmp_path / "exported"
    assert main(["export", "lgframe", str(run.checkpoint), "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["ema"] is True and config["global_step"] == 2 and config["recipe"]["data"]["name"] == "digits"
    ema_model, meta = read_model(run.checkpoint)
    assert meta["ema"] is True
    assert torch.equal(outputs(lgframe.load_model(out)), outputs(ema_model))
    live = tmp_path / "live"
    lgframe.save_pretrained(run.checkpoint, live, ema=False)
    assert json.loads((live / "config.json").read_text())["ema"] is False
    assert torch.equal(outputs(lgframe.load_model(live)), outputs(lgframe.load_model(run.checkpoint, ema=False)))
    assert not torch.equal(outputs(lgframe.load_model(live)), outputs(ema_model))


def test_learngene_folder_descends_like_the_file(tmp_path, capsys):
    lg = get_constraint("svd").learngene(model_of("svd"))
    st, _ = lg.save(tmp_path / "lg.safetensors")
    folder = lg.save_pretrained(tmp_path / "lgdir")
    assert sorted(p.name for p in folder.iterdir()) == ["README.md", "learngene.json", "learngene.safetensors"]
    states = []
    for src in (st, folder, Learngene.from_pretrained(folder)):
        torch.manual_seed(5)  # the descendant's fresh parts (new layers, heads) are random
        states.append(lgframe.descend(src, depth=6).state_dict())
    for out, src in (("from_file", st), ("from_folder", folder)):
        torch.manual_seed(5)
        assert main(["descend", str(src), "--model", "depth=6", "--out", str(tmp_path / f"{out}.safetensors")]) == 0
        states.append(lgframe.load_model(tmp_path / f"{out}.safetensors").state_dict())
    first = states[0]
    assert len(first) > 0 and all(s.keys() == first.keys() for s in states)
    assert all(torch.equal(s[k], first[k]) for s in states[1:] for k in first)


def test_card_names_the_constraint_and_the_run(run, tmp_path, capsys):
    out = tmp_path / "dit-svd-learngene"
    assert main(["learngene", str(run.checkpoint), "--out", str(out), "--folder"]) == 0
    card = (out / "README.md").read_text()
    front = card.split("---\n")[1]
    assert front.splitlines()[0] == "library_name: lgframe" and "- svd\n" in front and "- learngene\n" in front
    assert "# svd learngene of a DiT (depth 4, width 64, heads 2)" in card
    assert "| sigma_init | interpolate |" in card  # the constraint's options
    assert "| in_channels | 1 |" in card  # the ancestor's config
    last_step, last_loss = read_curve(run.run_dir, "val/loss")[-1]
    assert "| val/loss | 1.00" in card and f"{last_loss:.4g} (step {last_step})" in card
    assert "| data | digits |" in card and "| EMA weights | yes |" in card and 'Learngene.from_pretrained("dit-svd-learngene")' in card
    about = json.loads((out / "learngene.json").read_text())["about"]
    assert about["run"] == "hubrun" and about["global_step"] == 2 and about["ema"] is True
    assert str(tmp_path) not in card and str(run.run_dir) not in json.dumps(about)  # no local paths published
    back = Learngene.load(out)  # load takes the folder too; about survives a second save
    assert back.about == about and back.save_pretrained(tmp_path / "again").joinpath("README.md").read_text() == \
        card.replace("dit-svd-learngene", "again")


def test_a_folder_lgframe_did_not_write_is_never_replaced(run, tmp_path, capsys):
    model, lg = model_of("svd"), get_constraint("svd").learngene(model_of("svd"))
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    (mine / "config.json").write_text('{"architectures": ["VisionTransformer"]}')  # e.g. a timm folder
    before = snapshot(tmp_path)
    with pytest.raises(LgframeError, match="not an lgframe model folder .*notes.txt.*left as it is"):
        lgframe.save_pretrained(model, mine)
    with pytest.raises(LgframeError, match="not an lgframe learngene folder"):
        lg.save_pretrained(mine)
    assert main(["export", "lgframe", str(run.checkpoint), "--out", str(mine), "--overwrite"]) == 1
    assert "left as it is" in " ".join(capsys.readouterr().err.split())
    (mine / "notes.txt").unlink()
    with pytest.raises(LgframeError, match="its config.json is missing or was not written by lgframe"):
        lgframe.save_pretrained(model, mine)  # a foreign config.json alone is not lgframe's either
    (mine / "notes.txt").write_text("precious")
    assert snapshot(tmp_path) == before  # nothing changed, no temporary folder left beside
    with pytest.raises(LgframeError, match="is not an lgframe model config"):
        lgframe.load_model(mine)
    # a model folder is not a learngene folder, nor the reverse; an earlier folder of the same kind is replaced
    m, g = lgframe.save_pretrained(model, tmp_path / "m"), lg.save_pretrained(tmp_path / "g")
    with pytest.raises(LgframeError, match="learngene folder"):
        lg.save_pretrained(m)
    with pytest.raises(LgframeError, match="model folder"):
        lgframe.save_pretrained(model, g)
    with pytest.raises(LgframeError, match="holds a learngene: descend it"):
        lgframe.load_model(g)
    with pytest.raises(LgframeError, match=r"holds a model \(config.json\)"):
        Learngene.load(m)
    other = model_of(None)
    lgframe.save_pretrained(other, m)
    assert torch.equal(outputs(lgframe.from_pretrained(m)), outputs(other))
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_learngene_folder_is_an_init_source(tmp_path):
    lg = get_constraint("svd").learngene(model_of("svd"))
    folder = lg.save_pretrained(tmp_path / "lgdir")
    st, _ = lg.save(tmp_path / "lg.safetensors")
    runs = []
    for name, src in (("folder", folder), ("file", st)):
        cfg = load_recipe("dit_digits_descend", [f"out_dir={tmp_path}", f"name={name}", "model.name=DiT-Pico/2",
                                                 f"init.source={src}", "constraint=svd", "trainer.max_steps=2",
                                                 "trainer.val_every=2", "trainer.progress=false", "sample.n=0"])
        runs.append(fit(cfg, extract_learngene=False))
    assert runs[0].curve == runs[1].curve and len(runs[0].curve) == 2
