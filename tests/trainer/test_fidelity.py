"""FID, KID and precision/recall through torch-fidelity (python -m aigc_fast.eval, training rows).

No pretrained weights exist here: the extractors are randomly initialised, Kaiming normal, and
saved to files (tests/extras_helpers.py). Sets are a few images: enough to tell a set from itself
and from noise, and to compare our figures with torch-fidelity's own.
"""
import json

import numpy as np
import pytest
import torch

from aigc_fast.train import main as train_main
from aigc_fast.training.eval import main as eval_main
from aigc_fast.training.data import make_shapes
from aigc_fast.training.fidelity import FID_WEIGHTS_ENV
from aigc_fast.training.sample import save_png
from cli_helpers import assert_one_line_error, run_cli
from extras_helpers import inception_weights, require_extra, vgg16_weights

N = 4  # images a set: Inception costs ~0.3-1 s an image on a shared 2-core CPU


def _eval(argv, capsys):
    return run_cli(eval_main, argv, capsys, "aigc_fast.eval")


def _folder(path, images):
    path.mkdir()
    for i, pixels in enumerate(images):
        save_png(pixels, path / f"{i:03d}.png")
    return str(path)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("sets")
    noise = np.random.default_rng(0).integers(0, 256, (N, 32, 32, 3), dtype=np.uint8)
    return {"shapes": _folder(root / "shapes",
                              make_shapes(N, 32, seed=3).permute(0, 2, 3, 1).numpy()),
            "noise": _folder(root / "noise", noise)}


@pytest.fixture(scope="module")
def fid_weights(tmp_path_factory):
    require_extra("torch_fidelity")
    return inception_weights(tmp_path_factory.mktemp("weights") / "inception.pt")


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    """torch-fidelity caches under $TORCH_HOME; each test gets its own, and no weights from $ENV."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv(FID_WEIGHTS_ENV, raising=False)


def frechet_distance_float64(a, b):
    """||mu_a - mu_b||^2 + tr(S_a + S_b - 2 (S_a^1/2 S_b S_a^1/2)^1/2), in float64 through
    symmetric eigendecompositions (independent of torch-fidelity's eigvals of S_a S_b)."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    s_a, s_b = torch.cov(a.T), torch.cov(b.T)
    w, v = torch.linalg.eigh(s_a)
    root_a = v @ torch.diag(w.clamp(min=0).sqrt()) @ v.T
    cross = torch.linalg.eigvalsh(root_a @ s_b @ root_a).clamp(min=0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + s_a.trace() + s_b.trace() - 2 * cross)


@pytest.mark.extras
def test_torch_fidelity_frechet_distance_equals_float64():
    """The formula our FID comes from, on random features, against the computation above."""
    metric_fid = require_extra("torch_fidelity.metric_fid")
    g = torch.Generator().manual_seed(0)
    a = torch.randn(300, 16, generator=g)
    b = torch.randn(300, 16, generator=g) @ torch.randn(16, 16, generator=g) * 0.5 + 0.3
    stats = [metric_fid.fid_features_to_statistics(x) for x in (a, b)]
    fid = metric_fid.fid_statistics_to_metric(*stats, verbose=False)["frechet_inception_distance"]
    assert fid == pytest.approx(frechet_distance_float64(a, b), rel=1e-6)  # float32 features


@pytest.mark.extras
def test_fake_real_folders_equal_torch_fidelity_and_tell_noise_from_self(sets, fid_weights,
                                                                        capsys):
    fidelity = require_extra("torch_fidelity")
    status, out, err = _eval(["--fake", sets["shapes"], "--real", sets["noise"], "--metric",
                              "fid,kid", "--fid-weights", fid_weights, "--json"], capsys)
    assert status == 0, err
    scores = json.loads(out)  # alone on stdout
    assert set(scores) == {"fid", "kid_mean", "kid_std"}
    theirs = fidelity.calculate_metrics(input1=sets["shapes"], input2=sets["noise"], fid=True,
                                        feature_extractor_weights_path=fid_weights, cuda=False,
                                        verbose=False)["frechet_inception_distance"]
    assert scores["fid"] == pytest.approx(theirs, rel=1e-6)
    status, out, err = _eval(["--fake", sets["shapes"], "--real", sets["shapes"], "--metric",
                              "fid", "--fid-weights", fid_weights, "--json"], capsys)
    assert status == 0, err
    assert abs(json.loads(out)["fid"]) < 1e-4 * scores["fid"] and scores["fid"] > 1


@pytest.mark.extras
def test_precision_recall_of_a_set_against_itself(sets, tmp_path, capsys):
    require_extra("torchvision")
    weights = vgg16_weights(tmp_path / "vgg16.pt")
    status, out, err = _eval(["--fake", sets["shapes"], "--real", sets["shapes"], "--metric",
                              "prc", "--prc-weights", weights, "--json"], capsys)
    assert status == 0, err
    assert json.loads(out) == {"precision": 1.0, "recall": 1.0}  # every image is its own neighbour


@pytest.mark.extras
def test_training_rows_match_eval_and_reuse_the_cached_real_set(tmp_path, fid_weights, capsys,
                                                                shapes_npz):
    """--eval-every with --fid-weights writes fid/kid rows; the eval CLI on the checkpoint gives
    the same figures, reading the real set's features from the cache the run made."""
    out = tmp_path / "run"
    status, _, err = run_cli(train_main, ["--data", shapes_npz(N, 0), "--steps", "2",
                                          "--eval-every", "2", "--eval-n", str(N), "--fid-weights",
                                          fid_weights, "--batch-size", "2", "--ngf", "8", "--ndf",
                                          "8", "--nz", "16", "--out", str(out)], capsys,
                             "aigc_fast.train")
    assert status == 0, err
    rows = [r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())
            if "fid" in r]
    assert [r["step"] for r in rows] == [0, 2] and all("kid_mean" in r for r in rows)
    cached = sorted(p.name for p in (tmp_path / "torch_home" / "fidelity_cache").iterdir())
    assert cached and all(name.startswith("aigc_fast-real-") for name in cached)
    status, stdout, err = _eval(["--checkpoint", str(out / "checkpoints" / "last.pt"), "--metric",
                                 "fid,kid", "--fid-weights", fid_weights, "--n", str(N), "--json"],
                                capsys)
    assert status == 0, err
    scores = json.loads(stdout)
    assert scores["fid"] == pytest.approx(rows[-1]["fid"], rel=1e-9)
    assert sorted(p.name for p in (tmp_path / "torch_home" / "fidelity_cache").iterdir()) == cached


# --- errors: need no extra ------------------------------------------------------------------------


def test_fid_without_weights_names_the_file_to_get(tmp_path, capsys):
    status, _, err = _eval(["--fake", str(tmp_path), "--real", str(tmp_path), "--metric", "fid"],
                           capsys)
    assert status == 2  # no images: the folder check comes first
    (tmp_path / "a.png").write_bytes(b"")
    status, _, err = _eval(["--fake", str(tmp_path), "--real", str(tmp_path), "--metric", "fid"],
                           capsys)
    assert_one_line_error(status, err, "weights-inception-2015-12-05-6726825d.pth",
                          "--fid-weights PATH", FID_WEIGHTS_ENV)


def test_weights_that_need_pickled_code_are_refused_before_torch_fidelity(tmp_path, capsys,
                                                                          monkeypatch):
    """torch-fidelity would torch.load(weights_only=False) it, running the pickled code."""
    (tmp_path / "a.png").write_bytes(b"")
    unsafe = tmp_path / "unsafe.pt"
    torch.save({"w": torch.zeros(1), "f": np.random.default_rng}, unsafe)  # a pickled callable
    monkeypatch.setenv(FID_WEIGHTS_ENV, str(unsafe))
    status, _, err = _eval(["--fake", str(tmp_path), "--real", str(tmp_path), "--metric", "kid"],
                           capsys)
    assert_one_line_error(status, err, f"--fid-weights {unsafe}", "weights_only=True")
    torch.save([torch.zeros(1)], unsafe)
    status, _, err = _eval(["--fake", str(tmp_path), "--real", str(tmp_path), "--metric", "prc",
                            "--prc-weights", str(unsafe)], capsys)
    assert_one_line_error(status, err, f"--prc-weights {unsafe}", "not a state_dict")


def test_missing_torch_fidelity_is_one_line(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "torch_fidelity", None)
    (tmp_path / "a.png").write_bytes(b"")
    weights = tmp_path / "w.pt"
    torch.save({"w": torch.zeros(1)}, weights)
    status, _, err = _eval(["--fake", str(tmp_path), "--real", str(tmp_path), "--metric", "fid",
                            "--fid-weights", str(weights)], capsys)
    assert_one_line_error(status, err, "needs torch_fidelity", "aigc_fast[metrics]")
