"""The wheel, installed as users install it (not editable), holds the whole package and trains.

The source tree is copied to a temporary folder and built there (``pip wheel --no-deps
--no-build-isolation``), so the test leaves no build/ or .egg-info in the checkout and a stale
build/ there cannot leak into the wheel. The wheel is installed with ``pip install --target`` into a
fresh folder, and ``python -m aigc_fast.train --dry-run`` runs from outside the repository with only
that folder on PYTHONPATH: a module that pyproject's ``packages`` leaves out fails here.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
COPY_IGNORE = shutil.ignore_patterns(".git", ".venv", "venv", "build", "dist", "*.egg-info",
                                     "__pycache__", "runs", ".pytest_cache", ".benchmarks")
TIMEOUT_S = 300  # building and installing take seconds, the dry run ~10 s on 2 cores
WHERE = ("import aigc_fast, aigc_fast.kernels, aigc_fast.training, json; print(json.dumps("
         "[aigc_fast.__file__, aigc_fast.kernels.__file__, aigc_fast.training.__file__]))")


def _run(cmd, cwd, env):
    done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, f"{cmd}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done.stdout


def test_installed_wheel_trains_from_outside_the_checkout(tmp_path, shapes_npz):
    src, wheels, site, work = (tmp_path / name for name in ("src", "wheels", "site", "work"))
    shutil.copytree(ROOT, src, symlinks=True, ignore=COPY_IGNORE)
    work.mkdir()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    pip = [sys.executable, "-m", "pip"]
    _run(pip + ["wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels), "."],
         src, env)
    (wheel,) = wheels.glob("aigc_fast-*.whl")
    _run(pip + ["install", "--no-deps", "-q", "--target", str(site), str(wheel)], work, env)

    env = {**env, "PYTHONPATH": str(site)}
    files = [Path(f) for f in json.loads(_run([sys.executable, "-c", WHERE], work, env))]
    assert all(site in f.parents for f in files), files  # not the checkout, not an editable install
    assert len(list((site / "aigc_fast" / "kernels").glob("*.py"))) > 1  # kernels/ as a package

    out = work / "run"
    _run([sys.executable, "-m", "aigc_fast.train", "--dry-run", "--out", str(out),
          "--data", shapes_npz(8, seed=0), "--batch-size", "4", "--nz", "8", "--ngf", "4",
          "--ndf", "4", "--workers", "0", "--device", "cpu", "--backend", "eager"], work, env)
    config = json.loads((out / "config.json").read_text())
    assert config["steps"] == 1 and config["backend"] == "eager"
    assert (out / "metrics.jsonl").read_text().strip()
    assert (out / "samples" / "step_000001.png").is_file()
    assert (out / "checkpoints" / "last.pt").is_file()
