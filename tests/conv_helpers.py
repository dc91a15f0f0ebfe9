"""Shared by the fused-convolution tests: the tolerance, the relative error, and the fixtures that
poison fresh buffers and switch tf32 off."""
import math

import pytest
import torch

TOL = 1e-4  # relative error, float32 without tf32


def rel_err(out, ref):
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.fixture
def poisoned(monkeypatch):
    """Make torch.empty/empty_like return NaN-filled floating tensors for the duration of a test."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def nan_filled(tensor):
        return tensor.fill_(math.nan) if tensor.is_floating_point() else tensor

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan_filled(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan_filled(real_empty_like(*a, **k)))


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    """The 1e-4 tolerance is for IEEE float32 products (on CUDA, tf32 would need 3e-3)."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


def count_launches(monkeypatch, fn):
    """Triton kernel launches made by fn() (kernels are JITFunction, or InterpretedFunction)."""
    from aigc_fast.kernels import bn_act

    kernel_class = type(bn_act._apply_kernel)
    launches = []
    real_run = kernel_class.run

    def counting_run(self, *args, **kwargs):
        launches.append(self.__name__)
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(kernel_class, "run", counting_run)
    fn()
    monkeypatch.setattr(kernel_class, "run", real_run)
    return launches
