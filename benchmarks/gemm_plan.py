"""The GEMM plan of one fused training step: every GEMM launch, its tile, and the work it executes
against the convolutions' own (useful) FLOPs, as a GPU with ``--sms`` multiprocessors would run it.

    python -m benchmarks.gemm_plan --size 64 --batch 512 [--dtype bf16] [--sms 132] [--json F]
                                   [--compile-check rows.json]

It runs the benchmark suite's fused step (D on real and fake, G; ngf = ndf = 64) on meta tensors
(shapes, no data, nothing runs) and reads the plans our launchers make for their launches
(kernels.META_LAUNCHES.plans: chain_gemm.ConvLaunch, conv_gemm.WeightGradLaunch), each matched to
the Triton launch it preceded, whose grid must hold exactly the programs the plan counts. Roles
(``G.L3.wgrad``) come from the model a launch ran in (hooks on G's and D's Sequentials) and the
layer whose channels it has. executed_flops = k_iterations_total x 2 x BM x BN x BK; useful_flops
are the convolutions' own, as torch.utils.flop_counter counts them. With a compile-check JSON
(benchmarks/gpu_compile_check.py --json) the rows also get registers, spills and CTAs per SM, and
waves count them.
"""
import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
GEMM_KERNELS = ("_chain_conv_kernel", "_backward_pair_kernel", "_weight_grad_kernel")
FINISH_KERNEL = "_grad_finish_kernel"  # bn_act's per-channel finish: T partial rows per program


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=64, choices=(32, 64), help="image size")
    p.add_argument("--batch", type=int, default=512)
    p.add_argument("--dtype", default="fp32", choices=tuple(DTYPES),
                   help="the models' dtype (fp32: tf32 products, PyTorch's default)")
    p.add_argument("--sms", type=int, default=132, help="multiprocessors of the target GPU")
    p.add_argument("--json", type=Path, help="write the plan as one JSON object to this file")
    p.add_argument("--compile-check", type=Path,
                   help="a gpu_compile_check --json file: registers, spills, CTAs per SM")
    return p.parse_args(argv)


# --- recording ------------------------------------------------------------------------------------


class Phases:
    """Which model's forward or backward is running: hooks on G's and D's top Sequentials (not on
    the fused modules, which a hook would unfuse)."""

    def __init__(self, models):
        self.now = ("-", "forward")
        self.handles = []
        for name, model in models.items():
            self.handles.append(model.main.register_forward_pre_hook(self._set(name, "forward")))
            self.handles.append(model.main.register_full_backward_pre_hook(
                self._set(name, "backward")))

    def _set(self, name, phase):
        def hook(*_):
            self.now = (name, phase)
        return hook

    def remove(self):
        for handle in self.handles:
            handle.remove()


def record_step(size, batch, dtype, sms):
    """(launches, plans, layers): the Triton launches of one fused step (module, name, args,
    kwargs, grid), the launchers' plans (kernel name, plans, (model, phase)) and the convolution
    layers of G and D (name -> [(transposed, weight shape)])."""
    import aigc_fast
    from aigc_fast.kernels import META_LAUNCHES
    from aigc_fast.models import build_models
    from aigc_fast.train import train_step
    from benchmarks.cases import DCGAN
    from benchmarks.gpu_compile_check import recording_launches

    meta = torch.device("meta")
    G, D = build_models(size, DCGAN.nz, DCGAN.ngf, DCGAN.ndf, DCGAN.nc)
    G, D = (aigc_fast.fuse(m.to(meta, dtype)) for m in (G, D))
    opt_g, opt_d = (torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999)) for m in (G, D))
    real = torch.empty(batch, DCGAN.nc, size, size, device=meta, dtype=dtype)
    z = torch.empty(batch, DCGAN.nz, 1, 1, device=meta, dtype=dtype)
    layers = {name: [(isinstance(m, torch.nn.ConvTranspose2d), tuple(m.weight.shape))
                     for m in model.modules() if isinstance(m, (torch.nn.Conv2d,
                                                                torch.nn.ConvTranspose2d))]
              for name, model in (("G", G), ("D", D))}
    phases, plans = Phases({"G": G, "D": D}), []

    class Listening(list):
        def append(self, item):
            super().append((*item, phases.now))

    META_LAUNCHES.plans = Listening()
    try:
        with recording_launches(sms, None) as launches:
            train_step(G, D, opt_g, opt_d, real, z,
                       aigc_fast.functional.bce_with_logits)
        plans = list(META_LAUNCHES.plans)
    finally:
        META_LAUNCHES.plans = None
        phases.remove()
    return launches, plans, layers


# --- the plan -------------------------------------------------------------------------------------


def _programs(grid):
    total = 1
    for extent in grid:
        total *= extent
    return total


def _layer_of(plan, layers):
    """(layer index, pass) of a plan among its model's ``layers``: a forward has the layer's own
    direction and channels, an input gradient the other direction and swapped channels, a weight
    gradient the layer's weight shape (C_out, C_in) of its launch."""
    from aigc_fast.kernels.conv_gemm import WeightGradLaunch

    for i, (transposed, shape) in enumerate(layers):
        c_in, c_out = (shape[0], shape[1]) if transposed else (shape[1], shape[0])
        if isinstance(plan, WeightGradLaunch):
            if (plan.c_out, plan.c_in) == shape[:2]:
                return i, "wgrad"
        elif plan.transposed == transposed and (plan.x_shape[1], plan.c_out) == (c_in, c_out):
            return i, "fwd"
        elif plan.transposed != transposed and (plan.x_shape[1], plan.c_out) == (c_out, c_in):
            return i, "dgrad"
    return -1, "?"


def _gemm_row(plan):
    """One GEMM of a launch, in the plan's terms (see the module docstring)."""
    from aigc_fast.kernels.conv_gemm import WeightGradLaunch

    t = plan.tile
    total, most = plan.k_iterations()
    useful = plan.useful_flops()
    if isinstance(plan, WeightGradLaunch):
        m, n, k = plan.c_out, plan.c_in * plan.taps, plan.pixels
    else:
        oh, ow = plan.out_hw
        m, n = plan.x_shape[0] * oh * ow, plan.c_out
        k = useful // (2 * m * n)
    return {"M": m, "N": n, "K": k, "tile": [t.block_m, t.block_n, t.block_k], "warps": t.warps,
            "stages": t.stages, "programs": plan.programs, "split_k": plan.splits,
            "k_iterations_total": total, "k_iterations_max": most, "useful_flops": useful,
            "executed_flops": total * 2 * t.block_m * t.block_n * t.block_k}


def _finalize_rows(kernel, plans, launch):
    """Row tiles that one program of this launch walks to close a reduction (0 if none)."""
    from aigc_fast.kernels.chain_gemm import ConvLaunch

    if kernel == FINISH_KERNEL:
        return launch[2][1]  # its T argument: the partial rows each channel block adds
    return max((p.finalize_rows() for p in plans if isinstance(p, ConvLaunch)), default=0)


def build_plan(size, batch, dtype_name, sms, compile_rows=None):
    """The plan as one JSON-ready object (the module docstring's ``--json`` layout)."""
    launches, plans, layers = record_step(size, batch, DTYPES[dtype_name], sms)
    gemm_launches = [launch for launch in launches if launch[1] in GEMM_KERNELS]
    if [launch[1] for launch in gemm_launches] != [kernel for kernel, _, _ in plans]:
        raise RuntimeError("the launchers' plans and the recorded GEMM launches disagree")
    rows, finalize = [], 0
    for launch, (kernel, launch_plans, (model, phase)) in zip(gemm_launches, plans):
        gemms = [_gemm_row(p) for p in launch_plans]
        if _programs(launch[4]) != sum(g["programs"] for g in gemms):
            raise RuntimeError(f"{kernel}: grid {launch[4]} is not the plan's programs")
        found = [_layer_of(p, layers.get(model, [])) for p in launch_plans]
        passes = "+".join(sorted({p for _, p in found}))
        role = f"{model}.L{found[0][0]}.{passes}"
        rows.append({"kernel": kernel, "role": role,
                     "recompute": phase == "backward" and passes == "fwd", "gemms": gemms})
        finalize = max(finalize, _finalize_rows(kernel, launch_plans, launch))
    finalize = max([finalize] + [_finalize_rows(FINISH_KERNEL, [], launch)
                                 for launch in launches if launch[1] == FINISH_KERNEL])
    if compile_rows is not None:
        _add_compile_facts(rows, compile_rows)
    return {"config": {"size": size, "batch": batch, "dtype": dtype_name, "arch": "sm_90",
                       "sms": sms},
            "launches": rows, "finalize_max_row_tiles": finalize, "totals": totals(rows, sms)}


def _add_compile_facts(rows, compile_rows):
    """Registers, spills and CTAs per SM of each GEMM launch's kernel from a compile check's rows
    (the worst row of that kernel and dtype on sm_90: one CTA per SM when unknown)."""
    by_kernel = {}
    for r in compile_rows:
        if r.get("arch") == "sm_90" and not r.get("error"):
            worst = by_kernel.get(r["kernel"])
            if worst is None or r["registers"] > worst["registers"]:
                by_kernel[r["kernel"]] = r
    for row in rows:
        facts = by_kernel.get(row["kernel"])
        if facts is not None:
            threads = 32 * row["gemms"][0]["warps"]
            row["registers"], row["spills"] = facts["registers"], (facts["spill_stores"]
                                                                  + facts["spill_loads"])
            row["ctas_per_sm"] = max(1, min(65536 // (facts["registers"] * threads),
                                            232448 // max(facts["shared"], 1)))


def totals(rows, sms):
    """Exact sums or maxima of the rows, and the targets' figures."""
    gemms = [(row, g) for row in rows for g in row["gemms"]]
    useful = sum(g["useful_flops"] for _, g in gemms)
    executed = sum(g["executed_flops"] for _, g in gemms)
    large = sum(g["useful_flops"] for _, g in gemms if g["tile"][0] >= 128 and g["tile"][1] >= 128)
    short = sorted({row["role"] for row in rows
                    if sum(g["useful_flops"] for g in row["gemms"]) > 0.02 * useful
                    and sum(g["programs"] for g in row["gemms"]) < sms * row.get("ctas_per_sm", 1)})
    return {"launches": len(rows), "useful_flops": useful, "executed_flops": executed,
            "executed_over_useful": executed / useful,
            "k_iterations_max": max(g["k_iterations_max"] for _, g in gemms),
            "share_on_128x128_tiles": large / useful,
            "large_launches_under_one_wave": short}


@functools.lru_cache(maxsize=None)
def step_totals(size, batch, sms=132):
    """The totals of a float32 step's plan, for the benchmark suite and the GPU report to carry
    beside their times: recorded in this process, or, where the interpreter has replaced Triton's
    launch path (the recording needs the real one), in a subprocess without it."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return build_plan(size, batch, "fp32", sms)["totals"]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "plan.json"
        subprocess.run([sys.executable, "-m", "benchmarks.gemm_plan", "--size", str(size),
                        "--batch", str(batch), "--sms", str(sms), "--json", str(out)],
                       cwd=ROOT, env=env, check=True, capture_output=True)
        return json.loads(out.read_text())["totals"]


# --- report ---------------------------------------------------------------------------------------


def print_plan(plan):
    c, t = plan["config"], plan["totals"]
    sms = c["sms"]
    print(f"# GEMM plan: {c['size']} px b{c['batch']} {c['dtype']}, {sms} SMs "
          f"({t['launches']} GEMM launches)\n")
    print("| role | kernel | M | N | K | tile | warps/stages | split-K | programs | waves "
          "| k-it max | useful GF | executed GF | x |\n|" + "---|" * 14)
    for row in plan["launches"]:
        for g in row["gemms"]:
            waves = g["programs"] / (sms * row.get("ctas_per_sm", 1))
            print(f"| {row['role']}{' (recompute)' if row['recompute'] else ''} | {row['kernel']} "
                  f"| {g['M']} | {g['N']} | {g['K']} | {'x'.join(map(str, g['tile']))} | "
                  f"{g['warps']}/{g['stages']} | {g['split_k']} | {g['programs']} | {waves:.2f} | "
                  f"{g['k_iterations_max']} | {g['useful_flops'] / 1e9:.2f} | "
                  f"{g['executed_flops'] / 1e9:.2f} | "
                  f"{g['executed_flops'] / g['useful_flops']:.2f} |")
    print(f"\ntotals: useful {t['useful_flops'] / 1e9:.1f} GFLOP, executed "
          f"{t['executed_flops'] / 1e9:.1f} GFLOP ({t['executed_over_useful']:.2f}x); most "
          f"k-iterations in one program {t['k_iterations_max']}; finalize row tiles "
          f"{plan['finalize_max_row_tiles']}; on >= 128x128 tiles "
          f"{100 * t['share_on_128x128_tiles']:.0f} %; launches over 2 % of the FLOPs under one "
          f"wave: {', '.join(t['large_launches_under_one_wave']) or 'none'}")


def main(argv=None):
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("gemm_plan: TRITON_INTERPRET=1 would interpret the kernels; the plan "
                         "records their launches for a GPU: run it without TRITON_INTERPRET")
    compile_rows = json.loads(args.compile_check.read_text())["rows"] if args.compile_check \
        else None
    plan = build_plan(args.size, args.batch, args.dtype, args.sms, compile_rows)
    print_plan(plan)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(plan, indent=1))


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
