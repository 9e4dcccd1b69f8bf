"""Constraint plugins, one file each; importing a module registers its constraint.

Every module in this folder is imported, so a new built-in constraint is one new
file. Importable as `lgframe.strategies` (lgframe/strategies links to this folder).
"""

import importlib
import pkgutil

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
