"""Optional extras (torchvision, torch-fidelity, tensorboard): imported only where a feature needs
one, and a missing or broken one is one line that says what to install, never a traceback.

"Broken" is common: the torchvision wheels on PyPI are CUDA-linked, and beside the CPU build of
torch ``import torchvision`` raises RuntimeError ("operator torchvision::nms does not exist"), as
does every package that imports it.
"""
import importlib

from .cli import UsageError

INSTALL_HINT = {
    "torchvision": "install the torchvision build made for your torch, from the same package index "
                   "(pip install 'aigc_fast[data]' where that index serves both)",
    "torch_fidelity": "pip install 'aigc_fast[metrics]' (it needs torchvision: install the build "
                      "made for your torch, from the same package index)",
    "tensorboard": "pip install 'aigc_fast[tensorboard]'",
    "lmdb": "pip install lmdb (torchvision's LSUN reader needs it)",
}


def import_extra(module, purpose):
    """``importlib.import_module(module)``, or UsageError naming ``purpose`` and the fix."""
    top = module.split(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        if err.name is None or err.name.split(".")[0] != top:
            raise UsageError(f"{purpose} needs {top}, whose import failed ({err}); "
                             f"{INSTALL_HINT[top]}") from None
        raise UsageError(f"{purpose} needs {top}, which is not installed; "
                         f"{INSTALL_HINT[top]}") from None
    except Exception as err:  # a build that does not match this torch: RuntimeError, OSError, ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{purpose} needs {top}, which is installed but cannot be imported here "
                         f"({type(err).__name__}: {reason[:200]}); {INSTALL_HINT[top]}") from None
