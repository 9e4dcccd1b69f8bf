"""No file runs code: every entry point that reads a user-supplied file, fed a
malicious pickle in every container lgframe could be handed, refuses it with one
paragraph and never executes the payload (a marker file it would create stays
absent).

Containers: a raw pickle (.ckpt), a torch zip checkpoint (.ckpt), a torch file
(.pt), a pickle named .safetensors, and distributed-checkpoint folders whose
`.metadata`, `meta.pt` or one byte item carries the payload.
"""

import io
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lgframe.cli import main
from lgframe.models.files import save_model
from lgframe.models.registry import create_model


class Payload:
    """Unpickling this creates `path` (and would run anything else a real attacker wrote)."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').close()",))


@pytest.fixture
def marker(tmp_path):
    return tmp_path / "PWNED"


def evil_file(kind: str, folder: Path, marker: Path) -> Path:
    """A file (or folder) of container `kind` whose loading would create `marker`."""
    p = Payload(marker)
    if kind == "pickle":
        path = folder / "evil.ckpt"
        path.write_bytes(pickle.dumps({"state_dict": p, "lgframe": {}}, protocol=2))
    elif kind == "zip_ckpt":
        path = folder / "evil.ckpt"
        torch.save({"state_dict": {"model.w": p}, "lgframe": {"model": {"family": "dit"}}}, path)
    elif kind == "pt":
        path = folder / "evil.pt"
        torch.save(p, path)
    elif kind == "fake_safetensors":
        path = folder / "evil.safetensors"
        path.write_bytes(pickle.dumps(p))
    elif kind == "dcp_metadata":
        path = folder / "evil_dcp"
        path.mkdir()
        (path / ".metadata").write_bytes(pickle.dumps(p))
        torch.save({"lgframe": {"model": {"family": "dit"}}}, path / "meta.pt")
    elif kind == "dcp_meta_pt":
        path = folder / "evil_dcp"
        import torch.distributed.checkpoint as dcp

        dcp.save({"state_dict": {"model.w": torch.zeros(2)}}, checkpoint_id=path, no_dist=True)
        torch.save({"lgframe": p}, path / "meta.pt")
    elif kind == "dcp_bytes":
        path = folder / "evil_dcp"
        import torch.distributed.checkpoint as dcp

        dcp.save({"state_dict": {"model.w": p}}, checkpoint_id=path, no_dist=True)
        torch.save({"lgframe": {"model": {"family": "dit"}}}, path / "meta.pt")
    else:
        raise ValueError(kind)
    assert not marker.exists()  # building the file ran nothing
    return path


FILE_KINDS = ("pickle", "zip_ckpt", "pt", "fake_safetensors")
DCP_KINDS = ("dcp_metadata", "dcp_meta_pt", "dcp_bytes")


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    d = tmp_path_factory.mktemp("good")
    torch.manual_seed(0)
    save_model(create_model("DiT-Pico/2"), d / "dit.safetensors")
    return d


def entry_points(x: Path, good: Path, out: Path) -> dict[str, list[str]]:
    run = [f"out_dir={out}", "trainer.max_steps=2", "trainer.progress=false", "model.name=DiT-Pico/2", "sample.n=0"]
    return {
        "sample": ["sample", str(x), "--out", str(out / "s.png")],
        "evaluate": ["evaluate", str(x), "--n", "0"],
        "learngene": ["learngene", str(x), "--out", str(out / "lg.safetensors")],
        "export": ["export", "diffusers", str(x), "--out", str(out / "exp")],
        "decompose": ["decompose", str(x), "--classes", "0", "--out", str(out / "d.safetensors")],
        "teacher": ["pretrain", "dit_digits_pretrain", *run, f"teacher={x}"],
        "uncond_from": ["sample", str(good / "dit.safetensors"), "--uncond-from", str(x), "--out", str(out / "u.png")],
        "personalize_base": ["personalize", "dit_personalize_shapes", f"out_dir={out}", f"personalize.base={x}"],
        "init_source": ["train", "dit_digits_descend", *run, f"init.source={x}"],
        "resume": ["pretrain", "dit_digits_pretrain", *run, f"resume={x}"]
        + (["trainer.strategy=fsdp", "trainer.accelerator=cpu"] if x.is_dir() else []),
    }


ENTRIES = ("sample", "evaluate", "learngene", "export", "decompose", "teacher", "uncond_from", "personalize_base",
           "init_source", "resume")


def refused(args, capsys, marker, mentions=None):
    rc = main(args)
    err = capsys.readouterr().err
    flat = " ".join(err.split())
    assert not marker.exists(), f"the payload ran: {args}"
    assert rc == 1, (rc, err)
    assert flat.startswith("error:") and "Traceback" not in err, err
    if mentions is not None:
        assert mentions in flat.replace("error: ", ""), flat
    return flat


@pytest.mark.parametrize("kind", FILE_KINDS)
@pytest.mark.parametrize("entry", ENTRIES)
def test_file_containers_never_run_code(kind, entry, tmp_path, good, marker, capsys):
    x = evil_file(kind, tmp_path, marker)
    out = tmp_path / "out"
    refused(entry_points(x, good, out)[entry], capsys, marker, mentions=x.name)
    assert not (out / "s.png").exists() and not (out / "lg.safetensors").exists()


@pytest.mark.parametrize("kind", DCP_KINDS)
@pytest.mark.parametrize("entry", [e for e in ENTRIES if e != "resume"])
def test_distributed_checkpoint_folders_never_run_code(kind, entry, tmp_path, good, marker, capsys):
    x = evil_file(kind, tmp_path, marker)
    refused(entry_points(x, good, tmp_path / "out")[entry], capsys, marker, mentions=x.name)


@pytest.mark.parametrize("kind", ("dcp_metadata", "dcp_meta_pt"))
def test_fsdp_resume_from_a_crafted_folder_never_runs_code(kind, tmp_path, good, marker, capsys):
    """Refused while the checkpoint is inspected, before any trainer or process group exists."""
    x = evil_file(kind, tmp_path, marker)
    refused(entry_points(x, good, tmp_path / "out")["resume"], capsys, marker, mentions=x.name)
    assert not (tmp_path / "out").exists()  # nothing written


@pytest.mark.parametrize("fmt, weights", [("diffusers", "diffusion_pytorch_model.bin"), ("timm", "pytorch_model.bin")])
def test_import_folders_with_a_pickled_weights_file(fmt, weights, tmp_path, marker, capsys):
    src = tmp_path / "src"
    if fmt == "diffusers":
        from diffusers import DiTTransformer2DModel

        DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, num_layers=1, sample_size=8,
                              patch_size=2, num_embeds_ada_norm=10).save_pretrained(src, safe_serialization=True)
        (src / "diffusion_pytorch_model.safetensors").unlink()
    else:
        pytest.importorskip("timm")
        import timm
        from timm.models import save_for_hf

        save_for_hf(timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, embed_dim=16,
                                      depth=1, num_heads=2, in_chans=1, num_classes=10), str(src), safe_serialization=True)
        (src / "model.safetensors").unlink()
    torch.save({"w": Payload(marker)}, src / weights)
    refused(["import", fmt, str(src), "--out", str(tmp_path / "m.safetensors")], capsys, marker)
    assert not (tmp_path / "m.safetensors").exists()


def test_descend_and_weightspace_read_safetensors_only(tmp_path, marker, capsys):
    x = evil_file("fake_safetensors", tmp_path, marker)
    refused(["descend", str(x), "--model", "DiT-Pico/2", "--out", str(tmp_path / "d.safetensors")], capsys, marker,
            mentions=x.name)
    (tmp_path / "evil.json").write_text('{"format": "lgframe.learngene"}')  # a manifest beside it changes nothing
    refused(["descend", str(x), "--model", "DiT-Pico/2", "--out", str(tmp_path / "d.safetensors")], capsys, marker)
    refused(["weightspace", "train", str(x), "--out", str(tmp_path / "g.safetensors")], capsys, marker, mentions=x.name)
    refused(["weightspace", "sample", str(x), "--out", str(tmp_path / "w.png")], capsys, marker, mentions=x.name)


def test_refusal_never_advises_weights_only_false(tmp_path, marker, capsys):
    x = evil_file("zip_ckpt", tmp_path, marker)
    flat = refused(["sample", str(x), "--out", str(tmp_path / "s.png")], capsys, marker)
    assert "weights_only=False" not in flat and "never runs code" in flat


def test_the_allow_list_reads_real_distributed_checkpoints(tmp_path):
    """The safe reader loads what torch.distributed.checkpoint writes (tensors of several
    dtypes, byte items, nested optimizer state) and gives the same tensors as torch's own."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from lgframe.formats.checkpoints import load_distributed_checkpoint

    state = {"state_dict": {"model.a": torch.randn(3, 4), "model.b": torch.arange(5), "model.c": torch.ones(2).bfloat16()},
             "optimizer_0": {"state": {"a": {"step": torch.tensor(3.0)}}, "param_groups": [{"lr": 0.1, "params": ["a"]}]}}
    dcp.save(state, checkpoint_id=tmp_path / "ok", no_dist=True)
    torch.save({"lgframe": {"model": {"family": "dit"}}, "global_step": 7}, tmp_path / "ok/meta.pt")
    ours = load_distributed_checkpoint(tmp_path / "ok")
    dcp_to_torch_save(tmp_path / "ok", tmp_path / "full.pt")  # torch's converter, on a folder we trust
    theirs = torch.load(tmp_path / "full.pt", weights_only=True)["state_dict"]
    assert ours["global_step"] == 7 and ours["state_dict"].keys() == theirs.keys()
    assert all(torch.equal(ours["state_dict"][k], theirs[k]) for k in theirs)


def _crafted_byte_item(folder: Path, marker: Path) -> None:
    """Point one byte item of a real checkpoint folder at a payload appended to its data file."""
    from lgframe.formats.checkpoints import read_dcp_metadata

    md = read_dcp_metadata(folder)
    buf = io.BytesIO()
    torch.save(Payload(marker), buf)
    payload = buf.getvalue()
    key = next(k for k in md.storage_data if "param_groups" in k.fqn)
    info = md.storage_data[key]
    data = folder / info.relative_path
    offset = data.stat().st_size
    with open(data, "ab") as f:
        f.write(payload)
    info.offset, info.length = offset, len(payload)
    (folder / ".metadata").write_bytes(pickle.dumps(md))


def test_fsdp_resume_with_a_crafted_byte_item_never_runs_code(tmp_path, marker):
    """A real fsdp checkpoint (1 process, gloo) whose optimizer byte item was replaced by
    a payload: the strategy's own loader (used by resume) reads byte items with
    weights_only=True, so the resume is refused and nothing runs."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LGFRAME_RUN_DIR", None)
    common = ["pretrain", "vit_digits_pretrain", f"out_dir={tmp_path}", "name=f", "model.name=ViT-Pico/2",
              "trainer.strategy=fsdp", "trainer.accelerator=cpu", "trainer.val_every=2", "trainer.progress=false",
              "ema.enabled=false", "data.train_fraction=0.1"]
    r = subprocess.run([sys.executable, "-m", "lgframe.cli", *common, "trainer.max_steps=2"], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ckpt = tmp_path / "f/checkpoints/last.ckpt"
    _crafted_byte_item(ckpt, marker)
    r = subprocess.run([sys.executable, "-m", "lgframe.cli", *common, "trainer.max_steps=4", "resume=auto"],
                       capture_output=True, text=True, env=env, timeout=300)
    assert not marker.exists()
    assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert "weights_only" in r.stderr or "could not be restored" in " ".join(r.stderr.split()), r.stderr[-2000:]
