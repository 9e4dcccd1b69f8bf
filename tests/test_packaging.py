"""Packaging: the plain wheel carries lgframe.strategies and the recipes; plugins
register through the `lgframe.constraints` entry-point group."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_plain_wheel_install_imports_strategies_and_recipes(tmp_path):
    wheels, target = tmp_path / "wheels", tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), str(ROOT)],
                   check=True, capture_output=True)
    wheel = next(wheels.glob("lgframe-*.whl"))
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = "import lgframe, lgframe.strategies.svd as s; from lgframe.training.recipes import shipped_recipes; " \
           "from lgframe.core.registry import constraint_names; print(lgframe.__file__); print(len(shipped_recipes())); print(constraint_names())"
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(target), "PATH": ""},
                       capture_output=True, text=True, check=True)
    where, n_recipes, names = r.stdout.splitlines()
    assert where.startswith(str(target))  # the installed copy, not the repository
    assert int(n_recipes) >= 4 and "svd" in names and "scratch" in names


def test_entry_point_plugin_registers(tmp_path):
    pkg = tmp_path / "myplugin.py"
    pkg.write_text(textwrap.dedent('''
        import torch
        from lgframe.core.constraint import Bank, FactorizedConstraint

        class ScaledBank(Bank):
            def weight(self, mod):
                return self.of(mod)["W"] * mod.alpha

        class Scaled(FactorizedConstraint):
            """W^l = alpha^l * W."""
            name = "scaled"
            bank_class = ScaledBank
            scaler_names = ("alpha",)

            def build(self, role, stack, init):
                return {"W": stack.mean(0)}, {"alpha": torch.ones(stack.shape[0], 1)}

            def descend_role(self, role, src_shape, shared, scalers, current, a, b):
                from lgframe.core.layout import resample_depth, select_width
                return ({"W": select_width(shared["W"], current["W"], a, b, role.name)},
                        {"alpha": resample_depth(scalers["alpha"], role.shape[0])})
    '''))
    dist = tmp_path / "myplugin-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myplugin\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[lgframe.constraints]\nscaled = myplugin:Scaled\n")
    code = textwrap.dedent('''
        import torch
        from lgframe.core.registry import constraint_names, get_constraint
        from lgframe.models.registry import create_model
        assert "scaled" in constraint_names(), constraint_names()
        m = create_model("DiT-Pico/2")
        c = get_constraint("scaled")
        c.attach(m, init="dense")
        lg = c.learngene(m)
        child = get_constraint("scaled").descend(lg, create_model("DiT-Pico/2", depth=6))
        x = torch.randn(2, 1, 8, 8)
        print(child(x, torch.tensor([1, 2]), torch.tensor([0, 1])).shape)
    ''')
    r = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={"PYTHONPATH": str(tmp_path), "PATH": ""},
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "torch.Size([2, 1, 8, 8])" in r.stdout
