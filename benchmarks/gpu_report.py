"""One run, one table: the fused kernels checked and timed against eager PyTorch and torch.compile.

    python benchmarks/gpu_report.py --json benchmarks/results/<gpu>.json    # on a CUDA machine
    python benchmarks/gpu_report.py --dry-run                                # anywhere, on the CPU

On a GPU it first checks the fused ops against a float64 PyTorch reference (float32 and bfloat16),
then times the steps that decide the design, 64 px b512 and 32 px b64 for eager, compile, fused
and fused-graph (the fused step in one CUDA graph), each beside the GEMM plan's lower bound
(benchmarks/gemm_plan.py: its executed FLOPs at the tensor cores' peak), then every other
(case, provider) of :func:`benchmarks.providers.plan` -- a whole training step, each fused layer
forward+backward, BCE forward+backward, each fused layer forward, at batch 64, 256 and 512, for
eager, eager-channels_last, compile, compile-reduce-overhead and fused -- in that order (the least
telling last), and prints one markdown table and writes it, with every figure behind it,
as JSON. Times are CUDA events around each call (see :mod:`benchmarks.measure`). The run is
bounded: no new measurement starts once ``--budget-s`` is spent, and one measurement (its compile
included) may take at most ``--row-timeout-s``; a provider that fails or runs out of time is a row
saying so, and the rest runs. The exit status is 1 if a correctness check failed.

``--dry-run`` runs the same code on the CPU at tiny sizes with our kernels under Triton's
interpreter (it sets TRITON_INTERPRET=1 before triton is imported): a test that the script works,
not a measurement. Needs only torch, triton and numpy (not pytest); runs from a source checkout
whether or not aigc_fast is installed.
"""
import argparse
import contextlib
import gc
import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DTYPE = torch.float32  # of the timed workloads; the checks also cover bfloat16
# H100 SXM's dense tf32 tensor-core peak (FLOP/s), against which the GEMM plan's executed FLOPs
# give a step's lower bound (an H200 has the same tensor cores)
TF32_PEAK_FLOPS = 494.7e12


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", type=Path, help="also write the table and every figure to this file")
    p.add_argument("--dry-run", action="store_true",
                   help="tiny sizes on the CPU, our kernels interpreted: tests the script, "
                        "measures nothing")
    p.add_argument("--providers", help="comma-separated subset of the providers to run")
    p.add_argument("--budget-s", type=float, default=270.0,
                   help="start no new measurement after this many seconds (default 270)")
    p.add_argument("--row-timeout-s", type=float, default=90.0,
                   help="abandon one measurement, compile included, after this long (default 90)")
    p.add_argument("--max-time-s", type=float, default=0.2,
                   help="seconds of timed calls per measurement, at least 5 calls (default 0.2)")
    return p.parse_args(argv)


def choose_device(dry_run):
    """CUDA for a real run; the CPU with Triton interpreted for a dry run. TRITON_INTERPRET is read
    when triton is imported, so this runs before anything imports it."""
    if dry_run:
        if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
            raise SystemExit("--dry-run: triton was imported before TRITON_INTERPRET=1 could be "
                             "set")
        os.environ["TRITON_INTERPRET"] = "1"
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on a GPU machine, or pass --dry-run to try the "
                         "script on the CPU")
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("TRITON_INTERPRET=1 would interpret every Triton kernel: unset it to "
                         "measure a GPU")
    return torch.device("cuda")


def prepare_imports():
    """Make ``benchmarks.*`` and ``aigc_fast`` importable from this checkout. aigc_fast.kernels is
    the kernels/ folder, mapped there by pyproject's package-dir when installed; uninstalled (a bare
    GPU machine), the same mapping is made here."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if not _has_kernels_package():
        import aigc_fast

        spec = importlib.util.spec_from_file_location(
            "aigc_fast.kernels", ROOT / "kernels" / "__init__.py",
            submodule_search_locations=[str(ROOT / "kernels")])
        aigc_fast.kernels = sys.modules["aigc_fast.kernels"] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(aigc_fast.kernels)


def _has_kernels_package():
    try:
        return importlib.util.find_spec("aigc_fast.kernels") is not None
    except ModuleNotFoundError:
        return False


class _OutOfTime(BaseException):
    """Not an Exception, so that no ``except Exception`` on the way (a probe's, a library's) eats
    it."""


@contextlib.contextmanager
def time_limit(seconds):
    """Raise _OutOfTime in the main thread after ``seconds`` (SIGALRM; no limit where it is
    missing)."""
    if not hasattr(signal, "SIGALRM") or seconds <= 0:
        yield
        return

    def expire(signum, frame):
        raise _OutOfTime(f"gave up after {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def measure_row(case, provider, device, args, deadline):
    """Every figure of one (case, provider); a failure or a timeout becomes the row's status."""
    from benchmarks import measure, providers, step_traffic

    row = measure.describe(case, provider, DTYPE)
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return {**row, "status": "skipped", "error": "time budget spent"}
    workload = None
    try:
        with time_limit(min(args.row_timeout_s, remaining)):
            start = time.monotonic()
            workload = providers.build(case, provider, device, DTYPE)
            row["setup_s"] = time.monotonic() - start
            times = measure.time_calls(workload.run, device, args.max_time_s,
                                       min_reps=2 if args.dry_run else 5)
            row.update(measure.summary(times))
            row.update(measure.achieved(row, row["median_s"]))
            row.update(measure.probes(workload.run, device))
            row.update(step_traffic.counted_for(case, provider))
            row.update(workload.notes)
            row["status"] = "ok"
    except _OutOfTime as e:
        spent = time.monotonic() >= deadline
        row.update(status="skipped" if spent else "failed",
                   error="time budget spent" if spent else f"timed out: {e}")
    except Exception as e:  # a provider that breaks is reported, and the next one runs
        row.update(status="failed", error=measure.error_line(e))
    finally:
        del workload
        gc.collect()
        if provider.startswith("compile"):
            torch._dynamo.reset()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return row


def _time(seconds):
    for unit, scale in (("s", 1), ("ms", 1e-3), ("µs", 1e-6)):
        if seconds >= scale:
            return f"{seconds / scale:.3g} {unit}"
    return f"{seconds / 1e-6:.3g} µs"


def _ratio(base, row):
    return f"{base / row['median_s']:.2f}×" if base and row.get("status") == "ok" else "–"


def _mib(value):
    return "–" if value is None else f"{value / 2**20:.3g}"


def _count(value):
    return "–" if value is None else str(value)


TABLE_HEADER = ("| group | case | provider | time: median [p20–p80] | vs eager | vs compile | "
                "TFLOP/s | GB/s | peak MiB | saved MiB | launches | counted launches / MB |")


def _counted(row):
    """A step's counted launches and MB moved (model only; benchmarks.step_traffic), or "–"."""
    if row.get("counted_launches") is None:
        return "–"
    return f"{row['counted_launches']} / {row['counted_bytes'] / 1e6:.4g}"


def markdown_table(rows):
    """ONE table. "vs eager"/"vs compile": the speed-up, eager's (compile's) median time over the
    row's."""
    medians = {(r["group"], r["case"], r["provider"]): r["median_s"]
               for r in rows if r["status"] == "ok"}
    lines = [TABLE_HEADER, "|" + " --- |" * TABLE_HEADER.count(" | ") + " --- |"]
    for r in rows:
        key = (r["group"], r["case"])
        if r["status"] == "ok":
            cells = [f"{_time(r['median_s'])} [{_time(r['p20_s'])}–{_time(r['p80_s'])}]",
                     _ratio(medians.get((*key, "eager")), r),
                     _ratio(medians.get((*key, "compile")), r),
                     f"{r['tflops']:.3g}", f"{r['gbps']:.3g}", _mib(r.get("peak_memory_bytes")),
                     _mib(r.get("saved_bytes")), _count(r.get("kernel_launches")),
                     _counted(r)]
        else:
            cells = [f"{r['status']}: {r['error']}".replace("|", "\\|")] + ["–"] * 8
        provider = r["provider"] + (f" ({r['cudagraph_skips']} graphs not CUDA-graphed)"
                                    if r.get("cudagraph_skips") else "")
        lines.append("| " + " | ".join([r["group"], r["case"], provider, *cells]) + " |")
    return "\n".join(lines)


def check_lines(checks):
    """One line per (op, case, dtype): its worst quantity (a failing one first), PyTorch's beside
    it."""
    by_key = {}
    for c in checks:
        by_key.setdefault((c["op"], c["case"], c["dtype"]), []).append(c)
    lines = []
    for (op, case, dtype), found in by_key.items():
        failed = [c for c in found if not c["ok"]]
        c = max(failed or found, key=lambda c: c.get("fused_error", float("inf")))
        verdict = "ok" if c["ok"] else "FAIL"
        if "error" in c:
            lines.append(f"- {verdict} {op} {case} {dtype}: {c['error']}")
        else:
            lines.append(f"- {verdict} {op} {case} {dtype}: worst rel. error "
                         f"{c['fused_error']:.2e} ({c['quantity']}; PyTorch {dtype}: "
                         f"{c['torch_error']:.2e}; tolerance {c['tolerance']:.0e})")
    return lines


def choose_providers(plan, names):
    """The plan's cases, each with the providers ``names`` (comma-separated) instead of its own."""
    from benchmarks import providers

    wanted = names.split(",")
    unknown = [p for p in wanted if p not in providers.ALL]
    if unknown:
        raise SystemExit(f"--providers: unknown {unknown}; choose from {list(providers.ALL)}")
    return [(c, p) for c in dict.fromkeys(c for c, _ in plan) for p in wanted
            if providers.applies(c, p)]


def correctness(device, dry_run):
    """The checks (float32 and bfloat16 on a GPU; float32 at tiny sizes on a dry run), printed."""
    from benchmarks import accuracy, cases

    dtypes = (torch.float32,) if dry_run else (torch.float32, torch.bfloat16)
    network, batch = (cases.TINY, cases.TINY_BATCH) if dry_run else (cases.DCGAN, 16)
    checks = accuracy.run_checks(accuracy.check_cases(network, cases.IMAGE_SIZES, batch),
                                 64 if dry_run else 512, device, dtypes)
    print("\nCorrectness of the fused ops against float64 PyTorch (||out-ref||/||ref||):")
    print("\n".join(check_lines(checks)), flush=True)
    return checks


# What decides the design, measured first: the 64 px b512 and 32 px b64 float32 steps of these
# providers; then the rest of the plan in its order.
FIRST_STEPS = ((64, 512), (32, 64))
FIRST_PROVIDERS = ("eager", "compile", "fused", "fused-graph")


def decisive_first(plan):
    """``plan`` with the FIRST_STEPS x FIRST_PROVIDERS pairs moved to the front, in that order."""
    from benchmarks.cases import TrainStepCase

    def rank(pair):
        case, provider = pair
        if (isinstance(case, TrainStepCase) and not case.autocast
                and (case.image_size, case.batch) in FIRST_STEPS and provider in FIRST_PROVIDERS):
            return (FIRST_STEPS.index((case.image_size, case.batch)),
                    FIRST_PROVIDERS.index(provider))
        return (len(FIRST_STEPS), 0)

    return sorted(plan, key=rank)  # stable: the rest keeps the plan's order


def gemm_plan_totals(case):
    """The GEMM plan's totals for a full-size float32 step (benchmarks/gemm_plan.py), or None."""
    from benchmarks import gemm_plan
    from benchmarks.cases import DCGAN, TrainStepCase

    if not isinstance(case, TrainStepCase) or case.autocast or case.network != DCGAN:
        return None
    sms = torch.cuda.get_device_properties(0).multi_processor_count if torch.cuda.is_available() \
        else 132
    return gemm_plan.step_totals(case.image_size, case.batch, sms)


def measurements(device, args, deadline):
    """Every row of the plan, progress printed as it goes; providers side by side per case; each
    full-size float32 step with the GEMM plan's totals and the time they take at the tensor cores'
    peak (the plan's lower bound)."""
    from benchmarks import providers

    plan = decisive_first(providers.plan(device, dry_run=args.dry_run))
    if args.providers:
        plan = choose_providers(plan, args.providers)
    rows, plans = [], {}
    for case, provider in plan:
        r = measure_row(case, provider, device, args, deadline)
        if case not in plans:
            plans[case] = gemm_plan_totals(case)
        if plans[case] is not None:
            r["gemm_plan"] = plans[case]
            r["plan_lower_bound_s"] = plans[case]["executed_flops"] / TF32_PEAK_FLOPS
        outcome = (f"{_time(r['median_s'])} (set-up {r['setup_s']:.1f} s)" if r["status"] == "ok"
                   else r["error"])
        if "plan_lower_bound_s" in r:
            outcome += f"; GEMM plan's lower bound {_time(r['plan_lower_bound_s'])}"
        print(f"  {r['status']:7s} {r['group']} | {r['case']} | {provider}: {outcome}", flush=True)
        rows.append(r)
    group_rank = {g: i for i, g in enumerate(dict.fromkeys(r["group"] for r in rows))}
    return sorted(rows, key=lambda r: group_rank[r["group"]])  # stable: batch, case, provider order


def main(argv=None):
    args = parse_args(argv)
    started = time.monotonic()
    device = choose_device(args.dry_run)
    prepare_imports()
    from benchmarks import measure

    env = measure.environment(device)
    print(f"# aigc_fast report: {env['device']}, {env['date']}, torch {env['torch']}, "
          f"triton {env['triton']}, CUDA {env['cuda']}"
          + (" (DRY RUN: CPU, interpreted, tiny sizes)" if args.dry_run else ""), flush=True)
    checks = correctness(device, args.dry_run)
    rows = measurements(device, args, deadline=started + args.budget_s)
    table = markdown_table(rows)
    timing = ("CUDA events around each call, queued back to back, one sync at the end"
              if device.type == "cuda" else "host perf_counter around each call")
    precision = f"float32, tf32 convolutions {env['tf32_conv']}" if device.type == "cuda" \
        else "float32"
    print(f"\n{table}\n\n{precision}; {timing}; "
          "vs eager / vs compile = their median time over the row's (above 1: faster); "
          "TFLOP/s and GB/s from the median against the computed FLOPs and minimum bytes; peak = "
          "torch.cuda.max_memory_allocated during one call; saved = bytes kept for backward.")
    elapsed = time.monotonic() - started
    measured = sum(r["status"] == "ok" for r in rows)
    print(f"{measured}/{len(rows)} measured in {elapsed:.0f} s", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({
            "environment": env, "dry_run": args.dry_run, "timing": timing,
            "budget_s": args.budget_s,
            "elapsed_s": elapsed, "checks": checks, "results": rows, "table": table}, indent=1))
    return 0 if all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
