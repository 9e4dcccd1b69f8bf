"""Metrics without downloads: the cached digits classifier, digits FID, class accuracy."""

import pytest
import torch

from lgframe.data.datamodule import ImageDataModule
from lgframe.errors import LgframeError
from lgframe.training.metrics import class_accuracy, digits_classifier, digits_fid, inception_fid


@pytest.fixture(scope="module")
def digits():
    dm = ImageDataModule("digits")
    dm.setup()
    return dm.train_set.tensors, dm.val_set.tensors


def test_classifier_reads_digits(digits):
    _, (xv, yv) = digits
    assert class_accuracy(xv, yv) > 0.95
    assert class_accuracy(xv, (yv + 1) % 10) < 0.05


def test_fid_of_real_halves_is_far_below_fid_of_noise(digits):
    (xt, _), _ = digits
    real_real = digits_fid(xt[:700], xt[700:1400])
    noise = digits_fid(xt[:700], torch.rand(700, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    assert real_real < 40 and noise > 10 * real_real


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    """A missing cache is trained and written; a corrupt one is retrained and rewritten,
    and the rewritten file is then loaded without training (the trainings are counted,
    and shortened to 20 steps: the cache logic does not depend on the length)."""
    from lgframe.training import metrics

    # The rebuild is deterministic (checked on a short training; the full one is 600 steps).
    real = metrics._train_classifier
    a, b = real(steps=20), real(steps=20)
    assert all(torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))
    monkeypatch.setenv("LGFRAME_CACHE", str(tmp_path))
    calls = []
    monkeypatch.setattr(metrics, "_train_classifier", lambda *a: calls.append(a) or real(*a, steps=20))
    first = digits_classifier()  # trains and caches
    assert calls == [("digits", 8)]
    assert all(torch.equal(p, q) for p, q in zip(first.state_dict().values(), a.state_dict().values()))
    path = next(tmp_path.glob("digits_classifier_v*.safetensors"))
    path.write_bytes(b"corrupt")
    again = digits_classifier()
    assert calls == [("digits", 8)] * 2 and path.stat().st_size > 1000
    cached = digits_classifier()  # the rewritten file passes its hash check: no training
    assert calls == [("digits", 8)] * 2
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(), cached.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), cached.state_dict().values()))


def test_inception_fid_needs_a_local_weights_file(digits):
    (xt, _), _ = digits
    with pytest.raises(LgframeError, match="needs a local weights file.*eval.inception_weights"):
        inception_fid(xt[:10], xt[10:20], None)


def test_classifier_trains_inside_no_grad():
    """A fresh machine's first `lgframe evaluate` trains the classifier from inside
    a no_grad evaluation: the training steps must still change the weights."""
    import torch

    from lgframe.training import metrics

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        init = metrics.DigitsClassifier().state_dict()
    with torch.no_grad():
        trained = metrics._train_classifier(steps=3).state_dict()
    assert any(not torch.equal(init[k], trained[k]) for k in init)


def test_animals_classifier_reads_animals_and_unknown_data_is_refused(tmp_path, monkeypatch):
    """The animals feature classifier (FID features, class accuracy) learns the 16x16
    silhouettes (100 steps here; the cached one trains 600 steps); data without a
    classifier is a clear error."""
    from lgframe.data.datamodule import ImageDataModule
    from lgframe.errors import LgframeError
    from lgframe.training import metrics

    model = metrics._train_classifier("animals", 16, steps=100)
    dm = ImageDataModule("animals", image_size=16, seed=0, val_subset=500)
    dm.setup()
    x, y = dm.val_set.tensors
    with torch.no_grad():
        acc = (model(x).argmax(1) == y).float().mean().item()
    assert acc > 0.6, acc  # chance is 0.1
    assert model.features(x[:4]).shape == (4, metrics.DigitsClassifier.num_features)
    monkeypatch.setenv("LGFRAME_CACHE", str(tmp_path))
    with pytest.raises(LgframeError, match="digits, shapes, animals"):
        metrics.feature_classifier("imagefolder", 16)
