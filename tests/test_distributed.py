"""DDP and FSDP2 on CPU (gloo), two processes started as subprocesses of the CLI.

Equivalence: 2 processes at per-process batch B/2 against 1 process at batch
B, the same seed, init and global batches (data.shuffle=false), with SGD: its
update is linear in the gradient, so the runs agree to float noise. (AdamW's
first steps are ~lr * sign(g) and turn gradient elements at the noise floor
into +-lr steps: the resume test, which uses it, compares losses to 1e-3.)
"""

import math
import os
import subprocess
import sys

import pytest
import torch

from lgframe.formats.learngene import Learngene
from lgframe.training.recipes import load_recipe
from lgframe.training.stages import extract_learngene_file, fit, read_curve

# 4 steps of 64 items = one epoch (train_fraction 0.178 of the 1437-item split), so a
# resume at step 4 starts a fresh epoch at any world size.
COMMON = ["trainer.val_every=4", "ema.enabled=false", "data.shuffle=false", "data.augment=false", "model.name=ViT-Pico/2",
          "trainer.accelerator=cpu", "trainer.progress=false", "data.train_fraction=0.178"]
TWO = ["data.batch_size=32", "trainer.devices=2"]
SGD = ["optim.name=sgd", "optim.lr=0.05", "optim.warmup_steps=0"]


def cli(*args, cwd):
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LGFRAME_RUN_DIR", None)
    r = subprocess.run([sys.executable, "-m", "lgframe.cli", *args], capture_output=True, text=True, cwd=cwd, env=env,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def one_process(out, name, constraint, steps, *extra):
    torch.set_num_threads(1)
    try:
        cfg = load_recipe("vit_digits_pretrain", [f"out_dir={out}", f"name={name}", f"constraint={constraint}",
                                                  f"trainer.max_steps={steps}", "data.batch_size=64", *COMMON, *extra])
        return fit(cfg)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)


def rel_diff(a: dict, b: dict) -> float:
    num = sum(((a[k] - b[k]) ** 2).sum() for k in a) ** 0.5
    return (num / sum((a[k] ** 2).sum() for k in a) ** 0.5).item()


def weights(path):
    return torch.load(path, weights_only=True)["state_dict"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    return out, {c: one_process(out, f"one_{c}", c, 4, *SGD) for c in DDP_CONSTRAINTS}


DDP_CONSTRAINTS = ("svd", "scratch", "kronecker", "tucker")


# svd and tucker cover the shared bank (one tensor per role, and tucker's batched cores) in the
# default run; the dense and kronecker cases run with -m slow (about 20 s each).
@pytest.mark.parametrize("constraint", [pytest.param(c, marks=pytest.mark.slow) if c in ("scratch", "kronecker") else c
                                        for c in DDP_CONSTRAINTS])
def test_ddp_two_processes_match_one(reference, constraint):
    out, ref = reference
    cli("pretrain", "vit_digits_pretrain", f"out_dir={out}", f"name=ddp_{constraint}", f"constraint={constraint}",
        "trainer.max_steps=4", "trainer.strategy=ddp", *TWO, *COMMON, *SGD, cwd=out)
    curve = read_curve(out / f"ddp_{constraint}", "val/loss")
    ref_curve = ref[constraint].curve
    assert [s for s, _ in curve] == [s for s, _ in ref_curve] == [0, 4]
    # validation: the DistributedSampler pads 359 items to 360 (one counted twice),
    # which moves the mean by up to ~4e-4 when the init's losses vary per item;
    # the weights after 4 steps (below) are the exact check of one init.
    assert abs(curve[0][1] - ref_curve[0][1]) < 1e-3
    assert abs(ref_curve[-1][1] - ref_curve[0][1]) > 1e-2  # it trained
    assert abs(curve[-1][1] - ref_curve[-1][1]) < 1e-3
    assert rel_diff(weights(out / f"ddp_{constraint}/checkpoints/last.ckpt"), weights(ref[constraint].checkpoint)) < 1e-5
    if constraint == "svd":  # the shared bank is one tensor per role, reduced once
        sd = weights(out / "ddp_svd/checkpoints/last.ckpt")
        assert sum(k.startswith("model.lg_bank.") for k in sd) == 8


def test_fsdp_two_processes_train_save_and_extract(reference):
    out, ref = reference
    cli("pretrain", "vit_digits_pretrain", f"out_dir={out}", "name=fsdp", "constraint=svd", "trainer.max_steps=4",
        "trainer.strategy=fsdp", *TWO, *COMMON, *SGD, cwd=out)
    run = out / "fsdp"
    ckpt = run / "checkpoints/last.ckpt"
    assert ckpt.is_dir() and (ckpt / ".metadata").is_file()  # a distributed checkpoint
    curve = read_curve(run, "val/loss")
    assert abs(curve[-1][1] - ref["svd"].curve[-1][1]) < 1e-3
    # learngene gathered at the end of the sharded run == extracted from the sharded checkpoint
    st, _ = extract_learngene_file(ckpt, out / "from_dcp.safetensors")
    a, b = Learngene.load(run / "learngene.safetensors"), Learngene.load(st)
    assert a.tensors.keys() == b.tensors.keys()
    assert all(torch.equal(a.tensors[k], b.tensors[k]) for k in a.tensors)
    # ... and matches the unsharded run's learngene
    ref_lg = Learngene.load(ref["svd"].learngene)
    assert rel_diff(a.group("learngene"), ref_lg.group("learngene")) < 1e-5
    # the allow-list reader opens the real sharded checkpoint, and it holds what the consolidated file holds
    from safetensors.torch import load_file

    from lgframe.formats.checkpoints import load_distributed_checkpoint

    shards = load_distributed_checkpoint(ckpt)["state_dict"]
    consolidated = load_file(run / "model.safetensors")
    assert {k[len("model."):] for k in shards if k.startswith("model.")} == set(consolidated)
    assert all(torch.equal(shards["model." + k], v) for k, v in consolidated.items())


def test_fsdp_ema_matches_one_process(tmp_path):
    """ShardedEMA: each rank averages its shard; the gathered average equals WarmupEMA's on one process."""
    ema = ["ema.enabled=true", "ema.decay=0.9", "trainer.max_steps=4"]
    common = [c for c in COMMON if c != "ema.enabled=false"]
    ref = one_process(tmp_path, "one_ema", "svd", 4, *SGD, *ema[:2])
    cli("pretrain", "vit_digits_pretrain", f"out_dir={tmp_path}", "name=fsdp_ema", "constraint=svd",
        "trainer.strategy=fsdp", *TWO, *common, *SGD, *ema, cwd=tmp_path)
    from safetensors.torch import load_file

    from lgframe.formats.checkpoints import load_distributed_checkpoint

    one = torch.load(ref.checkpoint, weights_only=True)
    one_avg = {k[len("model."):]: v for k, v in one["state_dict"].items() if k.startswith("model.")}
    one_cur = {k[len("model."):]: v for k, v in one["current_model_state"].items() if k.startswith("model.")}
    exported = load_file(tmp_path / "fsdp_ema" / "model.safetensors")
    assert exported.keys() == one_avg.keys()
    assert rel_diff(exported, one_avg) < 1e-5  # the exported weights are the average, as on one process
    assert rel_diff(one_avg, one_cur) > 1e-3  # ... which differs from the training weights
    shards = load_distributed_checkpoint(tmp_path / "fsdp_ema/checkpoints/last.ckpt")
    cur = {k[len("model."):]: v for k, v in shards["current_model_state"].items() if k.startswith("model.")}
    assert rel_diff(cur, one_cur) < 1e-5  # the checkpoint keeps both, in Lightning's layout
    assert all(torch.equal(shards["state_dict"]["model." + k], v) for k, v in exported.items())


@pytest.mark.slow  # 40 s: two 2-process runs
def test_fsdp_ema_resumes_both_the_average_and_the_training_weights(tmp_path):
    ema = ["ema.enabled=true", "ema.decay=0.9"]
    common = [c for c in COMMON if c != "ema.enabled=false"]
    ref = one_process(tmp_path, "one_ema8", "svd", 8, *SGD, *ema)
    for steps, more in ((4, []), (8, ["resume=auto"])):
        cli("pretrain", "vit_digits_pretrain", f"out_dir={tmp_path}", "name=fsdp_ema", "constraint=svd",
            "trainer.strategy=fsdp", f"trainer.max_steps={steps}", *TWO, *common, *SGD, *ema, *more, cwd=tmp_path)
    from safetensors.torch import load_file

    one = torch.load(ref.checkpoint, weights_only=True)
    one_avg = {k[len("model."):]: v for k, v in one["state_dict"].items() if k.startswith("model.")}
    assert rel_diff(load_file(tmp_path / "fsdp_ema" / "model.safetensors"), one_avg) < 1e-5
    curve = read_curve(tmp_path / "fsdp_ema", "val/loss")
    assert [s for s, _ in curve][-2:] == [4, 8] and abs(curve[-1][1] - ref.curve[-1][1]) < 1e-3


@pytest.mark.slow  # 50 s: four multi-process runs
def test_resume_across_world_sizes(reference):
    out, _ = reference
    straight = one_process(out, "straight", "svd", 8)
    # 2 -> 1: DDP for 4 steps, then resume=auto on one process to step 8
    cli("pretrain", "vit_digits_pretrain", f"out_dir={out}", "name=two_one", "constraint=svd", "trainer.max_steps=4",
        "trainer.strategy=ddp", *TWO, *COMMON, cwd=out)
    resumed = one_process(out, "two_one", "svd", 8, "resume=auto")
    assert [s for s, _ in resumed.curve] == [0, 4, 8]
    assert abs(resumed.final_loss - straight.final_loss) < 1e-3
    # 1 -> 2: one process for 4 steps, then DDP on two processes to step 8
    one_process(out, "one_two", "svd", 4)
    cli("pretrain", "vit_digits_pretrain", f"out_dir={out}", "name=one_two", "constraint=svd", "trainer.max_steps=8",
        "trainer.strategy=ddp", "resume=auto", *TWO, *COMMON, cwd=out)
    curve = read_curve(out / "one_two", "val/loss")
    assert [s for s, _ in curve] == [0, 4, 8]
    assert abs(curve[-1][1] - straight.final_loss) < 1e-3


def test_resume_without_a_checkpoint_says_what_to_do(tmp_path):
    from lgframe.errors import LgframeError

    cfg = load_recipe("vit_digits_pretrain", [f"out_dir={tmp_path}", "name=none", "resume=auto"])
    with pytest.raises(LgframeError, match="resume=auto: no checkpoint at .*leave resume unset"):
        fit(cfg)


def test_dit_xl_fsdp_recipe_builds_on_the_meta_device():
    from lgframe.models.registry import model_from_config
    from lgframe.training.stages import make_strategy, recipe_model_config

    cfg = load_recipe("dit_xl_pretrain_fsdp")
    assert cfg.trainer.strategy == "fsdp" and cfg.trainer.precision == "bf16-mixed"
    mc = recipe_model_config(cfg, check_data=False)
    assert (mc["depth"], mc["width"], mc["heads"], mc["image_size"], mc["in_channels"]) == (28, 1152, 16, 32, 4)
    from lgframe.core.registry import get_constraint

    with torch.device("meta"):
        model = model_from_config(mc)
        dense = sum(p.numel() for p in model.parameters())
        get_constraint("svd").attach(model)
    n = sum(p.numel() for p in model.parameters())
    assert all(p.is_meta for p in model.parameters())
    assert 670e6 < dense < 680e6  # DiT-XL/2: 675M parameters
    assert n < 0.4 * dense  # svd: U, V shared by the 28 blocks, sigma per block
    from lightning.pytorch.strategies import ModelParallelStrategy

    assert isinstance(make_strategy(cfg.trainer), ModelParallelStrategy)


@pytest.mark.filterwarnings("ignore:image folder")
def test_the_flagship_fsdp_recipe_runs_on_latents(tmp_path):
    """recipes/dit_xl_pretrain_fsdp.yaml end to end on CPU: latents from a tiny local VAE,
    the model overridden to a tiny size, FSDP over 2 gloo processes, fp32 (bf16 is for GPUs)."""
    from test_imagefolder import make_folder, tiny_vae

    from lgframe.cli import main

    vae = tiny_vae(tmp_path / "vae")
    lat = tmp_path / "lat"
    assert main(["encode", "--vae", str(vae), "--images", str(make_folder(tmp_path / "imgs")), "--out", str(lat),
                 "--image-size", "16"]) == 0
    cli("pretrain", "dit_xl_pretrain_fsdp", f"out_dir={tmp_path}", "name=xl", f"data.path={lat}", "model.name=DiT-Pico/2",
        "model.image_size=8", "model.num_classes=3", "data.batch_size=4", "data.num_workers=0", "trainer.devices=2",
        "trainer.accelerator=cpu", "trainer.precision=32-true", "trainer.max_steps=4", "trainer.val_every=4",
        "trainer.checkpoint_every=0", "optim.warmup_steps=0", "trainer.progress=false", "sample.n=3", "sample.steps=2",
        cwd=tmp_path)
    run = tmp_path / "xl"
    assert (run / "checkpoints/last.ckpt/.metadata").is_file()  # a distributed checkpoint
    curve = read_curve(run, "val/loss")
    assert [s for s, _ in curve] == [0, 4] and all(math.isfinite(v) for _, v in curve)
    lg = Learngene.load(run / "learngene.safetensors")
    assert lg.constraint == "svd" and lg.ancestor_config["in_channels"] == 4 and lg.ancestor_config["image_size"] == 8


def test_ddp_runs_a_class_gated_dit(tmp_path):
    """kind on a DiT under DDP: the class labels reach the gate on every rank through the
    model's forward (no unused-parameter error although each batch misses some classes'
    tailors), and the run writes a learngene with every class's tailors."""
    cli("pretrain", "dit_digits_pretrain_kind", f"out_dir={tmp_path}", "name=kind", "model.name=DiT-Pico/2",
        "trainer.max_steps=4", "trainer.val_every=4", "trainer.strategy=ddp", "trainer.devices=2", "data.batch_size=16",
        "trainer.accelerator=cpu", "trainer.progress=false", "ema.enabled=false", "sample.n=10", "sample.steps=2", cwd=tmp_path)
    lg = Learngene.load(tmp_path / "kind/learngene.safetensors", constraint="kind")
    assert lg.options["classes"] == list(range(10))
    assert all(torch.isfinite(v).all() for v in lg.tensors.values())
    assert lg.tensors["learngene/mlp.fc1.weight/UT"].shape[1] == 20


DIE_ON_SECOND_SAVE = """
import os, signal, sys
import torch.distributed.checkpoint.filesystem as fs
from lgframe.cli import main

real, calls = fs.FileSystemWriter.finish, []


def finish(self, *args, **kwargs):  # the shards are on disk, the metadata is not: die here on the 2nd save
    calls.append(1)
    if len(calls) == 2:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(self, *args, **kwargs)


fs.FileSystemWriter.finish = finish
sys.exit(main(sys.argv[1:]))
"""


def test_sharded_checkpoint_killed_mid_write_keeps_the_previous_one(tmp_path):
    """fsdp checkpoints are written beside the target and renamed in: a kill while the
    shards of the second checkpoint are written leaves the first one whole, and
    resume=auto cleans up and continues."""
    launcher = tmp_path / "die.py"
    launcher.write_text(DIE_ON_SECOND_SAVE)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("LGFRAME_RUN_DIR", None)
    common = ["pretrain", "vit_digits_pretrain", f"out_dir={tmp_path}", "name=k", "constraint=svd", "trainer.strategy=fsdp",
              "trainer.accelerator=cpu", "trainer.val_every=2", "trainer.checkpoint_every=2", "trainer.progress=false",
              "ema.enabled=false", "model.name=ViT-Pico/2", "data.train_fraction=0.178", "data.batch_size=64"]
    r = subprocess.run([sys.executable, str(launcher), *common, "trainer.max_steps=8"], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == -9, r.stderr[-2000:]
    ckpt = tmp_path / "k/checkpoints/last.ckpt"
    assert (tmp_path / "k/checkpoints/.last.ckpt.partial").is_dir()  # the unfinished second checkpoint
    assert torch.load(ckpt / "meta.pt", weights_only=True)["global_step"] == 2
    st, _ = extract_learngene_file(ckpt, tmp_path / "lg.safetensors")  # the first checkpoint loads whole
    assert Learngene.load(st).constraint == "svd"
    cli(*common, "trainer.max_steps=6", "resume=auto", cwd=tmp_path)
    assert not (tmp_path / "k/checkpoints/.last.ckpt.partial").exists()
    assert torch.load(ckpt / "meta.pt", weights_only=True)["global_step"] == 6
    assert [s for s, _ in read_curve(tmp_path / "k", "val/loss")] == [0, 2, 4, 6]


def test_recover_checkpoints_finishes_or_discards_what_a_kill_left(tmp_path):
    from lgframe.training.distributed import COMPLETE, recover_checkpoints

    d = tmp_path / "checkpoints"
    (d / ".last.ckpt.partial").mkdir(parents=True)  # killed between the two renames: complete, target gone
    (d / ".last.ckpt.partial" / COMPLETE).write_text("")
    (d / ".last.ckpt.old").mkdir()
    (d / ".other.ckpt.partial").mkdir()  # killed while writing shards: incomplete
    (d / "other.ckpt").mkdir()
    (d / ".x.ckpt.abc.tmp").write_bytes(b"partial")  # a plain checkpoint killed mid-write
    done = recover_checkpoints(d)
    assert sorted(p.name for p in d.iterdir()) == ["last.ckpt", "other.ckpt"]
    assert (d / "last.ckpt" / COMPLETE).is_file() and len(done) == 4
