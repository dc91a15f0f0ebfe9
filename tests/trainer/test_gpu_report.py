"""benchmarks/gpu_report.py --dry-run: the GPU report's whole path on the CPU at tiny sizes, our
kernels interpreted, before a GPU ever sees it."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from benchmarks import gpu_report

pytestmark = pytest.mark.slow  # see pyproject's markers

ROOT = Path(__file__).resolve().parents[2]
PROVIDERS = ("eager", "fused", "fused[interpret]")  # "fused" needs CUDA: it must fail, and alone


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "report.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the script must set it
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_report.py"), "--dry-run", "--json",
         str(out),
         "--providers", ",".join(PROVIDERS)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout, json.loads(out.read_text())


def test_dry_run_checks_the_fused_ops_first(dry_run):
    _, report = dry_run
    checked = {(c["op"], c["quantity"]) for c in report["checks"]}
    quantities = ("out", "grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias", "running_mean",
                  "running_var")
    assert {("conv_transpose_bn_relu", q) for q in quantities} <= checked
    assert {("bce_with_logits", "loss"), ("bce_with_logits", "grad_logits")} <= checked
    assert all(c["ok"] and c["fused_error"] <= c["tolerance"] for c in report["checks"])


def test_dry_run_measures_every_group_and_reports_a_failing_provider(dry_run):
    _, report = dry_run
    rows = report["results"]
    assert {r["group"]
            for r in rows} == {"conv_transpose_bn_relu fwd", "conv_transpose_bn_relu fwd+bwd",
                                          "bce_with_logits fwd+bwd", "train_step"}
    for r in rows:
        assert r["provider"] in PROVIDERS
        assert r["flops"] > 0 and r["min_bytes"] > 0
        if r["provider"] == "fused":  # no CUDA here: a failed row with the reason, the rest ran on
            assert r["status"] == "failed" and "CUDA" in r["error"]
            continue
        assert r["status"] == "ok", r
        assert 0 < r["p20_s"] <= r["median_s"] <= r["p80_s"]
        assert r["tflops"] > 0 and r["gbps"] > 0 and r["saved_bytes"] > 0
    interpreted = [r for r in rows if r["provider"] == "fused[interpret]"]
    assert interpreted and all(r["impl"] == "triton" for r in interpreted)
    env = report["environment"]
    assert env["triton_interpret"] and env["torch"] and env["triton"] and env["date"] \
        and env["device"]


def test_dry_run_prints_one_table_that_the_json_holds(dry_run):
    stdout, report = dry_run
    assert stdout.count(gpu_report.TABLE_HEADER) == 1
    assert report["table"] in stdout
    table_rows = report["table"].splitlines()[2:]
    assert len(table_rows) == len(report["results"])
    eager = [line for line in table_rows if "| eager |" in line]
    assert eager and all("| 1.00× |" in line for line in eager)


def test_a_spent_budget_skips_the_measurement():
    gpu_report.prepare_imports()
    from benchmarks import cases

    args = gpu_report.parse_args(["--dry-run"])
    case = cases.tiny_cases()[-1]
    row = gpu_report.measure_row(case, "eager", gpu_report.torch.device("cpu"), args,
                                 time.monotonic() - 1)
    assert row["status"] == "skipped" and row["error"] == "time budget spent"


def test_compile_provider_row():
    """torch.compile (inductor's C++ backend on a CPU) through the report, on the cheapest case."""
    gpu_report.prepare_imports()
    from benchmarks import cases

    args = gpu_report.parse_args(["--dry-run"])
    row = gpu_report.measure_row(cases.BCECase(cases.TINY_BATCH), "compile",
                                 gpu_report.torch.device("cpu"), args, time.monotonic() + 120)
    assert row["status"] == "ok", row
    assert row["median_s"] > 0 and row["setup_s"] > 0


def test_time_limit_interrupts_a_measurement():
    start = time.monotonic()
    with pytest.raises(gpu_report._OutOfTime):
        with gpu_report.time_limit(0.2):
            time.sleep(5)
    assert time.monotonic() - start < 2


def test_fused_graph_provider_rows():
    """fused-graph (the fused step in one CUDA graph) sits beside compile-reduce-overhead for the
    whole step at 32 px b64 and 64 px b512 in the GPU plan; without CUDA its row fails, saying
    why."""
    gpu_report.prepare_imports()
    from benchmarks import cases, providers

    plan = providers.plan(gpu_report.torch.device("cuda"))  # the plan only: nothing runs on CUDA
    graphed = [c for c, p in plan if p == "fused-graph"]
    sizes = {(c.image_size, c.batch) for c in graphed}
    assert sizes == {(32, 64),
                     (64, 512)} and all(isinstance(c, cases.TrainStepCase) for c in graphed)
    assert all((c, "compile-reduce-overhead") in plan for c in graphed)
    args = gpu_report.parse_args(["--dry-run"])
    row = gpu_report.measure_row(graphed[0], "fused-graph", gpu_report.torch.device("cpu"), args,
                                 time.monotonic() + 60)
    assert row["status"] == "failed" and "CUDA graph: CUDA only" in row["error"], row
