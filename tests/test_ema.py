"""The EMA of the weights warms up as diffusers' EMAModel does (lgframe/training/ema.py)."""

import pytest
import torch
from diffusers.training_utils import EMAModel
from torch.optim.swa_utils import AveragedModel

from lgframe.training.ema import WarmupEMA, _warmup_avg_fn, warmup_decay
from lgframe.training.recipes import load_recipe
from lgframe.training.stages import fit


def test_warmup_decay_values():
    assert [round(warmup_decay(0.999, n), 4) for n in (0, 1, 2, 80)] == [0.1, 0.1818, 0.25, 0.9]
    assert warmup_decay(0.99, 10_000) == 0.99


def test_the_average_matches_diffusers_ema_model():
    """The same weight trajectory through torch's AveragedModel with our avg_fn and through
    diffusers' EMAModel (its own warm-up, no update_after_step) gives the same average."""
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 2)
    ours = AveragedModel(net, avg_fn=_warmup_avg_fn(0.99), use_buffers=True)
    ours.update_parameters(net)  # the first call copies, as Lightning's first update does
    theirs = EMAModel(net.parameters(), decay=0.99)
    for _ in range(40):
        with torch.no_grad():
            for p in net.parameters():
                p.add_(torch.randn_like(p))
        ours.update_parameters(net)
        theirs.step(net.parameters())
    for a, b in zip(ours.module.parameters(), theirs.shadow_params):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("warmup", [True, False])
def test_a_short_run_keeps_little_of_its_start_with_warmup(tmp_path, warmup):
    """20 steps at decay 0.999: without the warm-up the average is 98% the random init
    (0.999^20), with it under 1%; the trained weights are measured against both."""
    cfg = load_recipe("vit_digits_pretrain", [f"out_dir={tmp_path}", "name=r", "model.name=ViT-Pico/2", "model.depth=1",
                                              "trainer.max_steps=20", "trainer.val_every=20", "trainer.progress=false",
                                              "ema.decay=0.999", f"ema.warmup={str(warmup).lower()}", "constraint=scratch",
                                              "optim.warmup_steps=0"])
    captured = {}

    class Spy(WarmupEMA):
        def setup(self, trainer, pl_module, stage):
            captured["init"] = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
            super().setup(trainer, pl_module, stage)

        def on_train_end(self, trainer, pl_module):
            captured["raw"] = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}
            super().on_train_end(trainer, pl_module)

    import lgframe.training.stages as stages

    orig = stages.WarmupEMA
    stages.WarmupEMA = Spy
    try:
        r = fit(cfg, extract_learngene=False)
    finally:
        stages.WarmupEMA = orig
    avg = r.task.model.state_dict()
    k = "blocks.0.mlp.fc1.weight" if "blocks.0.mlp.fc1.weight" in avg else next(n for n in avg if n.endswith("weight"))
    moved = (captured["raw"][k] - captured["init"][k]).norm()
    share_of_init = float((captured["raw"][k] - avg[k]).norm() / moved)  # 0: the average is the trained weights
    if warmup:
        assert share_of_init < 0.1, share_of_init
    else:
        assert share_of_init > 0.7, share_of_init  # the path is not straight: not exactly 0.98
