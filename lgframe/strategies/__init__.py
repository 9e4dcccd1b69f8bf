"""`lgframe.strategies` in a source checkout: the constraint plugins live in the
repository's top-level `strategies/` folder (one file each), and this file points
the package there, so they are reached as `lgframe.strategies.<name>` from an
editable install, `pytest` or `python -m pytest` at the root alike. A built wheel
carries the plugin files in this folder instead (pyproject.toml maps the package
to `strategies/`), and this file is not part of it.
"""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parents[2] / "strategies")]
with open(Path(__path__[0]) / "__init__.py") as _f:  # the package's own code: import every plugin
    exec(compile(_f.read(), _f.name, "exec"))
