"""Creative generation (lgframe/apps/creative.py): token conditioning of the DiT,
DisTok, the creative token, their bad inputs and the CLI.

Fast tests run on a random DiT-Pico/2 with activated (non-zero) adaLN layers; the
tests that need a DiT that draws digits share one base per session, pre-trained
with the shipped recipe dit_digits_pretrain (marked slow: about 5 minutes on one
thread)."""

import pytest
import torch
from helpers import activate

from lgframe.apps import creative as cr
from lgframe.errors import LgframeError
from lgframe.models.files import save_model
from lgframe.models.registry import create_model
from lgframe.training.recipes import load_recipe

torch.set_num_threads(1)
RECIPE = {"diffusion": {"label_dropout": 0.1}, "data": {"name": "digits"}, "sample": {"steps": 10}}


@pytest.fixture(scope="module")
def base():
    torch.manual_seed(0)
    model = activate(create_model("DiT-Pico/2"), seed=0, std=0.05)
    with torch.no_grad():  # distinct class rows, as a trained table has
        model.y_embedder.embedding_table.weight.normal_(0, 0.3)
    return cr.load_base(model=model, recipe=RECIPE)


# ------------------------------------------------------------------ token conditioning
def test_token_equals_class_index_in_forward_and_gradient(base):
    m = base.model
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(6, 1, 8, 8, generator=g), torch.randint(0, 1000, (6,), generator=g)
    y = torch.tensor([0, 3, 9, 10, 5, 3])  # 10: the null class
    by_index = m(x, t, y)
    by_token = m(x, t, m.y_embedder.token(y).detach())
    assert torch.equal(by_index, by_token)
    # a short sequence is summed: (E_y - E_0, E_0) conditions like E_y
    E = m.y_embedder.token(y).detach()
    seq = torch.stack([E - E[0], E[0].expand_as(E)], 1)
    assert torch.allclose(m(x, t, seq), by_index, atol=1e-6)
    # training through a token: its gradient is the gradient its table row gets from the index
    tok = E.clone().requires_grad_(True)
    m.requires_grad_(True)
    m(x, t, tok).square().sum().backward()
    m.zero_grad()
    m(x, t, y).square().sum().backward()
    row_grad = m.y_embedder.embedding_table.weight.grad
    assert torch.allclose(tok.grad[1] + tok.grad[5], row_grad[3], atol=1e-6)
    assert torch.allclose(tok.grad[0], row_grad[0], atol=1e-6) and tok.grad.abs().sum() > 0
    m.requires_grad_(False)


def test_token_sampling_with_cfg_equals_class_sampling(base):
    y = torch.arange(10)
    ref = base.task.sample(y, guidance=3.0, steps=10, seed=4)
    mine = cr.sample_with(base, lambda x, t: cr.guided_eps(base.model, x, t, base.tokens(y), base.table[-1], 3.0),
                          10, seed=4, steps=10)
    assert torch.equal(ref, mine)
    # DiffusionTask.sample takes tokens too (its null class becomes the null row), and a summed sequence
    assert torch.equal(base.task.sample(base.tokens(y), guidance=3.0, steps=10, seed=4), ref)
    E = base.tokens(y)
    assert torch.allclose(base.task.sample(torch.stack([E, torch.zeros_like(E)], 1), guidance=3.0, steps=10, seed=4),
                          ref, atol=1e-6)
    # the class-mixture method on a one-hot target is the class itself
    p = torch.zeros(10)
    p[3] = 1
    one = cr.generate(base, "mixture", p, 4, seed=4, guidance=3.0, steps=10)
    assert torch.allclose(one, base.task.sample(torch.full((4,), 3), guidance=3.0, steps=10, seed=4), atol=1e-5)
    # guidance mixing of one class is CFG on that class
    gm = cr.generate(base, "guidance_mix", p, 4, seed=4, guidance=3.0, steps=10)
    assert torch.allclose(gm, one, atol=1e-5)


def test_bad_token_shapes(base):
    x, t = torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    with pytest.raises(ValueError, match=r"\(B, 64\) or a sequence \(B, S, 64\).*got \(2, 63\)"):
        base.model(x, t, torch.randn(2, 63))


# ------------------------------------------------------------------ distributions and bases
def test_parse_dist_and_its_bad_inputs():
    p = cr.parse_dist("3:0.5,8:0.5", 10)
    assert p[3] == p[8] == 0.5 and p.sum() == 1
    with pytest.warns(UserWarning, match="sums to 2, not 1: normalized"):
        q = cr.parse_dist("3:1, 8:1", 10)
    assert torch.allclose(q, p)
    for text, msg in (("3:-0.5,8:1.5", "weights must be finite and >= 0"), ("12:1", r"unknown class id 12; class ids are 0\.\.9"),
                      ("3:0.5,3:0.5", "appears twice"), ("3-0.5", "write id:weight pairs"), ("", "empty distribution"),
                      ("3:0,8:0", "no positive weight"), ("a:1", "must be an integer")):
        with pytest.raises(LgframeError, match=msg):
            cr.parse_dist(text, 10)


def test_bad_bases(tmp_path, base):
    f = tmp_path / "vit.safetensors"
    save_model(create_model("ViT-Pico/2"), f)
    with pytest.raises(LgframeError, match="needs an lgframe DiT"):
        cr.load_base(f)
    with pytest.raises(LgframeError, match="trained without a null class.*label_dropout=0"):
        cr.load_base(model=base.model, recipe={"diffusion": {"label_dropout": 0.0}})
    with pytest.raises(LgframeError, match="trained without a null class"):
        cr.load_base(model=base.model, recipe={"objective": "self_supervised"})
    with pytest.raises(LgframeError, match="kind model"):
        cr.check_base(base.model, {"constraint": {"name": "kind"}, "recipe": RECIPE}, "k.ckpt")
    with pytest.raises(LgframeError, match="not a creative checkpoint"):
        cr.load_creative(f)
    c = cr.load_cfg(None, ["heldout_pairs=[[3,12]]"])
    with pytest.raises(LgframeError, match=r"class 12; the base's class ids are 0\.\.9"):
        cr.train_distok(base, c)
    with pytest.raises(LgframeError, match="valid keys"):
        cr.load_cfg(None, ["no_such_key=1"])
    with pytest.raises(LgframeError, match="render='sds'; valid: ddim, x0"):
        cr.load_cfg(None, ["render=sds"])
    p = cr.parse_dist("3:0.4,5:0.3,8:0.3", 10)
    with pytest.raises(LgframeError, match="conditions on a class pair"):
        cr.method_eps(base, "sum", p, 3.0)


def test_shipped_creative_recipe_validates():
    c = cr.load_cfg("creative_digits")
    assert c.render in cr.RENDERS and c.heldout_pairs and c.base_recipe == "dit_digits_pretrain"
    load_recipe(c.base_recipe, c.base_overrides)  # its base overrides are valid recipe keys


# ------------------------------------------------------------------ DisTok
def test_one_hot_reconstruction(base):
    c = cr.load_cfg(None, ["steps=400", "warmup=400", "lr=3e-3"])  # reconstruction only: no rendering
    res = cr.train_distok(base, c)
    rows = base.table[:10]
    with torch.no_grad():
        tok = res.distok(torch.eye(10))
    rel = ((tok - rows).norm(dim=1) / (rows - rows.mean(0)).norm(dim=1))
    assert rel.max() < 0.1, rel
    assert res.recon[-1][1] < 0.05 * res.recon[0][1]
    # each one-hot token is nearest to its own class row
    assert torch.equal(torch.cdist(tok, rows).argmin(1), torch.arange(10))


def test_pool_fusion_never_trains_held_out_supports():
    pool = cr.ConceptPool(10, 64, [[3, 8], [1, 7]])
    g = torch.Generator().manual_seed(0)
    for triples in (False, True):
        p = pool.fuse(500, g, triples=triples)
        assert torch.allclose(p.sum(1), torch.ones(500))
        assert not cr.has_heldout(p, pool.heldout).any()
        assert ((p > 0).sum(1) == 3).any() == triples
    pool.add(p[:100], g)
    assert len(pool.p) == 74 and torch.equal(pool.p[:10], torch.eye(10))


def test_cli_train_and_sample(tmp_path, base, capsys):
    from lgframe.cli import main

    f = tmp_path / "base.safetensors"
    save_model(base.model, f, {"recipe": RECIPE})
    run = tmp_path / "runs"
    assert main(["creative", "train", "creative_digits", f"base={f}", f"out_dir={run}", "steps=6", "warmup=3",
                 "eval_every=3", "batch=4", "prior_batch=2", "cretok_steps=2", "cretok_batch=4", "samples=2",
                 "sample_steps=3"]) == 0
    assert "DisTok alignment KL" in capsys.readouterr().out
    ckpt = run / "creative" / "creative.safetensors"
    assert ckpt.is_file() and (run / "creative" / "samples.png").is_file()
    out = tmp_path / "x.png"
    assert main(["creative", "sample", str(ckpt), "--dist", "3:0.5,8:0.5", "--n", "4", "--out", str(out),
                 "--steps", "3"]) == 0
    assert out.is_file()
    # loaded back, the DisTok and the creative token are the trained ones: the same samples again
    b2, distok, cretok, _ = cr.load_creative(ckpt)
    assert distok is not None and cretok is not None and cretok.token.abs().sum() > 0
    assert main(["creative", "sample", str(ckpt), "--dist", "3:2,8:-1", "--n", "2", "--out", str(tmp_path / "y.png")]) == 1
    assert "weights must be finite and >= 0" in capsys.readouterr().err
    assert main(["creative", "sample", str(f), "--dist", "3:1", "--out", str(tmp_path / "z.png")]) == 1
    assert "not a creative" in capsys.readouterr().err


def test_benchmark_quick(tmp_path):
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "creative.py"
    spec = importlib.util.spec_from_file_location("creative_benchmark", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--quick", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "creative.json").read_text())
    assert set(res["distributions"]["methods"]) == {"distok", "distok_x0", "mixture", "guidance_mix"}
    assert set(res["pairs"]["methods"]) == {"cretok", "sum", "mean", "distok"}
    assert "kl: distok / mixture" in res["distributions"]["ratios"] and res["meta"]["quick"]
    assert (tmp_path / "creative_distributions.png").is_file() and (tmp_path / "creative_pairs.png").is_file()


# ------------------------------------------------------------------ on a trained base (slow)
@pytest.fixture(scope="session")
def trained_base(tmp_path_factory):
    """A DiT-Pico/2 pre-trained with the shipped recipe (1500 steps, about 5-9 minutes on one
    thread), once per session; CREATIVE_TEST_BASE=CKPT reuses a checkpoint of that run."""
    import os

    if os.environ.get("CREATIVE_TEST_BASE"):
        return cr.load_base(os.environ["CREATIVE_TEST_BASE"])
    import lgframe

    res = lgframe.fit("dit_digits_pretrain", {"model.name": "DiT-Pico/2", "trainer.max_steps": 1500,
                                              "out_dir": str(tmp_path_factory.mktemp("creative_base")), "name": "base"},
                      extract_learngene=False)
    return cr.load_base(res.checkpoint)


@pytest.mark.slow
def test_kl_falls_during_training(trained_base):
    c = cr.load_cfg("creative_digits", ["eval_every=20"])
    res = cr.train_distok(trained_base, c)
    first, last = res.curve[0][1], res.curve[-1][1]  # alignment KL on fixed training-like targets
    assert last < 0.8 * first, res.curve
    assert res.accepted > 0 and res.pool_size > trained_base.num_classes  # accepted fusions joined the pool


@pytest.mark.slow
def test_creative_token_beats_plain_sum_on_unseen_pairs(trained_base):
    c = cr.load_cfg("creative_digits")
    res = cr.train_cretok(trained_base, c)
    kl = {"cretok": [], "sum": []}
    for p in cr.heldout_targets(c.heldout_pairs, trained_base.num_classes, full=False):  # pairs never trained on
        for m in kl:
            x = cr.generate(trained_base, m, p, 64, seed=5, guidance=c.guidance, cretok=res.cretok)
            kl[m].append(cr.metrics(trained_base, x, p)["kl"])
    mean = {m: sum(v) / len(v) for m, v in kl.items()}
    # measured (base CREATIVE_TEST_BASE of the same recipe, 2026-12-03): 0.68 against 1.17, 4 of 5 pairs better
    assert mean["cretok"] < mean["sum"] - 0.2, kl
    assert sum(a < b for a, b in zip(kl["cretok"], kl["sum"])) >= 3, kl
