"""The trainer: the GAN step, the backend table, the CLI and its outputs, exact resume, failures."""
import copy
import errno
import json
import os
import re
import signal
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from aigc_fast import __version__
from aigc_fast.models import build_models
from aigc_fast.train import main, prepare_backend
from aigc_fast.training import checkpoint, loop, report
from aigc_fast.training.backends import BACKENDS, Backend, Prepared, resolve_backend, train_step
from aigc_fast.training.cli import UsageError, resolve_device
from aigc_fast.training.options import EXAMPLES_ALIASES, parse_args
from aigc_fast.training.report import format_rate
from aigc_fast.training.run import CHECKPOINT_KEYS, _next_run_dir, resolve_out_and_resume
from cli_helpers import assert_one_line_error, run_cli

_cli = partial(run_cli, main, prog="aigc_fast.train")  # _cli(argv, capsys) -> (status, out, err)

TINY = ["--ngf", "8", "--ndf", "8", "--nz", "16", "--batch-size", "4", "--workers", "0"]
NO_EVAL = ["--eval-every",
           "0"]  # for runs whose test is not about the SWD evaluation (seconds each)


@pytest.fixture(scope="module")
def npz(shapes_npz):
    """A small .npz data set (32 shapes): faster to load than the embedded 16k."""
    return shapes_npz(32, seed=5)






# --- the step -------------------------------------------------------------------------------------


def _tiny_models(seed=0):
    torch.manual_seed(seed)
    G, D = build_models(32, nz=16, ngf=4, ndf=4, nc=3)
    opt = lambda m: torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.5, 0.999))  # noqa: E731
    return G, D, opt(G), opt(D)


def _reference_step(G, D, opt_g, opt_d, real, z):
    """pytorch/examples' step, written independently: two D backwards, then G on the updated D."""
    bce = torch.nn.BCEWithLogitsLoss()
    opt_d.zero_grad()
    out_real = D(real)
    err_real = bce(out_real, torch.ones(len(real)))
    err_real.backward()
    fake = G(z)
    out_fake = D(fake.detach())
    err_fake = bce(out_fake, torch.zeros(len(real)))
    err_fake.backward()
    opt_d.step()
    opt_g.zero_grad()
    err_g = bce(D(fake), torch.ones(len(real)))
    err_g.backward()
    opt_g.step()
    return err_real + err_fake, err_g, torch.sigmoid(out_real).mean(), \
        torch.sigmoid(out_fake).mean()


def test_train_step_matches_the_textbook_step():
    ours, ref = _tiny_models(), _tiny_models()
    real = torch.rand(5, 3, 32, 32) * 2 - 1
    for step in range(3):
        z = torch.randn(5, 16)
        torch.manual_seed(step)  # G's forward draws no randomness, but keep both paths identical
        got = train_step(*ours, real, z, F.binary_cross_entropy_with_logits)
        expected = _reference_step(*ref, real, z)
        assert set(got) == {"loss_d", "loss_g", "d_real", "d_fake"}
        for value, want in zip(got.values(), expected):
            assert value.dim() == 0 and not value.requires_grad
            torch.testing.assert_close(value, want.detach(), rtol=1e-5, atol=1e-6)
    for a, b in ((ours[0], ref[0]), (ours[1], ref[1])):
        for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6, msg=name)
    assert all(p.requires_grad for p in ours[1].parameters())  # D unfrozen after G's step


def test_train_step_never_syncs_with_the_host(monkeypatch):
    """Any .item()/.tolist()/bool() in the step would be a device sync on CUDA.

    SGD rather than Adam: CPU Adam reads its (host) step counter with .item(), which is not ours.
    """
    G, D, _, _ = _tiny_models()
    opt_g, opt_d = (torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (G, D))
    real, z = torch.rand(4, 3, 32, 32) * 2 - 1, torch.randn(4, 16)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside train_step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    out = train_step(G, D, opt_g, opt_d, real, z, F.binary_cross_entropy_with_logits)
    monkeypatch.undo()
    assert 0 < out["d_real"].item() < 1 and 0 < out["d_fake"].item() < 1


def test_train_step_uses_the_given_loss_fn():
    G, D, opt_g, opt_d = _tiny_models()
    calls = []

    def loss_fn(logits, target):
        calls.append(target.tolist())
        return F.binary_cross_entropy_with_logits(logits, target)

    train_step(G, D, opt_g, opt_d, torch.rand(3, 3, 32, 32), torch.randn(3, 16), loss_fn)
    assert calls == [[1.0] * 3, [0.0] * 3, [1.0] * 3]  # D real, D fake, G


# --- backends -------------------------------------------------------------------------------------


def test_backend_table():
    cpu = torch.device("cpu")
    name, reason = resolve_backend("auto", cpu)
    assert name == "eager" and "cpu" in reason
    assert resolve_backend("eager", cpu) == ("eager", "requested")
    assert {"eager", "compile"} <= set(BACKENDS)
    with pytest.raises(ValueError, match="--backend must be one of"):
        resolve_backend("turbo", cpu)
    G, D = build_models(32, nz=4, ngf=2, ndf=2)
    prepared = prepare_backend("compile", G, D)
    assert prepared.G is G and prepared.D is D and prepared.G_run is not G  # compiled wrappers
    assert list(prepared.G.state_dict()) == list(G.state_dict())


def test_eager_on_cpu_is_channels_last_with_nchw_numerics():
    """The CPU's faster layout changes neither the modules, their keys nor their numbers."""
    torch.manual_seed(0)
    G, D = build_models(32, nz=8, ngf=4, ndf=4)
    nchw = copy.deepcopy(G).eval()
    prepared = prepare_backend("eager", G, D)
    assert prepared.G is G and prepared.D is D and prepared.G_run is G
    for module in (G, D):
        for p in module.parameters():
            if p.dim() == 4:
                assert p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    assert list(G.state_dict()) == list(nchw.state_dict())
    z = torch.randn(16, 8)
    # fp32 sums in another order: equal to rounding, far below the images' 1/255 quantum
    torch.testing.assert_close(G.eval()(z), nchw(z), rtol=0, atol=1e-6)


# --- the command line -----------------------------------------------------------------------------


def test_help_documents_every_flag(capsys):
    status, out, _ = _cli(["--help"], capsys)
    assert status == 0
    for flag in ("--data", "--image-size", "--batch-size", "--steps", "--epochs", "--lr", "--beta1",
                 "--nz", "--ngf", "--ndf", "--nc", "--seed", "--device", "--backend", "--out",
                 "--resume", "--sample-every", "--checkpoint-every", "--workers", "--dry-run",
                 "--ema", "--eval-every", "--eval-n", "--conditional"):
        assert flag in out


def test_version_and_the_backend_help(capsys):
    status, out, _ = _cli(["--version"], capsys)
    assert status == 0 and out == f"aigc_fast {__version__}\n"
    status, out, _ = _cli(["--help"], capsys)
    assert "fuse(G, D)" not in out  # fuse() takes one model
    assert "aigc_fast.fuse() on G and on D" in " ".join(out.split())


def test_device_takes_any_torch_device_string(capsys):
    for name in ("cuda:1", "cuda", "cpu", "cpu:0", "auto"):
        assert parse_args(["--device", name])[0].device == name
    assert resolve_device("cpu:0") == torch.device("cpu:0")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = "no CUDA device is available" if not count else f"this machine has {count} CUDA"
    with pytest.raises(UsageError, match=f"--device cuda:{count}: {missing}"):
        resolve_device(f"cuda:{count}")
    status, _, err = _cli(["--device", "bogus"], capsys)
    assert_one_line_error(status, err, "--device", "bogus", "cuda:N")


def test_pytorch_examples_flags_are_hidden_aliases(tmp_path, capsys):
    """dcgan/main.py's spellings set our settings; --help names them once, after the list."""
    args, explicit = parse_args(["--dataroot", str(tmp_path), "--imageSize", "64",
                                 "--batchSize", "16",
                                       "--manualSeed", "7", "--outf", "o", "--niter", "3",
                                       "--cuda"])
    assert (args.data, args.image_size, args.batch_size, args.seed, args.out, args.epochs,
            args.device) == (str(tmp_path), 64, 16, 7, "o", 3, "cuda")
    assert {"data", "image_size", "batch_size", "seed"} <= explicit
    defaults = vars(parse_args([])[0])  # the aliases leave our defaults alone
    assert (defaults["data"], defaults["device"], defaults["epochs"], defaults["out"]) == (
        "shapes", "auto", None, None)
    status, out, _ = _cli(["--help"], capsys)
    listing, epilog = out.split("pytorch/examples' dcgan/main.py flags work too")
    for flag, _, _ in EXAMPLES_ALIASES + (("--niter", None, None),):
        listed = re.findall(rf"{flag}(?![\w-])", listing)  # --cuda, not --cuda-graph
        assert not listed and len(re.findall(rf"{flag}(?![\w-])", epilog)) == 1, flag
    status, _, err = _cli(["--imageSize", "48"], capsys)
    assert_one_line_error(status, err, "--imageSize", "48", "32, 64")
    status, _, err = _cli(["--niter", "2", "--steps", "5"], capsys)
    assert_one_line_error(status, err, "--niter", "--steps")


def test_a_slow_run_reports_its_rate_not_zero(tmp_path, capsys, monkeypatch):
    """A dry run of the fused backend, interpreted on a CPU, makes well under one image a second:
    it printed "0 images/s". A clock that advances 50 s at each reading makes any run that slow."""
    clock = iter(range(0, 10**6, 50))
    monkeypatch.setattr(loop, "time", SimpleNamespace(perf_counter=lambda: float(next(clock))))
    status, out, _ = _cli(["--dry-run", "--out", str(tmp_path / "run")] + TINY, capsys)
    assert status == 0
    rate = re.search(r"\(([0-9.e+-]+) images/s of training\)", out).group(1)
    assert 0 < float(rate) < 1, rate
    assert [format_rate(r) for r in (0.01234, 12.345, 99.94, 1234.4)] == [
        "0.0123", "12.3", "99.9", "1234"]


def test_dry_run_writes_every_output(tmp_path, capsys):
    out = tmp_path / "run"
    status, stdout, _ = _cli(["--dry-run", "--out", str(out), "--nc", "1"] + TINY, capsys)
    assert status == 0
    assert "backend eager (auto: first available of eager on cpu)" in stdout \
        and "done: step 1/1" in stdout
    config = json.loads((out / "config.json").read_text())
    assert config["data"] == "shapes" and config["steps"] == 1 and config["nc"] == 1
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and set(rows[0]) == {"step", "epoch", "loss_d", "loss_g", "d_real",
                                               "d_fake",
                                               "images_per_s", "seconds"}
    assert (out / "samples" / "real.png").exists() \
        and (out / "samples" / "step_000001.png").exists()
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["step"] == 1 and ckpt["version"] == __version__ and ckpt["config"] == config
    assert set(CHECKPOINT_KEYS) <= set(ckpt) and "main.0.weight" in ckpt["G"]
    assert ckpt["G"]["main.9.weight"].shape == (8, 1, 4, 4)  # --nc 1


def _states(path):
    ckpt = torch.load(path, weights_only=True)
    return ckpt, {k: ckpt[k] for k in ("G", "D", "opt_g", "opt_d", "G_ema", "scalers") if k in ckpt}


def _assert_bitwise_equal(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            _assert_bitwise_equal(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_bitwise_equal(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@pytest.mark.parametrize("precision, variant", [("fp32", []), ("fp16", []),
                                                ("fp32", ["--conditional"])],
                         ids=["fp32", "fp16", "fp32-conditional"])
def test_resume_is_bitwise_exact(tmp_path, npz, precision, variant):
    """Also for a conditional run, whose fake labels are drawn from the saved noise generator."""
    # 32 images / batch 4 = 8 steps per epoch: the run crosses an epoch after the resume point (5)
    common = ["--data", npz, "--log-every", "1", "--sample-every", "4", "--checkpoint-every", "4",
              "--eval-every", "3", "--eval-n", "16", "--precision", precision] + TINY + variant
    assert main(common + ["--steps", "10", "--out", str(tmp_path / "straight")]) == 0
    assert main(common + ["--steps", "5", "--out", str(tmp_path / "split")]) == 0
    last = tmp_path / "split" / "checkpoints" / "last.pt"
    assert main(["--resume", str(last), "--steps", "10"]) == 0  # run flags come from the checkpoint

    straight, a = _states(tmp_path / "straight" / "checkpoints" / "last.pt")
    split, b = _states(last)
    assert straight["step"] == split["step"] == 10
    # fp16: each network's gradient scaler, whose growth tracker counts unskipped steps since the
    # last overflow (a scaler restarted at the resume would count from 0 there)
    assert ("scalers" in a) == (precision == "fp16")
    if precision == "fp16":
        assert all(a["scalers"][net]["_growth_tracker"] > 0 for net in ("G", "D"))
    _assert_bitwise_equal(a, b)
    _assert_bitwise_equal(straight["noise"], split["noise"])

    def rows(run):
        return [json.loads(line)
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]

    def losses(run):
        return [(r["step"], r["loss_d"], r["loss_g"], r["d_real"], r["d_fake"])
                for r in rows(run) if "loss_d" in r]

    def swd(run):  # the EMA generator's scores, evaluated at 0, 3, 6, 9 and the end (and 5: split)
        return {r["step"]: r["swd"] for r in rows(run) if "swd" in r}

    assert losses("straight") == losses("split") and len(losses("split")) == 10
    assert list(swd("straight")) == [0, 3, 6, 9, 10] and list(swd("split")) == [0, 3, 5, 6, 9, 10]
    assert swd("straight") == {k: v for k, v in swd("split").items() if k != 5}
    assert sorted(p.name for p in (tmp_path / "split" / "checkpoints").iterdir()) == [
        "last.pt", "step_000004.pt", "step_000008.pt"]
    assert sorted(p.name for p in (tmp_path / "split" / "samples").iterdir()) == [
        "real.png", "step_000004.png", "step_000005.png", "step_000008.png", "step_000010.png"]


def test_epochs_and_resume_auto(tmp_path, npz, capsys):
    out = str(tmp_path / "run")
    assert main(["--data", npz, "--epochs", "1", "--out", out] + TINY + NO_EVAL) == 0
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == 8
    assert main(["--resume", "auto", "--out", out, "--epochs", "2"] + TINY) == 0
    assert torch.load(tmp_path / "run" / "checkpoints" / "last.pt", weights_only=True)["step"] == 16
    capsys.readouterr()
    assert main(["--resume", "auto", "--out", out]) == 0
    assert "nothing to do" in capsys.readouterr().out


def test_resume_auto_and_output_folders(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    parse = lambda *argv: parse_args(list(argv))[0]  # noqa: E731
    assert resolve_out_and_resume(parse("--resume", "auto")) == (None, None)  # fresh run
    for name in ("001", "002"):
        (tmp_path / "runs" / name / "checkpoints").mkdir(parents=True)
        (tmp_path / "runs" / name / "checkpoints" / "last.pt").write_bytes(b"x")
        (tmp_path / "runs" / name / "checkpoints" / "step_000004.pt").write_bytes(b"x")
    newest = Path("runs/002/checkpoints/last.pt")
    os.utime(Path("runs/001/checkpoints/last.pt"), (1e9, 1e9))  # 002 is the newest
    assert resolve_out_and_resume(parse("--resume", "auto")) == (Path("runs/002"), newest)
    assert resolve_out_and_resume(parse("--resume", str(newest))) == (Path("runs/002"), newest)
    with pytest.raises(UsageError, match="already holds a run whose last.pt is not"):
        resolve_out_and_resume(parse("--resume", "runs/002/checkpoints/step_000004.pt"))
    assert _next_run_dir() == Path("runs/003") and Path("runs/003").is_dir()


# --- bad input: one line, exit 2, nothing lost ----------------------------------------------------


def test_bad_input_is_one_line_and_exit_2(tmp_path, npz, capsys):
    status, _, err = _cli(["--data", str(tmp_path / "nope"), "--out", str(tmp_path / "o1")], capsys)
    assert_one_line_error(status, err, "nope", "no such file or folder", "expected")
    (tmp_path / "empty").mkdir()
    status, _, err = _cli(["--data", str(tmp_path / "empty"), "--out",
                           str(tmp_path / "o2")], capsys)
    assert_one_line_error(status, err, "empty", "no image files")
    status, _, err = _cli(["--image-size", "48"], capsys)
    assert_one_line_error(status, err, "--image-size", "48", "32, 64")
    status, _, err = _cli(["--batch-size", "0"], capsys)
    assert_one_line_error(status, err, "--batch-size", "positive integer")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    status, _, err = _cli(["--resume", str(bad), "--out", str(tmp_path / "o3")], capsys)
    assert_one_line_error(status, err, str(bad), "cannot be read")


def test_resume_refuses_contradicting_flags_and_keeps_files(tmp_path, npz, capsys):
    out = tmp_path / "run"
    assert main(["--data", npz, "--steps", "2", "--out", str(out)] + TINY + NO_EVAL) == 0
    last = out / "checkpoints" / "last.pt"
    before = last.read_bytes()
    capsys.readouterr()
    status, _, err = _cli(["--resume", str(last), "--ngf", "16", "--steps", "4"], capsys)
    assert_one_line_error(status, err, "--ngf 16", "checkpoint's 8")
    status, _, err = _cli(["--data", npz, "--out", str(out)] + TINY, capsys)  # would overwrite
    assert_one_line_error(status, err, str(out), "already holds a run", "--resume")
    assert last.read_bytes() == before


def test_shape_mismatch_between_checkpoint_and_model(tmp_path, npz, capsys):
    out = tmp_path / "run"
    assert main(["--data", npz, "--steps", "1", "--out", str(out)] + TINY + NO_EVAL) == 0
    last = out / "checkpoints" / "last.pt"
    ckpt = torch.load(last, weights_only=True)
    ckpt["config"]["ngf"] = 16  # a config that no longer matches the stored weights
    torch.save(ckpt, tmp_path / "edited.pt")
    capsys.readouterr()
    status, _, err = _cli(["--resume", str(tmp_path / "edited.pt"), "--out",
                           str(tmp_path / "o")], capsys)
    assert_one_line_error(status, err, "edited.pt", "main.0.weight", "shape")


# --- failures during training ---------------------------------------------------------------------


def _backend_with_loss(loss_fn):
    return Backend("eager", "test", lambda G, D: Prepared(G, D, G, D, loss_fn), lambda device: None)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, npz, capsys,
                                                                  monkeypatch):
    out = tmp_path / "run"
    common = ["--data", npz, "--out", str(out), "--log-every", "1"] + TINY + NO_EVAL
    assert main(common + ["--steps", "2"]) == 0
    last = out / "checkpoints" / "last.pt"
    before = last.read_bytes()

    def exploding(logits, target):
        return F.binary_cross_entropy_with_logits(logits, target) * float("nan")

    monkeypatch.setitem(BACKENDS, "eager", _backend_with_loss(exploding))
    capsys.readouterr()
    assert main(["--resume", str(last), "--steps", "4"]) == 1
    err = capsys.readouterr().err
    assert "non-finite loss in steps 3..3" in err and f"{last}, was not overwritten" in err
    assert last.read_bytes() == before


@pytest.fixture
def default_sigint():
    """Python's own SIGINT handler for the test, whatever pytest inherited (a shell's background job
    starts with SIGINT ignored), and the inherited one back afterwards."""
    inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, inherited)


def test_ctrl_c_checkpoints_and_exits_130(tmp_path, npz, capsys, monkeypatch, default_sigint):
    calls = []

    def interrupted_at_step_3(logits, target):  # 3 loss calls per step
        calls.append(1)
        if len(calls) == 3 * 3:
            signal.raise_signal(signal.SIGINT)  # a real SIGINT, delivered to this process
        return F.binary_cross_entropy_with_logits(logits, target)

    monkeypatch.setitem(BACKENDS, "eager", _backend_with_loss(interrupted_at_step_3))
    out = tmp_path / "run"
    status, _, err = _cli(["--data", npz, "--steps", "50", "--out", str(out)] + TINY
                          + NO_EVAL, capsys)
    assert status == 130
    last = out / "checkpoints" / "last.pt"
    assert f"resume with: python -m aigc_fast.train --resume {last}" in err
    assert torch.load(last, weights_only=True)["step"] == 3  # stopped at the step boundary
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handler restored


# --- faults of long runs: SIGTERM, a full disk, an unreadable last checkpoint ---------------------


@pytest.fixture
def default_sigterm():
    """SIGTERM's default action for the test, and the inherited handler back afterwards."""
    inherited = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    yield
    signal.signal(signal.SIGTERM, inherited)


def _loss_acting_in_step(step, action):
    """A BCE loss that calls ``action()`` once, in training step ``step`` (3 loss calls a step)."""
    calls = []

    def loss(logits, target):
        calls.append(1)
        if len(calls) == 3 * step:
            action()
        return F.binary_cross_entropy_with_logits(logits, target)

    return loss


def test_sigterm_checkpoints_the_current_step_and_resumes_bitwise(tmp_path, npz, capsys,
                                                                  monkeypatch, default_sigterm):
    common = ["--data", npz, "--log-every", "2", "--checkpoint-every", "100"] + TINY + NO_EVAL
    sigterm = partial(signal.raise_signal, signal.SIGTERM)  # a real SIGTERM, to this process
    # the same backend in every run (the registered eager one runs channels_last)
    plain = _backend_with_loss(F.binary_cross_entropy_with_logits)
    monkeypatch.setitem(BACKENDS, "eager", plain)
    assert main(common + ["--steps", "6", "--out", str(tmp_path / "straight")]) == 0
    monkeypatch.setitem(BACKENDS, "eager", _backend_with_loss(_loss_acting_in_step(3, sigterm)))
    status, _, err = _cli(common + ["--steps", "6", "--out", str(tmp_path / "split")], capsys)
    last = tmp_path / "split" / "checkpoints" / "last.pt"
    assert status == 143 and "interrupted at step 3/6 (SIGTERM)" in err
    assert f"resume with: python -m aigc_fast.train --resume {last}" in err
    assert torch.load(last, weights_only=True)["step"] == 3  # the step the signal came in
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handler restored
    monkeypatch.setitem(BACKENDS, "eager", plain)
    assert main(["--resume", str(last)]) == 0
    _, straight = _states(tmp_path / "straight" / "checkpoints" / "last.pt")
    _, split = _states(last)
    _assert_bitwise_equal(straight, split)


class _FullDisk:
    """A disk that is full once :meth:`fill` is called: each write of a checkpoint
    (checkpoint.os.fdopen) or of metrics.jsonl (report's open), as chosen, then writes half its
    bytes and raises ENOSPC, as write(2) does on a full file system."""

    def __init__(self, monkeypatch, checkpoints, metrics):
        self.full = False
        if checkpoints:
            monkeypatch.setattr(checkpoint.os, "fdopen", self._filling(os.fdopen))
        if metrics:
            monkeypatch.setattr(report, "open", self._filling(open), raising=False)

    def fill(self):
        self.full = True

    def _filling(self, opener):
        def opened(*args, **kwargs):
            f = opener(*args, **kwargs)
            if self.full:
                write = f.write

                def write_half(data):
                    write(data[:len(data) // 2])
                    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

                f.write = write_half
            return f
        return opened


def _stderr_lines(err):
    """What a run printed on stderr, less the progress bar's redraws."""
    return [line for line in err.replace("\r", "\n").splitlines()
            if line.strip() and not re.match(r"\s*\d+%\|", line)]


@pytest.mark.parametrize("full_at", ["checkpoint", "metrics"])
def test_a_full_disk_ends_the_run_with_one_line_and_a_loadable_checkpoint(
        tmp_path, npz, capsys, monkeypatch, full_at):
    disk = _FullDisk(monkeypatch, checkpoints=full_at == "checkpoint", metrics=full_at == "metrics")
    monkeypatch.setitem(BACKENDS, "eager", _backend_with_loss(_loss_acting_in_step(3, disk.fill)))
    out = tmp_path / "run"
    status, _, err = _cli(["--data", npz, "--steps", "8", "--log-every", "1", "--checkpoint-every",
                           "2", "--out", str(out)] + TINY + NO_EVAL, capsys)
    last = out / "checkpoints" / "last.pt"
    failed = last if full_at == "checkpoint" else out / "metrics.jsonl"  # step 4's, step 3's
    lines = _stderr_lines(err)
    assert status == 1 and "Traceback" not in err and len(lines) == 1, lines
    assert lines[0] == (f"aigc_fast.train: stopped: cannot write {failed} (No space left on "
                        f"device, ENOSPC); the last good checkpoint is {last} (step 2); resume "
                        f"with: python -m aigc_fast.train --resume {last}")
    assert torch.load(last, weights_only=True)["step"] == 2  # intact
    assert sorted(p.name for p in last.parent.iterdir()) == ["last.pt", "step_000002.pt"]  # no temp
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == ([1, 2] if full_at == "metrics" else [1, 2, 3, 4])


def test_failed_sample_grids_warn_once_and_training_goes_on(tmp_path, npz, monkeypatch):
    def full_disk(images, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(report, "save_png", full_disk)
    out = tmp_path / "run"
    with pytest.warns(UserWarning) as warned:
        assert main(["--data", npz, "--steps", "3", "--sample-every", "1", "--out", str(out)]
                    + TINY + NO_EVAL) == 0
    assert torch.load(out / "checkpoints" / "last.pt", weights_only=True)["step"] == 3
    assert [str(w.message) for w in warned] == [
        f"cannot write {out / 'samples' / 'step_000001.png'} (No space left on device, ENOSPC); "
        "training goes on without sample grids (said once)"]


def test_resume_auto_skips_an_unreadable_last_pt_to_the_newest_intact_checkpoint(tmp_path, npz,
                                                                                  capsys):
    out = tmp_path / "run"
    assert main(["--data", npz, "--steps", "6", "--checkpoint-every", "2", "--out", str(out)]
                + TINY + NO_EVAL) == 0
    folder = out / "checkpoints"
    for name in ("last.pt", "step_000006.pt"):  # cut short, as by a copy that failed mid-way
        (folder / name).write_bytes((folder / name).read_bytes()[:1000])
    capsys.readouterr()
    status, _, err = _cli(["--resume", str(folder / "last.pt")], capsys)
    assert_one_line_error(status, err, f"checkpoint {folder / 'last.pt'}: cannot be read")

    capsys.readouterr()
    assert main(["--resume", "auto", "--out", str(out), "--steps", "8"]) == 0
    said = capsys.readouterr().out
    assert (f"note: --resume auto: checkpoint {folder / 'last.pt'}: cannot be read" in said
            and f"resuming from {folder / 'step_000004.pt'} (step 4), the newest checkpoint that "
            "loads" in said)
    assert torch.load(folder / "last.pt", weights_only=True)["step"] == 8

    for path in folder.iterdir():
        path.write_bytes(b"not a checkpoint")
    status, _, err = _cli(["--resume", "auto", "--out", str(out), "--steps", "10"], capsys)
    assert_one_line_error(status, err, "--resume auto:", "no periodic checkpoint")
    assert all(p.read_bytes() == b"not a checkpoint" for p in folder.iterdir())  # nothing replaced
