"""scratch: the baseline every benchmark compares against.

No constraint and no learngene: `attach` leaves the model dense, `descend`
leaves the target at its own fresh initialization, all parameters are free.
"""

from __future__ import annotations

import torch.nn as nn

from lgframe.core.constraint import Constraint
from lgframe.core.registry import register_constraint
from lgframe.errors import LgframeError


@register_constraint
class Scratch(Constraint):
    name = "scratch"

    def attach(self, model: nn.Module, layout=None, init: str = "random") -> nn.Module:
        return model

    def learngene(self, model: nn.Module):
        raise LgframeError(
            "constraint 'scratch' has no learngene: pre-train the ancestor under a constraint "
            "(e.g. constraint=svd) to extract one."
        )

    def descend(self, learngene, model: nn.Module) -> nn.Module:
        return model

    def materialize(self, model: nn.Module) -> nn.Module:
        return model

    def param_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        return {"learngene": [], "scalers": [], "free": list(model.parameters())}
