"""benchmarks/gemm_plan.py: the GEMM plan of a fused step, read from the launches our launchers
record on meta tensors (in a subprocess without the interpreter, which the recording replaces).
Its sums are exact, its grids are the recorded ones (the tool checks each launch and fails
otherwise), its useful FLOPs are what torch's FlopCounterMode counts for the eager step, and the
step's figures hold the plan's targets."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

ROOT = Path(__file__).resolve().parents[2]
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
GEMM_KEYS = {"M", "N", "K", "tile", "warps", "stages", "programs", "split_k", "k_iterations_total",
             "k_iterations_max", "useful_flops", "executed_flops"}


def run_plan(tmp_path, size, batch):
    out = tmp_path / f"plan{size}.json"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.gemm_plan", "--size", str(size),
                           "--batch", str(batch), "--json", str(out)],
                          cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "totals: useful" in proc.stdout
    return json.loads(out.read_text())


def eager_step_flops(size, batch):
    """The convolutions' FLOPs of one eager training step (D on real and fake, G), on meta
    tensors."""
    from aigc_fast.models import build_models
    from aigc_fast.train import train_step
    from benchmarks.cases import DCGAN

    meta = torch.device("meta")
    G, D = (m.to(meta) for m in build_models(size, DCGAN.nz, DCGAN.ngf, DCGAN.ndf, DCGAN.nc))
    opts = [torch.optim.Adam(m.parameters()) for m in (G, D)]
    real = torch.empty(batch, DCGAN.nc, size, size, device=meta)
    z = torch.empty(batch, DCGAN.nz, 1, 1, device=meta)
    with FlopCounterMode(display=False) as counter:
        train_step(G, D, *opts, real, z, torch.nn.functional.binary_cross_entropy_with_logits)
    return counter.get_total_flops()


@pytest.mark.parametrize("size, batch", [(64, 512), (32, 64)])
def test_plan_of_a_fused_step(size, batch, tmp_path):
    plan = run_plan(tmp_path, size, batch)
    assert plan["config"] == {"size": size, "batch": batch, "dtype": "fp32", "arch": "sm_90",
                              "sms": 132}
    gemms = [g for launch in plan["launches"] for g in launch["gemms"]]
    for launch in plan["launches"]:
        assert launch["kernel"] in ("_chain_conv_kernel", "_backward_pair_kernel",
                                    "_weight_grad_kernel")
        assert len(launch["gemms"]) == (2 if launch["kernel"] == "_backward_pair_kernel" else 1)
        assert launch["role"].split(".")[0] in ("G", "D") and ".L" in launch["role"]
    for g in gemms:
        assert set(g) == GEMM_KEYS
        bm, bn, bk = g["tile"]
        assert g["executed_flops"] == g["k_iterations_total"] * 2 * bm * bn * bk
        assert g["executed_flops"] >= g["useful_flops"] > 0
    totals = plan["totals"]
    assert totals["useful_flops"] == sum(g["useful_flops"] for g in gemms)
    assert totals["executed_flops"] == sum(g["executed_flops"] for g in gemms)
    assert totals["k_iterations_max"] == max(g["k_iterations_max"] for g in gemms)
    # the step's convolutions, as torch counts them: ours add D's first layer recomputed in each
    # of D's backward passes (a 3-channel layer: under 1 %)
    assert totals["useful_flops"] == pytest.approx(eager_step_flops(size, batch), rel=0.03)
    assert totals["k_iterations_max"] <= 256
    recomputed = [launch for launch in plan["launches"] if launch["recompute"]]
    assert recomputed and all(launch["role"] == "D.L0.fwd" for launch in recomputed)
    if size == 64:  # the plan's target (1.38 with one 128x64x16 tile for every launch)
        assert totals["executed_over_useful"] <= 1.10
