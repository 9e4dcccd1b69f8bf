"""GTL: Genetic Transfer Learning, "Transferring Core Knowledge via Learngenes"
(Feng, Wang, Geng 2024), on lgframe's ViT.

The abstract: GTL "trains a population of networks, selects superior learngenes
by tournaments, performs learngene mutations, and passes the learngenes to next
generations ... with 20% parameters, the learngenes bring 12% and 16%
improvements of accuracy on CIFAR-FS and miniImageNet". No code is public; what
follows is lgframe's reading, each choice stated.

**Learngene.** A fragment of a network: an ordered set of its blocks (default
`learngene_blocks: [0]` of a depth-5 ViT-Pico/2, one block = 19.6% of the
parameters; the other blocks, the embeddings, the norm and the head are the
"rest"). It is stored as the blocks' tensors plus their positions. A descendant
is a fresh network (seeded init) whose blocks at those positions are loaded from
the learngene. (A constraint learngene, the issue's option, is not built.)

**Fitness.** A descendant trains `inner_steps` full-batch Adam steps on the
support set of an N-way K-shot task drawn from the pool of training tasks (class
subsets of the source data, `data` / `train_classes`) with a fresh N-way head,
every weight trainable; its fitness is its query accuracy on that task (mean over
`tasks_per_fitness` tasks).

**Evolution.** Generation 0: P fresh networks train on their tasks; the trained
fragment of each is its learngene (Lamarckian: what an individual learned is what
it passes on, the inheritance the GRL paper argues for). Generation g >= 1: the
`elite` fittest learngenes pass unchanged (and are re-scored on new tasks: a lucky
task does not keep a learngene alive); each other child takes the winner of a
tournament (`tournament` individuals drawn without replacement, the fittest wins),
mutates it (Gaussian: each tensor + N(0, (s_g * std(tensor))^2), s_g =
`mutation_std` * `mutation_decay`^g; structural, with probability
`structural_rate`: drop one of its blocks or duplicate one into the next free
position, keeping between `min_blocks` and `max_blocks` blocks), is born as a
descendant, trains on its task, and its trained fragment becomes its learngene.
Every random draw (tasks, fresh inits, tournaments, mutations) is seeded by
(seed, generation, individual) alone, so an evolution resumed from its saved
state (`state/` under `out`, written atomically after each generation:
safetensors + JSON) equals an uninterrupted one (tested).

**Evaluation on held-out tasks** (`heldout`: domains never used in evolution;
`heldout_classes` optionally restricts them): descendants of the final
generation's best learngene (`evolved`), of the first generation's best
(`first`), of a random fragment of the same size (`random`: the evolved
learngene's shape, each tensor replaced by Gaussian noise of its mean and std),
of nothing (`scratch`) and of the same blocks taken from a single network trained
on all training classes as one classifier with the evolution's total number of
training steps (`single`: no evolution, same compute). In each held-out task every
method gets the same fresh rest (one init seed per task) and the same steps.

Run by `lgframe evolve RECIPE` (lgframe/recipes/evolve/); `benchmarks/gtl.py`
runs it over 3 seeds with 95% intervals.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from lgframe.apps.episodes import (
    DOMAINS,
    Episode,
    check_episode_settings,
    episode_seed,
    load_domain,
    mean_interval,
    sample_episode,
)
from lgframe.apps.fewshot import load_cfg as _load_cfg
from lgframe.errors import LgframeError
from lgframe.formats.files import read_safetensors, save_tensors, write_json
from lgframe.models.registry import model_from_config, resolve_config

STATE_FORMAT = "lgframe-gtl/1"
RECIPE_DIR = Path(__file__).resolve().parents[1] / "recipes" / "evolve"
EVAL_METHODS = ("evolved", "first", "random", "scratch", "single")


@dataclass
class EvolveCfg:
    """`lgframe evolve RECIPE`: a GTL evolution of learngenes and its held-out evaluation."""

    data: str = "digits"  # the pool of training tasks
    train_classes: list[int] | None = None  # null: every class of `data`
    heldout: list[str] = field(default_factory=lambda: ["shapes", "animals"])  # domains never used in evolution
    heldout_classes: list[int] | None = None
    model: str = "ViT-Pico/2"
    depth: int = 5  # with 5 blocks one block is ~20% of the parameters
    learngene_blocks: list[int] = field(default_factory=lambda: [0])
    min_blocks: int = 1
    max_blocks: int = 2
    population: int = 12
    generations: int = 8
    tournament: int = 3
    elite: int = 1
    ways: int = 5
    shots: int = 10
    queries: int = 10
    inner_steps: int = 40
    lr: float = 3e-3
    tasks_per_fitness: int = 1
    mutation_std: float = 0.05  # relative to each tensor's std
    mutation_decay: float = 0.8  # per generation
    structural_rate: float = 0.2
    heldout_tasks: int = 40
    heldout_shots: int = 5
    image_size: int = 8
    seed: int = 0
    out: str = "runs/evolve"


def load_cfg(recipe: str | None, overrides=()) -> EvolveCfg:
    return _load_cfg(recipe, overrides, EvolveCfg, RECIPE_DIR, "evolve")


# ------------------------------------------------------------------ the learngene
@dataclass
class Learngene:
    """Blocks of a network: `blocks[j]` (a state dict, names sorted: mutation noise is drawn
    in that order, so a learngene read back from a file mutates the same) sits at block
    index `positions[j]`."""

    positions: list[int]
    blocks: list[dict[str, torch.Tensor]]

    def clone(self) -> Learngene:
        return Learngene(list(self.positions), [{k: v.clone() for k, v in b.items()} for b in self.blocks])

    def numel(self) -> int:
        return sum(v.numel() for b in self.blocks for v in b.values())

    def tensors(self, prefix: str = "") -> dict[str, torch.Tensor]:
        return {f"{prefix}{j}/{k}": v for j, b in enumerate(self.blocks) for k, v in b.items()}

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor], positions: list[int], prefix: str = "") -> Learngene:
        blocks: list[dict] = [{} for _ in positions]
        for key, v in tensors.items():
            if key.startswith(prefix):
                j, name = key[len(prefix):].split("/", 1)
                blocks[int(j)][name] = v
        return cls(list(positions), [dict(sorted(b.items())) for b in blocks])


def model_config(c: EvolveCfg, ways: int) -> dict:
    return resolve_config(c.model, depth=c.depth, image_size=c.image_size, in_channels=1, num_classes=ways)


def check_cfg(c: EvolveCfg) -> None:
    """Every setting, the data's included (episodes the domains cannot supply)."""
    check_evolution(c)
    if c.data not in DOMAINS or any(d not in DOMAINS for d in c.heldout) or not c.heldout:
        raise LgframeError(f"data={c.data!r}, heldout={c.heldout}: valid domains: {', '.join(DOMAINS)}")
    check_episode_settings(train_pool(c), c.ways, c.shots, c.queries)
    for d in c.heldout:
        check_episode_settings(load_domain(d, c.image_size, c.heldout_classes), c.ways, c.heldout_shots, c.queries)


def check_evolution(c: EvolveCfg) -> None:
    """The model, learngene, population and mutation settings."""
    cfg = model_config(c, c.ways)
    depth = cfg["depth"]
    bad = [b for b in c.learngene_blocks if not 0 <= b < depth]
    if bad or not c.learngene_blocks or len(set(c.learngene_blocks)) != len(c.learngene_blocks):
        raise LgframeError(f"learngene_blocks {list(c.learngene_blocks)}: the model ({c.model}, depth {depth}) has "
                           f"blocks 0..{depth - 1}; name distinct blocks in that range")
    if not 1 <= c.min_blocks <= len(c.learngene_blocks) <= c.max_blocks <= depth:
        raise LgframeError(f"min_blocks={c.min_blocks}, max_blocks={c.max_blocks} with {len(c.learngene_blocks)} "
                           f"learngene blocks: need 1 <= min_blocks <= {len(c.learngene_blocks)} <= max_blocks <= {depth}")
    if c.tournament < 1 or c.population < c.tournament:
        raise LgframeError(f"population={c.population}, tournament={c.tournament}: a tournament draws distinct "
                           f"individuals, so 1 <= tournament <= population (valid tournaments: 1..{max(c.population, 1)})")
    if not 0 <= c.elite < c.population:
        raise LgframeError(f"elite={c.elite}: valid 0..{c.population - 1} (population {c.population})")
    for k in ("generations", "inner_steps", "tasks_per_fitness", "heldout_tasks", "heldout_shots"):
        if getattr(c, k) < 1:
            raise LgframeError(f"{k}={getattr(c, k)} must be >= 1")
    if not (math.isfinite(c.lr) and c.lr > 0) or c.mutation_std < 0 or not 0 <= c.structural_rate <= 1:
        raise LgframeError(f"lr={c.lr} (> 0), mutation_std={c.mutation_std} (>= 0), structural_rate="
                           f"{c.structural_rate} (in [0, 1]): out of range")


def train_pool(c: EvolveCfg):
    return load_domain(c.data, c.image_size, c.train_classes)


def extract(model: nn.Module, positions: list[int]) -> Learngene:
    return Learngene(list(positions), [{k: v.detach().clone() for k, v in sorted(model.blocks[p].state_dict().items())}
                                       for p in positions])


def descendant(cfg: dict, gene: Learngene | None, init_seed: int) -> nn.Module:
    """A fresh network (seeded init) with the learngene's blocks at their positions."""
    torch.manual_seed(init_seed)
    model = model_from_config(cfg)
    if gene is not None:
        depth = len(model.blocks)
        bad = [p for p in gene.positions if not 0 <= p < depth]
        if bad:
            raise LgframeError(f"learngene blocks {gene.positions}: the model has blocks 0..{depth - 1}")
        for p, b in zip(gene.positions, gene.blocks):
            model.blocks[p].load_state_dict(b)
    return model


def train_on_task(model: nn.Module, ep: Episode, steps: int, lr: float) -> float:
    """`steps` full-batch Adam steps on the support set; query accuracy."""
    model.train().requires_grad_(True)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        loss = F.cross_entropy(model(ep.support_x), ep.support_y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        return float((model(ep.query_x).argmax(-1) == ep.query_y).float().mean())


# ------------------------------------------------------------------ selection and mutation
def tournament_select(fitness: list[float], k: int, g: torch.Generator) -> int:
    """The fittest of k individuals drawn without replacement (ties: the lower index)."""
    if not 1 <= k <= len(fitness):
        raise LgframeError(f"tournament={k} for a population of {len(fitness)}: valid 1..{len(fitness)}")
    drawn = torch.randperm(len(fitness), generator=g)[:k].tolist()
    return max(sorted(drawn), key=lambda i: fitness[i])


def mutate(gene: Learngene, std: float, structural_rate: float, min_blocks: int, max_blocks: int, depth: int,
           g: torch.Generator) -> Learngene:
    """Gaussian perturbation (std relative to each tensor's std), then with probability
    `structural_rate` drop a block or duplicate one into the next free position."""
    child = gene.clone()
    if std > 0:
        for b in child.blocks:
            for _, v in sorted(b.items()):
                if v.is_floating_point() and v.numel() > 1:
                    v.add_(torch.randn(v.shape, generator=g) * (std * float(v.std())))
    if float(torch.rand((), generator=g)) < structural_rate:
        grow = float(torch.rand((), generator=g)) < 0.5
        j = int(torch.randint(len(child.blocks), (), generator=g))
        if grow and len(child.blocks) < max_blocks:
            free = [p for p in range(child.positions[j] + 1, depth) if p not in child.positions]
            free = free or [p for p in range(depth) if p not in child.positions]
            if free:
                child.positions.append(free[0])
                child.blocks.append({k: v.clone() for k, v in child.blocks[j].items()})
                order = sorted(range(len(child.positions)), key=lambda i: child.positions[i])
                child.positions = [child.positions[i] for i in order]
                child.blocks = [child.blocks[i] for i in order]
        elif not grow and len(child.blocks) > min_blocks:
            del child.positions[j], child.blocks[j]
    return child


# ------------------------------------------------------------------ evolution
def seed_of(seed: int, generation: int, individual: int, salt: int = 0) -> int:
    return episode_seed(seed * 7_777 + salt, generation * 100_003 + individual)


ScoreFn = Callable[[Learngene | None, int, int], tuple[float, Learngene]]


def task_score_fn(c: EvolveCfg) -> ScoreFn:
    """score(gene, generation, individual) -> (fitness, trained learngene): the descendant
    trains on its tasks from the pool; its trained fragment is returned (Lamarckian)."""
    pool = train_pool(c)
    cfg = model_config(c, c.ways)

    def score(gene, generation, individual):
        s = seed_of(c.seed, generation, individual)
        model = descendant(cfg, gene, s)
        accs = []
        for t in range(c.tasks_per_fitness):
            ep = sample_episode(pool, c.ways, c.shots, c.queries, episode_seed(s, t))
            accs.append(train_on_task(model, ep, c.inner_steps, c.lr))
        positions = gene.positions if gene is not None else list(c.learngene_blocks)
        return sum(accs) / len(accs), extract(model, positions)

    return score


@dataclass
class Population:
    generation: int
    genes: list[Learngene]
    fitness: list[float]
    history: list[dict]  # per generation: best, mean, all fitness, learngene sizes
    first_best: Learngene  # generation 0's fittest


def save_state(folder: Path, pop: Population, c: EvolveCfg) -> None:
    tensors = {}
    for i, gene in enumerate(pop.genes):
        tensors.update(gene.tensors(f"pop/{i}/"))
    tensors.update(pop.first_best.tensors("first/"))
    save_tensors(folder / "population.safetensors", tensors, {"format": STATE_FORMAT})
    write_json(folder / "evolution.json", {
        "format": STATE_FORMAT, "generation": pop.generation, "fitness": pop.fitness, "history": pop.history,
        "positions": [g.positions for g in pop.genes], "first_positions": pop.first_best.positions,
        "config": {k: v for k, v in asdict(c).items() if k not in ("generations", "out", "heldout", "heldout_classes",
                                                                   "heldout_tasks", "heldout_shots")},
    })


def load_state(folder: Path, c: EvolveCfg) -> Population | None:
    meta_path = folder / "evolution.json"
    if not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != STATE_FORMAT:
        raise LgframeError(f"'{meta_path}' is not an {STATE_FORMAT} evolution state")
    mine = {k: v for k, v in asdict(c).items() if k in meta["config"]}
    if mine != meta["config"]:
        diff = sorted(k for k in mine if mine[k] != meta["config"][k])
        raise LgframeError(f"cannot resume the evolution in '{folder}': the recipe differs in {diff} (only "
                           f"generations and the held-out settings may change); use another out=")
    tensors, _ = read_safetensors(folder / "population.safetensors", "evolution state")
    genes = [Learngene.from_tensors(tensors, pos, f"pop/{i}/") for i, pos in enumerate(meta["positions"])]
    first = Learngene.from_tensors(tensors, meta["first_positions"], "first/")
    return Population(meta["generation"], genes, meta["fitness"], meta["history"], first)


def record(pop: Population, sizes: list[int], total: int) -> dict:
    f = pop.fitness
    return {"generation": pop.generation, "best": max(f), "mean": sum(f) / len(f), "fitness": list(f),
            "learngene_fraction": [n / total for n in sizes]}


def evolve(c: EvolveCfg, score: ScoreFn | None = None, state_dir: Path | None = None,
           progress: Callable[[str], None] | None = print, total_params: int | None = None) -> Population:
    """Run (or resume) the evolution to generation c.generations - 1; the state is saved after
    each generation when `state_dir` is given."""
    if score is None:
        check_cfg(c)
        score = task_score_fn(c)
    else:
        check_evolution(c)
    depth = model_config(c, c.ways)["depth"]
    total = total_params or sum(p.numel() for p in model_from_config(model_config(c, c.ways)).parameters())
    pop = load_state(state_dir, c) if state_dir is not None else None
    if pop is not None and progress:
        progress(f"resuming after generation {pop.generation + 1} of {c.generations} (state in {state_dir})")
    if pop is None:
        genes, fitness = [], []
        for i in range(c.population):
            f, gene = score(None, 0, i)
            genes.append(gene)
            fitness.append(f)
        best = max(range(c.population), key=lambda i: fitness[i])
        pop = Population(0, genes, fitness, [], genes[best].clone())
        pop.history.append(record(pop, [g.numel() for g in genes], total))
        if state_dir is not None:
            save_state(state_dir, pop, c)
        _report(progress, pop, c)
    while pop.generation + 1 < c.generations:
        gen = pop.generation + 1
        g = torch.Generator().manual_seed(seed_of(c.seed, gen, 0, salt=1))
        order = sorted(range(c.population), key=lambda i: -pop.fitness[i])
        parents = [pop.genes[i] for i in order[: c.elite]]
        std = c.mutation_std * c.mutation_decay ** gen
        while len(parents) < c.population:
            winner = pop.genes[tournament_select(pop.fitness, c.tournament, g)]
            parents.append(mutate(winner, std, c.structural_rate, c.min_blocks, c.max_blocks, depth, g))
        genes, fitness = [], []
        for i, parent in enumerate(parents):
            f, gene = score(parent, gen, i)
            genes.append(gene)
            fitness.append(f)
        pop = Population(gen, genes, fitness, pop.history, pop.first_best)
        pop.history.append(record(pop, [g.numel() for g in genes], total))
        if state_dir is not None:
            save_state(state_dir, pop, c)
        _report(progress, pop, c)
    return pop


def _report(progress, pop: Population, c: EvolveCfg) -> None:
    if progress:
        h = pop.history[-1]
        best = max(range(len(pop.fitness)), key=lambda i: pop.fitness[i])
        progress(f"generation {pop.generation + 1}/{c.generations}: fitness best {h['best']:.3f}, mean {h['mean']:.3f}; "
                 f"best learngene: blocks {pop.genes[best].positions} "
                 f"({h['learngene_fraction'][best]:.1%} of the parameters)")


def best_gene(pop: Population) -> Learngene:
    return pop.genes[max(range(len(pop.fitness)), key=lambda i: pop.fitness[i])]


# ------------------------------------------------------------------ baselines and evaluation
def random_fragment(gene: Learngene, g: torch.Generator) -> Learngene:
    """The learngene's shape with each tensor replaced by noise of its mean and std."""
    out = gene.clone()
    for b in out.blocks:
        for k, v in sorted(b.items()):
            if v.is_floating_point():
                std = float(v.std()) if v.numel() > 1 else 0.0
                b[k] = float(v.mean()) + std * torch.randn(v.shape, generator=g)
    return out


def single_network(c: EvolveCfg, positions: list[int], steps: int, batch: int | None = None) -> Learngene:
    """The fragment at `positions` of one network trained on every training class at once
    (no evolution): `steps` Adam steps on random batches of the pool."""
    pool = train_pool(c)
    classes = pool.classes
    y = torch.tensor([classes.index(int(v)) for v in pool.y])
    model = descendant(model_config(c, len(classes)), None, seed_of(c.seed, 0, 0, salt=2))
    model.train()
    opt = torch.optim.Adam(model.parameters(), lr=c.lr)
    g = torch.Generator().manual_seed(seed_of(c.seed, 0, 0, salt=3))
    batch = batch or c.ways * c.shots
    for _ in range(steps):
        idx = torch.randint(len(y), (batch,), generator=g)
        loss = F.cross_entropy(model(pool.x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return extract(model, positions)


def evaluate_heldout(c: EvolveCfg, genes: dict[str, Learngene | None], progress=print) -> dict:
    """Each held-out domain: every gene's descendants on the same seeded tasks, same fresh rest."""
    cfg = model_config(c, c.ways)
    out = {}
    for d in c.heldout:
        domain = load_domain(d, c.image_size, c.heldout_classes)
        accs: dict[str, list[float]] = {m: [] for m in genes}
        for t in range(c.heldout_tasks):
            s = seed_of(c.seed, 0, t, salt=4)
            ep = sample_episode(domain, c.ways, c.heldout_shots, c.queries, s)
            for m, gene in genes.items():
                accs[m].append(train_on_task(descendant(cfg, gene, s), ep, c.inner_steps, c.lr))
        out[d] = {m: {**mean_interval(a), "accuracies": a} for m, a in accs.items()}
        if progress:
            progress(f"held-out {d}: " + ", ".join(f"{m} {v['mean']:.3f}" for m, v in out[d].items()))
    return out


def run_evolve(c: EvolveCfg, progress=print) -> dict:
    """`lgframe evolve RECIPE`: evolve (resumable), evaluate on held-out tasks, write out/results.json
    and out/fitness.png."""
    check_cfg(c)
    out = Path(c.out)
    t0 = time.time()
    pop = evolve(c, state_dir=out / "state", progress=progress)
    evolve_s = time.time() - t0
    cfg = model_config(c, c.ways)
    total = sum(p.numel() for p in model_from_config(cfg).parameters())
    best = best_gene(pop)
    budget = c.population * c.generations * c.inner_steps * c.tasks_per_fitness
    genes = {
        "evolved": best,
        "first": pop.first_best,
        "random": random_fragment(best, torch.Generator().manual_seed(seed_of(c.seed, 0, 0, salt=5))),
        "scratch": None,
        "single": single_network(c, best.positions, budget),
    }
    held = evaluate_heldout(c, genes, progress)
    result = {
        "config": asdict(c),
        "history": pop.history,
        "learngene": {m: {"positions": g.positions, "params": g.numel(), "fraction": g.numel() / total}
                      for m, g in genes.items() if g is not None},
        "total_params": total,
        "single_network_steps": budget,
        "heldout": held,
        "seconds": {"evolution": evolve_s, "total": time.time() - t0},
    }
    write_json(out / "results.json", result)
    save_tensors(out / "learngene.safetensors", best.tensors(), {"format": STATE_FORMAT,
                                                                  "positions": json.dumps(best.positions)})
    plot_fitness({f"seed {c.seed}": pop.history}, out / "fitness.png")
    return result


def plot_fitness(histories: dict[str, list[dict]], path: Path) -> Path:
    import matplotlib  # deferred: plots only

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lgframe.apps.report import save_figure

    fig, ax = plt.subplots(figsize=(5, 3.4))
    for i, (name, hist) in enumerate(histories.items()):
        gens = [h["generation"] + 1 for h in hist]
        ax.plot(gens, [h["best"] for h in hist], color=f"C{i}", label=f"{name} best")
        ax.plot(gens, [h["mean"] for h in hist], color=f"C{i}", ls="--", label=f"{name} mean")
    ax.set_xlabel("generation")
    ax.set_ylabel("fitness (task query accuracy)")
    ax.legend(fontsize=7)
    save_figure(fig, path, dpi=110)
    return path
