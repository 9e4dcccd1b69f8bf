"""The constraint contract, its two families, and the machinery constraints share.

A constraint rewrites the role weights of a model's repeated blocks into a
structured form whose shared part is the *learngene* (Lightning's `Strategy`
and PEFT's tuner base are the models: few methods, a registry that answers a
wrong name with the right ones).

`Constraint` is the contract, six methods and the options:

| method | does |
|---|---|
| `attach(model, init="random"/"dense")` | role weights -> constrained form |
| `learngene(model)` | size-agnostic tensors + manifest |
| `descend(learngene, model)` | initialize a model of another size |
| `regularizer(model)` | extra loss term or None |
| `materialize(model)` | bake dense weights, remove the constraint |
| `param_groups(model)` | learngene / scalers / free |

Two families implement it; a plugin subclasses one of them:

* `FactorizedConstraint` (svd, kronecker, tucker, kind): shared factors live once
  in a *bank* module at the model root (`model.lg_bank`); every constrained Linear
  is a `ConstrainedLinear` that owns its per-layer scalers and its bias, and looks
  the bank up at call time through an unregistered reference (never a reference
  to a factor tensor: FSDP2 replaces parameters with DTensors). So DDP sees every
  parameter once and FSDP2 keeps the bank in the root unit. A plugin writes
  `build` (one role's factors and scalers) and `descend_role`; which group each
  bank tensor belongs to is declared beside it (`bank_groups`).
* `TransformConstraint` (dct, dwt, select): training stays dense; the learngene is
  a transform of each trained role stack (`encode`), and a descendant is decoded
  from it (`decode`).

Options are immutable once a constraint is built. What a model resolves them to
(its roles, ranks, template shape) is a derived constraint (`with_options`), and
is recorded on the model (`attached_constraint`), never written back.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import logging
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from lgframe.core.layout import (
    Dims,
    Layout,
    Role,
    depth_blend,
    dims_of,
    model_depth,
    model_dims,
    model_identity,
    select_width,
    set_submodule,
)
from lgframe.errors import LgframeError
from lgframe.formats.learngene import Learngene

log = logging.getLogger("lgframe")

SPEC_ATTR = "lg_constraint_spec"  # plain attribute on the model root: the attached constraint
BANK = "lg_bank"  # the bank submodule at the model root
HOOKED = "_lg_root_hooks"  # plain attribute on the model root: the handles of lgframe's two forward hooks
REST_POLICIES = ("select", "fresh")
GROUPS = ("learngene", "scalers", "free")


# ------------------------------------------------------------------ spec + options
@dataclass
class ConstraintSpec:
    name: str
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "options": dict(self.options)}


@dataclass
class BaseOptions:
    """Options every constraint takes. Immutable once the constraint is built:
    `Constraint.with_options(...)` gives a constraint with other values."""

    roles: list[str] | None = None  # role names inside a block; None = attention + MLP projections
    rest: str = "select"  # free parameters of a descendant: select (from the ancestor) | fresh
    freeze_learngene: bool = True  # a descendant trains its scalers with the learngene frozen

    def __setattr__(self, key: str, value: Any) -> None:
        if self.__dict__.get("_lg_frozen"):
            raise AttributeError(
                f"constraint options are immutable (tried to set {key}={value!r}); use "
                "constraint.with_options(...) for a constraint with other values"
            )
        object.__setattr__(self, key, value)

    def freeze(self) -> BaseOptions:
        object.__setattr__(self, "_lg_frozen", True)
        return self


def attached_constraint(model: nn.Module) -> ConstraintSpec | None:
    spec = getattr(model, SPEC_ATTR, None)
    return ConstraintSpec(**spec) if spec else None


# ------------------------------------------------------------------ layers
class ConstrainedLinear(nn.Module):
    """A Linear whose weight is computed by the bank: y = bank.linear(self, x).

    Holds the role's per-layer scalers (registered by the constraint) and the
    bias (a free parameter, same name as in the dense model)."""

    is_constrained_linear = True

    def __init__(self, role: Role, layer: int, bias: nn.Parameter | None, bank: Bank):
        super().__init__()
        self.role = role.name
        self.layer = layer
        self.out_features, self.in_features = role.shape[1], role.shape[2]
        self.bias = bias
        object.__setattr__(self, "_bank", bank)  # unregistered: the bank belongs to the root

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._bank.linear(self, x)

    def extra_repr(self) -> str:
        return f"role={self.role}, layer={self.layer}, in={self.in_features}, out={self.out_features}"


class Bank(nn.Module):
    """Shared tensors of a factorized constraint: `factors[role.key][name]`.

    `before_forward` / `after_forward` run around every forward of the model root
    (e.g. kind reads the batch's labels, tucker batches its layer cores); the
    constraint registers the two root hooks that call them once, through
    `register_root_hooks`."""

    def __init__(self):
        super().__init__()
        self.factors = nn.ModuleDict()

    def add(self, role: Role, **tensors: torch.Tensor) -> None:
        self.factors[role.key] = nn.ParameterDict({k: nn.Parameter(v.contiguous()) for k, v in tensors.items()})

    def of(self, mod: ConstrainedLinear) -> nn.ParameterDict:
        return self.factors[mod.role[: -len(".weight")].replace(".", "__")]

    @abstractmethod
    def weight(self, mod: ConstrainedLinear) -> torch.Tensor:
        """Dense weight (out, in) of one constrained layer."""

    def linear(self, mod: ConstrainedLinear, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight(mod), mod.bias)

    def before_forward(self, root: nn.Module, args: tuple, kwargs: dict) -> None:
        """Called before every forward of the model root."""

    def after_forward(self, root: nn.Module) -> None:
        """Called after every forward of the model root, also when it raised."""


def _root_pre_hook(root: nn.Module, args: tuple, kwargs: dict) -> None:
    bank = getattr(root, BANK, None)
    if isinstance(bank, Bank):
        bank.before_forward(root, args, kwargs)


def _root_post_hook(root: nn.Module, args: tuple, kwargs: dict, output) -> None:
    bank = getattr(root, BANK, None)
    if isinstance(bank, Bank):
        bank.after_forward(root)


def register_root_hooks(model: nn.Module) -> None:
    """lgframe's one pair of forward hooks on a model root (once), through torch's public
    API; they dispatch to the model's bank. Their handles live on the model (a deep copy
    rebinds them to the copy), so `materialize` removes exactly these two."""
    if not model.__dict__.get(HOOKED):
        model.__dict__[HOOKED] = [
            model.register_forward_pre_hook(_root_pre_hook, with_kwargs=True),
            model.register_forward_hook(_root_post_hook, with_kwargs=True, always_call=True),
        ]


def remove_root_hooks(model: nn.Module) -> None:
    for handle in model.__dict__.pop(HOOKED, None) or ():
        handle.remove()


# ------------------------------------------------------------------ contract
class Constraint(ABC):
    """The contract every constraint plugin meets: six methods and its options.

    Subclass `FactorizedConstraint` or `TransformConstraint` (below) rather than this
    class; they implement the six methods for the two kinds of constraint there are."""

    name: ClassVar[str]
    Options: ClassVar[type] = BaseOptions
    # Options under which dense -> constrained -> dense and same-size descent are
    # lossless (the conformance suite checks the exact round trips with them).
    lossless_options: ClassVar[dict] = {}

    def __init__(self, **options: Any):
        valid = {f.name for f in dataclasses.fields(self.Options)}
        unknown = [k for k in options if k not in valid]
        if unknown:
            hints = [f"'{k}' (did you mean '{m[0]}'?)" if (m := difflib.get_close_matches(k, valid, n=1)) else f"'{k}'" for k in unknown]
            raise LgframeError(
                f"unknown option {', '.join(hints)} for constraint '{self.name}'; valid options: {', '.join(sorted(valid))}"
            )
        self.options = self.Options(**options)
        if self.options.rest not in REST_POLICIES:
            raise LgframeError(f"constraint option rest={self.options.rest!r}; valid: {', '.join(REST_POLICIES)}")
        self.check_options()
        if isinstance(self.options, BaseOptions):
            self.options.freeze()

    def check_options(self) -> None:
        """Validate option values (raise LgframeError naming the valid values)."""

    @property
    def spec(self) -> ConstraintSpec:
        return ConstraintSpec(self.name, dataclasses.asdict(self.options))

    def with_options(self, **changes: Any) -> Constraint:
        """A constraint of the same kind with some options changed (this one is unchanged)."""
        return type(self)(**(dataclasses.asdict(self.options) | changes))

    # -- the contract ----------------------------------------------------------
    @abstractmethod
    def attach(self, model: nn.Module, layout: Layout | None = None, init: str = "random") -> nn.Module:
        """Rewrite the model's role weights in place into constrained form (idempotent):
        from a random init, or by decomposing the current dense weights (init="dense")."""

    @abstractmethod
    def learngene(self, model: nn.Module) -> Learngene:
        """The size-agnostic tensors of an attached model, with its manifest."""

    @abstractmethod
    def descend(self, learngene: Learngene, model: nn.Module) -> nn.Module:
        """Initialize `model` (a dense model of any supported size, fresh init) from
        `learngene`; the model leaves with this constraint attached."""

    @abstractmethod
    def materialize(self, model: nn.Module) -> nn.Module:
        """Bake dense weights; the model leaves as a plain model (lgframe-free state_dict)."""

    @abstractmethod
    def param_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """{'learngene': [...], 'scalers': [...], 'free': [...]}: every trainable parameter once."""

    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        """An extra loss term, or None."""
        return None

    # -- optional hooks ------------------------------------------------------------
    def step_context(self, model: nn.Module, step: int, seed: int = 0):
        """Context the training loop runs each training forward in (e.g. tucker's
        width-wise stochastic scaling); a no-op by default."""
        return contextlib.nullcontext()

    def lr_scales(self) -> dict[str, float]:
        """Learning rate of a param group relative to optim.lr when the recipe sets none for it
        (optim.learngene_lr / optim.scaler_lr win). Default: every group at optim.lr."""
        return {}

    # -- shared by both families ------------------------------------------------------
    def record(self, model: nn.Module) -> None:
        """Mark `model` as carrying this constraint (with its resolved options)."""
        setattr(model, SPEC_ATTR, self.spec.to_dict())

    def refuse_other(self, model: nn.Module) -> ConstraintSpec | None:
        current = attached_constraint(model)
        if current is not None and current.name != self.name:
            raise LgframeError(
                f"model already carries constraint '{current.name}'; materialize it before attaching '{self.name}'"
            )
        return current

    def prepare_target(self, learngene: Learngene, model: nn.Module) -> tuple[Layout, Dims, Dims]:
        """Checks shared by every descent, then the free parameters by the `rest` policy."""
        if learngene.constraint != self.name:
            raise LgframeError(
                f"learngene was made by constraint '{learngene.constraint}', not '{self.name}'"
            )
        family = model_identity(model)[0]
        if learngene.family != family:
            raise LgframeError(
                f"learngene comes from a '{learngene.family}' model and cannot initialize a '{family}' model"
            )
        if attached_constraint(model) is not None:
            raise LgframeError("descend needs a plain (dense) model of the target size; this one already has a constraint")
        layout = Layout(model)
        src_dims = dims_of(learngene.ancestor_config)
        dst_dims = model_dims(model)
        self.check_target(learngene, layout, src_dims, dst_dims)
        if self.options.rest == "select":
            self.descend_free(learngene, model, layout, src_dims, dst_dims)
        return layout, src_dims, dst_dims

    def check_target(self, learngene: Learngene, layout: Layout, a: Dims, b: Dims) -> None:
        """Raise LgframeError when the target size is not supported (before any training)."""
        missing = [r for r in learngene.roles if r not in layout.roles]
        if missing:
            raise LgframeError(f"target model has no role(s) {missing}; its roles: {', '.join(layout.roles)}")

    def descend_free(self, learngene: Learngene, model: nn.Module, layout: Layout, a: Dims, b: Dims) -> None:
        """Free parameters of the descendant from the ancestor's (`rest: select`)."""
        inherit_free(learngene, model, layout, a, b)

    def rest_tensors(self, model: nn.Module, layout: Layout, role_names: set[str],
                     skip=lambda name: False) -> dict[str, torch.Tensor]:
        """`rest/<name>`: every parameter that is not a role weight and not `skip`ped."""
        out = {}
        for n, p in model.named_parameters():
            split = layout.split_block_name(n)
            if skip(n) or (split is not None and split[1] in role_names):
                continue
            out[f"rest/{n}"] = p.detach().clone()
        return out


class FactorizedConstraint(Constraint):
    """A constraint whose weights are computed from shared factors in a bank.

    Subclasses set `name`, `Options` (a dataclass extending BaseOptions),
    `bank_class` and `scaler_names` (the per-layer scalers each ConstrainedLinear
    holds), and implement `build` and `descend_role`. Bank tensors are the
    learngene unless `bank_groups` says otherwise: `{"B": "scalers"}` makes a
    shared tensor size-specific (stored with the scalers, trained with them, never
    frozen), `{"UT": "free"}` a tensor the descendant always trains."""

    bank_class: ClassVar[type[Bank] | None] = None
    scaler_names: ClassVar[tuple[str, ...]] = ()
    bank_groups: ClassVar[dict[str, str]] = {}

    # -- resolution: what the options mean for one model ---------------------------------
    def resolve(self, model: nn.Module, layout: Layout, roles: list[Role], init: str) -> dict:
        """Option values resolved for `model` before its tensors are built (its roles,
        and e.g. per-role ranks); they are recorded on the model. Override to add yours."""
        return {"roles": [r.name for r in roles]}

    def descent_options(self, learngene: Learngene, layout: Layout, dims: Dims) -> dict:
        """Option values for a descent (e.g. the learngene's ranks, capped by the target's)."""
        return {}

    def make_bank(self, model: nn.Module) -> Bank:
        """The (empty) bank attach fills; override when it needs the model (e.g. kind's class layout)."""
        return self.bank_class()

    @abstractmethod
    def build(self, role: Role, stack: torch.Tensor, init: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Factors of one role from its dense stack (L, m, n): (shared tensors,
        per-layer scalers each stacked over layers (L, ...)). With init="random"
        the stack is the model's fresh dense init, used for scale only; with
        init="empty" (descend, which overwrites everything) it is uninitialized
        memory of the right shape: return tensors of the right shapes, cheaply."""

    @abstractmethod
    def descend_role(
        self, role: Role, src_shape: tuple, shared: dict, scalers: dict, current: dict, a: Dims, b: Dims
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Bank tensors and per-layer scaler stacks (L', ...) for the target role `role`
        from the ancestor's: `shared` holds its learngene-group bank tensors, `scalers`
        its per-layer scaler stacks and its scaler-group bank tensors; `current` holds
        the freshly attached target's bank tensors."""

    def group_of(self, tensor_name: str) -> str:
        return self.bank_groups.get(tensor_name, "learngene")

    # -- attach ---------------------------------------------------------------------------
    def attach(self, model: nn.Module, layout: Layout | None = None, init: str = "random") -> nn.Module:
        """Rewrite the role weights in place into constrained form. Idempotent.
        init="empty" (used by descend, which fills every tensor) skips the random draw."""
        if init not in ("random", "dense", "empty"):
            raise LgframeError(f"attach init={init!r}; valid: random, dense")
        if self.refuse_other(model) is not None:
            return model
        layout = layout or Layout(model)
        roles = layout.select_roles(self.options.roles)
        c = self.with_options(**self.resolve(model, layout, roles, init))
        bank = c.make_bank(model)
        built = {}
        for role in roles:
            stack = torch.empty(role.shape) if init == "empty" else layout.stack(model, role)
            shared, scalers = c.build(role, stack, init)
            bank.add(role, **shared)
            built[role.name] = scalers
        model.add_module(BANK, bank)
        for role in roles:
            for layer, old in enumerate(layout.role_modules(model, role)):
                new = ConstrainedLinear(role, layer, old.bias, bank)
                for k, v in built[role.name].items():
                    new.register_parameter(k, nn.Parameter(v[layer].contiguous().clone()))
                set_submodule(layout.blocks(model)[layer], role.module_path, new)
        register_root_hooks(model)
        c.record(model)
        return model

    def attach_dense(self, model: nn.Module) -> dict[str, float]:
        """`attach(model, init="dense")`, and what the closed-form decomposition lost: the relative
        Frobenius error ||W' - W|| / ||W|| of each role's stack, and over all roles ("all")."""
        layout = Layout(model)
        roles = layout.select_roles(self.options.roles)
        before = {r.name: layout.stack(model, r).clone() for r in roles}
        self.attach(model, init="dense")
        bank, after = getattr(model, BANK), Layout(model)
        errors, num, den = {}, 0.0, 0.0
        with torch.no_grad():
            for r in roles:
                w = torch.stack([bank.weight(m) for m in after.role_modules(model, r)]).to(before[r.name].dtype)
                d2, n2 = float((w - before[r.name]).pow(2).sum()), float(before[r.name].pow(2).sum())
                errors[r.name] = (d2 / n2) ** 0.5 if n2 else 0.0
                num, den = num + d2, den + n2
        errors["all"] = (num / den) ** 0.5 if den else 0.0
        return errors

    # -- helpers over an attached model --------------------------------------
    def _require_attached(self, model: nn.Module) -> Bank:
        spec = attached_constraint(model)
        if spec is None or spec.name != self.name:
            have = spec.name if spec else "none"
            raise LgframeError(f"model does not carry constraint '{self.name}' (it carries: {have}); attach it first")
        return getattr(model, BANK)

    def on_model(self, model: nn.Module) -> FactorizedConstraint:
        """This constraint with the options `model` resolved them to at attach."""
        return type(self)(**attached_constraint(model).options)

    def constrained_layers(self, model: nn.Module) -> list[ConstrainedLinear]:
        return [m for m in model.modules() if isinstance(m, ConstrainedLinear)]

    def scaler_stacks(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """role -> scaler name -> (L, ...) stacked over layers."""
        out: dict[str, dict[str, list]] = {}
        for m in sorted(self.constrained_layers(model), key=lambda m: m.layer):
            for k in self.scaler_names:
                out.setdefault(m.role, {}).setdefault(k, []).append(getattr(m, k).detach())
        return {r: {k: torch.stack(v) for k, v in d.items()} for r, d in out.items()}

    def _is_scaler(self, layout: Layout, name: str, role_names: set[str]) -> bool:
        split = layout.split_block_name(name)
        if split is None:
            return False
        module_path, _, leaf = split[1].rpartition(".")
        return leaf in self.scaler_names and f"{module_path}.weight" in role_names

    # -- learngene -------------------------------------------------------------
    def learngene(self, model: nn.Module) -> Learngene:
        """`learngene/<role>/<t>` for the bank's learngene (and free) tensors,
        `scalers/<role>/<t>` for its scaler tensors and every per-layer scaler
        stacked over layers, `rest/<name>` for the free parameters."""
        bank = self._require_attached(model)
        c = self.on_model(model)
        layout = Layout(model)
        tensors = {}
        roles = {}
        for role in layout.select_roles(c.options.roles):
            roles[role.name] = list(role.shape)
            for k, v in bank.factors[role.key].items():
                group = "scalers" if c.group_of(k) == "scalers" else "learngene"
                tensors[f"{group}/{role.name}/{k}"] = v.detach().clone()
        for role, d in c.scaler_stacks(model).items():
            for k, v in d.items():
                tensors[f"scalers/{role}/{k}"] = v.clone()
        names = set(roles)
        tensors |= c.rest_tensors(model, layout, names,
                                  skip=lambda n: n.startswith(BANK + ".") or c._is_scaler(layout, n, names))
        family, config = model_identity(model)
        return Learngene(c.name, c.spec.options, family, config, roles, tensors)

    # -- descend ---------------------------------------------------------------
    def descend(self, learngene: Learngene, model: nn.Module) -> nn.Module:
        c = self.with_options(roles=list(learngene.roles))
        layout, src_dims, dst_dims = c.prepare_target(learngene, model)
        c = c.with_options(**c.descent_options(learngene, layout, dst_dims))
        c.attach(model, layout, init="empty")
        bank = getattr(model, BANK)
        mods = c.constrained_layers(model)
        lg_shared, lg_scalers = learngene.group("learngene"), learngene.group("scalers")
        for name, shape in learngene.roles.items():
            role = layout.roles[name]
            shared = {k[len(name) + 1:]: v for k, v in lg_shared.items() if k.startswith(name + "/")}
            scalers = {k[len(name) + 1:]: v for k, v in lg_scalers.items() if k.startswith(name + "/")}
            current = {k: v.detach() for k, v in bank.factors[role.key].items()}
            new_shared, new_scalers = c.descend_role(role, tuple(shape), shared, scalers, current, src_dims, dst_dims)
            with torch.no_grad():
                for k, v in new_shared.items():
                    bank.factors[role.key][k].copy_(v)
                for m in mods:
                    if m.role == name:
                        for k, v in new_scalers.items():
                            getattr(m, k).copy_(v[m.layer])
        if c.options.freeze_learngene:
            for f in bank.factors.values():
                for k, p in f.items():
                    if c.group_of(k) == "learngene":
                        p.requires_grad_(False)
        return model

    # -- the rest of the contract ----------------------------------------------
    def materialize(self, model: nn.Module) -> nn.Module:
        """Bake dense weights; the model leaves as a plain model (lgframe-free state_dict)."""
        bank = self._require_attached(model)
        layout = Layout(model)
        with torch.no_grad():
            for role_name in attached_constraint(model).options["roles"]:
                role = layout.roles[role_name]
                for layer, mod in enumerate(layout.role_modules(model, role)):
                    lin = nn.Linear(mod.in_features, mod.out_features, bias=mod.bias is not None)
                    lin.weight.copy_(bank.weight(mod))
                    lin.weight.requires_grad_(True)
                    if mod.bias is not None:
                        lin.bias = mod.bias
                    set_submodule(layout.blocks(model)[layer], role.module_path, lin)
        delattr(model, BANK)
        delattr(model, SPEC_ATTR)
        remove_root_hooks(model)
        return model

    def param_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """{'learngene': bank tensors, 'scalers': per-layer scalers (and scaler-group bank
        tensors), 'free': the rest (and free-group bank tensors)}."""
        self._require_attached(model)
        c = self.on_model(model)
        layout = Layout(model)
        roles = set(c.options.roles or [])
        groups: dict[str, list[nn.Parameter]] = {"learngene": [], "scalers": [], "free": []}
        bank_scalers, bank_free = [], []
        for n, p in model.named_parameters():
            if n.startswith(BANK + "."):  # a bank parameter outside the factors (e.g. kind's soft gate) is free
                group = c.group_of(n.rsplit(".", 1)[-1]) if n.startswith(BANK + ".factors.") else "free"
                {"learngene": groups["learngene"], "scalers": bank_scalers, "free": bank_free}[group].append(p)
            elif c._is_scaler(layout, n, roles):
                groups["scalers"].append(p)
            else:
                groups["free"].append(p)
        groups["scalers"] = bank_scalers + groups["scalers"]
        groups["free"] = groups["free"] + bank_free
        return groups


def inherit_free(learngene: Learngene, model: nn.Module, layout: Layout, a: Dims, b: Dims) -> None:
    """The `rest: select` policy: every free parameter of `model` is taken from
    the ancestor's (frozen tables too: the DiT's sincos positions of another
    width differ, and the inherited weights expect the ancestor's), per-block ones interpolated over normalized depth, all of
    them by consistent width selection (new positions keep their fresh init)."""
    rest = learngene.rest_for(model)
    src_depth = model_depth(learngene.ancestor_config)
    role_names = set(learngene.roles)
    with torch.no_grad():
        for name, p in model.named_parameters():
            split = layout.split_block_name(name)
            if split is not None:
                layer, inner = split
                if inner in role_names:
                    continue  # constrained weight: the constraint initializes it
                keys = [f"{layout.blocks_path}.{l}.{inner}" for l in range(src_depth)]
                if not all(k in rest for k in keys):
                    continue
                lo, hi, w = depth_blend(src_depth, layout.depth, layer)
                src = torch.lerp(rest[keys[lo]], rest[keys[hi]], w) if w else rest[keys[lo]]
            elif name in rest:
                src = rest[name]
            else:
                continue
            p.copy_(select_width(src, p.detach(), a, b, name))


class TransformConstraint(Constraint):
    """A constraint that leaves training dense (FRONT, BoT, Weight Selection):
    the learngene is a transform of each trained role stack (L, m, n), and a
    descendant is a dense model of the target size. Subclasses implement
    `encode` and `decode`; attach only records the constraint (so its
    regularizer, if any, can run) and materialize removes the record."""

    def attach(self, model: nn.Module, layout: Layout | None = None, init: str = "random") -> nn.Module:
        self.refuse_other(model)
        layout = layout or Layout(model)
        self.with_options(roles=[r.name for r in layout.select_roles(self.options.roles)]).record(model)
        return model

    @abstractmethod
    def encode(self, role: Role, stack: torch.Tensor, dims: Dims) -> dict[str, torch.Tensor]:
        """Learngene tensors of one role from its dense stack (L, m, n); `dims` is the
        source model's width structure."""

    @abstractmethod
    def decode(self, role: Role, src_shape: tuple[int, int, int], tensors: dict[str, torch.Tensor], a: Dims, b: Dims,
               init: torch.Tensor) -> torch.Tensor:
        """The target role stack (L', m', n') = role.shape from the learngene
        tensors of that role; `init` is the target's own fresh stack (for
        positions a method leaves at their fresh init)."""

    def learngene(self, model: nn.Module) -> Learngene:
        layout = Layout(model)
        roles = layout.select_roles(self.options.roles)
        c = self.with_options(roles=[r.name for r in roles])
        dims = model_dims(model)  # the source's width structure, for encode
        tensors = {}
        for role in roles:
            for k, v in c.encode(role, layout.stack(model, role).float(), dims).items():
                tensors[f"learngene/{role.name}/{k}"] = v.contiguous()
        tensors |= c.rest_tensors(model, layout, {r.name for r in roles})
        family, config = model_identity(model)
        return Learngene(c.name, c.spec.options, family, config, {r.name: list(r.shape) for r in roles}, tensors)

    def descend(self, learngene: Learngene, model: nn.Module) -> nn.Module:
        c = self.with_options(roles=list(learngene.roles))
        layout, a, b = c.prepare_target(learngene, model)
        shared = learngene.group("learngene")
        with torch.no_grad():
            for name, src_shape in learngene.roles.items():
                role = layout.roles[name]
                tensors = {k[len(name) + 1:]: v for k, v in shared.items() if k.startswith(name + "/")}
                stack = c.decode(role, tuple(src_shape), tensors, a, b, layout.stack(model, role))
                if tuple(stack.shape) != role.shape:
                    raise RuntimeError(f"{self.name}.decode returned {tuple(stack.shape)} for role {name}, expected {role.shape}")
                for layer, mod in enumerate(layout.role_modules(model, role)):
                    mod.weight.copy_(stack[layer])
        return model

    def materialize(self, model: nn.Module) -> nn.Module:
        if hasattr(model, SPEC_ATTR):
            delattr(model, SPEC_ATTR)
        return model

    def param_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        return {"learngene": [], "scalers": [], "free": list(model.parameters())}
