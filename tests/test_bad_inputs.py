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
from lgframe.core.registry import get_constraint
from lgframe.errors import LgframeError
from lgframe.formats.learngene import Learngene
from lgframe.models.files import read_model, save_model
from lgframe.models.registry import create_model, parse_size
from lgframe.training.recipes import load_recipe
from lgframe.training.stages import descend_file, extract_learngene_file, fit


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
        read_model(p)


def test_safetensors_without_lgframe_metadata(tmp_path):
    p = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, p)
    with pytest.raises(LgframeError, match="without an lgframe model config"):
        read_model(p)


def test_pickled_checkpoint_with_code_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("this must never run",))

    p = tmp_path / "evil.ckpt"
    with open(p, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(LgframeError, match="could not be loaded safely \\(weights_only=True\\)"):
        read_model(p)


def test_checkpoint_not_written_by_lgframe(tmp_path):
    p = tmp_path / "other.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, p)
    with pytest.raises(LgframeError, match="was not written by lgframe"):
        read_model(p)


def test_missing_files():
    with pytest.raises(LgframeError, match="checkpoint 'nope.ckpt' does not exist"):
        read_model("nope.ckpt")
    with pytest.raises(LgframeError, match="learngene file 'nope.safetensors' does not exist"):
        Learngene.load("nope.safetensors")


def test_dense_checkpoint_has_no_learngene_without_a_constraint(files, tmp_path):
    with pytest.raises(LgframeError, match="--constraint svd"):
        extract_learngene_file(files / "vitmodel.safetensors", tmp_path / "x.safetensors")
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
    import lgframe.formats.files

    st, js = copy_learngene(files, tmp_path)
    before = st.read_bytes()

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(lgframe.formats.files, "save_file", full)
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
    import lgframe.formats.checkpoints

    saves = {"n": 0}
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        saves["n"] += 1
        if saves["n"] == 2:  # the second checkpoint dies half-way through its write
            with open(f, "wb") as fh:
                fh.write(b"partial")
            raise OSError(errno.EIO, "I/O error")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(lgframe.formats.checkpoints.torch, "save", failing_save)
    cfg = load_recipe("dit_digits_pretrain", [f"out_dir={tmp_path}", "name=w", "model.name=DiT-Pico/2", "trainer.max_steps=4",
                                              "trainer.val_every=2", "trainer.checkpoint_every=2", "trainer.progress=false"])
    with pytest.raises(OSError, match="I/O error"):
        fit(cfg)
    monkeypatch.setattr(lgframe.formats.checkpoints.torch, "save", real_save)
    ckpt = torch.load(tmp_path / "w/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 2
    assert not [p for p in (tmp_path / "w/checkpoints").iterdir() if p.name.endswith(".tmp")]
    model, _ = read_model(tmp_path / "w/checkpoints/last.ckpt")
    assert sum(p.numel() for p in model.parameters()) > 0


# ================================================================= the data-safety cases (issue: security and data safety)
# Each case: the exit code, a message naming the offending key or file and what is
# valid, no traceback, and nothing that existed before changed (folder hashes).
import hashlib  # noqa: E402
import os  # noqa: E402


def snapshot(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def cli_refuses(args, capsys, *mentions, rc=1):
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    flat = " ".join(err.split())
    assert code == rc, (code, err)
    assert "Traceback" not in err and flat.startswith("error:"), err
    for m in mentions:
        assert m in flat, (m, flat)
    return flat


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A finished tiny pretrain (svd) to read from."""
    d = tmp_path_factory.mktemp("run")
    cfg = load_recipe("dit_digits_pretrain", [f"out_dir={d}", "name=r", "model.name=DiT-Pico/2", "model.freq_shift=1",
                                              "trainer.max_steps=2",
                                              "trainer.val_every=2", "trainer.progress=false", "sample.n=0"])
    res = fit(cfg)
    return res


# ----------------------------------------------------------------- outputs never destroy
def test_export_refuses_a_folder_of_user_files(run, tmp_path, capsys):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    before = snapshot(tmp_path)
    cli_refuses(["export", "diffusers", run.checkpoint, "--out", mine], capsys, "mine", "not empty", "--overwrite")
    assert snapshot(tmp_path) == before


def test_export_refuses_the_run_folder_holding_its_source(run, capsys):
    before = snapshot(run.run_dir)
    for out in (run.run_dir, run.run_dir / "checkpoints"):
        cli_refuses(["export", "diffusers", run.checkpoint, "--out", out, "--overwrite"], capsys, "is an input")
    assert snapshot(run.run_dir) == before


def test_export_refuses_to_replace_a_file_with_a_folder(run, tmp_path, capsys):
    f = tmp_path / "model.bin"
    f.write_bytes(b"keep")
    cli_refuses(["export", "diffusers", run.checkpoint, "--out", f, "--overwrite"], capsys, "is a file")
    assert f.read_bytes() == b"keep"


def test_output_dot_is_refused(run, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x").write_text("x")
    before = snapshot(tmp_path)
    for args in (["export", "diffusers", run.checkpoint, "--out", ".", "--overwrite"],
                 ["demo", "--out", ".", "--overwrite"]):
        cli_refuses(args, capsys, "current folder")
    assert snapshot(tmp_path) == before and not list(tmp_path.glob(".*"))


def test_export_overwrite_replaces_only_when_asked(run, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["export", "diffusers", str(run.checkpoint), "--out", str(out)]) == 0
    first = snapshot(out)
    cli_refuses(["export", "diffusers", run.checkpoint, "--out", out], capsys, "not empty")
    assert snapshot(out) == first
    assert main(["export", "diffusers", str(run.checkpoint), "--out", str(out), "--overwrite"]) == 0
    assert snapshot(out).keys() == first.keys() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_descend_onto_its_own_learngene_is_refused(files, tmp_path, capsys):
    st, js = copy_learngene(files, tmp_path)
    before = snapshot(tmp_path)
    cli_refuses(["descend", st, "--model", "DiT-Pico/2", "--out", st, "--overwrite"], capsys, "is an input")
    cli_refuses(["descend", st, "--model", "DiT-Pico/2", "--out", js, "--overwrite"], capsys, "is an input")
    assert snapshot(tmp_path) == before
    Learngene.load(st)  # still loads


@pytest.mark.parametrize("command", ["sample", "evaluate"])
def test_sample_and_evaluate_never_write_over_their_checkpoint(command, run, capsys):
    before = snapshot(run.run_dir)
    cli_refuses([command, run.checkpoint, "--out", run.checkpoint, "--overwrite"], capsys, "is an input")
    assert snapshot(run.run_dir) == before


@pytest.mark.parametrize("command", ["learngene", "descend", "sample", "import", "decompose"])
def test_an_existing_output_file_needs_overwrite(command, files, run, tmp_path, capsys):
    out = tmp_path / ("o.png" if command == "sample" else "o.safetensors")
    out.write_bytes(b"mine")
    if command == "learngene":
        args = ["learngene", run.checkpoint]
    elif command == "descend":
        args = ["descend", files / "dit.safetensors", "--model", "DiT-Pico/2"]
    elif command == "sample":
        args = ["sample", run.checkpoint]
    elif command == "import":
        args = ["import", "diffusers", tmp_path]
    else:
        args = ["decompose", run.checkpoint, "--learngene-only"]
    cli_refuses([*args, "--out", out], capsys, "o.", "exists", "--overwrite")
    assert out.read_bytes() == b"mine"


def test_learngene_overwrite_is_explicit_and_json_counts_as_output(run, tmp_path, capsys):
    out = tmp_path / "lg.safetensors"
    (tmp_path / "lg.json").write_text("{}")  # the manifest beside it is an output too
    cli_refuses(["learngene", run.checkpoint, "--out", out], capsys, "lg.json", "exists")
    assert not out.exists()
    assert main(["learngene", str(run.checkpoint), "--out", str(out), "--overwrite"]) == 0
    Learngene.load(out)


def test_encode_refuses_a_non_empty_output_folder(tmp_path, capsys):
    out = tmp_path / "lat"
    out.mkdir()
    (out / "keep.txt").write_text("k")
    cli_refuses(["encode", "--vae", tmp_path / "vae", "--images", tmp_path / "img", "--out", out], capsys, "not empty")
    assert (out / "keep.txt").read_text() == "k"


def test_outputs_respect_the_umask(files, tmp_path):
    old = os.umask(0o027)
    try:
        lg = Learngene.load(files / "dit.safetensors")
        st, js = lg.save(tmp_path / "u.safetensors")
    finally:
        os.umask(old)
    assert (st.stat().st_mode & 0o777) == 0o640 and (js.stat().st_mode & 0o777) == 0o640


# ----------------------------------------------------------------- sampling and evaluation arguments
@pytest.mark.parametrize("args, message", [
    (["sample", "{ck}", "--steps", "-1"], "--steps -1"),
    (["sample", "{ck}", "--steps", "0"], "--steps 0"),
    (["sample", "{ck}", "--guidance", "nan"], "--guidance nan"),
    (["sample", "{ck}", "--guidance", "inf"], "--guidance inf"),
    (["sample", "{ck}", "--n", "0"], "--n 0"),
    (["sample", "{ck}", "--n", "-5"], "--n -5"),
    (["evaluate", "{ck}", "--n", "-1"], "--n -1"),
])
def test_sampling_arguments_out_of_range(args, message, run, tmp_path, capsys):
    args = [a.replace("{ck}", str(run.checkpoint)) for a in args] + ["--out", str(tmp_path / "o.png")]
    cli_refuses(args, capsys, message)
    assert not (tmp_path / "o.png").exists()


# ----------------------------------------------------------------- every numeric recipe key has a range
@pytest.mark.parametrize("override, key", [
    ("optim.warmup_steps=-1", "optim.warmup_steps"),
    ("optim.grad_clip=-1", "optim.grad_clip"),
    ("optim.lr=0", "optim.lr"),
    ("optim.lr=-0.001", "optim.lr"),
    ("optim.lr=nan", "optim.lr"),
    ("optim.weight_decay=-1", "optim.weight_decay"),
    ("optim.scaler_lr=-1", "optim.scaler_lr"),
    ("optim.learngene_lr=inf", "optim.learngene_lr"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("trainer.val_every=0", "trainer.val_every"),
    ("trainer.log_every=0", "trainer.log_every"),
    ("trainer.checkpoint_every=-2", "trainer.checkpoint_every"),
    ("trainer.nan_skip=-1", "trainer.nan_skip"),
    ("trainer.num_nodes=0", "trainer.num_nodes"),
    ("trainer.devices=0", "trainer.devices"),
    ("diffusion.num_train_timesteps=0", "diffusion.num_train_timesteps"),
    ("diffusion.beta_schedule=bogus", "diffusion.beta_schedule"),
    ("diffusion.label_dropout=1.5", "diffusion.label_dropout"),
    ("sample.steps=0", "sample.steps"),
    ("sample.steps=5000", "sample.steps"),
    ("sample.guidance=nan", "sample.guidance"),
    ("ema.decay=1.5", "ema.decay"),
    ("ema.decay=0", "ema.decay"),
    ("ema.start_step=-1", "ema.start_step"),
    ("init.unfreeze_at=-5", "init.unfreeze_at"),
    ("data.batch_size=0", "data.batch_size"),
    ("data.num_workers=-1", "data.num_workers"),
    ("compare.steps=0", "compare.steps"),
    ("compare.seeds=[]", "compare.seeds"),
    ("personalize.lora_rank=0", "personalize.lora_rank"),
])
def test_numeric_keys_out_of_range(override, key, tmp_path):
    with pytest.raises(LgframeError) as e:
        load_recipe("dit_digits_pretrain", [f"out_dir={tmp_path}", override])
    msg = str(e.value)
    assert f"'{key}'" in msg and "valid" in msg, msg
    assert not list(tmp_path.iterdir())


def test_beta_schedule_names_the_valid_ones():
    with pytest.raises(LgframeError, match="linear, scaled_linear, squaredcos_cap_v2"):
        load_recipe("dit_digits_pretrain", ["diffusion.beta_schedule=bogus"])


# ----------------------------------------------------------------- a failed start writes nothing
@pytest.mark.parametrize("override, message", [
    ("data.train_fraction=0", "train_fraction=0.0 must be in"),
    ("init.source=nowhere.safetensors", "does not exist"),
    ("init.source=weights.pt", "init source 'weights.pt' does not exist; give a checkpoint"),
    ("teacher=nowhere.ckpt", "teacher 'nowhere.ckpt' does not exist"),
    ("sample.uncond_from=nowhere.ckpt", "nowhere.ckpt"),
    ("data.name=imagefolder", "needs data.path"),
])
def test_a_failed_start_leaves_no_run_folder(override, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(LgframeError, match=message):
        fit(load_recipe("dit_digits_pretrain", [f"out_dir={tmp_path / 'runs'}", "model.name=DiT-Pico/2", override]))
    assert not (tmp_path / "runs").exists()


def test_a_one_class_folder_is_refused_for_classification(tmp_path):
    from PIL import Image

    (tmp_path / "imgs/cat").mkdir(parents=True)
    for i in range(3):
        Image.new("L", (8, 8), color=i * 40).save(tmp_path / f"imgs/cat/{i}.png")
    cfg = load_recipe("vit_digits_pretrain", [f"out_dir={tmp_path / 'runs'}", "data.name=imagefolder",
                                              f"data.path={tmp_path / 'imgs'}", "data.channels=1", "data.image_size=8"])
    with pytest.raises(LgframeError, match="at least 2 classes.*'cat'"):
        fit(cfg)
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------- init sources and resumes that do not fit
def test_init_source_of_another_constraint_is_refused(run, tmp_path):
    cfg = load_recipe("dit_digits_pretrain", [f"out_dir={tmp_path}", f"init.source={run.checkpoint}",
                                              "constraint=kronecker", "model.name=DiT-Pico/2"])
    with pytest.raises(LgframeError, match="carries constraint 'svd', but the recipe's constraint is 'kronecker'"):
        fit(cfg)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("override, what", [("model.name=DiT-Nano/2", "depth 4 -> 6"),
                                            ("constraint=kronecker", "constraint svd -> kronecker")])
def test_resume_with_another_model_or_constraint_changes_nothing(override, what, run, capsys):
    before = snapshot(run.run_dir)
    out, name = run.run_dir.parent, run.run_dir.name
    cli_refuses(["pretrain", "dit_digits_pretrain", f"out_dir={out}", f"name={name}", "model.name=DiT-Pico/2",
                 "model.freq_shift=1", "trainer.max_steps=4", "resume=auto", override], capsys, what, "config.yaml")
    assert snapshot(run.run_dir) == before


def test_resume_of_a_folder_needs_fsdp(tmp_path):
    (tmp_path / "r/checkpoints/last.ckpt").mkdir(parents=True)
    with pytest.raises(LgframeError, match="distributed \\(fsdp\\) checkpoint folder; resume it with trainer.strategy=fsdp"):
        fit(load_recipe("dit_digits_pretrain", [f"out_dir={tmp_path}", "name=r", "resume=auto"]))


def test_partial_files_of_a_killed_run_are_removed_at_the_next_start(run, tmp_path):
    import shutil

    d = tmp_path / "copy"
    shutil.copytree(run.run_dir, d)
    (d / "checkpoints/.last.ckpt.x1.tmp").write_bytes(b"half")
    (d / ".config.yaml.x2.tmp").write_bytes(b"half")
    fit(load_recipe("dit_digits_pretrain", [f"out_dir={tmp_path}", "name=copy", "model.name=DiT-Pico/2", "model.freq_shift=1",
                                            "trainer.max_steps=3", "trainer.val_every=1", "trainer.progress=false",
                                            "sample.n=0", "resume=auto"]))
    assert not list(d.rglob("*.tmp"))


# ----------------------------------------------------------------- non-finite training
NAN = ["model.name=DiT-Pico/2", "optim.name=sgd", "optim.lr=1e8", "optim.grad_clip=0", "trainer.max_steps=30",
       "trainer.progress=false", "sample.n=0"]


def test_nan_says_that_nothing_was_kept(tmp_path):
    with pytest.raises(LgframeError, match="no checkpoint was saved before it .*so nothing was kept"):
        fit(load_recipe("dit_digits_pretrain", [f"out_dir={tmp_path}", "name=n", "trainer.val_every=2", *NAN]))
    assert not (tmp_path / "n/checkpoints/last.ckpt").exists()


def test_nan_never_leaves_a_non_finite_checkpoint(tmp_path):
    with pytest.raises(LgframeError) as e:
        fit(load_recipe("dit_digits_pretrain", [f"out_dir={tmp_path}", "name=n", "trainer.val_every=1",
                                                "trainer.checkpoint_every=1", "trainer.nan_skip=3", *NAN]))
    last = tmp_path / "n/checkpoints/last.ckpt"
    if last.exists():
        ck = torch.load(last, weights_only=True)
        assert all(torch.isfinite(v).all() for v in ck["state_dict"].values() if v.is_floating_point())
        assert f"from step {ck['global_step']}, is kept" in str(e.value)
    else:
        assert "nothing was kept" in str(e.value)


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys):
    import lgframe.formats.checkpoints

    real, calls = torch.save, []

    def full(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0")
        return real(obj, f, *args, **kwargs)

    monkeypatch.setattr(lgframe.formats.checkpoints.torch, "save", full)
    cli_refuses(["pretrain", "dit_digits_pretrain", f"out_dir={tmp_path}", "name=d", "model.name=DiT-Pico/2",
                 "trainer.max_steps=4", "trainer.val_every=2", "trainer.checkpoint_every=2", "trainer.progress=false",
                 "sample.n=0"], capsys, "disk full", "last.ckpt")
    monkeypatch.setattr(lgframe.formats.checkpoints.torch, "save", real)
    assert torch.load(tmp_path / "d/checkpoints/last.ckpt", weights_only=True)["global_step"] == 2


# ----------------------------------------------------------------- manifests checked whole
@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("roles"), "key 'roles' is missing"),
    (lambda m: m.pop("tensors"), "key 'tensors' is missing"),
    (lambda m: m["constraint"].pop("name"), "key 'constraint.name' is missing"),
    (lambda m: m["model"].pop("ancestor_config"), "key 'model.ancestor_config' is missing"),
    (lambda m: m.update(bytes=[1, 2]), "key 'bytes' must be a dict"),
    (lambda m: m["roles"].update({"mlp.fc1.weight": [4, 256]}), "roles.mlp.fc1.weight"),
    (lambda m: m["roles"].update({"mlp.fc1.weight": [3, 256, 64]}), "has 3 layers, but the ancestor config has depth 4"),
    (lambda m: m["roles"].pop("mlp.fc1.weight"), "belongs to role 'mlp.fc1.weight', which is not in roles"),
    (lambda m: m["bytes"].update(learngene=1), "the learngene group holds 1 bytes"),
    (lambda m: m["tensors"]["learngene/attn.qkv.weight/U"].update(shape=[1, 2]), "the manifest says float32 [1, 2]"),
    (lambda m: m["tensors"]["learngene/attn.qkv.weight/U"].update(dtype="float16"), "the manifest says float16"),
    (lambda m: m["tensors"]["learngene/attn.qkv.weight/U"].pop("sha256"), "must hold shape"),
])
def test_manifest_fields_are_checked(edit, message, files, tmp_path):
    st, js = copy_learngene(files, tmp_path)
    edit_manifest(js, edit)
    with pytest.raises(LgframeError, match=message.replace("[", "\\[").replace("]", "\\]")) as e:
        Learngene.load(st)
    assert "format version 1" in str(e.value) or "manifest" in str(e.value)


def test_an_edited_constraint_name_says_the_manifest_was_edited(files, tmp_path):
    st, js = copy_learngene(files, tmp_path)
    edit_manifest(js, lambda m: m["constraint"].update(name="kronecker"))
    with pytest.raises(LgframeError, match="manifest names constraint 'kronecker'.*edited"):
        descend_file(st, "DiT-Pico/2", tmp_path / "d.safetensors")
    assert not (tmp_path / "d.safetensors").exists()


def test_a_model_file_with_a_damaged_record(files, tmp_path):
    from safetensors import safe_open

    with safe_open(str(files / "model.safetensors"), "pt") as f:
        meta = json.loads(f.metadata()["lgframe"])
    t = load_file(files / "model.safetensors")
    for damage, message in ((lambda m: m.pop("model"), "no model config"),
                            (lambda m: m.update(constraint="svd"), "'constraint' must be null or"),
                            (lambda m: m.update(frozen="all"), "'frozen' must be a list")):
        m = json.loads(json.dumps(meta))
        damage(m)
        save_file(t, tmp_path / "m.safetensors", metadata={"lgframe": json.dumps(m)})
        with pytest.raises(LgframeError, match=message):
            read_model(tmp_path / "m.safetensors")
    save_file(t, tmp_path / "m.safetensors", metadata={"lgframe": "{not json"})
    with pytest.raises(LgframeError, match="not valid JSON"):
        read_model(tmp_path / "m.safetensors")


# ----------------------------------------------------------------- latents folders
def _latents(tmp_path, info_edit=None, shape=(4, 2, 4, 4)):
    d = tmp_path / "lat"
    d.mkdir()
    save_file({"latents": torch.zeros(shape), "labels": torch.zeros(shape[0], dtype=torch.int64)},
              d / "latents-00000.safetensors")
    info = {"format": "lgframe-latents", "version": 1, "count": 4, "latent_channels": 2, "latent_size": 4,
            "scaling_factor": 0.18, "class_names": ["a", "b"], "shards": ["latents-00000.safetensors"]}
    if info_edit:
        info_edit(info)
    (d / "latents.json").write_text(json.dumps(info))
    return d


@pytest.mark.parametrize("edit, shape, message", [
    (lambda i: i.pop("latent_channels"), (4, 2, 4, 4), "key 'latent_channels' is missing"),
    (lambda i: i.pop("shards"), (4, 2, 4, 4), "key 'shards' is missing"),
    (lambda i: i.update(class_names=[]), (4, 2, 4, 4), "'class_names' is \\[\\]"),
    (lambda i: i.update(shards=["../x.safetensors"]), (4, 2, 4, 4), "inside the folder"),
    (None, (4, 3, 4, 4), "describes \\(N, 2, 4, 4\\) latents"),
])
def test_latents_folders_are_checked(edit, shape, message, tmp_path):
    from lgframe.formats.latents import load_latents

    d = _latents(tmp_path, edit, shape)
    with pytest.raises(LgframeError, match=message):
        load_latents(d)
