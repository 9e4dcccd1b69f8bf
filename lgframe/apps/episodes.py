"""Few-shot episodes: the machinery `fewshot` (FAD) and `evolve` (GTL) share.

An N-way K-shot episode draws N classes of a domain, K support images and Q query
images of each, with no image in both sets; labels are re-indexed 0..N-1 in the
order the classes were drawn. Every draw comes from a `torch.Generator` seeded by
`episode_seed(seed, index)`, so episode i of a run is the same whatever ran before
it (a resumed evolution or a benchmark cell run alone draws the same tasks).

Domains are 1-channel images in [-1, 1] at a common side (8 by default, the
digits' native size): `digits` (scikit-learn, 1,797 images), `shapes` (the
generated shapes, 2,000 images, lgframe's data seed) and `animals` (Animal-Shape
silhouettes resized from 28, lgframe[data]). `classes` keeps a subset of a
domain's labels (a pool of training classes, held-out classes).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from lgframe.apps.stats import t_interval
from lgframe.data.animals import load_animals_arrays
from lgframe.data.datasets import SHAPES_SEED, load_digits_arrays, make_shapes
from lgframe.errors import LgframeError

DOMAINS = ("digits", "shapes", "animals")
SHAPES_N = 2000  # the data module's default number of shapes


@dataclass
class Domain:
    """Images (N, 1, S, S) in [-1, 1] and labels (N,) of one data set, optionally a class subset."""

    name: str
    x: torch.Tensor
    y: torch.Tensor

    @property
    def classes(self) -> list[int]:
        return sorted(torch.unique(self.y).tolist())

    def counts(self) -> dict[int, int]:
        return {c: int((self.y == c).sum()) for c in self.classes}


_CACHE: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}


def load_domain(name: str, image_size: int = 8, classes: Sequence[int] | None = None) -> Domain:
    """A domain by name (digits | shapes | animals) at `image_size`, optionally only `classes`."""
    if name not in DOMAINS:
        raise LgframeError(f"unknown few-shot domain {name!r}; valid: {', '.join(DOMAINS)}")
    key = (name, image_size)
    if key not in _CACHE:
        if name == "digits":
            x, y = load_digits_arrays()
            if image_size != 8:
                x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode="bilinear",
                                                    align_corners=False).clamp(-1, 1)
        elif name == "shapes":
            x, y = make_shapes(SHAPES_N, seed=SHAPES_SEED, size=image_size)
        else:
            x, y = load_animals_arrays(image_size)
        _CACHE[key] = (x, y)
    x, y = _CACHE[key]
    if classes is not None:
        have = sorted(torch.unique(y).tolist())
        bad = [c for c in classes if c not in have]
        if bad or not classes:
            raise LgframeError(f"domain {name!r}: classes {list(classes)} asked; valid labels: {have}"
                               + (f" ({bad} missing)" if bad else " (the list is empty)"))
        keep = torch.isin(y, torch.tensor(list(classes)))
        x, y = x[keep], y[keep]
    return Domain(name, x, y)


# ------------------------------------------------------------------ episodes
@dataclass
class Episode:
    """Support (N*K) and query (N*Q) images with labels 0..N-1; `classes[j]` is label j's
    label in the domain; `support_index` / `query_index` index the domain's images."""

    support_x: torch.Tensor
    support_y: torch.Tensor
    query_x: torch.Tensor
    query_y: torch.Tensor
    classes: list[int]
    support_index: torch.Tensor
    query_index: torch.Tensor
    seed: int


def episode_seed(seed: int, index: int) -> int:
    """A seed per (run seed, episode index), independent of every other episode."""
    return (int(seed) * 1_000_003 + int(index) * 7_919 + 12_345) % (2**63 - 1)


def check_episode_settings(domain: Domain, ways: int, shots: int, queries: int) -> None:
    """Refuse settings the domain cannot supply, naming what it can."""
    counts = domain.counts()
    if ways < 2:
        raise LgframeError(f"ways={ways}: an episode needs at least 2 classes (domain {domain.name!r} has {len(counts)})")
    if shots < 1 or queries < 1:
        raise LgframeError(f"shots={shots}, queries={queries}: both must be >= 1")
    if ways > len(counts):
        raise LgframeError(f"ways={ways}, but domain {domain.name!r} has {len(counts)} classes {sorted(counts)}: "
                           f"valid ways are 2..{len(counts)}")
    smallest = min(counts.values())
    if shots + queries > smallest:
        c = min(counts, key=counts.get)
        raise LgframeError(f"shots={shots} + queries={queries} images per class, but class {c} of domain "
                           f"{domain.name!r} has only {smallest}: shots + queries must be <= {smallest}")


def sample_episode(domain: Domain, ways: int, shots: int, queries: int, seed: int) -> Episode:
    """One N-way K-shot episode with Q queries per class, drawn by `seed` alone."""
    check_episode_settings(domain, ways, shots, queries)
    g = torch.Generator().manual_seed(int(seed))
    classes = domain.classes
    picked = [classes[i] for i in torch.randperm(len(classes), generator=g)[:ways].tolist()]
    s_idx, q_idx, s_y, q_y = [], [], [], []
    for j, c in enumerate(picked):
        idx = torch.nonzero(domain.y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)[: shots + queries]]
        s_idx.append(idx[:shots])
        q_idx.append(idx[shots:])
        s_y.append(torch.full((shots,), j))
        q_y.append(torch.full((queries,), j))
    si, qi = torch.cat(s_idx), torch.cat(q_idx)
    return Episode(domain.x[si], torch.cat(s_y), domain.x[qi], torch.cat(q_y), picked, si, qi, int(seed))


def episodes(domain: Domain, ways: int, shots: int, queries: int, n: int, seed: int, start: int = 0) -> Iterator[Episode]:
    """Episodes start..start+n-1 of the run `seed` (episode i is the same in any run that draws it)."""
    check_episode_settings(domain, ways, shots, queries)
    for i in range(start, start + n):
        yield sample_episode(domain, ways, shots, queries, episode_seed(seed, i))


def mean_interval(accuracies: Sequence[float]) -> dict:
    """Mean accuracy over episodes (or seeds) with its 95% t-interval."""
    m, lo, hi = t_interval(accuracies)
    return {"mean": m, "low": lo, "high": hi, "n": len(accuracies)}
