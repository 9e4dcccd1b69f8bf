"""`teacher:` (WAVE-style distillation), a recipe feature for any constraint."""

import pytest
import torch

from lgframe.errors import LgframeError
from lgframe.formats.checkpoints import load_checkpoint
from lgframe.models.files import save_model
from lgframe.models.registry import create_model
from lgframe.training.recipes import load_recipe
from lgframe.training.stages import fit, read_curve

QUIET = ["trainer.progress=false", "trainer.log_every=1", "ema.enabled=false", "sample.n=0"]  # no end-of-run sample grid (about 9 s per fit)


@pytest.fixture(scope="module")
def dit_teacher(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    res = fit(load_recipe("dit_digits_pretrain", [f"out_dir={out}", "name=t", "model.name=DiT-Pico/2", "constraint=scratch",
                                                  "trainer.max_steps=150", "trainer.val_every=150", *QUIET]))
    return res.checkpoint, out


def test_wave_student_learns_to_match_the_teacher(dit_teacher):
    ckpt, out = dit_teacher
    res = fit(load_recipe("dit_digits_wave", [f"out_dir={out}", "name=wave", f"teacher={ckpt}", "model.name=DiT-Pico/2",
                                              "trainer.max_steps=60", "trainer.val_every=60", *QUIET]))
    gap = [v for _, v in read_curve(res.run_dir, "train/distill")]
    print(f"distillation gap to the teacher: first 10 steps {sum(gap[:10]) / 10:.4f}, last 10 {sum(gap[-10:]) / 10:.4f}")
    assert len(gap) == 60 and sum(gap[-10:]) < 0.5 * sum(gap[:10])
    state = load_checkpoint(res.checkpoint)["state_dict"]
    assert not any(k.startswith("teacher") for k in state)  # the teacher is not saved with the student


def test_distillation_pulls_the_student_toward_the_teacher(tmp_path):
    """A teacher whose predictions are far from the noise (random, non-zero
    output layers): with task_weight 0 the student learns *its* function, the
    same steps without a teacher do not."""
    from helpers import activate

    from lgframe.models.files import read_model

    torch.manual_seed(0)
    path = tmp_path / "odd_teacher.safetensors"
    save_model(activate(create_model("DiT-Pico/2"), std=0.1), path)
    common = [f"out_dir={tmp_path}", "model.name=DiT-Pico/2", "trainer.max_steps=40", "trainer.val_every=40", "seed=1", *QUIET]
    with_t = fit(load_recipe("dit_digits_wave", common + ["name=with", f"teacher={path}", "distill.task_weight=0"]))
    without = fit(load_recipe("dit_digits_wave", common + ["name=without"]))
    teacher = read_model(path)[0].eval()
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 1000, (64,), generator=g), torch.randint(0, 10, (64,), generator=g)
    ref = teacher(x, t, y)

    def gap(res):
        return (res.task.model.eval()(x, t, y) - ref).pow(2).mean().item()

    print(f"output gap to the teacher: distilled {gap(with_t):.4f}, same steps without a teacher {gap(without):.4f}")
    assert gap(with_t) < 0.5 * gap(without), (gap(with_t), gap(without))


def test_vit_soft_labels(tmp_path):
    teacher = tmp_path / "vit.safetensors"
    torch.manual_seed(0)
    save_model(create_model("ViT-Pico/2"), teacher)
    res = fit(load_recipe("vit_digits_descend", [f"out_dir={tmp_path}", f"teacher={teacher}", "constraint=svd",
                                                 "trainer.max_steps=6", "trainer.val_every=6", *QUIET]))
    kl = [v for _, v in read_curve(res.run_dir, "train/distill")]
    assert len(kl) == 6 and all(v >= 0 for v in kl)


def test_bad_teachers_fail_before_training(tmp_path, dit_teacher):
    with pytest.raises(LgframeError, match="teacher '.*nope.ckpt' does not exist"):
        load_recipe("dit_digits_wave", [f"teacher={tmp_path / 'nope.ckpt'}"])
    vit = tmp_path / "vit.safetensors"
    save_model(create_model("ViT-Pico/2"), vit)
    with pytest.raises(LgframeError, match="teacher must take the same inputs"):
        fit(load_recipe("dit_digits_wave", [f"out_dir={tmp_path}", f"teacher={vit}", "model.name=DiT-Pico/2",
                                            "trainer.max_steps=2", *QUIET]))
