"""Bad input: every case fails with a clear LgframeError naming what is valid,
and nothing is half-written or overwritten."""

import errno
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from lgframe.cli import main
from lgframe.constraint import get_constraint
from lgframe.errors import LgframeError
from lgframe.io import load_model, save_model
from lgframe.learngene import Learngene
from lgframe.models import create_model, parse_size
from lgframe.recipes import load_recipe
from lgframe.run import descend_file, extract_learngene, fit


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    torch.manual_seed(0)
    dit = create_model("DiT-Pico/2")
    get_constraint("svd").attach(dit)
    get_constraint("svd").learngene(dit).save(d / "dit.safetensors")
    vit = create_model("ViT-Pico/2")
    get_constraint("svd").attach(vit)
    get_constraint("svd").learngene(vit).save(d / "vit.safetensors")
    save_model(dit, d / "model.safetensors")
    save_model(create_model("ViT-Pico/2"), d / "vitmodel.safetensors")
    return d


def copy_learngene(files, tmp_path, name="lg"):
    st, js = tmp_path / f"{name}.safetensors", tmp_path / f"{name}.json"
    st.write_bytes((files / "dit.safetensors").read_bytes())
    js.write_text((files / "dit.json").read_text())
    return st, js


def edit_manifest(js, fn):
    m = json.loads(js.read_text())
    fn(m)
    js.write_text(json.dumps(m))


# ----------------------------------------------------------------- files
def test_corrupt_safetensors(tmp_path):
    p = tmp_path / "x.safetensors"
    p.write_bytes(b"\x00\x01garbage" * 10)
    with pytest.raises(LgframeError, match="not a readable safetensors file"):
        Learngene.load(p)


def test_truncated_safetensors(files, tmp_path):
    st, _ = copy_learngene(files, tmp_path)
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    with pytest.raises(LgframeError, match="not a readable safetensors file"):
        Learngene.load(st)


def test_manifest_of_another_version(files, tmp_path):
    st, js = copy_learngene(files, tmp_path)
    edit_manifest(js, lambda m: m.update(format_version=7))
    with pytest.raises(LgframeError, match="format version 7; this lgframe reads version 1"):
        Learngene.load(st)


def test_manifest_of_another_constraint(files):
    with pytest.raises(LgframeError, match="made by constraint 'svd', but 'kronecker' was expected"):
        Learngene.load(files / "dit.safetensors", constraint="kronecker")


def test_manifest_that_is_not_json(files, tmp_path):
    st, js = copy_learngene(files, tmp_path)
    js.write_text("{not json")
    with pytest.raises(LgframeError, match="is not valid JSON"):
        Learngene.load(st)


def test_manifest_that_is_not_lgframes(files, tmp_path):
    st, js = copy_learngene(files, tmp_path)
    js.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(LgframeError, match="is not an lgframe learngene manifest"):
        Learngene.load(st)


def test_tensor_missing_from_the_file(files, tmp_path):
    st, _ = copy_learngene(files, tmp_path)
    t = load_file(st)
    t.pop("learngene/attn.qkv.weight/U")
    save_file(t, st)
    with pytest.raises(LgframeError, match="does not match its manifest: tensors missing from the file"):
        Learngene.load(st)


def test_tensor_changed_after_extraction(files, tmp_path):
    st, _ = copy_learngene(files, tmp_path)
    t = load_file(st)
    t["scalers/mlp.fc1.weight/sigma"][0, 0] += 1
    save_file(t, st)
    with pytest.raises(LgframeError, match="'scalers/mlp.fc1.weight/sigma' has SHA-256 .* the file is corrupt"):
        Learngene.load(st)


def test_tensor_shape_mismatch_in_a_model_file(files, tmp_path):
    p = tmp_path / "m.safetensors"
    from safetensors import safe_open

    with safe_open(str(files / "model.safetensors"), "pt") as f:
        meta = f.metadata()
    t = load_file(files / "model.safetensors")
    t["x_embedder.proj.bias"] = torch.zeros(65)
    save_file(t, p, metadata=meta)
    with pytest.raises(LgframeError, match="weights do not fit the model.*size mismatch"):
        load_model(p)


def test_safetensors_without_lgframe_metadata(tmp_path):
    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, p)
    with pytest.raises(LgframeError, match="without an lgframe model config"):
        load_model(p)


def test_pickled_checkpoint_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    p = tmp_path / "evil.ckpt"
    with open(p, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(LgframeError, match="could not be loaded safely \\(weights_only=True\\)"):
        load_model(p)


def test_checkpoint_not_written_by_lgframe(tmp_path):
    p = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, p)
    with pytest.raises(LgframeError, match="was not written by lgframe"):
        load_model(p)


def test_missing_files():
    with pytest.raises(LgframeError, match="checkpoint 'nope.ckpt' does not exist"):
        load_model("nope.ckpt")
    with pytest.raises(LgframeError, match="learngene file 'nope.safetensors' does not exist"):
        Learngene.load("nope.safetensors")


def test_dense_checkpoint_has_no_learngene_without_a_constraint(files, tmp_path):
    with pytest.raises(LgframeError, match="--constraint svd"):
        extract_learngene(files / "vitmodel.safetensors", tmp_path / "x.safetensors")
    assert not (tmp_path / "x.safetensors").exists()


# ----------------------------------------------------------------- recipes and sizes
@pytest.mark.parametrize(
    "override, message",
    [
        ("optim.lrr=1", "unknown recipe key 'optim.lrr'.*Did you mean 'optim.lr'"),
        ("trainer.max_steps=ten", "could not be converted to Integer"),
        ("model.depth=-2", "depth=-2 must be a positive integer"),
        ("model.width=0", "width=0 must be a positive integer"),
        ("model.heads=3", "width 128 is not divisible by heads 3.*Valid head counts"),
        ("model.name=DiT-Nan/2", "unknown model 'DiT-Nan/2'. Did you mean DiT-Nano/2"),
        ("constraint={name: svd, rank: 999}", None),  # valid at load, fails at attach (below)
        ("constraint=svdd", "unknown constraint 'svdd'. Did you mean 'svd'"),
        ("constraint={name: svd, sigma_init: guess}", "sigma_init='guess'; valid: interpolate, copy, random"),
        ("task=classification", "task 'classification' needs a VIT model"),
        ("optim.name=lion", "optim.name='lion'; valid: adamw, sgd"),
        ("data.name=imagenet", "data.name='imagenet'; valid: digits, shapes"),
        ("sample.scheduler=euler", "valid: ddim, ddpm"),
        ("nonsense", "must look like key=value"),
    ],
)
def test_recipe_values(override, message):
    if message is None:
        cfg = load_recipe("dit_digits_pretrain", [override])
        with pytest.raises(LgframeError, match="valid ranks are 1..64"):
            get_constraint(dict(cfg.constraint)).attach(create_model("DiT-Pico/2"))
        return
    with pytest.raises(LgframeError, match=message):
        load_recipe("dit_digits_pretrain", [override])


def test_data_fraction_out_of_range(tmp_path):
    cfg = load_recipe("dit_digits_pretrain", [f"out_dir={tmp_path}", "data.train_fraction=0"])
    with pytest.raises(LgframeError, match="train_fraction=0.0 must be in \\(0, 1\\]"):
        fit(cfg)


def test_size_keys():
    with pytest.raises(LgframeError, match="unknown size key 'layers' in --model; valid: depth, width, heads"):
        parse_size("layers=3")
    with pytest.raises(LgframeError, match="expected an integer"):
        parse_size("depth=three")


# ----------------------------------------------------------------- families and sources
def test_vit_learngene_onto_a_dit_and_back(files):
    with pytest.raises(LgframeError, match="comes from a 'vit' model and cannot initialize a 'dit' model"):
        get_constraint("svd").descend(Learngene.load(files / "vit.safetensors"), create_model("DiT-Pico/2"))
    with pytest.raises(LgframeError, match="comes from a 'dit' model and cannot initialize a 'vit' model"):
        get_constraint("svd").descend(Learngene.load(files / "dit.safetensors"), create_model("ViT-Pico/2"))
    with pytest.raises(LgframeError, match="is a vit size, but the learngene comes from a dit model"):
        descend_file(files / "dit.safetensors", "ViT-Pico/2", files / "never.safetensors")


def test_learngene_source_of_another_constraint(files, tmp_path):
    cfg = load_recipe("dit_digits_descend", [f"out_dir={tmp_path}", f"init.source={files / 'dit.safetensors'}",
                                             "constraint=scratch"])
    with pytest.raises(LgframeError, match="learngene of constraint 'svd'.*set constraint=svd"):
        fit(cfg)


def test_missing_init_source_and_resume(tmp_path):
    cfg = load_recipe("dit_digits_descend", [f"out_dir={tmp_path}", "init.source=missing.safetensors"])
    with pytest.raises(LgframeError, match="init source 'missing.safetensors' does not exist"):
        fit(cfg)
    cfg = load_recipe("dit_digits_descend", [f"out_dir={tmp_path}", "resume=missing.ckpt"])
    with pytest.raises(LgframeError, match="resume=missing.ckpt: no checkpoint at 'missing.ckpt'"):
        fit(cfg)


# ----------------------------------------------------------------- writes
def test_output_directory_not_writable(files, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    rc = main(["descend", str(files / "dit.safetensors"), "--model", "depth=2", "--out", str(blocker / "out.safetensors")])
    err = capsys.readouterr().err
    assert rc == 1 and "error:" in err and "Traceback" not in err
    assert blocker.read_text() == "x"


def test_disk_full_keeps_the_previous_file(files, tmp_path, monkeypatch):
    import lgframe.io

    st, js = copy_learngene(files, tmp_path)
    before = st.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lgframe.io, "save_file", full)
    lg = Learngene.load(st)
    with pytest.raises(OSError, match="No space left"):
        lg.save(st)
    assert st.read_bytes() == before
    assert Learngene.load(st).tensors.keys() == lg.tensors.keys()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []  # no temporary left behind


def test_cli_user_errors_exit_1_usage_errors_exit_2(tmp_path, capsys):
    assert main(["descend", "nope.safetensors", "--model", "DiT-Pico/2", "--out", str(tmp_path / "x.safetensors")]) == 1
    with pytest.raises(SystemExit) as e:
        main(["descend", "--model"])
    assert e.value.code == 2
    with pytest.raises(LgframeError):
        main(["--debug", "descend", "nope.safetensors", "--model", "DiT-Pico/2", "--out", str(tmp_path / "x.safetensors")])
    assert not list(Path(tmp_path).iterdir())


def test_sampling_a_vit_is_refused(files, tmp_path, capsys):
    assert main(["sample", str(files / "vitmodel.safetensors"), "--out", str(tmp_path / "s.png")]) == 1
    assert "sampling needs a DiT" in capsys.readouterr().err.replace("\n", " ")
    assert not (tmp_path / "s.png").exists()


def test_failed_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import lgframe.io

    saves = {"n": 0}
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:  # the second checkpoint dies half-way through its write
            with open(f, "wb") as fh:
                fh.write(b"partial")
            raise OSError(errno.EIO, "I/O error")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(lgframe.io.torch, "save", failing_save)
    cfg = load_recipe("dit_digits_pretrain", [f"out_dir={tmp_path}", "name=w", "model.name=DiT-Pico/2", "trainer.max_steps=4",
                                              "trainer.val_every=2", "trainer.checkpoint_every=2", "trainer.progress=false"])
    with pytest.raises(OSError, match="I/O error"):
        fit(cfg)
    monkeypatch.setattr(lgframe.io.torch, "save", real_save)
    ckpt = torch.load(tmp_path / "w/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert not [p for p in (tmp_path / "w/checkpoints").iterdir() if p.name.endswith(".tmp")]
    model, _ = load_model(tmp_path / "w/checkpoints/last.ckpt")
    assert sum(p.numel() for p in model.parameters()) > 0
