"""Layout: where a model's repeated blocks are and how their weights group into roles.

A *role* is one kind of weight matrix in the repeated block, named by its
parameter path inside the block (`attn.qkv.weight`); stacking it over the L
blocks gives a tensor (L, m, n). Everything that is not a constrained role is a
*free parameter*.

The layout also knows how to move a tensor between model sizes, which every
constraint's `descend` and the `rest` policies share:

- width: an axis whose size is k * width is k chunks of (heads, head_dim)
  (q/k/v are 3 chunks, adaLN modulation 6); an axis of the MLP hidden size is
  flat. Equal sizes are left alone. Coupled tensors (fc1 rows, fc1 bias, fc2
  columns; q/k/v rows and proj columns) therefore always get one selection.
- depth: linear interpolation over normalized depth (block 0 -> 0, block L-1 -> 1).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from lgframe.errors import LgframeError

# Roles a constraint takes when the recipe does not name them: the attention and
# MLP projections. adaLN modulation is zero-initialized and stays free by default
# (DESIGN: zero-initialized layers have an explicit policy; `roles:` can add them).
DEFAULT_ROLE_KEYWORDS = ("attn", "mlp", "ff.", "to_q", "to_k", "to_v", "to_out")


@dataclass(frozen=True)
class Role:
    name: str  # parameter path inside a block, e.g. "attn.qkv.weight"
    shape: tuple[int, int, int]  # (L, m, n)

    @property
    def module_path(self) -> str:
        return self.name[: -len(".weight")]

    @property
    def key(self) -> str:
        """Name usable as a module/parameter key (no dots)."""
        return self.module_path.replace(".", "__")


@dataclass(frozen=True)
class Dims:
    """Width structure of a model: residual width, heads, MLP hidden size."""

    width: int
    heads: int
    hidden: int

    @property
    def head_dim(self) -> int:
        return self.width // self.heads


def model_identity(model: nn.Module) -> tuple[str, dict]:
    """(family, config dict) of an lgframe model or a diffusers DiTTransformer2DModel."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict") and hasattr(cfg, "family"):
        return cfg.family, cfg.to_dict()
    if cfg is not None and "num_attention_heads" in cfg:  # diffusers: a FrozenDict config
        return f"diffusers:{type(model).__name__}", {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
    raise LgframeError(f"cannot read the size of {type(model).__name__}: it has no lgframe or diffusers config")


def dims_of(cfg: dict) -> Dims:
    """Width structure from a config dict (lgframe's or diffusers')."""
    if "width" in cfg:
        return Dims(cfg["width"], cfg["heads"], int(cfg["width"] * cfg["mlp_ratio"]))
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    return Dims(width, cfg["num_attention_heads"], 4 * width)


def model_dims(model: nn.Module) -> Dims:
    return dims_of(model_identity(model)[1])


def model_depth(cfg: dict) -> int:
    return cfg["depth"] if "depth" in cfg else cfg["num_layers"]


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_submodule(root, parent), name, module)


class Layout:
    """The repeated blocks of a model and their roles.

    `Layout(model)` finds the largest `nn.ModuleList` whose children share one
    class and one parameter structure (`blocks` in lgframe's DiT and ViT,
    `transformer_blocks` in diffusers' DiT).
    """

    def __init__(self, model: nn.Module):
        self.blocks_path = self._find_blocks(model)
        blocks = get_submodule(model, self.blocks_path)
        self.depth = len(blocks)
        first = blocks[0]
        self.roles: dict[str, Role] = {}
        for path, mod in first.named_modules():
            # A wrapper installed by a constraint reports its dense shape.
            if isinstance(mod, nn.Linear) or getattr(mod, "is_constrained_linear", False):
                name = f"{path}.weight"
                self.roles[name] = Role(name, (self.depth, mod.out_features, mod.in_features))

    @staticmethod
    def _find_blocks(model: nn.Module) -> str:
        best, best_size = None, 0
        for path, mod in model.named_modules():
            if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
                continue
            kinds = {type(b) for b in mod}
            shapes = {tuple((n, tuple(p.shape)) for n, p in b.named_parameters()) for b in mod}
            if len(kinds) != 1 or len(shapes) != 1:
                continue
            size = sum(p.numel() for p in mod.parameters())
            if size > best_size:
                best, best_size = path, size
        if best is None:
            raise LgframeError(
                f"{type(model).__name__} has no repeated blocks: a layout needs an nn.ModuleList of "
                "identical blocks (like `blocks` in lgframe's DiT/ViT or `transformer_blocks` in diffusers' DiT)."
            )
        return best

    # ------------------------------------------------------------------ roles
    def select_roles(self, names: list[str] | None) -> list[Role]:
        """Roles a constraint takes: `names` (each must exist) or the default set."""
        if names is None:
            chosen = [r for r in self.roles.values() if any(k in r.name for k in DEFAULT_ROLE_KEYWORDS)]
        else:
            unknown = [n for n in names if n not in self.roles]
            if unknown:
                raise LgframeError(
                    f"unknown role(s) {unknown} in constraint option `roles`; "
                    f"this model's roles are: {', '.join(self.roles)}"
                )
            chosen = [self.roles[n] for n in names]
        if not chosen:
            raise LgframeError(f"no roles selected; this model's roles are: {', '.join(self.roles)}")
        return chosen

    def blocks(self, model: nn.Module) -> nn.ModuleList:
        return get_submodule(model, self.blocks_path)

    def role_modules(self, model: nn.Module, role: Role) -> list[nn.Module]:
        return [b.get_submodule(role.module_path) for b in self.blocks(model)]

    def stack(self, model: nn.Module, role: Role) -> torch.Tensor:
        """Dense weights of a role, (L, m, n)."""
        return torch.stack([m.weight.detach() for m in self.role_modules(model, role)])

    def block_param_name(self, layer: int, name: str) -> str:
        return f"{self.blocks_path}.{layer}.{name}"

    def split_block_name(self, full: str) -> tuple[int, str] | None:
        """'blocks.3.attn.qkv.bias' -> (3, 'attn.qkv.bias'); None if not in a block."""
        prefix = self.blocks_path + "."
        if not full.startswith(prefix):
            return None
        layer, _, rest = full[len(prefix):].partition(".")
        return int(layer), rest


# ---------------------------------------------------------------- resizing
def width_index(src: int, tgt: int, a: Dims, b: Dims, what: str = "tensor") -> torch.Tensor:
    """Index of the source position for each target position along one axis,
    -1 where the target is larger and the position is new. (tgt,)"""
    if src == tgt:
        return torch.arange(tgt)
    if src % a.width == 0 and tgt % b.width == 0 and src // a.width == tgt // b.width:
        chunks = src // a.width
        j = torch.arange(b.width)
        head, within = j // b.head_dim, j % b.head_dim
        ok = (head < a.heads) & (within < a.head_dim)
        one = torch.where(ok, head * a.head_dim + within, torch.full_like(j, -1))
        return torch.cat([torch.where(one >= 0, one + c * a.width, one) for c in range(chunks)])
    if src == a.hidden and tgt == b.hidden:
        j = torch.arange(tgt)
        return torch.where(j < src, j, torch.full_like(j, -1))
    raise LgframeError(
        f"cannot map an axis of size {src} to {tgt} for {what}: widths {a.width} -> {b.width}, "
        f"heads {a.heads} -> {b.heads}, MLP hidden {a.hidden} -> {b.hidden}"
    )


def select_width(src: torch.Tensor, init: torch.Tensor, a: Dims, b: Dims, what: str = "tensor") -> torch.Tensor:
    """Copy `src` into a tensor shaped like `init` by consistent width selection;
    positions that do not exist in the source keep `init` (growing)."""
    if src.dim() != init.dim():
        raise LgframeError(f"{what}: source has shape {tuple(src.shape)}, target {tuple(init.shape)}")
    idx = [width_index(s, t, a, b, what) for s, t in zip(src.shape, init.shape)]
    keep = [torch.nonzero(i >= 0).flatten() for i in idx]
    out = init.clone()
    n = len(idx)
    tgt_ix = tuple(k.reshape([-1 if d == ax else 1 for d in range(n)]) for ax, k in enumerate(keep))
    src_ix = tuple(i[k].reshape([-1 if d == ax else 1 for d in range(n)]) for ax, (i, k) in enumerate(zip(idx, keep)))
    out[tgt_ix] = src[src_ix].to(out.dtype)
    return out


def depth_positions(src: int, tgt: int) -> torch.Tensor:
    """Fractional source positions of `tgt` layers spread over `src` layers."""
    if tgt == 1:
        return torch.tensor([(src - 1) / 2.0])
    return torch.linspace(0, src - 1, tgt, dtype=torch.float64)


def depth_blend(src: int, tgt: int, layer: int) -> tuple[int, int, float]:
    """Target layer `layer` of `tgt` is lerp(source lo, source hi, w) over `src` layers."""
    pos = float(depth_positions(src, tgt)[layer])
    lo = min(int(pos), src - 1)
    return lo, min(lo + 1, src - 1), pos - lo


def resample_depth(stack: torch.Tensor, tgt: int) -> torch.Tensor:
    """Linear interpolation of a per-layer stack (L, ...) over normalized depth -> (tgt, ...)."""
    src = stack.shape[0]
    if src == tgt:
        return stack.clone()
    return torch.stack([torch.lerp(stack[lo], stack[hi], w) for lo, hi, w in (depth_blend(src, tgt, l) for l in range(tgt))])
