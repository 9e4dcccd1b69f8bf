"""kind: KIND (Xie et al., "KIND: Knowledge Integration and Diversion for
Training Decomposable Models", 2024).

Each constrained weight is a sum of SVD components u_i sigma_i v_i^T of two
kinds. Per role, every layer l, for a sample of class c:

    W_c^l = U_G diag(sigma_G^l) V_G^T + U_T diag(g_c * sigma_T^l) V_T^T

- U_G (m, r_G), V_G (n, r_G): **learngene** components, class-agnostic, always
  active, shared by all layers -> the learngene (as FINE's U, V).
- U_T (m, N_T), V_T (n, N_T): **tailor** components, N_T = len(classes) * k_T.
- sigma_G^l (r_G,), sigma_T^l (N_T,): per layer -> the scalers.
- g_c (N_T,): the class gate. `gate: hard` (default): the j-th class of
  `classes` owns tailor components j*k_T .. (j+1)*k_T - 1, g_c is 1 on them and
  0 elsewhere. `gate: soft`: g_c = sigmoid(logits[c]), logits (C, N_T) learned,
  starting at +-4 on the hard pattern (DivControl's soft gate, without its
  condition projection). The null class of classifier-free guidance (label C)
  and every class outside `classes` get g = 0: the learngene alone.

Samples of different classes in one batch each get their own W_c without
building a weight per sample: y = ((x V) * s_b) U^T with s_b = [sigma_G,
g_{c_b} * sigma_T] per sample (U = [U_G U_T], V = [V_G V_T]). The class labels
come from the model's own forward arguments (`y` of lgframe's DiT,
`class_labels` of diffusers' DiT), read by a forward pre-hook on the model
root; nothing changes in the training loop. A model whose forward takes no
labels (lgframe's ViT: a classifier does not know the class at inference)
runs with every tailor of `classes` active.

Options: `learngene_rank` (an int, a fraction of min(m, n), or "full";
default 0.25), `tailor_rank` k_T per class (default 2), `classes` (the class
ids that own tailors; default every class of the model), `gate` hard | soft,
`tailors` (descent) inherit | fresh.

From random (KIND pre-training; the paper imposes the SVD form from random
init): [U_G U_T], [V_G V_T] random orthonormal columns (when they fit),
sigma uniform in [0.5, 1.5] * ||W^l||_F / sqrt(r_G + k_T) of the fresh dense
init, so a class's weight starts at the dense init's scale.
From dense: the learngene components as svd's (FINE) decomposition of the
stack at rank r_G; tailors random orthonormal with sigma_T = 0, so the model's
function is kept (exactly, at learngene_rank full and depth one).

Decompose for deployment (`decompose(model, classes)`, `lgframe decompose`):
keep the learngene plus the tailors of the named classes (or none); the kept
classes compute exactly what they computed before (hard gate), the model is
smaller. Descent: U, V rows by the layout's consistent width selection (new
rows: random outputs, zero inputs, as svd), sigma over normalized depth;
`tailors: inherit` keeps them (same label set), `tailors: fresh` transfers the
learngene alone into a model for a new label set: random tailors, the class
embedding table at its fresh init, the tailors trainable even when
`freeze_learngene` freezes U_G, V_G.

`materialize` is exact only while no tailor is active (sigma_T = 0 or no
tailors): a dense model cannot hold class-dependent weights, so it refuses
otherwise and names `decompose --learngene-only`.
"""

from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from lgframe.core.constraint import (
    BANK,
    SPEC_ATTR,
    Bank,
    BaseOptions,
    ConstrainedLinear,
    FactorizedConstraint,
    attached_constraint,
    inherit_free,
    log,
)
from lgframe.core.factors import random_orthonormal
from lgframe.core.layout import Dims, Layout, Role, model_identity, resample_depth, select_width
from lgframe.core.registry import register_constraint
from lgframe.errors import LgframeError
from lgframe.formats.learngene import Learngene

GATES = ("hard", "soft")
TAILOR_MODES = ("inherit", "fresh")
LABEL_ARGS = ("y", "class_labels", "labels")  # lgframe DiT, diffusers DiT, others
SOFT_LOGIT = 4.0


def num_classes_of(model: nn.Module) -> int | None:
    """Classes of a class-conditional model (lgframe: num_classes; diffusers: num_embeds_ada_norm)."""
    cfg = model_identity(model)[1]
    n = cfg.get("num_classes", cfg.get("num_embeds_ada_norm"))
    return int(n) if n is not None else None


def label_argument(model: nn.Module) -> tuple[str, int] | None:
    """(name, position) of the class-label argument of model.forward, if it has one."""
    params = [p for p in inspect.signature(model.forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for name in LABEL_ARGS:
        for i, p in enumerate(params):
            if p.name == name:
                return name, i
    return None


def random_columns(rows: int, cols: int) -> torch.Tensor:
    """Orthonormal columns when they fit (cols <= rows), else unit-norm random columns."""
    if cols == 0:
        return torch.zeros(rows, 0)
    if cols <= rows:
        return random_orthonormal(rows, cols).float()
    a = torch.randn(rows, cols)
    return a / a.norm(dim=0, keepdim=True)


class KindBank(Bank):
    """factors[role] = {UG, VG, UT, VT}; the gate; the labels of the current forward."""

    def __init__(self, num_classes: int | None, classes: list[int], k_T: int, gate: str, label_arg):
        super().__init__()
        self.num_classes = num_classes
        self.classes = list(classes)
        self.k_T = k_T
        self.soft = gate == "soft"
        self.label_arg = label_arg
        self.labels: torch.Tensor | None = None
        C, N_T = num_classes or 0, len(classes) * k_T
        table = torch.zeros(C + 1, N_T)  # row C: the null class -> learngene only
        for j, c in enumerate(classes):
            table[c, j * k_T:(j + 1) * k_T] = 1.0
        if self.soft:
            self.gate_logits = nn.Parameter(table[:C] * 2 * SOFT_LOGIT - SOFT_LOGIT)
        self.register_buffer("hard_table", table, persistent=False)

    def before_forward(self, root: nn.Module, args: tuple, kwargs: dict) -> None:
        """Hand the batch's class labels (the forward's label argument) to the layers."""
        if self.label_arg is not None:
            name, pos = self.label_arg
            self.labels = kwargs[name] if name in kwargs else (args[pos] if len(args) > pos else None)

    @property
    def n_tailors(self) -> int:
        return len(self.classes) * self.k_T

    def gate_table(self) -> torch.Tensor:
        """(C + 1, N_T): the gate of every class, the null class last."""
        if not self.soft:
            return self.hard_table
        g = torch.sigmoid(self.gate_logits)
        return torch.cat([g, g.new_zeros(1, g.shape[1])])

    def gate(self, batch: int) -> torch.Tensor | None:
        """(batch, N_T) per-sample gates, or None (no labels: every tailor on)."""
        if self.labels is None or self.n_tailors == 0:
            return None
        y = torch.as_tensor(self.labels).long().reshape(-1)
        if y.shape[0] != batch:
            raise LgframeError(
                f"kind: the forward's class labels have {y.shape[0]} entries but the layer sees a batch of {batch}; "
                "call the model root with one label per sample"
            )
        C = self.num_classes
        if bool(((y < 0) | (y > C)).any()):
            raise LgframeError(f"kind: class labels must be in 0..{C} ({C} = the null class), got {y.tolist()[:8]}")
        return self.gate_table().to(y.device)[y]

    def weight(self, mod: ConstrainedLinear) -> torch.Tensor:
        """The weight with every tailor on (what a label-free forward uses)."""
        f = self.of(mod)
        U, V = torch.cat([f["UG"], f["UT"]], 1), torch.cat([f["VG"], f["VT"]], 1)
        return (U * torch.cat([mod.sG, mod.sT])) @ V.T

    def linear(self, mod: ConstrainedLinear, x: torch.Tensor) -> torch.Tensor:
        g = self.gate(x.shape[0]) if x.dim() >= 2 else None
        if g is None:  # one weight for the whole batch: the cheaper of building it or not
            f = self.of(mod)
            (m, R), n = (f["UG"].shape[0], f["UG"].shape[1] + f["UT"].shape[1]), f["VG"].shape[0]
            tokens = x.numel() // n
            if tokens * (n + m) * R >= m * R * n + tokens * m * n:
                return F.linear(x, self.weight(mod), mod.bias)
            s = torch.cat([mod.sG, mod.sT])
        else:
            s = torch.cat([mod.sG.expand(g.shape[0], -1), mod.sT * g.to(mod.sT.dtype)], 1)
            s = s.reshape(s.shape[0], *([1] * (x.dim() - 2)), s.shape[1])
        f = self.of(mod)
        h = x @ torch.cat([f["VG"], f["VT"]], 1)
        y = (h * s) @ torch.cat([f["UG"], f["UT"]], 1).T
        return y + mod.bias if mod.bias is not None else y


@dataclass
class KindOptions(BaseOptions):
    learngene_rank: int | float | str | dict = 0.25  # int, fraction of min(m, n), "full", or {role: int}
    tailor_rank: int = 2  # tailor components per class (k_T)
    classes: list | None = None  # class ids owning tailors; None = every class of the model
    gate: str = "hard"  # hard | soft
    tailors: str = "inherit"  # descent: inherit | fresh (learngene-only transfer, new label set)


@register_constraint
class Kind(FactorizedConstraint):
    name = "kind"
    Options = KindOptions
    bank_class = KindBank
    scaler_names = ("sG", "sT")
    # U_G, V_G are the learngene; the tailors U_T, V_T always train (stored with the learngene
    # group so a descendant can inherit them); the soft gate, outside the factors, is free too.
    bank_groups = {"UT": "free", "VT": "free"}
    lossless_options = {"learngene_rank": "full"}

    def check_options(self) -> None:
        o = self.options
        r = o.learngene_rank
        ok = r == "full" or isinstance(r, dict) or (isinstance(r, int) and not isinstance(r, bool) and r >= 1) or (
            isinstance(r, float) and 0 < r <= 1)
        if not ok:
            raise LgframeError(f"kind option learngene_rank={r!r}; valid: a positive int, a fraction in (0, 1], 'full' or {{role: int}}")
        if not (isinstance(o.tailor_rank, int) and not isinstance(o.tailor_rank, bool) and o.tailor_rank >= 0):
            raise LgframeError(f"kind option tailor_rank={o.tailor_rank!r}; valid: an int >= 0 (components per class)")
        if o.gate not in GATES:
            raise LgframeError(f"kind option gate={o.gate!r}; valid: {', '.join(GATES)}")
        if o.tailors not in TAILOR_MODES:
            raise LgframeError(f"kind option tailors={o.tailors!r}; valid: {', '.join(TAILOR_MODES)}")
        if o.classes is not None:
            cl = list(o.classes)
            if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in cl) or len(set(cl)) != len(cl):
                raise LgframeError(f"kind option classes={cl!r}; valid: distinct class ids >= 0, or null for every class")

    def rank_of(self, role: Role) -> int:
        _, m, n = role.shape
        r = self.options.learngene_rank
        if isinstance(r, dict):
            r = r.get(role.name, r.get("*", 0.25))
        if r == "full":
            return min(m, n)
        if isinstance(r, float):
            return max(1, round(r * min(m, n)))
        return int(r)

    # -- attach ---------------------------------------------------------------
    def resolve(self, model: nn.Module, layout: Layout, roles: list[Role], init: str) -> dict:
        """The classes owning tailors (every class of the model by default) and each role's learngene rank."""
        C = num_classes_of(model)
        o = self.options
        classes = [int(c) for c in (o.classes if o.classes is not None else (range(C) if C is not None else []))]
        if classes and (C is None or max(classes) >= C):
            raise LgframeError(f"kind option classes={classes}: the model has {C or 0} classes (valid ids 0..{(C or 1) - 1})")
        ranks = dict(o.learngene_rank) if isinstance(o.learngene_rank, dict) else {"*": o.learngene_rank}
        ranks |= {r.name: self.rank_of(r) for r in roles}
        return super().resolve(model, layout, roles, init) | {"classes": classes, "learngene_rank": ranks}

    def make_bank(self, model: nn.Module) -> KindBank:
        o = self.options
        return KindBank(num_classes_of(model), o.classes, o.tailor_rank, o.gate, label_argument(model))

    def build(self, role: Role, stack: torch.Tensor, init: str):
        L, m, n = stack.shape
        rG = self.rank_of(role)
        nT = len(self.options.classes) * self.options.tailor_rank
        if init == "empty":
            return ({"UG": torch.empty(m, rG), "VG": torch.empty(n, rG), "UT": torch.empty(m, nT), "VT": torch.empty(n, nT)},
                    {"sG": torch.empty(L, rG), "sT": torch.empty(L, nT)})
        if init == "random":
            U, V = random_columns(m, rG + nT), random_columns(n, rG + nT)
            active = rG + self.options.tailor_rank
            norms = stack.flatten(1).norm(dim=1).reshape(-1, 1)
            s = norms / active**0.5 * (0.5 + torch.rand(L, rG + nT))
            return ({"UG": U[:, :rG], "VG": V[:, :rG], "UT": U[:, rG:], "VT": V[:, rG:]}, {"sG": s[:, :rG], "sT": s[:, rG:]})
        W = stack.double()
        UG = torch.linalg.svd(torch.cat(list(W), dim=1), full_matrices=False)[0][:, :rG]
        VG = torch.linalg.svd(torch.cat(list(W), dim=0), full_matrices=False)[2][:rG].T
        sG = torch.diagonal(UG.T @ W @ VG, dim1=1, dim2=2)
        err = ((UG * sG.unsqueeze(1)) @ VG.T - W).norm() / W.norm().clamp_min(1e-30)
        log.info("kind: role %s (L=%d, %dx%d, learngene rank %d, %d tailors at sigma 0) dense relative error %.2e",
                 role.name, L, m, n, rG, nT, err)
        return ({"UG": UG.float(), "VG": VG.float(), "UT": random_columns(m, nT), "VT": random_columns(n, nT)},
                {"sG": sG.float(), "sT": torch.zeros(L, nT)})

    # -- learngene / descend --------------------------------------------------------
    def learngene(self, model: nn.Module) -> Learngene:
        lg = super().learngene(model)  # records the model's resolved classes, ranks and gate
        bank = getattr(model, BANK)
        if bank.soft:
            lg.tensors["scalers/gate/logits"] = bank.gate_logits.detach().clone()
        return lg

    def descent_options(self, learngene: Learngene, layout: Layout, dims: Dims) -> dict:
        src = learngene.options
        out = {"learngene_rank": {name: int(learngene.tensors[f"learngene/{name}/UG"].shape[1]) for name in learngene.roles}}
        if self.options.tailors == "inherit":
            out |= {"classes": list(src["classes"]), "tailor_rank": int(src["tailor_rank"]), "gate": src["gate"]}
        return out

    def descend(self, learngene: Learngene, model: nn.Module) -> nn.Module:
        if self.options.tailors == "inherit":
            C_src, C_dst = num_classes_of_config(learngene.ancestor_config), num_classes_of(model)
            if C_src != C_dst:
                raise LgframeError(
                    f"kind: the learngene's model has {C_src} classes, the target {C_dst}; inherited tailors need the same "
                    "label set: use `tailors: fresh` to transfer the learngene alone to a new label set"
                )
        model = super().descend(learngene, model)  # freezes U_G, V_G only: the tailors are free (bank_groups)
        bank = getattr(model, BANK)
        with torch.no_grad():
            if bank.soft and self.options.tailors == "inherit" and "scalers/gate/logits" in learngene.tensors:
                bank.gate_logits.copy_(learngene.tensors["scalers/gate/logits"])
        return model

    def descend_free(self, learngene: Learngene, model: nn.Module, layout: Layout, a: Dims, b: Dims) -> None:
        if self.options.tailors == "fresh":  # a new label set: the class embedding keeps its fresh init
            C = num_classes_of_config(learngene.ancestor_config)
            rest = {k: v for k, v in learngene.tensors.items()
                    if not (k.startswith("rest/") and is_label_table(k, v, C))}
            learngene = copy.copy(learngene)
            learngene.tensors = rest
        inherit_free(learngene, model, layout, a, b)

    def descend_role(self, role, src_shape, shared, scalers, current, a: Dims, b: Dims):
        L2, m2, n2 = role.shape
        out_shared, out_scalers = {}, {}
        parts = [("G", shared["UG"], shared["VG"], scalers["sG"])]
        if self.options.tailors == "inherit":
            parts.append(("T", shared["UT"], shared["VT"], scalers["sT"]))
        for tag, U, V, s in parts:
            # Rows new to a wider model: random outputs, zero inputs (as svd).
            std = U.std(0) if U.shape[0] > 1 and U.shape[1] else torch.ones(U.shape[1])
            out_shared["U" + tag] = select_width(U, torch.randn(m2, U.shape[1]) * std, a, b, f"{role.name} U{tag}")
            out_shared["V" + tag] = select_width(V, torch.zeros(n2, V.shape[1]), a, b, f"{role.name} V{tag}")
            out_scalers["s" + tag] = resample_depth(s, L2)
        if self.options.tailors == "fresh":
            nT = current["UT"].shape[1]
            out_shared["UT"], out_shared["VT"] = random_columns(m2, nT), random_columns(n2, nT)
            scale = out_scalers["sG"].abs().mean(1, keepdim=True)
            out_scalers["sT"] = scale * (0.5 + torch.rand(L2, nT))
        return out_shared, out_scalers

    # -- the rest of the contract --------------------------------------------------
    def materialize(self, model: nn.Module) -> nn.Module:
        bank = self._require_attached(model)
        active = [m for m in self.constrained_layers(model) if m.sT.numel() and bool(m.sT.detach().abs().max() > 0)]
        if active and bank.label_arg is not None:
            raise LgframeError(
                "kind: this model's weights depend on the class (its tailors are active), so it has no single dense "
                "form; `lgframe decompose CKPT --learngene-only` keeps the class-agnostic part, or export the "
                "class-restricted model with `lgframe decompose CKPT --classes ...`"
            )
        return super().materialize(model)


def num_classes_of_config(cfg: dict) -> int | None:
    n = cfg.get("num_classes", cfg.get("num_embeds_ada_norm"))
    return int(n) if n is not None else None


def is_label_table(name: str, t: torch.Tensor, num_classes: int | None) -> bool:
    """The class-embedding table of a DiT (lgframe y_embedder, diffusers class_embedder)."""
    return num_classes is not None and ("y_embedder" in name or "class_embedder" in name) and t.shape[0] in (num_classes, num_classes + 1)


def decompose(model: nn.Module, classes: list[int] | None = None) -> nn.Module:
    """A copy of a kind model that keeps the learngene plus the tailors of `classes`
    (a subset of the model's; [] = the learngene only). The kept classes compute
    what they computed before (exactly, with the hard gate); the others, like the
    null class, get the learngene alone."""
    spec = attached_constraint(model)
    if spec is None or spec.name != "kind":
        raise LgframeError(f"decompose needs a model trained under constraint 'kind', this one carries: {spec.name if spec else 'none'}")
    have = list(spec.options["classes"])
    classes = [] if classes is None else [int(c) for c in classes]
    unknown = [c for c in classes if c not in have]
    if unknown:
        raise LgframeError(f"decompose: class(es) {unknown} own no tailors in this model; its classes with tailors: {have}")
    k = int(spec.options["tailor_rank"])
    cols = torch.tensor([have.index(c) * k + i for c in classes for i in range(k)], dtype=torch.long)
    out = copy.deepcopy(model)
    bank = getattr(out, BANK)
    with torch.no_grad():
        for f in bank.factors.values():
            for name in ("UT", "VT"):
                f[name] = nn.Parameter(f[name].detach()[:, cols].clone(), requires_grad=f[name].requires_grad)
        for m in out.modules():
            if isinstance(m, ConstrainedLinear):
                m.sT = nn.Parameter(m.sT.detach()[cols].clone(), requires_grad=m.sT.requires_grad)
        logits = bank.gate_logits.detach()[:, cols].clone() if bank.soft else None
        new = KindBank(bank.num_classes, classes, k, "soft" if bank.soft else "hard", bank.label_arg)
        new.factors = bank.factors
        if logits is not None:
            new.gate_logits = nn.Parameter(logits)
        new.to(next(iter(bank.factors.values()))["UG"].device)
    out.add_module(BANK, new)
    for m in out.modules():
        if isinstance(m, ConstrainedLinear):
            object.__setattr__(m, "_bank", new)
    opts = dict(spec.options) | {"classes": classes}
    setattr(out, SPEC_ATTR, {"name": "kind", "options": opts})
    return out
