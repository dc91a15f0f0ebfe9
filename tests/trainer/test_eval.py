"""``python -m aigc_fast.eval`` on a checkpoint of a short run, the trainer's --eval-every rows, and
the command's errors."""
import json
from functools import partial

import numpy as np
import pytest
import torch

from aigc_fast.training.data import load_data, make_shapes
from aigc_fast.training.eval import Evaluator, main, real_subset
from aigc_fast.training.sample import load_generator
from aigc_fast.train import main as train_main
from cli_helpers import assert_one_line_error, run_cli

_cli = partial(run_cli, main, prog="aigc_fast.eval")  # _cli(argv, capsys) -> (status, out, err)

TINY = ["--ngf", "8", "--ndf", "8", "--nz", "16", "--batch-size", "8", "--workers", "0"]


def _npz(path, images):
    np.savez(path, images=images.permute(0, 2, 3, 1).numpy())
    return str(path)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A 6-step run on 48 images, evaluated at steps 0, 3 and 6 with --eval-n 64 (capped at 48)."""
    root = tmp_path_factory.mktemp("eval")
    data = _npz(root / "shapes.npz", make_shapes(48, 32, seed=7))
    out = root / "run"
    assert train_main(["--data", data, "--steps", "6", "--eval-every", "3", "--eval-n", "64",
                       "--lr", "2e-3", "--out", str(out)] + TINY) == 0
    return out






def _eval_rows(run):
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "swd" in r]


def test_training_appends_swd_rows(run):
    rows = _eval_rows(run)
    assert [r["step"] for r in rows] == [0, 3, 6]
    for r in rows:
        assert set(r["swd"]) == {"32", "16", "mean"} and r["swd_n"] == 48  # --eval-n capped
        assert r["generator"] == "G_ema" and r["eval_seconds"] >= 0
        assert r["swd"]["mean"] == pytest.approx((r["swd"]["32"] + r["swd"]["16"]) / 2)
        assert all(0 < v < 1e4 for v in r["swd"].values())
    assert rows[0]["swd"] != rows[-1]["swd"]  # the generator changed


def test_json_is_exactly_the_runs_last_score(run, capsys):
    status, out, err = _cli(["--checkpoint", str(run / "checkpoints" / "last.pt"), "--n", "64",
                             "--json", "--device", "cpu"], capsys)
    assert status == 0 and out.count("\n") == 1
    assert json.loads(out) == _eval_rows(run)[-1]["swd"]  # same n, seed, real subset, G_ema
    assert "G_ema" in err and "n = 48" in err and "capped" in err


def test_text_output_and_no_ema(run, capsys):
    ckpt = run / "checkpoints" / "last.pt"
    status, out, err = _cli(["--checkpoint", str(ckpt), "--n", "16", "--no-ema"], capsys)
    assert status == 0 and "trained generator G" in err
    lines = out.splitlines()
    assert "n = 16" in lines[0] and str(ckpt) in lines[0]
    values = {line.split()[0]: float(line.split()[-1]) for line in lines[1:]}
    assert set(values) == {"32", "16", "mean"}
    # the raw G, scored directly: the same numbers (to the printed precision)
    images = load_data(json.loads((run / "config.json").read_text())["data"], 32, 3).images
    G = load_generator(ckpt, torch.device("cpu"), ema=False)
    expected = Evaluator(images, 16)(G)
    assert values == {k: pytest.approx(v, abs=0.006) for k, v in expected.items()}
    state = torch.load(ckpt, weights_only=True)
    assert not torch.equal(state["G"]["main.0.weight"], state["G_ema"]["main.0.weight"])


def test_other_data_and_seed(run, tmp_path, capsys):
    ckpt = str(run / "checkpoints" / "last.pt")
    other = _npz(tmp_path / "other.npz",
                 make_shapes(20, 64, seed=3))  # resized to 32 as in training
    scores = []
    for argv in (["--data", other], ["--data", other], ["--data", other, "--seed", "1"], []):
        status, out, _ = _cli(["--checkpoint", ckpt, "--n", "20", "--json"] + argv, capsys)
        assert status == 0
        scores.append(json.loads(out))
    assert scores[0] == scores[1] and scores[0] != scores[2] and scores[0] != scores[3]


def test_real_subset_is_a_seeded_sample_without_repeats():
    images = torch.arange(50, dtype=torch.uint8).view(50, 1, 1, 1)
    a, b, c = real_subset(images, 20, 0), real_subset(images, 20, 0), real_subset(images, 20, 1)
    assert torch.equal(a, b) and not torch.equal(a, c) and len(a.unique()) == 20
    assert not torch.equal(a, images[:20])  # not just the first files of a folder
    assert len(real_subset(images, 80, 0)) == 50


def test_errors_are_one_line_exit_2(run, tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    assert_one_line_error(*_cli(["--checkpoint", str(missing)], capsys)[::2], str(missing),
                           "no such file")
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"PK\x03\x04 truncated")
    assert_one_line_error(*_cli(["--checkpoint", str(corrupt)], capsys)[::2], "cannot be read")
    ckpt = str(run / "checkpoints" / "last.pt")
    rgba = tmp_path / "rgba.npz"  # images with 4 channels: not images the model can be scored on
    np.savez(rgba, images=np.zeros((4, 32, 32, 4), np.uint8))
    assert_one_line_error(*_cli(["--checkpoint", ckpt, "--data", str(rgba)], capsys)[::2],
                           str(rgba), "4 channels", "expected 1 or 3")
    flat = tmp_path / "flat.npz"  # one row of pixels per image: no image size at all
    np.savez(flat, images=np.zeros((4, 32), np.uint8))
    assert_one_line_error(*_cli(["--checkpoint", ckpt, "--data", str(flat)], capsys)[::2],
                           str(flat), "shape (4, 32)", "expected")
    assert_one_line_error(*_cli(["--checkpoint", ckpt, "--seed", "-1"], capsys)[::2], "--seed -1")


def test_the_runs_own_data_gone(run, tmp_path, capsys):
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    state["config"]["data"] = str(tmp_path / "moved.npz")
    torch.save(state, tmp_path / "moved.pt")
    status, _, err = _cli(["--checkpoint", str(tmp_path / "moved.pt")], capsys)
    assert_one_line_error(status, err, "moved.npz", "no such file", "pass --data")


def test_a_run_without_ema(tmp_path, capsys):
    data = _npz(tmp_path / "d.npz", make_shapes(16, 32, seed=1))
    out = tmp_path / "run"
    assert train_main(["--data", data, "--steps", "2", "--ema", "0", "--eval-every", "0",
                       "--out", str(out)] + TINY) == 0
    state = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    assert "G_ema" not in state and state["config"]["ema"] == 0
    assert not _eval_rows(out)  # --eval-every 0: no evaluation
    capsys.readouterr()
    status, out_text, err = _cli(["--checkpoint", str(out / "checkpoints" / "last.pt"), "--n", "8",
                                  "--json"], capsys)
    assert status == 0 and set(json.loads(out_text)) == {"32", "16", "mean"}
    assert "has no G_ema" in err
