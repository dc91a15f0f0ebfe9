"""pytest glue for the benchmark suite: the device, and the ``measure_case`` fixture that times one
(case, provider) with pytest-benchmark and records what the figure means in ``extra_info``.

Timing: pytest-benchmark's host clock around the call followed by ``torch.cuda.synchronize()``
(:func:`benchmarks.measure.synchronized`) on a GPU, so the GPU work is inside the timing.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():  # the fused[interpret] provider: set before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from aigc_fast.kernels import interpreting  # noqa: E402  (after TRITON_INTERPRET)
from benchmarks import gpu_report, measure, providers, step_traffic  # noqa: E402
from benchmarks.cases import case_id  # noqa: E402

DEVICE = providers.default_device()
DTYPE = torch.float32


@pytest.fixture(scope="session")
def environment():
    return measure.environment(DEVICE)


@pytest.fixture
def measure_case(benchmark, environment):
    """Build ``(case, provider)`` (compile and autotune happen here, untimed), time it, then probe
    its memory, saved bytes and launches in separate untimed calls."""
    if DEVICE.type == "cuda" and interpreting():
        pytest.exit("TRITON_INTERPRET=1 would interpret every Triton kernel (ours and inductor's): "
                    "unset it to benchmark on the GPU", returncode=pytest.ExitCode.USAGE_ERROR)

    def run(case, provider):
        workload = providers.build(case, provider, DEVICE, DTYPE)
        benchmark.group = case_id(case)
        info = benchmark.extra_info
        info.update(environment)
        info.update(measure.describe(case, provider, DTYPE), **workload.notes,
                    timing="host clock around call + torch.cuda.synchronize()"
                    if DEVICE.type == "cuda" else "host clock around call")
        benchmark(measure.synchronized(workload.run, DEVICE))
        if benchmark.stats is not None:  # None under --benchmark-disable
            info.update(measure.achieved(info, benchmark.stats.stats.median))
        info.update(measure.probes(workload.run, DEVICE))
        info.update(step_traffic.counted_for(case, provider))
        plan = gpu_report.gemm_plan_totals(case)
        if plan is not None:  # the prediction beside the time (benchmarks/gemm_plan.py)
            info["gemm_plan"] = plan

    return run
