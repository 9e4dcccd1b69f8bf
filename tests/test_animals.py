"""data.name=animals: the Animal-Shape set read from its wheel through a pinned SHA-256
and a numpy-only unpickler, duplicates dropped, a stratified split, three resolutions."""

import hashlib
import importlib.metadata
import pickle

import numpy as np
import pytest
import torch

from lgframe.data import animals
from lgframe.data.datamodule import build_datamodule
from lgframe.errors import LgframeError
from lgframe.formats.pickles import load_numpy_pickle
from lgframe.training.recipes import load_recipe
from lgframe.training.stages import fit

pytest.importorskip("animal_shape_mnist.data", reason="the animal-shape-mnist wheel (lgframe[data]) is not installed")


@pytest.fixture(scope="module")
def data():
    return animals.load_animals_arrays()


def test_the_set_without_its_duplicates(data):
    x, y = data
    assert x.shape == (9716, 1, 28, 28) and y.shape == (9716,)  # 10,000 less the 284 exact copies
    assert x.min() == -1 and x.max() == 1 and x.dtype == torch.float32
    counts = torch.bincount(y, minlength=10)
    # 1,000 per class before the copies are dropped (the files are pinned by hash, so these are exact)
    assert counts.tolist() == [937, 812, 992, 996, 997, 1000, 1000, 997, 985, 1000]
    flat = x.flatten(1).numpy()
    assert len(np.unique(flat, axis=0)) == len(flat)


def test_the_split_is_stratified_and_no_validation_image_is_in_training():
    dm = build_datamodule(load_recipe(None, ["data.name=animals"]).data)
    dm.setup()
    xt, yt = dm.train_set.tensors
    xv, yv = dm.val_set.tensors
    assert len(xt) + len(xv) == 9716 and abs(len(xv) / 9716 - 0.2) < 0.01
    share = torch.bincount(yv, minlength=10) / torch.bincount(torch.cat([yt, yv]), minlength=10)
    assert (share - 0.2).abs().max() < 0.01  # every class split at the validation fraction
    seen = {hashlib.sha256(a.numpy().tobytes()).hexdigest() for a in xt}
    assert not any(hashlib.sha256(a.numpy().tobytes()).hexdigest() in seen for a in xv)
    assert (dm.image_size, dm.channels, dm.num_classes) == (28, 1, 10)


@pytest.mark.parametrize("size", [16, 32])
def test_other_resolutions_resize(size, data):
    x, y = animals.load_animals_arrays(size)
    assert x.shape == (9716, 1, size, size) and torch.equal(y, data[1])
    assert x.min() >= -1 and x.max() <= 1


def test_a_changed_file_is_refused_naming_both_hashes(monkeypatch):
    wrong = "0" * 64
    monkeypatch.setitem(animals.FILES, "animal_label_version_3.gz", wrong)
    with pytest.raises(LgframeError, match=f"animal_label_version_3.gz' has SHA-256 dec8dba7.*lgframe pins {wrong}"):
        animals.load_animals_arrays()


def test_without_the_extra_one_sentence_names_it(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(animals.importlib.metadata, "distribution", missing)
    with pytest.raises(LgframeError, match=r"needs the 'animal-shape-mnist' wheel: pip install 'lgframe\[data\]'"):
        animals.load_animals_arrays()


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "PWNED"

    class Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').close()",))

    with pytest.raises(LgframeError, match="refused to unpickle.*'builtins.exec' is not part of a numpy array"):
        load_numpy_pickle(pickle.dumps(Payload()), "test file")
    assert not marker.exists()
    assert load_numpy_pickle(pickle.dumps(np.arange(3)), "ok").tolist() == [0, 1, 2]
    with pytest.raises(LgframeError, match="holds a dict, not a numpy array"):
        load_numpy_pickle(pickle.dumps({"a": 1}), "test file")


@pytest.mark.parametrize("recipe, model", [("vit_digits_pretrain", "ViT-Pico/4"), ("dit_digits_pretrain", "DiT-Pico/4")])
def test_both_families_train_on_animals(recipe, model, tmp_path):
    res = fit(load_recipe(recipe, [f"out_dir={tmp_path}", "data.name=animals", f"model.name={model}", "trainer.max_steps=12",
                                   "trainer.val_every=6", "trainer.progress=false", "sample.n=0", "data.batch_size=64"]))
    assert res.curve[-1][1] < res.curve[0][1]
