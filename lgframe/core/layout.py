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

Hugging Face transformers models (a `PreTrainedModel`) are read from their
config: depth `num_hidden_layers`, width `hidden_size`, heads
`num_attention_heads`, MLP hidden `intermediate_size`; their blocks sit at a
known path (`encoder.layer` for BERT, `layers` for ViT in transformers 5.24,
also under the `base_model_prefix` of a model with a task head) and
`HF_MODELS` names the default roles per `config.model_type`. Their q/k/v are
three Linears of (width, width), each one chunk of (heads, head_dim), so width
selection keeps whole heads in each. Other model types need `roles:` named in
the recipe; a model without such blocks or a config without those fields is
refused with what was found.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass

import torch
import torch.nn as nn

from lgframe.errors import LgframeError

# Roles a constraint takes when the recipe does not name them: the attention and
# MLP projections. adaLN modulation is zero-initialized and stays free by default
# (DESIGN: zero-initialized layers have an explicit policy; `roles:` can add them).
DEFAULT_ROLE_KEYWORDS = ("attn", "mlp", "ff.", "to_q", "to_k", "to_v", "to_out")

# transformers models: config.model_type -> ((blocks path, default roles), ...), the
# first whose blocks exist and hold those roles is used. The roles are the attention
# q/k/v/out projections and the two MLP projections of each block.
_BERT_ROLES = ("attention.self.query.weight", "attention.self.key.weight", "attention.self.value.weight",
               "attention.output.dense.weight", "intermediate.dense.weight", "output.dense.weight")
HF_MODELS: dict[str, tuple[tuple[str, tuple[str, ...]], ...]] = {
    "bert": (("encoder.layer", _BERT_ROLES),),
    "vit": (
        ("layers", ("attention.q_proj.weight", "attention.k_proj.weight", "attention.v_proj.weight",
                    "attention.o_proj.weight", "mlp.fc1.weight", "mlp.fc2.weight")),  # transformers 5.24
        ("encoder.layer", ("attention.attention.query.weight", "attention.attention.key.weight",
                           "attention.attention.value.weight", "attention.output.dense.weight",
                           "intermediate.dense.weight", "output.dense.weight")),  # the older ViTLayer
    ),
}
HF_BLOCK_PATHS = ("encoder.layer", "layers")  # where a model type without a role map may keep its blocks
HF_CONFIG_FIELDS = {"num_hidden_layers": "depth", "hidden_size": "width", "num_attention_heads": "heads",
                    "intermediate_size": "MLP hidden size"}


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


def is_transformers_model(model: nn.Module) -> bool:
    """A Hugging Face transformers `PreTrainedModel` (transformers is not imported for it)."""
    tf = sys.modules.get("transformers")
    return tf is not None and isinstance(model, tf.PreTrainedModel)


def _hf_what(model: nn.Module) -> str:
    return f"transformers {type(model).__name__} (model_type {getattr(model.config, 'model_type', None)!r})"


def hf_structure(model: nn.Module) -> tuple[str, tuple[str, ...] | None]:
    """(blocks path, default role names or None) of a transformers model; LgframeError
    naming what was found when its config or its blocks are not what lgframe reads."""
    cfg = model.config
    bad = {k: getattr(cfg, k, None) for k in HF_CONFIG_FIELDS}
    bad = {k: v for k, v in bad.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1}
    if bad:
        raise LgframeError(
            f"cannot read the size of {_hf_what(model)}: its config has {', '.join(f'{k}={v!r}' for k, v in bad.items())}; "
            "lgframe reads a transformers model's " + ", ".join(f"{v} from config.{k}" for k, v in HF_CONFIG_FIELDS.items())
            + " (positive ints), as BertConfig and ViTConfig have them"
        )
    if cfg.hidden_size % cfg.num_attention_heads:
        raise LgframeError(f"{_hf_what(model)}: hidden_size {cfg.hidden_size} is not a multiple of "
                           f"num_attention_heads {cfg.num_attention_heads}")
    known = HF_MODELS.get(cfg.model_type, ())
    candidates = list(known) + [(p, None) for p in HF_BLOCK_PATHS]  # without a role map: `roles` must name them
    prefix = getattr(model, "base_model_prefix", "") or ""
    if prefix and isinstance(getattr(model, prefix, None), nn.Module):
        candidates += [(f"{prefix}.{p}", roles) for p, roles in candidates]
    for path, roles in candidates:
        try:
            blocks = model.get_submodule(path)
        except AttributeError:
            continue
        if not isinstance(blocks, nn.ModuleList) or len(blocks) == 0:
            continue
        if len(blocks) != cfg.num_hidden_layers:
            raise LgframeError(f"{_hf_what(model)}: {path} holds {len(blocks)} blocks, but config.num_hidden_layers "
                               f"is {cfg.num_hidden_layers}")
        if roles is not None:
            have = {f"{n}.weight" for n, m in blocks[0].named_modules()
                    if isinstance(m, nn.Linear) or getattr(m, "is_constrained_linear", False)}
            if not set(roles) <= have:
                continue
        return path, roles
    lists = [f"{n} ({len(m)} blocks)" for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m)]
    valid = ", ".join(f"model_type '{t}' with its blocks at {' or '.join(p for p, _ in v)}" for t, v in HF_MODELS.items())
    raise LgframeError(
        f"{_hf_what(model)} has no repeated blocks where lgframe looks for them "
        f"({', '.join(dict.fromkeys(p for p, _ in candidates))}); its ModuleLists are: {', '.join(lists) or 'none'}. "
        f"Supported transformers models: {valid} (built-in roles), and other model types with their blocks at "
        f"{' or '.join(HF_BLOCK_PATHS)} when the constraint option `roles` names the roles"
    )


def _json_safe(cfg) -> dict:
    return json.loads(cfg.to_json_string(use_diff=False))


def model_identity(model: nn.Module) -> tuple[str, dict]:
    """(family, config dict) of an lgframe model, a diffusers DiTTransformer2DModel or a
    transformers model (`transformers:<class name>`, its full config as JSON values)."""
    cfg = getattr(model, "config", None)
    if cfg is not None and hasattr(cfg, "to_dict") and hasattr(cfg, "family"):
        return cfg.family, cfg.to_dict()
    if is_transformers_model(model):
        hf_structure(model)  # refuses what lgframe cannot read, naming it
        return f"transformers:{type(model).__name__}", _json_safe(cfg)
    if isinstance(cfg, dict) and "num_attention_heads" in cfg:  # diffusers: a FrozenDict config
        return f"diffusers:{type(model).__name__}", {k: v for k, v in dict(cfg).items() if not k.startswith("_")}
    raise LgframeError(
        f"cannot read the size of {type(model).__name__} (config: {type(cfg).__name__}): lgframe reads the config of "
        "its own DiT/ViT, of a diffusers DiTTransformer2DModel or of a transformers PreTrainedModel"
    )


def dims_of(cfg: dict) -> Dims:
    """Width structure from a config dict (lgframe's, transformers' or diffusers')."""
    if "width" in cfg:
        return Dims(cfg["width"], cfg["heads"], int(cfg["width"] * cfg["mlp_ratio"]))
    if all(k in cfg for k in HF_CONFIG_FIELDS):
        return Dims(cfg["hidden_size"], cfg["num_attention_heads"], cfg["intermediate_size"])
    if "attention_head_dim" in cfg and "num_attention_heads" in cfg:
        width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
        return Dims(width, cfg["num_attention_heads"], 4 * width)
    raise LgframeError(
        f"cannot read width, heads and MLP hidden size from a config with keys {sorted(cfg)}: lgframe reads "
        "width/heads/mlp_ratio (lgframe), hidden_size/num_attention_heads/intermediate_size (transformers) or "
        "num_attention_heads/attention_head_dim (diffusers)"
    )


def model_dims(model: nn.Module) -> Dims:
    return dims_of(model_identity(model)[1])


def model_depth(cfg: dict) -> int:
    for key in ("depth", "num_hidden_layers", "num_layers"):
        if key in cfg:
            return cfg[key]
    raise LgframeError(f"cannot read the depth from a config with keys {sorted(cfg)}: lgframe reads depth (lgframe), "
                       "num_hidden_layers (transformers) or num_layers (diffusers)")


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_submodule(root, parent), name, module)


class Layout:
    """The repeated blocks of a model and their roles.

    `Layout(model)` finds the largest `nn.ModuleList` whose children share one
    class and one parameter structure (`blocks` in lgframe's DiT and ViT,
    `transformer_blocks` in diffusers' DiT); a transformers model's blocks and
    default roles come from `hf_structure` (`encoder.layer` for BERT, `layers`
    for ViT).
    """

    def __init__(self, model: nn.Module):
        self.hf_model_type: str | None = None  # config.model_type of a transformers model
        self.default_roles: tuple[str, ...] | None = None  # built-in roles (transformers), else by keyword
        if is_transformers_model(model):
            self.hf_model_type = model.config.model_type
            self.blocks_path, self.default_roles = hf_structure(model)
        else:
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
        if names is None and self.default_roles is not None:
            chosen = [r for r in self.roles.values() if r.name in self.default_roles]
        elif names is None and self.hf_model_type is not None:
            raise LgframeError(
                f"lgframe has no built-in roles for transformers model_type '{self.hf_model_type}' (built in: "
                f"{', '.join(HF_MODELS)}); name them with the constraint option `roles`, from this model's roles: "
                f"{', '.join(self.roles)}"
            )
        elif names is None:
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
