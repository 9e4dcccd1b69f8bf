"""The control branch (ControlNet carried to a DiT), its DivControl factorization
through kind's SVD components, the instruction gate and the alignment head.

Shapes: tokens h (B, T, D) with T = (H / p)^2, the DiT's conditioning vector c
(B, D), condition images (B, C, H, W), instruction embeddings e (B, E), gate
weights g (B, G) over the G tailor groups (one per condition family).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lgframe.core.constraint import BANK, attached_constraint
from lgframe.errors import LgframeError
from lgframe.models.dit import DiT, PatchEmbed
from lgframe.strategies.kind import SOFT_LOGIT, Kind, KindBank, KindOptions, num_classes_of

from .conditions import EMBED_DIM, FAMILIES

BRANCH_ROLES = ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight", "adaLN_modulation.1.weight")
METHODS = ("divcontrol", "dense")


# ------------------------------------------------------------------ kind with an instruction gate
class InstructionGateBank(KindBank):
    """kind's bank (learngene components always on, tailors weighted per sample) whose
    gate is handed in by the branch's forward (`gate`, (B, G) weights over the tailor
    groups) instead of looked up from class labels: the root hook reads it before
    the forward, as kind reads the labels. Without one every tailor is on (kind's
    label-free forward)."""

    routing: torch.Tensor | None = None

    def before_forward(self, root: nn.Module, args: tuple, kwargs: dict) -> None:
        self.routing = kwargs.get("gate", args[3] if len(args) > 3 else None)

    def after_forward(self, root: nn.Module) -> None:
        self.routing = None

    def gate(self, batch: int) -> torch.Tensor | None:
        g = self.routing
        if g is None or self.n_tailors == 0:
            return None
        if g.shape != (batch, len(self.classes)):
            raise LgframeError(f"control: the gate has shape {tuple(g.shape)}, the branch needs ({batch}, "
                               f"{len(self.classes)}): one weight per tailor group for each sample")
        return g.repeat_interleave(self.k_T, dim=1)  # (B, N_T): group j's weight on its k_T components


@dataclass
class DivControlOptions(KindOptions):
    gate: str = "instruction"


class DivControlKind(Kind):
    """kind's constraint on the control branch, its tailor groups gated by instructions.

    Not registered: it is kind (same components, same learngene / tailor split, same
    options) with `InstructionGateBank` as the bank; the branch's condition families
    are kind's classes. Records itself as kind with `gate: instruction`."""

    Options = DivControlOptions

    def check_options(self) -> None:
        if self.options.gate != "instruction":
            raise LgframeError(f"control: the branch's gate is 'instruction', not {self.options.gate!r}")
        Kind(**(dataclasses.asdict(self.options) | {"gate": "hard"}))  # kind's checks of every other option

    def make_bank(self, model: nn.Module) -> InstructionGateBank:
        o = self.options
        return InstructionGateBank(num_classes_of(model), o.classes, o.tailor_rank, "hard", None)


# ------------------------------------------------------------------ the branch
@dataclass
class BranchConfig:
    """What kind and the layout read of the branch (model_identity): its blocks' size,
    and `num_classes` = the tailor groups (kind's classes are the condition families)."""

    depth: int
    width: int
    heads: int
    mlp_ratio: float
    num_classes: int
    patch_size: int
    in_channels: int
    family: str = "dit-control"

    def to_dict(self) -> dict:
        return asdict(self)


def zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ControlBranch(nn.Module):
    """A trainable copy of the first N blocks of a DiT. Its input is the frozen DiT's
    token embedding of the noisy image plus a zero-initialized patch embedding of the
    condition image; after block i a zero-initialized linear gives the residual added
    to block i of the frozen DiT."""

    def __init__(self, base: DiT, depth: int, groups: int):
        super().__init__()
        c = base.config
        if not 1 <= depth <= c.depth:
            raise LgframeError(f"control.blocks={depth}: the base DiT has {c.depth} blocks; valid: 1..{c.depth}")
        self.config = BranchConfig(depth, c.width, c.heads, c.mlp_ratio, groups, c.patch_size, c.in_channels)
        self.cond_embed = zero_(PatchEmbed(c.patch_size, c.in_channels, c.width))
        self.blocks = nn.ModuleList(copy.deepcopy(base.blocks[i]) for i in range(depth))
        self.zero = nn.ModuleList(zero_(nn.Linear(c.width, c.width)) for _ in range(depth))
        self.requires_grad_(True)

    def forward(self, h: torch.Tensor, c: torch.Tensor, cond: torch.Tensor, gate: torch.Tensor | None = None):
        """h (B, T, D) the frozen DiT's embedded input, c (B, D), cond (B, C, H, W), gate
        (B, G) or None -> (residuals: one (B, T, D) per block, features: the branch's
        tokens after each block)."""
        x = h + self.cond_embed(cond)
        residuals, features = [], []
        for block, out in zip(self.blocks, self.zero):
            x = block(x, c)
            features.append(x)
            residuals.append(out(x))
        return residuals, features


class InstructionGate(nn.Module):
    """DivControl's dynamic gate: g = softmax(W e + b) over the tailor groups. Starts on the
    hard pattern: a family's presence gives its own group logit SOFT_LOGIT (kind's soft-gate
    start), so a single-family instruction routes ~95% to its tailors with 4 groups and a
    two-family one splits between both; an untrained family slot starts uniform."""

    def __init__(self, groups: list[str]):
        super().__init__()
        self.groups = list(groups)
        self.proj = nn.Linear(EMBED_DIM, len(groups))
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.bias.zero_()
            names = list(FAMILIES)
            for j, fam in enumerate(groups):
                self.proj.weight[j, names.index(fam)] = SOFT_LOGIT

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.proj(e.to(self.proj.weight.dtype)), dim=-1)


# ------------------------------------------------------------------ the controlled model
@dataclass
class ControlSpec:
    """What builds a controlled model around a base (recorded in the control file)."""

    method: str = "divcontrol"  # divcontrol | dense (a plain ControlNet branch, no gate)
    blocks: int = 2
    groups: list = dataclasses.field(default_factory=lambda: ["edges", "lowres", "mask", "blur"])
    learngene_rank: object = 0.5
    tailor_rank: int = 4
    align: bool = True  # the alignment head exists (trained when align_weight > 0)
    align_from: int = 1  # branch tokens after this many branch blocks
    align_block: int = 1  # the frozen DiT's tokens (clean image, t = 0) after this many blocks

    def to_dict(self) -> dict:
        return asdict(self)


class ControlledDiT(nn.Module):
    """A frozen DiT with a control branch: forward(x, t, y, cond, instruction) -> eps.
    Without `cond` it is the base DiT's own forward."""

    def __init__(self, base: DiT, spec: ControlSpec, init: str = "copy"):
        super().__init__()
        check_spec(spec, base)
        self.spec = spec
        self.base = base.requires_grad_(False)
        self.branch = ControlBranch(base, spec.blocks, len(spec.groups) if spec.method == "divcontrol" else 0)
        self.gate = None
        if spec.method == "divcontrol":
            self.gate = InstructionGate(spec.groups)
            c = DivControlKind(roles=list(BRANCH_ROLES), learngene_rank=spec.learngene_rank, tailor_rank=spec.tailor_rank)
            c.attach(self.branch, init={"copy": "dense", "random": "random", "empty": "empty"}[init])
        elif init == "random":
            for block in self.branch.blocks:
                for m in block.modules():
                    if isinstance(m, nn.Linear):
                        nn.init.xavier_uniform_(m.weight)
        D = base.config.width
        self.align = nn.Sequential(nn.Linear(D, D), nn.SiLU(), nn.Linear(D, D)) if spec.align else None

    @property
    def config(self):
        """The base DiT's config: the controlled model takes its inputs and classes."""
        return self.base.config

    def train(self, mode: bool = True):
        super().train(mode)
        self.base.eval()  # frozen: no mode of its own
        return self

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = self.base
        return b.x_embedder(x) + b.pos_embed, b.t_embedder(t) + b.y_embedder(y)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, cond: torch.Tensor | None = None,
                instruction: torch.Tensor | None = None, return_features: bool = False):
        b = self.base
        h, c = self.embed(x, t, y)
        residuals, features = [], []
        if cond is not None:
            check_condition(cond, b.config)
            g = None
            if self.gate is not None:
                if instruction is None:
                    raise LgframeError("control: a DivControl model needs an instruction embedding for each condition")
                g = self.gate(instruction)
            residuals, features = self.branch(h, c, cond.to(h.dtype), gate=g)
        for i, block in enumerate(b.blocks):
            h = block(h, c)
            if i < len(residuals):
                h = h + residuals[i]
        eps = b.unpatchify(b.final_layer(h, c))
        if return_features:
            return eps, (features[self.spec.align_from - 1] if features else None)
        return eps

    @torch.no_grad()
    def base_features(self, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The frozen DiT's tokens of the clean image (t = 0) after `align_block` blocks: (B, T, D)."""
        h, c = self.embed(x0, torch.zeros(len(x0), dtype=torch.long, device=x0.device), y)
        for block in self.base.blocks[: self.spec.align_block]:
            h = block(h, c)
        return h

    def alignment_loss(self, features: torch.Tensor, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """1 - cos(align(branch tokens), frozen DiT tokens of the clean image), mean over tokens.
        The target is centred over the batch at each position: every image shares the sin-cos
        position table and the background, and on digits a per-position constant already has
        cosine 0.95 with the raw tokens, so the raw loss would say little about the image."""
        if self.align is None:
            raise LgframeError("control: this model has no alignment head (spec.align is false)")
        target = self.base_features(x0, y)
        target = target - target.mean(0, keepdim=True)
        return 1 - F.cosine_similarity(self.align(features), target, dim=-1).mean()

    def gate_weights(self, instruction: torch.Tensor) -> torch.Tensor | None:
        return None if self.gate is None else self.gate(instruction)


def check_spec(spec: ControlSpec, base: DiT) -> None:
    if spec.method not in METHODS:
        raise LgframeError(f"control.method={spec.method!r}; valid: {', '.join(METHODS)}")
    depth = base.config.depth
    if not 1 <= spec.blocks <= depth:
        raise LgframeError(f"control.blocks={spec.blocks}: the base DiT has {depth} blocks; valid: 1..{depth}")
    unknown = [g for g in spec.groups if g not in FAMILIES]
    if unknown or len(set(spec.groups)) != len(spec.groups):
        raise LgframeError(f"control tailor groups {spec.groups}: distinct condition families; valid: {', '.join(FAMILIES)}")
    if spec.method == "divcontrol" and not spec.groups:
        raise LgframeError("control: a DivControl branch needs at least one condition family owning tailors")
    if not 1 <= spec.align_from <= spec.blocks:
        raise LgframeError(f"control.align_from={spec.align_from}; valid: 1..control.blocks ({spec.blocks})")
    if not 1 <= spec.align_block <= depth:
        raise LgframeError(f"control.align_block={spec.align_block}; valid: 1..{depth} (blocks of the base DiT)")


def check_condition(cond: torch.Tensor, cfg) -> None:
    want = (cfg.in_channels, cfg.image_size, cfg.image_size)
    if cond.dim() != 4 or tuple(cond.shape[1:]) != want:
        raise LgframeError(f"control: condition images have shape {tuple(cond.shape)}; this model takes (N, "
                           f"{cfg.in_channels}, {cfg.image_size}, {cfg.image_size}): {cfg.image_size}x{cfg.image_size} "
                           f"with {cfg.in_channels} channel(s), as the base DiT's images")


def branch_kind(model: ControlledDiT) -> DivControlKind | None:
    """The branch's constraint with the options it resolved at attach (None for a dense branch)."""
    spec = attached_constraint(model.branch)
    return None if spec is None else DivControlKind(**spec.options)


def tailor_parameters(model: ControlledDiT) -> list[tuple[str, nn.Parameter, int]]:
    """(name, parameter, axis) of every tensor holding tailor components: U_T, V_T (columns,
    axis 1) and each layer's sigma_T (axis 0); component j*k_T..(j+1)*k_T-1 is group j's."""
    bank = getattr(model.branch, BANK)
    out = []
    for role, f in bank.factors.items():
        out += [(f"branch.{BANK}.factors.{role}.{k}", f[k], 1) for k in ("UT", "VT")]
    for n, p in model.branch.named_parameters():
        if n.endswith(".sT"):
            out.append((f"branch.{n}", p, 0))
    return out
