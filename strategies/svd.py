"""svd: FINE (Xie et al., "FINE: Factorizing Knowledge for Initialization of
Variable-sized Diffusion Models", 2024).

Per role t, every layer l:  W_t^l = U_t diag(sigma_t^l) V_t^T

- U_t (m, r), V_t (n, r): shared by all layers and sizes -> the learngene.
- sigma_t^l (r,): per layer -> the scalers.
r = min(m, n) by default (`rank: full`), or an int, or {role: int}.

From dense (`attach(init="dense")`): U from the SVD of the layers side by side
[W^1 ... W^L] (m, L n), V from the SVD of the layers stacked [W^1; ...; W^L]
(L m, n), sigma^l = diag(U^T W^l V), the least-squares diagonal for that U, V.
This is exact for a single layer and for any stack already in FINE form
(e.g. a materialized svd model, when the summed sigma^2 are distinct); a
general dense stack is not jointly diagonalizable, so the round trip then
carries an error, which attach logs (see README, "svd round trip").

From random (`init="random"`): U, V random orthonormal; sigma^l uniform in
[0.5, 1.5] times ||W^l||_F / sqrt(r) of the model's own fresh dense init, so
the constrained model starts at its dense init's scale (and zero-initialized
roles stay zero).

Descent to (L', m', n'): the r' = min(r, m', n') components with the largest
mean |sigma| are kept; U', V' are the rows of U, V picked by the layout's
consistent width selection (whole heads). Growing (lgframe's extension: FINE
varies depth only): new rows of U are drawn with each component's row spread,
so new output features are alive; new rows of V are zero, so new input
features do not disturb what the inherited ones compute (measured on digits,
Nano -> width 192: step-0 loss 0.27 with zero V rows vs 0.37 with random ones,
ancestor 0.25). sigma' by `sigma_init`: interpolate (linear over normalized depth),
copy (layer l takes ancestor layer min(l, L-1)) or random (as at attach).
The descendant trains sigma' and the free parameters with U', V' frozen
(phase 1), then optionally everything (phase 2, the recipe's `init.unfreeze_at`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lgframe.core.constraint import Bank, BaseOptions, ConstrainedLinear, FactorizedConstraint, log
from lgframe.core.factors import random_orthonormal
from lgframe.core.layout import Dims, Layout, Role, resample_depth, select_width
from lgframe.core.registry import register_constraint
from lgframe.errors import LgframeError

SIGMA_INITS = ("interpolate", "copy", "random")


class SVDBank(Bank):
    def weight(self, mod: ConstrainedLinear) -> torch.Tensor:
        f = self.of(mod)
        return (f["U"] * mod.sigma) @ f["V"].T

    def linear(self, mod: ConstrainedLinear, x: torch.Tensor) -> torch.Tensor:
        f = self.of(mod)
        U, V = f["U"], f["V"]
        (m, r), n = U.shape, V.shape[0]
        tokens = x.numel() // n
        # Apply the factors to the activations when that is cheaper than building W.
        if tokens * (n * r + r * m) < m * r * n + tokens * m * n:
            y = ((x @ V) * mod.sigma) @ U.T
            return y + mod.bias if mod.bias is not None else y
        return F.linear(x, (U * mod.sigma) @ V.T, mod.bias)


def random_sigma(norms: torch.Tensor, r: int) -> torch.Tensor:
    """(L, r) from per-layer Frobenius norms (L,): uniform [0.5, 1.5] * norm / sqrt(r)."""
    return norms.reshape(-1, 1) / r**0.5 * (0.5 + torch.rand(norms.shape[0], r))


@dataclass
class SVDOptions(BaseOptions):
    rank: int | str | dict | None = "full"  # "full" = min(m, n); an int for all roles; {role: int, "*": default}
    sigma_init: str = "interpolate"  # descendant sigma: interpolate | copy | random
    orthogonality: float = 0.0  # weight of ||U^T U - I||^2 + ||V^T V - I||^2 in the loss


@register_constraint
class SVD(FactorizedConstraint):
    name = "svd"
    Options = SVDOptions
    bank_class = SVDBank
    scaler_names = ("sigma",)

    def check_options(self) -> None:
        o = self.options
        if o.sigma_init not in SIGMA_INITS:
            raise LgframeError(f"svd option sigma_init={o.sigma_init!r}; valid: {', '.join(SIGMA_INITS)}")
        if not (o.rank == "full" or o.rank is None or isinstance(o.rank, (int, dict)) and not isinstance(o.rank, bool)):
            raise LgframeError(f"svd option rank={o.rank!r}; valid: 'full', a positive int, or {{role: int}}")
        if o.orthogonality < 0:
            raise LgframeError(f"svd option orthogonality={o.orthogonality}; must be >= 0")

    def rank_of(self, role: Role) -> int:
        _, m, n = role.shape
        rank = self.options.rank
        r = rank.get(role.name, rank.get("*", "full")) if isinstance(rank, dict) else rank
        if r in ("full", None):
            return min(m, n)
        if not (isinstance(r, int) and 1 <= r <= min(m, n)):
            raise LgframeError(
                f"svd rank {r} for role {role.name} of shape ({m}, {n}): valid ranks are 1..{min(m, n)} or 'full'"
            )
        return r

    # -- attach ---------------------------------------------------------------
    def resolve(self, model, layout: Layout, roles: list[Role], init: str) -> dict:
        """Each role's rank, recorded per role (an int or "full" for every role stays as "*")."""
        rank = self.options.rank
        ranks = dict(rank) if isinstance(rank, dict) else {"*": rank}
        ranks |= {r.name: self.rank_of(r) for r in roles}  # an invalid rank fails here, before any tensor exists
        return super().resolve(model, layout, roles, init) | {"rank": ranks}

    def build(self, role: Role, stack: torch.Tensor, init: str):
        L, m, n = stack.shape
        r = self.rank_of(role)
        if init == "empty":  # descend overwrites every tensor
            return {"U": torch.empty(m, r), "V": torch.empty(n, r)}, {"sigma": torch.empty(L, r)}
        if init == "random":
            U, V = random_orthonormal(m, r).float(), random_orthonormal(n, r).float()
            return {"U": U, "V": V}, {"sigma": random_sigma(stack.flatten(1).norm(dim=1), r)}
        W = stack.double()
        U = torch.linalg.svd(torch.cat(list(W), dim=1), full_matrices=False)[0][:, :r]
        V = torch.linalg.svd(torch.cat(list(W), dim=0), full_matrices=False)[2][:r].T
        sigma = torch.diagonal(U.T @ W @ V, dim1=1, dim2=2)
        err = ((U * sigma.unsqueeze(1)) @ V.T - W).norm() / W.norm().clamp_min(1e-30)
        log.info("svd: role %s (L=%d, %dx%d, rank %d) dense relative error %.2e", role.name, L, m, n, r, err)
        return {"U": U.float(), "V": V.float()}, {"sigma": sigma.float()}

    # -- descend --------------------------------------------------------------
    def descent_options(self, learngene, layout: Layout, dims: Dims) -> dict:
        """The learngene's ranks, capped by the target's shapes."""
        ranks = {}
        for name in learngene.roles:
            _, m, n = layout.roles[name].shape
            ranks[name] = min(learngene.tensors[f"learngene/{name}/U"].shape[1], m, n)
        return {"rank": ranks}

    def descend_role(self, role, src_shape, shared, scalers, current, a: Dims, b: Dims):
        L2, m2, n2 = role.shape
        U, V, sigma = shared["U"], shared["V"], scalers["sigma"]
        r2 = current["U"].shape[1]
        keep = sigma.abs().mean(0).argsort(descending=True)[:r2].sort().values
        U, V, sigma = U[:, keep], V[:, keep], sigma[:, keep]
        # Rows new to a wider model: random outputs, zero inputs (see the module docstring).
        U2 = select_width(U, torch.randn(m2, r2) * U.std(0), a, b, f"{role.name} U")
        V2 = select_width(V, torch.zeros(n2, r2), a, b, f"{role.name} V")
        how = self.options.sigma_init
        if how == "interpolate":
            sigma2 = resample_depth(sigma, L2)
        elif how == "copy":
            sigma2 = sigma[torch.arange(L2).clamp(max=sigma.shape[0] - 1)]
        else:
            # With orthonormal U, V the norm of sigma^l is ||W^l||_F: keep the ancestor's mean scale.
            sigma2 = random_sigma(sigma.norm(dim=1).mean().expand(L2), r2)
        return {"U": U2, "V": V2}, {"sigma": sigma2}

    # -- regularizer ----------------------------------------------------------
    def regularizer(self, model):
        w = self.options.orthogonality
        if not w:
            return None
        bank = self._require_attached(model)
        total = 0.0
        for f in bank.factors.values():
            for k in ("U", "V"):
                G = f[k].T @ f[k]
                total = total + (G - torch.eye(G.shape[0], device=G.device, dtype=G.dtype)).pow(2).sum()
        return w * total
