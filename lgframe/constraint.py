"""The constraint contract, the registry, and the machinery constraints share.

A constraint rewrites the role weights of a model's repeated blocks into a
structured form whose shared part is the *learngene* (Lightning's `Strategy`
and PEFT's tuner base are the models: few methods, a registry that answers a
wrong name with the right ones).

| method | does |
|---|---|
| `attach(model, init="random"/"dense")` | role weights -> constrained form |
| `learngene(model)` | size-agnostic tensors + manifest |
| `descend(learngene, model)` | initialize a model of another size |
| `regularizer(model)` | extra loss term or None |
| `materialize(model)` | bake dense weights, remove the constraint |
| `param_groups(model)` | learngene / scalers / free |

Mechanism: shared factors live once in a *bank* module at the model root
(`model.lg_bank`); every constrained Linear is a `ConstrainedLinear` that owns
its per-layer scalers and its bias, and looks the bank up at call time through
an unregistered reference (never a reference to a factor tensor: FSDP2
replaces parameters with DTensors). So DDP sees every parameter once and FSDP2
keeps the bank in the root unit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import importlib.metadata
import logging
import warnings
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from lgframe.errors import LgframeError
from lgframe.layout import Dims, Layout, Role, depth_blend, dims_of, model_depth, model_dims, model_identity, select_width, set_submodule
from lgframe.learngene import Learngene

log = logging.getLogger("lgframe")

SPEC_ATTR = "lg_constraint_spec"  # plain attribute on the model root: the attached constraint
BANK = "lg_bank"  # the bank submodule at the model root
REST_POLICIES = ("select", "fresh")


# ------------------------------------------------------------------ spec + options
@dataclass
class ConstraintSpec:
    name: str
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"name": self.name, "options": dict(self.options)}


@dataclass
class BaseOptions:
    """Options every constraint takes."""

    roles: list[str] | None = None  # role names inside a block; None = attention + MLP projections
    rest: str = "select"  # free parameters of a descendant: select (from the ancestor) | fresh
    freeze_learngene: bool = True  # a descendant trains its scalers with the learngene frozen


def attached_constraint(model: nn.Module) -> ConstraintSpec | None:
    spec = getattr(model, SPEC_ATTR, None)
    return ConstraintSpec(**spec) if spec else None


# ------------------------------------------------------------------ layers
class ConstrainedLinear(nn.Module):
    """A Linear whose weight is computed by the bank: y = bank.linear(self, x).

    Holds the role's per-layer scalers (registered by the constraint) and the
    bias (a free parameter, same name as in the dense model)."""

    is_constrained_linear = True

    def __init__(self, role: Role, layer: int, bias: nn.Parameter | None, bank: "Bank"):
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
    """Shared tensors of a constraint: `factors[role.key][name]`."""

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


# ------------------------------------------------------------------ registry
_REGISTRY: dict[str, type["Constraint"]] = {}
_plugins_loaded = False


def register_constraint(cls: type["Constraint"]) -> type["Constraint"]:
    """Class decorator: makes `cls` available as `constraint: <cls.name>`."""
    _REGISTRY[cls.name] = cls
    return cls


def _load_plugins() -> None:
    global _plugins_loaded
    if _plugins_loaded:
        return
    _plugins_loaded = True
    import lgframe.strategies  # noqa: F401  (built-ins register at import)

    for ep in importlib.metadata.entry_points(group="lgframe.constraints"):
        try:
            obj = ep.load()
        except Exception as e:  # a broken plugin must not break lgframe
            warnings.warn(f"lgframe: constraint plugin '{ep.name}' ({ep.value}) failed to load: {e}")
            continue
        if isinstance(obj, type) and issubclass(obj, Constraint) and obj.name not in _REGISTRY:
            register_constraint(obj)


def constraint_names() -> list[str]:
    _load_plugins()
    return sorted(_REGISTRY)


def constraint_class(name: str) -> type["Constraint"]:
    _load_plugins()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, _REGISTRY, n=1)
        hint = f" Did you mean '{close[0]}'?" if close else ""
        raise LgframeError(
            f"unknown constraint '{name}'.{hint} Registered constraints: {', '.join(sorted(_REGISTRY))}. "
            "Third-party constraints register through the entry-point group 'lgframe.constraints'."
        )
    return _REGISTRY[name]


def get_constraint(spec: Any) -> "Constraint":
    """A constraint from a name, `{name: ..., **options}`, `{name:, options: {}}` or ConstraintSpec."""
    if isinstance(spec, Constraint):
        return spec
    if isinstance(spec, ConstraintSpec):
        return constraint_class(spec.name)(**spec.options)
    if isinstance(spec, str):
        return constraint_class(spec)()
    if hasattr(spec, "items"):
        d = dict(spec.items())
        if "name" not in d:
            raise LgframeError(f"constraint {d} has no `name`; registered: {', '.join(constraint_names())}")
        name = d.pop("name")
        options = dict(d.pop("options", None) or {}) | d
        return constraint_class(name)(**options)
    raise LgframeError(f"constraint must be a name or a mapping with `name`, got {spec!r}")


# ------------------------------------------------------------------ contract
class Constraint(ABC):
    """Base class of every constraint plugin. Subclasses set `name`, `Options`
    (a dataclass extending BaseOptions) and `bank_class`, and implement
    `build` (factors and scalers of one role) and `descend_role`."""

    name: ClassVar[str]
    Options: ClassVar[type] = BaseOptions
    bank_class: ClassVar[type[Bank] | None] = None
    scaler_names: ClassVar[tuple[str, ...]] = ()
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

    def check_options(self) -> None:
        """Validate option values (raise LgframeError naming the valid values)."""

    @property
    def spec(self) -> ConstraintSpec:
        return ConstraintSpec(self.name, dataclasses.asdict(self.options))

    # -- attach ------------------------------------------------------------
    def attach(self, model: nn.Module, layout: Layout | None = None, init: str = "random") -> nn.Module:
        """Rewrite the role weights in place into constrained form. Idempotent.
        init="empty" (used by descend, which fills every tensor) skips the random draw."""
        if init not in ("random", "dense", "empty"):
            raise LgframeError(f"attach init={init!r}; valid: random, dense")
        current = attached_constraint(model)
        if current is not None:
            if current.name != self.name:
                raise LgframeError(
                    f"model already carries constraint '{current.name}'; materialize it before attaching '{self.name}'"
                )
            return model
        layout = layout or Layout(model)
        roles = layout.select_roles(self.options.roles)
        bank = self.make_bank(model)
        built = {}
        for role in roles:
            stack = torch.empty(role.shape) if init == "empty" else layout.stack(model, role)
            shared, scalers = self.build(role, stack, init)
            bank.add(role, **shared)
            built[role.name] = scalers
        model.add_module(BANK, bank)
        for role in roles:
            for layer, old in enumerate(layout.role_modules(model, role)):
                new = ConstrainedLinear(role, layer, old.bias, bank)
                for k, v in built[role.name].items():
                    new.register_parameter(k, nn.Parameter(v[layer].contiguous().clone()))
                set_submodule(layout.blocks(model)[layer], role.module_path, new)
        self.options.roles = [r.name for r in roles]
        setattr(model, SPEC_ATTR, self.spec.to_dict())
        return model

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

    # -- helpers over an attached model --------------------------------------
    def _require_attached(self, model: nn.Module) -> nn.Module:
        spec = attached_constraint(model)
        if spec is None or spec.name != self.name:
            have = spec.name if spec else "none"
            raise LgframeError(f"model does not carry constraint '{self.name}' (it carries: {have}); attach it first")
        return getattr(model, BANK)

    def constrained_layers(self, model: nn.Module) -> list[ConstrainedLinear]:
        return [m for m in model.modules() if isinstance(m, ConstrainedLinear)]

    def scaler_stacks(self, model: nn.Module) -> dict[str, dict[str, torch.Tensor]]:
        """role -> scaler name -> (L, ...) stacked over layers."""
        out: dict[str, dict[str, list]] = {}
        for m in sorted(self.constrained_layers(model), key=lambda m: m.layer):
            for k in self.scaler_names:
                out.setdefault(m.role, {}).setdefault(k, []).append(getattr(m, k).detach())
        return {r: {k: torch.stack(v) for k, v in d.items()} for r, d in out.items()}

    # -- learngene -------------------------------------------------------------
    def learngene(self, model: nn.Module) -> Learngene:
        bank = self._require_attached(model)
        layout = Layout(model)
        tensors = {}
        roles = {}
        for role in layout.select_roles(self.options.roles):
            roles[role.name] = list(role.shape)
            for k, v in bank.factors[role.key].items():
                tensors[f"learngene/{role.name}/{k}"] = v.detach().clone()
        for role, d in self.scaler_stacks(model).items():
            for k, v in d.items():
                tensors[f"scalers/{role}/{k}"] = v.clone()
        tensors |= self.rest_tensors(model, layout, set(roles))
        family, config = model_identity(model)
        return Learngene(self.name, self.spec.options, family, config, roles, tensors)

    def rest_tensors(self, model: nn.Module, layout: Layout, role_names: set[str]) -> dict[str, torch.Tensor]:
        """`rest/<name>`: every parameter that is neither shared, nor a scaler, nor a role weight."""
        out = {}
        for n, p in model.named_parameters():
            split = layout.split_block_name(n)
            if n.startswith(BANK + ".") or self._is_scaler(layout, n, role_names):
                continue
            if split is not None and split[1] in role_names:
                continue
            out[f"rest/{n}"] = p.detach().clone()
        return out

    def _is_scaler(self, layout: Layout, name: str, role_names: set[str]) -> bool:
        split = layout.split_block_name(name)
        if split is None:
            return False
        module_path, _, leaf = split[1].rpartition(".")
        return leaf in self.scaler_names and f"{module_path}.weight" in role_names

    # -- descend ---------------------------------------------------------------
    def descend(self, learngene: Learngene, model: nn.Module) -> nn.Module:
        """Initialize `model` (a dense model of any supported size, fresh init)
        from `learngene`; the model leaves with this constraint attached."""
        layout, src_dims, dst_dims = self.prepare_target(learngene, model)
        self.prepare_descend(learngene, layout, dst_dims)
        self.attach(model, layout, init="empty")
        bank = getattr(model, BANK)
        mods = self.constrained_layers(model)
        for name, shape in learngene.roles.items():
            role = layout.roles[name]
            shared = {k[len(name) + 1:]: v for k, v in learngene.group("learngene").items() if k.startswith(name + "/")}
            scalers = {k[len(name) + 1:]: v for k, v in learngene.group("scalers").items() if k.startswith(name + "/")}
            current = {k: v.detach() for k, v in bank.factors[role.key].items()}
            new_shared, new_scalers = self.descend_role(role, tuple(shape), shared, scalers, current, src_dims, dst_dims)
            with torch.no_grad():
                for k, v in new_shared.items():
                    bank.factors[role.key][k].copy_(v)
                for m in mods:
                    if m.role == name:
                        for k, v in new_scalers.items():
                            getattr(m, k).copy_(v[m.layer])
        if self.options.freeze_learngene:
            for p in bank.parameters():
                p.requires_grad_(False)
        return model

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
        self.options.roles = list(learngene.roles)
        self.check_target(learngene, layout, src_dims, dst_dims)
        if self.options.rest == "select":
            self.descend_free(learngene, model, layout, src_dims, dst_dims)
        return layout, src_dims, dst_dims

    def descend_free(self, learngene: Learngene, model: nn.Module, layout: Layout, a: Dims, b: Dims) -> None:
        """Free parameters of the descendant from the ancestor's (`rest: select`)."""
        inherit_free(learngene, model, layout, a, b)

    def check_target(self, learngene: Learngene, layout: Layout, a: Dims, b: Dims) -> None:
        """Raise LgframeError when the target size is not supported (before any training)."""
        missing = [r for r in learngene.roles if r not in layout.roles]
        if missing:
            raise LgframeError(f"target model has no role(s) {missing}; its roles: {', '.join(layout.roles)}")

    def prepare_descend(self, learngene: Learngene, layout: Layout, dims: Dims) -> None:
        """Adjust options (e.g. ranks) for the target before `attach` creates the parameters."""

    @abstractmethod
    def descend_role(
        self, role: Role, src_shape: tuple, shared: dict, scalers: dict, current: dict, a: Dims, b: Dims
    ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """Shared tensors and scaler stacks (L', ...) for the target role `role`
        from the ancestor's (`current` holds the freshly attached target tensors)."""

    # -- the rest of the contract ----------------------------------------------
    def regularizer(self, model: nn.Module) -> torch.Tensor | None:
        return None

    def step_context(self, model: nn.Module, step: int, seed: int = 0):
        """Context the training loop runs each training forward in (e.g. tucker's
        width-wise stochastic scaling); a no-op by default."""
        return contextlib.nullcontext()

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
        return model

    def lr_scales(self) -> dict[str, float]:
        """Learning rate of a param group relative to optim.lr when the recipe sets none for it
        (optim.learngene_lr / optim.scaler_lr win). Default: every group at optim.lr."""
        return {}

    def param_groups(self, model: nn.Module) -> dict[str, list[nn.Parameter]]:
        """{'learngene': bank tensors, 'scalers': per-layer scalers, 'free': the rest}."""
        self._require_attached(model)
        layout = Layout(model)
        roles = set(self.options.roles or [])
        groups: dict[str, list[nn.Parameter]] = {"learngene": [], "scalers": [], "free": []}
        for n, p in model.named_parameters():
            if n.startswith(BANK + "."):
                groups["learngene"].append(p)
            elif self._is_scaler(layout, n, roles):
                groups["scalers"].append(p)
            else:
                groups["free"].append(p)
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
        current = attached_constraint(model)
        if current is not None and current.name != self.name:
            raise LgframeError(
                f"model already carries constraint '{current.name}'; materialize it before attaching '{self.name}'"
            )
        layout = layout or Layout(model)
        self.options.roles = [r.name for r in layout.select_roles(self.options.roles)]
        setattr(model, SPEC_ATTR, self.spec.to_dict())
        return model

    def build(self, role, stack, init):  # never called: the weights stay dense
        raise NotImplementedError

    def descend_role(self, *args, **kwargs):  # never called: see decode
        raise NotImplementedError

    @abstractmethod
    def encode(self, role: Role, stack: torch.Tensor) -> dict[str, torch.Tensor]:
        """Learngene tensors of one role from its dense stack (L, m, n)."""

    @abstractmethod
    def decode(self, role: Role, src_shape: tuple[int, int, int], tensors: dict[str, torch.Tensor], a: Dims, b: Dims,
               init: torch.Tensor) -> torch.Tensor:
        """The target role stack (L', m', n') = role.shape from the learngene
        tensors of that role; `init` is the target's own fresh stack (for
        positions a method leaves at their fresh init)."""

    def learngene(self, model: nn.Module) -> Learngene:
        layout = Layout(model)
        roles = layout.select_roles(self.options.roles)
        self.options.roles = [r.name for r in roles]
        self.dims = model_dims(model)  # the source's width structure, for encode
        tensors = {}
        for role in roles:
            for k, v in self.encode(role, layout.stack(model, role).float()).items():
                tensors[f"learngene/{role.name}/{k}"] = v.contiguous()
        tensors |= self.rest_tensors(model, layout, {r.name for r in roles})
        family, config = model_identity(model)
        return Learngene(self.name, self.spec.options, family, config, {r.name: list(r.shape) for r in roles}, tensors)

    def descend(self, learngene: Learngene, model: nn.Module) -> nn.Module:
        layout, a, b = self.prepare_target(learngene, model)
        shared = learngene.group("learngene")
        with torch.no_grad():
            for name, src_shape in learngene.roles.items():
                role = layout.roles[name]
                tensors = {k[len(name) + 1:]: v for k, v in shared.items() if k.startswith(name + "/")}
                stack = self.decode(role, tuple(src_shape), tensors, a, b, layout.stack(model, role))
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
