"""pytest setup shared by every test file.

* Puts the repository root on ``sys.path`` so tests import ``moe_ops`` from the working tree
  (in-place build) and helpers as ``from tests.compare import ...``.
* ``MOE_OPS_TEST_THREADS=n`` sets ``torch.set_num_threads(n)`` for the run. On a small,
  oversubscribed CI box ``1`` makes the many tiny matmuls of the tests ~1000x faster (an
  OpenMP team of 2 spin-waits ~50 ms per GEMM under load); the default leaves torch alone so
  CPU kernels still run multi-threaded.
* Sets ``TRITON_INTERPRET=1`` when there is no GPU (the Triton backend then runs on CPU).
* Registers the markers the suite uses (mirrored in pyproject's ``[tool.pytest.ini_options]``):
  ``slow`` (long-running; deselect with ``-m "not slow"``), ``cuda`` (needs a GPU), and ``gpu``,
  which it applies itself to every test that runs on a CUDA device (:func:`runs_on_gpu`):
  ``pytest -m gpu`` is every test that touches a GPU backend (what ``make gpu-check`` runs).
"""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from moe_ops import envs  # noqa: E402  (after the path; importing moe_ops does not import triton)

# Triton kernels run on CPU through the interpreter, which must be chosen before triton is first
# imported (any test module may import it through moe_ops). With no GPU, the `triton` backend is
# then registered for CPU tensors and tested like every other backend.
if envs.raw("TRITON_INTERPRET") is None:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

if envs.raw("MOE_OPS_TEST_THREADS"):
    import torch

    torch.set_num_threads(int(envs.raw("MOE_OPS_TEST_THREADS")))


def _is_cuda(value) -> bool:
    import torch

    if isinstance(value, str):
        return value == "cuda" or value.startswith("cuda:")
    return isinstance(value, torch.device) and value.type == "cuda"


def runs_on_gpu(item) -> bool:
    """Whether a collected test runs on a CUDA device: one of its parameters is a CUDA device
    (``"cuda"``, ``"cuda:1"``, ``torch.device("cuda")``, or the ``cuda`` backend), its module's
    ``DEVICE`` is ``"cuda"`` (tests/test_triton.py runs on the GPU when there is one), or it
    carries ``@pytest.mark.gpu`` itself. Tests are parametrized on ``tests.backends.DEVICES`` /
    ``available_backends(op, "cuda")``, so without a GPU nothing matches."""
    if item.get_closest_marker("gpu") is not None:
        return True
    callspec = getattr(item, "callspec", None)
    if callspec is not None and any(_is_cuda(v) for v in callspec.params.values()):
        return True
    return _is_cuda(getattr(getattr(item, "module", None), "DEVICE", None))


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running test (deselect with -m 'not slow')")
    config.addinivalue_line("markers", "cuda: needs a CUDA device")
    config.addinivalue_line("markers", "gpu: runs on a CUDA device (applied by conftest.runs_on_gpu)")


def pytest_collection_modifyitems(config, items):
    import pytest

    for item in items:
        if runs_on_gpu(item):
            item.add_marker(pytest.mark.gpu)
