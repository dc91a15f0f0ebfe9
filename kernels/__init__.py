"""Device code only: @triton.jit kernels and thin launchers (tensors in, tensors out).

Installed as ``aigc_fast.kernels``. Importing this package never fails: when Triton is missing
(macOS, Windows, a broken install) ``TRITON_AVAILABLE`` is False and the launcher modules are not
imported, so the reference path still works.
"""
import os
from dataclasses import dataclass
from typing import Optional

import torch

try:
    import triton  # noqa: F401

    TRITON_AVAILABLE = True
except ImportError:  # pragma: no cover - depends on the platform
    TRITON_AVAILABLE = False


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its numpy interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass
class MetaLaunches:
    """The one seam between the library and the tools that read its launches without a GPU: set by
    the GPU compile check (benchmarks/gpu_compile_check.py), the GEMM plan
    (benchmarks/gemm_plan.py) and the step-traffic count while they record the launches of a
    training step on meta tensors (shapes, no data): then our launchers take meta tensors and
    nothing runs. ``multiprocessors`` is the target GPU's SM count, from which split-K factors
    (hence some launches' arguments) are derived; ``autocast`` the dtype of a recorded
    ``torch.autocast`` region (which the meta device cannot enter), or None; ``capability`` the
    target's compute capability (90: sm_90), on which tiles depend; ``plans``, when a
    list, receives each GEMM launch's plan (kernel name, its chain_gemm.ConvLaunch /
    conv_gemm.WeightGradLaunch objects) as the launcher makes it."""

    enabled: bool = False
    multiprocessors: int = 0
    autocast: Optional[torch.dtype] = None
    plans: Optional[list] = None
    capability: int = 90

    def note(self, kernel: str, *plans):
        """Record a GEMM launch's plans for the GEMM plan (a no-op unless it is listening)."""
        if self.plans is not None:
            self.plans.append((kernel, plans))


META_LAUNCHES = MetaLaunches()


def launches_take(device: torch.device) -> bool:
    """Whether our launchers take tensors of ``device`` in this process: CUDA's; the CPU's under the
    interpreter; meta tensors while the compile check records launches."""
    return (device.type == "cuda" or (device.type == "cpu" and interpreting())
            or (device.type == "meta" and META_LAUNCHES.enabled))
