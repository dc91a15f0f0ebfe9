"""Double backward (``create_graph=True``: R1 and path-length penalties) through the fused ops. The
Triton Functions' backward is then PyTorch's, recomputed, so it is differentiable again and exact.

BCE runs in float64 on the Triton path, so gradgradcheck checks it directly. The convolution kernels
take float32: their penalties are compared with float64 eager PyTorch, norm-wise within oracle.TOL.
"""
import copy

import pytest
import torch
from torch import nn

from aigc_fast import functional
from aigc_fast.nn import ConvTransposeBNReLU, fuse
from oracle import TOL, no_tf32, rel_err  # noqa: F401 (fixture)

@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # log(0) in the numpy interpreter
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_bce_gradgradcheck_on_the_triton_path(reduction, device):
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(3, 4, generator=gen, dtype=torch.float64) * 2).to(device).requires_grad_()
    t = torch.rand(3, 4, generator=gen, dtype=torch.float64).to(device).requires_grad_()
    w = (torch.rand(4, generator=gen, dtype=torch.float64) + 0.5).to(device)
    pw = (torch.rand(3, 1, generator=gen, dtype=torch.float64) + 0.5).to(device)

    def logits_loss(x, t):
        return functional.bce_with_logits(x, t, weight=w, pos_weight=pw, reduction=reduction,
                                          impl="triton")

    def probs_loss(x, t):  # probabilities kept inside (0, 1) for the finite differences
        return functional.binary_cross_entropy(0.1 + 0.8 * torch.sigmoid(x), t, weight=w,
                                               reduction=reduction, impl="triton")

    assert torch.autograd.gradgradcheck(logits_loss, (x, t))
    assert torch.autograd.gradgradcheck(probs_loss, (x, t))


def r1_penalty_grads(D, x, loss_fn):
    """The gradients of D's parameters of ||d loss(D(x)) / dx||^2, an R1 penalty through the
    loss."""
    x = x.detach().requires_grad_()
    gx, = torch.autograd.grad(loss_fn(D(x).view(-1), torch.ones(len(x), dtype=x.dtype,
                                                                  device=x.device)),
                              x, create_graph=True)
    D.zero_grad(set_to_none=True)
    gx.pow(2).sum().backward()
    return {name: p.grad for name, p in D.named_parameters()}


def test_r1_penalty_through_the_fused_loss_matches_float64(device):
    """The issue's case: with impl="triton" D's last bias got no gradient."""
    torch.manual_seed(0)
    D = nn.Sequential(nn.Linear(5, 3), nn.Tanh(), nn.Linear(3, 1)).to(device)
    D64 = copy.deepcopy(D).double()
    x = torch.randn(4, 5, device=device)
    grads = r1_penalty_grads(D, x, lambda logits,
                             t: functional.bce_with_logits(logits, t, impl="triton"))
    expected = r1_penalty_grads(D64, x.double(),
                                torch.nn.functional.binary_cross_entropy_with_logits)
    for name, grad in expected.items():
        assert grads[name] is not None, name
        assert rel_err(grads[name], grad) <= TOL, name


def penalty_grads(model, z):
    """The gradients of the parameters of ||d sum(model(z)^2) / dz||^2, a path-length-like penalty
    through the model."""
    z = z.detach().requires_grad_()
    gz, = torch.autograd.grad(model(z).square().sum(), z, create_graph=True)
    model.zero_grad(set_to_none=True)
    gz.pow(2).sum().backward()
    return {name: p.grad for name, p in model.named_parameters()}


def assert_grads_match(grads, expected):
    total = torch.cat([g.flatten() for g in expected.values()]).norm().item()
    for name, grad in expected.items():
        assert grads[name] is not None, f"{name} got no gradient"
        # zero in exact arithmetic (a conv bias under training BN): measured against the whole
        floor = total if grad.norm() <= 1e-9 * total else 0.0
        assert rel_err(grads[name], grad, floor) <= TOL, name


@pytest.mark.parametrize("training", [True, False])
def test_penalty_through_a_fused_generator_matches_float64(training, device, monkeypatch):
    """The issue's model: its Linear weight gradient was 25.14 instead of 72.99, and the ConvT/BN
    parameters got none."""
    monkeypatch.setenv("AIGC_FAST_IMPL", "triton")
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(6, 4 * 2 * 2), nn.Unflatten(1, (4, 2, 2)),
                          nn.ConvTranspose2d(4, 3, 3, 2, 1, 1, bias=True), nn.BatchNorm2d(3),
                          nn.ReLU(), nn.Conv2d(3, 1, 3)).to(device)
    with torch.no_grad():
        model[3].running_mean.normal_(0, 0.5)
        model[3].running_var.uniform_(0.5, 1.5)
    reference = copy.deepcopy(model).double().train(training)
    fuse(model).train(training)
    z = torch.randn(3, 6, device=device)
    assert_grads_match(penalty_grads(model, z), penalty_grads(reference, z.double()))


def test_double_backward_counts_a_weight_used_twice_once(device, monkeypatch):
    """One fused module applied twice: each application's second derivative is its own; none may
    also flow into the other's through the shared weight."""
    monkeypatch.setenv("AIGC_FAST_IMPL", "triton")
    torch.manual_seed(2)
    layer = ConvTransposeBNReLU(3, 3, 3, padding=1).to(device)
    eager = nn.Sequential(copy.deepcopy(layer.conv), copy.deepcopy(layer.bn), nn.ReLU()).double()

    class Twice(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, z):
            return self.inner(self.inner(z.view(-1, 3, 2, 2)))

    z = torch.randn(2, 12, device=device)
    assert_grads_match(penalty_grads(Twice(layer), z),
                       {k.replace(".0.", ".conv.").replace(".1.", ".bn."): v
                        for k, v in penalty_grads(Twice(eager), z.double()).items()})
