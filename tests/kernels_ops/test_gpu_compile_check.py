"""benchmarks/gpu_compile_check.py: every Triton launch of a fused training step compiles for a real
GPU, through Triton's launch path, with no config that spills, on this machine without a GPU.

The check's quick form (sm_90, fp32 with tf32 and ieee products, every launch as recorded) runs
here;
the full form (sm_80 too, fp16 and bf16) is the documented command. Both run without the
interpreter, so they run in a subprocess whose environment drops TRITON_INTERPRET."""
import json
import re
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # see pyproject's markers

ROOT = Path(__file__).resolve().parents[2]
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
# Kernels every fused training step launches (forward, backward, loss), whatever their tiling.
FUSED_STEP_KERNELS = {"_chain_conv_kernel", "_backward_pair_kernel", "_weight_grad_kernel",
                      "_apply_kernel", "_grad_partials_kernel", "_grad_finish_kernel",
                      "_bce_fwd_kernel", "_bce_bwd_kernel"}


@pytest.fixture(scope="module")
def quick_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile_check") / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_compile_check.py"), "--quick",
         "--rows", "bad",
         "--json", str(out)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1500)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


def test_quick_check_passes_with_its_summary_line(quick_check):
    proc, report = quick_check
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert report is not None, "the check wrote no JSON report"
    assert report["summary_line"] in proc.stdout
    assert ", 0 failed, 0 spilling (sm_90; fp32; triton " in report["summary_line"]


def test_every_launch_compiled_and_fits(quick_check):
    _, report = quick_check
    assert report is not None, "the check wrote no JSON report"
    rows = report["rows"]
    assert FUSED_STEP_KERNELS <= {r["kernel"] for r in rows}
    assert {r["arch"] for r in rows} == {"sm_90"} and {r["dtype"] for r in rows} == {"fp32"}
    for r in rows:
        assert not r["error"], r
        assert 0 < r["registers"] <= 255 and r["spill_stores"] == r["spill_loads"] == 0, r
        assert r["shared"] <= 232448, r  # sm_90's opt-in shared memory per block
    # Both products of every float32 GEMM.
    gemms = [r for r in rows if r["products"]]
    assert {r["products"] for r in gemms} == {"tf32", "ieee"}
    # tf32 products of a GEMM run on tensor cores, but the CUDA-core path below 16 columns
    assert all(r["tensor_cores"] != "-" for r in gemms if r["products"] == "tf32"
               and int(re.search(r"(?<!W_)BLOCK_N=(\d+)", r["config"]).group(1)) >= 16)
    assert all(r["tensor_cores"] == "-" for r in gemms if r["products"] == "ieee")


def _compile_one(tmp_path, kernel):
    """Compile tests/compile_check_kernels.py's ``kernel`` for sm_90 through the check's own job."""
    script = textwrap.dedent(f"""
        import json, sys, torch
        sys.path[:0] = [{str(ROOT)!r}, {str(ROOT / "tests")!r}]
        from benchmarks import gpu_compile_check as check
        check._init_worker({str(tmp_path)!r})
        launch = check.Launch("compile_check_kernels", {kernel!r},
                              (check.Pointer(torch.float32, 0),), {{"BLOCK": 64}}, "fp32", "sm_90")
        print(json.dumps(check.compile_job(check.Job("L01", launch, ""))))
        """)
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=ENV,
                          capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_a_launch_time_check_failure_is_a_failed_row(tmp_path):
    """The bug the check was built for: a tl.constexpr(nan) global compiles, then Triton's launch
    path rejects it; the literal compiles and passes."""
    row = _compile_one(tmp_path, "nan_global_kernel")
    assert "Global variable NAN has changed" in row["error"], row
    row = _compile_one(tmp_path, "nan_literal_kernel")
    assert not row["error"] and row["registers"] > 0 and row["spill_stores"] == 0, row
