"""select: Weight Selection (Xu et al., "Initializing Models with Larger
Ones", ICLR 2024), the baseline every benchmark compares against.

The authors' rule, exactly (their weight_selection.py), so the comparison is
fair: for each dimension of each tensor, target size S from source size T,

    indices = arange(S) * (T // S)                   if T % S == 0
    indices = round(linspace(0, T - 1, S))           otherwise (float32, half to even)

applied dimension by dimension to weights, biases, norms and embeddings alike
(no head awareness); depth takes the first N blocks; the classifier head
(`head.*` of a ViT) is left at its fresh init.

Growing (a target dimension larger than the source, or more blocks) is not in
the paper. lgframe's extension: the source fills the leading positions of that
dimension (the first T rows, the first L blocks) and the rest keeps the
target's fresh init. Note what that means for a DiT: fresh adaLN-Zero blocks
are identity blocks, so a deeper select descendant computes what its ancestor
computes at step 0.

The weights train dense; the learngene is the ancestor's role stacks as they are.
"""

from __future__ import annotations

import torch

from lgframe.core.constraint import TransformConstraint
from lgframe.core.layout import Dims, Layout, Role, model_depth
from lgframe.core.registry import register_constraint

CLASSIFIER_PREFIXES = ("head.",)


def selection_index(T: int, S: int) -> torch.Tensor:
    """Source indices of the S target positions along a dimension of T (S <= T)."""
    if T % S == 0:
        return torch.arange(S) * (T // S)
    return torch.round(torch.linspace(0, T - 1, S, dtype=torch.float32)).long()


def select_into(src: torch.Tensor, init: torch.Tensor, leading: tuple[int, ...] = ()) -> torch.Tensor:
    """`src` resized to `init`'s shape: shrinking dimensions by the selection
    rule (dimensions in `leading` by their first positions instead), growing
    ones filled from the start, the rest of `init` kept."""
    x = src
    for d, (T, S) in enumerate(zip(src.shape, init.shape)):
        if S < T:
            idx = torch.arange(S) if d in leading else selection_index(T, S)
            x = x.index_select(d, idx)
    out = init.clone()
    out[tuple(slice(0, n) for n in x.shape)] = x.to(out.dtype)
    return out


@register_constraint
class Select(TransformConstraint):
    """Weight Selection: consistent element selection from a larger (or, by
    lgframe's extension, smaller) dense model."""

    name = "select"

    def encode(self, role: Role, stack: torch.Tensor, dims: Dims) -> dict[str, torch.Tensor]:
        return {"stack": stack.float()}

    def decode(self, role, src_shape, tensors, a: Dims, b: Dims, init) -> torch.Tensor:
        return select_into(tensors["stack"], init, leading=(0,))

    def descend_free(self, learngene, model, layout: Layout, a: Dims, b: Dims) -> None:
        rest = learngene.rest_for(model)
        src_depth = model_depth(learngene.ancestor_config)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if not p.requires_grad or name.startswith(CLASSIFIER_PREFIXES):
                    continue
                split = layout.split_block_name(name)
                if split is not None:
                    layer, inner = split
                    if inner in learngene.roles or layer >= src_depth:
                        continue  # a role (decoded) or a block beyond the ancestor's (fresh)
                    name = layout.block_param_name(layer, inner)
                if name in rest:
                    p.copy_(select_into(rest[name], p.detach()))
