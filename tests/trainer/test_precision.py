"""--precision: the choice per device and on resume, the step under autocast (float32 master
weights, optimiser state, BN statistics and losses), fp16's gradient scaler, and a bf16 CPU run that
learns."""
import json
from functools import partial

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aigc_fast.training.data import make_shapes
from aigc_fast.models import build_models
from aigc_fast.training.precision import Precision, resolve_precision
from aigc_fast.train import main, train_step
from cli_helpers import assert_one_line_error, run_cli

_cli = partial(run_cli, main, prog="aigc_fast.train")
CPU, CUDA = torch.device("cpu"), torch.device("cuda")


def _tiny_step_setup(seed=0):
    torch.manual_seed(seed)
    G, D = build_models(32, nz=16, ngf=4, ndf=4, nc=3)
    opt = lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.5, 0.999))  # noqa: E731
    gen = torch.Generator().manual_seed(seed + 1)
    real, z = torch.rand(4, 3, 32, 32, generator=gen) * 2 - 1, torch.randn(4, 16, generator=gen)
    return G, D, opt(G), opt(D), real, z


def _state(*modules):
    return [t.clone() for m in modules for t in m.state_dict().values()]


def test_the_choice_of_precision():
    assert resolve_precision(None, CPU) == ("fp32", "default on cpu")
    assert resolve_precision(None, CUDA) == ("tf32", "default on cuda")
    assert resolve_precision("bf16", CPU) == ("bf16", "requested")
    assert resolve_precision(None, CPU, saved="fp16") == ("fp16", "the checkpoint's")
    assert resolve_precision("bf16", CPU, saved="fp16") == (
        "bf16", "requested; the checkpoint trained in fp16")
    # a CUDA run's tf32 resumed on a CPU: the CPU's default, and the change said
    assert resolve_precision(None, CPU, saved="tf32") == (
        "fp32", "default on cpu; the checkpoint trained in tf32")
    with pytest.raises(ValueError, match=r"--precision tf32: .*CUDA.*expected fp32, bf16 or fp16"):
        resolve_precision("tf32", CPU)


def test_tf32_on_a_cpu_is_a_one_line_error(capsys, tmp_path):
    status, _, err = _cli(["--precision", "tf32", "--device", "cpu", "--out",
                           str(tmp_path)], capsys)
    assert_one_line_error(status, err, "--precision tf32", "expected fp32, bf16 or fp16")


@pytest.mark.parametrize("name,dtype", [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_half_step_keeps_float32_state_and_tracks_the_float32_step(name, dtype):
    """Under autocast the convolutions run in ``dtype``, while parameters, their gradients, Adam's
    moments, BN's running statistics and the returned losses stay float32; the losses are those of
    the float32 step to half precision's tolerance (2e-2 relative, bf16's 8-bit mantissa)."""
    G, D, opt_g, opt_d, real, z = _tiny_step_setup()
    G32, D32, opt_g32, opt_d32, _, _ = _tiny_step_setup()
    seen = []
    G.main[0].register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    precision = Precision(name, CPU)
    # fp16: a scale this tiny D's gradients never overflow
    for scaler in precision.scalers.values():
        scaler.load_state_dict(dict(scaler.state_dict(), scale=2.0**8))
    got = train_step(G, D, opt_g, opt_d, real, z, F.binary_cross_entropy_with_logits, precision)
    expected = train_step(G32, D32, opt_g32, opt_d32, real, z, F.binary_cross_entropy_with_logits)
    assert seen == [dtype]
    assert all(v.dtype == torch.float32 for v in got.values())
    for key in got:
        assert abs(got[key] - expected[key]) <= 2e-2 * abs(expected[key]), key
    tensors = [*G.state_dict().values(), *D.state_dict().values(),
               *(p.grad for p in G.parameters()),
               *(v for opt in (opt_g, opt_d) for s in opt.state.values() for v in s.values())]
    assert {t.dtype for t in tensors if t.is_floating_point()} == {torch.float32}


def test_fp16_overflow_step_is_skipped_and_training_continues():
    """A loss scale of 2**40 overflows float16 gradients: that step leaves weights and Adam
    untouched and backs the scale off (here straight to 2**10); the next step trains, finitely."""
    G, D, opt_g, opt_d, real, z = _tiny_step_setup()
    precision = Precision("fp16", CPU)
    for scaler in precision.scalers.values():
        scaler.load_state_dict(dict(scaler.state_dict(), scale=2.0**40, backoff_factor=2.0**-30))
    before = _state(G, D)
    params = [p.clone() for m in (G, D) for p in m.parameters()]
    train_step(G, D, opt_g, opt_d, real, z, F.binary_cross_entropy_with_logits, precision)
    assert all(torch.equal(p, q) for p,
               q in zip(params, (p for m in (G, D) for p in m.parameters())))
    assert not opt_g.state and not opt_d.state  # Adam took no step
    assert [s.get_scale() for s in precision.scalers.values()] == [2.0**10, 2.0**10]

    metrics = train_step(G, D, opt_g, opt_d, real, z, F.binary_cross_entropy_with_logits, precision)
    after = _state(G, D)
    assert all(torch.isfinite(t).all() for t in after if t.is_floating_point())
    assert all(torch.isfinite(v) for v in metrics.values())
    assert not all(torch.equal(a, b) for a, b in zip(before, after)) and opt_g.state and opt_d.state
    assert [s.get_scale() for s in precision.scalers.values()] == [2.0**10, 2.0**10]


def test_resume_under_another_precision_says_so(tmp_path, capsys, shapes_npz):
    common = ["--data", shapes_npz(32, seed=5), "--ngf", "4", "--ndf", "4", "--nz", "8",
              "--batch-size", "4", "--workers", "0", "--eval-every", "0"]
    out = tmp_path / "run"
    status, stdout, _ = _cli(common + ["--precision", "fp16", "--steps", "2", "--out", str(out)],
                             capsys)
    assert status == 0 and "| precision fp16 (requested) |" in stdout
    last = out / "checkpoints" / "last.pt"
    status, stdout, _ = _cli(["--resume", str(last), "--steps", "3"], capsys)
    assert status == 0 and "| precision fp16 (the checkpoint's) |" in stdout
    status, stdout, _ = _cli(["--resume", str(last), "--steps", "4", "--precision", "bf16"], capsys)
    assert status == 0 \
        and "| precision bf16 (requested; the checkpoint trained in fp16) |" in stdout
    assert json.loads((out / "config.json").read_text())["precision"] == "bf16"
    ckpt = torch.load(last, weights_only=True)
    assert "scalers" not in ckpt  # bf16 has no scaler
    weights = [*ckpt["G"].values(), *ckpt["D"].values(), *ckpt["G_ema"].values()]
    assert {t.dtype for t in weights if t.is_floating_point()} == {torch.float32}


def test_bf16_cpu_run_learns(tmp_path):
    """150 bf16 steps (eager, CPU autocast) take the SWD well below the untrained generator's
    (measured: 194 -> 163; fp32 on the same steps: 155)."""
    data = tmp_path / "shapes.npz"
    np.savez(data, images=make_shapes(256, 32, seed=3).permute(0, 2, 3, 1).numpy())
    out = tmp_path / "run"
    assert main(["--data", str(data), "--precision", "bf16", "--backend", "eager", "--steps", "150",
                 "--eval-every", "150", "--eval-n", "256", "--ngf", "8", "--ndf", "8", "--nz", "16",
                 "--batch-size", "16", "--workers", "0", "--lr", "1e-3", "--ema", "0",
                 "--out", str(out)]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    swd = {r["step"]: r["swd"]["mean"] for r in rows if "swd" in r}
    assert list(swd) == [0, 150] and swd[150] < 0.9 * swd[0], swd
