"""LGFRAME_TEST_PLUGIN=path/to/plugin.py registers that plugin before collection, so the
conformance suite (parametrized over the registry) tests it too (see test_structure.py)."""

import os
import runpy

if os.environ.get("LGFRAME_TEST_PLUGIN"):
    runpy.run_path(os.environ["LGFRAME_TEST_PLUGIN"])
