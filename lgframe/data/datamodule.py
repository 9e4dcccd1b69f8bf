"""The Lightning data module that serves the data sets (lgframe/data/datasets.py).

Two embedded domains, both 10 classes of 1x8x8 images in [-1, 1] (background -1):

* ``digits``: scikit-learn's bundled handwritten digits (1797 images, no download);
* ``shapes``: procedurally drawn shapes, a second domain for transfer experiments.

And the user's own images:

* ``imagefolder``: a folder with one subfolder of images per class (sorted
  names are the labels), resized/cropped to ``image_size`` with ``channels``
  1 or 3, held in memory;
* ``latents``: a folder written by ``lgframe encode`` (VAE latents, see
  lgframe/data/latents.py), for a latent DiT.

Batches are ``(images, labels)``: float32 (B, C, H, W) and int64 (B,).
"""

from __future__ import annotations

import inspect

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, DistributedSampler, Sampler, TensorDataset
from torchdata.stateful_dataloader import StatefulDataLoader

from lgframe.data.animals import NATIVE_SIZE, load_animals_arrays
from lgframe.data.datasets import (
    CROPS,
    DATA_NAMES,
    SHAPES_SEED,
    DataError,
    ShiftCollate,
    image_folder_classes,
    load_digits_arrays,
    load_image_folder,
    make_shapes,
)
from lgframe.formats.latents import load_latents, read_latents_info

DEFAULT_SIZES = {"imagefolder": 32, "animals": NATIVE_SIZE, "digits": 8, "shapes": 8}  # data.image_size when it is not set
STRATIFIED = ("animals",)  # data split per class (the embedded sets keep their global permutation)


class EpochSampler(Sampler[int]):
    """A shuffle whose permutation is a function of (seed, epoch), and that can stop
    and resume inside an epoch.

    Lightning calls `set_epoch`, so a run resumed from a checkpoint sees the same
    order as one that never stopped (a DataLoader generator would restart from
    epoch 0). Its state (`state_dict`: the epoch and the items handed out in it)
    travels in the checkpoint through torchdata's StatefulDataLoader, so a run
    killed in the middle of an epoch resumes with the next unseen batch. The
    permutation is drawn when the first item is asked for, after `set_epoch`."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0
        self._yielded = 0  # items handed out in the current epoch
        self._resume: tuple[int, int] | None = None  # (epoch, items) to skip, from load_state_dict

    def set_epoch(self, epoch: int) -> None:
        if self._resume is not None and self._resume[0] != epoch:
            self._resume = None  # the loaded state was the end of an earlier epoch: start afresh
        self.epoch = epoch

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        start = self._resume[1] if self._resume is not None and self._resume[0] == self.epoch else 0
        self._resume = None
        self._yielded = start
        for i in torch.randperm(self.n, generator=g)[start:].tolist():
            self._yielded += 1
            yield i

    def __len__(self) -> int:
        return self.n

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "yielded": self._yielded}

    def load_state_dict(self, state: dict) -> None:
        self.epoch = int(state["epoch"])
        self._resume = (self.epoch, int(state["yielded"]))


def _world_size() -> int:
    return torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1


class ResumableLoader(StatefulDataLoader):
    """torchdata's StatefulDataLoader, whose state Lightning keeps in checkpoints: a run
    resumed from a checkpoint taken inside an epoch continues with the next unseen
    batch. A state saved at the end of an epoch, or at another world size (where the
    per-rank order differs), is not restored: that epoch's remainder starts afresh,
    as Lightning does without a stateful loader."""

    def state_dict(self) -> dict:
        return {"world_size": _world_size(), "loader": super().state_dict()}

    def load_state_dict(self, state: dict) -> None:
        inner = state.get("loader", state)
        done = inner.get("_num_yielded", 0)
        if state.get("world_size", 1) != _world_size() or done >= len(self):
            return
        super().load_state_dict(inner)


class ImageDataModule(pl.LightningDataModule):
    """Train/val loaders over ``digits`` or ``shapes``.

    The split is a permutation from ``seed``: the last ``val_fraction`` goes to
    val. ``train_fraction`` < 1 keeps the first part of the train split, so
    smaller fractions are subsets of larger ones and val never changes.
    """

    def __init__(
        self,
        name: str = "digits",
        batch_size: int = 128,
        val_fraction: float = 0.2,
        seed: int = 0,
        train_fraction: float = 1.0,
        augment: bool = False,
        num_workers: int = 0,
        shapes_n: int = 2000,
        drop_last: bool = True,
        shuffle: bool = True,
        classes: list[int] | None = None,
        path: str | None = None,
        image_size: int | None = None,
        channels: int = 3,
        crop: str = "center",
        val_subset: int | None = None,
    ):
        super().__init__()
        if name not in DATA_NAMES:
            raise DataError(f"unknown data name {name!r}; valid: {', '.join(DATA_NAMES)}")
        if name in ("imagefolder", "latents") and not path:
            raise DataError(f"data '{name}' needs data.path: " + (
                "a folder with one subfolder of images per class" if name == "imagefolder"
                else "a folder written by `lgframe encode`"))
        if crop not in CROPS:
            raise DataError(f"crop={crop!r}; valid: {', '.join(CROPS)}")
        if int(channels) not in (1, 3):
            raise DataError(f"channels={channels}; valid: 1 (grayscale) or 3 (RGB)")
        image_size = DEFAULT_SIZES.get(name, 32) if image_size is None else image_size
        if int(image_size) < 1:
            raise DataError(f"image_size={image_size} must be >= 1")
        self.path = path
        self.folder_image_size, self.folder_channels, self.crop = int(image_size), int(channels), crop
        if int(batch_size) < 1:
            raise DataError(f"batch_size={batch_size} must be >= 1")
        if not 0.0 < val_fraction < 1.0:
            raise DataError(f"val_fraction={val_fraction} must be in (0, 1)")
        if not 0.0 < train_fraction <= 1.0:
            raise DataError(f"train_fraction={train_fraction} must be in (0, 1]")
        if int(num_workers) < 0:
            raise DataError(f"num_workers={num_workers} must be >= 0")
        if val_subset is not None and int(val_subset) < 1:
            raise DataError(f"val_subset={val_subset} must be null (the whole validation split) or an integer >= 1")
        self.val_subset = None if val_subset is None else int(val_subset)
        if name == "shapes" and int(shapes_n) < 2:
            raise DataError(f"shapes_n={shapes_n} must be >= 2 (one train and one val image)")
        self.name = name
        self.batch_size = int(batch_size)
        self.val_fraction = float(val_fraction)
        self.seed = int(seed)
        self.train_fraction = float(train_fraction)
        self.augment = bool(augment)
        self.num_workers = int(num_workers)
        self.shapes_n = int(shapes_n)
        self.drop_last = bool(drop_last)
        # Off where runs must be comparable across world sizes: Lightning's
        # DistributedSampler then hands rank r the items r, r + W, ... in order.
        self.shuffle = bool(shuffle)
        # Keep only these labels (fine-tuning on a subset); labels keep their values.
        self.classes = None if classes is None else [int(c) for c in classes]
        if self.classes is not None and (not self.classes or not all(0 <= c < self.num_classes for c in self.classes)):
            raise DataError(f"classes={classes} must be a non-empty list of labels in 0..{self.num_classes - 1}")
        self.train_set: TensorDataset | None = None
        self.val_set: TensorDataset | None = None

    # Known without reading the images, so models can be sized before setup().
    @property
    def num_classes(self) -> int:
        if self.name == "imagefolder":
            return len(image_folder_classes(self.path)[1])
        if self.name == "latents":
            return len(self.latents_info["class_names"])
        return 10

    @property
    def image_size(self) -> int:
        if self.name in ("imagefolder", "animals", "digits", "shapes"):
            return self.folder_image_size
        if self.name == "latents":
            return int(self.latents_info["latent_size"])
        return 8

    @property
    def channels(self) -> int:
        if self.name == "imagefolder":
            return self.folder_channels
        if self.name == "latents":
            return int(self.latents_info["latent_channels"])
        return 1

    @property
    def latents_info(self) -> dict:

        return read_latents_info(self.path)

    def load_arrays(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole data set: images (N, C, H, W), labels (N,)."""
        if self.name == "digits":
            x, y = load_digits_arrays()
            if self.folder_image_size != 8:  # bilinear, as the animals' resize up
                x = torch.nn.functional.interpolate(x, size=self.folder_image_size, mode="bilinear", align_corners=False)
            return x, y
        if self.name == "animals":
            return load_animals_arrays(self.folder_image_size)
        if self.name == "imagefolder":
            x, y, _ = load_image_folder(self.path, self.folder_image_size, self.folder_channels, self.crop)
            return x, y
        if self.name == "latents":

            x, y, _ = load_latents(self.path)
            return x, y
        # A fixed seed like digits' fixed files: ``seed`` only changes the split.
        return make_shapes(self.shapes_n, seed=SHAPES_SEED, size=self.folder_image_size)

    def split_indices(self, n: int, labels: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Train and val indices into ``n`` items, deterministic in ``seed``; stratified by
        label when `labels` are given (each class split at ``val_fraction``)."""
        g = torch.Generator().manual_seed(self.seed)
        if labels is None:
            perm = torch.randperm(n, generator=g)
            n_val = min(max(1, round(n * self.val_fraction)), n - 1)
            train_idx, val_idx = perm[: n - n_val], perm[n - n_val :]
        else:
            train_parts, val_parts = [], []
            for c in torch.unique(labels).tolist():
                idx = torch.nonzero(labels == c).flatten()
                idx = idx[torch.randperm(len(idx), generator=g)]
                n_val = min(max(1, round(len(idx) * self.val_fraction)), len(idx) - 1) if len(idx) > 1 else 0
                train_parts.append(idx[: len(idx) - n_val])
                val_parts.append(idx[len(idx) - n_val:])
            train_idx = torch.cat(train_parts)
            train_idx = train_idx[torch.randperm(len(train_idx), generator=g)]
            val_idx = torch.cat(val_parts).sort().values
        if self.val_subset is not None and self.val_subset < len(val_idx):
            # A fixed subset, the same for every run with this seed: a random draw
            # from the validation split (stratified in expectation), kept in order.
            pick = torch.randperm(len(val_idx), generator=torch.Generator().manual_seed(self.seed + 7919))
            val_idx = val_idx[pick[: self.val_subset].sort().values]
        # perm is already random, so its first k are a random subset of the train split.
        k = max(round(len(train_idx) * self.train_fraction), min(self.batch_size, len(train_idx)))
        return train_idx[:k], val_idx

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        x, y = self.load_arrays()
        if self.classes is not None:
            keep = torch.isin(y, torch.tensor(self.classes))
            x, y = x[keep], y[keep]
        train_idx, val_idx = self.split_indices(len(x), y if self.name in STRATIFIED else None)
        self.train_set = TensorDataset(x[train_idx], y[train_idx])
        self.val_set = TensorDataset(x[val_idx], y[val_idx])

    def train_dataloader(self) -> DataLoader:
        self.setup()
        # Dropping the only (partial) batch would leave an empty epoch.
        drop = self.drop_last and len(self.train_set) >= self.batch_size
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        if self.shuffle:
            # Under DDP Lightning swaps this for a (seeded, epoch-aware) DistributedSampler.
            sampler = EpochSampler(len(self.train_set), self.seed)
        elif distributed:
            # Lightning's own DistributedSampler always shuffles; this one keeps order.
            sampler = DistributedSampler(self.train_set, shuffle=False)
        else:
            sampler = None
        return ResumableLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=sampler,
            drop_last=drop,
            # Own generators: creating an iterator must not draw from the global one,
            # which resumed runs restore to continue the same noise stream.
            generator=torch.Generator().manual_seed(self.seed),
            collate_fn=ShiftCollate(1) if self.augment else None,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return DataLoader(
            self.val_set,
            batch_size=self.batch_size,
            shuffle=False,
            drop_last=False,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )


def build_datamodule(cfg) -> ImageDataModule:
    """An ImageDataModule from any object with the constructor's argument names as
    attributes (a DataCfg dataclass, an OmegaConf DictConfig); missing ones take
    the constructor's defaults."""
    params = inspect.signature(ImageDataModule.__init__).parameters
    kwargs = {k: getattr(cfg, k, p.default) for k, p in params.items() if k != "self"}
    return ImageDataModule(**kwargs)
