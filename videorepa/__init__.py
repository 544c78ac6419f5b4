"""VideoREPA: token relation distillation for text-to-video diffusion transformers.

Light on purpose: importing the loss pulls in torch only, never diffusers or transformers.
"""

import importlib
import importlib.util
import os
import sys


def _import_kernels():
    """`videorepa.kernels` lives in the top-level kernels/ folder: setup.py maps it when installed; from an
    uninstalled source checkout it is loaded from beside this package."""
    name = __name__ + ".kernels"
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as err:
        if err.name != name:
            raise
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


kernels = _import_kernels()

from .losses import TRDLoss  # noqa: E402  (needs videorepa.kernels importable first)

__all__ = ["TRDLoss", "kernels"]
