"""FAD: Frequency Adaptation and Diversion for cross-domain few-shot learning
(Shi, Feng, Xie et al. 2025), on lgframe's ViT.

The abstract: the Frequency Diversion Adapter "transforms intermediate features
into the frequency domain using the discrete Fourier transform, partitions them
into low, mid and high-frequency bands via radial masks, and reconstructs each
band using inverse DFT. Each frequency band is then adapted using a dedicated
convolutional branch with a kernel size tailored to its spectral scale". No code
is public; what follows is lgframe's reading, each choice stated.

**Adapter.** After a chosen ViT block, the patch tokens (B, N, C) are reshaped to
the patch grid F (B, C, H, W) (the class token passes unchanged). X = DFT2(F) over
(H, W) (orthonormal). The radius of frequency (fy, fx) is r = |(fy, fx)| / |(1/2, 1/2)|,
so r is 0 at DC and 1 at the corner of the spectrum; band edges 0 < e1 < e2 < 1
(`edges`) give masks low = r < e1, mid = e1 <= r < e2, high = r >= e2, a partition
of the spectrum (every frequency in exactly one band; the masks are symmetric
under f -> -f, so each band's inverse DFT is real). Band b is F_b = Re IDFT2(M_b X);
sum_b F_b = F exactly (tested). Each band gets its own depthwise convolution
(lgframe's reading of "convolutional branch": per channel, kernel k_b, same
padding), large for low and small for high (default 5, 3, 1 on the 4x4 grid of a
ViT-Pico/2 on 8x8 images, where the default edges (0.4, 0.75) put 5, 6 and 5 of
the 16 frequencies in the three bands). The adapted tokens are
F + s * sum_b conv_b(F_b), s a per-channel scale initialized at zero, so the
adapted model equals the frozen backbone at step 0 (tested); each branch starts
as the identity kernel on its band, so the first update of s is a gain on the
whole map. The backbone is frozen; adapters go after every block unless `blocks`
names some.

**Spatial ablation** (`spatial`): the same three depthwise branches, same kernel
sizes and the same parameter count, applied to the whole map with no DFT and no
split (each starts as a third of the identity, so the branches again sum to the
identity): the one difference from FAD is the frequency diversion.

**Episodes** (`lgframe.apps.episodes`): a backbone pre-trained on one domain
(digits by default), N-way K-shot episodes from other domains. Every method in an
episode starts from the same classifier: a cosine classifier whose class weights
are the support prototypes (class means of the backbone's class-token features)
and whose temperature is fixed (`temperature`); `proto` is that classifier with
no training (ProtoNet on frozen features). The others train for `steps` full-batch
Adam steps on the support set (cross-entropy through the classifier, which
trains too), then score the query set:
`linear` (the classifier only), `full` (every backbone weight), `lora` (peft LoRA
on every block's attn.qkv and attn.proj, as lgframe's personalization uses peft),
`fad` and `spatial` (the adapters). Each method has its own default learning
rate (`METHOD_LR`), which `lr` overrides.

Run by `lgframe fewshot RECIPE` (a recipe under lgframe/recipes/fewshot/, one
line `method:` picks the method); `benchmarks/fewshot.py` runs every method in the
same episodes.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lgframe.apps.episodes import DOMAINS, Episode, check_episode_settings, episodes, load_domain, mean_interval
from lgframe.core.constraint import attached_constraint
from lgframe.core.registry import get_constraint
from lgframe.errors import LgframeError
from lgframe.formats.files import write_json
from lgframe.models.files import read_model
from lgframe.models.vit import ViT

METHODS = ("fad", "spatial", "proto", "linear", "full", "lora")
METHOD_LR = {"fad": 1e-2, "spatial": 1e-2, "linear": 1e-2, "full": 1e-3, "lora": 5e-3, "proto": 0.0}
LORA_TARGETS = r"blocks\.\d+\.attn\.(qkv|proj)"
BANDS = ("low", "mid", "high")


# ------------------------------------------------------------------ the spectrum
def check_edges(edges) -> tuple[float, float]:
    e = tuple(float(v) for v in edges)
    if len(e) != 2 or not (0 < e[0] < e[1] < 1) or not all(math.isfinite(v) for v in e):
        raise LgframeError(f"band edges {list(edges)}: need two radii 0 < e1 < e2 < 1 (the radius is 0 at DC and "
                           f"1 at the spectrum's corner), e.g. [0.4, 0.75]")
    return e


def radial_masks(h: int, w: int, edges=(0.4, 0.75)) -> torch.Tensor:
    """(3, h, w) float masks of the low, mid and high bands of an h x w DFT: a partition
    (they sum to 1 at every frequency). r = |(fy, fx)| / |(1/2, 1/2)| in [0, 1]."""
    e1, e2 = check_edges(edges)
    fy = torch.fft.fftfreq(h, dtype=torch.float64)[:, None]
    fx = torch.fft.fftfreq(w, dtype=torch.float64)[None, :]
    r = torch.sqrt(fy**2 + fx**2) / math.sqrt(0.5)
    low = r < e1
    high = r >= e2
    return torch.stack([low, ~low & ~high, high]).float()


def split_bands(fmap: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(3, B, C, H, W): the band images Re IDFT2(M_b DFT2(fmap)) of fmap (B, C, H, W)."""
    spec = torch.fft.fft2(fmap.float(), norm="ortho")
    return torch.stack([torch.fft.ifft2(spec * m, norm="ortho").real for m in masks.to(fmap.device)]).to(fmap.dtype)


def band_projectors(h: int, w: int, edges=(0.4, 0.75)) -> torch.Tensor:
    """(3, h*w, h*w) real matrices P_b with vec(F_b) = P_b vec(F): DFT, mask and inverse DFT
    of band b as one linear map (split_bands applied to the basis images). The adapter uses
    these: on a small grid a matmul is several times faster than torch.fft, and equal to it
    to float rounding (tested)."""
    basis = torch.eye(h * w, dtype=torch.float64).reshape(h * w, 1, h, w)
    bands = split_bands(basis, radial_masks(h, w, edges).double())  # (3, hw basis, 1, h, w)
    return bands.reshape(3, h * w, h * w).transpose(1, 2).float().contiguous()


# ------------------------------------------------------------------ the adapters
def check_kernels(kernels) -> tuple[int, int, int]:
    k = tuple(int(v) for v in kernels)
    if len(k) != 3 or any(v < 1 or v % 2 == 0 for v in k):
        raise LgframeError(f"kernels {list(kernels)}: need three odd sizes >= 1 (low, mid, high band), e.g. [5, 3, 1]")
    return k


class BandAdapter(nn.Module):
    """Three depthwise conv branches over the patch grid, added back with a zero-initialized
    per-channel scale: tokens (B, 1 + H*W, C) -> tokens. `frequency=True`: branch b sees
    band b of the DFT split (FAD); False: every branch sees the whole map (the spatial ablation)."""

    def __init__(self, dim: int, grid: int, edges=(0.4, 0.75), kernels=(5, 3, 1), frequency: bool = True):
        super().__init__()
        self.grid, self.frequency = grid, frequency
        self.register_buffer("projectors", band_projectors(grid, grid, edges), persistent=False)
        self.branches = nn.ModuleList(nn.Conv2d(dim, dim, k, padding=k // 2, groups=dim, bias=False)
                                      for k in check_kernels(kernels))
        for conv in self.branches:  # identity kernels: FAD's bands sum back to the map, the spatial thirds too
            nn.init.dirac_(conv.weight, groups=dim)
            if not frequency:
                conv.weight.data /= len(self.branches)
        self.scale = nn.Parameter(torch.zeros(dim))

    def adapt(self, fmap: torch.Tensor) -> torch.Tensor:
        if self.frequency:  # the DFT band split as (3, HW, HW) projectors: (3, B, C, H, W)
            B, C, H, W = fmap.shape
            inputs = (fmap.reshape(1, B * C, H * W) @ self.projectors.transpose(1, 2)).reshape(3, B, C, H, W)
        else:
            inputs = [fmap] * len(self.branches)
        return sum(conv(b) for conv, b in zip(self.branches, inputs))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        B, N, C = tokens.shape
        if N != 1 + self.grid**2:
            raise LgframeError(f"adapter built for a {self.grid}x{self.grid} patch grid got {N - 1} patch tokens")
        patches = tokens[:, 1:]
        fmap = patches.transpose(1, 2).reshape(B, C, self.grid, self.grid)
        delta = self.adapt(fmap).reshape(B, C, N - 1).transpose(1, 2)
        return torch.cat([tokens[:, :1], patches + self.scale * delta], dim=1)


class AdaptedBlock(nn.Module):
    """A frozen block followed by its adapter."""

    def __init__(self, block: nn.Module, adapter: BandAdapter):
        super().__init__()
        self.block, self.adapter = block, adapter

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.adapter(self.block(x))


def check_blocks(model: ViT, blocks) -> list[int]:
    depth = len(model.blocks)
    chosen = list(range(depth)) if blocks is None else [int(b) for b in blocks]
    bad = [b for b in chosen if not 0 <= b < depth]
    if bad or not chosen or len(set(chosen)) != len(chosen):
        raise LgframeError(f"adapter blocks {chosen}: the backbone has blocks 0..{depth - 1}; give distinct indices "
                           f"in that range (or null for all)")
    return chosen


def add_adapters(model: ViT, blocks=None, edges=(0.4, 0.75), kernels=(5, 3, 1), frequency: bool = True) -> list[nn.Parameter]:
    """Freeze `model` and put a BandAdapter after each of `blocks` (default all), in place.
    Returns the adapters' parameters."""
    c = model.config
    grid = c.image_size // c.patch_size
    chosen = check_blocks(model, blocks)
    check_edges(edges)
    check_kernels(kernels)
    model.requires_grad_(False)
    params = []
    for i in chosen:
        adapter = BandAdapter(c.width, grid, edges, kernels, frequency)
        model.blocks[i] = AdaptedBlock(model.blocks[i], adapter)
        params += list(adapter.parameters())
    return params


def add_lora(model: ViT, rank: int, alpha: float) -> list[nn.Parameter]:
    """peft LoRA on every block's attn.qkv and attn.proj; the base frozen. Returns the LoRA parameters."""
    from peft import LoraConfig, inject_adapter_in_model  # deferred: peft (imports transformers)

    if rank < 1:
        raise LgframeError(f"lora_rank={rank}; valid: an int >= 1")
    model.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=LORA_TARGETS), model)
    params = [p for n, p in model.named_parameters() if "lora_" in n]
    for p in params:
        p.requires_grad_(True)
    return params


def plain_vit(model: nn.Module) -> ViT:
    """A dense ViT: a constrained backbone is materialized first."""
    spec = attached_constraint(model)
    if spec is not None:
        model = get_constraint(spec.to_dict()).materialize(model)
    if not isinstance(model, ViT):
        raise LgframeError(f"few-shot adaptation needs an lgframe ViT backbone, got {type(model).__name__}")
    return model


# ------------------------------------------------------------------ one episode
class CosineHead(nn.Module):
    """logits = temperature * cos(feature, w_j); w starts at the support prototypes."""

    def __init__(self, prototypes: torch.Tensor, temperature: float):
        super().__init__()
        self.weight = nn.Parameter(prototypes.clone())
        self.temperature = temperature

    def forward(self, f: torch.Tensor) -> torch.Tensor:
        return self.temperature * F.normalize(f, dim=-1) @ F.normalize(self.weight, dim=-1).T


def prototypes(features: torch.Tensor, labels: torch.Tensor, ways: int) -> torch.Tensor:
    return torch.stack([features[labels == j].mean(0) for j in range(ways)])


@dataclass
class EpisodeResult:
    accuracy: float
    trainable: int  # parameters trained (the classifier included)
    seconds: float


def run_episode(backbone: ViT, ep: Episode, method: str, steps: int = 20, lr: float | None = None,
                blocks=None, edges=(0.4, 0.75), kernels=(5, 3, 1), lora_rank: int = 4, lora_alpha: float = 8.0,
                temperature: float = 10.0) -> EpisodeResult:
    """Adapt a copy of `backbone` to the episode's support set by `method`; query accuracy."""
    if method not in METHODS:
        raise LgframeError(f"unknown few-shot method {method!r}; valid: {', '.join(METHODS)}")
    t0 = time.perf_counter()
    torch.manual_seed(ep.seed)  # LoRA's A init: the same in every run of this episode
    model = copy.deepcopy(backbone).eval()
    ways = len(ep.classes)
    if method == "fad" or method == "spatial":
        params = add_adapters(model, blocks, edges, kernels, frequency=method == "fad")
    elif method == "lora":
        params = add_lora(model, lora_rank, lora_alpha)
    elif method == "full":
        params = list(model.parameters())
        model.requires_grad_(True)
    else:
        model.requires_grad_(False)
        params = []
    with torch.no_grad():
        support_f = model.forward_features(ep.support_x)
    head = CosineHead(prototypes(support_f, ep.support_y, ways), temperature)
    trainable = [] if method == "proto" else [*params, head.weight]
    if trainable and steps > 0:
        rate = METHOD_LR[method] if lr is None else lr
        opt = torch.optim.Adam(trainable, lr=rate)
        frozen = method == "linear"
        for _ in range(steps):
            f = support_f if frozen else model.forward_features(ep.support_x)
            loss = F.cross_entropy(head(f), ep.support_y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        pred = head(model.forward_features(ep.query_x)).argmax(-1)
    acc = float((pred == ep.query_y).float().mean())
    n = sum(p.numel() for p in trainable)
    return EpisodeResult(acc, n, time.perf_counter() - t0)


# ------------------------------------------------------------------ the recipe
@dataclass
class FewshotCfg:
    """`lgframe fewshot RECIPE`: one method over N-way K-shot episodes of each target domain."""

    method: str = "fad"  # fad | spatial | proto | linear | full | lora
    backbone: str = ""  # a ViT model file or checkpoint; "" pre-trains one with lgframe.fit (pretrain_*)
    pretrain_recipe: str = "vit_digits_pretrain"
    pretrain_overrides: list[str] = field(default_factory=lambda: ["model.name=ViT-Pico/2", "constraint=scratch"])
    targets: list[str] = field(default_factory=lambda: ["shapes", "animals"])
    ways: int = 5
    shots: int = 5
    queries: int = 15
    episodes: int = 100
    steps: int = 20  # adaptation steps per episode on the support set
    lr: float | None = None  # null: the method's default (METHOD_LR)
    blocks: list[int] | None = None  # fad / spatial: blocks followed by an adapter (null: all)
    edges: list[float] = field(default_factory=lambda: [0.4, 0.75])  # fad: band radii (0 DC, 1 the corner)
    kernels: list[int] = field(default_factory=lambda: [5, 3, 1])  # fad / spatial: low, mid, high branch
    lora_rank: int = 4
    lora_alpha: float = 8.0
    temperature: float = 10.0
    image_size: int = 8
    seed: int = 0  # episode draws: the same seed gives the same episodes for every method
    out: str = "runs/fewshot"


RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes" / "fewshot"


def load_cfg(recipe: str | None, overrides=(), schema=FewshotCfg, folder: Path = RECIPE_DIR, what: str = "fewshot"):
    """A `schema` object from an optional YAML recipe (a path or a shipped name in `folder`) and
    key=value overrides; unknown keys and wrong types fail naming the valid keys."""
    parts = [OmegaConf.structured(schema)]
    if recipe:
        p = Path(recipe)
        if not p.is_file():
            shipped = folder / f"{Path(recipe).stem}.yaml"
            if not shipped.is_file():
                names = ", ".join(sorted(f.stem for f in folder.glob("*.yaml")))
                raise LgframeError(f"{what} recipe '{recipe}' not found (a YAML file or a shipped name: {names})")
            p = shipped
        parts.append(OmegaConf.load(p))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise LgframeError(f"{what} override {bad[0]!r} must look like key=value")
    try:
        parts.append(OmegaConf.from_dotlist(list(overrides)))
        return OmegaConf.to_object(OmegaConf.merge(*parts))
    except OmegaConfBaseException as e:
        raise LgframeError(f"{what} recipe: {getattr(e, 'msg', e)}; valid keys: "
                           f"{', '.join(schema.__dataclass_fields__)}") from None


def check_cfg(c: FewshotCfg) -> None:
    if c.method not in METHODS:
        raise LgframeError(f"method={c.method!r}; valid: {', '.join(METHODS)}")
    bad = [t for t in c.targets if t not in DOMAINS]
    if bad or not c.targets:
        raise LgframeError(f"targets={c.targets}: valid domains: {', '.join(DOMAINS)} (at least one)")
    for k in ("episodes", "image_size"):
        if getattr(c, k) < 1:
            raise LgframeError(f"{k}={getattr(c, k)} must be >= 1")
    if c.steps < 0:
        raise LgframeError(f"steps={c.steps} must be >= 0")
    if c.lr is not None and not (math.isfinite(c.lr) and c.lr > 0):
        raise LgframeError(f"lr={c.lr} must be a finite number > 0 (or null for the method's default)")
    check_edges(c.edges)
    check_kernels(c.kernels)


def pretrained_backbone(c: FewshotCfg, out_dir: Path) -> tuple[ViT, str]:
    """The recipe's backbone: the given file, or a brief lgframe.fit of `pretrain_recipe`."""
    if c.backbone:
        return plain_vit(read_model(c.backbone)[0]), c.backbone
    from lgframe.training.recipes import load_recipe  # deferred: the training layer's recipe schema
    from lgframe.training.stages import fit  # deferred: Lightning

    cfg = load_recipe(c.pretrain_recipe, [*c.pretrain_overrides, f"out_dir={out_dir}", "trainer.progress=false"])
    res = fit(cfg, extract_learngene=False)
    return plain_vit(read_model(res.checkpoint)[0]), str(res.checkpoint)


def evaluate_method(backbone: ViT, c: FewshotCfg, method: str | None = None, progress=None) -> dict:
    """Accuracy of one method over `c.episodes` episodes of each target: {target: summary}."""
    method = method or c.method
    out = {}
    for target in c.targets:
        domain = load_domain(target, c.image_size)
        accs, secs, n = [], 0.0, 0
        for ep in episodes(domain, c.ways, c.shots, c.queries, c.episodes, c.seed):
            r = run_episode(backbone, ep, method, c.steps, c.lr, c.blocks, c.edges, c.kernels, c.lora_rank,
                            c.lora_alpha, c.temperature)
            accs.append(r.accuracy)
            secs += r.seconds
            n = r.trainable
        out[target] = {**mean_interval(accs), "accuracies": accs, "trainable": n, "seconds": secs}
        if progress:
            progress(f"{method} on {target}: {out[target]['mean']:.3f} [{out[target]['low']:.3f}, "
                     f"{out[target]['high']:.3f}] over {len(accs)} episodes")
    return out


def run_fewshot(c: FewshotCfg, progress=print) -> dict:
    """`lgframe fewshot RECIPE`: writes out/results.json and returns it."""
    check_cfg(c)
    for target in c.targets:  # a setting the data cannot supply fails before any training
        check_episode_settings(load_domain(target, c.image_size), c.ways, c.shots, c.queries)
    out = Path(c.out)
    backbone, source = pretrained_backbone(c, out / "backbone")
    if backbone.config.image_size != c.image_size or backbone.config.in_channels != 1:
        raise LgframeError(f"the backbone takes {backbone.config.in_channels}x{backbone.config.image_size}^2 images; "
                           f"the few-shot domains are 1x{c.image_size}^2 (set image_size or use another backbone)")
    res = evaluate_method(backbone, c, progress=progress)
    result = {"config": OmegaConf.to_container(OmegaConf.structured(c)), "backbone": source,
              "results": {t: {k: v for k, v in r.items()} for t, r in res.items()}}
    write_json(out / "results.json", result)
    return result
