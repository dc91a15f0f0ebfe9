"""The drop-in contract of fuse()/unfuse(), held against float64 unfused copies on both paths (the
Triton kernels and the reference, each forced through AIGC_FAST_IMPL, with the fused op's calls
counted so that a fallback to the eager modules cannot pass): spectral norm, float16 models,
global module hooks, unfuse() on copies of a fused model, and a graph backpropagated twice.
"""
import copy
import io

import pytest
import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.nn.utils.parametrizations import spectral_norm

from aigc_fast.models import Discriminator, Generator
from aigc_fast.nn import fuse, unfuse
from oracle import (assert_close, assert_matches_reference, forward_backward,
                          randomize_batch_norms_, record_fused_calls)


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    """oracle.TOL is for IEEE float32 products; the kernels follow cudnn.allow_tf32 on CUDA."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.fixture(params=["triton", "ref"])
def fused_calls(request, monkeypatch):
    """Forces the fused ops' implementation and records their calls."""
    monkeypatch.setenv("AIGC_FAST_IMPL", request.param)
    return record_fused_calls(monkeypatch)


def small_discriminator():
    """A D-shaped Sequential small enough for the interpreter: conv -> LeakyReLU, conv -> BN ->
    LeakyReLU, conv."""
    return randomize_batch_norms_(nn.Sequential(
        nn.Conv2d(3, 4, 4, 2, 1, bias=False), nn.LeakyReLU(0.2),
        nn.Conv2d(4, 5, 4, 2, 1, bias=False), nn.BatchNorm2d(5), nn.LeakyReLU(0.2),
        nn.Conv2d(5, 1, 3, 1, 0, bias=False)))


def small_generator():
    """A G-shaped Sequential: conv-transpose -> BN -> ReLU twice, conv-transpose -> Tanh."""
    return randomize_batch_norms_(nn.Sequential(
        nn.ConvTranspose2d(6, 5, 3, 1, 0, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
        nn.ConvTranspose2d(5, 3, 4, 2, 1, bias=False), nn.BatchNorm2d(3), nn.ReLU(),
        nn.ConvTranspose2d(3, 2, 4, 2, 1, bias=False), nn.Tanh()))


def state_copy(model):
    return {key: value.clone() for key, value in model.state_dict().items()}


def assert_same_state(model, state, when):
    now = model.state_dict()
    assert now.keys() == state.keys(), when
    for key, value in state.items():
        assert torch.equal(now[key], value), f"{when}: {key} changed"


# --- 1. spectral norm ---------------------------------------------------------------------------

def test_spectral_norm_fuses_without_changing_state(fused_calls, device):
    """fuse() and unfuse() read no parametrized weight (that would run a power iteration), and
    restride its original to channels-last and back; the fused model then computes what the
    parametrized one computes: one power iteration per training forward, none in eval (its _u/_v
    are buffers, compared after every step), gradients reaching parametrizations.weight.original
    (a parameter, compared after every step)."""
    torch.manual_seed(1)
    model = small_discriminator()
    for i in (0, 2, 5):
        spectral_norm(model[i])
    model.to(device)
    reference = copy.deepcopy(model).double()
    before = state_copy(model)
    fuse(model)
    assert_same_state(model, before, "after fuse()")
    originals = [model[i].parametrizations.weight.original for i in (0, 2, 5)]
    # the kernels read the weights, original / sigma, as contiguous rows (with async copies)
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in originals)
    assert_matches_reference(model, reference, lambda: torch.randn(2, 3, 13, 15), device,
                             train_steps=2)
    assert fused_calls == [("chain", 3)] * 3  # two training steps, then eval
    after_steps = state_copy(model)
    unfuse(model)
    assert_same_state(model, after_steps, "after unfuse()")
    assert all(w.is_contiguous() for w in originals)


# --- 2. float16 models ----------------------------------------------------------------------------

class _FixedSlope(nn.Module):
    """An activation with its pattern frozen: ``z * slope_map`` (1 where the model under test saw
    z > 0, its negative slope elsewhere)."""

    def __init__(self, slope_map):
        super().__init__()
        self.slope_map = slope_map

    def forward(self, z):
        return z * self.slope_map


def activation_patterns(model, x):
    """Per activation module index of ``model.main``, the slope map of what ``model`` computed there
    (1 where positive): a copy of ``model.main`` cut after each activation into Sequentials (fused
    when ``model`` is: slices of a FusedSequential are FusedSequentials), called in turn, so that
    each activation's output is materialised, as the chain materialises it in its next layer's
    operand loads."""
    patterns, start = {}, 0
    with torch.no_grad():
        for k, act in enumerate(model.main):
            if isinstance(act, (nn.ReLU, nn.LeakyReLU)):
                x = copy.deepcopy(model.main[start:k + 1])(x)
                slope = act.negative_slope if isinstance(act, nn.LeakyReLU) else 0.0
                patterns[k], start = torch.where(x > 0, 1.0, slope).double(), k + 1
    return patterns


def with_patterns(model64, patterns):
    """A copy of the float64 ``model64`` whose activations follow ``patterns``."""
    model64 = copy.deepcopy(model64)
    for k, slope_map in patterns.items():
        model64.main[k] = _FixedSlope(slope_map)
    return model64


def dcgan_half_case(layout, seed):
    """(float32 model, input) of the issue's float16 case: DCGAN layout at nz 8, ngf/ndf 4, batch 2,
    BN weights U(0.5, 1.5) and biases U(-0.3, 0.3)."""
    torch.manual_seed(seed)
    model = Generator(32, nz=8, ngf=4) if layout == "G" else Discriminator(32, ndf=4)
    with torch.no_grad():
        for bn in model.modules():
            if isinstance(bn, nn.BatchNorm2d):
                bn.weight.uniform_(0.5, 1.5)
                bn.bias.uniform_(-0.3, 0.3)
    return model, (torch.randn(2, 8, 1, 1) if layout == "G" else torch.randn(2, 3, 32, 32))


def gradient_error(model, x, grad_out, model64):
    """Largest relative error over the input and parameter gradients of ``model`` (float16) against
    the float64 ``model64``'s."""
    _, grad_x, grads, _ = forward_backward(model, x, grad_out)
    _, grad_x64, grads64, _ = forward_backward(model64, x.double(), grad_out)
    pairs = [(grad_x, grad_x64)] + [(g, g64) for (_, g), (_, g64) in zip(grads, grads64)]
    return max(((g.double() - g64).norm() / g64.norm()).item() for g, g64 in pairs)


@pytest.mark.parametrize("layout, seeds", [pytest.param("G", 8, marks=pytest.mark.slow), ("D", 4)])
def test_half_model_gradients_as_accurate_as_eager_half(layout, seeds, fused_calls, device):
    """A whole-model float16 fused model (BN parameters float16 too) differentiates its own forward
    as accurately as eager float16 does: G over 8 seeds (seed 0 is the issue's failing one), D over
    4 (its float16 gradients never stood out; the interpreter's time goes to G). Each is measured
    against float64 with the activation pattern (which side of 0 each pre-activation fell) that it
    computed itself: a pre-activation within float16 rounding of 0 lands on either side in float16
    (eager too), and one such element moves a batch-2 gradient by up to several percent, so
    against the float64 pattern eager float16 with float32 BN parameters already differs from
    eager float16 by 50x on some seeds."""
    for seed in range(seeds):
        model, x = dcgan_half_case(layout, seed)
        model64 = copy.deepcopy(model).double().to(device)
        eager = copy.deepcopy(model).half().to(device)
        fused = fuse(copy.deepcopy(eager))
        x = x.half().to(device)
        grad_out = torch.randn(model64(x.double()).shape, dtype=torch.float64, device=device)
        eager_error = gradient_error(eager, x, grad_out,
                                     with_patterns(model64, activation_patterns(eager, x)))
        fused_error = gradient_error(fused, x, grad_out,
                                     with_patterns(model64, activation_patterns(fused, x)))
        assert fused_error <= 2 * eager_error, (
            f"seed {seed}: fused float16 {fused_error:.2e} > 2x eager float16 {eager_error:.2e}")
    assert ("chain", 4) in fused_calls


# --- 4. global module hooks -----------------------------------------------------------------------

GLOBAL_HOOKS = {
    "forward_pre": lambda seen: module_hooks.register_module_forward_pre_hook(
        lambda module, args: seen.append(type(module))),
    "forward": lambda seen: module_hooks.register_module_forward_hook(
        lambda module, args, out: seen.append(type(module))),
    "full_backward": lambda seen: module_hooks.register_module_full_backward_hook(
        lambda module, grad_in, grad_out: seen.append(type(module))),
}


@pytest.mark.parametrize("kind", GLOBAL_HOOKS)
def test_global_hooks_see_every_module(kind, fused_calls, device, capsys):
    """While a global module hook is registered, fused runs run eagerly, so the hook sees every
    module, with the float64 model's numbers; fuse(verbose=True) says why; once it is removed, the
    runs run fused again."""
    torch.manual_seed(4)
    model = small_generator().to(device)
    reference = copy.deepcopy(model).double()
    fuse(model)
    seen = []
    handle = GLOBAL_HOOKS[kind](seen)
    try:
        fuse(model, verbose=True)
        assert "global module hook is registered" in capsys.readouterr().out
        x = torch.randn(2, 6, 1, 1, device=device)
        with pytest.warns(UserWarning, match="ran unfused"):
            out, grad_x, grads, grad_out = forward_backward(model, x)
        assert fused_calls == []
        assert seen.count(nn.ConvTranspose2d) == 3 and seen.count(nn.BatchNorm2d) == 2
        out64, grad_x64, grads64, _ = forward_backward(reference, x.double(), grad_out)
    finally:
        handle.remove()
    assert_close(out, out64, "output")
    assert_close(grad_x, grad_x64, "input gradient")
    for (name, grad), (_, grad64) in zip(grads, grads64):
        assert_close(grad, grad64, f"gradient of {name}")
    forward_backward(model, x)
    assert fused_calls == [("chain", 3)]


# --- 5. unfuse() on copies ------------------------------------------------------------------------

def saved_and_loaded(model):
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=False)


@pytest.mark.parametrize("make_copy", [copy.deepcopy, saved_and_loaded])
def test_unfuse_on_a_copy_restores_the_weights_memory_format(make_copy, fused_calls, device):
    """unfuse() returns what fuse() was given, on a deepcopy or a torch.load-ed copy of the fused
    model as on the model itself: contiguous conv weights again, values unchanged; the copy runs
    fused before (float64 copy's numbers) and eagerly after."""
    torch.manual_seed(5)
    model = small_discriminator().to(device)
    reference = copy.deepcopy(model).double()
    strides = [m.weight.stride() for m in model if isinstance(m, nn.Conv2d)]
    fused_copy = make_copy(fuse(model))
    x = torch.randn(2, 3, 13, 15, device=device)
    assert_close(fused_copy(x), reference(x.double()), "fused copy's output")
    assert fused_calls == [("chain", 3)]
    unfuse(fused_copy)
    assert [m.weight.stride() for m in fused_copy if isinstance(m, nn.Conv2d)] == strides
    assert type(fused_copy) is nn.Sequential
    for (key, value), value64 in zip(fused_copy.state_dict().items(),
                                     reference.state_dict().values()):
        assert_close(value, value64, key)


# --- 3. a graph backpropagated twice --------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False])
def test_a_graph_backpropagates_twice(training, fused_calls, device):
    """backward(retain_graph=True), then backward again over the same graph (GAN code that reuses
    D(fake) for two losses): both passes give the float64 unfused copy's gradients, for a G and a
    D layout, in training and in eval."""
    torch.manual_seed(6)
    for build, shape in ((small_generator, (2, 6, 1, 1)), (small_discriminator, (2, 3, 13, 15))):
        model = build().to(device).train(training)
        reference = copy.deepcopy(model).double()
        fuse(model)
        x = torch.randn(shape, device=device)
        out, want = model(x), reference(x.double())
        grad = torch.randn_like(want)
        params = list(model.parameters())
        wanted = torch.autograd.grad(want, list(reference.parameters()), grad)
        for retain in (True, False):
            got = torch.autograd.grad(out, params, grad.to(out.dtype), retain_graph=retain)
            for g, w, (name, _) in zip(got, wanted, model.named_parameters()):
                assert_close(g, w, f"{name} (retain_graph={retain})")
    assert fused_calls == [("chain", 3)] * 2
