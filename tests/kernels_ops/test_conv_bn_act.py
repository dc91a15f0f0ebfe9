"""aigc_fast.functional.conv_bn_act in both directions (Conv2d and ConvTranspose2d), with and
without BatchNorm, with ReLU, LeakyReLU or no activation, against float64 PyTorch: the output, the
input, weight, bias and BN-affine gradients and the running statistics, on odd configurations and
input layouts. Fresh buffers are NaN-poisoned, so an element a kernel fails to write fails the test.
"""
import math
import re

import pytest
import torch

from aigc_fast import functional
from oracle import TOL, count_launches, no_tf32, poisoned, rel_err  # noqa: F401 (fixtures)

# (N, C_in, H, W, C_out, kernel, stride, padding, output_padding), the input layout
CONV2D = {
    "dcgan-k4-s2": ((2, 3, 8, 6, 5, 4, 2, 1, 0), "nchw"),
    "k3-s1-pad1-40-in": ((2, 40, 3, 4, 7, 3, 1, 1, 0), "channels_last"),  # 3 K blocks per tap
    "1x1-input-k1": ((3, 5, 1, 1, 7, 1, 1, 0, 0), "strided"),
    "k5-s3-pad2": ((2, 7, 7, 5, 3, 5, 3, 2, 0), "nchw"),
    "k2-s2-nonsquare-40-out": ((2, 5, 5, 9, 40, 2, 2, 0, 0), "strided"),  # 2 channel tiles
    "k4-s1-valid-1-out": ((3, 7, 4, 4, 1, 4, 1, 0, 0), "channels_last"),  # D's last layer: 1x1x1
}
TRANSPOSED = {
    "dcgan-k4-s2": ((2, 3, 5, 4, 5, 4, 2, 1, 0), "channels_last"),
    "k3-s2-outpad": ((3, 4, 3, 5, 7, 3, 2, 1, 1), "strided"),
    "1x1-input-k4-s1": ((2, 5, 1, 1, 3, 4, 1, 0, 0), "nchw"),
    "k5-s3-outpad2": ((2, 6, 4, 3, 5, 5, 3, 2, 2), "nchw"),
    "k2-s3-empty-phases-40-in": ((2, 40, 3, 2, 4, 2, 3, 0, 1), "channels_last"),
}
# (BatchNorm, activation, negative_slope, conv bias)
LAYERS = {
    "bn-relu": (True, "relu", 0.01, False),
    "bn-leaky0.2-bias": (True, "leaky_relu", 0.2, True),
    "leaky0.01": (False, "leaky_relu", 0.01, False),
    "bias-relu": (False, "relu", 0.01, True),
    "plain-bias": (False, None, 0.01, True),
}
CASES = [(transposed, name, layer) for transposed, configs in ((False, CONV2D), (True, TRANSPOSED))
         for name in configs for layer in LAYERS]
GRADS = ("x", "weight", "bias", "bn_weight", "bn_bias")


def layout(x, kind):
    """x as NCHW, channels_last, or a non-contiguous view whose channels are not contiguous."""
    if kind == "channels_last":
        return x.contiguous(memory_format=torch.channels_last)
    if kind == "strided":
        wide = torch.cat([x, x], dim=3).transpose(1, 2).contiguous().transpose(1, 2)
        return wide[..., : x.shape[3]]
    return x.contiguous()


def make_case(cfg, transposed, layer, device, seed=0):
    """Fresh random float32 inputs (a dict of tensors, None for what the layer lacks)."""
    n, c_in, h, w, c_out, k = cfg[:6]
    bn, _, _, bias = layer
    gen = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    weight = rand(*((c_in, c_out) if transposed else (c_out, c_in)), k, k) / math.sqrt(c_in * k)
    case = dict(x=rand(n, c_in, h, w), weight=weight, bias=rand(c_out) if bias else None,
                bn_weight=None, bn_bias=None, running_mean=None, running_var=None)
    if bn:
        case.update(bn_weight=1 + 0.5 * rand(c_out), bn_bias=0.5 * rand(c_out),
                    running_mean=rand(c_out), running_var=0.5 + torch.rand(c_out, generator=gen))
    return {key: (v.to(device) if v is not None else None) for key, v in case.items()}


def run_op(case, transposed, cfg, layer, *, dtype=None, x_layout="nchw", **kwargs):
    """Call the op on copies of ``case`` (cast to ``dtype``) and backward with a seeded random
    gradient; returns dict: out, running stats, and the gradients of the tensors given."""
    cast = lambda t: (t.to(dtype) if dtype else t).clone()  # noqa: E731
    leaves = {key: cast(case[key]).requires_grad_() for key in GRADS if case[key] is not None}
    stats = {key: cast(case[key]) for key in ("running_mean", "running_var")
             if case[key] is not None}
    x = layout(leaves["x"], x_layout)
    _, act, slope, _ = layer
    out = functional.conv_bn_act(
        x, leaves["weight"], leaves.get("bn_weight"), leaves.get("bn_bias"),
        stats.get("running_mean"), stats.get("running_var"), transposed=transposed,
        bias=leaves.get("bias"), stride=cfg[6], padding=cfg[7], output_padding=cfg[8],
        activation=act, negative_slope=slope, **kwargs)
    gen = torch.Generator().manual_seed(1)
    out.backward(torch.randn(out.shape, generator=gen).to(out.device, out.dtype))
    return dict(out=out.detach(), **stats, **{f"grad_{k}": v.grad for k, v in leaves.items()})


def float64_reference(case, transposed, cfg, layer, **kwargs):
    return run_op(case, transposed, cfg, layer, dtype=torch.float64, impl="ref", **kwargs)


def assert_close(result, expected, tol=TOL):
    """Every tensor within ``tol`` relative; the conv bias's gradient under training BN is 0 in
    exact arithmetic, so it is measured on the scale of BN's bias gradient instead."""
    assert result.keys() == expected.keys()
    errors = {}
    for key, want in expected.items():
        if key == "grad_bias" and "grad_bn_bias" in expected and want.abs().max() < 1e-9:
            errors[key] = (result[key].double().norm() / expected["grad_bn_bias"].norm()).item()
        else:
            errors[key] = rel_err(result[key], want)
    assert all(e <= tol for e in errors.values()), errors
    return errors


@pytest.mark.parametrize("transposed,name,layer", CASES)
def test_training_matches_float64(transposed, name, layer, device, poisoned):
    cfg, x_layout = (TRANSPOSED if transposed else CONV2D)[name]
    case = make_case(cfg, transposed, LAYERS[layer], device)
    result = run_op(case, transposed, cfg, LAYERS[layer], x_layout=x_layout, impl="triton")
    assert result["out"].is_contiguous(memory_format=torch.channels_last)
    assert_close(result, float64_reference(case, transposed, cfg, LAYERS[layer]))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("layer", ["bn-leaky0.2-bias", "leaky0.01"])
def test_eval_matches_float64(transposed, layer, device, poisoned):
    cfg, _ = (TRANSPOSED if transposed else CONV2D)["dcgan-k4-s2"]
    case = make_case(cfg, transposed, LAYERS[layer], device)
    result = run_op(case, transposed, cfg, LAYERS[layer], impl="triton", training=False)
    assert_close(result, float64_reference(case, transposed, cfg, LAYERS[layer], training=False))
    if case["running_mean"] is not None:  # eval leaves them alone
        assert torch.equal(result["running_mean"], case["running_mean"])
        assert torch.equal(result["running_var"], case["running_var"])


@pytest.mark.parametrize("layer", ["bn-leaky0.2-bias", "leaky0.01", "plain-bias"])
def test_nan_input_propagates(layer, device):
    cfg, _ = CONV2D["dcgan-k4-s2"]
    case = make_case(cfg, False, LAYERS[layer], device)
    case["x"][1, 2, 3, 1] = math.nan
    result = run_op(case, False, cfg, LAYERS[layer], impl="triton")
    expected = float64_reference(case, False, cfg, LAYERS[layer])
    for key in expected:
        assert torch.equal(result[key].isnan(), expected[key].isnan()), key
    assert result["out"].isnan().any()


@pytest.mark.parametrize("layer", ["bn-leaky0.2-bias", "leaky0.01"])
def test_two_runs_bitwise_equal(layer, device):
    cfg, _ = CONV2D["k2-s2-nonsquare-40-out"]
    case = make_case(cfg, False, LAYERS[layer], device)
    first, second = (run_op(case, False, cfg, LAYERS[layer], impl="triton") for _ in range(2))
    assert all(torch.equal(first[key], second[key]) for key in first)


def test_statistics_exact_when_mean_dwarfs_std(device):
    """x = 1e3 + small integers, weights positive multiples of 1/4: every conv output is exact in
    float32 and |mean| / std >> 100, where sum / sum-of-squares in float32 loses the variance."""
    gen = torch.Generator().manual_seed(3)
    cfg, layer = (2, 3, 6, 5, 5, 3, 1, 1, 0), LAYERS["bn-leaky0.2-bias"]
    case = make_case(cfg, False, layer, device)
    case["x"] = (1e3 + torch.randint(-64, 65, (2, 3, 6, 5), generator=gen).float()).to(device)
    case["weight"] = (torch.randint(1, 5, (5, 3, 3, 3), generator=gen).float() / 4).to(device)
    result = run_op(case, False, cfg, layer, impl="triton")
    expected = float64_reference(case, False, cfg, layer)
    # dW = sum x * dy cancels (x ~ 1e3, sum dy = 0), beyond float32 itself; the rest holds 1e-4
    del result["grad_weight"], expected["grad_weight"]
    assert_close(result, expected)
    y = torch.nn.functional.conv2d(case["x"].double(), case["weight"].double(), None, 1,
                                   1)[..., 1:-1, 1:-1]
    assert (y.mean(dim=(0, 2, 3)).abs() > 100 * y.std(dim=(0, 2, 3))).all()


def test_half_precision(device, poisoned):
    """float16 tensors, float32 statistics and accumulation, against float64."""
    for transposed, configs in ((False, CONV2D), (True, TRANSPOSED)):
        cfg, _ = configs["dcgan-k4-s2"]
        for layer in ("bn-leaky0.2-bias", "leaky0.01"):
            case = make_case(cfg, transposed, LAYERS[layer], device)
            result = run_op(case, transposed, cfg, LAYERS[layer], dtype=torch.float16,
                            impl="triton")
            assert result["out"].dtype == torch.float16
            assert_close(result, float64_reference(case, transposed, cfg, LAYERS[layer]), tol=5e-3)


def test_launch_counts(device, monkeypatch):
    """Without BN: 1 launch forward; backward dx and dW in one launch (split-K closed inside it),
    the activation's backward inside their operand loads; a bias adds two reductions."""
    cfg, _ = CONV2D["dcgan-k4-s2"]
    for layer, forward, backward in (("leaky0.01", 1, 1), ("plain-bias", 1, 3)):
        case = make_case(cfg, False, LAYERS[layer], device)
        x, w = case["x"].requires_grad_(), case["weight"].requires_grad_()
        if case["bias"] is not None:
            case["bias"].requires_grad_()
        call = lambda: functional.conv_bn_act(  # noqa: E731
            x, w, transposed=False, bias=case["bias"], stride=2, padding=1,
            activation=LAYERS[layer][1])
        call().sum().backward()  # warm-up: the first call compiles
        holder = {}
        assert len(count_launches(monkeypatch, lambda: holder.setdefault("out", call()))) == forward
        assert len(count_launches(monkeypatch, lambda: holder["out"].sum().backward())) == backward
    x = case["x"].detach().requires_grad_()
    out = functional.conv_bn_act(x, w, transposed=False, stride=2, padding=1, activation=None)
    assert len(count_launches(monkeypatch, lambda: out.sum().backward())) == 1


BAD_INPUTS = [
    (dict(weight=torch.randn(3, 5, 4, 4)), ValueError, "weight must have shape (C_out, C_in=3"),
    (dict(activation="gelu"), ValueError, "activation must be one of"),
    (dict(negative_slope=-0.1), ValueError, "negative_slope must be a finite float >= 0"),
    (dict(output_padding=1), ValueError, "output_padding must be 0 for a Conv2d"),
    (dict(bn_weight=None), TypeError, "bn_weight must be a tensor of shape (5,) when bn_bias is"),
    (dict(bn_weight=None, bn_bias=None), ValueError, "running_mean and running_var must be None"),
    (dict(padding=0, weight=torch.randn(5, 3, 9, 9)), ValueError, "the output would be 0x-1"),
    (dict(transposed=1), TypeError, "transposed must be a bool"),
]


@pytest.mark.parametrize("changes,error,message", BAD_INPUTS)
def test_bad_input_raises(changes, error, message, device):
    cfg, _ = CONV2D["dcgan-k4-s2"]
    case = make_case(cfg, False, LAYERS["bn-relu"], device)
    kwargs = dict(case, transposed=False, stride=2, padding=1, impl="triton")
    kwargs.update({key: (v.to(device) if isinstance(v, torch.Tensor) else v)
                   for key, v in changes.items()})
    with pytest.raises(error, match=re.escape(message)):
        functional.conv_bn_act(**kwargs)
