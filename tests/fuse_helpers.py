"""Shared by the tests of fused models (fuse(), the drop-ins, the chain): float32 fused models
against float64 eager copies, relative error (Frobenius norm) <= RTOL."""
import torch
from torch import nn

from aigc_fast import chain

RTOL = 1e-4  # float32 without tf32


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
    """Relative error <= RTOL, the denominator bounded below by ``floor`` for values that are zero in
    exact arithmetic (a conv bias gradient under a BatchNorm using batch statistics)."""
    actual, expected = actual.double(), expected.double()
    err = ((actual - expected).norm() / max(expected.norm().item(), floor)).item()
    assert err <= RTOL, f"{what}: relative error {err:.2e} > {RTOL}"


def assert_matches_reference(fused, reference, make_input, device, train_steps=3):
    """``train_steps`` training steps on fresh data, then one in eval mode, both models on ``device``:
    the output, the input and parameter gradients and the buffers of the float32 ``fused`` match the
    float64 ``reference`` (parameters and buffers paired in registration order, so that a
    Sequential can be the reference of a module)."""
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
