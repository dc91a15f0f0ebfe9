"""Fused ConvTranspose2d + BatchNorm2d + ReLU (aigc_fast.functional.conv_transpose_bn_relu) and the
convolution kernels under it, against float64 PyTorch: values, gradients, running statistics.

Every Triton call runs with torch.empty/empty_like poisoned (NaN-filled), so any element of any
output or intermediate buffer that a kernel fails to write shows up as NaN.
"""
import math
import re

import pytest
import torch
import torch.nn.functional as F

from aigc_fast import functional
from oracle import TOL, count_launches, no_tf32, poisoned, rel_err  # noqa: F401 (fixtures)

# (N, C_in, H, W, C_out, kernel, stride, padding, output_padding)
CONFIGS = {
    "dcgan-4x4-s2": (2, 3, 5, 4, 5, 4, 2, 1, 0),
    "k3-s2-outpad": (3, 4, 3, 5, 7, 3, 2, 1, 1),
    "1x1-input-k4-s1": (2, 5, 1, 1, 3, 4, 1, 0, 0),
    "k5-s3-outpad2": (2, 6, 4, 3, 5, 5, 3, 2, 2),
    "k2-s3-empty-phases": (2, 7, 3, 2, 4, 2, 3, 0, 1),
    "k3-s1-pad1": (1, 9, 2, 3, 3, 3, 1, 1, 0),
    "16x16-out-40ch": (3, 3, 8, 8, 40, 4, 2, 1, 0),  # 2 row tiles per phase, 2 channel tiles
    "k1-split-k-dW": (4, 3, 16, 16, 5, 1, 1, 0, 0),  # few dW tiles, 1024 pixels: split-K sum
}


def make_case(cfg, device, bias=False, seed=0):
    """Fresh random float32 inputs for one configuration (a dict of tensors)."""
    n, c_in, h, w, c_out, k, _, _, _ = cfg
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    case = dict(x=rand(n, c_in, h, w), weight=rand(c_in, c_out, k, k) / math.sqrt(c_in * k),
                bn_weight=1 + 0.5 * rand(c_out), bn_bias=0.5 * rand(c_out),
                running_mean=rand(c_out), running_var=0.5 + torch.rand(c_out, generator=gen),
                bias=rand(c_out) if bias else None)
    return {key: (v.to(device) if v is not None else None) for key, v in case.items()}


def geometry(cfg):
    return dict(stride=cfg[6], padding=cfg[7], output_padding=cfg[8])


GRAD_NAMES = ("x", "weight", "bn_weight", "bn_bias", "bias")


def run_op(case, grad_out_seed=1, dtype=None, needs_grad=GRAD_NAMES, **kwargs):
    """Call the op on copies of ``case`` (cast to ``dtype``), backward with a seeded random grad.
    Returns dict: out, running_mean, running_var, and the grads (of those in ``needs_grad``)."""
    leaves = {key: (v.to(dtype) if dtype else v).clone().requires_grad_(key in needs_grad)
              for key, v in case.items() if v is not None and key in GRAD_NAMES}
    stats = {key: (case[key].to(dtype) if dtype else case[key]).clone()
             for key in ("running_mean", "running_var")}
    out = functional.conv_transpose_bn_relu(
        leaves["x"], leaves["weight"], leaves["bn_weight"], leaves["bn_bias"],
        stats["running_mean"],
        stats["running_var"], bias=leaves.get("bias"), **kwargs)
    result = dict(out=out.detach(), **stats)
    if out.requires_grad:
        gen = torch.Generator().manual_seed(grad_out_seed)
        out.backward(torch.randn(out.shape, generator=gen).to(out.device, out.dtype))
        result.update({f"grad_{key}": v.grad for key, v in leaves.items() if v.requires_grad})
    return result


def float64_reference(case, **kwargs):
    kwargs = dict(kwargs, impl="ref")
    return run_op(case, dtype=torch.float64, **kwargs)


def assert_close(result, expected, tol=TOL, skip=()):
    assert result.keys() == expected.keys()
    errors = {key: rel_err(result[key], expected[key]) for key in expected if key not in skip}
    assert all(e <= tol for e in errors.values()), errors


def expect_zero_bias_grad(result, expected):
    """In training BN removes any per-channel constant, so d(bias) is 0 (the Triton path returns
    exact zeros, PyTorch rounding noise): compare it absolutely, on the scale of d(bn_bias)."""
    assert expected["grad_bias"].abs().max() < 1e-9
    assert result["grad_bias"].abs().max() <= TOL * expected["grad_bn_bias"].norm()


@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_matches_float64(name, impl, device, request):
    if impl == "triton":
        request.getfixturevalue("poisoned")
    cfg = CONFIGS[name]
    case = make_case(cfg, device, bias=name == "k3-s2-outpad")
    result = run_op(case, impl=impl, **geometry(cfg))
    expected = float64_reference(case, **geometry(cfg))
    assert_close(result, expected, skip=("grad_bias",))
    if case["bias"] is not None:
        expect_zero_bias_grad(result, expected)


def test_finalize_combines_many_tiles(device, poisoned):
    """Chan's combine over 150 row tiles (16-row tiles forced), the last one partial, in several
    chunks and channel blocks, with |mean| >> std and a conv bias: output and running stats
    against float64."""
    from aigc_fast.kernels import tiles

    gen = torch.Generator().manual_seed(7)
    n, c_in, c, hw = 3, 2, 70, (20, 40)  # 2400 pixels: 150 tiles of 16
    x = 1e3 + torch.randn(n, c_in, *hw, generator=gen, dtype=torch.float64)
    weight = torch.randn(c, c_in, 1, 1, generator=gen, dtype=torch.float64)
    gamma, beta, bias = (torch.randn(c, generator=gen, dtype=torch.float64) for _ in range(3))
    running = [torch.randn(c, generator=gen, dtype=torch.float64),
               torch.rand(c, generator=gen, dtype=torch.float64) + 0.5]
    expected_running = [r.clone() for r in running]
    expected = functional.conv_bn_act(x, weight, gamma, beta, *expected_running, transposed=False,
                                      bias=bias, activation=None, impl="ref")
    running = [r.float().to(device) for r in running]
    with tiles.forced(conv=tiles.Tile(16, 32, 16, 4, 1)):
        got = functional.conv_bn_act(*(t.float().to(device) for t in (x, weight, gamma, beta)),
                                     *running, transposed=False, bias=bias.float().to(device),
                                     activation=None, impl="triton")
    y = torch.nn.functional.conv2d(x, weight)
    assert (y.mean(dim=(0, 2, 3)).abs() > 100 * y.std(dim=(0, 2, 3))).any()
    for have, want in [(got, expected), *zip(running, expected_running)]:
        assert rel_err(have, want) <= TOL


@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("bias", [False, True])
def test_eval_matches_float64(bias, impl, device, request):
    if impl == "triton":
        request.getfixturevalue("poisoned")
    cfg = CONFIGS["k3-s2-outpad"]
    case = make_case(cfg, device, bias=bias)
    result = run_op(case, impl=impl, training=False, **geometry(cfg))
    assert_close(result, float64_reference(case, training=False, **geometry(cfg)))
    assert torch.equal(result["running_mean"], case["running_mean"])  # eval leaves them alone
    assert torch.equal(result["running_var"], case["running_var"])


def test_eval_with_eps_zero_matches_float64(device, poisoned):
    """BatchNorm2d(eps=0.0) is legal in PyTorch's eval mode (the running variances here are >= 0.5);
    in training F.batch_norm refuses it, and so do we."""
    cfg = CONFIGS["dcgan-4x4-s2"]
    case = make_case(cfg, device, bias=True)
    kwargs = dict(training=False, eps=0.0, **geometry(cfg))
    assert_close(run_op(case, impl="triton", **kwargs), float64_reference(case, **kwargs))


@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("training, momentum", [(True, 0.1), (True, "tensor"), (False, 0.1)])
def test_empty_batch_is_what_pytorch_returns(training, momentum, impl, device):
    """N = 0: an empty output of the right shape, zero gradients, running stats untouched (as
    F.batch_norm leaves them), whatever the momentum."""
    cfg = CONFIGS["k3-s2-outpad"]
    case = make_case(cfg, device, bias=True)
    case["x"] = case["x"][:0]
    if momentum == "tensor":
        momentum = torch.tensor(0.5, device=device)
    result = run_op(case, impl=impl, training=training, momentum=momentum, **geometry(cfg))
    expected = float64_reference(case, training=training, **geometry(cfg))
    assert result["out"].shape == expected["out"].shape == (0, 7, 6, 10)
    for key, value in expected.items():
        assert torch.equal(result[key].double(), value), key
    assert torch.equal(result["running_mean"], case["running_mean"])
    assert torch.equal(result["running_var"], case["running_var"])


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_statistics_exact_when_mean_dwarfs_std(impl, device):
    """x = 1e3 + small integers, weights positive multiples of 1/4: every y is exact in float32 and
    |mean| / std ~ 150, where sum / sum-of-squares in float32 loses the variance (~1e-3 error)."""
    gen = torch.Generator().manual_seed(3)
    cfg = (2, 3, 6, 5, 5, 3, 1, 2, 0)  # stride 1, padding k-1: every output sees all 27 taps
    case = make_case(cfg, device)
    case["x"] = (1e3 + torch.randint(-64, 65, (2, 3, 6, 5), generator=gen).float()).to(device)
    case["weight"] = (torch.randint(1, 5, (3, 5, 3, 3), generator=gen).float() / 4).to(device)
    result = run_op(case, impl=impl, **geometry(cfg))
    expected = float64_reference(case, **geometry(cfg))
    # dW = sum x * dy cancels (x ~ 1e3, sum dy = 0): float32 PyTorch misses by 2.6e-4 too, so it
    # is no measure of the statistics; everything else must hold 1e-4.
    assert_close(result, expected, skip=("grad_weight",))
    y = F.conv_transpose2d(case["x"].double(), case["weight"].double(), None, 1, 2)
    assert (y.mean(dim=(0, 2, 3)).abs() > 100 * y.std(dim=(0, 2, 3))).all()


@pytest.mark.parametrize("training", [True, False])
def test_two_runs_bitwise_equal(training, device):
    cfg = CONFIGS["dcgan-4x4-s2"]
    case = make_case(cfg, device, bias=True)
    first, second = (run_op(case, impl="triton", training=training, **geometry(cfg))
                     for _ in range(2))
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_channels_last_and_strided_views(device, poisoned):
    """x as channels_last, weight as a non-contiguous view, grad_out non-contiguous: no copies are
    needed (the kernels address by strides), the results are the same."""
    cfg = CONFIGS["dcgan-4x4-s2"]
    case = make_case(cfg, device)
    expected = float64_reference(case, **geometry(cfg))
    x = case["x"].to(memory_format=torch.channels_last).requires_grad_()
    weight_t = case["weight"].transpose(0, 1).contiguous().requires_grad_()
    out = functional.conv_transpose_bn_relu(x, weight_t.transpose(0, 1), case["bn_weight"],
                                            case["bn_bias"], None, None, impl="triton",
                                            **geometry(cfg))
    gen = torch.Generator().manual_seed(1)
    grad = torch.randn(out.shape, generator=gen).to(device).to(memory_format=torch.channels_last)
    assert not grad.is_contiguous()
    out.backward(grad)
    assert rel_err(out, expected["out"]) <= TOL
    assert rel_err(x.grad, expected["grad_x"]) <= TOL
    assert rel_err(weight_t.grad.transpose(0, 1), expected["grad_weight"]) <= TOL


def test_only_weight_needs_grad(device, poisoned):
    """A Generator's first layer: the noise input has no grad; the other grads are still right."""
    cfg = CONFIGS["1x1-input-k4-s1"]
    case = make_case(cfg, device)
    result = run_op(case, impl="triton", needs_grad=("weight",), **geometry(cfg))
    expected = float64_reference(case, needs_grad=("weight",), **geometry(cfg))
    assert_close(result, expected)


def test_momentum_none_as_device_factor(device, poisoned):
    """nn.BatchNorm2d(momentum=None) = cumulative average: pass 1/num_batches_tracked as a
    tensor."""
    cfg = CONFIGS["dcgan-4x4-s2"]
    case = make_case(cfg, device)
    conv = torch.nn.ConvTranspose2d(3, 5, 4, 2, 1, bias=False).double().to(device)
    bn = torch.nn.BatchNorm2d(5, momentum=None).double().to(device)
    running = {key: case[key].clone() for key in ("running_mean", "running_var")}
    with torch.no_grad():
        conv.weight.copy_(case["weight"])
        bn.running_mean.copy_(case["running_mean"])
        bn.running_var.copy_(case["running_var"])
        for step in range(1, 4):
            x = case["x"] + step
            bn(conv(x.double()))
            factor = torch.tensor(1.0, device=device) / torch.tensor(step, device=device)
            functional.conv_transpose_bn_relu(x, case["weight"], case["bn_weight"], case["bn_bias"],
                                              running["running_mean"], running["running_var"],
                                              momentum=factor, impl="triton", **geometry(cfg))
    assert rel_err(running["running_mean"], bn.running_mean) <= TOL
    assert rel_err(running["running_var"], bn.running_var) <= TOL


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_nan_input_propagates(impl, device):
    cfg = CONFIGS["dcgan-4x4-s2"]
    case = make_case(cfg, device)
    case["x"][1, 2, 3, 1] = math.nan
    result = run_op(case, impl=impl, **geometry(cfg))
    expected = float64_reference(case, **geometry(cfg))
    for key in expected:
        assert torch.equal(result[key].isnan(), expected[key].isnan()), key
    assert result["out"].isnan().any()


BAD_INPUTS = [
    (dict(x=torch.randn(3, 5, 4)), ValueError, "x must be a 4-D tensor"),
    (dict(x=torch.randn(2, 3, 0, 4)), ValueError, "with C_in, H, W >= 1 (N may be 0)"),
    (dict(x=torch.randn(2, 3, 5, 4).double()), TypeError, "weight must have x's dtype"),
    (dict(x=torch.randn(2, 4, 5, 4)), ValueError, "weight must have shape (C_in=4"),
    (dict(x=torch.randn(2, 3, 5, 4).int()), TypeError, "x must be float32"),
    (dict(bn_weight=torch.ones(4)), ValueError, "bn_weight must have shape (5,)"),
    (dict(bn_bias=None), TypeError, "bn_bias must be a tensor"),
    (dict(running_var=None), ValueError, "both be tensors or both be None"),
    (dict(running_mean=torch.zeros(5, dtype=torch.float64)), TypeError, "running_mean must be"),
    (dict(bias=torch.zeros(6)), ValueError, "bias must have shape (5,)"),
    (dict(stride=0), ValueError, "stride must be an int >= 1"),
    (dict(padding=(1, -1)), ValueError, "padding must be an int >= 0"),
    (dict(output_padding=2), ValueError, "output_padding must be smaller than stride"),
    (dict(padding=9), ValueError, "padding (9, 9) is too large"),
    (dict(momentum=None), TypeError, "1 / num_batches_tracked"),
    (dict(momentum=torch.ones(2)), ValueError, "0-dim floating tensor"),
    (dict(training=False, running_mean=None, running_var=None), ValueError,
     "required when training=False"),
    (dict(x=torch.randn(1, 3, 1, 1), stride=1, padding=1, weight=torch.randn(3, 5, 3, 3)),
     ValueError,
     "Expected more than 1 value per channel when training"),
    (dict(eps=-1e-5), ValueError, "eps must be a float > 0 in training, >= 0 in eval"),
    (dict(eps=0.0), ValueError, "eps must be a float > 0 in training"),
    (dict(impl="cuda"), ValueError, "impl must be one of"),
]


@pytest.mark.parametrize("changes,error,message", BAD_INPUTS)
def test_bad_input_raises(changes, error, message, device):
    case = make_case(CONFIGS["dcgan-4x4-s2"], device)
    kwargs = dict(case, stride=2, padding=1, impl="triton")
    kwargs.update({key: (v.to(device) if isinstance(v, torch.Tensor) else v)
                   for key, v in changes.items()})
    with pytest.raises(error, match=re.escape(message)):
        functional.conv_transpose_bn_relu(**kwargs)


def test_device_mismatch_raises(device):
    """A weight on another device (the meta device: no second GPU needed) is refused up front."""
    case = make_case(CONFIGS["dcgan-4x4-s2"], device)
    with pytest.raises(ValueError, match=f"weight must be on {device}"):
        functional.conv_transpose_bn_relu(case["x"], case["weight"].to("meta"), case["bn_weight"],
                                          case["bn_bias"], None, None, stride=2, padding=1)


def test_launch_counts(device, monkeypatch):
    """Training: 2 launches forward (the GEMM, which finalizes the statistics, and the apply);
    backward 3 (reductions, their finish, dx and dW in one launch): dy is computed in the GEMMs'
    operand loads. Eval: 1."""
    cfg = CONFIGS["dcgan-4x4-s2"]
    case = make_case(cfg, device)
    x, weight = case["x"].requires_grad_(), case["weight"].requires_grad_()
    args = (case["bn_weight"].requires_grad_(), case["bn_bias"].requires_grad_(),
            case["running_mean"], case["running_var"])
    call = lambda training: functional.conv_transpose_bn_relu(  # noqa: E731
        x, weight, *args, impl="triton", training=training, **geometry(cfg))
    call(True).sum().backward()  # warm-up: the first call compiles
    with torch.no_grad():
        assert len(count_launches(monkeypatch, lambda: call(False))) == 1
    holder = {}
    forward = count_launches(monkeypatch, lambda: holder.setdefault("out", call(True)))
    backward = count_launches(monkeypatch, lambda: holder["out"].sum().backward())
    assert forward == ["_chain_conv_kernel", "_apply_kernel"], forward
    assert backward == ["_grad_partials_kernel", "_grad_finish_kernel", "_backward_pair_kernel"], \
        backward


@pytest.mark.parametrize("shape,kernel,stride,padding,splits", [
    ((2, 3, 9, 7, 5), 3, 2, 1, 3),
    ((3, 7, 5, 6, 4), 4, 2, 1, None),
    ((1, 5, 1, 1, 3), 1, 1, 0, None),
])
def test_conv2d_and_weight_grad_kernels(shape, kernel, stride, padding, splits, device, poisoned):
    """The strided convolution and its split-K weight gradient on channels-last tensors."""
    from aigc_fast.kernels.conv_gemm import conv2d_weight_grad

    n, c_in, h, w, c_out = shape
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(n, c_in, h, w, generator=gen).to(device)
    weight = torch.randn(c_out, c_in, kernel, kernel, generator=gen).to(device)
    x64, w64 = x.double().requires_grad_(), weight.double().requires_grad_()
    expected = F.conv2d(x64, w64, None, stride, padding)
    grad = torch.randn(expected.shape, generator=gen).to(device)
    expected.backward(grad.double())
    geo = ((stride, stride), (padding, padding))
    assert rel_err(functional.conv_bn_act(x, weight, transposed=False, activation=None,
                                          stride=stride, padding=padding), expected) <= TOL
    nhwc = lambda t: t.to(memory_format=torch.channels_last)  # noqa: E731
    dw = conv2d_weight_grad(nhwc(x), nhwc(grad), (kernel, kernel), *geo, splits=splits)
    assert rel_err(dw, w64.grad) <= TOL


@pytest.mark.parametrize("c_in,c_out,hw", [(1024, 2048, 8), (3, 64, 32)])
def test_weight_grad_takes_a_ticket_counter_per_tile_and_tap(c_in, c_out, hw):
    """A weight gradient plans (shapes only, meta tensors) as many ticket counters as the kernel
    indexes (tile * KH * KW + tap), per tap's columns or packed: 256 px D's last strided layer
    (1024 -> 2048 channels at ndf 64) fits the counters kept, and the packed image layer too."""
    from aigc_fast.kernels.conv_gemm import weight_grad_launch

    x = torch.empty(32, c_in, hw, hw, device="meta").to(memory_format=torch.channels_last)
    grad = torch.empty(32, c_out, hw // 2, hw // 2, device="meta")
    launch = weight_grad_launch(x, grad.to(memory_format=torch.channels_last), (4, 4), (2, 2),
                                (1, 1))
    tickets = launch.args[10]
    assert tickets.numel() >= (launch.tiles - 1) * 16 + launch.grid_taps


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 2e-2)])
def test_half_precision(dtype, tol, device, poisoned):
    """Half-precision tensors, float32 statistics and accumulation, against float64."""
    if dtype == torch.bfloat16 and device.type != "cuda":
        pytest.skip("bfloat16 Triton kernels need CUDA: the interpreter's numpy has no bfloat16")
    cfg = CONFIGS["k3-s2-outpad"]
    case = make_case(cfg, device)
    for training in (True, False):
        result = run_op(case, dtype=dtype, impl="triton", training=training, **geometry(cfg))
        assert result["out"].dtype == dtype
        assert_close(result, float64_reference(case, training=training, **geometry(cfg)), tol=tol)
