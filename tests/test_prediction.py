"""diffusion.prediction (epsilon | v_prediction | sample) and diffusion.clip_range,
through diffusers' samplers: an oracle model that knows the data is one constant
image must sample that constant, clamped only when clip_sample asks for it."""

from types import SimpleNamespace

import pytest
import torch

from lgframe.errors import LgframeError
from lgframe.training.recipes import load_recipe, to_plain
from lgframe.training.tasks import DiffusionTask

C = 3.0  # the data: every pixel is 3, outside the image range [-1, 1]


class Oracle(torch.nn.Module):
    """The exact prediction for data x0 = C under the task's noise schedule."""

    def __init__(self, kind: str, alphas: torch.Tensor):
        super().__init__()
        self.kind, self.alphas = kind, alphas
        self.config = SimpleNamespace(in_channels=1, image_size=4, num_classes=10, patch_size=1)
        self.w = torch.nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y):
        a = self.alphas[t].view(-1, 1, 1, 1)
        x0 = torch.full_like(x, C)
        eps = (x - a.sqrt() * x0) / (1 - a).sqrt()
        return {"epsilon": eps, "sample": x0, "v_prediction": a.sqrt() * eps - (1 - a).sqrt() * x0}[self.kind]


def task(kind: str, *over: str) -> DiffusionTask:
    r = to_plain(load_recipe("dit_digits_pretrain", ["constraint=scratch", f"diffusion.prediction={kind}", *over]))
    t = DiffusionTask(r, Oracle(kind, torch.zeros(1)))
    t.model.alphas = t.noise_scheduler.alphas_cumprod
    return t


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("scheduler", ["ddim", "ddpm", "dpm"])
def test_oracle_samples_the_constant_unless_clipped(kind, scheduler):
    labels = torch.arange(4)
    free = task(kind, "diffusion.clip_sample=false").sample(labels, guidance=2.0, steps=20, scheduler=scheduler, seed=0)
    assert (free - C).abs().max() < 1e-2, (free - C).abs().max()
    wide = task(kind, "diffusion.clip_range=4").sample(labels, guidance=1.0, steps=20, scheduler=scheduler, seed=0)
    assert (wide - C).abs().max() < 1e-2
    images = task(kind).sample(labels, guidance=1.0, steps=20, scheduler=scheduler, seed=0)  # the default: [-1, 1]
    assert images.max() <= 1.0 and (images - 1).abs().max() < 1e-2


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction", "sample"])
def test_training_target_is_what_the_oracle_predicts(kind):
    t = task(kind)
    x0 = torch.full((8, 1, 4, 4), C)
    g = torch.Generator().manual_seed(0)
    loss = t.diffusion_loss((x0, torch.zeros(8, dtype=torch.long)), generator=g)
    assert loss.item() < 1e-6


def test_bad_prediction_and_range_name_the_valid_values():
    with pytest.raises(LgframeError, match="valid: epsilon, v_prediction, sample"):
        load_recipe("dit_digits_pretrain", ["diffusion.prediction=x0"])
    with pytest.raises(LgframeError, match="clip_range=0.0; valid: a number > 0"):
        load_recipe("dit_digits_pretrain", ["diffusion.clip_range=0"])
