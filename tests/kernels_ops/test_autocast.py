"""The fused ops under torch.autocast: they do what autocast does for the PyTorch ops they replace.

float16 runs our Triton kernels (interpreted on a CPU) against float64 PyTorch fed the same
float16-rounded operands: output and gradients within 2e-3 relative (float16 keeps 11 bits: its
rounding alone is ~3e-4 norm-wise), running statistics to float32's level (1e-5) even where
|mean| >> std. bfloat16 convolutions cannot run interpreted (numpy has no bfloat16 dot): on a CPU
the tests check that the bfloat16 path is taken through the reference and returns bfloat16.
"""
import copy
import math

import pytest
import torch
import torch.nn.functional as F

import aigc_fast
from aigc_fast import functional, reference
from aigc_fast.models import build_models
from oracle import rel_err

HALF_TOL = 2e-3
STATS_TOL = 1e-5
BF16_TOL = 2e-2


def layer_case(n, c_in, h, w, c_out, k, seed, device):
    """Fresh float32 operands of a ConvTranspose2d + BatchNorm2d layer (master weights)."""
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    case = dict(x=rand(n, c_in, h, w), weight=rand(c_in, c_out, k, k) / math.sqrt(c_in * k),
                bn_weight=1 + 0.5 * rand(c_out), bn_bias=0.5 * rand(c_out),
                running_mean=rand(c_out), running_var=0.5 + torch.rand(c_out, generator=gen))
    return {key: v.to(device) for key, v in case.items()}


GRADS = ("x", "weight", "bn_weight", "bn_bias")


def run_layer(case, geometry, grad_seed, dtype=None, autocast=None, **kwargs):
    """The fused op on copies of ``case`` (cast to ``dtype``; under ``torch.autocast(autocast)`` if
    given), then a backward with a seeded gradient rounded to float16: out, grads, running stats."""
    leaves = {k: (case[k].to(dtype) if dtype else case[k]).clone().requires_grad_() for k in GRADS}
    stats = {k: (case[k].to(dtype) if dtype else case[k]).clone()
             for k in ("running_mean", "running_var")}
    device = case["x"].device
    with torch.autocast(device.type, autocast, enabled=autocast is not None):
        out = functional.conv_transpose_bn_relu(*(leaves[k] for k in GRADS), *stats.values(),
                                                **geometry, **kwargs)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(grad_seed))
    out.backward(grad.half().to(device, out.dtype))
    return dict(out=out.detach(), **stats, **{f"grad_{k}": v.grad for k, v in leaves.items()})


def float64_twin(case):
    """``case`` as float16 autocast sees it: x and weight rounded to float16, the rest float32."""
    return {k: (v.half() if k in ("x", "weight") else v).double() for k, v in case.items()}


# (N, C_in, H, W, C_out, kernel), geometry
LAYERS = {
    "dcgan-4x4-s2": ((2, 3, 5, 4, 5, 4), dict(stride=2, padding=1)),
    "k3-s2-outpad": ((3, 4, 3, 5, 7, 3), dict(stride=2, padding=1, output_padding=1)),
    "16ch-4x4-s2": ((4, 16, 4, 4, 8, 4), dict(stride=2, padding=1)),
}


@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("name", list(LAYERS))
def test_float16_autocast_matches_float64(name, impl, device):
    shape, geometry = LAYERS[name]
    case = layer_case(*shape, seed=len(name), device=device)
    got = run_layer(case, geometry, grad_seed=1, autocast=torch.float16, impl=impl)
    expected = run_layer(float64_twin(case), geometry, grad_seed=1, impl="ref")
    assert got["out"].dtype == torch.float16
    assert all(got[f"grad_{k}"].dtype == torch.float32 for k in GRADS)  # float32 master weights
    errors = {k: rel_err(got[k], expected[k]) for k in expected}
    assert all(errors[k] <= STATS_TOL for k in ("running_mean", "running_var")), errors
    assert all(e <= HALF_TOL for e in errors.values()), errors


def test_float16_statistics_exact_when_mean_dwarfs_std(device):
    """|mean| / std ~ 100: the running statistics our kernels keep for a float16 layer equal float64
    statistics of its float16 conv output y (float32 accumulation, one rounding: what they
    normalise) to float32's level, where a float32 sum / sum-of-squares would lose the variance.
    (Not the reference: PyTorch's float16 CPU convolution rounds along the way, so its y
    differs.)"""
    shape, geometry = (2, 3, 6, 5, 5, 3), dict(stride=1, padding=2)
    case = layer_case(*shape, seed=4, device=device)
    case["x"] = 30 + case["x"]
    case["weight"] = case["weight"].abs() + 0.1
    case["running_mean"].zero_()
    case["running_var"].fill_(1.0)
    got = run_layer(case, geometry, grad_seed=2, autocast=torch.float16, impl="triton")
    twin = float64_twin(case)
    y = F.conv_transpose2d(twin["x"], twin["weight"], None, **geometry).half().double()
    var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=1)
    assert (mean.abs() > 50 * var.sqrt()).all()
    assert rel_err(got["running_mean"], 0.1 * mean) <= STATS_TOL
    assert rel_err(got["running_var"], 0.9 + 0.1 * var) <= STATS_TOL


def test_bfloat16_autocast_takes_the_bfloat16_path(device, monkeypatch):
    """The fused op under bfloat16 autocast runs its convolution on bfloat16 operands and returns
    bfloat16 (on a CPU through the reference, as "auto" falls back: the interpreter has no
    bfloat16 dot), within bfloat16's tolerance of float64."""
    shape, geometry = LAYERS["dcgan-4x4-s2"]
    case = layer_case(*shape, seed=7, device=device)
    calls = []
    ref_op = reference.conv_bn_act
    monkeypatch.setattr(reference, "conv_bn_act",
                        lambda x, weight, *a, **k: calls.append((x.dtype, weight.dtype))
                        or ref_op(x, weight, *a, **k))
    got = run_layer(case, geometry, grad_seed=3, autocast=torch.bfloat16)
    assert calls == ([(torch.bfloat16, torch.bfloat16)] if device.type == "cpu" else [])
    assert got["out"].dtype == torch.bfloat16
    twin = {k: (v.bfloat16() if k in ("x", "weight") else v).double() for k, v in case.items()}
    expected = run_layer(twin, geometry, grad_seed=3, impl="ref")
    assert all(rel_err(got[k], expected[k]) <= BF16_TOL for k in expected)


@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("op", ["bce_with_logits", "binary_cross_entropy"])
def test_losses_are_float32_under_autocast(op, impl, device):
    """As autocast does for F.binary_cross_entropy_with_logits (and, on a CPU, for
    F.binary_cross_entropy): half-precision inputs, a float32 loss, equal to float64's to 1e-5."""
    gen = torch.Generator().manual_seed(11)
    if op == "bce_with_logits":
        fused, theirs, input = functional.bce_with_logits, F.binary_cross_entropy_with_logits, \
            3 * torch.randn(64, generator=gen)
    else:
        fused, theirs, input = functional.binary_cross_entropy, F.binary_cross_entropy, \
            0.02 + 0.96 * torch.rand(64, generator=gen)
    input = input.half().to(device).requires_grad_()
    target = torch.rand(64, generator=gen).half().to(device)
    with torch.autocast(device.type, torch.float16):
        loss = fused(input, target, impl=impl)
    assert loss.dtype == torch.float32
    loss.backward()
    input64 = input.detach().double().requires_grad_()
    expected = theirs(input64, target.double())
    expected.backward()
    assert rel_err(loss, expected) <= 1e-5
    assert input.grad.dtype == torch.float16
    assert rel_err(input.grad, input64.grad) <= HALF_TOL


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fused_model_under_autocast_behaves_as_the_eager_one(dtype, device):
    """A fuse()d Generator and Discriminator under torch.autocast give the eager models' dtypes,
    and their values to half precision's tolerance."""
    torch.manual_seed(0)
    G, D = (m.to(device) for m in build_models(32, nz=8, ngf=4, ndf=4, nc=3))
    fused_G, fused_D = aigc_fast.fuse(copy.deepcopy(G)), aigc_fast.fuse(copy.deepcopy(D))
    z = torch.randn(2, 8, device=device)
    with torch.autocast(device.type, dtype):
        eager_img, fused_img = G(z), fused_G(z)
        eager_logits, fused_logits = D(eager_img), fused_D(fused_img)
    assert fused_img.dtype == eager_img.dtype and fused_logits.dtype == eager_logits.dtype
    tol = BF16_TOL if dtype == torch.bfloat16 else 5 * HALF_TOL  # two layers' roundings compound
    assert rel_err(fused_img, eager_img) <= tol
    assert rel_err(fused_logits, eager_logits) <= tol
