"""Loads the Triton backend: ``moe_ops.triton_kernels`` registers backend ``triton`` on import.

Installed packages carry ``triton_kernels/`` as ``moe_ops.triton_kernels`` (setup.py maps it, so
it never clashes with another project's top-level ``triton_kernels``). In a source checkout
used without installing (``PYTHONPATH=.`` after ``make build``) the folder sits beside the
package, so load it from there under the same name.
"""
import importlib
import importlib.util
import os
import sys

from . import autograd

try:
    importlib.import_module("moe_ops.triton_kernels")
except ModuleNotFoundError as e:
    if e.name != "moe_ops.triton_kernels":
        raise
    src = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "triton_kernels", "__init__.py")
    if not os.path.exists(src):
        raise
    spec = importlib.util.spec_from_file_location("moe_ops.triton_kernels", src,
                                                  submodule_search_locations=[os.path.dirname(src)])
    module = importlib.util.module_from_spec(spec)
    sys.modules["moe_ops.triton_kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["moe_ops.triton_kernels"]
        raise

# Fakes and autograd for the triton namespace (ops it already gave them to keep theirs).
autograd.register_all()
