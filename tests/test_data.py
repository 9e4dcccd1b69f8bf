"""data: digits and shapes arrays, the split, limited data, augmentation, errors."""

from dataclasses import dataclass

import pytest
import torch
from omegaconf import OmegaConf

from lgframe.data.datamodule import ImageDataModule, build_datamodule
from lgframe.data.datasets import load_digits_arrays, make_shapes, random_shift
from lgframe.errors import LgframeError


def split(dm):
    dm.setup()
    return dm.train_set.tensors, dm.val_set.tensors


def rows(x):
    """Images as a set of byte strings, to compare splits by content."""
    return {bytes(r.numpy()) for r in x.flatten(1)}


def test_digits_arrays():
    x, y = load_digits_arrays()
    assert x.shape == (1797, 1, 8, 8) and x.dtype == torch.float32
    assert y.shape == (1797,) and y.dtype == torch.int64
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert torch.bincount(y).tolist() == [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]
    # 0..16 mapped by x/16*2-1: the grid has step 1/8
    assert torch.allclose((x + 1) * 8, ((x + 1) * 8).round())


def test_split_deterministic_disjoint_covering():
    (xt, yt), (xv, yv) = split(ImageDataModule("digits", val_fraction=0.2, seed=0))
    assert len(xt) == 1438 and len(xv) == 359
    (xt2, _), (xv2, _) = split(ImageDataModule("digits", val_fraction=0.2, seed=0))
    assert torch.equal(xt, xt2) and torch.equal(xv, xv2)
    (xt3, _), _ = split(ImageDataModule("digits", val_fraction=0.2, seed=1))
    assert not torch.equal(xt, xt3)

    dm = ImageDataModule("digits", seed=0)
    train_idx, val_idx = dm.split_indices(1797)
    assert set(train_idx.tolist()).isdisjoint(val_idx.tolist())
    assert sorted(train_idx.tolist() + val_idx.tolist()) == list(range(1797))
    x, y = load_digits_arrays()
    assert torch.equal(x[train_idx], xt) and torch.equal(y[val_idx], yv)


def test_setup_idempotent_and_properties():
    dm = ImageDataModule("shapes", shapes_n=500)
    assert (dm.num_classes, dm.image_size, dm.channels) == (10, 8, 1)  # before setup
    dm.setup("fit")
    first = dm.train_set
    dm.setup("validate")
    assert dm.train_set is first
    assert len(dm.train_set) + len(dm.val_set) == 500


def test_train_fraction():
    full, _ = split(ImageDataModule("digits", batch_size=32, seed=0))
    (xt, _), (xv, _) = split(ImageDataModule("digits", batch_size=32, seed=0, train_fraction=0.1))
    assert len(xt) == round(0.1 * 1438) == 144
    assert len(xv) == 359  # val is unchanged
    assert rows(xt) <= rows(full[0])  # a subset of the full train split
    # at least one batch when the split allows it
    (xs, _), _ = split(ImageDataModule("digits", batch_size=128, seed=0, train_fraction=0.01))
    assert len(xs) == 128


def test_loaders():
    dm = ImageDataModule("digits", batch_size=100, seed=0)
    batches = list(dm.train_dataloader())
    assert len(batches) == 1438 // 100  # drop_last
    x, y = batches[0]
    assert x.shape == (100, 1, 8, 8) and y.shape == (100,) and y.dtype == torch.int64
    # the shuffle order is fixed by the seed
    assert torch.equal(next(iter(ImageDataModule("digits", batch_size=100, seed=0).train_dataloader()))[1], y)
    val = list(dm.val_dataloader())
    assert [len(b[0]) for b in val] == [100, 100, 100, 59]
    assert torch.equal(torch.cat([b[0] for b in val]), dm.val_set.tensors[0])  # no shuffle
    # a train set smaller than one batch is kept, not dropped
    small = ImageDataModule("shapes", shapes_n=50, batch_size=128)
    assert [len(b[0]) for b in small.train_dataloader()] == [40]


def test_shapes_deterministic_balanced_range():
    x, y = make_shapes(2000, seed=0)
    assert x.shape == (2000, 1, 8, 8) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x.min().item() == -1.0 and 0.9 < x.max().item() <= 1.0
    assert torch.bincount(y, minlength=10).tolist() == [200] * 10
    assert torch.bincount(make_shapes(25, seed=3)[1], minlength=10).tolist() == [3] * 5 + [2] * 5
    x2, y2 = make_shapes(2000, seed=0)
    assert torch.equal(x, x2) and torch.equal(y, y2)
    x3, _ = make_shapes(2000, seed=1)
    assert not torch.equal(x, x3)
    # background -1 covers most of each image, the shape the rest
    fg = (x > -1).flatten(1).float().mean(1)
    assert 0.05 < fg.min().item() and fg.max().item() < 0.8
    assert make_shapes(20, seed=0, size=16)[0].shape == (20, 1, 16, 16)


def test_shapes_distinguishable():
    x, y = make_shapes(2000, seed=0)
    xt, yt = make_shapes(1000, seed=1)
    means = torch.stack([x[y == c].flatten(1).mean(0) for c in range(10)])
    pred = torch.cdist(xt.flatten(1), means).argmin(1)
    acc = (pred == yt).float().mean().item()
    assert acc > 0.8, acc


def test_augment_train_only():
    plain = ImageDataModule("digits", batch_size=64, seed=0)
    aug = ImageDataModule("digits", batch_size=64, seed=0, augment=True)
    torch.manual_seed(0)
    (xp, yp), (xa, ya) = next(iter(plain.train_dataloader())), next(iter(aug.train_dataloader()))
    assert torch.equal(yp, ya)  # same order, only the images move
    changed = (xp != xa).flatten(1).any(1).float().mean().item()
    assert changed > 0.5  # 8 of 9 shifts move the image
    assert xa.min().item() >= -1.0 and xa.max().item() <= 1.0
    for (a, _), (b, _) in zip(plain.val_dataloader(), aug.val_dataloader()):
        assert torch.equal(a, b)


def test_random_shift_is_a_shift():
    x = torch.arange(2 * 16, dtype=torch.float32).reshape(2, 1, 4, 4)
    g = torch.Generator().manual_seed(0)
    out = random_shift(x, 1, generator=g)
    assert out.shape == x.shape
    for i in range(2):
        shifted = [
            torch.roll(torch.nn.functional.pad(x[i], (1, 1, 1, 1), value=-1), (dy, dx), (1, 2))[:, 1:-1, 1:-1]
            for dy in (-1, 0, 1)
            for dx in (-1, 0, 1)
        ]
        assert any(torch.equal(out[i], s) for s in shifted)


def test_errors():
    with pytest.raises(ValueError, match="unknown data name 'foo'; valid: digits, shapes"):
        ImageDataModule("foo")
    with pytest.raises(LgframeError):  # the CLI prints these without a traceback
        ImageDataModule("foo")
    for kwargs in ({"val_fraction": 0.0}, {"val_fraction": 1.0}, {"train_fraction": 0.0},
                   {"train_fraction": 1.5}, {"batch_size": 0}, {"num_workers": -1}):
        key = next(iter(kwargs))
        with pytest.raises(ValueError, match=key):
            ImageDataModule("digits", **kwargs)


def test_build_datamodule():
    @dataclass
    class Cfg:
        name: str = "shapes"
        batch_size: int = 32
        val_fraction: float = 0.25
        seed: int = 3
        train_fraction: float = 0.5
        augment: bool = True
        num_workers: int = 0

    dm = build_datamodule(Cfg())
    assert (dm.name, dm.batch_size, dm.val_fraction, dm.seed, dm.train_fraction, dm.augment) == (
        "shapes", 32, 0.25, 3, 0.5, True)
    assert dm.shapes_n == 2000 and dm.drop_last  # defaults for keys the config lacks
    dm2 = build_datamodule(OmegaConf.structured(Cfg()))
    assert split(dm2)[0][0].shape == (750, 1, 8, 8) and torch.equal(split(dm)[0][0], split(dm2)[0][0])


def test_val_subset_is_fixed_and_image_size_applies_to_digits_and_shapes():
    from lgframe.data.datamodule import ImageDataModule
    from lgframe.data.datasets import DataError

    a = ImageDataModule("digits", val_subset=50, image_size=16)
    b = ImageDataModule("digits", val_subset=50, image_size=16, train_fraction=0.5)
    full = ImageDataModule("digits")
    for dm in (a, b, full):
        dm.setup()
    xa, ya = a.val_set.tensors
    assert xa.shape == (50, 1, 16, 16) and a.image_size == 16
    assert torch.equal(xa, b.val_set.tensors[0])  # the same subset whatever the training fraction
    # the subset is drawn from the validation split: each image is a resized validation image
    small = torch.nn.functional.interpolate(full.val_set.tensors[0], size=16, mode="bilinear", align_corners=False)
    assert all(any(torch.allclose(x, s) for s in small) for x in xa[:5])
    assert len(set(ya.tolist())) >= 8  # a random draw, not the first classes
    s = ImageDataModule("shapes", image_size=16)
    s.setup()
    assert s.train_set.tensors[0].shape[-2:] == (16, 16)
    with pytest.raises(DataError, match="val_subset"):
        ImageDataModule("digits", val_subset=0)
