"""The shape of the package: layers without cycles (import-linter), one module object
per plugin file, the public API, registry errors, immutable options, and files
written before the redesign (by bee5a5d, tests/data/) still loading."""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"


def run(args, **kw):
    env = dict(os.environ, OMP_NUM_THREADS="1") | kw.pop("env", {})
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=600, **kw)


# ----------------------------------------------------------------- files from before the redesign
def test_a_learngene_and_a_model_file_written_by_bee5a5d_load_and_descend(tmp_path):
    import lgframe

    lg = lgframe.Learngene.load(DATA / "bee5a5d_vit_svd.safetensors")
    assert lg.constraint == "svd" and lg.family == "vit" and lg.ancestor_config["depth"] == 2
    child = lgframe.descend(lg, depth=4, width=32, heads=2)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert child(x).shape == (3, 10) and torch.isfinite(child(x)).all()
    model = lgframe.load_model(DATA / "bee5a5d_vit_svd_model.safetensors").eval()
    ref = json.loads((DATA / "bee5a5d_vit_svd_model.output.json").read_text())
    assert torch.allclose(model(x), torch.tensor(ref["output"]), atol=1e-6)  # same outputs as when it was written


# ----------------------------------------------------------------- layers
def _lint(tree: Path) -> subprocess.CompletedProcess:
    return run([shutil.which("lint-imports") or "lint-imports"], cwd=tree, env={"PYTHONPATH": str(tree)})


@pytest.mark.skipif(shutil.which("lint-imports") is None, reason="import-linter is in the dev extra")
def test_the_layer_contract_holds_and_an_upward_import_breaks_it(tmp_path):
    tree = tmp_path / "tree"
    for part in ("lgframe", "strategies"):
        shutil.copytree(ROOT / part, tree / part, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tree)
    r = _lint(tree)
    assert r.returncode == 0 and "KEPT" in r.stdout, r.stdout + r.stderr
    files = tree / "lgframe/formats/files.py"  # the lowest layer importing the training layer: a cycle in the making
    files.write_text(files.read_text() + "\nfrom lgframe.training.stages import fit  # noqa\n")
    r = _lint(tree)
    assert r.returncode != 0 and "BROKEN" in r.stdout, r.stdout + r.stderr
    assert "lgframe.formats.files -> lgframe.training.stages" in r.stdout


# ----------------------------------------------------------------- one module object per plugin file
ONE_NAME = textwrap.dedent("""
    import sys
    import lgframe.strategies
    from lgframe.core.registry import constraint_names
    names = constraint_names()
    files = {}
    for name, mod in list(sys.modules.items()):
        f = getattr(mod, "__file__", None) or ""
        if "strategies" in f:
            files.setdefault(f, []).append(name)
    assert all(len(v) == 1 for v in files.values()), files
    assert all(n.startswith("lgframe.strategies") for v in files.values() for n in v), files
    try:
        import strategies.svd
    except ImportError as e:
        print("refused:", e)
    print(len(files), ",".join(names))
""")


@pytest.mark.parametrize("where", ["root", "elsewhere"])
def test_plugins_are_one_package_lgframe_strategies(where, tmp_path):
    cwd = ROOT if where == "root" else tmp_path
    env = {"PYTHONPATH": str(ROOT)} if where == "root" else {}
    r = run([sys.executable, "-c", ONE_NAME], cwd=cwd, env=env)
    assert r.returncode == 0, r.stderr
    if where == "root":  # the repository root is importable here: the second name is refused, not a second copy
        assert "refused: the constraint plugins are the package 'lgframe.strategies'" in r.stdout
    n, names = r.stdout.strip().splitlines()[-1].split(" ")
    assert int(n) >= 9 and "svd" in names.split(",")


# ----------------------------------------------------------------- entry points and packaging
def test_python_m_lgframe_prints_the_version():
    import lgframe

    r = run([sys.executable, "-m", "lgframe", "--version"], cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == f"lgframe {lgframe.__version__}"


def test_lightning_below_2_6_is_refused_by_the_pin():
    text = (ROOT / "pyproject.toml").read_text()
    assert re.search(r'"lightning>=2\.6', text) and re.search(r'"torch>=2\.6', text) and '"torchvision' in text


def test_importing_lgframe_changes_no_warning_filters():
    # the libraries lgframe builds on change the filters themselves: import them first, then lgframe's modules
    code = ("import warnings, lightning.pytorch, diffusers, torchmetrics, peft, torchdata.stateful_dataloader, "
            "torch_fidelity; before = list(warnings.filters); import lgframe, lgframe.training.stages, lgframe.cli, "
            "lgframe.apps.compare, lgframe.apps.personalize, lgframe.apps.weightspace; "
            "print(before == list(warnings.filters))")
    r = run([sys.executable, "-c", code], cwd=ROOT)
    assert r.returncode == 0 and r.stdout.strip() == "True", r.stderr


def test_import_lgframe_is_light():
    r = run([sys.executable, "-c", "import sys, lgframe; print('torch' in sys.modules, 'lightning' in sys.modules)"])
    assert r.stdout.split() == ["False", "False"], r.stderr


# ----------------------------------------------------------------- registry and options
def test_a_duplicate_constraint_name_raises_naming_both():
    from lgframe.core.constraint import FactorizedConstraint
    from lgframe.core.registry import register_constraint
    from lgframe.errors import LgframeError

    class Impostor(FactorizedConstraint):
        name = "svd"

    with pytest.raises(LgframeError, match="'svd' is registered twice: by lgframe.strategies.svd.SVD and by "
                                           ".*Impostor"):
        register_constraint(Impostor)


def test_a_bad_entry_point_warns_naming_its_distribution(tmp_path):
    (tmp_path / "notaplugin.py").write_text("class Thing:\n    name = 'thing'\n")
    dist = tmp_path / "notaplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: notaplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lgframe.constraints]\nthing = notaplugin:Thing\nsvd = notaplugin:Thing\n")
    code = "import warnings; warnings.simplefilter('always'); from lgframe.core.registry import constraint_names; " \
           "print(constraint_names())"
    r = run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    assert "(from notaplugin) is not a Constraint subclass" in r.stderr and "'thing'" not in r.stdout


def test_options_are_immutable_and_attach_records_what_it_resolved():
    from lgframe.core.constraint import attached_constraint
    from lgframe.core.registry import get_constraint
    from lgframe.models import create_model

    c = get_constraint({"name": "svd", "rank": 8})
    with pytest.raises(AttributeError, match="immutable"):
        c.options.rank = 4
    m = create_model("DiT-Pico/2")
    c.attach(m)
    assert c.options.rank == 8 and c.options.roles is None  # the constraint is unchanged
    rec = attached_constraint(m).options
    assert rec["rank"]["attn.qkv.weight"] == 8 and "mlp.fc1.weight" in rec["roles"]
    assert c.with_options(rank=4).options.rank == 4 and c.options.rank == 8


# ----------------------------------------------------------------- the README's code
def readme_block(heading: str) -> str:
    text = (ROOT / "README.md").read_text()
    section = text.split(f"## {heading}", 1)[1]
    return section.split("```python", 1)[1].split("```", 1)[0]


def test_the_readme_python_api_session_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    scope: dict = {}
    exec(compile(readme_block("Python API"), "README.md (Python API)", "exec"), scope)
    assert scope["images"].shape == (10, 1, 8, 8)
    assert scope["trained"].curve[-1][1] < scope["trained"].curve[0][1]  # the descendant trained


def test_the_readme_plugin_example_passes_the_conformance_suite(tmp_path):
    plugin = tmp_path / "readme_plugin.py"
    plugin.write_text(readme_block("Writing a constraint plugin"))
    r = run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "tests/test_conformance.py"),
             "-k", "scaled"], cwd=ROOT, env={"LGFRAME_TEST_PLUGIN": str(plugin)})
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert re.search(r"(\d+) passed", r.stdout) and int(re.search(r"(\d+) passed", r.stdout).group(1)) >= 8
