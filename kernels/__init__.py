"""Device code only: @triton.jit kernels and thin launchers (tensors in, tensors out).

Installed as ``aigc_fast.kernels``. Importing this package never fails: when Triton is missing
(macOS, Windows, a broken install) ``TRITON_AVAILABLE`` is False and the launcher modules are not
imported, so the reference path still works.
"""
import os

try:
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the platform
    TRITON_AVAILABLE = False


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its numpy interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"
