"""tucker: SWEET (Xie et al., "Self-Supervised Weight Templates for Scalable
Vision Model Initialization", 2025), in lgframe's reading.

Per role t, the stack of its L layers W_t (L, m, n) is a Tucker tensor:

    W_t = G_t x1 A_t x2 B_t x3 C_t,   i.e.   W_t^l = B_t (sum_i A_t[l, i] G_t[i]) C_t^T

- G_t (p, q, s): the core, the shared weight template -> the learngene;
- A_t (L, p): the depth scaler; row A_t[l] (p,) is layer l's own scaler;
- B_t (m, q), C_t (n, s): the width scalers (output and input rows).

No public code or full text of SWEET was reachable; the abstract names a
"shared weight template and size-specific weight scalers under Tucker-based
factorization" and "width-wise stochastic scaling". The paper concatenates all
role matrices of all layers before factorizing; lgframe factorizes each role
on its own (one core per role), like its other constraints.

Where the tensors live. A_t[l] is a parameter of layer l's ConstrainedLinear
(`A`, the per-layer scaler). G_t, B_t and C_t are shared by all layers, so they
live in the bank at the model root (FSDP2 then keeps them in the root unit;
a shared tensor owned by one block breaks FSDP2). B_t and C_t are nonetheless
*scalers*: SWEET re-creates and trains the width scalers for every target
size. So `param_groups` puts G in "learngene" and A, B, C in "scalers", the
learngene file holds `learngene/<role>/G` and `scalers/<role>/{A,B,C}`, and a
descendant trains A, B, C with G frozen (`freeze_learngene`).

Ranks `ranks` (p, q, s), per role:
- "layer" (default): p = L, q = s = min(m, n): every layer at full matrix rank
  (the svd constraint's `full`). Lossless for one layer and for stacks whose
  layers share row and column spaces (e.g. a materialized tucker model); the
  factors cost less than the dense stack for the default roles.
- "full": the lossless multilinear ranks (min(L, mn), min(m, Ln), min(n, Lm)).
  Any dense stack round-trips exactly, but the core alone is as large as the
  dense stack (DiT-Nano: 1.40x the dense model's parameters; "layer": 0.72x),
  so it is not the default. It is `lossless_options` (conformance round trips).
- [p, q, s]: each an int in 1..bound (the "full" value of that mode), a
  fraction in (0, 1] of that bound (a float: 1.0 is the bound, 1 is rank one),
  or "full"; or {role: any of these}.
  A rank above the product of the other two adds nothing and is capped there.

From dense (`attach(init="dense")`): tensorly's Tucker (HOOI from an HOSVD
start) at those ranks; exact at "full" ranks; attach logs the relative error.
From random: B, C random orthonormal, G Gaussian, A Gaussian with each row
A[l] rescaled so that ||W^l||_F equals the model's own fresh dense init of
that layer (zero-initialized roles stay zero).

The forward pass keeps no dense copy: it builds the layer's core
sum_i A[l, i] G[i] (q, s) and applies C, core and B to the activations (cheaper
for few tokens or small ranks), or builds W^l = B core C^T first (cheaper for
many tokens at high ranks); nothing is cached across steps. Within one
forward of the whole model, the cores of all layers of a role are one batched
product (`TuckerBank.core`).

Descent to (L', m', n'): A' = A interpolated over normalized depth; B', C' =
the rows of B, C picked by the layout's consistent width selection
(`layout.width_index`: whole heads of q, k and v; one selection for coupled
axes, e.g. fc1 rows and fc2 columns); G copied and frozen. Growing: new
rows of B are random with each column's row spread (new output features are
alive), new rows of C are zero (new input features leave the inherited
computation untouched at step 0) -- the svd constraint's rule, measured there.
Where a target axis is smaller than its rank (shallower than p, narrower than
q or s), the ranks adapt losslessly: the selected factor F (d, r), d < r, is
factored F = Q R (QR) and R is folded into the core (G x_k R), so the
descendant's weights are *exactly* the ancestor's at the selected rows and
columns, with d orthonormal scaler columns Q. The descendant's core then is
G x_k R, still frozen. A same-size descent reproduces the ancestor exactly,
and a same-depth narrower descent equals the ancestor run under `nested_width`.

Width-wise stochastic scaling (ancestor training, lgframe's reading; SWEET's
rule is not public). Option `width_ratios` (e.g. [0.5, 0.75, 1.0]; None = off).
Each optimizer step draws one ratio uniformly from the list (the same on every
rank: the generator is seeded by the step) and the whole model runs as its
nested sub-network of that width: heads' = ratio * heads (must be whole),
width' = heads' * head_dim, MLP hidden scaled alike. In that step every
constrained layer uses only the nested rows of B and C (whole heads per
q/k/v chunk, `layout.width_index` order), every other Linear reads only the
nested input features, and every LayerNorm normalizes over the nested features,
so the full-width model computes exactly the narrower model whose every
tensor is the consistent width selection of this one -- what a same-depth
descent builds, except for tables a descent does not inherit (the DiT's fixed
sin-cos positions: a descendant computes its own for its width).
`Tucker.step_context(model, step)` returns that context (a no-op when
`width_ratios` is None or the model is in eval mode); the training loop runs
a step's forward in it (the backward may run after the context closes: the
graph already holds the nested computation). See `nested_width` for what it
assumes about the model.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import tensorly as tl
import torch
import torch.nn as nn
import torch.nn.functional as F
from tensorly.decomposition import tucker as tensorly_tucker
from tensorly.tenalg import multi_mode_dot

from lgframe.core.constraint import (
    Bank,
    BaseOptions,
    ConstrainedLinear,
    FactorizedConstraint,
    log,
)
from lgframe.core.factors import random_orthonormal
from lgframe.core.layout import (
    Dims,
    Layout,
    Role,
    model_dims,
    resample_depth,
    select_width,
    width_index,
)
from lgframe.core.registry import register_constraint
from lgframe.errors import LgframeError
from lgframe.models.nested import nested_dims, nested_rows, nested_size, nested_width, sample_width_ratio  # noqa: F401  (re-exported: tucker's API)

RANK_PRESETS = ("layer", "full")
WIDTH_SCALERS = ("B", "C")  # bank tensors that are scalers, not learngene


# ------------------------------------------------------------------ bank
class TuckerBank(Bank):
    """factors[role] = {G (p, q, s), B (m, q), C (n, s)}; layer l holds A (p,)."""

    nested_slices = True  # linear() runs the nested rows of B and C only (lgframe.models.nested)

    def core(self, mod: ConstrainedLinear) -> torch.Tensor:
        """Layer core sum_i A[l, i] G[i], (q, s).

        Inside a forward of the whole model (see `open_core_cache`) the cores
        of all layers of a role come from one product A (L, p) @ G (p, q*s),
        unbound per layer, instead of L products that each read G and each
        write a full-size gradient of G in the backward: at DiT-B size (G of
        12 x 768 x 768 per role) that memory traffic cost more than the
        matmuls the factors replace. Nothing outlives the forward."""
        cache = self.__dict__.get("_lg_cores")  # set around a forward of the model root
        if cache is None:
            return torch.tensordot(mod.A, self.of(mod)["G"], dims=1)
        cores = cache.get(mod.role)
        if cores is None:
            layers = cache["layers"][mod.role]
            G = self.of(mod)["G"]
            A = torch.stack([m.A for m in layers])  # (L, p)
            stacked = (A @ G.reshape(G.shape[0], -1)).reshape(len(layers), *G.shape[1:])
            cores = cache[mod.role] = dict(zip((m.layer for m in layers), stacked.unbind(0)))
        return cores[mod.layer]

    def before_forward(self, root: nn.Module, args: tuple, kwargs: dict) -> None:
        open_core_cache(self, root)

    def after_forward(self, root: nn.Module) -> None:
        object.__setattr__(self, "_lg_cores", None)

    def weight(self, mod: ConstrainedLinear) -> torch.Tensor:
        f = self.of(mod)
        B, C = f["B"], f["C"]
        nested = getattr(mod, "_lg_nested", None)
        if nested is not None:  # rows outside the nested width are zero
            out_idx, in_idx = nested
            B = torch.zeros_like(B).index_copy(0, out_idx, B[out_idx])
            C = torch.zeros_like(C).index_copy(0, in_idx, C[in_idx])
        return (B @ self.core(mod)) @ C.T

    def linear(self, mod: ConstrainedLinear, x: torch.Tensor) -> torch.Tensor:
        f = self.of(mod)
        B, C, bias = f["B"], f["C"], mod.bias
        nested = getattr(mod, "_lg_nested", None)
        if nested is not None:  # run the nested slice only (see nested_width)
            out_idx, in_idx = nested
            B, C, x = B[out_idx], C[in_idx], x.index_select(-1, in_idx)
            bias = bias[out_idx] if bias is not None else None
        core = self.core(mod)
        (m, q), (n, s) = B.shape, C.shape
        tokens = x.numel() // n
        # Apply the factors to the activations when that is cheaper than building W.
        if tokens * (n * s + s * q + q * m) < m * q * s + m * s * n + tokens * m * n:
            y = ((x @ C) @ core.T) @ B.T
            y = y + bias if bias is not None else y
        else:
            y = F.linear(x, (B @ core) @ C.T, bias)
        if nested is not None:
            y = y.new_zeros(*y.shape[:-1], mod.out_features).index_copy(-1, out_idx, y)
        return y


def open_core_cache(bank: TuckerBank, root: nn.Module) -> None:
    """Before a forward of the whole model: the bank may batch its layer cores for
    this forward. Off where the per-layer scalers are sharded (FSDP2 DTensors: only
    the running block's are gathered), and under activation checkpointing (a block's
    recompute in the backward runs after the forward closed the cache: each block
    then computes its own cores, the same way both times)."""
    layers: dict[str, list[ConstrainedLinear]] = {}
    for m in root.modules():
        if getattr(m, "activation_checkpointing", False) or getattr(m, "gradient_checkpointing", False) is True:
            return
        if isinstance(m, ConstrainedLinear):
            if type(m.A).__name__ == "DTensor":
                return
            layers.setdefault(m.role, []).append(m)
    object.__setattr__(bank, "_lg_cores", {"layers": layers})


# ------------------------------------------------------------------ factorization
def rank_bounds(shape: tuple[int, int, int]) -> tuple[int, int, int]:
    """Largest useful (multilinear) ranks of an (L, m, n) stack: its "full" ranks."""
    L, m, n = shape
    return min(L, m * n), min(m, L * n), min(n, L * m)


def tucker_decompose(stack: torch.Tensor, ranks: Sequence[int]) -> tuple[torch.Tensor, list[torch.Tensor], float]:
    """Tucker form of a stack (L, m, n) at `ranks` (p, q, s) with tensorly
    (HOOI from an HOSVD start, float64): (G, [A, B, C], relative error)."""
    W = stack.detach().double().cpu().numpy()
    # One BLAS thread for small stacks: with the cores busy (a data loader, a
    # neighbour's job) OpenBLAS's spinning threads made a DiT-Pico attach 40x slower.
    with tl.backend_context("numpy"), _blas_threads(1 if W.size < 1 << 22 else None):
        G, factors = tensorly_tucker(W, rank=list(ranks), init="svd", n_iter_max=50)
        err = np.linalg.norm(multi_mode_dot(G, factors) - W) / max(np.linalg.norm(W), 1e-30)
    return torch.from_numpy(np.ascontiguousarray(G)), [torch.from_numpy(np.ascontiguousarray(f)) for f in factors], float(err)


def _blas_threads(n: int | None):
    try:
        from threadpoolctl import threadpool_limits  # optional: installed with scikit-learn, absent is fine
    except ImportError:
        return contextlib.nullcontext()
    return threadpool_limits(n, user_api="blas")


def mode_product(core: torch.Tensor, matrix: torch.Tensor, mode: int) -> torch.Tensor:
    """core x_mode matrix: axis `mode` (size r) of core becomes matrix.shape[0]."""
    return torch.movedim(torch.tensordot(matrix, core, dims=([1], [mode])), 0, mode)


# ------------------------------------------------------------------ options
@dataclass
class TuckerOptions(BaseOptions):
    ranks: str | list | dict | None = "layer"  # "layer" | "full" | [p, q, s] | {role: ...} (module docstring)
    width_ratios: list | None = None  # width-wise stochastic scaling during ancestor training; None = off
    # Learning rate of the cores G relative to optim.lr (unless optim.learngene_lr is set). One core
    # feeds every layer of its role, so an Adam step on G moves all L weights at once (the measured
    # effect of 1 vs 0.1 is in benchmarks/README.md, "tucker core_lr").
    core_lr: float = 0.1


def _valid_rank_entry(r) -> bool:
    if isinstance(r, bool):
        return False
    return r == "full" or (isinstance(r, int) and r >= 1) or (isinstance(r, float) and 0 < r <= 1)


def _valid_ranks(r) -> bool:
    if r is None or (isinstance(r, str) and r in RANK_PRESETS):
        return True
    return isinstance(r, Sequence) and not isinstance(r, str) and len(r) == 3 and all(_valid_rank_entry(x) for x in r)


@register_constraint
class Tucker(FactorizedConstraint):
    name = "tucker"
    Options = TuckerOptions
    bank_class = TuckerBank
    scaler_names = ("A",)
    bank_groups = dict.fromkeys(WIDTH_SCALERS, "scalers")  # per role and size-specific: trained, never frozen
    lossless_options = {"ranks": "full"}

    def check_options(self) -> None:
        o = self.options
        ranks = o.ranks
        entries = ranks.values() if hasattr(ranks, "items") else [ranks]
        if not all(_valid_ranks(r) for r in entries):
            raise LgframeError(
                f"tucker option ranks={ranks!r}; valid: 'layer' (default), 'full', [p, q, s] with each an int >= 1, "
                "a fraction in (0, 1] or 'full', or {role: any of these}"
            )
        if isinstance(o.core_lr, bool) or not isinstance(o.core_lr, (int, float)) or not o.core_lr > 0:
            raise LgframeError(f"tucker option core_lr={o.core_lr!r}; valid: a number > 0 (the cores' learning rate "
                               "relative to optim.lr; 1 = the same)")
        if o.width_ratios is not None:
            ratios = o.width_ratios
            if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Sequence) or not ratios or not all(
                isinstance(r, (int, float)) and not isinstance(r, bool) and 0 < r <= 1 for r in ratios
            ):
                raise LgframeError(
                    f"tucker option width_ratios={ratios!r}; valid: null (off) or a list of width ratios in (0, 1], "
                    "e.g. [0.5, 0.75, 1.0]"
                )

    def ranks_of(self, role: Role) -> tuple[int, int, int]:
        """(p, q, s) of a role from the `ranks` option; LgframeError outside 1..bound."""
        L, m, n = role.shape
        bounds = rank_bounds(role.shape)
        spec = self.options.ranks
        r = spec.get(role.name, "layer") if hasattr(spec, "items") else spec
        if r in (None, "layer"):
            r = [bounds[0], min(m, n), min(m, n)]
        elif r == "full":
            r = list(bounds)
        out = []
        for x, bound in zip(r, bounds):
            if x == "full":
                out.append(bound)
            elif isinstance(x, float):
                out.append(max(1, round(x * bound)))
            else:
                out.append(x)
        if not all(1 <= x <= bound for x, bound in zip(out, bounds)):
            p, q, s = bounds
            raise LgframeError(
                f"tucker ranks {list(r)} for role {role.name} of shape (L={L}, m={m}, n={n}): valid ranks are "
                f"p in 1..{p}, q in 1..{q}, s in 1..{s} (each an int, a fraction in (0, 1] of that bound, or 'full'), "
                "or 'layer' / 'full' for all three"
            )
        p, q, s = out
        while p > q * s or q > p * s or s > p * q:  # a rank above the product of the other two adds nothing
            p, q, s = min(p, q * s), min(q, p * s), min(s, p * q)
        return p, q, s

    # -- attach ---------------------------------------------------------------
    def resolve(self, model, layout: Layout, roles: list[Role], init: str) -> dict:
        """Every role's ranks first (one role's error must not leave half a model), and the
        nested widths of stochastic scaling checked now (whole heads), not at step 1000.
        A descent gives the ranks itself (`descent_options`), used as they are."""
        ranks = self.options.ranks
        if init == "empty" and hasattr(ranks, "items") and all(r.name in ranks for r in roles):
            resolved = {r.name: list(ranks[r.name]) for r in roles}
        else:
            resolved = {r.name: list(self.ranks_of(r)) for r in roles}
        for ratio in self.options.width_ratios or ():
            nested_dims(model_dims(model), ratio)
        return super().resolve(model, layout, roles, init) | {"ranks": resolved}

    def build(self, role: Role, stack: torch.Tensor, init: str):
        L, m, n = stack.shape
        p, q, s = self.options.ranks[role.name]
        if init == "empty":  # descend overwrites every tensor
            return {"G": torch.empty(p, q, s), "B": torch.empty(m, q), "C": torch.empty(n, s)}, {"A": torch.empty(L, p)}
        if init == "random":
            B, C = random_orthonormal(m, q), random_orthonormal(n, s)
            G = torch.randn(p, q, s, dtype=torch.float64) / (q * s) ** 0.5
            A = torch.randn(L, p, dtype=torch.float64)
            # With orthonormal B, C, ||W^l||_F = ||A[l] . G||_F: match the dense init per layer.
            norms = stack.double().flatten(1).norm(dim=1)
            A = A * (norms / torch.tensordot(A, G, dims=1).flatten(1).norm(dim=1).clamp_min(1e-30)).unsqueeze(1)
            return {"G": G.float(), "B": B.float(), "C": C.float()}, {"A": A.float()}
        G, (A, B, C), err = tucker_decompose(stack, (p, q, s))
        log.info("tucker: role %s (L=%d, %dx%d, ranks %s) dense relative error %.2e", role.name, L, m, n, [p, q, s], err)
        return {"G": G.float(), "B": B.float(), "C": C.float()}, {"A": A.float()}

    def lr_scales(self) -> dict[str, float]:
        return {"learngene": float(self.options.core_lr)}

    # -- descend --------------------------------------------------------------
    def check_target(self, learngene, layout: Layout, a: Dims, b: Dims) -> None:
        super().check_target(learngene, layout, a, b)
        for name, (_, m, n) in learngene.roles.items():
            keys = [f"learngene/{name}/G"] + [f"scalers/{name}/{k}" for k in ("A", "B", "C")]
            missing = [k for k in keys if k not in learngene.tensors]
            if missing:
                raise LgframeError(f"tucker learngene lacks {missing} for role {name}: it was not written by this version of tucker; re-extract it from the ancestor")
            _, m2, n2 = layout.roles[name].shape
            for axis, src, tgt in (("rows", m, m2), ("columns", n, n2)):
                try:
                    width_index(src, tgt, a, b, f"{name} {axis}")
                except LgframeError as e:
                    raise LgframeError(f"tucker cannot descend role {name}: {e}. Widths must keep whole attention heads.") from None

    def descent_options(self, learngene, layout: Layout, dims: Dims) -> dict:
        """Ranks of the target: the learngene's, capped by the target's (L', m', n').
        Width-wise stochastic scaling belongs to ancestor pre-training: a
        descendant trains at its own width (width_ratios off)."""
        ranks = {}
        for name in learngene.roles:
            p, q, s = learngene.tensors[f"learngene/{name}/G"].shape
            L2, m2, n2 = layout.roles[name].shape
            ranks[name] = [min(p, L2), min(q, m2), min(s, n2)]
        return {"width_ratios": None, "ranks": ranks}

    def descend_role(self, role, src_shape, shared, scalers, current, a: Dims, b: Dims):
        L2, m2, n2 = role.shape
        G = shared["G"].double()
        A, B, C = (scalers[k].double() for k in ("A", "B", "C"))
        A2 = resample_depth(A, L2)
        # Rows new to a wider model: random outputs, zero inputs (see the module docstring).
        new_rows = torch.randn(m2, B.shape[1], dtype=B.dtype) * B.std(0, correction=0)
        B2 = select_width(B, new_rows, a, b, f"{role.name} B")
        C2 = select_width(C, torch.zeros(n2, C.shape[1], dtype=C.dtype), a, b, f"{role.name} C")
        factors = [A2, B2, C2]
        for mode, rank in enumerate(current["G"].shape):
            if factors[mode].shape[1] > rank:  # axis smaller than the rank: fold R into the core, exactly
                Q, R = torch.linalg.qr(factors[mode])
                factors[mode], G = Q, mode_product(G, R, mode)
        A2, B2, C2 = factors
        return {"G": G.float(), "B": B2.float(), "C": C2.float()}, {"A": A2.float()}

    # -- width-wise stochastic scaling ------------------------------------------
    def step_context(self, model: nn.Module, step: int, seed: int = 0):
        """The context one training step runs in: the nested width drawn for
        `step` when `width_ratios` is set and the model trains, else a no-op."""
        if not self.options.width_ratios or not model.training:
            return contextlib.nullcontext()
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        return nested_width(model, sample_width_ratio(self.options.width_ratios, g))
