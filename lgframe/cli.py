"""`lgframe` command line. Each stage is a subcommand; `lgframe COMMAND --help` documents it.

Exit status: 0 success; 1 an error (LgframeError: what was wrong and what is
valid, as one paragraph; anything else: its type and message); 2 a usage error
(argparse). The full traceback is printed only with --debug.

Each command imports what it needs when it runs (the imports inside the command
functions say which heavy library each defers), so `lgframe --help`, `--version`
and a usage error answer without loading torch or Lightning.
"""

from __future__ import annotations

import argparse
import errno
import json
import logging
import math
import sys
import textwrap
from pathlib import Path

from lgframe import __version__
from lgframe.errors import LgframeError

EPILOG = """\
stages:
  pretrain RECIPE -> run dir with learngene.safetensors -> descend -> train -> sample / evaluate

examples:
  lgframe demo --out lgframe_demo
  lgframe pretrain recipes/dit_digits_pretrain.yaml constraint=svd trainer.max_steps=500
  lgframe learngene runs/dit_digits_pretrain/checkpoints/last.ckpt --out ancestor.safetensors
  lgframe descend ancestor.safetensors --model DiT-Pico/2 --out pico.safetensors
  lgframe descend ancestor.safetensors --model depth=8 width=192 heads=6 --out big.safetensors
  lgframe train recipes/dit_digits_descend.yaml init.source=pico.safetensors
  lgframe sample runs/dit_digits_descend/checkpoints/last.ckpt --n 100 --out samples.png
"""


def _overrides_help() -> str:
    return "recipe overrides as key=value (e.g. constraint=scratch trainer.max_steps=500)"


def cmd_list(args) -> int:
    import dataclasses  # deferred: list only

    from rich.console import Console  # deferred: rich's tables, for `list` only
    from rich.table import Table  # deferred: rich's tables, for `list` only

    from lgframe.core.registry import constraint_class, constraint_names  # deferred: torch
    from lgframe.models.dit import DIT_PATCHES, DIT_SIZES  # deferred: torch
    from lgframe.models.vit import VIT_PATCHES, VIT_SIZES  # deferred: torch
    from lgframe.training.recipes import shipped_recipes  # deferred: torch, Lightning, diffusers

    # never cut at 80 columns: a pipe or a narrow terminal gets the full table, wrapped
    con = Console(width=max(Console().width, 160))
    t = Table(title="constraints (constraint: {name: NAME, OPTION: VALUE, ...})")
    t.add_column("name")
    t.add_column("what")
    t.add_column("options (defaults)")
    for n in constraint_names():
        cls = constraint_class(n)
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or "").strip()
        opts = cls().options
        fields = dataclasses.fields(opts) if dataclasses.is_dataclass(opts) else []
        t.add_row(n, " ".join(doc.split("\n\n")[0].split()) if doc else "",
                  ", ".join(f"{f.name}={getattr(opts, f.name)!r}" for f in fields))
    con.print(t)
    t = Table(title="model sizes (model.name: NAME/PATCH)")
    for c in ("name", "patches", "depth", "width", "heads"):
        t.add_column(c)
    for sizes, patches in ((DIT_SIZES, DIT_PATCHES), (VIT_SIZES, VIT_PATCHES)):
        for n, (d, w, h) in sizes.items():
            t.add_row(n, "/".join(map(str, patches)), str(d), str(w), str(h))
    con.print(t)
    t = Table(title="recipes")
    t.add_column("name")
    t.add_column("command")
    recipes = shipped_recipes()
    extra = sorted(recipes[0].parent.glob("*/*.yaml")) if recipes else []  # e.g. weightspace/ (its own schema)
    for r in recipes + extra:
        first = r.read_text().splitlines()[0].lstrip("# ").strip()
        t.add_row(str(r.relative_to(r.parents[1] if r in extra else r.parent)), first)
    con.print(t)
    return 0


def cmd_fit(args, learngene: bool) -> int:
    from lgframe.training.recipes import load_recipe  # deferred: torch

    cfg = load_recipe(args.recipe, args.overrides)  # a bad recipe fails before Lightning is loaded
    from lgframe.training.stages import fit  # deferred: torch, Lightning, diffusers

    _quiet_lightning()
    res = fit(cfg, extract_learngene=learngene)
    from lightning.pytorch.utilities.rank_zero import rank_zero_only  # loaded by fit already

    if rank_zero_only.rank != 0:
        return 0
    print(f"run directory: {res.run_dir}")
    print(f"validation loss: {res.initial_loss:.4f} at step 0 -> {res.final_loss:.4f} at step {res.curve[-1][0]}")
    if res.acc_curve:
        print(f"validation accuracy: {res.acc_curve[-1][1]:.4f}")
    print(f"checkpoint: {res.checkpoint}")
    if res.learngene:
        print(f"learngene: {res.learngene} (+ .json manifest)")
    if res.samples:
        print(f"samples: {res.samples}")
    return 0


def _check_out(args, *inputs, folder: bool = False):
    from lgframe.formats.files import check_output  # deferred: torch, safetensors

    return check_output(args.out, [*inputs], overwrite=args.overwrite, folder=folder)


def _check_learngene_out(args, *inputs) -> None:
    """A learngene output is two files: NAME.safetensors and NAME.json."""
    from lgframe.formats.files import check_output  # deferred: torch, safetensors
    from lgframe.formats.learngene import paths_for  # deferred: torch, safetensors

    ins = [p for i in inputs for p in ((i,) if i is None or Path(i).is_dir() else paths_for(i) + (Path(i),))]
    for p in paths_for(args.out):
        check_output(p, ins, overwrite=args.overwrite)


def cmd_learngene(args) -> int:
    from lgframe.training.stages import extract_learngene_file  # deferred: torch, Lightning, diffusers

    if not args.folder:
        _check_learngene_out(args, args.checkpoint)
        st, js = extract_learngene_file(args.checkpoint, args.out, args.constraint, allow_lossy=args.allow_lossy)
        manifest = json.loads(js.read_text())
        print(f"wrote {st} and {js}")
    else:
        import tempfile  # deferred: --folder only

        from lgframe.api import run_facts  # deferred: torch, Lightning, diffusers
        from lgframe.formats.learngene import Learngene  # deferred: torch, safetensors
        from lgframe.models.files import read_model  # deferred: torch

        out = _check_out(args, args.checkpoint, folder=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{out.name}.", dir=out.parent) as tmp:  # beside: same disk
            st, _ = extract_learngene_file(args.checkpoint, Path(tmp) / "learngene", args.constraint,
                                           allow_lossy=args.allow_lossy)
            lg = Learngene.load(st)
        lg.about = run_facts(args.checkpoint, read_model(args.checkpoint)[1])  # the checkpoint is read a second time
        lg.save_pretrained(out)
        manifest = lg.manifest()
        print(f"wrote {out}: learngene.safetensors, learngene.json and a README.md model card "
              f"(lgframe.Learngene.from_pretrained('{out}'), or `lgframe descend {out} ...`)")
    print("bytes: " + ", ".join(f"{k} {v:,}" for k, v in manifest["bytes"].items()))
    return 0


def cmd_refit(args) -> int:
    from lgframe.training.refit import refit  # deferred: torch, Lightning, diffusers

    _check_learngene_out(args, args.model)
    _quiet_lightning()
    r = refit(args.model, args.constraint, args.out, recipe=args.recipe, overrides=args.overrides)
    if r.weight_error:
        print(f"closed form ({args.constraint}): relative weight error {r.weight_error['all']:.3f}")
    if r.teacher_error:
        (s0, e0), (s1, e1) = r.teacher_error[0], r.teacher_error[-1]
        print(f"relative output error vs the dense model: {e0:.3f} at step {s0} (the closed form) -> {e1:.3f} at step {s1}")
    if r.loss:
        print(f"validation loss: {r.loss[-1][1]:.4f} (the dense model: {r.teacher_loss:.4f})")
    print(f"run directory: {r.run.run_dir}")
    print(f"learngene: {r.learngene} (+ .json manifest)")
    return 0


def _parse_options(items: list[str]) -> dict:
    from omegaconf import OmegaConf  # deferred: OmegaConf

    bad = [i for i in items if "=" not in i]
    if bad:
        raise LgframeError(f"--option {bad[0]!r} must look like key=value (e.g. sigma_init=copy)")
    return OmegaConf.to_container(OmegaConf.from_dotlist(items))


def cmd_descend(args) -> int:
    from lgframe.formats.learngene import paths_for  # deferred: torch, safetensors
    from lgframe.training.stages import descend_file  # deferred: torch, Lightning, diffusers

    _check_out(args, args.learngene, *paths_for(args.learngene))
    model = descend_file(args.learngene, args.model, args.out, _parse_options(args.option))
    c = model.config
    n = sum(p.numel() for p in model.parameters())
    train = sum(p.numel() for p in model.parameters() if p.requires_grad)
    print(f"wrote {args.out}: {c.family} depth {c.depth}, width {c.width}, heads {c.heads}; "
          f"{n:,} parameters, {train:,} trainable (learngene frozen)")
    return 0


def _sample_kw(args) -> dict:
    from lgframe.training.stages import sampling_kwargs  # deferred: torch, Lightning, diffusers

    return sampling_kwargs(args.guidance, args.steps, args.scheduler, args.seed, args.uncond_from)


def _check_sampling_args(args) -> None:
    if getattr(args, "n", 1) is not None and args.command == "sample" and args.n < 1:
        raise LgframeError(f"--n {args.n}: the number of samples must be at least 1")
    if args.steps is not None and args.steps < 1:
        raise LgframeError(f"--steps {args.steps}: sampling needs at least 1 step")
    if args.guidance is not None and not math.isfinite(args.guidance):
        raise LgframeError(f"--guidance {args.guidance}: the guidance scale must be a finite number (1 = no guidance)")


def _add_sampling_args(s) -> None:
    s.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (1 = none)")
    s.add_argument("--steps", type=int, default=None, help="sampling steps")
    s.add_argument("--scheduler", choices=("ddim", "ddpm", "dpm"), default=None, help="sampler (dpm: DPM-Solver++)")
    s.add_argument("--seed", type=int, default=None)
    s.add_argument("--uncond-from", default=None, metavar="CHECKPOINT",
                   help="take the CFG unconditional term from this model (a swapped prior, e.g. the base model)")


def cmd_sample(args) -> int:
    from lgframe.training.stages import load_task, save_sample_grid  # deferred: torch, Lightning, diffusers
    from lgframe.training.tasks import DiffusionTask  # deferred: torch, Lightning, diffusers

    _check_out(args, args.checkpoint, args.uncond_from)
    _check_sampling_args(args)
    task = load_task(args.checkpoint)
    if not isinstance(task, DiffusionTask):
        raise LgframeError(f"'{args.checkpoint}' holds a {task.model.config.family} model; sampling needs a DiT")
    out = save_sample_grid(task, args.out, n=args.n, progress=True, **_sample_kw(args))
    print(f"wrote {out} ({args.n} samples, classes 0..{task.model.config.num_classes - 1} by column)")
    return 0


def _data_overrides(own: dict, name: str) -> list[tuple[str, object]]:
    """`data.*` overrides: the recipe's own data section when it names `name`, else just the name."""
    if own.get("name") != name:
        return [("data.name", name)]
    keep = ("name", "image_size", "val_fraction", "seed", "path", "channels", "crop", "val_subset")
    return [(f"data.{k}", "null" if own[k] is None else own[k]) for k in keep if k in own]


def cmd_evaluate(args) -> int:
    from lgframe.training.recipes import load_recipe  # deferred: torch, Lightning, diffusers
    from lgframe.training.stages import evaluate, load_task  # deferred: torch, Lightning, diffusers

    if args.out:
        _check_out(args, args.checkpoint, args.uncond_from, args.inception_weights)
    if args.n < 0:
        raise LgframeError(f"--n {args.n}: the number of generated samples must be 0 (none) or more")
    _check_sampling_args(args)
    task = load_task(args.checkpoint)
    own = dict(getattr(task, "recipe", {}).get("data") or {})
    name = args.data or own.get("name") or "digits"
    # the model's own data settings (image size, split) where it is evaluated on its own data
    data = load_recipe(None, [f"{k}={v}" for k, v in _data_overrides(own, name)]).data
    if 0 < args.n < 1000 and task.model.config.family == "dit":
        print(f"note: FID from {args.n} samples is biased upward and noisy; compare models at the same --n "
              "(1000 or more for a stable value)", file=sys.stderr)
    res = evaluate(task, data, n_samples=args.n, inception_weights=args.inception_weights, **_sample_kw(args))
    print(json.dumps(res, indent=2))
    if args.out:
        from lgframe.formats.files import write_json  # deferred: torch, safetensors

        write_json(args.out, res)
    return 0


def cmd_import(args) -> int:
    from lgframe.models.convert import from_diffusers, from_timm  # deferred: torch, diffusers, timm
    from lgframe.models.files import save_model  # deferred: torch

    _check_out(args, args.source)
    model = (from_diffusers if args.format == "diffusers" else from_timm)(args.source)
    save_model(model, args.out)
    c = model.config
    print(f"wrote {args.out}: {c.family.upper()} depth {c.depth}, width {c.width}, heads {c.heads}, "
          f"{c.image_size}x{c.image_size}x{c.in_channels}, {c.num_classes} classes")
    return 0


def cmd_export(args) -> int:
    from lgframe.models.convert import to_diffusers, to_timm  # deferred: torch, diffusers, timm
    from lgframe.models.files import read_model, save_pretrained  # deferred: torch

    _check_out(args, args.checkpoint, folder=True)
    model, meta = read_model(args.checkpoint)
    if args.format == "lgframe":
        save_pretrained(model, args.out, meta)
        print(f"wrote {args.out}: config.json and model.safetensors ({'EMA' if meta.get('ema') else 'trained'} "
              f"weights; lgframe.from_pretrained('{args.out}'), or any command that reads a model)")
    elif args.format == "diffusers":
        to_diffusers(model, args.out, overwrite=args.overwrite)
        print(f"wrote {args.out}: a diffusers DiTTransformer2DModel (DiTTransformer2DModel.from_pretrained('{args.out}'))")
    else:
        to_timm(model, args.out, overwrite=args.overwrite)
        print(f"wrote {args.out}: a timm VisionTransformer (timm.create_model('local-dir:{args.out}', pretrained=True))")
    return 0


def cmd_encode(args) -> int:
    from lgframe.data.latents import encode_folder  # deferred: torch, diffusers

    _check_out(args, args.vae, args.images, folder=True)
    info = encode_folder(args.vae, args.images, args.out, image_size=args.image_size, channels=args.channels,
                         crop=args.crop, batch_size=args.batch_size, overwrite=args.overwrite)
    print(f"wrote {args.out}: {info['count']} latents {info['latent_channels']}x{info['latent_size']}x"
          f"{info['latent_size']} (scaling factor {info['scaling_factor']:g}), {len(info['class_names'])} classes; "
          f"train with data.name=latents data.path={args.out}")
    return 0


def cmd_weightspace(args) -> int:
    import torch  # deferred: torch

    from lgframe.apps import weightspace as ws  # deferred: torch, Lightning, diffusers

    if args.out is not None and args.stage == "fit":
        raise LgframeError("weightspace fit: the output is the recipe key out=FILE, not --out")
    if args.stage == "fit":
        c = ws.load_cfg(args.recipe, args.overrides)
        from lgframe.formats.files import check_output  # deferred: torch, safetensors

        check_output(c.out, [args.recipe], overwrite=args.overwrite, what="out=")
        ds = ws.fit_dataset(c)
        ds.save(c.out)
        print(f"wrote {c.out}: {len(ds.weights)} items, {c.repr}{' + mask' if c.mask and c.repr != 'full' else ''} "
              f"rank {c.rank}, {ds.weights.shape[1]} numbers each; PSNR mean {ds.psnr.mean():.2f} dB "
              f"(min {ds.psnr.min():.2f})")
        return 0
    if args.stage == "train":
        ds = ws.WeightDataset.load(args.recipe)
        over = ws.load_cfg(None, args.overrides)
        for k in ("tokens", "components", "token_channels", "dit", "dit_steps", "dit_batch", "dit_lr", "guidance", "seed",
                  "logger"):
            if any(o.startswith(k + "=") for o in args.overrides):
                setattr(ds.cfg, k, getattr(over, k))
        out = args.out or "weightspace_generator.safetensors"
        _check_out(argparse.Namespace(out=out, overwrite=args.overwrite), args.recipe)
        _quiet_lightning()
        logs = Path(out).with_name(Path(out).stem + "_logs")
        task, stats = ws.train_generator(ds, log_dir=logs)
        ws.save_generator(task, stats, args.recipe, out)
        print(f"wrote {out}: a DiT over {stats['tokens']} weight tokens ({stats['grid']}x{stats['grid']} grid); "
              f"training logs in {logs}/ (metrics.csv)")
        return 0
    if args.n < 1:
        raise LgframeError(f"--n {args.n}: the number of samples must be at least 1")
    out = args.out or "weightspace_samples.png"
    _check_out(argparse.Namespace(out=out, overwrite=args.overwrite), args.recipe)
    task, stats, ds_path = ws.load_generator(args.recipe)
    ds = ws.WeightDataset.load(ds_path)
    k = int(ds.labels.max()) + 1
    n = args.n
    labels = torch.arange(n) % k
    imgs = ws.render_vectors(ds.adapter, ws.sample_weights(ds, task, stats, labels), ds.cfg.size)
    from torchvision.utils import save_image  # deferred: torchvision

    from lgframe.formats.files import atomic_path  # deferred: torch, safetensors

    with atomic_path(out) as tmp:
        save_image((imgs + 1) / 2, tmp, nrow=k, padding=1, pad_value=0.5, format="png")
    print(f"wrote {out}: {n} generated fields rendered at {ds.cfg.size}x{ds.cfg.size}, one class per column")
    return 0


def cmd_decompose(args) -> int:
    from lgframe.models.files import read_model, save_model  # deferred: torch
    from lgframe.strategies.kind import decompose  # deferred: torch

    if (args.classes is None) == (not args.learngene_only):
        raise LgframeError("decompose: give either --classes 0,3,7 or --learngene-only")
    try:
        classes = [] if args.learngene_only else [int(c) for c in args.classes.split(",") if c.strip()]
    except ValueError:
        raise LgframeError(f"--classes {args.classes!r}: expected comma-separated class ids, e.g. 0,3,7") from None
    _check_out(args, args.checkpoint)
    model, _ = read_model(args.checkpoint)
    small = decompose(model, classes)
    save_model(small, args.out)
    before, after = (sum(p.numel() for p in m.parameters()) for m in (model, small))
    kept = ", ".join(map(str, classes)) or "none (learngene only)"
    print(f"wrote {args.out}: tailors of classes {kept}; {after:,} parameters, {after / before:.1%} of {before:,}")
    return 0


def cmd_personalize(args) -> int:
    from lgframe.apps.personalize import run_personalize  # deferred: torch, Lightning, diffusers
    from lgframe.training.recipes import load_recipe  # deferred: torch, Lightning, diffusers

    _quiet_lightning()
    res = run_personalize(load_recipe(args.recipe, args.overrides))
    mem = res.memory["total"] / 2**20
    print(f"run directory: {res.run_dir}")
    print(f"held-out validation loss: {res.val_curve[0][1]:.4f} at step 0 -> {res.val_curve[-1][1]:.4f} at step {res.val_curve[-1][0]}")
    print(f"LoRA: {res.lora}; samples: {res.samples}; report: {res.report}; counted step memory {mem:.2f} MiB")
    return 0


def cmd_control(args) -> int:
    from lgframe.apps.control.run import command  # deferred: torch, Lightning, diffusers

    if not getattr(args, "control_command", None):
        raise LgframeError("lgframe control: give a stage: train RECIPE, sample CKPT or adapt CKPT (see --help)")
    _quiet_lightning()
    return command(args)


def cmd_creative(args) -> int:
    from lgframe.apps import creative as cr  # deferred: torch, Lightning, diffusers

    _quiet_lightning()
    if args.stage == "train":
        res = cr.run_train(cr.load_cfg(args.recipe, args.overrides))
        curve = res["distok_curve"]
        if curve:
            print(f"DisTok alignment KL (train targets / held-out): {curve[0][1]:.3f} / {curve[0][2]:.3f} at step "
                  f"{curve[0][0]} -> {curve[-1][1]:.3f} / {curve[-1][2]:.3f} at step {curve[-1][0]}")
        if res["cretok_curve"]:
            c = res["cretok_curve"]
            print(f"creative token KL (train pairs / held-out pairs): {c[0][1]:.3f} / {c[0][2]:.3f} -> "
                  f"{c[-1][1]:.3f} / {c[-1][2]:.3f}")
        print(f"checkpoint: {res['checkpoint']}; samples: {res['samples']}")
        return 0
    _check_out(args, args.checkpoint)
    out = cr.run_sample(args.checkpoint, args.dist, args.n, args.out, method=args.method, guidance=args.guidance,
                        seed=args.seed, steps=args.steps)
    print(f"wrote {out}: {args.n} samples of {args.dist} ({args.method})")
    return 0


def cmd_compare(args) -> int:
    from lgframe.apps.compare import run_compare  # deferred: torch, Lightning, diffusers
    from lgframe.training.recipes import load_recipe  # deferred: torch, Lightning, diffusers

    _quiet_lightning()
    report = run_compare(load_recipe(args.recipe, args.overrides), samples=args.samples)
    print(f"report: {report}")
    return 0


def cmd_fewshot(args) -> int:
    from lgframe.apps.fewshot import load_cfg, run_fewshot  # deferred: torch, Lightning, peft

    cfg = load_cfg(args.recipe, args.overrides)
    _quiet_lightning()
    res = run_fewshot(cfg)
    print(f"results: {Path(cfg.out) / 'results.json'}")
    for target, r in res["results"].items():
        print(f"{cfg.method} on {target}, {cfg.ways}-way {cfg.shots}-shot: accuracy {r['mean']:.4f} "
              f"(95% interval {r['low']:.4f} to {r['high']:.4f}, {r['n']} episodes, {r['trainable']:,} trained parameters)")
    return 0


def cmd_evolve(args) -> int:
    from lgframe.apps.evolve import load_cfg, run_evolve  # deferred: torch

    cfg = load_cfg(args.recipe, args.overrides)
    res = run_evolve(cfg)
    print(f"results: {Path(cfg.out) / 'results.json'}; fitness plot: {Path(cfg.out) / 'fitness.png'}; "
          f"learngene: {Path(cfg.out) / 'learngene.safetensors'}")
    for dom, cell in res["heldout"].items():
        print(f"held-out {dom}, {cfg.ways}-way {cfg.heldout_shots}-shot: " + ", ".join(
            f"{m} {v['mean']:.4f} [{v['low']:.4f}, {v['high']:.4f}]" for m, v in cell.items()))
    return 0


def cmd_demo(args) -> int:
    from lgframe.apps.demo import run_demo  # deferred: torch, Lightning, diffusers

    _check_out(args, folder=True)
    _quiet_lightning()
    report = run_demo(Path(args.out), steps=args.steps, descendant_steps=args.descendant_steps, constraint=args.constraint)
    print(f"report: {report}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="lgframe",
        description="Constraint-based pre-training and learngene transfer (PyTorch Lightning).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action="version", version=f"lgframe {__version__}")
    p.add_argument("-v", "--verbose", action="store_true", help="log lgframe's decisions (e.g. svd fit errors)")
    p.add_argument("--debug", action="store_true", help="print the full traceback of an error")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("list", help="registered constraints, model sizes and shipped recipes")
    s.set_defaults(func=cmd_list)

    for name, extract, text in (
        ("pretrain", True, "train an ancestor under its constraint; writes a run dir with the learngene"),
        ("train", False, "train any model: fresh, from a checkpoint or model file, or from a learngene (init.source=)"),
    ):
        s = sub.add_parser(name, help=text, description=text)
        s.add_argument("recipe", help="recipe YAML path or shipped recipe name (see `lgframe list`)")
        s.add_argument("overrides", nargs="*", help=_overrides_help())
        s.set_defaults(func=lambda a, e=extract: cmd_fit(a, e))

    s = sub.add_parser("learngene", help="extract the learngene of a trained checkpoint")
    s.add_argument("checkpoint", help=".ckpt or model .safetensors written by lgframe")
    s.add_argument("--out", required=True, help="learngene file (.safetensors; a .json manifest is written beside), "
                                                "or with --folder a folder")
    s.add_argument("--folder", action="store_true",
                   help="write a hub-style folder at --out: learngene.safetensors, learngene.json and a README.md model "
                        "card (constraint, ancestor, data and the run's figures)")
    s.add_argument("--constraint", default=None,
                   help="decompose the checkpoint's dense weights with this constraint (default: the one it was trained with)")
    s.add_argument("--allow-lossy", action="store_true",
                   help="keep a closed-form decomposition that loses more than 10%% of the weights (default: refused; "
                        "use `lgframe refit`)")
    s.set_defaults(func=cmd_learngene)

    text = ("a dense model into a constrained ancestor by distillation: start from the closed-form decomposition, "
            "train it to match the dense model on data, write its learngene")
    s = sub.add_parser("refit", help=text, description=text)
    s.add_argument("model", help="dense model .safetensors or .ckpt (e.g. from `lgframe import`)")
    s.add_argument("--constraint", required=True, help="a factorized constraint: svd, kronecker, tucker, kind")
    s.add_argument("--out", required=True, help="learngene file (.safetensors; a .json manifest is written beside)")
    s.add_argument("--recipe", default=None, help="training recipe (default: dit_digits_pretrain / vit_digits_pretrain "
                                                  "by the model's family); give the data with overrides")
    s.add_argument("overrides", nargs="*", help=_overrides_help())
    s.set_defaults(func=cmd_refit)

    s = sub.add_parser("descend", help="initialize a model of another size from a learngene")
    s.add_argument("learngene", help="learngene .safetensors (with its .json manifest), or a learngene folder")
    s.add_argument("--model", required=True, nargs="+",
                   help="target size: a name (DiT-Pico/2) and/or depth=N width=N heads=N (over the ancestor's)")
    s.add_argument("--out", required=True, help="descendant model file (.safetensors)")
    s.add_argument("--option", action="append", default=[],
                   help="constraint option for the descent, key=value (e.g. sigma_init=copy, rest=fresh)")
    s.set_defaults(func=cmd_descend)

    s = sub.add_parser("sample", help="sample a DiT checkpoint to a PNG grid (one class per column)")
    s.add_argument("checkpoint")
    s.add_argument("--n", type=int, default=100)
    s.add_argument("--out", required=True)
    _add_sampling_args(s)
    s.set_defaults(func=cmd_sample)

    s = sub.add_parser("evaluate", help="validation loss, accuracy (ViT), FID and class accuracy of samples (DiT)")
    s.add_argument("checkpoint")
    s.add_argument("--data", default=None, help="digits | shapes | animals | ... (default: the model's own data)")
    s.add_argument("--n", type=int, default=500, help="generated samples for FID and class accuracy (0: none; "
                   "FID is biased at small counts: compare models at the same n)")
    s.add_argument("--inception-weights", default=None, help="local Inception weights file for Inception FID")
    _add_sampling_args(s)
    s.add_argument("--out", default=None, help="also write the numbers to this JSON file")
    s.set_defaults(func=cmd_evaluate)

    s = sub.add_parser("import", help="a local diffusers DiT or timm ViT folder -> lgframe model file")
    s.add_argument("format", choices=("diffusers", "timm"))
    s.add_argument("source", help="diffusers: folder written by save_pretrained; timm: folder written by "
                                  "timm.models.save_for_hf (nothing downloads)")
    s.add_argument("--out", required=True, help="model file (.safetensors) for train/descend/learngene/sample")
    s.set_defaults(func=cmd_import)

    s = sub.add_parser("export", help="an lgframe DiT -> diffusers folder, or ViT -> timm folder (any size; "
                                      "constraints are materialized); lgframe: any model -> a hub-style folder "
                                      "(config.json + model.safetensors, constraint kept)")
    s.add_argument("format", choices=("diffusers", "timm", "lgframe"))
    s.add_argument("checkpoint", help=".ckpt, model .safetensors, model folder or fsdp checkpoint folder")
    s.add_argument("--out", required=True, help="output folder (replaced atomically)")
    s.set_defaults(func=cmd_export)

    s = sub.add_parser("encode", help="an image folder -> VAE latents for a latent DiT (data.name=latents)")
    s.add_argument("--vae", required=True, help="local diffusers AutoencoderKL folder (nothing downloads)")
    s.add_argument("--images", required=True, help="folder with one subfolder of images per class")
    s.add_argument("--out", required=True, help="latents folder to write (safetensors shards + latents.json)")
    s.add_argument("--image-size", type=int, default=256, help="image side before encoding (default 256)")
    s.add_argument("--channels", type=int, default=3, help="image channels the VAE takes (default 3)")
    s.add_argument("--crop", default="center", choices=("center", "resize"))
    s.add_argument("--batch-size", type=int, default=16)
    s.set_defaults(func=cmd_encode)

    s = sub.add_parser("weightspace", help="mLoRA weight-space learning: fit items as adaptations of a base field, "
                                           "train a DiT on the weights, sample new ones")
    s.add_argument("stage", choices=("fit", "train", "sample"))
    s.add_argument("recipe", nargs="?", default=None,
                   help="fit: a recipe (e.g. weightspace_digits); train: the weight dataset; sample: the generator")
    s.add_argument("overrides", nargs="*", help="fit/train: key=value (fit: out=FILE, repr=mlora|lora|full, ...)")
    s.add_argument("--out", default=None, help="train/sample: output file")
    s.add_argument("--n", type=int, default=100, help="sample: how many")
    s.set_defaults(func=cmd_weightspace)

    s = sub.add_parser("decompose", help="a kind model -> its learngene plus the tailors of some classes (a smaller model)")
    s.add_argument("checkpoint", help=".ckpt or model .safetensors of a model trained under constraint kind")
    s.add_argument("--classes", default=None, help="comma-separated class ids whose tailors to keep, e.g. 0,3,7")
    s.add_argument("--learngene-only", action="store_true", help="keep the class-agnostic learngene components only")
    s.add_argument("--out", required=True, help="model file (.safetensors) for sample/evaluate/train")
    s.set_defaults(func=cmd_decompose)

    s = sub.add_parser("personalize", help="DiT-BlockSkip: LoRA personalization of a pretrained DiT on a few subject images")
    s.add_argument("recipe", help="recipe with a `personalize:` section, e.g. recipes/dit_personalize_shapes.yaml")
    s.add_argument("overrides", nargs="*", help=_overrides_help())
    s.set_defaults(func=cmd_personalize)

    s = sub.add_parser("control", help="DivControl: a control branch for a frozen DiT (learngene + tailors, instruction gate)")
    cs = s.add_subparsers(dest="control_command", metavar="STAGE")
    c = cs.add_parser("train", help="multi-condition training of a control branch on a frozen base DiT")
    c.add_argument("recipe", help="control recipe, e.g. recipes/control/divcontrol_digits.yaml (needs control.base=BASE)")
    c.add_argument("overrides", nargs="*", help=_overrides_help() + "; control.KEY=VALUE for the control section")
    c = cs.add_parser("sample", help="samples under one condition image: a PNG of condition | sample pairs")
    c.add_argument("checkpoint", help="a control file (control.safetensors of a run, or one `adapt` wrote)")
    c.add_argument("--condition", default=None, help="condition image (PNG), exactly the base's size and channels")
    c.add_argument("--source", default=None, help="or an image the instruction's operator turns into the condition")
    c.add_argument("--instruction", default=None, help="e.g. edges:threshold=0.3, blur:radius=1+mask:threshold=0")
    c.add_argument("--label", type=int, default=None, help="class label (default: the null class, no class)")
    c.add_argument("--n", type=int, default=8)
    c.add_argument("--base", default=None, help="the base DiT (default: the path the control file records)")
    c.add_argument("--steps", type=int, default=None)
    c.add_argument("--seed", type=int, default=None)
    c.add_argument("--guidance", type=float, default=None, help="CFG over the class, the condition kept in both terms")
    c.add_argument("--out", required=True, help="PNG to write")
    c = cs.add_parser("adapt", help="few-shot: a new condition family, only new tailors and the gate train")
    c.add_argument("checkpoint", help="a DivControl control file")
    c.add_argument("--instruction", required=True, help="the new condition, e.g. negative:contrast=1")
    c.add_argument("--shots", type=int, default=None, help="K examples (default: the recipe's control.shots)")
    c.add_argument("--recipe", default="divcontrol_adapt_digits", help="training settings (default: the shipped "
                                                                      "recipes/control/divcontrol_adapt_digits.yaml)")
    c.add_argument("--base", default=None, help="the base DiT (default: the path the control file records)")
    c.add_argument("--out", required=True, help="the adapted control file (.safetensors)")
    c.add_argument("overrides", nargs="*", help=_overrides_help())
    for c in cs.choices.values():
        if any("--out" in a.option_strings for a in c._actions):
            c.add_argument("--overwrite", action="store_true", help="replace an existing output (never an input)")
    s.set_defaults(func=cmd_control)

    s = sub.add_parser("creative", help="DisTok (distribution-conditional tokens) and a CreTok-style creative token "
                                        "on a frozen DiT: train, sample")
    cs = s.add_subparsers(dest="stage", metavar="STAGE", required=True)
    c = cs.add_parser("train", help="train DisTok and the creative token (pre-trains a base DiT when base is null)")
    c.add_argument("recipe", help="creative recipe YAML or shipped name, e.g. creative_digits")
    c.add_argument("overrides", nargs="*", help="key=value (e.g. base=run/checkpoints/last.ckpt steps=300)")
    c.set_defaults(func=cmd_creative)
    c = cs.add_parser("sample", help="samples of one class distribution (or class pair) as a PNG grid")
    c.add_argument("checkpoint", help="creative.safetensors written by `lgframe creative train` (or its run folder)")
    c.add_argument("--dist", required=True, help="class distribution id:weight,... e.g. '3:0.5,8:0.5' "
                                                 "(weights not summing to 1 are normalized, with a warning)")
    c.add_argument("--n", type=int, default=16)
    c.add_argument("--out", required=True, help="PNG file")
    c.add_argument("--method", default="distok", help="distok | mixture | guidance_mix | cretok | sum | mean "
                                                      "(the last three take a class pair)")
    c.add_argument("--guidance", type=float, default=None, help="CFG scale (default: the training recipe's)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--steps", type=int, default=None, help="sampler steps (default: the base recipe's)")
    c.add_argument("--overwrite", action="store_true", help="replace an existing output (never one of the inputs)")
    c.set_defaults(func=cmd_creative, overrides=[])

    s = sub.add_parser("compare", help="every constraint vs scratch at the recipe's sizes and seeds, one report")
    s.add_argument("recipe", help="recipe with a `compare:` section, e.g. recipes/compare_digits.yaml")
    s.add_argument("overrides", nargs="*", help=_overrides_help())
    s.add_argument("--samples", type=int, default=300, help="samples per model for FID and class accuracy (0: none)")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("fewshot", help="FAD cross-domain few-shot: one method over N-way K-shot episodes of other domains")
    s.add_argument("recipe", help="a few-shot recipe (e.g. fewshot_digits_fad, under lgframe/recipes/fewshot/) or YAML path")
    s.add_argument("overrides", nargs="*", help="key=value (e.g. method=spatial shots=1 episodes=200)")
    s.set_defaults(func=cmd_fewshot)

    s = sub.add_parser("evolve", help="GTL: evolve a learngene over generations of a population, test it on held-out tasks")
    s.add_argument("recipe", help="an evolution recipe (e.g. evolve_digits_gtl, under lgframe/recipes/evolve/) or YAML path")
    s.add_argument("overrides", nargs="*", help="key=value (e.g. generations=12 population=16 seed=1); "
                                                "a run with state in out/ resumes")
    s.set_defaults(func=cmd_evolve)

    s = sub.add_parser("demo", help="the whole chain on digits: pretrain, learngene, descend, train vs scratch, report")
    s.add_argument("--out", default="lgframe_demo")
    s.add_argument("--steps", type=int, default=800, help="ancestor training steps")
    s.add_argument("--descendant-steps", type=int, default=300, help="steps for each descendant and scratch model")
    s.add_argument("--constraint", default="svd", help="the ancestor's constraint (any registered name; see `lgframe list`)")
    s.set_defaults(func=cmd_demo)
    for sp in sub.choices.values():
        if any("--out" in a.option_strings for a in sp._actions):
            sp.add_argument("--overwrite", action="store_true",
                            help="replace an existing output (never one of the command's inputs)")
    return p


def user_message(e: BaseException) -> str:
    """One paragraph for an error: an LgframeError as it is; a full disk or another
    OS error by its cause and file; anything else by its type and first line."""
    if isinstance(e, LgframeError):
        return str(e)
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return f"no space left on the device while writing{' ' + repr(e.filename) if e.filename else ''}; free some space and run it again (what existed before was kept)."
    if isinstance(e, OSError) and e.filename:
        return f"{e.strerror}: {e.filename}"
    if isinstance(e, RuntimeError) and ("inline_container" in str(e) or "file write failed" in str(e)):
        return "a file could not be written (torch: file write failed); is the disk full? What existed before was kept."
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"{type(e).__name__}: {first} (run with --debug for the traceback)"


def _quiet_lightning() -> None:
    """Lightning sets its logger to INFO when it is imported (GPU-available lines, tips);
    commands that train call this after importing it, unless -v asked for them."""
    if not logging.getLogger("lgframe").isEnabledFor(logging.INFO):
        logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:
        # key=value overrides after an option (`refit M --out X data.name=digits`): argparse hands them
        # back unparsed, since a positional list ends at the first option; they are overrides still
        if isinstance(getattr(args, "overrides", None), list) and all("=" in e and not e.startswith("-") for e in extra):
            args.overrides = args.overrides + extra
        else:
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
    lg_log = logging.getLogger("lgframe")
    lg_log.addHandler(handler)
    lg_log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    if not args.command:
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (SystemExit, GeneratorExit):
        raise
    except BaseException as e:  # torch's CheckpointException is a BaseException
        if args.debug:
            raise
        message = user_message(e)
        print(textwrap.fill(f"error: {message}", width=100), file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
