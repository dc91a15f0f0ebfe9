"""Test set-up: Triton kernels run on the CPU through the interpreter unless a GPU is present.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at collection time.
"""
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the shared helpers (oracle.py, cli_helpers.py, ...) import by name from the tests in the folders
# below, one per layer: kernels and operators, drop-ins, the trainer
sys.path.insert(0, str(Path(__file__).resolve().parent))


@pytest.fixture
def device():
    """The device the kernel tests run on: CUDA when present, else the CPU (interpreted)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def shapes_npz(tmp_path_factory):
    """Writes ``n`` embedded-shape images (32 px, ``seed``) as a uint8 N x H x W x C .npz, with
    their kinds as 'labels' (for --conditional), and returns its path: a small --data file, faster
    to load than the embedded 16k set."""
    import numpy as np

    from aigc_fast.training.data import LazyShapes

    def write(n, seed):
        path = tmp_path_factory.mktemp("data") / f"shapes{n}_seed{seed}.npz"
        shapes = LazyShapes(n, 32, seed=seed)
        np.savez(path, images=shapes[:].permute(0, 2, 3, 1).numpy(), labels=shapes.labels.numpy())
        return str(path)

    return write
