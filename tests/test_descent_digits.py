"""Descendants of factorized learngenes (kronecker, tucker) against scratch on
digits, for a DiT and a ViT of sizes the ancestor never had (first-epoch
training loss, 11 steps, same data and seed; the svd case is in test_training,
the training-free ones in test_transforms)."""

import numpy as np
import pytest

from lgframe.training.recipes import load_recipe
from lgframe.training.stages import fit, read_curve

QUIET = ["trainer.progress=false", "trainer.log_every=1", "ema.enabled=false", "sample.n=0"]  # no end-of-run sample grid (about 9 s per fit)
SIZES = {"smaller": ["model.depth=3"], "larger": ["model.depth=6", "model.width=96", "model.heads=3"]}
FAMILY = {"dit": ("dit_digits_pretrain", "dit_digits_descend", "DiT-Pico/2", 200),
          "vit": ("vit_digits_pretrain", "vit_digits_descend", "ViT-Pico/2", 200)}
MEASURED = {}


def first_epoch(res) -> float:
    return float(np.mean([v for _, v in read_curve(res.run_dir, "train/loss")][: 1437 // 128]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cache = {}

    def get(family, method, size):
        key = (family, method, size)
        if key not in cache:
            pre, desc, model, steps = FAMILY[family]
            out = tmp_path_factory.getbasetemp() / f"digits_{family}"
            common = [f"out_dir={out}", f"model.name={model}", *SIZES[size], "trainer.max_steps=11",
                      "trainer.val_every=11", "seed=3", *QUIET]
            if method == "scratch":
                cache[key] = first_epoch(fit(load_recipe(desc, common + [f"name={size}_scratch", "constraint=scratch"])))
            else:
                if (family, method) not in cache:
                    cache[family, method] = fit(load_recipe(pre, [f"out_dir={out}", f"name=anc_{method}", f"model.name={model}",
                                                                  f"constraint={method}", f"trainer.max_steps={steps}",
                                                                  f"trainer.val_every={steps}", *QUIET])).learngene
                lg = cache[family, method]
                cache[key] = first_epoch(fit(load_recipe(desc, common + [f"name={size}_{method}", f"constraint={method}",
                                                                         f"init.source={lg}"])))
            MEASURED[key] = cache[key]
        return cache[key]

    return get


@pytest.mark.parametrize("size", SIZES)
@pytest.mark.parametrize("family", FAMILY)
@pytest.mark.parametrize("method", ["kronecker", "tucker"])
def test_descendant_beats_scratch(runs, method, family, size):
    child, scratch = runs(family, method, size), runs(family, "scratch", size)
    print(f"{method} {family} {size}: descendant {child:.4f} scratch {scratch:.4f}")
    assert child < scratch - 0.05, (child, scratch)
