"""kronecker: WeiT / WAVE (weight templates shared by every layer and size).

Feng et al., "WAVE: Weight Templates for Adaptive Initialization of
Variable-sized Models" and "WeiT" (constraint-based pre-training with
Kronecker-based constraints). Per role (stack (L, m, n)), every layer l:

    W^l = sum_i kron(S_i^l, T_i),   i = 1..k

- T_i (a, b): the weight templates, shared by all layers and all sizes -> the learngene.
- S_i^l (m/a, n/b): the layer's weight scalers (stored per layer as S (k, m/a, n/b)).
Block (p, q) of W^l (rows p*a.., columns q*b..) is sum_i S_i^l[p, q] T_i: every
a x b block of every layer is a weighted sum of the same k templates
("concatenating and weighting templates"; S (x) T, not T (x) S: the two differ
by a fixed row/column permutation, and this order keeps a block inside one head).

Options
- `template`: [a, b] or "head" (default): a = b = the ancestor's head
  dimension. Every default role of lgframe's DiT/ViT and of diffusers' DiT has
  sizes that are multiples of the width (q/k/v rows 3w or w, MLP hidden 4w),
  and the head dimension divides the width, so it tiles all of them; a block
  then never straddles two heads, and whole blocks map to whole heads in descent.
- `k`: templates per role, an int (default 8; capped at the full count) or
  "full" = min(a*b, L*(m/a)*(n/b)), the rank bound of the stacked
  rearrangement below, which makes attach(init="dense") lossless for any stack
  (`lossless_options`). With the default 32 x 32 templates and k = 8 the
  scalers are k/(a*b) = 1/128 of the dense weights: WeiT's strong constraint.
- `width_rule`: how a descendant's scalers follow a width change, "select"
  (default) or "interpolate" (see Descent).

From dense (`attach(init="dense")`): the Van Loan-Pitsianis rearrangement.
R(W) ((m/a)(n/b), a*b) has as row (p, q) the flattened block (p, q), so
W = sum_i kron(S_i, T_i) <=> R(W) = sum_i vec(S_i) vec(T_i)^T. Stacking R(W^l)
of all layers ((L (m/a)(n/b), a*b)) and taking one SVD gives the k templates
(top right singular vectors) shared by all layers, and the scalers are the
projections S_i^l = R(W^l) vec(T_i): the nearest such sum in Frobenius norm
(Eckart-Young), exact when the stack is one (or k = "full"). attach logs the
relative error.

From random (WeiT pre-training): orthonormal templates (k <= a*b always) and
Gaussian scalers scaled so that each layer's W has exactly its fresh dense
init's Frobenius norm (with orthonormal templates ||W^l||_F = ||S^l||_F);
zero-initialized roles stay zero.

Forward: nothing dense is kept between steps. With x as (tokens, n/b, b) the
factors are applied to the activations (einsum, in the cheaper of the two
orders: templates first, z = x T_i^T then y = sum_i S_i z_i, or scalers first)
when that needs at most half the flops of building W (k*m*n) and multiplying
(tokens*m*n): its intermediate is k times the activations and is kept for
backward (DiT-Nano, batch 128, at 0.9x the flops: 1.47x the step time), so it
pays only at large sizes or few tokens; otherwise W is built and F.linear used.

Descent (to L', m', n'): templates copied (and frozen by `freeze_learngene`);
scalers (L, k, m/a, n/b) -> (L', k, m'/a, n'/b): linear interpolation over
normalized depth (as every per-block parameter), then per width axis:
- `select` (default): the layout's consistent width selection (whole heads,
  the first MLP hidden units, the first residual features) applied to whole
  blocks: target block p' takes the ancestor block whose rows the selection
  maps to it. The free parameters (`rest: select`: biases, adaLN, embedders)
  follow the same selection, so a narrower, equally deep descendant is exactly
  the ancestor restricted to its first heads / units (Weight Selection of the
  ancestor). Growing: new output blocks get Gaussian scalers with the
  ancestor's per-template spread (new features are alive), new input blocks
  zero scalers (new features do not disturb what the inherited ones compute),
  as svd does with U and V. When the selection does not move whole blocks
  (the head dimension changes to one the template does not divide), that axis
  falls back to interpolation.
- `interpolate`: the scaler grid is resampled linearly per chunk (q/k/v
  separately) along each width axis (lgframe.resize), and the input axis is
  scaled by the fan-in ratio (dwt's `fan_in_power: auto`).
Measured on digits (Pico ancestor, width 64, 200 WeiT steps; descendant depth 6,
width 96, 3 heads; first-epoch loss, seed 3): DiT select 0.298, interpolate
0.457 (scratch 0.90); ViT select 1.08, interpolate 2.10 (scratch 2.34).
Target widths must be multiples of the template on every role: checked
before any training, with the nearest valid widths in the error. A descendant
trains its scalers (phase 1; recipe `optim.scaler_lr`), then optionally all.

Multi-size pre-training (WeiT's prefix masks; recipe section `multisize`,
lgframe/training/tasks.py): each optimizer step trains one nested sub-network,
the first heads / hidden units / features and the evenly spaced layers of
`lgframe.models.nested`. With template "head" those widths are whole template
blocks, and the nested weight W[rows][:, cols] = sum_i S_i[P', Q'] (x) T_i is a
WeiT layer of the smaller size: the same templates, the scaler blocks of the
kept heads, i.e. what a same-depth `select` descent builds. The bank runs that
layer only (`KroneckerBank.nested_index` / `linear`); a template that cuts a
kept head is refused.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lgframe.core.constraint import Bank, BaseOptions, ConstrainedLinear, FactorizedConstraint, log
from lgframe.core.layout import Dims, Layout, Role, model_dims, resample_depth, width_index
from lgframe.core.registry import register_constraint
from lgframe.core.resize import axis_chunks, fan_in_factor, linear_resample, resize
from lgframe.errors import LgframeError

WIDTH_RULES = ("select", "interpolate")


# ------------------------------------------------------------------ the algebra
def kron_weight(S: torch.Tensor, T: torch.Tensor) -> torch.Tensor:
    """sum_i kron(S[i], T[i]): S (k, P, Q), T (k, a, b) -> (P*a, Q*b)."""
    k, a, b = T.shape
    P, Q = S.shape[1:]
    return torch.einsum("ipq,irs->prqs", S, T).reshape(P * a, Q * b)


def factored_cost(tokens: int, k: int, P: int, Q: int, a: int, b: int) -> tuple[int, str]:
    """Multiply-adds of applying the factors to `tokens` rows, and the cheaper order."""
    templates_first = tokens * k * Q * a * (b + P)  # z (t, k, Q, a), then sum over i, q
    scalers_first = tokens * k * P * b * (Q + a)  # u (t, k, P, b), then sum over i, s
    return (templates_first, "templates") if templates_first <= scalers_first else (scalers_first, "scalers")


def factored_linear(x: torch.Tensor, S: torch.Tensor, T: torch.Tensor, order: str = "templates") -> torch.Tensor:
    """x (tokens, Q*b) @ kron_weight(S, T)^T without building the weight -> (tokens, P*a)."""
    k, a, b = T.shape
    P, Q = S.shape[1:]
    X = x.reshape(x.shape[0], Q, b)
    if order == "templates":
        z = torch.einsum("tqs,irs->tiqr", X, T)
        y = torch.einsum("tiqr,ipq->tpr", z, S)
    else:
        u = torch.einsum("tqs,ipq->tips", X, S)
        y = torch.einsum("tips,irs->tpr", u, T)
    return y.reshape(x.shape[0], P * a)


def use_factored(tokens: int, k: int, P: int, Q: int, a: int, b: int) -> tuple[bool, str]:
    """Factored path when it needs at most half the flops of building W and multiplying."""
    cost, order = factored_cost(tokens, k, P, Q, a, b)
    m, n = P * a, Q * b
    return 2 * cost < k * m * n + tokens * m * n, order


def rearrange(stack: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """(L, m, n) -> (L, P*Q, a*b): row (p, q) of layer l is its block (p, q), flattened."""
    L, m, n = stack.shape
    return stack.reshape(L, m // a, a, n // b, b).permute(0, 1, 3, 2, 4).reshape(L, (m // a) * (n // b), a * b)


def whole_blocks(idx: torch.Tensor, t: int) -> torch.Tensor | None:
    """The blocks of t consecutive elements that the element indices `idx` cover, in order
    (block j = elements j*t .. j*t+t-1); None unless `idx` is made of whole blocks."""
    if idx.numel() % t:
        return None
    rows = idx.view(-1, t)
    first = rows[:, 0]
    if not bool(((first % t == 0) & (rows == first[:, None] + torch.arange(t, device=idx.device)).all(1)).all()):
        return None
    return first // t


class KroneckerBank(Bank):
    """factors[role] = {T (k, a, b)}; layer l holds S (k, P, Q).

    Nested widths (WeiT's nested template blocks; lgframe.models.nested): the nested
    sub-network keeps whole heads, the first MLP hidden units and the first residual
    features, and with the default template (a = b = head dimension) those are whole
    a x b blocks of every role. Block (p, q) of W is sum_i S_i[p, q] T_i, so the nested
    weight W[rows][:, cols] is sum_i S_i[P', Q'] (x) T_i: the same templates weighted by
    the scaler blocks of the kept rows P' and columns Q'. That is a WeiT layer of the
    narrower size, and exactly what a same-depth descent (width_rule select) builds, so a
    multi-size step trains the templates for every size it draws. `linear` then runs that
    narrower layer only (its other outputs are zero, the scalers outside P' x Q' get a zero
    gradient); a width whose rows or columns are not whole blocks is refused."""

    nested_slices = True

    def nested_index(self, mod: ConstrainedLinear, rows: torch.Tensor, cols: torch.Tensor, path: str) -> tuple:
        """(rows, columns, row blocks, column blocks) of a nested width, once per plan."""
        a, b = self.of(mod)["T"].shape[1:]
        out_blocks, in_blocks = whole_blocks(rows, a), whole_blocks(cols, b)
        if out_blocks is None or in_blocks is None:
            raise LgframeError(
                f"kronecker: the nested width of '{path}' keeps {rows.numel()} rows and {cols.numel()} columns that "
                f"are not whole {a}x{b} template blocks, so that sub-network is no WeiT layer (and not what a "
                "descent builds); nest widths with template 'head' (the default) or a template dividing the head "
                "dimension"
            )
        return rows, cols, out_blocks, in_blocks

    def weight(self, mod: ConstrainedLinear) -> torch.Tensor:
        S = mod.S
        nested = getattr(mod, "_lg_nested", None)
        if nested is not None:  # blocks outside the nested rows and columns are zero
            mask = torch.zeros(S.shape[1:], dtype=S.dtype, device=S.device)
            mask[nested[2][:, None], nested[3][None, :]] = 1.0
            S = S * mask
        return kron_weight(S, self.of(mod)["T"])

    def linear(self, mod: ConstrainedLinear, x: torch.Tensor) -> torch.Tensor:
        T, S, bias = self.of(mod)["T"], mod.S, mod.bias
        nested = getattr(mod, "_lg_nested", None)
        if nested is not None:  # the narrower WeiT layer of the nested blocks (see the class docstring)
            rows, cols, out_blocks, in_blocks = nested
            S = S.index_select(1, out_blocks).index_select(2, in_blocks)
            x = x.index_select(-1, cols)
            bias = bias[rows] if bias is not None else None
        y = apply_kronecker(x, S, T, bias)
        if nested is not None:
            y = y.new_zeros(*y.shape[:-1], mod.out_features).index_copy(-1, rows, y)
        return y


def apply_kronecker(x: torch.Tensor, S: torch.Tensor, T: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ (sum_i kron(S_i, T_i))^T + bias, factored or through the weight, whichever `use_factored` picks."""
    k, a, b = T.shape
    P, Q = S.shape[1:]
    tokens = x.numel() // (Q * b)
    factored, order = use_factored(tokens, k, P, Q, a, b)
    if factored:
        y = factored_linear(x.reshape(tokens, Q * b), S, T, order).reshape(*x.shape[:-1], P * a)
        return y + bias if bias is not None else y
    return F.linear(x, kron_weight(S, T), bias)


# ------------------------------------------------------------------ descent over width
def block_index(N: int, N2: int, t: int, a: Dims, b: Dims, what: str) -> torch.Tensor | None:
    """Source block of each target block along an axis of N -> N2 elements cut in
    blocks of t, by the layout's consistent width selection (-1: a new block);
    None when that selection does not move whole blocks onto whole blocks."""
    idx = width_index(N, N2, a, b, what).view(N2 // t, t)
    first = idx[:, :1]
    whole = ((first >= 0) & (first % t == 0) & (idx == first + torch.arange(t))).all(1)
    new = (idx < 0).all(1)
    if not bool((whole | new).all()):
        return None
    return torch.where(new, torch.full_like(first[:, 0], -1), first[:, 0] // t)


def interpolate_axis(S: torch.Tensor, axis: int, N: int, N2: int, t: int, a: Dims, b: Dims, what: str) -> torch.Tensor:
    """Linear resampling of the scaler grid along one width axis (2 rows, 3 columns), chunk by chunk."""
    shape = list(S.shape)
    shape[axis] = N2 // t
    chunks = [1] * S.dim()
    chunks[axis] = axis_chunks(N, N2, a, b, what)
    out = torch.from_numpy(resize(S.double().numpy(), tuple(shape), chunks, linear_resample)).to(S.dtype)
    return out * fan_in_factor(N, N2) if axis == 3 else out


@dataclass
class KroneckerOptions(BaseOptions):
    template: list | str = "head"  # [a, b] or "head" (a = b = head dimension)
    k: int | str = 8  # templates per role, or "full" (lossless)
    width_rule: str = "select"  # descendant scalers over width: select | interpolate


@register_constraint
class Kronecker(FactorizedConstraint):
    """WeiT/WAVE: every layer's weights are sums of Kronecker products of its own
    scalers with k weight templates shared by all layers and sizes."""

    name = "kronecker"
    Options = KroneckerOptions
    bank_class = KroneckerBank
    scaler_names = ("S",)
    lossless_options = {"k": "full"}

    def check_options(self) -> None:
        o = self.options
        t = o.template
        ok = t == "head" or (
            isinstance(t, (list, tuple)) and len(t) == 2 and all(isinstance(v, int) and not isinstance(v, bool) and v >= 1 for v in t)
        )
        if not ok:
            raise LgframeError(f"kronecker option template={t!r}; valid: 'head' or [a, b] with positive ints")
        def positive(v):
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        if not (o.k == "full" or positive(o.k) or (isinstance(o.k, dict) and o.k and all(positive(v) for v in o.k.values()))):
            raise LgframeError(f"kronecker option k={o.k!r}; valid: a positive int or 'full' (a descent records "
                               "{role: a positive int})")
        if o.width_rule not in WIDTH_RULES:
            raise LgframeError(f"kronecker option width_rule={o.width_rule!r}; valid: {', '.join(WIDTH_RULES)}")

    def template_shape(self, dims: Dims) -> tuple[int, int]:
        t = self.options.template
        return (dims.head_dim, dims.head_dim) if t == "head" else (int(t[0]), int(t[1]))

    @property
    def _shape(self) -> tuple[int, int]:
        """The template shape (a, b) once resolved for a model (see `resolve`)."""
        t = self.options.template
        if t == "head":
            raise RuntimeError("kronecker: the template shape is resolved by attach (resolve) before it is used")
        return int(t[0]), int(t[1])

    def resolve(self, model, layout: Layout, roles: list[Role], init: str) -> dict:
        """The template shape this model uses (the learngene records it), checked to tile every role."""
        a, b = self.template_shape(model_dims(model))
        for role in roles:
            _, m, n = role.shape
            if m % a or n % b:
                raise LgframeError(
                    f"kronecker template {a}x{b} does not tile role {role.name} ({m}x{n}); "
                    f"choose `template` dividing both (e.g. 'head', the head dimension {model_dims(model).head_dim})"
                )
        return super().resolve(model, layout, roles, init) | {"template": [a, b]}

    def k_of(self, role: Role) -> int:
        if isinstance(self.options.k, dict):  # descending: the learngene's count per role
            return int(self.options.k[role.name])
        L, m, n = role.shape
        a, b = self._shape
        full = min(a * b, L * (m // a) * (n // b))
        return full if self.options.k == "full" else min(int(self.options.k), full)

    # -- attach ---------------------------------------------------------------
    def build(self, role: Role, stack: torch.Tensor, init: str):
        L, m, n = stack.shape
        a, b = self._shape
        P, Q = m // a, n // b
        k = self.k_of(role)
        if init == "empty":
            return {"T": torch.empty(k, a, b)}, {"S": torch.empty(L, k, P, Q)}
        dev = stack.device
        if init == "random":
            T = torch.linalg.qr(torch.randn(a * b, k, dtype=torch.float64, device=dev))[0].T  # orthonormal rows
            S = torch.randn(L, k, P, Q, dtype=torch.float64, device=dev)
            norms = stack.double().flatten(1).norm(dim=1)
            S = S * (norms / S.flatten(1).norm(dim=1)).view(L, 1, 1, 1)
            return {"T": T.reshape(k, a, b).float()}, {"S": S.float()}
        W = stack.double()
        R = rearrange(W, a, b)  # (L, PQ, ab)
        V = torch.linalg.svd(R.reshape(L * P * Q, a * b), full_matrices=False)[2][:k]  # (k, ab)
        S = (R @ V.T).permute(0, 2, 1).reshape(L, k, P, Q)
        back = torch.einsum("lipq,irs->lprqs", S, V.reshape(k, a, b)).reshape(L, m, n)
        err = (back - W).norm() / W.norm().clamp_min(1e-30)
        log.info("kronecker: role %s (L=%d, %dx%d, template %dx%d, k=%d) dense relative error %.2e",
                 role.name, L, m, n, a, b, k, err)
        return {"T": V.reshape(k, a, b).float()}, {"S": S.float()}

    # -- descend --------------------------------------------------------------
    def descent_options(self, learngene, layout: Layout, dims: Dims) -> dict:
        """The learngene's template shape and its template count per role."""
        name = next(iter(learngene.roles))
        shape = list(learngene.tensors[f"learngene/{name}/T"].shape[1:])
        return {"template": shape, "k": {n: int(learngene.tensors[f"learngene/{n}/T"].shape[0]) for n in learngene.roles}}

    def check_target(self, learngene, layout: Layout, a: Dims, b: Dims) -> None:
        super().check_target(learngene, layout, a, b)
        if b.width % b.heads:
            raise LgframeError(f"kronecker: target width {b.width} is not divisible by its {b.heads} heads")
        for rn in learngene.roles:
            ta, tb = learngene.tensors[f"learngene/{rn}/T"].shape[1:]
            _, m, n = layout.roles[rn].shape
            if m % ta or n % tb:
                near = ", ".join(str(w) for w in nearest_widths(learngene, a, b))
                raise LgframeError(
                    f"kronecker: width {b.width} is not a multiple of the learngene's template {ta}x{tb} for role "
                    f"{rn} ({m}x{n}); nearest valid widths with {b.heads} heads: {near or 'none'}"
                )

    def descend_role(self, role, src_shape, shared, scalers, current, a: Dims, b: Dims):
        L2, m2, n2 = role.shape
        _, m, n = src_shape
        T, S = shared["T"], scalers["S"].float()  # (k, ta, tb), (L, k, P, Q)
        ta, tb = T.shape[1:]
        S = resample_depth(S, L2)
        if (m, n) == (m2, n2):
            return {"T": T}, {"S": S}
        if self.options.width_rule == "interpolate":
            S = interpolate_axis(S, 2, m, m2, ta, a, b, role.name)
            return {"T": T}, {"S": interpolate_axis(S, 3, n, n2, tb, a, b, role.name)}
        rows = block_index(m, m2, ta, a, b, role.name)
        if rows is None:
            S, rows = interpolate_axis(S, 2, m, m2, ta, a, b, role.name), torch.arange(m2 // ta)
        cols = block_index(n, n2, tb, a, b, role.name)
        if cols is None:
            S, cols = interpolate_axis(S, 3, n, n2, tb, a, b, role.name), torch.arange(n2 // tb)
        k = S.shape[1]
        out = torch.zeros(L2, k, m2 // ta, n2 // tb)
        if bool((rows < 0).any()):  # new output blocks: alive, with each template's spread
            spread = S.std(dim=(0, 2, 3), correction=0).view(1, k, 1, 1)
            out[:, :, rows < 0] = (torch.randn(L2, k, int((rows < 0).sum()), n2 // tb) * spread)
            out[:, :, :, cols < 0] = 0.0  # new input blocks: silent
        tr, tc = torch.nonzero(rows >= 0).flatten(), torch.nonzero(cols >= 0).flatten()
        out[:, :, tr[:, None], tc[None, :]] = S[:, :, rows[tr][:, None], cols[tc][None, :]]
        return {"T": T}, {"S": out}


def role_size(size: int, width: int, a: Dims) -> int:
    """An axis of the ancestor (dims a) at another width: chunks of the width
    scale with it, the MLP hidden size by the MLP ratio, other sizes stay."""
    if size % a.width == 0:
        return size // a.width * width
    if size == a.hidden:
        return int(width * a.hidden / a.width)
    return size


def nearest_widths(learngene, a: Dims, b: Dims, span: int = 4096) -> list[int]:
    """The nearest widths below and above b.width (with b's heads) whose every role
    the learngene's templates tile."""
    shapes = [(learngene.roles[rn][1:], tuple(learngene.tensors[f"learngene/{rn}/T"].shape[1:])) for rn in learngene.roles]

    def valid(w: int) -> bool:
        return w % b.heads == 0 and all(
            role_size(m, w, a) % ta == 0 and role_size(n, w, a) % tb == 0 for (m, n), (ta, tb) in shapes
        )

    below = next((w for w in range(b.width - 1, 0, -1) if valid(w)), None)
    above = next((w for w in range(b.width + 1, b.width + span) if valid(w)), None)
    return [w for w in (below, above) if w is not None]
