"""benchmarks/gpu_compile_check.py: every Triton launch of a fused training step compiles for a real
GPU, through Triton's launch path, with no config that spills, on this machine without a GPU.

The check's quick form (sm_90, fp32 with tf32 and ieee products, every launch as recorded) runs
here;
the full form (sm_80 too, fp16 and bf16) is the documented command. Both run without the
interpreter, so they run in a subprocess whose environment drops TRITON_INTERPRET; so does the
recording of the GAN variants' steps, whose launches are checked here against what each variant
runs."""
import collections
import json
import re
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
# Kernels every fused training step launches (forward, backward, loss), whatever their tiling.
FUSED_STEP_KERNELS = {"_chain_conv_kernel", "_backward_pair_kernel", "_weight_grad_kernel",
                      "_apply_kernel", "_grad_partials_kernel", "_grad_finish_kernel",
                      "_bce_fwd_kernel", "_bce_bwd_kernel"}
BCE_KERNELS = {"_bce_fwd_kernel", "_bce_bwd_kernel"}
STEP = "32 px b64 step"  # the default variant's, beside which the 32 px variants are recorded


@pytest.fixture(scope="module")
def quick_check(tmp_path_factory):
    out = tmp_path_factory.mktemp("compile_check") / "rows.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_compile_check.py"), "--quick",
         "--rows", "bad",
         "--json", str(out)],
        cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=1500)
    return proc, (json.loads(out.read_text()) if out.exists() else None)


@pytest.mark.slow  # see pyproject's markers
def test_quick_check_passes_with_its_summary_line(quick_check):
    proc, report = quick_check
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert report is not None, "the check wrote no JSON report"
    assert report["summary_line"] in proc.stdout
    assert ", 0 failed, 0 spilling (sm_90; fp32; triton " in report["summary_line"]


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_launch_time_check_failure_is_a_failed_row(tmp_path):
    """The bug the check was built for: a tl.constexpr(nan) global compiles, then Triton's launch
    path rejects it; the literal compiles and passes."""
    row = _compile_one(tmp_path, "nan_global_kernel")
    assert "Global variable NAN has changed" in row["error"], row
    row = _compile_one(tmp_path, "nan_literal_kernel")
    assert not row["error"] and row["registers"] > 0 and row["spill_stores"] == 0, row


# Every training step of the check's workloads, recorded for sm_90 in float32 with tf32 as the
# check records it, each launch with its compile key and, for a GEMM, the convolution it computes
# (the GEMM plan's: a backward pair's is its input gradient).
RECORD_STEPS = textwrap.dedent(f"""
    import json, sys
    sys.path.insert(0, {str(ROOT)!r})
    from benchmarks import gpu_compile_check as check
    from aigc_fast.kernels import META_LAUNCHES
    from aigc_fast.kernels.chain_gemm import Epilogue

    steps = {{}}
    for where, call in check.workloads():
        if " step" not in where:
            continue
        META_LAUNCHES.plans = []
        launches = check.record_workload(call, "sm_90", "fp32")
        plans, rows = iter(META_LAUNCHES.plans), []
        for launch in launches:
            row = {{"kernel": launch.name, "key": repr(launch.key())}}
            if launch.name in ("_chain_conv_kernel", "_backward_pair_kernel",
                               "_weight_grad_kernel"):
                kernel, (*_, conv) = next(plans)
                assert kernel == launch.name, (kernel, launch.name)
                if kernel != "_weight_grad_kernel":
                    row["conv"] = (conv.x_shape, conv.c_out, conv.transposed,
                                   Epilogue(conv.constexprs["OUT_MODE"]).name)
            rows.append(row)
        steps[where] = rows
    print(json.dumps(steps))
    """)


@pytest.fixture(scope="module")
def steps():
    """label -> the step's recorded launches (dicts: kernel, key, conv), in launch order."""
    proc = subprocess.run([sys.executable, "-c", RECORD_STEPS], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _convs(rows, kernel="_chain_conv_kernel", transposed=None):
    """How often each convolution ((input shape, output channels, transposed, epilogue)) ran as a
    launch of ``kernel`` (only those of the direction ``transposed``, unless None)."""
    return collections.Counter(
        (tuple(r["conv"][0]), *r["conv"][1:]) for r in rows
        if r["kernel"] == kernel and transposed in (None, r["conv"][2]))


def _kernels(rows):
    return {r["kernel"] for r in rows}


def test_each_variant_step_adds_launches_of_its_own(steps):
    """Every step but hinge + SN (below) records launches that no step before it made (the default
    steps first): each variant's are what its workload adds to the check's compiles."""
    assert list(steps)[:2] == [STEP, "64 px b512 step"]
    assert {"32 px b64 step (hinge + SN)", "32 px b64 step (wgan-gp)", "32 px b64 step (R1)",
            "32 px b64 step (conditional)", "128 px b64 step", "256 px b32 step"} <= set(steps)
    seen = set()
    for where, rows in steps.items():
        keys = {r["key"] for r in rows}
        assert where == "32 px b64 step (hinge + SN)" or keys - seen, \
            f"{where} adds no launch to the earlier steps'"
        seen |= keys


def test_the_hinge_sn_step_reads_spectral_norms_weights_as_plain_ones(steps):
    """hinge + SN: the default step's convolutions without the BCE kernels (hinge is PyTorch ops).
    Spectral norm's weight, original / sigma, has the channels-last strides fuse() gave its
    original, so D's forwards are the default step's launches (contiguous rows, async copies):
    the step adds no launch of its own."""
    default, sn = steps[STEP], steps["32 px b64 step (hinge + SN)"]
    assert _kernels(default) - _kernels(sn) == BCE_KERNELS
    assert _convs(sn) == _convs(default)
    d_forwards = [r for r in sn if r["kernel"] == "_chain_conv_kernel" and not r["conv"][2]]
    assert d_forwards and {r["key"] for r in sn} <= {r["key"] for r in default}


def test_the_wgan_gp_step_runs_the_critic_and_its_penalty(steps):
    """wgan-gp: D without BatchNorm (every forward's epilogue is the activation alone), no BCE
    kernel, and the gradient penalty's forward of D on the interpolates: each of D's layers runs
    forward once more than in the default step. The penalty's double backward launches nothing of
    ours (the chain's backward under create_graph is PyTorch's ops, aigc_fast.ops): no other
    convolution launch is added, and D's backward GEMMs are the default step's, without
    BatchNorm's backward epilogue."""
    default, gp = steps[STEP], steps["32 px b64 step (wgan-gp)"]
    assert not _kernels(gp) & BCE_KERNELS
    d_forwards = {k[:2]: n for k, n in _convs(default, transposed=False).items()}
    assert _convs(gp, transposed=False) == {(*k, False, "ACT"): n + 1
                                           for k, n in d_forwards.items()}
    assert sum(_convs(gp).values()) == sum(_convs(default).values()) + len(d_forwards)
    pairs = _convs(gp, "_backward_pair_kernel")
    assert sum(pairs.values()) == sum(_convs(default, "_backward_pair_kernel").values())
    assert "BN_ACT_GRAD" not in {k[3] for k in pairs if k[2]}  # D's: conv-transposes


def test_the_r1_step_differentiates_d_at_the_real_images(steps):
    """R1 (lazy, due at step 0): D's backward on the real images also computes their gradient, so
    its first layer's input gradient (3 channels) runs in a backward pair with the layer's weight
    gradient, which the default step computes alone."""
    default, r1 = steps[STEP], steps["32 px b64 step (R1)"]
    image_grad = ((64, 64, 16, 16), 3, True, "ACT")
    assert _convs(default, "_backward_pair_kernel")[image_grad] == 0
    assert _convs(r1, "_backward_pair_kernel")[image_grad] == 1


def test_the_conditional_step_runs_the_embedding_and_the_projection_head(steps):
    """Conditional: G's first layer reads z times the class embedding (nz = 100 channels) and its
    backward computes their gradient (the embedding trains), which the default step, whose z
    needs none, does not; D's trunk ends in BatchNorm + LeakyReLU applied by their own launches
    before the head's chain, for real, fake and G's pass alike."""
    default, cond = steps[STEP], steps["32 px b64 step (conditional)"]
    assert _convs(cond)[((64, 100, 1, 1), 256, True, "BN_BATCH")] == 1
    z_grad = ((64, 256, 4, 4), 100, False, "ACT")
    assert _convs(cond, "_backward_pair_kernel")[z_grad] == 1
    assert _convs(default, "_backward_pair_kernel")[z_grad] == 0
    assert [r["kernel"] for r in cond].count("_apply_kernel") == 3
    assert "_apply_kernel" not in _kernels(default)


@pytest.mark.parametrize("where,image,deepest", [("128 px b64 step", (64, 3, 128, 128), 1024),
                                                 ("256 px b32 step", (32, 3, 256, 256), 2048)])
def test_the_large_steps_run_their_deeper_networks(steps, where, image, deepest):
    """128 and 256 px: D reads the images of that size and its deepest layer has 16 or 32 ndf."""
    d_forwards = _convs(steps[where], transposed=False)
    assert any(x == image for x, *_ in d_forwards)
    assert max(c for _, c, *_ in d_forwards if c > 1) == deepest
