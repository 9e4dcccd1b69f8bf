"""LightningModules: DiffusionTask (DiT, noise prediction) and ClassificationTask (ViT).

Both take a recipe (a plain dict) and a model. The constraint is attached in
`configure_model()` (idempotent, before DDP/FSDP wrap the model); under
FSDP2 (`ModelParallelStrategy`) the same hook then shards every block and
last the root, which owns the shared learngene bank, so the bank's gradients
are reduced once. The regularizer joins the loss and `param_groups`
(learngene / scalers / free) become optimizer groups with their own learning
rates; a group whose rate is 0 is frozen (`requires_grad=False`, outside the
optimizer). A descendant's phase 1 (before `init.unfreeze_at`) freezes the
learngene: on one process it has `requires_grad=False` (no gradient computed);
under DDP/FSDP, which fix the set of trainable parameters when they wrap the
model, its gradient is computed but dropped after the reduction, before the
clip norm and the optimizer see it. Either way it takes no part in the clip
norm and gets no optimizer state. Phase 2 brings it in with its own linear
warmup (`init.unfreeze_warmup`).
"""

from __future__ import annotations

import contextlib

import lightning.pytorch as pl
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler
from rich.progress import track
from torch.distributed.fsdp import fully_shard
from torchmetrics.classification import MulticlassAccuracy
from typing_extensions import override

from lgframe.core.constraint import FactorizedConstraint, attached_constraint, log
from lgframe.core.layout import Layout, model_dims
from lgframe.core.registry import get_constraint
from lgframe.errors import LgframeError
from lgframe.formats.checkpoints import load_checkpoint
from lgframe.models.files import model_meta, read_model
from lgframe.models.nested import nested_subnetwork, sample_size
from lgframe.training.recipes import check_multisize_trainer, multisize_on, multisize_sizes
from lgframe.training.speed import compile_blocks, set_activation_checkpointing

SAMPLERS = {"ddim": DDIMScheduler, "ddpm": DDPMScheduler, "dpm": DPMSolverMultistepScheduler}


def warmup(step: int, steps: int) -> float:
    """The linear warmup factor of the learning rate at optimizer step `step` (0-based)."""
    return min(1.0, (step + 1) / steps) if steps else 1.0


def lr_decay(schedule: str, total: int, warm: int):
    """The factor of `optim.schedule` after the warmup at optimizer step `step`: diffusers'
    get_scheduler curve (cosine or linear, to 0 at `total`) over the steps after `warm`;
    constant: 1. Multiplied with `warmup`, the linear warmup."""
    if schedule == "constant":
        return lambda step: 1.0
    from diffusers.optimization import get_scheduler  # deferred: diffusers' optimization module

    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)  # only its curve is used
    curve = get_scheduler(schedule, probe, num_warmup_steps=0, num_training_steps=max(1, total - warm)).lr_lambdas[0]
    return lambda step: curve(max(0, step - warm))


class LgTask(pl.LightningModule):
    def __init__(self, recipe: dict, model: nn.Module, init_mode: str = "random"):
        super().__init__()
        self.save_hyperparameters({"recipe": recipe})
        self.recipe = recipe
        self.model = model
        self.init_mode = init_mode  # how configure_model attaches: random | dense | plain (attach nothing)
        spec = attached_constraint(model)
        # plain: a descendant materialized from its learngene (init.materialize) trains dense
        self.constraint = get_constraint("scratch" if init_mode == "plain" else spec.to_dict() if spec else recipe["constraint"])
        self.teacher = None
        if recipe.get("teacher"):

            teacher = read_model(recipe["teacher"])[0].eval().requires_grad_(False)
            check_same_inputs(model, teacher, "teacher")
            # Unregistered: the teacher is neither trained, nor sharded, nor saved in checkpoints.
            object.__setattr__(self, "teacher", teacher)

    @override
    def on_fit_start(self) -> None:
        if self.teacher is not None:
            self.teacher.to(self.device)

    @override
    def on_validation_start(self) -> None:  # the step-0 validation runs before fit
        self.on_fit_start()

    def log_teacher_match(self, student: torch.Tensor, teacher: torch.Tensor, teacher_loss: torch.Tensor) -> None:
        """val/teacher_error: ||student - teacher|| / ||teacher|| of the outputs on this batch;
        val/teacher_loss: the teacher's own task loss on it."""
        err = (student - teacher).norm() / teacher.norm().clamp_min(1e-12)
        self.log("val/teacher_error", err, on_epoch=True, sync_dist=True)
        self.log("val/teacher_loss", teacher_loss, on_epoch=True, sync_dist=True)

    def distill(self, task_loss: torch.Tensor, student: torch.Tensor, teacher_out, stage: str) -> torch.Tensor:
        """task_weight * task loss + weight * match-the-teacher term (logged as {stage}/distill)."""
        d = self.recipe["distill"]
        term = self.match_teacher(student, teacher_out)
        self.log(f"{stage}/distill", term, on_step=stage == "train", on_epoch=stage != "train", sync_dist=stage != "train")
        return d["task_weight"] * task_loss + d["weight"] * term

    @override
    def configure_model(self) -> None:
        # A generator of its own: Lightning re-seeds the global one at a point that
        # depends on the strategy, and 1 and 2 processes must start from one init.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.recipe["seed"])
            if self.init_mode == "dense" and attached_constraint(self.model) is None and \
                    isinstance(self.constraint, FactorizedConstraint):
                self._warn_lossy(self.constraint.attach_dense(self.model))
            else:
                self.constraint.attach(self.model, init=self.init_mode)
        groups = self.constraint.param_groups(self.model)
        if self.recipe["init"]["unfreeze_at"] >= 0:
            # Trained from `unfreeze_at` on. Under DDP/FSDP it must be trainable when they wrap
            # the model; on one process it is switched on at `unfreeze_at` (on_train_batch_start).
            self._phase1 = list(groups["learngene"])
            for p in self._phase1:
                p.requires_grad_(self._distributed())
        for name, rate in self._rates().items():
            if rate == 0:  # a rate of 0 freezes: no gradient, not in the optimizer, bit-identical
                for p in groups[name]:
                    p.requires_grad_(False)
        t = self.recipe.get("trainer", {})
        if t.get("activation_checkpointing"):
            set_activation_checkpointing(self.model)
        if t.get("compile") and not getattr(self.model, "_lg_compiled", False):
            compile_blocks(self.model)
            self.model._lg_compiled = True
        mesh = self.device_mesh
        if mesh is not None and not getattr(self.model, "_lg_sharded", False):

            dp = mesh["data_parallel"]
            for block in Layout(self.model).blocks(self.model):
                fully_shard(block, mesh=dp)
            fully_shard(self.model, mesh=dp)  # the root unit: bank, embeddings, head
            for mod in self.children():
                if mod is not self.model and any(True for _ in mod.parameters()):
                    fully_shard(mod, mesh=dp)  # task-side parameters (a MIM decoder) sync too
            self.model._lg_sharded = True
        self.check_multisize()

    # -- multi-size pre-training (WeiT; recipe section `multisize`) ---------------------
    def multisize_sizes(self) -> tuple[list[int], list[float]] | None:
        """(depths, width ratios) the `multisize` section draws from, resolved and checked for the
        model this task trains (once); None when the section is off."""
        if "_lg_multisize" not in self.__dict__:
            ms = self.recipe.get("multisize")
            sizes = None
            if multisize_on(ms):
                sizes = multisize_sizes(ms, len(Layout(self.model).blocks(self.model)), model_dims(self.model),
                                        self.constraint)
            self.__dict__["_lg_multisize"] = sizes
        return self.__dict__["_lg_multisize"]

    def check_multisize(self) -> None:
        """Before training: the sizes against the model, and a shallower sub-network under plain DDP
        (the skipped blocks get no gradient, which DDP refuses on the second step)."""
        sizes = self.multisize_sizes()
        if sizes is None:
            return
        check_multisize_trainer(self.recipe.get("trainer", {}))
        if self._trainer is None or min(sizes[0]) == len(Layout(self.model).blocks(self.model)):
            return
        from lightning.pytorch.strategies import DDPStrategy

        strategy = self.trainer.strategy
        if isinstance(strategy, DDPStrategy) and not getattr(strategy, "_ddp_kwargs", {}).get("find_unused_parameters"):
            raise LgframeError(f"multisize.depths {sizes[0]} skip blocks in some steps, which get no gradient then: "
                               "under DDP set trainer.strategy=ddp_find_unused_parameters_true")

    def multisize_choice(self, step: int) -> tuple[int, float] | None:
        """The (depth, width ratio) optimizer step `step` trains, a function of (seed, step) only
        (every rank, and a resumed run, draws the same); None: the full model (off, or a step
        between draws under `multisize.every`)."""
        sizes = self.multisize_sizes()
        if sizes is None or step % int(self.recipe["multisize"].get("every", 1)):
            return None
        return sample_size(*sizes, self.recipe["seed"], step)

    def multisize_context(self, step: int):
        """The context a training step's forward runs in: the drawn nested sub-network
        (lgframe.models.nested.nested_subnetwork; the backward follows the graph it built), or a
        no-op. The drawn size is logged as train/depth and train/width."""
        choice = self.multisize_choice(step) if self.model.training else None
        if choice is None:
            return contextlib.nullcontext()
        depth, ratio = choice
        self.log("train/depth", float(depth), on_step=True, on_epoch=False)
        self.log("train/width", float(round(ratio * model_dims(self.model).width)), on_step=True, on_epoch=False)
        return nested_subnetwork(self.model, depth, ratio)

    def _warn_lossy(self, errors: dict[str, float]) -> None:
        """A dense init.source decomposed in closed form: say what it lost (a refit, which trains
        against the dense teacher, starts from it on purpose)."""
        from lgframe.training.refit import LOSSY, lossy_message

        self.dense_weight_error = errors
        if errors["all"] > LOSSY and not self.recipe.get("teacher") and self.global_rank == 0:
            log.warning("init.source: %s", lossy_message(self.recipe["init"]["source"], self.constraint.name, errors))
        else:
            log.info("init.source decomposed into %s: relative weight error %.3f", self.constraint.name, errors["all"])

    def _distributed(self) -> bool:
        trainer = self._trainer
        return trainer is not None and trainer.world_size > 1

    def _rates(self) -> dict[str, float]:
        """The learning rate of each parameter group: optim.learngene_lr / scaler_lr where set
        (0 freezes the group), else optim.lr times the constraint's scale for the group."""
        o, scales = self.recipe["optim"], self.constraint.lr_scales()
        given = {"learngene": o["learngene_lr"], "scalers": o["scaler_lr"], "free": None}
        return {n: float(v) if v is not None else o["lr"] * scales.get(n, 1.0) for n, v in given.items()}

    def _in_phase1(self) -> bool:
        return bool(getattr(self, "_phase1", None)) and self.global_step < self.recipe["init"]["unfreeze_at"]

    @override
    def on_train_batch_start(self, batch, batch_idx) -> None:
        """Phase 2 on one process: the learngene gets gradients from `unfreeze_at` on."""
        if getattr(self, "_phase1", None) and not self._distributed() and not self._in_phase1():
            if self._rates()["learngene"] > 0:
                for p in self._phase1:
                    p.requires_grad_(True)

    def extra_parameters(self) -> list[nn.Parameter]:
        """Trainable parameters of the task outside the model (e.g. a MIM decoder)."""
        return []

    # -- optimization -------------------------------------------------------
    @override
    def configure_optimizers(self):
        o = self.recipe["optim"]
        groups = self.constraint.param_groups(self.model)
        groups["free"] = groups["free"] + self.extra_parameters()
        rates = self._rates()
        later = {id(p) for p in getattr(self, "_phase1", [])} if rates["learngene"] > 0 else set()
        members = {n: [p for p in ps if p.requires_grad or id(p) in later] for n, ps in groups.items()}
        names = [n for n, ps in members.items() if ps]
        param_groups = [{"params": members[n], "lr": rates[n], "name": n} for n in names]
        if o["name"] == "sgd":
            opt = torch.optim.SGD(param_groups, lr=o["lr"], momentum=0.9, weight_decay=o["weight_decay"])
        else:  # the fused kernel on CUDA (one launch for all parameters), as timm and torchtitan use it
            fused = all(p.is_cuda for g in param_groups for p in g["params"]) or None
            opt = torch.optim.AdamW(param_groups, lr=o["lr"], weight_decay=o["weight_decay"], fused=fused)
        warm, at = o["warmup_steps"], self.recipe["init"]["unfreeze_at"]
        again = self.recipe["init"].get("unfreeze_warmup")
        again = warm if again is None else again
        decay = lr_decay(o.get("schedule", "constant"), self.recipe["trainer"]["max_steps"], warm)

        def factor(name):
            def f(step):
                if name == "learngene" and at >= 0:
                    # phase 1: frozen (no gradient reaches the optimizer); phase 2: a warmup of its own
                    return 0.0 if step < at else warmup(step - at, again) * decay(step)
                return warmup(step, warm) * decay(step)

            return f

        sched = torch.optim.lr_scheduler.LambdaLR(opt, [factor(n) for n in names])
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @override
    def on_before_optimizer_step(self, optimizer) -> None:
        """The NaN/Inf guard. Gradients are checked after DDP/FSDP reduced them, so
        every rank takes the same decision; a skipped step leaves the weights and
        the optimizer state untouched (optimizers skip parameters without grad)."""
        if self._in_phase1():  # DDP/FSDP computed (and reduced) it; phase 1 drops it before clip and step
            for p in self._phase1:
                p.grad = None
        params = [p for p in self.parameters() if p.grad is not None]
        if all(torch.isfinite(p.grad).all() for p in params):
            return
        self._bad_steps = getattr(self, "_bad_steps", 0) + 1
        budget = self.recipe["trainer"]["nan_skip"]
        if self._bad_steps <= budget:
            log.warning("step %d: non-finite gradient, step skipped (%d of trainer.nan_skip=%d)",
                        self.global_step, self._bad_steps, budget)
            for p in params:
                p.grad = None
            return
        o, spec = self.recipe["optim"], attached_constraint(self.model)
        rank = f", constraint options {spec.options.get('rank')}" if spec and "rank" in spec.options else ""
        raise LgframeError(
            f"non-finite loss or gradient at step {self.global_step}: the run stopped and saved nothing from this "
            f"step; {self._kept()}. Likely causes: a learning rate too high (optim.lr={o['lr']}, "
            f"scaler_lr={o['scaler_lr']}) or a constraint rank too small for this model{rank}. Lower the rate, "
            f"add optim.warmup_steps, or set trainer.nan_skip=N to skip up to N bad steps."
        )

    def _kept(self) -> str:
        """What a stopped run leaves behind, truthfully."""
        folder = getattr(self, "checkpoint_dir", None)
        last = folder / "last.ckpt" if folder is not None else None
        if last is not None and last.exists():

            try:
                step = load_checkpoint(last / "meta.pt" if last.is_dir() else last).get("global_step", "?")
            except LgframeError:
                step = "?"
            return f"the last checkpoint, from step {step}, is kept ({last}; resume=auto continues from it)"
        every = self.recipe["trainer"]["checkpoint_every"]
        why = "trainer.checkpoint_every=0 saves only at the end" if not every else f"none was due yet (every {every} steps)"
        return f"no checkpoint was saved before it ({why}), so nothing was kept"

    @override
    def on_validation_epoch_end(self) -> None:
        # Optimizer steps done, as a metric: Lightning's own `step` column counts
        # differently inside and outside `fit` and across a resume.
        self.log("steps", float(self.global_step), sync_dist=False, rank_zero_only=True)

    def total_loss(self, task_loss: torch.Tensor, stage: str) -> torch.Tensor:
        self.log(f"{stage}/loss", task_loss, prog_bar=True, on_step=stage == "train", on_epoch=stage != "train",
                 sync_dist=stage != "train")
        reg = self.constraint.regularizer(self.model) if stage == "train" else None
        if reg is None:
            return task_loss
        self.log("train/regularizer", reg)
        return task_loss + reg

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["lgframe"] = model_meta(self.model)
        # The global generator draws the diffusion noise, timesteps, label dropout and
        # augmentation: restoring it makes a resumed run continue the same stream.
        checkpoint["lgframe_rng"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            checkpoint["lgframe_rng"]["cuda"] = torch.cuda.get_rng_state_all()

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("lgframe_rng")
        if rng:
            torch.set_rng_state(rng["torch"])
            if "cuda" in rng and torch.cuda.is_available():
                torch.cuda.set_rng_state_all(rng["cuda"])


class DiffusionTask(LgTask):
    """DDPM noise prediction, class-conditional with label dropout for CFG."""

    def __init__(self, recipe: dict, model: nn.Module, init_mode: str = "random"):
        super().__init__(recipe, model, init_mode)
        d = recipe["diffusion"]
        self.noise_scheduler = DDPMScheduler(
            num_train_timesteps=d["num_train_timesteps"], beta_schedule=d["beta_schedule"],
            clip_sample=d.get("clip_sample", True), clip_sample_range=d.get("clip_range", 1.0),
            prediction_type=d.get("prediction", "epsilon"),
        )
        self.null_class = model.config.num_classes

    def diffusion_loss(self, batch, generator: torch.Generator | None = None, dropout: float = 0.0, stage: str | None = None):
        x, y = batch
        T = self.noise_scheduler.config.num_train_timesteps
        noise = torch.randn(x.shape, generator=generator, device="cpu").to(x.device)
        t = torch.randint(0, T, (x.shape[0],), generator=generator, device="cpu").to(x.device)
        if dropout > 0:
            drop = torch.rand(y.shape, device=y.device) < dropout
            y = torch.where(drop, torch.full_like(y, self.null_class), y)
        x_t = self.noise_scheduler.add_noise(x, noise, t)
        pred = self.model(x_t, t, y)[:, : x.shape[1]]  # extra (sigma) channels unused
        loss = F.mse_loss(pred, self.target(x, noise, t))
        if self.teacher is not None and stage is not None:
            with torch.no_grad():
                target = self.teacher(x_t, t, y)[:, : x.shape[1]]
            if stage == "train":
                loss = self.distill(loss, pred, target, stage)
            else:  # validation stays the task loss; beside it, how far the student is from the teacher
                self.log_teacher_match(pred, target, F.mse_loss(target, self.target(x, noise, t)))
        return loss

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the model learns to output under `diffusion.prediction` (the noise by default)."""
        kind = self.noise_scheduler.config.prediction_type
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(x0, noise, t)
        return x0 if kind == "sample" else noise

    def match_teacher(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(student, teacher)  # WAVE for a DiT: the teacher's noise prediction

    @override
    def training_step(self, batch, batch_idx):
        with self.constraint.step_context(self.model, self.global_step, self.recipe["seed"]), \
                self.multisize_context(self.global_step):
            loss = self.diffusion_loss(batch, dropout=self.label_dropout, stage="train")
        return self.total_loss(loss, "train")

    @property
    def label_dropout(self) -> float:
        # objective: self_supervised trains without labels: every step sees the null class.
        return 1.0 if self.recipe.get("objective") == "self_supervised" else self.recipe["diffusion"]["label_dropout"]

    @override
    def validation_step(self, batch, batch_idx):
        # Fixed noise and timesteps per batch: validation losses compare across runs.
        g = torch.Generator().manual_seed(1000 + batch_idx)
        self.total_loss(self.diffusion_loss(batch, generator=g, dropout=float(self.label_dropout == 1.0), stage="val"),
                        "val")

    @torch.no_grad()
    def sample(
        self,
        labels: torch.Tensor,
        guidance: float | None = None,
        steps: int | None = None,
        scheduler: str | None = None,
        seed: int | None = None,
        progress: bool = False,
        uncond_model: nn.Module | None = None,
        batch_size: int = 500,
    ) -> torch.Tensor:
        """Images (n, C, H, W) in [-1, 1] for class `labels` (n,), or conditioning tokens (n, D) /
        (n, S, D) (a DiT's token conditioning; the null class is then its table row), with classifier-free guidance
        (clamped to [-clip_range, clip_range] under `diffusion.clip_sample`, the default, as the
        sampler clips its predicted x0; without it, unbounded data keep their range):
        eps = eps_u(x_t, null) + guidance * (eps(x_t, c) - eps_u(x_t, null)).

        The unconditional term comes from the model's own null class, or from
        `uncond_model` (a swapped prior: any model taking the same inputs, e.g.
        the base model a fine-tune started from; its own null class is used).
        guidance 1 is the conditional model alone. lgframe's DiT takes one
        condition, so the dual-condition rule (swap only eps(x_t, null, null))
        does not apply to it."""
        s = self.recipe["sample"]
        guidance = s["guidance"] if guidance is None else guidance
        steps = steps or s["steps"]
        kind = scheduler or s["scheduler"]
        if kind not in SAMPLERS:
            raise LgframeError(f"sample scheduler {kind!r}; valid: {', '.join(SAMPLERS)}")
        cfg = self.model.config
        if uncond_model is not None:
            check_same_inputs(self.model, uncond_model)
        seed = s["seed"] if seed is None else seed
        g = torch.Generator().manual_seed(seed)
        x_all = torch.randn((len(labels), cfg.in_channels, cfg.image_size, cfg.image_size), generator=g)
        # one generator per sample for a stochastic sampler's fresh noise (diffusers' randn_tensor
        # takes a list): sample i gets the same noise whatever the batch size
        per_sample = [torch.Generator().manual_seed(seed * 1_000_003 + 1 + i) for i in range(len(labels))]
        out = []
        for start in range(0, len(labels), batch_size):
            out.append(self._sample_batch(x_all[start:start + batch_size].to(self.device),
                                          labels[start:start + batch_size].to(self.device),
                                          guidance, steps, kind, per_sample[start:start + batch_size],
                                          progress and start == 0, uncond_model))
        return torch.cat(out)

    def _sample_batch(self, x, labels, guidance, steps, kind, g, progress, uncond_model):
        # diffusers' timestep_spacing: leading (first step t = 980 of 1000 at 50 steps), trailing (t = 999)
        sched = SAMPLERS[kind].from_config(self.noise_scheduler.config,
                                           timestep_spacing=self.recipe["sample"].get("spacing", "leading"))
        sched.set_timesteps(steps)
        # DDIM with clipping: the direction term uses the noise implied by the clipped x0, not the raw guided one
        extra = {"use_clipped_model_output": True} if kind == "ddim" and sched.config.clip_sample else {}
        if labels.is_floating_point() and labels.dim() == 3:  # a token sequence: the DiT sums it anyway
            labels = labels.sum(1)
        null = null_condition(self.model, labels)
        models = [self.model] + ([uncond_model] if uncond_model is not None else [])
        modes = [m.training for m in models]
        for m in models:
            m.eval()
        timesteps = sched.timesteps
        if progress:

            timesteps = track(timesteps, description=f"sampling ({kind}, {steps} steps)")
        for t in timesteps:
            tt = torch.full((len(labels),), int(t), device=x.device)
            if guidance == 1.0:
                eps = self.model(x, tt, labels)[:, : x.shape[1]]
            elif uncond_model is None:  # conditional and unconditional in one batched forward
                both = self.model(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([labels, null]))[:, : x.shape[1]]
                cond, uncond = both.chunk(2)
                eps = uncond + guidance * (cond - uncond)
            else:
                cond = self.model(x, tt, labels)[:, : x.shape[1]]
                other_null = null_condition(uncond_model, labels)
                uncond = uncond_model(x, tt, other_null)[:, : x.shape[1]]
                eps = uncond + guidance * (cond - uncond)
            x = sched.step(eps, t, x, generator=g, **extra).prev_sample if kind != "dpm" else sched.step(eps, t, x).prev_sample
        for m, mode in zip(models, modes):
            m.train(mode)
        c = self.noise_scheduler.config
        return x.clamp(-c.clip_sample_range, c.clip_sample_range) if c.clip_sample else x


def null_condition(model: nn.Module, labels: torch.Tensor) -> torch.Tensor:
    """`model`'s null class in the form of `labels`: indices (B,), or for token conditioning
    (labels (B, D) floating point) the null class's table row, (B, D)."""
    if not labels.is_floating_point():
        return torch.full_like(labels, model.config.num_classes)
    null = torch.full((labels.shape[0],), model.config.num_classes, dtype=torch.long, device=labels.device)
    return model.y_embedder.token(null).detach().to(labels.dtype)


def check_same_inputs(model: nn.Module, other: nn.Module, what: str = "the unconditional prior") -> None:
    """`other` takes `model`'s inputs (a teacher also its classes; a prior has its own null class)."""
    a, b = model.config, other.config
    keys = ("image_size", "in_channels") + (("num_classes",) if what == "teacher" else ())
    same = getattr(b, "family", None) == a.family and all(getattr(a, k) == getattr(b, k, None) for k in keys)
    if not same:
        raise LgframeError(
            f"{what} must take the same inputs as the model: model {a.family} "
            f"{a.image_size}x{a.image_size}x{a.in_channels}, {what} {getattr(b, 'family', type(other).__name__)} "
            f"{getattr(b, 'image_size', '?')}x{getattr(b, 'image_size', '?')}x{getattr(b, 'in_channels', '?')}"
        )


class ClassificationTask(LgTask):
    """ViT classification with torchmetrics accuracy."""

    def __init__(self, recipe: dict, model: nn.Module, init_mode: str = "random"):
        super().__init__(recipe, model, init_mode)
        n = model.config.num_classes
        self.train_acc = MulticlassAccuracy(num_classes=n, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes=n, average="micro")
        # objective: self_supervised -> masked image modeling (SimMIM-style): masked
        # patches are zeroed in the input, a linear decoder (part of the task, not the
        # model, so learngenes and exports are unchanged) predicts their pixels.
        self.mim_decoder = None
        self._val_batch = 0
        if recipe.get("objective") == "self_supervised":
            c = model.config
            self.mim_decoder = nn.Linear(c.width, c.patch_size**2 * c.in_channels)

    def _warn_lossy(self, errors: dict[str, float]) -> None:
        """A dense init.source decomposed in closed form: say what it lost (a refit, which trains
        against the dense teacher, starts from it on purpose)."""
        from lgframe.training.refit import LOSSY, lossy_message

        self.dense_weight_error = errors
        if errors["all"] > LOSSY and not self.recipe.get("teacher") and self.global_rank == 0:
            log.warning("init.source: %s", lossy_message(self.recipe["init"]["source"], self.constraint.name, errors))
        else:
            log.info("init.source decomposed into %s: relative weight error %.3f", self.constraint.name, errors["all"])

    def _distributed(self) -> bool:
        trainer = self._trainer
        return trainer is not None and trainer.world_size > 1

    def _rates(self) -> dict[str, float]:
        """The learning rate of each parameter group: optim.learngene_lr / scaler_lr where set
        (0 freezes the group), else optim.lr times the constraint's scale for the group."""
        o, scales = self.recipe["optim"], self.constraint.lr_scales()
        given = {"learngene": o["learngene_lr"], "scalers": o["scaler_lr"], "free": None}
        return {n: float(v) if v is not None else o["lr"] * scales.get(n, 1.0) for n, v in given.items()}

    def _in_phase1(self) -> bool:
        return bool(getattr(self, "_phase1", None)) and self.global_step < self.recipe["init"]["unfreeze_at"]

    @override
    def on_train_batch_start(self, batch, batch_idx) -> None:
        """Phase 2 on one process: the learngene gets gradients from `unfreeze_at` on."""
        if getattr(self, "_phase1", None) and not self._distributed() and not self._in_phase1():
            if self._rates()["learngene"] > 0:
                for p in self._phase1:
                    p.requires_grad_(True)

    def extra_parameters(self) -> list[nn.Parameter]:
        return list(self.mim_decoder.parameters()) if self.mim_decoder is not None else []

    def mim_loss(self, x: torch.Tensor, stage: str) -> torch.Tensor:
        """MSE on the pixels of the masked patches (a fixed mask per batch in validation)."""
        c = self.model.config
        p, side = c.patch_size, c.image_size // c.patch_size
        B, n = x.shape[0], side * side
        g = torch.Generator().manual_seed(1000 + self._val_batch) if stage == "val" else None
        k = max(1, round(self.recipe["mim"]["mask_ratio"] * n))
        order = torch.rand(B, n, generator=g).argsort(dim=1).to(x.device)
        mask = torch.zeros(B, n, dtype=torch.bool, device=x.device).scatter_(1, order[:, :k], True)
        pixel_mask = mask.view(B, 1, side, 1, side, 1).expand(B, 1, side, p, side, p).reshape(B, 1, side * p, side * p)
        tokens = self.model.forward_tokens(x * ~pixel_mask)[:, 1:]  # (B, n, width)
        pred = self.mim_decoder(tokens)  # (B, n, p*p*C)
        target = x.view(B, c.in_channels, side, p, side, p).permute(0, 2, 4, 3, 5, 1).reshape(B, n, -1)
        return F.mse_loss(pred[mask], target[mask])

    def step(self, batch, stage: str) -> torch.Tensor:
        if self.mim_decoder is not None:
            return self.total_loss(self.mim_loss(batch[0], stage), stage)
        x, y = batch
        logits = self.model(x)
        acc = self.train_acc if stage == "train" else self.val_acc
        acc(logits, y)
        self.log(f"{stage}/acc", acc, prog_bar=stage == "val", on_step=stage == "train", on_epoch=stage != "train")  # torchmetrics syncs itself
        loss = F.cross_entropy(logits, y)
        if self.teacher is not None:
            with torch.no_grad():
                target = self.teacher(x)
            if stage == "train":
                loss = self.distill(loss, logits, target, stage)
            else:
                self.log_teacher_match(logits, target, F.cross_entropy(target, y))
        return self.total_loss(loss, stage)

    def match_teacher(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """Soft labels (WAVE for a ViT): T^2 * KL(teacher || student) at temperature T."""
        T = self.recipe["distill"]["temperature"]
        return F.kl_div(F.log_softmax(student / T, -1), F.log_softmax(teacher / T, -1), log_target=True,
                        reduction="batchmean") * T * T

    @override
    def training_step(self, batch, batch_idx):
        with self.constraint.step_context(self.model, self.global_step, self.recipe["seed"]), \
                self.multisize_context(self.global_step):
            return self.step(batch, "train")

    @override
    def validation_step(self, batch, batch_idx):
        self._val_batch = batch_idx
        self.step(batch, "val")


TASKS = {"diffusion": DiffusionTask, "classification": ClassificationTask}


def make_task(recipe: dict, model: nn.Module, init_mode: str = "random") -> LgTask:
    return TASKS[recipe["task"]](recipe, model, init_mode)

