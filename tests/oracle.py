"""The float64 oracle the kernel, op and drop-in tests share: the tolerance (float32 without tf32),
the relative error (Frobenius norm), fused float32 models against float64 eager copies, the
fixtures that poison fresh buffers and switch tf32 off, and the counters that prove the fused
path ran."""
import math

import pytest
import torch
from torch import nn

from aigc_fast import chain

TOL = 1e-4  # relative error, float32 without tf32


def rel_err(out, ref, floor=0.0):
    """‖out - ref‖ / ‖ref‖, the denominator bounded below by ``floor``."""
    ref = ref.double()
    return ((out.double() - ref).norm() / max(ref.norm().item(), floor)).item()


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


def randomize_batch_norms_(model):
    """Non-trivial BN state, so that gamma, beta and the running stats all matter."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.normal_(0.0, 0.2)
                if m.track_running_stats:
                    m.running_mean.normal_(0.0, 0.1)
                    m.running_var.uniform_(0.5, 1.5)
    return model


def forward_backward(model, x, grad_out=None):
    """Output, input gradient and parameter gradients of one forward/backward (upstream gradient
    ``grad_out``, fresh random when None)."""
    x = x.detach().requires_grad_()
    out = model(x)
    if grad_out is None:
        grad_out = torch.randn_like(out)
    out.backward(grad_out.to(out.dtype))
    grads = [(name, p.grad.clone()) for name, p in model.named_parameters()]
    model.zero_grad(set_to_none=True)
    return out.detach(), x.grad, grads, grad_out


def assert_close(actual, expected, what, floor=0.0):
    """Relative error <= TOL, the denominator bounded below by ``floor`` for values that are zero in
    exact arithmetic (a conv bias gradient under a BatchNorm using batch statistics)."""
    err = rel_err(actual, expected, floor)
    assert err <= TOL, f"{what}: relative error {err:.2e} > {TOL}"


def assert_matches_reference(fused, reference, make_input, device, train_steps=3):
    """``train_steps`` training steps on fresh data, then one in eval mode, both models on
    ``device``: the output, the input and parameter gradients and the buffers of the float32
    ``fused`` match the float64 ``reference`` (parameters and buffers paired in registration order,
    so that a Sequential can be the reference of a module)."""
    fused.to(device)
    reference.to(device)
    for training in [True] * train_steps + [False]:
        fused.train(training)
        reference.train(training)
        x = make_input().to(device)
        out64, grad_x64, grads64, grad_out = forward_backward(reference, x.double())
        out, grad_x, grads, _ = forward_backward(fused, x, grad_out)
        mode = "train" if training else "eval"
        assert out.dtype == torch.float32
        assert_close(out, out64, f"{mode} output")
        assert_close(grad_x, grad_x64, f"{mode} input gradient")
        assert len(grads) == len(grads64)
        total = torch.cat([g.flatten() for _, g in grads64]).norm().item()
        for (name, grad), (_, grad64) in zip(grads, grads64):
            # zero in exact arithmetic (float64 leaves ~1e-13): float32 rounding noise, measured
            # against the whole gradient
            floor = total if grad64.norm() <= 1e-9 * total else 0.0
            assert_close(grad, grad64, f"{mode} gradient of {name}", floor=floor)
        buffers, buffers64 = list(fused.named_buffers()), list(reference.buffers())
        assert len(buffers) == len(buffers64)
        for (name, buf), buf64 in zip(buffers, buffers64):
            if name.endswith("num_batches_tracked"):
                assert torch.equal(buf, buf64), name
            else:
                assert_close(buf, buf64, f"{mode} buffer {name}")


def count_calls(monkeypatch, module, name):
    """Record each call of ``module.<name>`` (its ``training`` argument, None if it has none), to
    prove that the fused path, not the eager one, ran."""
    calls = []
    op = getattr(module, name)

    def counting(*args, **kwargs):
        calls.append(kwargs.get("training"))
        return op(*args, **kwargs)

    monkeypatch.setattr(module, name, counting)
    return calls


def record_fused_calls(monkeypatch):
    """The fused op's calls (to prove that the fused path, not the eager one, ran): a chain of one
    layer as its BN's ``training`` (None without BN), longer chains as ("chain", number of
    layers)."""
    calls = []
    conv_chain = chain.conv_chain

    def counting(x, links, *args, **kwargs):
        calls.append(("chain", len(links)) if len(links) > 1
                     else links[0].training if links[0].has_bn else None)
        return conv_chain(x, links, *args, **kwargs)

    monkeypatch.setattr(chain, "conv_chain", counting)
    return calls
