"""pytest setup shared by every test file.

* Puts the repository root on ``sys.path`` so tests import ``moe_ops`` from the working tree
  (in-place build) and helpers as ``from tests.utils import ...``.
* Registers the markers the suite uses (mirrored in pyproject's ``[tool.pytest.ini_options]``):
  ``slow`` (long-running; deselect with ``-m "not slow"``), ``cuda`` (needs a GPU).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
