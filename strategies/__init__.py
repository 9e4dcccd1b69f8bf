"""Constraint plugins, one file each; importing a module registers its constraint.

Every module in this folder is imported, so a new built-in constraint is one new
file. They are one package, `lgframe.strategies` (see lgframe/strategies/__init__.py
for how a source checkout reaches this folder), and only under that name: a second
name would give every plugin a second module object and register it twice.
"""

import importlib
import pkgutil

if __name__ != "lgframe.strategies":
    raise ImportError(f"the constraint plugins are the package 'lgframe.strategies'; import them under that name, "
                      f"not as '{__name__}'")

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
