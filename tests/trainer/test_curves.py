"""curves.png: drawn at the end of a run and on demand; without matplotlib, one line saying how."""
import importlib.util
import json
from functools import partial

import numpy as np
import pytest
from PIL import Image

from aigc_fast.training import curves
from aigc_fast.training.data import make_shapes
from aigc_fast.train import main as train_main
from cli_helpers import run_cli

_cli = partial(run_cli, curves.main,
               prog="aigc_fast.curves")  # _cli(argv, capsys) -> (status, out, err)

TINY = ["--ngf", "4", "--ndf", "4", "--nz", "8", "--batch-size", "4", "--workers", "0",
        "--log-every", "1", "--eval-every", "2", "--eval-n", "16"]


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "d.npz"
    np.savez(path, images=make_shapes(16, 32, seed=2).permute(0, 2, 3, 1).numpy())
    return str(path)


@pytest.fixture
def no_matplotlib(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "matplotlib" else real(name, *a))




def test_read_metrics_splits_training_and_evaluation_rows(tmp_path):
    rows = [{"step": 2, "loss_d": 1.0, "loss_g": 2.0, "d_real": 0.6, "d_fake": 0.4},
            {"step": 0, "swd": {"32": 3.0, "16": 1.0, "mean": 2.0}},
            {"step": 1, "loss_d": 1.5, "loss_g": 1.0, "d_real": 0.5, "d_fake": 0.5}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + "\n")
    train, evals = curves.read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in train] == [1, 2] and evals == [rows[1]]


def test_without_matplotlib_the_run_says_how_and_does_the_rest(tmp_path, data, capsys,
                                                               no_matplotlib):
    out = tmp_path / "run"
    assert train_main(["--data", data, "--steps", "2", "--out", str(out)] + TINY) == 0
    hint = [line for line in capsys.readouterr().out.splitlines() if "curves.png" in line]
    assert len(hint) == 1 and "pip install 'aigc_fast[plot]'" in hint[0]
    assert f"python -m aigc_fast.curves {out}" in hint[0]
    assert not (out / "curves.png").exists()
    assert (out / "checkpoints" / "last.pt").exists() \
        and (out / "samples" / "step_000002.png").exists()
    status, _, err = _cli([str(out)], capsys)
    assert status == 2 and err.count("\n") == 1 and "pip install 'aigc_fast[plot]'" in err


def test_curves_cli_errors(tmp_path, capsys):
    status, _, err = _cli([str(tmp_path)], capsys)
    assert status == 2 and err.count("\n") == 1 and "has no metrics.jsonl" in err


def test_the_run_draws_curves_png(tmp_path, data, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    assert train_main(["--data", data, "--steps", "4", "--out", str(out)] + TINY) == 0
    assert f"curves {out / 'curves.png'}" in capsys.readouterr().out
    picture = np.asarray(Image.open(out / "curves.png").convert("RGB"))
    assert picture.shape == (850, 700, 3) and picture.std() > 10  # drawn, not blank
    status, stdout, _ = _cli([str(out), "--out", str(tmp_path / "again.png")], capsys)
    assert status == 0 and str(tmp_path / "again.png") in stdout
    assert Image.open(tmp_path / "again.png").size == (700, 850)
