"""DivControl on digits: control fidelity per condition, training cost, zero-shot and few-shot.

One frozen base (a dense DiT-Pico/2 pre-trained on the embedded digits, seed 0) and,
for each seed, the same data order, noise and evaluation images for every method:

- `divcontrol`: lgframe.apps.control (kind's components, 4 tailors per family, the
  instruction gate, the alignment loss at weight 0.5), trained on the 7 settings mixed;
- `divcontrol_noalign`: the same at alignment weight 0 (does the alignment loss help?);
- `dense_shared`: one dense ControlNet branch for all settings, no gate, no alignment;
- `per_condition`: one dense branch per family (edges, lowres, mask, blur), each
  trained on its own family's settings only (the usual way: the training-cost baseline);
- `no_control`: the base alone (the floor every fidelity is read against).

Measured: fidelity per training setting (the operator re-applied to each sample against
its input condition: MSE, and F1 of the +1 pixels for binary ones), class accuracy of the
samples (the digits feature classifier reads back the label they were generated for) and
FID (digits classifier features) over the pooled samples of the trained settings;
fidelity curves during training; the cost of reaching per_condition's final fidelity
(parameters trained x steps, as a ratio); zero-shot: settings held apart (an unseen
parameter value, an unseen combination, and a family no run trained on, `negative`);
few-shot: `negative` from K = 10 and 100 examples, divcontrol's new tailors + gate
(lgframe control adapt) against dense_shared fine-tuned on the same examples (every
branch tensor trained), same steps and learning rate (1e-3), with two diagnostics of
DivControl's: the tailors + gate at a rate of their own (1e-2), and at 1e-2 with the
condition patch embedding trained too (not DivControl's adaptation). Means over seeds with 95%
t-intervals; ratios as paired geometric means with t-intervals on the logs
(lgframe.apps.stats), a win only where the interval excludes 1.

    python benchmarks/divcontrol.py --quick   # about a minute (run by tests/test_control_benchmark.py)
    python benchmarks/divcontrol.py           # about 40 minutes on one CPU core (shared branches 1200 steps,
                                              # the per-condition total; 300 per family)

Writes benchmarks/results/divcontrol.json, divcontrol_curves.png, divcontrol_samples.png
and divcontrol_fewshot.png (divcontrol_quick.* with --quick).
"""

from __future__ import annotations

import argparse
import datetime
import tempfile
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from omegaconf import OmegaConf
from torch.utils.data import DataLoader

from lgframe.apps.control.conditions import parse_instruction
from lgframe.apps.control.model import ControlledDiT, ControlSpec
from lgframe.apps.control.run import (
    ControlTask,
    evaluate_instruction,
    few_shot_loader,
    fit_task,
    load_control_recipe,
    prepare_adaptation,
    read_base,
    with_new_family,
)
from lgframe.apps.report import source_commit
from lgframe.apps.stats import ratio_interval, t_interval, verdict
from lgframe.data.datamodule import EpochSampler, ImageDataModule
from lgframe.formats.files import write_json
from lgframe.training.metrics import class_accuracy, digits_fid
from lgframe.training.recipes import load_recipe
from lgframe.training.stages import fit

RESULTS = Path(__file__).resolve().parent / "results"
ROOT = Path(__file__).resolve().parents[1]  # the checkout whose commit results record
CODE = ("lgframe/apps/control", "strategies/kind.py", "benchmarks/divcontrol.py")  # the code a result depends on
TRAIN = ["edges:threshold=0.2", "edges:threshold=0.5", "lowres:factor=2", "mask:threshold=-0.5", "mask:threshold=0",
         "blur:radius=0.6", "blur:radius=1.4"]
FAMILY_OF = {s: s.split(":")[0] for s in TRAIN}
FAMILIES = ["edges", "lowres", "mask", "blur"]
ZERO_SHOT = {  # setting -> the per_condition branch that stands in for it
    "edges:threshold=0.35": "edges",  # an unseen value between the trained 0.2 and 0.5
    "blur:radius=1": "blur",  # between 0.6 and 1.4
    "blur:radius=1+mask:threshold=0": "mask",  # an unseen combination (its last operator's family)
    "negative:contrast=1": None,  # a family no run trained on (the few-shot target; `outline` is the mask on 8x8 digits)
}
NOVEL = "negative:contrast=1"
METHODS = ("divcontrol", "divcontrol_noalign", "dense_shared", "per_condition", "no_control")
# few-shot variants: name -> (source model, adaptation, learning rate). DivControl's is the first; the rate of its own
# (DESIGN: scalers barely move at 1e-3) and the condition embedding trained too are diagnostics of why it lags.
FEW_SHOT = {
    "tailors+gate": ("divcontrol", "tailors+gate", 1e-3),
    "tailors+gate lr 1e-2": ("divcontrol", "tailors+gate", 1e-2),
    "tailors+gate+cond_embed lr 1e-2 (diagnostic)": ("divcontrol", "tailors+gate+cond_embed", 1e-2),
    "dense fine-tune": ("dense_shared", "dense", 1e-3),
}


class Probe(pl.Callback):
    """Calls fn(step) before training and every `every` optimizer steps."""

    def __init__(self, every: int, fn):
        self.every, self.fn = every, fn

    def on_train_start(self, trainer, pl_module):
        self.fn(0)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step % self.every == 0:
            self.fn(trainer.global_step)


def n_trained(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seeds", type=int, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    q = args.quick
    P = dict(base_steps=60, steps=20, pc_steps=10, fs_steps=6, shots=[10], seeds=1, eval_n=8, eval_steps=4,
             curve_n=4, curve_steps=2, curve_points=2, batch=32) if q else \
        dict(base_steps=1500, steps=1200, pc_steps=300, fs_steps=150, shots=[10, 100], seeds=3, eval_n=100, eval_steps=20,
             curve_n=32, curve_steps=10, curve_points=12, batch=64)
    if args.seeds:
        P["seeds"] = args.seeds
    seeds = list(range(P["seeds"]))
    out = Path(args.out)
    stem = "divcontrol_quick" if q else "divcontrol"
    t0 = time.time()
    dm = ImageDataModule("digits", seed=0, batch_size=P["batch"])
    dm.setup()
    xv, yv = dm.val_set.tensors
    xt, yt = dm.train_set.tensors
    ev_x, ev_y = xv[: P["eval_n"]], yv[: P["eval_n"]]
    cv_x, cv_y = xv[: P["curve_n"]], yv[: P["curve_n"]]
    result: dict = {"meta": {}, "runs": {}}

    with tempfile.TemporaryDirectory() as tmp:
        # ---------------------------------------------------------------- the base
        base_run = fit(load_recipe("dit_digits_pretrain", [
            f"out_dir={tmp}", "name=base", "constraint=scratch", "model.name=DiT-Pico/2", f"data.batch_size={P['batch']}",
            f"trainer.max_steps={P['base_steps']}", f"trainer.val_every={P['base_steps']}", "trainer.progress=false",
            "sample.n=0", "seed=0"]), extract_learngene=False)
        base = read_base(base_run.checkpoint)
        cfg, _ = load_control_recipe("divcontrol_digits", [f"out_dir={tmp}", "trainer.progress=false",
                                                            f"data.batch_size={P['batch']}"])
        recipe0 = OmegaConf.to_container(cfg, resolve=True)
        recipe0["diffusion"] |= base_run.task.recipe["diffusion"]
        train_ins = [parse_instruction(s) for s in TRAIN]

        def recipe(steps, seed, lr=None):
            r = {k: (dict(v) if isinstance(v, dict) else v) for k, v in recipe0.items()}
            r["trainer"] |= {"max_steps": steps, "val_every": 10 * steps + 1, "log_every": max(1, steps // 10)}
            r["seed"] = seed
            if lr is not None:
                r["optim"] = dict(r["optim"]) | {"lr": lr}
            return r

        def evaluate(task, settings, x, y, steps, seed):
            """{setting: fidelity (+ class accuracy)} and the samples."""
            res, samples, conds = {}, {}, {}
            for s in settings:
                m, c, smp = evaluate_instruction(task, parse_instruction(s), x, y, steps=steps, seed=seed + 17)
                res[s] = m | {"class_acc": class_accuracy(smp, y)}
                samples[s], conds[s] = smp, c
            return res, samples, conds

        def train(name, seed, spec, settings, align, steps):
            """A control run with its fidelity curve on the curve images."""
            pl.seed_everything(seed, verbose=False)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = ControlledDiT(base, spec)
            r = recipe(steps, seed)
            task = ControlTask(r, model, [parse_instruction(s) for s in settings], align)
            curve = []
            every = max(1, steps // P["curve_points"])

            def probe(step):
                f, _, _ = evaluate(task, settings, cv_x, cv_y, P["curve_steps"], seed)
                curve.append({"step": step} | {s: f[s]["mse"] for s in settings})

            # the one split (data seed 0), the order of this seed
            loader = DataLoader(dm.train_set, batch_size=P["batch"], sampler=EpochSampler(len(dm.train_set), 1000 + seed),
                                drop_last=True)
            pl.seed_everything(seed, verbose=False)
            t = time.time()
            fit_task(task, r, Path(tmp) / f"{name}-{seed}", loader, callbacks=[Probe(every, probe)])
            secs = time.time() - t
            if curve[-1]["step"] != steps:
                probe(steps)
            align_hist = [h["align"] for h in task.history if "align" in h]
            return task, {"curve": curve, "seconds": round(secs, 1), "params_trained": n_trained(model),
                          "align_first": align_hist[0] if align_hist else None,
                          "align_last10": sum(align_hist[-10:]) / len(align_hist[-10:]) if align_hist else None}

        def adapt(task, seed, k, how, lr):
            """Few-shot `negative` from k training examples: divcontrol adds a tailor group and trains it with the
            gate; dense fine-tunes every branch tensor. Same steps and examples."""
            ins = parse_instruction(NOVEL)
            pick = torch.randperm(len(xt), generator=torch.Generator().manual_seed(100 + seed))[:k]
            pl.seed_everything(seed, verbose=False)
            src = task.model
            if how.startswith("tailors+gate"):
                model = with_new_family(src, NOVEL.split(":")[0], seed=seed)
                guards = prepare_adaptation(model, len(src.spec.groups))
                if how.endswith("cond_embed"):
                    model.branch.cond_embed.requires_grad_(True)
            else:
                model = ControlledDiT(base, src.spec, init="empty")
                model.load_state_dict(src.state_dict())
                guards = []
            r = recipe(P["fs_steps"], seed, lr)
            fst = ControlTask(r, model, [ins], 0.5 if model.align is not None else 0.0, guards)
            curve = []
            every = max(1, P["fs_steps"] // 5)

            def probe(step):
                f, _, _ = evaluate(fst, [NOVEL], cv_x, cv_y, P["curve_steps"], seed)
                curve.append({"step": step, "mse": f[NOVEL]["mse"]})

            t = time.time()
            fit_task(fst, r, Path(tmp) / f"fs-{how}-{lr}-{k}-{seed}",
                     few_shot_loader(xt[pick], yt[pick], min(P["batch"], 32), P["fs_steps"], seed),
                     callbacks=[Probe(every, probe)])
            secs = time.time() - t
            f, smp, cnd = evaluate(fst, [NOVEL], ev_x, ev_y, P["eval_steps"], seed)
            trained = n_trained(model) - sum(g.saved.numel() for g in guards)  # the old tailor components are kept
            return {"final": f[NOVEL], "curve": curve, "params_trained": trained, "seconds": round(secs, 1)}, smp, cnd

        grid_samples: dict = {}
        for seed in seeds:
            runs: dict = {}
            tasks: dict = {}
            spec_div = ControlSpec(method="divcontrol", groups=FAMILIES, align=True)
            spec_noalign = ControlSpec(method="divcontrol", groups=FAMILIES, align=False)
            spec_dense = ControlSpec(method="dense", groups=FAMILIES, align=False)
            tasks["divcontrol"], runs["divcontrol"] = train("div", seed, spec_div, TRAIN, 0.5, P["steps"])
            tasks["divcontrol_noalign"], runs["divcontrol_noalign"] = train("noalign", seed, spec_noalign, TRAIN, 0.0, P["steps"])
            tasks["dense_shared"], runs["dense_shared"] = train("shared", seed, spec_dense, TRAIN, 0.0, P["steps"])
            pc = {}
            for fam in FAMILIES:
                own = [s for s in TRAIN if FAMILY_OF[s] == fam]
                pc[fam] = train(f"pc-{fam}", seed, spec_dense, own, 0.0, P["pc_steps"])
            runs["per_condition"] = {"branches": {f: r for f, (_, r) in pc.items()},
                                     "params_trained": sum(r["params_trained"] for _, r in pc.values()),
                                     "steps_total": P["pc_steps"] * len(FAMILIES),
                                     "seconds": round(sum(r["seconds"] for _, r in pc.values()), 1)}
            # final evaluation: trained settings + zero-shot, same images and noise for every method
            settings = TRAIN + list(ZERO_SHOT)
            none_task = ControlTask(recipe(1, seed), ControlledDiT(base, spec_dense), train_ins, 0.0)
            for name in ("divcontrol", "divcontrol_noalign", "dense_shared"):
                f, smp, cnd = evaluate(tasks[name], settings, ev_x, ev_y, P["eval_steps"], seed)
                runs[name]["final"] = f
                runs[name]["fid_trained"] = digits_fid(xt, torch.cat([smp[s] for s in TRAIN]))
                if seed == 0:
                    grid_samples[name], grid_samples["conditions"] = smp, cnd
            f_pc, smp_pc = {}, {}
            for s in settings:
                fam = FAMILY_OF.get(s) or ZERO_SHOT.get(s)
                if fam is None:
                    continue
                fs, smp, _ = evaluate(pc[fam][0], [s], ev_x, ev_y, P["eval_steps"], seed)
                f_pc[s], smp_pc[s] = fs[s], smp[s]
            runs["per_condition"]["final"] = f_pc
            runs["per_condition"]["fid_trained"] = digits_fid(xt, torch.cat([smp_pc[s] for s in TRAIN]))
            f, smp, _ = evaluate(none_task, settings, ev_x, ev_y, P["eval_steps"], seed)
            # the base alone: its samples do not see the condition (the branch's zero layers are still zero)
            runs["no_control"] = {"final": f, "fid_trained": digits_fid(xt, torch.cat([smp[s] for s in TRAIN])),
                                  "params_trained": 0}
            if seed == 0:
                grid_samples["per_condition"], grid_samples["no_control"] = smp_pc, smp
            # few-shot
            fewshot = {}
            for k in P["shots"]:
                for name, (src, how, lr) in FEW_SHOT.items():
                    r, smp, cnd = adapt(tasks[src], seed, k, how, lr)
                    fewshot[f"{name} K={k}"] = r | {"lr": lr}
                    if seed == 0:
                        grid_samples[f"fewshot {name} K={k}"] = smp
                        grid_samples["fewshot conditions"] = cnd
            runs["few_shot"] = fewshot
            result["runs"][str(seed)] = runs
            print(f"seed {seed} done at {time.time() - t0:.0f} s", flush=True)
            del tasks, pc

        result["summary"] = summarize(result["runs"], seeds, P)
        result["meta"] = {
            "date": datetime.date.today().isoformat(), "commit": source_commit(ROOT, CODE, missing=None),
            "quick": q, "seeds": seeds,
            "command": "python benchmarks/divcontrol.py" + (" --quick" if q else ""), "threads": args.threads,
            "wall_seconds": round(time.time() - t0, 1), "sizes": P,
            "base": {"model": "DiT-Pico/2 (depth 4, width 64)", "data": "digits 8x8", "steps": P["base_steps"],
                     "final_val_loss": base_run.final_loss, "note": "pre-trained once (seed 0) and frozen; the seeds vary "
                     "the branches' init, data order, noise and the few-shot examples"},
            "train_settings": TRAIN, "zero_shot_settings": list(ZERO_SHOT),
            "protocol": (f"batch {P['batch']}, AdamW lr 1e-3 (warmup 20), grad clip 1, no EMA; divcontrol/noalign/"
                         f"dense_shared {P['steps']} steps on the 7 settings mixed per batch; per_condition "
                         f"{P['pc_steps']} steps per family ({P['pc_steps'] * 4} in all); few-shot {P['fs_steps']} steps "
                         "at batch 32 from K training images (drawn with replacement), lr 1e-3 (the variants named: 1e-2); sampling DDIM "
                         f"{P['eval_steps']} steps, guidance 1 (no CFG), the same noise for every method, "
                         f"{P['eval_n']} validation images per setting; curves: {P['curve_n']} images, DDIM "
                         f"{P['curve_steps']} steps"),
            "reduced": ("sized for about 40 minutes on one CPU core: a DiT-Pico/2 base of 1500 steps (undertrained: "
                        "its own samples have digits FID in the hundreds), 1200 steps for each shared branch (the per-condition "
                        "branches' total), 300 per family, 100 "
                        "evaluation images per setting (FID over the 700 pooled samples of the trained settings is "
                        "biased upward at this count: compare methods with each other only), guidance 1 only"),
        }
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / f"{stem}.json", result)
        plot_curves(result, out / f"{stem}_curves.png")
        plot_grid(grid_samples, out / f"{stem}_samples.png", TRAIN + list(ZERO_SHOT),
                  ["conditions", "divcontrol", "dense_shared", "per_condition", "no_control"], 3)
        plot_fewshot(grid_samples, out / f"{stem}_fewshot.png",
                     ["fewshot conditions"] + [f"fewshot {h} K={k}" for k in P["shots"] for h in FEW_SHOT], 8)
    print_summary(result["summary"])


# ------------------------------------------------------------------ statistics
def summarize(runs: dict, seeds: list, P: dict) -> dict:
    S = [str(s) for s in seeds]
    out: dict = {"fidelity": {}, "class_acc": {}, "fid_trained": {}, "params_trained": {}, "ratios_vs_per_condition": {},
                 "ratios_divcontrol_vs": {}, "cost": {}, "zero_shot": {}, "few_shot": {}, "alignment": {}}
    settings = TRAIN + list(ZERO_SHOT)
    for m in METHODS:
        out["fidelity"][m] = {}
        out["class_acc"][m] = {}
        for s in settings:
            rows = [runs[i][m]["final"].get(s) for i in S]
            if any(r is None for r in rows):
                continue
            out["fidelity"][m][s] = {"mse": t_interval([r["mse"] for r in rows])} | (
                {"f1": t_interval([r["f1"] for r in rows])} if "f1" in rows[0] else {})
            out["class_acc"][m][s] = t_interval([r["class_acc"] for r in rows])
        out["fid_trained"][m] = t_interval([runs[i][m]["fid_trained"] for i in S])
        out["params_trained"][m] = runs[S[0]][m]["params_trained"]
    for m in ("divcontrol", "divcontrol_noalign", "dense_shared"):
        out["ratios_vs_per_condition"][m] = {}
        for s in TRAIN:
            iv = ratio_interval([runs[i][m]["final"][s]["mse"] for i in S],
                                [runs[i]["per_condition"]["final"][s]["mse"] for i in S])
            out["ratios_vs_per_condition"][m][s] = {"mse_ratio": iv, "verdict": verdict(iv) if len(S) > 1 else "n/a (1 seed)"}
    for other in ("divcontrol_noalign", "dense_shared"):
        out["ratios_divcontrol_vs"][other] = {}
        for s in settings:
            a = [runs[i]["divcontrol"]["final"][s]["mse"] for i in S]
            b = [runs[i][other]["final"][s]["mse"] for i in S]
            iv = ratio_interval(a, b)
            out["ratios_divcontrol_vs"][other][s] = {"mse_ratio": iv, "verdict": verdict(iv) if len(S) > 1 else "n/a (1 seed)"}
    # training cost: steps (on the curve images) for divcontrol to reach each per-condition branch's final fidelity
    for m in ("divcontrol", "divcontrol_noalign", "dense_shared"):
        per_seed = []
        for i in S:
            reach = {}
            for s in TRAIN:
                target = runs[i]["per_condition"]["branches"][FAMILY_OF[s]]["curve"][-1][s]
                reach[s] = next((c["step"] for c in runs[i][m]["curve"] if c[s] <= target), None)
            per_seed.append(reach)
        all_reached = [all(v is not None for v in r.values()) for r in per_seed]
        steps_all = [max(r.values()) if ok else None for r, ok in zip(per_seed, all_reached)]
        pc_steps, pc_params = runs[S[0]]["per_condition"]["steps_total"], runs[S[0]]["per_condition"]["params_trained"]
        params = runs[S[0]][m]["params_trained"]
        entry = {"steps_to_reach_per_setting": per_seed, "steps_to_reach_all": steps_all,
                 "per_condition_steps_total": pc_steps, "per_condition_params_trained": pc_params,
                 "params_trained": params, "params_ratio": pc_params / params,
                 "reached_in_every_seed": all(all_reached)}
        if all(all_reached):
            steps = [max(s, 1) for s in steps_all]
            entry["steps_ratio"] = ratio_interval([pc_steps] * len(steps), steps)
            entry["param_steps_ratio"] = ratio_interval([pc_steps * pc_params] * len(steps), [s * params for s in steps])
        out["cost"][m] = entry
    for s in ZERO_SHOT:
        out["zero_shot"][s] = {m: out["fidelity"][m].get(s) for m in METHODS}
    for key in runs[S[0]]["few_shot"]:
        rows = [runs[i]["few_shot"][key] for i in S]
        out["few_shot"][key] = {"mse": t_interval([r["final"]["mse"] for r in rows]),
                                "class_acc": t_interval([r["final"]["class_acc"] for r in rows]),
                                "zero_shot_mse_on_curve": t_interval([r["curve"][0]["mse"] for r in rows]),
                                "final_mse_on_curve": t_interval([r["curve"][-1]["mse"] for r in rows]),
                                "params_trained": rows[0]["params_trained"]}
    for k in P["shots"]:
        b = [runs[i]["few_shot"][f"dense fine-tune K={k}"]["final"]["mse"] for i in S]
        for name in FEW_SHOT:
            if name == "dense fine-tune":
                continue
            a = [runs[i]["few_shot"][f"{name} K={k}"]["final"]["mse"] for i in S]
            iv = ratio_interval(a, b)
            out["few_shot"][f"ratio {name} / dense fine-tune K={k}"] = {
                "mse_ratio": iv, "verdict": verdict(iv) if len(S) > 1 else "n/a (1 seed)"}
    out["alignment"] = {m: {"first": t_interval([runs[i][m]["align_first"] for i in S]),
                            "last10": t_interval([runs[i][m]["align_last10"] for i in S])} for m in ("divcontrol",)}
    return out


def print_summary(s: dict) -> None:
    def fmt(iv):
        return f"{iv[0]:.4f} [{iv[1]:.4f}, {iv[2]:.4f}]"

    for m, rows in s["fidelity"].items():
        print(f"{m}: FID {fmt(s['fid_trained'][m])}, params {s['params_trained'][m]:,}")
        for k, v in rows.items():
            print(f"   {k:<34} mse {fmt(v['mse'])}" + (f"  f1 {fmt(v['f1'])}" if "f1" in v else ""))
    for m, c in s["cost"].items():
        print(f"cost {m}: params ratio {c['params_ratio']:.2f}, steps to reach {c['steps_to_reach_all']}"
              + (f", steps ratio {fmt(c['steps_ratio'])}, param-steps ratio {fmt(c['param_steps_ratio'])}" if "steps_ratio" in c else ""))
    for k, v in s["few_shot"].items():
        print(f"few-shot {k}: " + ", ".join(f"{a} {fmt(b)}" if isinstance(b, (list, tuple)) else f"{a} {b}" for a, b in v.items()))


# ------------------------------------------------------------------ plots
def plot_curves(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = result["runs"]["0"]
    fig, axes = plt.subplots(2, 4, figsize=(16, 7), dpi=100)
    for ax, s in zip(axes.flat, TRAIN):
        for m in ("divcontrol", "divcontrol_noalign", "dense_shared"):
            c = run[m]["curve"]
            ax.plot([p["step"] for p in c], [p[s] for p in c], marker=".", label=m)
        c = run["per_condition"]["branches"][FAMILY_OF[s]]["curve"]
        ax.plot([p["step"] for p in c], [p[s] for p in c], marker=".", label="per_condition (its own branch)")
        ax.axhline(run["no_control"]["final"][s]["mse"], color="grey", ls="--", label="no control")
        ax.set_title(s, fontsize=9)
        ax.set_xlabel("training step")
        ax.set_ylabel("fidelity MSE")
        ax.grid(alpha=0.3)
    ax = axes.flat[-1]
    for key, r in run["few_shot"].items():
        if "diagnostic" in key:
            continue
        ax.plot([p["step"] for p in r["curve"]], [p["mse"] for p in r["curve"]], marker=".", label=key)
    ax.set_title(f"few-shot {NOVEL}", fontsize=9)
    ax.set_xlabel("adaptation step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6)
    axes.flat[0].legend(fontsize=6)
    fig.suptitle("DivControl on digits (seed 0): fidelity of samples during training (curve images)")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_fewshot(samples: dict, path: Path, rows: list, per: int) -> None:
    """One row per entry (the conditions, then each adaptation's samples), `per` images each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), per, figsize=(per * 0.9 + 2.4, len(rows) * 0.95 + 0.5), dpi=100, squeeze=False)
    for r, name in enumerate(rows):
        imgs = samples.get(name, {}).get(NOVEL)
        for j in range(per):
            ax = axes[r, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if imgs is not None and j < len(imgs):
                ax.imshow(((imgs[j, 0] + 1) / 2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
        axes[r, 0].set_ylabel(name.replace("fewshot ", "").replace("conditions", "condition"), fontsize=6, rotation=0,
                              ha="right", va="center")
    fig.suptitle(f"few-shot {NOVEL} (seed 0): the condition, then each adaptation's samples (same noise)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_grid(samples: dict, path: Path, settings: list, columns: list, per: int) -> None:
    """Rows: settings; for each of `per` images, one column per entry of `columns` (condition | samples)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = per * len(columns)
    fig, axes = plt.subplots(len(settings), ncol, figsize=(ncol * 0.9, len(settings) * 1.0 + 0.6), dpi=100, squeeze=False)
    for r, s in enumerate(settings):
        for j in range(per):
            for c, name in enumerate(columns):
                ax = axes[r, j * len(columns) + c]
                ax.set_xticks([])
                ax.set_yticks([])
                imgs = samples.get(name, {}).get(s)
                if imgs is not None and j < len(imgs):
                    ax.imshow(((imgs[j, 0] + 1) / 2).clamp(0, 1).numpy(), cmap="gray", vmin=0, vmax=1)
                if r == 0:
                    ax.set_title(name.replace("fewshot ", "").replace("conditions", "condition"), fontsize=5)
                if j == 0 and c == 0:
                    ax.set_ylabel(s, fontsize=5, rotation=0, ha="right", va="center")
    fig.suptitle("condition | samples side by side (seed 0; the same noise in every column)", fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    main()
