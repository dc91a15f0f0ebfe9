"""Test set-up: Triton kernels run on the CPU through the interpreter unless a GPU is present.

TRITON_INTERPRET must be set before triton is imported, so it is set here, at collection time.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def device():
    """The device the kernel tests run on: CUDA when present, else the CPU (interpreted)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
