"""Creative generation with learned tokens on a frozen class-conditional DiT:
DisTok (distribution-conditional generation) and a CreTok-style creative token.

Sources: the DisTok and CreTok abstracts (shared/seeds). Neither paper's code or
full text was read; what follows is lgframe's reading of the abstracts, stated so
that someone who knows the papers can check it.

**The translation.** The text-to-image model is the class-conditional DiT; a
*token* is a vector in its class-embedding space (the DiT takes one in place of a
class index, `LabelEmbedder`; a class is its table row E_k); the vision-language
model that reads an image's class distribution is the data set's feature
classifier (`lgframe.training.metrics.feature_classifier`, softmax of its logits).
The DiT and the classifier stay frozen; only the new modules train.

**DisTok.** "An encoder-decoder framework that maps class distributions into a
latent space and decodes them into tokens": an encoder p (K classes) -> (mu,
log var) of a latent z (`latent` dims) and a decoder z -> token, both MLPs; the
token is centre + scale * decoder(z), centre and scale the mean and spread of the
class rows, so the decoder works at unit scale. Losses, each a reading:
- reconstruction: a one-hot p decodes (from its mean latent, and with weight 0.1
  from a reparametrized z) to its class's own row, MSE in units of the rows'
  spread, plus a small KL of q(z|p) to N(0, I) (`prior_weight`), so latents
  drawn from the prior decode to usable tokens;
- anchor (lgframe's addition): during the first `warmup` steps, which render
  nothing, fused targets also decode to the mixture of their rows sum_k p_k E_k,
  so DisTok starts from the mixture baseline and the alignment refines it;
  `anchor_weight` (1 by default) keeps that pull afterwards, a trust region
  against the noisy alignment gradient. Without it (measured on digits, 150
  steps) DisTok's tokens were read far worse than the mixture's (held-out KL
  of the mean 2.2-4.2 against 0.4-0.9);
- "tokens rendered into images whose class distributions supervise the
  alignment": a target p from the concept pool is encoded (mu), decoded,
  *rendered* `renders` times (different noise) with the frozen DiT under
  classifier-free guidance, and the distribution the classifier reads from the
  token's images must match p. `align: mean` (default): KL(p || mean_i q_i), the
  token's images read as p on average; `align: image`: mean_i KL(p || q_i), each
  image read as p (one image that is the fused concept, the stricter reading of
  DisTok). Measured on digits (Pico base, 150 steps, 4-step DDIM render): the
  per-image KL stayed at 8-10 nats and did not fall (the classifier is
  confident on nearly every image, so a soft per-image target is out of reach
  and its gradient is noise), so `mean` is the default;
- "latent vectors sampled from a Gaussian prior are decoded into tokens and
  rendered": z ~ N(0, I) -> token -> image -> q (no gradient), and the encoder
  must map q back to z (MSE, `cycle_weight`): the encoder learns which latent
  produces an image read as q, covering distributions nobody wrote down;
- the "dynamic concept pool ... iteratively sampling and fusing concept pairs":
  the pool starts with the K one-hot classes; each step draws pairs of pool
  entries (and, after `triples_from` of the steps, also triples) with random
  mixing weights (uniform 0.15-0.85 for a pair, Dirichlet(1, 1, 1) for a triple),
  fuses them in distribution space (the weighted mean, components under 0.03
  dropped), and a fused target whose alignment KL is under `accept_kl` joins the
  pool ("the resulting tokens are added to the concept pool"), so later fusions
  start from it and reach mixtures of more classes. The pool holds distributions;
  their tokens are re-decoded each step, so an entry never holds a stale token.
- Held-out supports: no target whose support (components > 0.05) contains a
  held-out class pair (`heldout_pairs`) is ever trained on; the benchmark's
  held-out distributions are 2- and 3-class mixtures over those pairs, at
  weights (0.5/0.5, 0.3/0.7, 0.4/0.3/0.3) never trained on together.

**Rendering** (`render`), two ways, both with CFG at `guidance`: `ddim` a short
differentiable DDIM chain of `render_steps` steps from noise (t from T-1 to 0,
the predicted x0 clipped as the sampler does), gradients through every step;
`x0` the same chain without gradients, the result re-noised to a t drawn from
`render_t` and one guided forward with gradients, whose predicted x0 is what
the classifier reads (one backward through one forward). The benchmark measures
which aligns better per second of training.

**Creative token (CreTok-style).** CreTok "redefines 'creative' as a new token"
trained over many concept pairs so that it works "across diverse concepts without
additional training". Here: one shared learned vector t_c; the DiT is conditioned
on the sequence (E_A, E_B, t_c), summed (so t_c acts as a learned shared offset
from the plain sum E_A + E_B, where it starts). It is trained over the training
pairs (every class pair but the held-out ones) so that the classifier reads the
pair's images as half A, half B (the alignment KL to the 50/50 target, `align`
as for DisTok: mass on both, little elsewhere), and tested on the held-out pairs
with no per-pair training. Realism
is measured (FID against real images of A and B), not trained. CreTok's own
objective (matching text embeddings of adaptive and restrictive prompts) has no
text encoder to act on here; rendering-and-reading is the stand-in.

**Baselines**, in the same run at the same noise: the mixture of class
embeddings sum_k p_k E_k; guidance mixing, eps = eps_u + g sum_k p_k (eps_k -
eps_u) (one forward per class in the support); for the creative token, the plain
sum E_A + E_B (and the mean 0.5 E_A + 0.5 E_B).

**Bad input.** A distribution is "id:weight,..." over the base's classes:
negative weights, unknown or repeated ids, or no positive mass are refused with
the valid range named; weights that do not sum to 1 are *normalized with a
warning* that gives the sum. A base that is not an lgframe DiT, a kind base (its
class gate needs class indices), and a base trained without a null class
(recipe `diffusion.label_dropout` 0 or a self-supervised objective) are refused.

The training loop is plain PyTorch on one device (AdamW, no Lightning trainer):
two small MLPs or one vector against a frozen DiT, nothing to distribute.
"""

from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from lgframe.apps.report import save_figure
from lgframe.data.datamodule import ImageDataModule
from lgframe.errors import LgframeError
from lgframe.formats.files import atomic_path, read_safetensors, save_tensors, write_json
from lgframe.models.dit import DiT
from lgframe.models.files import read_model, save_model
from lgframe.training.metrics import FEATURE_DATA, digits_fid, feature_classifier
from lgframe.training.recipes import load_recipe
from lgframe.training.tasks import SAMPLERS, DiffusionTask

log = logging.getLogger("lgframe")
RENDERS = ("ddim", "x0")
ALIGNS = ("mean", "image")
CREATIVE_FORMAT = "lgframe-creative/1"
METHODS = ("distok", "mixture", "guidance_mix")  # distribution-conditional methods
PAIR_METHODS = ("cretok", "sum", "mean")  # pair methods (creative token and its baselines)


# ------------------------------------------------------------------ recipe
@dataclass
class CreativeCfg:
    """`lgframe creative train`: DisTok and the creative token on a frozen DiT (see the module docstring)."""

    base: Optional[str] = None  # noqa: UP045 (OmegaConf reads it at run time); a DiT file or checkpoint; null: pre-train
    base_recipe: str = "dit_digits_pretrain"  # how to pre-train it when base is null
    base_overrides: list[str] = field(default_factory=lambda: ["model.name=DiT-Pico/2", "trainer.max_steps=1500"])
    out_dir: str = "runs"
    name: str = "creative"
    seed: int = 0
    guidance: float = 3.0  # CFG scale for rendering and sampling
    sample_steps: int = 50  # sampler steps for the final samples (the base recipe's scheduler)
    render: str = "ddim"  # ddim | x0 (see Rendering)
    render_steps: int = 4
    render_t: list[int] = field(default_factory=lambda: [200, 600])  # x0 render: range of the re-noising t
    heldout_pairs: list[list[int]] = field(default_factory=lambda: [[0, 6], [1, 7], [2, 5], [3, 8], [4, 9]])
    # DisTok
    align: str = "mean"  # mean: KL(p || mean of its images' q) | image: mean over images of KL(p || q_i)
    renders: int = 4  # images rendered per target and step (different noise)
    steps: int = 400
    batch: int = 8  # fused targets per step
    prior_batch: int = 16  # latents from the prior per step
    lr: float = 5.0e-4
    latent: int = 16
    hidden: int = 128
    warmup: int = 300  # steps of reconstruction and anchor only (no rendering) first
    anchor_weight: float = 1.0  # after the warmup: weight of the anchor (fused p -> sum_k p_k E_k)
    recon_weight: float = 1.0
    prior_weight: float = 1.0e-3
    cycle_weight: float = 0.1
    accept_kl: float = 0.5  # a fused target whose alignment KL is under this joins the pool
    pool_size: int = 512
    triples_from: float = 0.5  # fraction of the steps after which fusion also draws triples
    eval_every: int = 25  # alignment KL on fixed targets (the training curve)
    # creative token
    cretok_steps: int = 100
    cretok_batch: int = 8  # pairs per step (each rendered `renders` times)
    cretok_lr: float = 2.0e-2
    samples: int = 16  # samples per target in the run's report grid


def check_cfg(c: CreativeCfg) -> None:
    if c.align not in ALIGNS:
        raise LgframeError(f"creative: align={c.align!r}; valid: {', '.join(ALIGNS)}")
    if c.render not in RENDERS:
        raise LgframeError(f"creative: render={c.render!r}; valid: {', '.join(RENDERS)}")
    for k in ("render_steps", "renders", "batch", "latent", "hidden", "pool_size", "eval_every", "cretok_batch", "sample_steps"):
        if getattr(c, k) < 1:
            raise LgframeError(f"creative: {k}={getattr(c, k)} must be an integer >= 1")
    for k in ("steps", "warmup", "cretok_steps", "prior_batch", "samples"):
        if getattr(c, k) < 0:
            raise LgframeError(f"creative: {k}={getattr(c, k)} must be an integer >= 0")
    if not (math.isfinite(c.anchor_weight) and c.anchor_weight >= 0):
        raise LgframeError(f"creative: anchor_weight={c.anchor_weight} must be a finite number >= 0")
    for k in ("lr", "cretok_lr", "guidance"):
        if not (math.isfinite(getattr(c, k)) and getattr(c, k) > 0):
            raise LgframeError(f"creative: {k}={getattr(c, k)} must be a finite number > 0")
    if not 0 <= c.triples_from <= 1:
        raise LgframeError(f"creative: triples_from={c.triples_from} must be a fraction in [0, 1]")
    if len(c.render_t) != 2 or not 0 <= c.render_t[0] <= c.render_t[1]:
        raise LgframeError(f"creative: render_t={c.render_t} must be [low, high] timesteps, 0 <= low <= high")
    for pair in c.heldout_pairs:
        if len(pair) != 2 or pair[0] == pair[1]:
            raise LgframeError(f"creative: heldout_pairs entry {pair} must be two different class ids")


def load_cfg(recipe: str | dict | None = None, overrides: list[str] | None = None) -> CreativeCfg:
    """A CreativeCfg from an optional YAML recipe (a path or a shipped name such as
    creative_digits) or mapping, and key=value overrides (unknown keys fail)."""
    try:
        parts = [OmegaConf.structured(CreativeCfg)]
        if isinstance(recipe, dict):
            parts.append(OmegaConf.create(recipe))
        elif recipe:
            p = Path(recipe)
            if not p.is_file():
                p = Path(__file__).resolve().parents[1] / "recipes" / "creative" / f"{Path(recipe).stem}.yaml"
                if not p.is_file():
                    raise LgframeError(f"creative recipe '{recipe}' not found (a YAML file or a shipped name such "
                                       "as creative_digits)")
            parts.append(OmegaConf.load(p))
        parts.append(OmegaConf.from_dotlist(list(overrides or [])))
        cfg = OmegaConf.to_object(OmegaConf.merge(*parts))
    except OmegaConfBaseException as e:
        raise LgframeError(f"creative recipe: {e.msg if hasattr(e, 'msg') else e}; valid keys: "
                           f"{', '.join(CreativeCfg.__dataclass_fields__)}") from None
    check_cfg(cfg)
    return cfg


# ------------------------------------------------------------------ distributions
def parse_dist(text: str | dict, num_classes: int) -> torch.Tensor:
    """'3:0.5,8:0.5' (or {3: 0.5, 8: 0.5}) -> a distribution (K,). Refuses negative
    weights, unknown or repeated ids and no positive mass; normalizes (with a warning)
    weights that do not sum to 1."""
    valid = f"class ids are 0..{num_classes - 1}"
    items: list[tuple[str, str]] = []
    if isinstance(text, dict):
        items = [(str(k), str(v)) for k, v in text.items()]
    else:
        for part in [s for s in str(text).replace(" ", "").split(",") if s]:
            if part.count(":") != 1:
                raise LgframeError(f"distribution entry '{part}' in '{text}': write id:weight pairs, e.g. '3:0.5,8:0.5' "
                                   f"({valid})")
            items.append(tuple(part.split(":")))  # type: ignore[arg-type]
    if not items:
        raise LgframeError(f"empty distribution '{text}': write id:weight pairs, e.g. '3:0.5,8:0.5' ({valid})")
    p = torch.zeros(num_classes, dtype=torch.float64)
    seen = set()
    for k, w in items:
        try:
            cls, weight = int(k), float(w)
        except ValueError:
            raise LgframeError(f"distribution entry '{k}:{w}': the id must be an integer and the weight a number "
                               f"({valid})") from None
        if not 0 <= cls < num_classes:
            raise LgframeError(f"distribution: unknown class id {cls}; {valid}")
        if cls in seen:
            raise LgframeError(f"distribution: class id {cls} appears twice; give each class once")
        if not math.isfinite(weight) or weight < 0:
            raise LgframeError(f"distribution: class {cls} has weight {weight}; weights must be finite and >= 0")
        seen.add(cls)
        p[cls] = weight
    total = float(p.sum())
    if total <= 0:
        raise LgframeError(f"distribution '{text}' has no positive weight; at least one class needs weight > 0")
    if abs(total - 1) > 1e-6:
        warnings.warn(f"distribution '{text}' sums to {total:g}, not 1: normalized to sum 1", stacklevel=2)
    return (p / total).float()


def format_dist(p: torch.Tensor) -> str:
    return ",".join(f"{k}:{float(p[k]):.2g}" for k in torch.nonzero(p > 1e-6).flatten().tolist())


def kl_div(p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) over the last axis, 0 log 0 = 0; p (..., K), log q (..., K)."""
    return torch.where(p > 0, p * (torch.log(p.clamp_min(1e-12)) - log_q), torch.zeros_like(p)).sum(-1)


def align_kl(p: torch.Tensor, log_q: torch.Tensor, renders: int, how: str = "mean") -> torch.Tensor:
    """Per target (B,): p (B, K) against the log class probabilities of its `renders` images, rows
    (B * renders, K) grouped by target. `mean`: KL(p || mean_i q_i), the distribution the token's
    images are read as; `image`: mean_i KL(p || q_i), each image must be read as p."""
    if how == "image":
        return kl_div(p.repeat_interleave(renders, 0), log_q).view(-1, renders).mean(1)
    mean_q = log_q.exp().view(p.shape[0], renders, -1).mean(1)
    return kl_div(p, mean_q.clamp_min(1e-12).log())


def has_heldout(p: torch.Tensor, heldout: list[list[int]], eps: float = 0.05) -> torch.Tensor:
    """(N,) bool: the support of each row of p (N, K) contains a held-out pair."""
    out = torch.zeros(p.shape[0], dtype=torch.bool)
    for a, b in heldout:
        out |= (p[:, a] > eps) & (p[:, b] > eps)
    return out


def heldout_targets(heldout: list[list[int]], num_classes: int, full: bool = True) -> list[torch.Tensor]:
    """The held-out distributions: per held-out pair (a, b) the mixtures 0.5/0.5 and 0.3/0.7,
    and a triple (a, b, c) at 0.4/0.3/0.3 with c the next class not in the pair."""
    out = []
    for a, b in heldout:
        for wa in ((0.5, 0.3) if full else (0.5,)):
            p = torch.zeros(num_classes)
            p[a], p[b] = wa, 1 - wa
            out.append(p)
        if full:
            c = next(k for k in range((b + 1) % num_classes, b + 1 + num_classes) if k % num_classes not in (a, b))
            p = torch.zeros(num_classes)
            p[a], p[b], p[c % num_classes] = 0.4, 0.3, 0.3
            out.append(p)
    return out


def train_pairs(heldout: list[list[int]], num_classes: int) -> list[tuple[int, int]]:
    held = {tuple(sorted(p)) for p in heldout}
    return [(a, b) for a in range(num_classes) for b in range(a + 1, num_classes) if (a, b) not in held]


# ------------------------------------------------------------------ the frozen base
@dataclass
class Base:
    """The frozen DiT, its diffusion task (scheduler, sampling settings), the classifier and its data."""

    model: DiT
    task: DiffusionTask
    classifier: nn.Module
    data: str
    path: str | None = None

    @property
    def num_classes(self) -> int:
        return self.model.config.num_classes

    @property
    def table(self) -> torch.Tensor:
        """(K + 1, D): the class rows and, last, the null class."""
        return self.model.y_embedder.embedding_table.weight.detach()

    def tokens(self, y: torch.Tensor) -> torch.Tensor:
        return self.model.y_embedder.token(y).detach()


def check_base(model: nn.Module, meta: dict, where: str) -> None:
    if not isinstance(model, DiT):
        raise LgframeError(f"'{where}' holds a {type(model).__name__} ({meta.get('model', {}).get('family', '?')}); "
                           "creative generation needs an lgframe DiT (a class-conditional diffusion checkpoint or "
                           "model file, e.g. a run of recipes/dit_digits_pretrain.yaml)")
    if (meta.get("constraint") or {}).get("name") == "kind":
        raise LgframeError(f"'{where}' is a kind model: its class gate picks tailors by class index, so it cannot "
                           "be conditioned on a token; materialize it first (`lgframe export`) or use another base")
    recipe = meta.get("recipe") or {}
    dropout = (recipe.get("diffusion") or {}).get("label_dropout")
    if recipe.get("objective") == "self_supervised" or dropout == 0:
        raise LgframeError(f"'{where}' was trained without a null class (objective={recipe.get('objective')!r}, "
                           f"diffusion.label_dropout={dropout}): classifier-free guidance and every method here need "
                           "it; train the base with diffusion.label_dropout > 0 (the default 0.1)")
    if not recipe:
        log.warning("%s carries no recipe: whether its null class was trained cannot be checked", where)


def load_base(path: str | Path | None = None, model: DiT | None = None, recipe: dict | None = None) -> Base:
    """The frozen base from a file (model file, folder, checkpoint), or an in-memory DiT with its recipe."""
    if model is None:
        if path is None:
            raise LgframeError("creative: no base DiT given (base: a checkpoint or model file)")
        try:
            model, meta = read_model(path)
        except LgframeError as e:
            raise LgframeError(f"creative base '{path}' could not be read as an lgframe DiT: {e}") from None
        check_base(model, meta, str(path))
        recipe = meta.get("recipe")
    else:
        check_base(model, {"recipe": recipe or {}}, "the base model")
    cfg = load_recipe(recipe or {}, ["teacher=null"])  # the scheduler and sampling settings; never a teacher
    task = DiffusionTask(cfg, model)
    data = cfg.data.name
    if data not in FEATURE_DATA:
        raise LgframeError(f"creative: the base was trained on '{data}'; a class reader (feature classifier) exists "
                           f"for {', '.join(FEATURE_DATA)}")
    model.eval().requires_grad_(False)
    classifier = feature_classifier(data, model.config.image_size).eval().requires_grad_(False)
    return Base(model, task, classifier, data, None if path is None else str(path))


def pretrain_base(c: CreativeCfg, run_dir: Path) -> Base:
    from lgframe.training.stages import fit  # deferred: a run only when no base is given

    cfg = load_recipe(c.base_recipe, [*c.base_overrides, f"out_dir={run_dir}", "name=base", f"seed={c.seed}"])
    res = fit(cfg, extract_learngene=False)
    return load_base(res.checkpoint)


def real_images(base: Base, classes: list[int]) -> torch.Tensor:
    """The training images of `classes` (N, C, S, S) in [-1, 1]: FID's reference set."""
    dm = ImageDataModule(base.data, seed=0, image_size=base.model.config.image_size)
    dm.setup()
    x, y = dm.train_set.tensors
    return x[torch.isin(y, torch.tensor(classes))]


# ------------------------------------------------------------------ conditioning and rendering
def guided_eps(model: DiT, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, null: torch.Tensor,
               guidance: float) -> torch.Tensor:
    """CFG with token conditioning: eps(x, null) + g (eps(x, cond) - eps(x, null)); cond (B, D) or (B, S, D)."""
    C = x.shape[1]
    if cond.dim() == 3:
        cond = cond.sum(1)
    if guidance == 1.0:
        return model(x, t, cond)[:, :C]
    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([cond, null.expand_as(cond)]))[:, :C]
    c, u = both.chunk(2)
    return u + guidance * (c - u)


def mixed_eps(model: DiT, x: torch.Tensor, t: torch.Tensor, p: torch.Tensor, table: torch.Tensor,
              guidance: float) -> torch.Tensor:
    """Guidance mixing: eps_u + g sum_k p_k (eps(x, E_k) - eps_u), one forward per class in the support of
    p (B, K) (the union over the batch) and one unconditional."""
    C, B = x.shape[1], x.shape[0]
    support = torch.nonzero(p.sum(0) > 0).flatten().tolist()
    conds = [table[-1].expand(B, -1)] + [table[k].expand(B, -1) for k in support]
    out = model(x.repeat(len(conds), 1, 1, 1), t.repeat(len(conds)), torch.cat(conds))[:, :C].chunk(len(conds))
    u = out[0]
    return u + guidance * sum(p[:, k, None, None, None] * (e - u) for k, e in zip(support, out[1:]))


def _alphas(base: Base) -> torch.Tensor:
    return base.task.noise_scheduler.alphas_cumprod.float()


def render(base: Base, tokens: torch.Tensor, noise: torch.Tensor, guidance: float, steps: int, how: str = "ddim",
           t_range: tuple[int, int] = (200, 600), generator: torch.Generator | None = None) -> torch.Tensor:
    """Differentiable images x0 (B, C, S, S) of `tokens` (B, D) from `noise` (B, C, S, S): a DDIM chain of
    `steps` steps under CFG, gradients through all of it (`ddim`), or through one re-noised
    x0 prediction at the end (`x0`; see the module docstring)."""
    model, a = base.model, _alphas(base)
    T = len(a)
    null = base.table[-1]
    clip = base.task.noise_scheduler.config.clip_sample_range

    def chain(x):
        ts = torch.linspace(T - 1, 0, steps).round().long()
        for i, t in enumerate(ts.tolist()):
            at = a[t]
            tt = torch.full((x.shape[0],), t, dtype=torch.long)
            eps = guided_eps(model, x, tt, tokens, null, guidance)
            x0 = ((x - (1 - at).sqrt() * eps) / at.sqrt()).clamp(-clip, clip)
            if i == steps - 1:
                return x0
            ap = a[ts[i + 1]]
            eps = (x - at.sqrt() * x0) / (1 - at).sqrt()
            x = ap.sqrt() * x0 + (1 - ap).sqrt() * eps
        return x

    if how == "ddim":
        return chain(noise)
    with torch.no_grad():
        x0 = chain(noise)
    lo, hi = t_range
    t = torch.randint(lo, hi + 1, (x0.shape[0],), generator=generator)
    e = torch.randn(x0.shape, generator=generator)
    at = a[t].view(-1, 1, 1, 1)
    xt = at.sqrt() * x0 + (1 - at).sqrt() * e
    eps = guided_eps(model, xt, t, tokens, null, guidance)
    return ((xt - (1 - at).sqrt() * eps) / at.sqrt()).clamp(-clip, clip)


@torch.no_grad()
def sample_with(base: Base, eps_fn, n: int, seed: int, steps: int | None = None, scheduler: str | None = None) -> torch.Tensor:
    """n images under `eps_fn(x, t) -> eps` (a batch of n), with DiffusionTask.sample's noise protocol
    (the same seed gives the same initial and per-step noise), so every method sees the same noise."""
    task = base.task
    s = task.recipe["sample"]
    kind, steps = scheduler or s["scheduler"], steps or s["steps"]
    if kind not in SAMPLERS:
        raise LgframeError(f"sample scheduler {kind!r}; valid: {', '.join(SAMPLERS)}")
    cfg = base.model.config
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, cfg.in_channels, cfg.image_size, cfg.image_size), generator=g)
    per_sample = [torch.Generator().manual_seed(seed * 1_000_003 + 1 + i) for i in range(n)]
    sched = SAMPLERS[kind].from_config(task.noise_scheduler.config, timestep_spacing=s.get("spacing", "leading"))
    sched.set_timesteps(steps)
    extra = {"use_clipped_model_output": True} if kind == "ddim" and sched.config.clip_sample else {}
    for t in sched.timesteps:
        tt = torch.full((n,), int(t))
        eps = eps_fn(x, tt)
        x = sched.step(eps, t, x, generator=per_sample, **extra).prev_sample if kind != "dpm" else sched.step(eps, t, x).prev_sample
    c = task.noise_scheduler.config
    return x.clamp(-c.clip_sample_range, c.clip_sample_range) if c.clip_sample else x


# ------------------------------------------------------------------ DisTok
def _mlp(i: int, h: int, o: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(i, h), nn.SiLU(), nn.Linear(h, h), nn.SiLU(), nn.Linear(h, o))


class DisTok(nn.Module):
    """Encoder p (B, K) -> (mu, log var) (B, latent); decoder z (B, latent) -> token (B, D)
    = centre + scale * mlp(z), centre/scale the mean and spread of the class rows."""

    def __init__(self, num_classes: int, width: int, latent: int = 16, hidden: int = 128,
                 centre: torch.Tensor | None = None, scale: float = 1.0):
        super().__init__()
        self.num_classes, self.width, self.latent, self.hidden = num_classes, width, latent, hidden
        self.encoder = _mlp(num_classes, hidden, 2 * latent)
        self.decoder = _mlp(latent, hidden, width)
        self.register_buffer("centre", torch.zeros(width) if centre is None else centre.detach().clone())
        self.register_buffer("scale", torch.tensor(float(scale)))

    def encode(self, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.encoder(p).chunk(2, dim=-1)
        return mu, logvar.clamp(-8, 4)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.centre + self.scale * self.decoder(z)

    def forward(self, p: torch.Tensor) -> torch.Tensor:
        """The token of distribution p (B, K): the decoded mean latent."""
        return self.decode(self.encode(p)[0])


class ConceptPool:
    """Distributions (N, K): the K classes first (never replaced), then accepted fused targets."""

    def __init__(self, num_classes: int, size: int, heldout: list[list[int]]):
        self.p = torch.eye(num_classes)
        self.K, self.size, self.heldout = num_classes, size, heldout
        self.accepted = 0

    def fuse(self, n: int, g: torch.Generator, triples: bool = False) -> torch.Tensor:
        """n fused targets (n, K) from pairs (and, with `triples`, half of them from triples) of
        pool entries, none whose support holds a held-out pair."""
        out = []
        for _ in range(50):
            m = 2 * n
            idx = torch.randint(0, len(self.p), (m, 3), generator=g)
            w = torch.rand(m, 1, generator=g) * 0.7 + 0.15
            fused = w * self.p[idx[:, 0]] + (1 - w) * self.p[idx[:, 1]]
            if triples:
                d = torch._standard_gamma(torch.ones(m, 3), generator=g)
                d = d / d.sum(1, keepdim=True)
                tri = (d[:, :, None] * self.p[idx]).sum(1)
                fused = torch.where((torch.arange(m) % 2 == 0)[:, None], tri, fused)
            fused = torch.where(fused < 0.03, torch.zeros_like(fused), fused)
            fused = fused / fused.sum(1, keepdim=True)
            out.append(fused[~has_heldout(fused, self.heldout)])
            if sum(len(o) for o in out) >= n:
                break
        got = torch.cat(out)
        if len(got) < n:
            raise LgframeError("creative: the held-out pairs leave too few class pairs to fuse; hold out fewer")
        return got[:n]

    def add(self, p: torch.Tensor, g: torch.Generator) -> None:
        for row in p:
            if len(self.p) < self.K + self.size:
                self.p = torch.cat([self.p, row[None]])
            else:  # full: replace a random fused entry, never a class
                self.p[self.K + int(torch.randint(0, self.size, (1,), generator=g))] = row
            self.accepted += 1


def class_log_probs(base: Base, images: torch.Tensor) -> torch.Tensor:
    return F.log_softmax(base.classifier(images), dim=-1)


def alignment_kl(base: Base, distok: DisTok, targets: torch.Tensor, c: CreativeCfg, seed: int,
                 per_target: int = 8) -> float:
    """Mean alignment KL (`c.align`) of `targets` (N, K), each rendered `per_target` times with fixed
    noise, no gradients: the curve that shows the alignment learning."""
    g = torch.Generator().manual_seed(seed)
    p = targets.repeat_interleave(per_target, 0)
    cfg = base.model.config
    noise = torch.randn((len(p), cfg.in_channels, cfg.image_size, cfg.image_size), generator=g)
    with torch.no_grad():
        imgs = render(base, distok(p), noise, c.guidance, c.render_steps, c.render, tuple(c.render_t), g)
        return float(align_kl(targets, class_log_probs(base, imgs), per_target, c.align).mean())


@dataclass
class DisTokResult:
    distok: DisTok
    curve: list = field(default_factory=list)  # (step, train-target KL, held-out KL)
    recon: list = field(default_factory=list)  # (step, one-hot reconstruction MSE in units of the rows' spread)
    pool_size: int = 0
    accepted: int = 0
    seconds: float = 0.0


def train_distok(base: Base, c: CreativeCfg, seed: int | None = None, progress: bool = False) -> DisTokResult:
    """Train the encoder and decoder against the frozen base (see the module docstring)."""
    seed = c.seed if seed is None else seed
    K, D = base.num_classes, base.model.config.width
    check_heldout(c.heldout_pairs, K)
    rows = base.table[:K]
    torch.manual_seed(seed)
    distok = DisTok(K, D, c.latent, c.hidden, rows.mean(0), float((rows - rows.mean(0)).std()))
    opt = torch.optim.AdamW(distok.parameters(), lr=c.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed + 1)
    pool = ConceptPool(K, c.pool_size, c.heldout_pairs)
    onehot = torch.eye(K)
    cfg = base.model.config
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    monitor_train = ConceptPool(K, 1, c.heldout_pairs).fuse(8, torch.Generator().manual_seed(12345))
    monitor_held = torch.stack(heldout_targets(c.heldout_pairs, K, full=False))
    res = DisTokResult(distok)
    start = time.perf_counter()

    def record(step):
        res.curve.append((step, alignment_kl(base, distok, monitor_train, c, 777),
                          alignment_kl(base, distok, monitor_held, c, 778)))

    for step in range(c.steps):
        if step % c.eval_every == 0 and step >= c.warmup:
            record(step)
        mu, logvar = distok.encode(onehot)
        z = mu + (0.5 * logvar).exp() * torch.randn(mu.shape, generator=g)
        rec = ((distok.decode(mu) - rows) ** 2).mean() / distok.scale ** 2  # the token DisTok gives a class
        rec_z = ((distok.decode(z) - rows) ** 2).mean() / distok.scale ** 2  # and its neighbourhood (VAE)
        prior = 0.5 * (mu ** 2 + logvar.exp() - 1 - logvar).sum(1).mean()
        loss = c.recon_weight * (rec + 0.1 * rec_z) + c.prior_weight * prior
        anchor_w = 1.0 if step < c.warmup else c.anchor_weight
        if anchor_w > 0:  # fused targets decode to the mixture of their rows: DisTok starts at the mixture baseline
            fused = pool.fuse(c.batch, g, triples=True)
            loss = loss + anchor_w * ((distok(fused) - fused @ rows) ** 2).mean() / distok.scale ** 2
        if step >= c.warmup:
            targets = pool.fuse(c.batch, g, triples=step >= c.warmup + c.triples_from * (c.steps - c.warmup))
            imgs = render(base, distok(targets).repeat_interleave(c.renders, 0),
                          torch.randn((c.batch * c.renders, *shape), generator=g), c.guidance,
                          c.render_steps, c.render, tuple(c.render_t), g)
            kl = align_kl(targets, class_log_probs(base, imgs), c.renders, c.align)
            loss = loss + kl.mean()
            if c.prior_batch:
                zp = torch.randn((c.prior_batch, c.latent), generator=g)
                with torch.no_grad():
                    ip = render(base, distok.decode(zp), torch.randn((c.prior_batch, *shape), generator=g),
                                c.guidance, c.render_steps, "ddim")
                    q = class_log_probs(base, ip).exp()
                loss = loss + c.cycle_weight * F.mse_loss(distok.encode(q)[0], zp)
            pool.add(targets[kl.detach() < c.accept_kl], g)
        opt.zero_grad()
        loss.backward()
        opt.step()
        res.recon.append((step, rec.item()))
        if progress and step % 50 == 0:
            log.info("distok step %d: recon %.4f, pool %d", step, rec.item(), len(pool.p))
    if c.steps >= c.warmup:
        record(c.steps)
    res.seconds = time.perf_counter() - start
    res.pool_size, res.accepted = len(pool.p), pool.accepted
    distok.eval()
    return res


def check_heldout(heldout: list[list[int]], num_classes: int) -> None:
    for a, b in heldout:
        for k in (a, b):
            if not 0 <= k < num_classes:
                raise LgframeError(f"creative: heldout_pairs names class {k}; the base's class ids are 0..{num_classes - 1}")


# ------------------------------------------------------------------ the creative token
class CreativeToken(nn.Module):
    """One shared learned vector t_c (D,): the condition of a pair (A, B) is the sequence
    (E_A, E_B, t_c), summed by the DiT. Starts at zero (the plain sum)."""

    def __init__(self, width: int):
        super().__init__()
        self.token = nn.Parameter(torch.zeros(width))

    def condition(self, rows_a: torch.Tensor, rows_b: torch.Tensor) -> torch.Tensor:
        """(B, D), (B, D) -> (B, 3, D)."""
        return torch.stack([rows_a, rows_b, self.token.expand_as(rows_a)], 1)


@dataclass
class CreTokResult:
    cretok: CreativeToken
    curve: list = field(default_factory=list)  # (step, train-pair KL, held-out-pair KL)
    seconds: float = 0.0


def pair_target(a: torch.Tensor, b: torch.Tensor, K: int) -> torch.Tensor:
    p = torch.zeros(len(a), K)
    p[torch.arange(len(a)), a] += 0.5
    p[torch.arange(len(b)), b] += 0.5
    return p


def pair_kl(base: Base, cretok: CreativeToken | None, pairs: list, c: CreativeCfg, seed: int, per_pair: int = 8) -> float:
    """Mean alignment KL (`c.align`) to 50/50 of pairs rendered with fixed noise; cretok None: the plain sum."""
    g = torch.Generator().manual_seed(seed)
    a = torch.tensor([p[0] for p in pairs]).repeat_interleave(per_pair)
    b = torch.tensor([p[1] for p in pairs]).repeat_interleave(per_pair)
    cfg = base.model.config
    noise = torch.randn((len(a), cfg.in_channels, cfg.image_size, cfg.image_size), generator=g)
    ra, rb = base.tokens(a), base.tokens(b)
    with torch.no_grad():
        cond = (ra + rb) if cretok is None else cretok.condition(ra, rb).sum(1)
        imgs = render(base, cond, noise, c.guidance, c.render_steps, c.render, tuple(c.render_t), g)
        target = pair_target(a[::per_pair], b[::per_pair], base.num_classes)
        return float(align_kl(target, class_log_probs(base, imgs), per_pair, c.align).mean())


def train_cretok(base: Base, c: CreativeCfg, seed: int | None = None) -> CreTokResult:
    """Train t_c over the training pairs (every pair but the held-out ones), per-image KL to 50/50."""
    seed = c.seed if seed is None else seed
    K = base.num_classes
    check_heldout(c.heldout_pairs, K)
    pairs = train_pairs(c.heldout_pairs, K)
    held = [tuple(p) for p in c.heldout_pairs]
    cretok = CreativeToken(base.model.config.width)
    opt = torch.optim.Adam(cretok.parameters(), lr=c.cretok_lr)
    g = torch.Generator().manual_seed(seed + 2)
    cfg = base.model.config
    shape = (cfg.in_channels, cfg.image_size, cfg.image_size)
    res = CreTokResult(cretok)
    start = time.perf_counter()
    every = max(1, c.cretok_steps // 8)
    for step in range(c.cretok_steps):
        if step % every == 0:
            res.curve.append((step, pair_kl(base, cretok, pairs[:8], c, 881), pair_kl(base, cretok, held, c, 882)))
        idx = torch.randint(0, len(pairs), (c.cretok_batch,), generator=g)
        a = torch.tensor([pairs[i][0] for i in idx.tolist()])
        b = torch.tensor([pairs[i][1] for i in idx.tolist()])
        cond = cretok.condition(base.tokens(a), base.tokens(b)).sum(1).repeat_interleave(c.renders, 0)
        imgs = render(base, cond, torch.randn((len(cond), *shape), generator=g), c.guidance, c.render_steps,
                      c.render, tuple(c.render_t), g)
        loss = align_kl(pair_target(a, b, K), class_log_probs(base, imgs), c.renders, c.align).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    res.curve.append((c.cretok_steps, pair_kl(base, cretok, pairs[:8], c, 881), pair_kl(base, cretok, held, c, 882)))
    res.seconds = time.perf_counter() - start
    return res


# ------------------------------------------------------------------ methods, sampling, metrics
def method_eps(base: Base, method: str, p: torch.Tensor, guidance: float, distok: DisTok | None = None,
               cretok: CreativeToken | None = None):
    """eps_fn(x, t) of a method for one target p (K,); pair methods read the two classes of p's support."""
    table, null = base.table, base.table[-1]
    model = base.model
    if method in ("distok", "mixture"):
        if method == "distok":
            if distok is None:
                raise LgframeError("method distok needs a trained DisTok")
            with torch.no_grad():
                tok = distok(p[None])[0]
        else:
            tok = p @ table[: base.num_classes]
        return lambda x, t: guided_eps(model, x, t, tok.expand(x.shape[0], -1), null, guidance)
    if method == "guidance_mix":
        return lambda x, t: mixed_eps(model, x, t, p.expand(x.shape[0], -1), table, guidance)
    if method in PAIR_METHODS:
        support = torch.nonzero(p > 0).flatten().tolist()
        if len(support) != 2:
            raise LgframeError(f"method {method} conditions on a class pair; the target {format_dist(p)} has "
                               f"{len(support)} classes")
        a, b = table[support[0]], table[support[1]]
        if method == "cretok":
            if cretok is None:
                raise LgframeError("method cretok needs a trained creative token")
            tok = cretok.condition(a[None], b[None]).sum(1)[0].detach()
        else:
            tok = a + b if method == "sum" else 0.5 * (a + b)
        return lambda x, t: guided_eps(model, x, t, tok.expand(x.shape[0], -1), null, guidance)
    raise LgframeError(f"unknown method {method!r}; valid: {', '.join(METHODS + PAIR_METHODS)}")


def generate(base: Base, method: str, p: torch.Tensor, n: int, seed: int, guidance: float, steps: int | None = None,
             distok: DisTok | None = None, cretok: CreativeToken | None = None) -> torch.Tensor:
    return sample_with(base, method_eps(base, method, p, guidance, distok, cretok), n, seed, steps)


@torch.no_grad()
def metrics(base: Base, images: torch.Tensor, p: torch.Tensor, real: torch.Tensor | None = None) -> dict:
    """KL(p || mean_i q_i), mean per-image entropy of q_i, mass on p's support, FID against `real`
    (real images of the classes involved), diversity (mean pairwise pixel L2 distance)."""
    q = class_log_probs(base, images).exp()
    mean_q = q.mean(0)
    support = p > 0
    flat = images.flatten(1)
    d = torch.cdist(flat, flat)
    n = len(images)
    out = {
        "kl": float(kl_div(p, mean_q.clamp_min(1e-12).log())),
        "entropy": float(-(q * q.clamp_min(1e-12).log()).sum(1).mean()),
        "mass": float(q[:, support].sum(1).mean()),
        "diversity": float(d.sum() / max(1, n * (n - 1))),
    }
    if real is not None:
        out["fid"] = digits_fid(real, images, base.data) if n >= 2 else float("nan")
    return out


# ------------------------------------------------------------------ files
def save_creative(path: str | Path, distok: DisTok | None, cretok: CreativeToken | None, base_file: str,
                  info: dict | None = None) -> Path:
    """One safetensors file: distok.* and cretok.token tensors; metadata with the base's file
    (relative to this file when beside it) and the DisTok shape."""
    path = Path(path)
    tensors = {}
    meta = {"format": CREATIVE_FORMAT, "base": base_file, "info": info or {}}
    if distok is not None:
        tensors |= {f"distok.{k}": v for k, v in distok.state_dict().items()}
        meta["distok"] = {"num_classes": distok.num_classes, "width": distok.width, "latent": distok.latent,
                          "hidden": distok.hidden}
    if cretok is not None:
        tensors["cretok.token"] = cretok.token.detach()
    save_tensors(path, tensors, {"lgframe_creative": json.dumps(meta)})
    return path


def load_creative(path: str | Path) -> tuple[Base, DisTok | None, CreativeToken | None, dict]:
    """(base, distok, cretok, meta) from a file written by `save_creative` (or a run folder holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "creative.safetensors"
    tensors, raw = read_safetensors(p, "creative checkpoint")
    if "lgframe_creative" not in raw:
        raise LgframeError(f"'{p}' is not a creative checkpoint (no lgframe_creative entry); `lgframe creative "
                           "train RECIPE` writes one (creative.safetensors in its run folder)")
    meta = json.loads(raw["lgframe_creative"])
    if meta.get("format") != CREATIVE_FORMAT:
        raise LgframeError(f"'{p}': creative format {meta.get('format')!r}; this lgframe reads {CREATIVE_FORMAT}")
    base_file = Path(meta["base"])
    if not base_file.is_absolute():
        base_file = p.parent / base_file
    base = load_base(base_file)
    distok = cretok = None
    if "distok" in meta:
        d = meta["distok"]
        if d["num_classes"] != base.num_classes or d["width"] != base.model.config.width:
            raise LgframeError(f"'{p}': its DisTok was trained for {d['num_classes']} classes at width {d['width']}, "
                               f"the base {base_file} has {base.num_classes} at width {base.model.config.width}")
        distok = DisTok(d["num_classes"], d["width"], d["latent"], d["hidden"])
        distok.load_state_dict({k[len("distok."):]: v for k, v in tensors.items() if k.startswith("distok.")})
        distok.eval()
    if "cretok.token" in tensors:
        cretok = CreativeToken(base.model.config.width)
        cretok.token.data.copy_(tensors["cretok.token"])
    return base, distok, cretok, meta


def save_grid(rows: list[tuple[torch.Tensor, dict[str, torch.Tensor]]], out: str | Path, title: str = "",
              per_row: int = 8) -> Path:
    """A grid: per row, the target distribution (bars) | per method its first `per_row` samples
    (the same noise in every method)."""
    import matplotlib  # deferred: plotting only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # deferred: plotting only

    methods = list(dict.fromkeys(m for _, samples in rows for m in samples))
    fig, axes = plt.subplots(len(rows), 1 + len(methods), figsize=(1.6 + 2.2 * len(methods), 1.2 * len(rows) + 0.6),
                             squeeze=False, gridspec_kw={"width_ratios": [0.8] + [1.2] * len(methods)})
    for r, (p, samples) in enumerate(rows):
        ax = axes[r][0]
        ax.bar(range(len(p)), p.tolist(), color="tab:blue")
        ax.set_xticks(range(len(p)))
        ax.tick_params(labelsize=6)
        ax.set_ylim(0, 1)
        for m, name in enumerate(methods):
            a = axes[r][1 + m]
            if name in samples:  # a pair method has no samples of a 3-class target: the cell stays blank
                imgs = samples[name][:per_row]
                strip = torch.cat([((imgs[i, 0] + 1) / 2).clamp(0, 1) for i in range(len(imgs))], dim=1)
                a.imshow(strip.numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            a.set_xticks([])
            a.set_yticks([])
            if r == 0:
                a.set_title(name, fontsize=8)
    axes[0][0].set_title("target", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    out = Path(out)
    save_figure(fig, out, dpi=110)
    return out


# ------------------------------------------------------------------ the commands
def run_train(c: CreativeCfg, progress: bool = True) -> dict:
    """`lgframe creative train`: base (given or pre-trained), DisTok, the creative token; writes
    the run folder: creative.safetensors, base.safetensors, creative.json, samples.png."""
    run_dir = Path(c.out_dir) / c.name
    run_dir.mkdir(parents=True, exist_ok=True)
    base = load_base(c.base) if c.base else pretrain_base(c, run_dir)
    check_heldout(c.heldout_pairs, base.num_classes)
    base_file = run_dir / "base.safetensors"
    save_model(base.model, base_file, {"recipe": OmegaConf.to_container(base.task.recipe, resolve=True)})
    dt = train_distok(base, c, progress=progress)
    ct = train_cretok(base, c) if c.cretok_steps else None
    ckpt = save_creative(run_dir / "creative.safetensors", dt.distok, ct.cretok if ct else None, "base.safetensors",
                         {"cfg": asdict(c)})
    rows = []
    targets = heldout_targets(c.heldout_pairs, base.num_classes)[:6]
    for i, p in enumerate(targets):
        samples = {m: generate(base, m, p, c.samples, c.seed + 100 + i, c.guidance, c.sample_steps, dt.distok)
                   for m in METHODS}
        if ct is not None and int((p > 0).sum()) == 2:
            samples |= {m: generate(base, m, p, c.samples, c.seed + 100 + i, c.guidance, c.sample_steps, cretok=ct.cretok)
                        for m in ("cretok", "sum")}
        rows.append((p, samples))
    samples_png = save_grid(rows, run_dir / "samples.png", f"held-out distributions, guidance {c.guidance}")
    report = {"checkpoint": str(ckpt), "samples": str(samples_png), "distok_curve": dt.curve,
              "distok_seconds": dt.seconds, "pool_size": dt.pool_size, "accepted": dt.accepted,
              "cretok_curve": ct.curve if ct else None}
    write_json(run_dir / "creative.json", report | {"cfg": asdict(c)})
    return report


def run_sample(ckpt: str | Path, dist: str | None, n: int, out: str | Path, method: str = "distok",
               guidance: float | None = None, seed: int = 0, steps: int | None = None) -> Path:
    """`lgframe creative sample`: n samples of one distribution (or pair) under one method, as a PNG grid."""
    from torchvision.utils import save_image  # deferred: torchvision (image grids only)

    if n < 1:
        raise LgframeError(f"--n {n}: give at least 1 sample")
    if method not in METHODS + PAIR_METHODS:
        raise LgframeError(f"unknown method {method!r}; valid: {', '.join(METHODS + PAIR_METHODS)}")
    base, distok, cretok, meta = load_creative(ckpt)
    if dist is None:
        raise LgframeError("give a distribution, e.g. --dist '3:0.5,8:0.5' "
                           f"(class ids 0..{base.num_classes - 1})")
    p = parse_dist(dist, base.num_classes)
    g = guidance if guidance is not None else meta.get("info", {}).get("cfg", {}).get("guidance", 3.0)
    imgs = generate(base, method, p, n, seed, g, steps, distok, cretok)
    scale = max(1, -(-32 // imgs.shape[-1]))
    imgs = F.interpolate(imgs, scale_factor=scale, mode="nearest") if scale > 1 else imgs
    out = Path(out)
    with atomic_path(out) as tmp:
        save_image((imgs + 1) / 2, tmp, nrow=min(8, n), padding=scale, pad_value=0.5, format="png")
    return out
