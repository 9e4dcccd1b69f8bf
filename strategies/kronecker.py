"""kronecker: WeiT / WAVE (weight templates shared by every layer and size).

Per role, every layer l:   W^l = sum_i kron(S_i^l, T_i),   i = 1..k

- T_i (a, b): the weight templates, shared by all layers and all sizes -> the learngene.
- S_i^l (m/a, n/b): the layer's weight scalers (per layer, stacked (k, m/a, n/b)).
Block (p, q) of W^l (rows p*a.., columns q*b..) is sum_i S_i^l[p, q] T_i: every
a x b block of every layer is a combination of the same k templates.

Options: `template` = [a, b] or "head" (default: a = b = the ancestor's head
dimension, which divides every role of lgframe's and diffusers' DiT/ViT: q/k/v
rows 3w, MLP hidden 4w, and keeps a block inside one head); `k` = an int
(default 8) or "full" = min(a*b, L*(m/a)*(n/b)), lossless.

From dense (`attach(init="dense")`): the Van Loan-Pitsianis rearrangement.
R(W) ((m/a)(n/b), a*b) has as row (p, q) the flattened block (p, q), so
W = sum_i kron(S_i, T_i) <=> R(W) = sum_i vec(S_i) vec(T_i)^T. Stacking R(W^l)
of all layers and taking one SVD gives the k templates (right singular
vectors) shared by all layers and the scalers (projections on them): the
nearest such sum in Frobenius norm; exact when the stack is one.

From random (WeiT pre-training): orthonormal templates (when k <= a*b), scalers
Gaussian scaled so each layer has its fresh dense init's Frobenius norm
(zero-initialized roles stay zero).

Forward: nothing dense is kept between steps. With x (tokens, n/b, b):
z = x T_i^T, y = sum_i S_i z_i (einsum), when that needs at most half the
flops of building W (k*m*n) and multiplying (its intermediate z is k times the
activations, kept for backward); otherwise W is built and F.linear used.

Descent: templates copied and frozen; scalers (L, k, m/a, n/b) interpolated
linearly over normalized depth and, chunk by chunk (q/k/v), over the block
grid of each width axis (the per-axis resampling of lgframe.resize), then the
input axis scaled by the fan-in ratio (exactly as dwt's `fan_in_power: auto`).
Target widths must be multiples of the template shape on every role: checked
before any training, with the nearest valid widths in the error. A descendant
trains its scalers (phase 1; recipe `optim.scaler_lr`), then optionally all.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from lgframe.constraint import Bank, BaseOptions, Constraint, ConstrainedLinear, log, register_constraint
from lgframe.errors import LgframeError
from lgframe.layout import Dims, Layout, Role, model_dims, resample_depth
from lgframe.resize import axis_chunks, fan_in_factor, linear_resample, resize


class KroneckerBank(Bank):
    def weight(self, mod: ConstrainedLinear) -> torch.Tensor:
        T, S = self.of(mod)["T"], mod.S  # (k, a, b), (k, P, Q)
        k, a, b = T.shape
        P, Q = S.shape[1:]
        return torch.einsum("ipq,irs->prqs", S, T).reshape(P * a, Q * b)

    def linear(self, mod: ConstrainedLinear, x: torch.Tensor) -> torch.Tensor:
        T, S = self.of(mod)["T"], mod.S
        k, a, b = T.shape
        P, Q = S.shape[1:]
        m, n = P * a, Q * b
        tokens = x.numel() // n
        # The factored path holds k times the activations (z: tokens x k x Q x a) for
        # backward: take it only when it needs at most half the flops (DiT-Nano,
        # batch 128: 0.9x the flops but 1.47x the step time and memory).
        if 2 * tokens * k * (Q * a * b + P * Q * a) < k * m * n + tokens * m * n:
            z = torch.einsum("tqs,irs->tiqr", x.reshape(tokens, Q, b), T)
            y = torch.einsum("tiqr,ipq->tpr", z, S).reshape(*x.shape[:-1], m)
            return y + mod.bias if mod.bias is not None else y
        return F.linear(x, self.weight(mod), mod.bias)


def rearrange(stack: torch.Tensor, a: int, b: int) -> torch.Tensor:
    """(L, m, n) -> (L, P*Q, a*b): row (p, q) of layer l is its block (p, q), flattened."""
    L, m, n = stack.shape
    return stack.reshape(L, m // a, a, n // b, b).permute(0, 1, 3, 2, 4).reshape(L, (m // a) * (n // b), a * b)


@dataclass
class KroneckerOptions(BaseOptions):
    template: list | str = "head"  # [a, b] or "head" (a = b = head dimension)
    k: int | str = 8  # templates per role, or "full" (lossless)


@register_constraint
class Kronecker(Constraint):
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
        if not (t == "head" or (not isinstance(t, str) and len(list(t)) == 2 and all(isinstance(v, int) and v >= 1 for v in t))):
            raise LgframeError(f"kronecker option template={t!r}; valid: 'head' or [a, b] with positive ints")
        if not (o.k == "full" or (isinstance(o.k, int) and not isinstance(o.k, bool) and o.k >= 1)):
            raise LgframeError(f"kronecker option k={o.k!r}; valid: a positive int or 'full'")

    def template_shape(self, dims: Dims) -> tuple[int, int]:
        t = self.options.template
        return (dims.head_dim, dims.head_dim) if t == "head" else (int(t[0]), int(t[1]))

    def attach(self, model, layout=None, init="random"):
        self._shape = self.template_shape(model_dims(model))
        if self.options.template == "head":
            self.options.template = list(self._shape)  # the learngene records the shape it used
        layout = layout or Layout(model)
        a, b = self._shape
        for role in layout.select_roles(self.options.roles):
            _, m, n = role.shape
            if m % a or n % b:
                raise LgframeError(f"kronecker template {a}x{b} does not tile role {role.name} ({m}x{n}); "
                                   f"choose `template` dividing both (e.g. 'head')")
        return super().attach(model, layout, init)

    def k_of(self, role: Role) -> int:
        if role.name in getattr(self, "_k", {}):  # descending: the learngene's count
            return self._k[role.name]
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
        if init == "random":
            T = torch.linalg.qr(torch.randn(a * b, k, dtype=torch.float64))[0].T if k <= a * b else torch.randn(k, a * b)
            T = T / T.norm(dim=1, keepdim=True)
            S = torch.randn(L, k, P, Q, dtype=torch.float64)
            norms = stack.double().flatten(1).norm(dim=1)
            S = S * (norms / S.flatten(1).norm(dim=1).clamp_min(1e-30)).view(L, 1, 1, 1)
            return {"T": T.reshape(k, a, b).float()}, {"S": S.float()}
        R = rearrange(stack.double(), a, b)  # (L, PQ, ab)
        V = torch.linalg.svd(R.reshape(L * P * Q, a * b), full_matrices=False)[2][:k]  # (k, ab)
        S = (R @ V.T).permute(0, 2, 1).reshape(L, k, P, Q)
        back = torch.einsum("lipq,irs->lprqs", S, V.reshape(k, a, b)).reshape(L, m, n)
        err = (back - stack.double()).norm() / stack.double().norm().clamp_min(1e-30)
        log.info("kronecker: role %s (L=%d, %dx%d, template %dx%d, k=%d) dense relative error %.2e",
                 role.name, L, m, n, a, b, k, err)
        return {"T": V.reshape(k, a, b).float()}, {"S": S.float()}

    # -- descend --------------------------------------------------------------
    def prepare_descend(self, learngene, layout: Layout, dims: Dims) -> None:
        name = next(iter(learngene.roles))
        self._shape = tuple(learngene.tensors[f"learngene/{name}/T"].shape[1:])
        self.options.template = list(self._shape)
        self._k = {n: learngene.tensors[f"learngene/{n}/T"].shape[0] for n in learngene.roles}
        self.options.k = max(self._k.values())

    def check_target(self, learngene, layout: Layout, a: Dims, b: Dims) -> None:
        super().check_target(learngene, layout, a, b)
        name = next(iter(learngene.roles))
        ta, tb = learngene.tensors[f"learngene/{name}/T"].shape[1:]
        for rn in learngene.roles:
            _, m, n = layout.roles[rn].shape
            if m % ta or n % tb:
                step = math.lcm(ta, tb, b.heads)
                lo, hi = (b.width // step) * step, (b.width // step + 1) * step
                near = ", ".join(str(w) for w in (lo, hi) if w > 0)
                raise LgframeError(
                    f"kronecker: width {b.width} does not tile role {rn} ({m}x{n}) with the learngene's "
                    f"{ta}x{tb} templates; nearest valid widths (multiples of {step} with {b.heads} heads): {near}"
                )

    def descend_role(self, role, src_shape, shared, scalers, current, a: Dims, b: Dims):
        L2, m2, n2 = role.shape
        _, m, n = src_shape
        T, S = shared["T"], scalers["S"]  # (k, ta, tb), (L, k, P, Q)
        ta, tb = T.shape[1:]
        S2 = resample_depth(S, L2)
        chunks = [1, 1, axis_chunks(m, m2, a, b, role.name), axis_chunks(n, n2, a, b, role.name)]
        if (m2, n2) != (m, n):
            S2 = torch.from_numpy(resize(S2.numpy(), (L2, S.shape[1], m2 // ta, n2 // tb), chunks, linear_resample))
            S2 = S2 * fan_in_factor(n, n2)
        return {"T": T}, {"S": S2}
