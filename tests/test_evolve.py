"""GTL (lgframe/apps/evolve.py): tournament selection keeps the fitter learngene, mutation,
inheritance, a resumed evolution equals an uninterrupted one, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lgframe.apps import evolve as ev
from lgframe.errors import LgframeError

ROOT = Path(__file__).resolve().parents[1]


def const_gene(value: float, positions=(0,)) -> ev.Learngene:
    return ev.Learngene(list(positions), [{"w": torch.full((4, 4), float(value))} for _ in positions])


def toy_score(gene, generation, individual):
    """Fitness of a toy learngene: its mean weight (a gene of None starts at individual / 10)."""
    if gene is None:
        gene = const_gene(individual / 10)
    return float(gene.blocks[0]["w"].mean()), gene.clone()


def test_tournament_keeps_the_fitter_learngene():
    fitness = [0.1, 0.9, 0.5, 0.3]
    g = torch.Generator().manual_seed(0)
    assert {ev.tournament_select(fitness, 4, g) for _ in range(50)} == {1}  # the whole population: the best
    wins = [ev.tournament_select(fitness, 2, g) for _ in range(2000)]
    assert 0 not in wins  # the least fit loses every pairwise tournament
    # best wins when drawn: P(drawn in a pair of 4) = 1/2; third-best (0.3) only against 0.1: 1/6
    assert abs(wins.count(1) / 2000 - 0.5) < 0.04 and abs(wins.count(3) / 2000 - 1 / 6) < 0.03
    # seeded: the same draws again
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [ev.tournament_select(fitness, 2, g1) for _ in range(20)] == [ev.tournament_select(fitness, 2, g2) for _ in range(20)]


def test_seeded_toy_population_evolves_towards_the_fitter_learngene():
    c = ev.EvolveCfg(population=6, generations=6, tournament=3, elite=1, mutation_std=0.0, structural_rate=0.0)
    pop = ev.evolve(c, score=toy_score, progress=None, total_params=16)
    best = [h["best"] for h in pop.history]
    means = [h["mean"] for h in pop.history]
    assert best == [0.5] * 6  # the fittest learngene (individual 5) is kept by the elite every generation
    assert means[0] == pytest.approx(0.25) and means[-1] == pytest.approx(0.5)  # and takes over the population
    assert all(b >= a - 1e-9 for a, b in zip(means, means[1:]))
    assert pop.first_best.blocks[0]["w"].mean() == pytest.approx(0.5)


def test_mutation_gaussian_and_structural():
    gene = ev.Learngene([0], [{"w": torch.randn(8, 8), "b": torch.zeros(8)}])
    g = torch.Generator().manual_seed(0)
    child = ev.mutate(gene, 0.1, 0.0, 1, 2, 5, g)
    delta = child.blocks[0]["w"] - gene.blocks[0]["w"]
    assert 0.05 < float(delta.std() / gene.blocks[0]["w"].std()) < 0.15  # relative std 0.1
    assert torch.equal(child.blocks[0]["b"], gene.blocks[0]["b"])  # a constant tensor has std 0: unchanged
    sizes = set()
    for i in range(40):
        c = ev.mutate(gene, 0.0, 1.0, 1, 2, 5, torch.Generator().manual_seed(i))
        sizes.add(tuple(c.positions))
        if len(c.blocks) == 2:
            assert torch.equal(c.blocks[1]["w"], gene.blocks[0]["w"])  # a duplicate of the block
    assert sizes == {(0,), (0, 1)}  # duplicated into the next free block, or a drop refused at min_blocks=1
    two = ev.Learngene([0, 1], [{"w": torch.ones(2)}, {"w": torch.zeros(2)}])
    drops = {tuple(ev.mutate(two, 0.0, 1.0, 1, 2, 5, torch.Generator().manual_seed(i)).positions) for i in range(40)}
    assert drops == {(0,), (1,), (0, 1)}


def test_descendant_inherits_the_learngene_and_fresh_rest():
    c = ev.EvolveCfg(depth=3)
    cfg = ev.model_config(c, 5)
    donor = ev.descendant(cfg, None, 1)
    gene = ev.extract(donor, [1])
    child = ev.descendant(cfg, gene, 2)
    fresh = ev.descendant(cfg, None, 2)
    for (n, a), b, d in zip(child.state_dict().items(), fresh.state_dict().values(), donor.state_dict().values()):
        assert torch.equal(a, d if n.startswith("blocks.1.") else b), n
    total = sum(p.numel() for p in donor.parameters())
    assert gene.numel() / total == pytest.approx(49984 / total)


def small_cfg(tmp_path, generations):
    return ev.EvolveCfg(depth=2, population=3, tournament=2, generations=generations, ways=2, shots=2, queries=2,
                        inner_steps=2, structural_rate=0.5, heldout=["shapes"], heldout_tasks=2, out=str(tmp_path))


def test_resumed_evolution_equals_uninterrupted(tmp_path):
    straight = ev.evolve(small_cfg(tmp_path / "a", 3), state_dir=tmp_path / "a", progress=None)
    ev.evolve(small_cfg(tmp_path / "b", 2), state_dir=tmp_path / "b", progress=None)  # interrupted after 2
    lines = []
    resumed = ev.evolve(small_cfg(tmp_path / "b", 3), state_dir=tmp_path / "b", progress=lines.append)
    assert lines[0].startswith("resuming after generation 2 of 3") and lines[1].startswith("generation 3/3: fitness best")
    assert resumed.fitness == straight.fitness and len(resumed.history) == 3
    assert [h["fitness"] for h in resumed.history] == [h["fitness"] for h in straight.history]
    for a, b in zip(straight.genes, resumed.genes):
        assert a.positions == b.positions
        for ta, tb in zip(a.tensors().values(), b.tensors().values()):
            assert torch.equal(ta, tb)
    state = json.loads((tmp_path / "b" / "evolution.json").read_text())
    assert state["generation"] == 2
    with pytest.raises(LgframeError, match="recipe differs in \\['lr'\\]"):
        c = small_cfg(tmp_path / "b", 4)
        c.lr = 1e-2
        ev.evolve(c, state_dir=tmp_path / "b", progress=None)


def test_bad_evolution_settings():
    with pytest.raises(LgframeError, match="learngene_blocks \\[0, 5\\]: the model \\(ViT-Pico/2, depth 5\\) has blocks 0..4"):
        ev.check_cfg(ev.EvolveCfg(learngene_blocks=[0, 5]))
    with pytest.raises(LgframeError, match="population=2, tournament=3.*valid tournaments: 1..2"):
        ev.check_cfg(ev.EvolveCfg(population=2, tournament=3, elite=0))
    with pytest.raises(LgframeError, match="tournament=5 for a population of 4: valid 1..4"):
        ev.tournament_select([0.1] * 4, 5, torch.Generator())
    with pytest.raises(LgframeError, match="ways=11, but domain 'digits' has 10 classes"):
        ev.check_cfg(ev.EvolveCfg(ways=11))
    with pytest.raises(LgframeError, match="min_blocks=1, max_blocks=1 with 2 learngene blocks"):
        ev.check_cfg(ev.EvolveCfg(learngene_blocks=[0, 1], max_blocks=1))
    with pytest.raises(LgframeError, match="the model has blocks 0..1"):
        ev.descendant(ev.model_config(ev.EvolveCfg(depth=2), 5), const_gene(0, (3,)), 0)
    with pytest.raises(LgframeError, match="valid keys: data, train_classes"):
        ev.load_cfg("evolve_digits_gtl", ["populaton=3"])


def test_shipped_recipe_loads_and_names_its_command():
    path = ev.RECIPE_DIR / "evolve_digits_gtl.yaml"
    assert path.read_text().splitlines()[0] == "# lgframe evolve evolve_digits_gtl"
    c = ev.load_cfg("evolve_digits_gtl", ["generations=3"])
    ev.check_cfg(c)
    assert (c.generations, c.learngene_blocks, c.depth) == (3, [0], 5)


@pytest.mark.slow
def test_cli_evolve_writes_results(tmp_path, capsys):
    from lgframe.cli import main

    out = tmp_path / "ev"
    rc = main(["evolve", "evolve_digits_gtl", "depth=2", "population=3", "tournament=2", "generations=2", "ways=2",
               "shots=2", "queries=2", "inner_steps=2", "heldout=[shapes]", "heldout_tasks=2", f"out={out}"])
    assert rc == 0
    r = json.loads((out / "results.json").read_text())
    assert len(r["history"]) == 2 and set(r["heldout"]["shapes"]) == set(ev.EVAL_METHODS)
    assert r["learngene"]["random"]["params"] == r["learngene"]["evolved"]["params"]
    assert (out / "fitness.png").stat().st_size > 1000 and (out / "learngene.safetensors").is_file()
    assert "generation 2/2: fitness best" in capsys.readouterr().out


@pytest.mark.slow
def test_benchmark_quick(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gtl.py"), "--quick", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads((tmp_path / "gtl_quick.json").read_text())
    assert len(d["seeds"]) == 2
    for cell in d["summary"].values():
        assert set(cell) == set(ev.EVAL_METHODS)
        assert cell["evolved"]["evolved_minus_this"]["mean"] == 0
    assert (tmp_path / "gtl_quick.png").stat().st_size > 1000
