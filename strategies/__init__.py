"""Constraint plugins, one file each; importing a module registers its constraint.

Importable as `lgframe.strategies` (lgframe/strategies is a symlink to this folder).
"""

from lgframe.strategies import scratch, svd  # noqa: F401
