"""Spatial conditions computed from images, and the instructions that describe them.

A *condition family* is an operator on images (B, C, H, W) in [-1, 1] (background
-1) with one numeric parameter; a *setting* is a family with its parameter's value;
an *instruction* is one or more settings joined by `+` (applied left to right, so
`blur:radius=1+mask:threshold=0` is the silhouette of the blurred image). The same
operator applied to a generated sample measures how well the sample follows its
condition (fidelity).

| family  | parameter | valid      | what it computes (on u = (x + 1) / 2 in [0, 1])                                 |
|---------|-----------|------------|----------------------------------------------------------------------------------|
| edges   | threshold | 0.05..1.5  | Sobel magnitude / 4 (a unit step gives 1), zero outside the image, > threshold  |
| lowres  | factor    | 2..64      | area down-sampling by `factor`, nearest up-sampling back (a power of two)       |
| mask    | threshold | -0.95..0.95| the binary silhouette x > threshold                                             |
| blur    | radius    | 0.3..4     | Gaussian blur of standard deviation `radius` pixels, background outside        |
| outline | threshold | -0.95..0.95| the silhouette's boundary: mask minus its 3x3 erosion                            |
| negative| contrast  | 0.1..1     | the negative image, -contrast * x (a light background)                           |

Binary families (edges, mask, outline) give {-1, 1} images. The instruction
*embedding* the gate reads is computed from these attributes alone, so an unseen
parameter value or an unseen combination of families lands in the same space
(lgframe's reading of "the semantics of condition instructions"; DivControl
embeds text instructions, which an 8x8 toy has no use for):

    e = [presence_f for f in FAMILIES] + [presence_f * value_f for f in FAMILIES]    (2 |FAMILIES|,)

with value_f the parameter normalized to [0, 1] over its valid range (lowres on
a log2 scale). Every registered family has its slots, including one that no
training run has seen yet (`outline` and `negative` in the shipped recipes:
few-shot targets), so adapting to it needs no new embedding dimension. (On 8x8
digits, whose strokes are one or two pixels wide, `outline` is the mask to 1.2%
of the pixels; `negative` is the one that differs from every training family.)
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lgframe.errors import LgframeError


# ------------------------------------------------------------------ operators
def _u(x: torch.Tensor) -> torch.Tensor:
    return (x.float() + 1) / 2


def _binary(m: torch.Tensor) -> torch.Tensor:
    return m.float() * 2 - 1


def sobel_magnitude(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, C, H, W): the Sobel gradient magnitude of u / 4, zero padding (background)."""
    kx = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=x.device)
    k = torch.stack([kx, kx.T]).unsqueeze(1)  # (2, 1, 3, 3)
    B, C, H, W = x.shape
    g = F.conv2d(_u(x).reshape(B * C, 1, H, W), k, padding=1)
    return (g.pow(2).sum(1).sqrt() / 4).reshape(B, C, H, W)


def edges(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return _binary(sobel_magnitude(x) > threshold)


def lowres(x: torch.Tensor, factor: float) -> torch.Tensor:
    f = int(round(factor))
    H, W = x.shape[-2:]
    if H % f or W % f:
        raise LgframeError(f"condition lowres:factor={f} does not divide the image side {H}x{W}; valid factors for "
                           f"this size: {[k for k in range(2, min(H, W) + 1) if H % k == 0 and W % k == 0 and k & (k - 1) == 0]}")
    small = F.avg_pool2d(x.float(), f)
    return F.interpolate(small, scale_factor=f, mode="nearest")


def mask(x: torch.Tensor, threshold: float) -> torch.Tensor:
    return _binary(x.float() > threshold)


def gaussian_kernel(radius: float) -> torch.Tensor:
    half = max(1, math.ceil(2.5 * radius))
    r = torch.arange(-half, half + 1, dtype=torch.float32)
    k = torch.exp(-(r**2) / (2 * radius**2))
    return k / k.sum()


def blur(x: torch.Tensor, radius: float) -> torch.Tensor:
    k = gaussian_kernel(radius).to(x.device)
    B, C, H, W = x.shape
    u = _u(x).reshape(B * C, 1, H, W)
    n = k.numel()
    u = F.conv2d(u, k.reshape(1, 1, 1, n), padding=(0, n // 2))  # zero padding: the background
    u = F.conv2d(u, k.reshape(1, 1, n, 1), padding=(n // 2, 0))
    return (u * 2 - 1).reshape(B, C, H, W)


def negative(x: torch.Tensor, contrast: float) -> torch.Tensor:
    return -contrast * x.float()


def outline(x: torch.Tensor, threshold: float) -> torch.Tensor:
    m = (x.float() > threshold).float()
    eroded = -F.max_pool2d(-F.pad(m, (1, 1, 1, 1), value=0.0), 3, stride=1)
    return _binary((m > 0) & (eroded <= 0))


# ------------------------------------------------------------------ families
@dataclass(frozen=True)
class Family:
    name: str
    param: str
    low: float
    high: float
    default: float
    binary: bool
    fn: Callable[[torch.Tensor, float], torch.Tensor]
    log_scale: bool = False
    integer: bool = False

    def normalized(self, value: float) -> float:
        """The parameter in [0, 1] over its valid range (log2 scale for lowres)."""
        if self.log_scale:
            return (math.log2(value) - math.log2(self.low)) / (math.log2(self.high) - math.log2(self.low))
        return (value - self.low) / (self.high - self.low)


FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("edges", "threshold", 0.05, 1.5, 0.3, True, edges),
    Family("lowres", "factor", 2, 64, 2, False, lowres, log_scale=True, integer=True),
    Family("mask", "threshold", -0.95, 0.95, -0.5, True, mask),
    Family("blur", "radius", 0.3, 4.0, 1.0, False, blur),
    Family("outline", "threshold", -0.95, 0.95, -0.5, True, outline),
    Family("negative", "contrast", 0.1, 1.0, 1.0, False, negative),
)}
EMBED_DIM = 2 * len(FAMILIES)


def _family(name: str, where: str) -> Family:
    if name not in FAMILIES:
        close = difflib.get_close_matches(name, FAMILIES, n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        raise LgframeError(f"{where}: unknown condition family '{name}'{hint}; valid families: "
                           + ", ".join(f"{f.name} ({f.param} {f.low:g}..{f.high:g})" for f in FAMILIES.values()))
    return FAMILIES[name]


@dataclass(frozen=True)
class Setting:
    """One family with its parameter's value."""

    family: str
    value: float

    @property
    def spec(self) -> Family:
        return FAMILIES[self.family]

    def __str__(self) -> str:
        v = int(self.value) if self.spec.integer else self.value
        return f"{self.family}:{self.spec.param}={v:g}"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        return self.spec.fn(x, self.value)


@dataclass(frozen=True)
class Instruction:
    """A condition: one setting, or several applied left to right."""

    settings: tuple[Setting, ...]

    def __str__(self) -> str:
        return "+".join(map(str, self.settings))

    @property
    def families(self) -> tuple[str, ...]:
        return tuple(s.family for s in self.settings)

    @property
    def binary(self) -> bool:
        """The output is binary (the last operator's): fidelity also gets an F1."""
        return self.settings[-1].spec.binary

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [-1, 1] -> the condition images, same shape."""
        for s in self.settings:
            x = s.apply(x)
        return x.clamp(-1, 1)

    def embedding(self) -> torch.Tensor:
        """(EMBED_DIM,): presence of each family, then each present family's normalized parameter."""
        e = torch.zeros(EMBED_DIM)
        names = list(FAMILIES)
        for s in self.settings:
            i = names.index(s.family)
            e[i] = 1.0
            e[len(names) + i] = s.spec.normalized(s.value)
        return e


def parse_setting(text: str, where: str = "instruction") -> Setting:
    text = text.strip()
    name, _, rest = text.partition(":")
    fam = _family(name.strip(), where)
    value = fam.default
    if rest:
        key, eq, raw = rest.partition("=")
        key = key.strip()
        if not eq:
            raise LgframeError(f"{where} '{text}': write the parameter as {fam.name}:{fam.param}=VALUE")
        if key != fam.param:
            raise LgframeError(f"{where} '{text}': family '{fam.name}' has the parameter '{fam.param}' "
                               f"({fam.low:g}..{fam.high:g}), not '{key}'")
        try:
            value = float(raw)
        except ValueError:
            raise LgframeError(f"{where} '{text}': {fam.param}={raw!r} is not a number ({fam.low:g}..{fam.high:g})") from None
    if not (math.isfinite(value) and fam.low <= value <= fam.high):
        raise LgframeError(f"{where} '{text}': {fam.param}={value:g} is outside the valid range {fam.low:g}..{fam.high:g} "
                           f"of family '{fam.name}'")
    if fam.integer:
        if value != int(value) or int(value) & (int(value) - 1):
            raise LgframeError(f"{where} '{text}': {fam.param} must be a power of two ({fam.low:g}..{fam.high:g})")
        value = float(int(value))
    return Setting(fam.name, value)


def parse_instruction(text: str | Instruction, where: str = "instruction") -> Instruction:
    """'blur:radius=1.0+mask:threshold=0' -> Instruction; a family alone takes its default parameter."""
    if isinstance(text, Instruction):
        return text
    if not isinstance(text, str) or not text.strip():
        raise LgframeError(f"{where}: an instruction is a family with its parameter, e.g. 'edges:threshold=0.3', or "
                           f"several joined by '+'; valid families: {', '.join(FAMILIES)}")
    return Instruction(tuple(parse_setting(part, where) for part in text.split("+")))


def embeddings(instructions: list[Instruction], index: torch.Tensor | None = None) -> torch.Tensor:
    """(len(index) or len(instructions), EMBED_DIM): the embedding of instructions[index[i]]."""
    table = torch.stack([i.embedding() for i in instructions])
    return table if index is None else table[index]


def apply_each(instructions: list[Instruction], index: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Condition images of x (B, C, H, W): sample b under instructions[index[b]]."""
    out = torch.empty_like(x, dtype=torch.float32)
    for j, ins in enumerate(instructions):
        sel = torch.nonzero(index == j).flatten()
        if len(sel):
            out[sel] = ins.apply(x[sel])
    return out


# ------------------------------------------------------------------ fidelity
@torch.no_grad()
def fidelity(instruction: Instruction, samples: torch.Tensor, conditions: torch.Tensor) -> dict[str, float]:
    """The operator re-applied to `samples`, against the input `conditions` (both (N, C, H, W)):
    mse (in [-1, 1] units, lower is better), and for a binary operator f1 of the +1 pixels
    (micro-averaged over the set; 1 when neither has any)."""
    again = instruction.apply(samples)
    out = {"mse": float(F.mse_loss(again, conditions.float()))}
    if instruction.binary:
        p, t = again > 0, conditions > 0
        tp = float((p & t).sum())
        fp, fn = float((p & ~t).sum()), float((~p & t).sum())
        out["f1"] = 1.0 if tp + fp + fn == 0 else 2 * tp / (2 * tp + fp + fn)
    return out
