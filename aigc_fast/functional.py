"""Public functional ops, their autograd bindings, and the choice of implementation.

Every op takes ``impl="auto"|"triton"|"ref"``: "triton" runs our kernels (CUDA tensors, or CPU
tensors when TRITON_INTERPRET=1), "ref" runs the plain-PyTorch twin in :mod:`aigc_fast.reference`,
"auto" picks Triton where it can run and otherwise falls back to the reference, warning once. The
environment variable ``AIGC_FAST_IMPL=ref|triton`` overrides "auto".
"""
import os
import warnings

import torch

from . import reference
from .kernels import TRITON_AVAILABLE, interpreting

IMPLS = ("auto", "triton", "ref")
_warned_fallback = False


def triton_can_run(device: torch.device) -> bool:
    """Whether our Triton kernels can execute on tensors of ``device`` in this process."""
    if not TRITON_AVAILABLE:
        return False
    if device.type == "cuda":
        return True
    return device.type == "cpu" and interpreting()


def resolve_impl(impl: str, device: torch.device) -> str:
    """Turn ``impl`` ("auto"|"triton"|"ref") into the implementation that will run: "triton" or "ref"."""
    global _warned_fallback
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        forced = os.environ.get("AIGC_FAST_IMPL", "")
        if forced:
            if forced not in ("triton", "ref"):
                raise ValueError(f"AIGC_FAST_IMPL must be 'triton' or 'ref', got {forced!r}")
            impl = forced
    if impl == "auto":
        if triton_can_run(device):
            return "triton"
        if not _warned_fallback:
            _warned_fallback = True
            warnings.warn(
                f"aigc_fast: Triton kernels cannot run on {device.type} tensors here "
                "(they need CUDA, or TRITON_INTERPRET=1 on CPU); using the PyTorch reference.",
                stacklevel=3,
            )
        return "ref"
    if impl == "triton" and not triton_can_run(device):
        why = "triton is not installed" if not TRITON_AVAILABLE else (
            f"tensors are on {device.type}; Triton needs CUDA, or TRITON_INTERPRET=1 set before "
            "triton is imported for CPU tensors")
        raise RuntimeError(f"impl='triton' cannot run: {why}")
    return impl


# --- ConvTranspose2d + BatchNorm2d + ReLU -------------------------------------------------------


# --- sigmoid + binary cross-entropy -------------------------------------------------------------
