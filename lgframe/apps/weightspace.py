"""Weight-space learning with multiplicative LoRA (mLoRA).

Every data item (an image) is a neural field: a coordinate MLP mapping (x, y)
to pixel values. Instead of fitting each item's field from scratch (weights
full of permutation symmetry), every item adapts one shared *base* field, and
the adaptation is the item's representation:

* ``mlora``  W' = W * (B A * alpha / r)   elementwise; A (r x n), B (m x r);
* ``lora``   W' = W + B A * alpha / r     (additive LoRA, B = 0 at the start);
* ``full``   W' = W + D                   (every weight, D = 0 at the start).

Only A and B (or D) are fitted per item; the base's weights and biases stay
frozen. ``mask: true`` adds asymmetric masking: one fixed random mask, drawn
once from ``mask_seed`` and shared by all items, zeroes a fraction of the
entries in each row of A, so rank components are no longer interchangeable.

mLoRA initialization: B = r / alpha everywhere and A_kj = M_kj u_kj / sum_k'
M_k'j u_k'j with u = exp(0.1 N(0, 1)) drawn from ``init_seed`` (the same for
every item) and M the mask (all ones without masking); then
B A * alpha / r = 1 exactly, so W' = W at the start, while the random u makes
the rank components differ. Every column of M keeps at least one entry.

Fitting is batched: the parameters of many items are tensors with a leading
item axis and one Adam optimizer updates them together (Adam is elementwise
and the loss is a sum of per-item losses, so this equals fitting each item
alone). Results are a safetensors file of one weight vector per item, with
labels, PSNR, the base field and the layout.

Uses: reconstruction PSNR; classification from the weights (an MLP over the
standardized vectors); generation with lgframe's DiT over weight *tokens*
(one token per rank component of a layer: a row of A and a column of B, or one
row of D; tokens are padded to one length and laid out on a square grid, read
by the DiT with patch size 1 and positions from the grid), whose samples
render back into images.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from rich.progress import Progress, track
from torch.utils.data import DataLoader, TensorDataset

from lgframe.data.datasets import load_digits_arrays, load_image_folder, make_shapes
from lgframe.errors import LgframeError
from lgframe.formats.files import read_safetensors, save_tensors
from lgframe.models.files import build_model, model_meta
from lgframe.models.registry import create_model
from lgframe.training.metrics import class_accuracy, digits_fid
from lgframe.training.recipes import LOGGERS, load_recipe
from lgframe.training.tasks import DiffusionTask

REPRS = ("mlora", "lora", "full")
TOKENS = ("pca", "layer")
DATA = ("digits", "shapes", "imagefolder")
FORMAT = "lgframe-weightspace"


@dataclass
class FieldCfg:
    hidden: int = 32  # width of the coordinate MLP
    layers: int = 3  # hidden layers (linear layers = layers + 1)
    freqs: int = 16  # Fourier features per axis pair: inputs are 2 * freqs
    sigma: float = 3.0  # std of the Fourier frequencies
    seed: int = 0  # frequencies and base init
    activation: str = "sine"  # sine (SIREN: sin(omega * .), omega = 30 first layer) | relu (Fourier features + ReLU)


@dataclass
class WeightspaceCfg:
    """`lgframe weightspace fit|train|sample` recipe (recipes/weightspace/weightspace_digits.yaml)."""

    data: str = "digits"  # digits (upsampled to `size`) | shapes | imagefolder
    path: Optional[str] = None  # imagefolder: one subfolder per class
    size: int = 32  # image side
    n: int = 1000  # items (the first n; digits has 1797)
    field: FieldCfg = field(default_factory=FieldCfg)
    base_steps: int = 1000  # base field: Adam steps over random batches of all items
    base_lr: float = 1e-3
    repr: str = "mlora"  # mlora | lora | full
    rank: int = 4
    alpha: float = 4.0
    mask: bool = True  # asymmetric masking of A (mlora, lora)
    mask_fraction: float = 0.5  # fraction of each row of A zeroed
    mask_seed: int = 0
    init_seed: int = 1
    steps: int = 300  # per-item fitting steps
    lr: float = 0.01
    batch_items: int = 256  # items fitted together
    pixels: int = 256  # random pixels per fitting step (0: all)
    out: str = "weightspace.safetensors"
    # Generation (train/sample): DiT over weight tokens.
    tokens: str = "pca"  # pca (whitened principal components) | layer (rank components per layer)
    components: int = 64  # pca: principal components kept (capped at the weight vectors' rank)
    token_channels: int = 16  # pca: components per token
    dit: str = "DiT-Pico/1"
    dit_steps: int = 2000
    dit_batch: int = 64
    dit_lr: float = 1e-3
    samples: int = 100
    guidance: float = 2.0
    seed: int = 0
    logger: list = dataclasses.field(default_factory=lambda: ["csv"])  # train: csv (always) + tensorboard | wandb, as trainer.logger


def check_cfg(c: WeightspaceCfg) -> None:
    if c.repr not in REPRS:
        raise LgframeError(f"repr={c.repr!r}; valid: {', '.join(REPRS)}")
    if c.data not in DATA:
        raise LgframeError(f"data={c.data!r}; valid: {', '.join(DATA)}")
    bad = [v for v in c.logger if v not in LOGGERS]
    if bad:
        raise LgframeError(f"logger={c.logger!r}: unknown {bad}; valid: {', '.join(LOGGERS)}")
    for k in ("size", "n", "rank", "steps", "batch_items", "components", "token_channels"):
        if getattr(c, k) < 1:
            raise LgframeError(f"{k}={getattr(c, k)} must be >= 1")
    if c.tokens not in TOKENS:
        raise LgframeError(f"tokens={c.tokens!r}; valid: {', '.join(TOKENS)}")
    if not 0 <= c.mask_fraction < 1:
        raise LgframeError(f"mask_fraction={c.mask_fraction} must be in [0, 1)")


def load_cfg(recipe: str | None, overrides: list[str]) -> WeightspaceCfg:
    """A WeightspaceCfg from an optional YAML recipe and key=value overrides (unknown keys fail)."""

    base = OmegaConf.structured(WeightspaceCfg)
    try:
        parts = [base]
        if recipe:
            p = Path(recipe)
            if not p.is_file():
                shipped = Path(__file__).resolve().parents[1] / "recipes" / "weightspace" / f"{Path(recipe).stem}.yaml"
                if not shipped.is_file():
                    raise LgframeError(f"recipe '{recipe}' not found (a YAML file or a shipped name such as weightspace_digits)")
                p = shipped
            parts.append(OmegaConf.load(p))
        parts.append(OmegaConf.from_dotlist(overrides))
        cfg = OmegaConf.to_object(OmegaConf.merge(*parts))
    except OmegaConfBaseException as e:
        raise LgframeError(f"weightspace recipe: {e.msg if hasattr(e, 'msg') else e}; valid keys: "
                           f"{', '.join(WeightspaceCfg.__dataclass_fields__)}") from None
    check_cfg(cfg)
    return cfg


# ------------------------------------------------------------------ data
def field_images(c: WeightspaceCfg) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, C, size, size) in [-1, 1] and labels (N,)."""

    if c.data == "digits":
        x, y = load_digits_arrays()
        x = F.interpolate(x, size=(c.size, c.size), mode="bilinear", align_corners=False).clamp(-1, 1)
    elif c.data == "shapes":
        x, y = make_shapes(c.n, seed=0, size=c.size)
    else:
        if not c.path:
            raise LgframeError("data=imagefolder needs path= (a folder with one subfolder of images per class)")
        x, y, _ = load_image_folder(c.path, c.size, channels=3)
    return x[: c.n].contiguous(), y[: c.n].contiguous()


def coords(size: int) -> torch.Tensor:
    """Pixel-centre coordinates in [-1, 1], (size * size, 2), row-major (y, x)."""
    t = (torch.arange(size, dtype=torch.float32) + 0.5) / size * 2 - 1
    yy, xx = torch.meshgrid(t, t, indexing="ij")
    return torch.stack([yy.flatten(), xx.flatten()], dim=1)


# ------------------------------------------------------------------ the field
class Base:
    """The shared base field: Fourier frequencies, weights and biases of each linear layer."""

    def __init__(self, fc: FieldCfg, channels: int):
        g = torch.Generator().manual_seed(fc.seed)
        self.fc, self.channels = fc, channels
        if fc.activation not in ACTIVATIONS:
            raise LgframeError(f"field activation {fc.activation!r}; valid: {', '.join(ACTIVATIONS)}")
        self.freqs = torch.randn(fc.freqs, 2, generator=g) * fc.sigma
        sine = fc.activation == "sine"
        dims = [2 if sine else 2 * fc.freqs] + [fc.hidden] * fc.layers + [channels]
        self.weights, self.biases = [], []
        for i, (n, m) in enumerate(zip(dims[:-1], dims[1:])):
            if sine:  # SIREN init; the first layer's omega_0 = 30 is folded into its weights
                bound = 30.0 / n if i == 0 else math.sqrt(6 / n)
                self.weights.append((torch.rand(m, n, generator=g) * 2 - 1) * bound)
                self.biases.append((torch.rand(m, generator=g) * 2 - 1) / math.sqrt(n))
            else:
                bound = math.sqrt(6 / n)  # He-uniform for ReLU layers
                self.weights.append((torch.rand(m, n, generator=g) * 2 - 1) * bound)
                self.biases.append(torch.zeros(m))

    @property
    def shapes(self) -> list[tuple[int, int]]:
        return [tuple(w.shape) for w in self.weights]

    def features(self, xy: torch.Tensor) -> torch.Tensor:
        if self.fc.activation == "sine":
            return xy
        z = 2 * math.pi * xy @ self.freqs.T
        return torch.cat([torch.sin(z), torch.cos(z)], dim=1)

    def state(self) -> dict[str, torch.Tensor]:
        out = {"base/freqs": self.freqs}
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            out[f"base/w{i}"], out[f"base/b{i}"] = w, b
        return out

    @classmethod
    def from_state(cls, fc: FieldCfg, channels: int, t: dict[str, torch.Tensor]) -> Base:
        b = cls(fc, channels)
        b.freqs = t["base/freqs"]
        b.weights = [t[f"base/w{i}"] for i in range(len(b.weights))]
        b.biases = [t[f"base/b{i}"] for i in range(len(b.biases))]
        return b


ACTIVATIONS = ("relu", "sine")


def render(feats: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], act: str = "relu") -> torch.Tensor:
    """Batched field: feats (P, n0), weights [(N, m, n)], biases [(m,)] -> (N, P, C)."""
    f = torch.sin if act == "sine" else F.relu
    h = torch.einsum("pn,bmn->bpm", feats, weights[0]) + biases[0]
    for w, b in zip(weights[1:], biases[1:]):
        h = torch.einsum("bpn,bmn->bpm", f(h), w) + b
    return h


def fit_base(base: Base, x: torch.Tensor, steps: int, lr: float = 1e-3, batch: int = 64, seed: int = 0,
             progress: bool = False) -> list[float]:
    """Trains the shared base on random batches of all items (it learns what they share)."""

    g = torch.Generator().manual_seed(seed)
    feats = base.features(coords(x.shape[-1]))
    target = x.flatten(2).transpose(1, 2)  # (N, P, C)
    params = [t.requires_grad_() for t in base.weights + base.biases]
    opt = torch.optim.Adam(params, lr=lr)
    losses = []
    for _ in track(range(steps), description="base field", disable=not progress, transient=True):
        idx = torch.randint(0, len(x), (min(batch, len(x)),), generator=g)
        out = render(feats, [w.unsqueeze(0) for w in base.weights], base.biases, base.fc.activation)
        loss = F.mse_loss(out.expand(len(idx), -1, -1), target[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    for t in params:
        t.requires_grad_(False)
    base.weights = [w.detach() for w in base.weights]
    base.biases = [b.detach() for b in base.biases]
    return losses


# ------------------------------------------------------------------ representations
def row_mask(shape: tuple[int, int], fraction: float, seed: int) -> torch.Tensor:
    """(r, n) 0/1 mask: each row zeroes round(fraction * n) random entries; every column keeps one."""
    r, n = shape
    g = torch.Generator().manual_seed(seed)
    k = int(round(fraction * n))
    m = torch.ones(r, n)
    for i in range(r):
        m[i, torch.randperm(n, generator=g)[:k]] = 0
    empty = (m.sum(0) == 0).nonzero().flatten()
    m[torch.arange(len(empty)) % r, empty] = 1  # no column without a rank component
    return m


class Adapter:
    """The per-item parameters of one representation for every layer of the base."""

    def __init__(self, base: Base, c: WeightspaceCfg):
        self.base, self.c = base, c
        self.masks = []
        for i, (_m, n) in enumerate(base.shapes):
            use = c.mask and c.repr != "full"
            self.masks.append(row_mask((c.rank, n), c.mask_fraction, c.mask_seed + 1000 * i) if use else torch.ones(c.rank, n))

    def init(self, items: int) -> list[torch.Tensor]:
        """Initial parameters, identical for every item: [A_l, B_l, ...] or [D_l, ...]."""
        c, out = self.c, []
        g = torch.Generator().manual_seed(c.init_seed)
        for (m, n), M in zip(self.base.shapes, self.masks):
            if c.repr == "full":
                out.append(torch.zeros(items, m, n))
                continue
            if c.repr == "mlora":
                u = torch.exp(0.1 * torch.randn(c.rank, n, generator=g)) * M
                A = u / u.sum(0, keepdim=True)
                B = torch.full((m, c.rank), c.rank / c.alpha)
            else:
                A = torch.randn(c.rank, n, generator=g) / math.sqrt(n) * M
                B = torch.zeros(m, c.rank)
            out += [A.expand(items, -1, -1).clone(), B.expand(items, -1, -1).clone()]
        return out

    def weights(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """Adapted weights [(N, m, n)] of each layer."""
        c, out = self.c, []
        for i, W in enumerate(self.base.weights):
            if c.repr == "full":
                out.append(W + params[i])
                continue
            A, B = params[2 * i] * self.masks[i], params[2 * i + 1]
            s = B @ A * (c.alpha / c.rank)
            out.append(W * s if c.repr == "mlora" else W + s)
        return out

    # vectors and tokens
    def flatten(self, params: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([(p * self.masks[i // 2] if self.c.repr != "full" and i % 2 == 0 else p).flatten(1)
                          for i, p in enumerate(params)], dim=1)

    def unflatten(self, v: torch.Tensor) -> list[torch.Tensor]:
        out, at = [], 0
        for shape in self.param_shapes():
            k = shape[0] * shape[1]
            out.append(v[:, at:at + k].reshape(len(v), *shape))
            at += k
        return out

    def param_shapes(self) -> list[tuple[int, int]]:
        if self.c.repr == "full":
            return list(self.base.shapes)
        return [s for m, n in self.base.shapes for s in ((self.c.rank, n), (m, self.c.rank))]

    def token_layout(self) -> tuple[int, int]:
        """(number of tokens, token length)."""
        if self.c.repr == "full":
            return sum(m for m, _ in self.base.shapes), max(n for _, n in self.base.shapes)
        return len(self.base.shapes) * self.c.rank, max(m + n for m, n in self.base.shapes)

    def to_tokens(self, v: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, tokens, length): one token per rank component of a layer (row of A, column
        of B) or per row of D, zero-padded."""
        params, toks = self.unflatten(v), []
        n_tok, length = self.token_layout()
        if self.c.repr == "full":
            toks = [F.pad(p, (0, length - p.shape[2])) for p in params]
        else:
            for A, B in zip(params[::2], params[1::2]):
                t = torch.cat([A, B.transpose(1, 2)], dim=2)
                toks.append(F.pad(t, (0, length - t.shape[2])))
        return torch.cat(toks, dim=1)

    def from_tokens(self, t: torch.Tensor) -> torch.Tensor:
        parts, at = [], 0
        if self.c.repr == "full":
            for m, n in self.base.shapes:
                parts.append(t[:, at:at + m, :n])
                at += m
        else:
            for m, n in self.base.shapes:
                tok = t[:, at:at + self.c.rank]
                parts += [tok[:, :, :n], tok[:, :, n:n + m].transpose(1, 2)]
                at += self.c.rank
        return torch.cat([p.flatten(1) for p in parts], dim=1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per item, for values in [-1, 1] (peak-to-peak 2)."""
    mse = ((a - b) ** 2).flatten(1).mean(1).clamp_min(1e-12)
    return 10 * torch.log10(4 / mse)


def fit_items(adapter: Adapter, x: torch.Tensor, steps: int, lr: float, batch_items: int,
              progress: bool = True, pixels: int = 256, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Fits every item: returns weight vectors (N, D) and PSNR (N,) over all pixels.
    Each step uses `pixels` random pixels (the same for the items fitted together; 0 = all)."""

    base = adapter.base
    feats = base.features(coords(x.shape[-1]))
    vecs, scores = [], []
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task(f"fitting {adapter.c.repr}", total=len(x) * steps)
        for start in range(0, len(x), batch_items):
            xb = x[start:start + batch_items]
            target = xb.flatten(2).transpose(1, 2)
            params = [p.requires_grad_() for p in adapter.init(len(xb))]
            opt = torch.optim.Adam(params, lr=lr)
            g = torch.Generator().manual_seed(seed + start)
            P = feats.shape[0]
            for _ in range(steps):
                idx = torch.randperm(P, generator=g)[:pixels] if 0 < pixels < P else slice(None)
                out = render(feats[idx], adapter.weights(params), base.biases, base.fc.activation)
                loss = ((out - target[:, idx]) ** 2).mean(dim=(1, 2)).sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                bar.advance(task, len(xb))
            with torch.no_grad():
                out = render(feats, adapter.weights(params), base.biases, base.fc.activation)
                vecs.append(adapter.flatten([p.detach() for p in params]))
                scores.append(psnr(out, target))
    return torch.cat(vecs), torch.cat(scores)


def render_vectors(adapter: Adapter, v: torch.Tensor, size: int) -> torch.Tensor:
    """Weight vectors (N, D) -> images (N, C, size, size) clamped to [-1, 1]."""
    with torch.no_grad():
        out = render(adapter.base.features(coords(size)), adapter.weights(adapter.unflatten(v)), adapter.base.biases,
                     adapter.base.fc.activation)
    return out.transpose(1, 2).reshape(len(v), -1, size, size).clamp(-1, 1)


# ------------------------------------------------------------------ files
@dataclass
class WeightDataset:
    cfg: WeightspaceCfg
    base: Base
    weights: torch.Tensor  # (N, D)
    labels: torch.Tensor  # (N,)
    psnr: torch.Tensor  # (N,)

    @property
    def adapter(self) -> Adapter:
        return Adapter(self.base, self.cfg)

    def save(self, path: str | os.PathLike) -> Path:

        t = {"weights": self.weights.contiguous(), "labels": self.labels.contiguous(), "psnr": self.psnr.contiguous(),
             **{k: v.contiguous() for k, v in self.base.state().items()}}
        meta = {"format": FORMAT, "config": json.dumps(asdict(self.cfg)), "channels": str(self.base.channels)}
        save_tensors(path, t, meta)
        return Path(path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> WeightDataset:

        t, meta = read_safetensors(path, "weight dataset")
        if meta.get("format") != FORMAT:
            raise LgframeError(f"{path}: not a weight dataset (format {meta.get('format')!r}, expected {FORMAT!r}); "
                               "write one with `lgframe weightspace fit`")
        d = json.loads(meta["config"])
        fc = FieldCfg(**d.pop("field"))
        cfg = WeightspaceCfg(**d, field=fc)
        return cls(cfg, Base.from_state(fc, int(meta["channels"]), t), t["weights"], t["labels"], t["psnr"])


def fit_dataset(c: WeightspaceCfg, progress: bool = True, base: Base | None = None) -> WeightDataset:
    """The whole `fit` stage: data, base field (unless given), per-item fits."""
    torch.manual_seed(c.seed)
    x, y = field_images(c)
    if base is None:
        base = Base(c.field, x.shape[1])
        fit_base(base, x, c.base_steps, lr=c.base_lr, seed=c.seed, progress=progress)
    v, s = fit_items(Adapter(base, c), x, c.steps, c.lr, c.batch_items, progress, c.pixels, c.seed)
    return WeightDataset(c, base, v, y, s)


# ------------------------------------------------------------------ classification
def classify(v: torch.Tensor, y: torch.Tensor, train_fraction: float = 0.8, steps: int = 500, seed: int = 0) -> float:
    """Test accuracy of an MLP trained on standardized weight vectors (fixed split from `seed`)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(v), generator=g)
    k = int(len(v) * train_fraction)
    tr, te = perm[:k], perm[k:]
    mu, sd = v[tr].mean(0), v[tr].std(0).clamp_min(1e-6)
    z = (v - mu) / sd
    torch.manual_seed(seed)
    classes = int(y.max()) + 1
    net = torch.nn.Sequential(torch.nn.Dropout(0.2), torch.nn.Linear(v.shape[1], 256), torch.nn.ReLU(),
                              torch.nn.Dropout(0.2), torch.nn.Linear(256, classes))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-2)
    for _ in range(steps):
        idx = tr[torch.randint(0, len(tr), (128,), generator=g)]
        loss = F.cross_entropy(net(z[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        return (net(z[te]).argmax(1) == y[te]).float().mean().item()


# ------------------------------------------------------------------ generation
def token_grid(ds: WeightDataset) -> tuple[torch.Tensor, dict]:
    """Weight tokens as DiT inputs (N, channels, g, g) on a g x g grid, and the stats that invert them.

    tokens=pca (default): the weight vectors are centred and projected on their
    first `components` principal axes (from the dataset's SVD), each whitened to
    unit variance, and cut into tokens of `token_channels` consecutive
    components. A linear, fixed change of basis: linear correlations between
    weights (which per-layer tokens leave to attention, and a small DiT does not
    learn from a thousand items) are removed up front, and dropping the smallest
    components keeps the generator's task to what a thousand items determine.
    tokens=layer: one token per rank component of a layer (a row of A and a
    column of B, or a row of D), standardized per position."""
    c, v = ds.cfg, ds.weights
    if c.tokens == "layer":
        t = ds.adapter.to_tokens(v)  # (N, T, L)
        n_tok, length = t.shape[1:]
        g = math.ceil(math.sqrt(n_tok))
        t = F.pad(t, (0, 0, 0, g * g - n_tok))
        mu, sd = t.mean(0), t.std(0)
        sd = torch.where(sd > 1e-8, sd, torch.ones_like(sd))
        z = ((t - mu) / sd).transpose(1, 2).reshape(len(t), length, g, g)
        return z, {"kind": "layer", "mu": mu, "sd": sd, "tokens": n_tok, "grid": g}
    mu = v.mean(0)
    _, S, Vh = torch.linalg.svd((v - mu).double(), full_matrices=False)
    k = min(c.components, int((S > S[0] * 1e-4).sum()))  # float32 data: below is rounding
    V, scale = Vh[:k].T.float().contiguous(), (S[:k] / math.sqrt(max(len(v) - 1, 1))).float()
    L = c.token_channels
    n_tok = math.ceil(k / L)
    g = math.ceil(math.sqrt(n_tok))
    coef = F.pad((v - mu) @ V / scale, (0, g * g * L - k))
    z = coef.reshape(len(v), g * g, L).transpose(1, 2).reshape(len(v), L, g, g)
    return z, {"kind": "pca", "mu": mu, "V": V, "scale": scale, "components": k, "tokens": n_tok, "grid": g}


def from_token_grid(ds: WeightDataset, z: torch.Tensor, stats: dict) -> torch.Tensor:
    """DiT outputs (N, channels, g, g) -> weight vectors (N, D)."""
    n, length, g, _ = z.shape
    t = z.reshape(n, length, g * g).transpose(1, 2)
    if stats["kind"] == "layer":
        return ds.adapter.from_tokens((t * stats["sd"] + stats["mu"])[:, : stats["tokens"]])
    coef = t.reshape(n, -1)[:, : stats["components"]]
    return stats["mu"] + (coef * stats["scale"]) @ stats["V"].T


def class_gaussian(ds: WeightDataset, labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A reference generator: weight vectors drawn per class from independent normals over the
    DiT's tokens (each class's mean and std per token entry). A generator that learned no more
    than each class's mean and spread does not beat it."""
    z, stats = token_grid(ds)
    g = torch.Generator().manual_seed(seed)
    mean = torch.stack([z[ds.labels == k].mean(0) for k in range(int(ds.labels.max()) + 1)])
    std = torch.stack([z[ds.labels == k].std(0) for k in range(int(ds.labels.max()) + 1)])
    draw = mean[labels] + std[labels] * torch.randn((len(labels), *z.shape[1:]), generator=g)
    return from_token_grid(ds, draw, stats)


def dit_recipe(c: WeightspaceCfg, classes: int) -> dict:


    r = load_recipe("dit_digits_pretrain", ["constraint=scratch", f"optim.lr={c.dit_lr}", "optim.warmup_steps=50",
                                            "diffusion.clip_sample=false", "diffusion.prediction=v_prediction",
                                            f"sample.guidance={c.guidance}",
                                            "sample.steps=50", f"seed={c.seed}"])
    return OmegaConf.to_container(r, resolve=True)


def train_generator(ds: WeightDataset, progress: bool = True, log_dir: str | os.PathLike | None = None):
    """A class-conditional DiT trained on the weight tokens; returns (task, stats).
    `log_dir`: the run's loggers (`logger`: metrics.csv always, TensorBoard and W&B as
    `trainer.logger` makes them) write there; None logs nothing."""
    from lgframe.training.stages import make_loggers  # deferred: about 0.6 s of imports only `train` needs

    c = ds.cfg
    loggers = make_loggers(c.logger, Path(log_dir), "weightspace") if log_dir is not None else False
    z, stats = token_grid(ds)
    classes = int(ds.labels.max()) + 1
    pl.seed_everything(c.seed, verbose=False)
    model = create_model(c.dit, image_size=stats["grid"], in_channels=z.shape[1], num_classes=classes)
    if model.config.patch_size != 1:
        raise LgframeError(f"dit={c.dit!r}: weight tokens need patch size 1 (e.g. DiT-Pico/1)")
    task = DiffusionTask(dit_recipe(c, classes), model)
    trainer = pl.Trainer(max_steps=c.dit_steps, accelerator="cpu", logger=loggers, enable_checkpointing=False,
                         enable_progress_bar=progress, enable_model_summary=False, gradient_clip_val=1.0,
                         log_every_n_steps=min(50, max(1, c.dit_steps // 10)))
    g = torch.Generator().manual_seed(c.seed)
    trainer.fit(task, DataLoader(TensorDataset(z, ds.labels), batch_size=c.dit_batch, shuffle=True, drop_last=True,
                                 generator=g))
    return task, stats


def sample_weights(ds: WeightDataset, task, stats: dict, labels: torch.Tensor, seed: int = 0) -> torch.Tensor:
    z = task.sample(labels, seed=seed)
    return from_token_grid(ds, z, stats)


def save_generator(task, stats: dict, ds_path: str | os.PathLike, path: str | os.PathLike) -> Path:

    t = {f"model/{k}": v.contiguous() for k, v in task.model.state_dict().items()}
    t |= {f"stats/{k}": v.contiguous() for k, v in stats.items() if isinstance(v, torch.Tensor)}
    meta = {"format": FORMAT + "-generator", "model": json.dumps(model_meta(task.model)),
            "recipe": json.dumps(task.recipe), "dataset": str(Path(ds_path).resolve()),
            "stats": json.dumps({k: v for k, v in stats.items() if not isinstance(v, torch.Tensor)})}
    save_tensors(path, t, meta)
    return Path(path)


def load_generator(path: str | os.PathLike):

    t, meta = read_safetensors(path, "weight-space generator")
    if meta.get("format") != FORMAT + "-generator":
        raise LgframeError(f"{path}: not a weight-space generator (write one with `lgframe weightspace train`)")
    state = {k[len("model/"):]: v for k, v in t.items() if k.startswith("model/")}
    model = build_model(json.loads(meta["model"]), state)
    task = DiffusionTask(json.loads(meta["recipe"]), model)
    stats = json.loads(meta["stats"]) | {k[len("stats/"):]: v for k, v in t.items() if k.startswith("stats/")}
    return task, stats, meta["dataset"]


def nearest_distance(fake: torch.Tensor, real: torch.Tensor) -> float:
    """Mean over generated images of the RMS distance to the nearest training image."""
    d = torch.cdist(fake.flatten(1), real.flatten(1)) / math.sqrt(fake[0].numel())
    return d.min(1).values.mean().item()


def score_digits(fake: torch.Tensor, labels: torch.Tensor, real: torch.Tensor) -> dict:
    """Digits FID and class accuracy (lgframe.training.metrics' digits classifier, at 8x8) and NN distance."""

    small = F.interpolate(fake, size=(8, 8), mode="area")
    real_small = F.interpolate(real, size=(8, 8), mode="area")
    return {"fid_digits": digits_fid(real_small, small), "class_accuracy": class_accuracy(small, labels),
            "nn_distance": nearest_distance(fake, real)}
