"""The GPU report's correctness checks: the fused ops against a float64 PyTorch reference on the
same device, beside PyTorch's own error in the same dtype, so a reader sees the kernels are right
before reading how fast they are. Relative error ``||out - ref|| / ||ref||`` of every output,
gradient and running statistic, on fresh random data."""
import torch
import torch.nn.functional as F

from aigc_fast import functional

from .cases import ConvTransposeBNReLUCase, generator_layers
from .measure import error_line

BF16_TOLERANCE = 2e-2
TF32_TOLERANCE = 3e-3
IEEE_TOLERANCE = 1e-4


def tolerance(dtype, device):
    if dtype == torch.bfloat16:
        return BF16_TOLERANCE
    tf32 = device.type == "cuda" and torch.backends.cudnn.allow_tf32
    return TF32_TOLERANCE if tf32 else IEEE_TOLERANCE


def rel_error(value, ref):
    return ((value.double() - ref).norm() / ref.norm()).item()


def odd_case(batch):
    """Odd channel counts, a non-square map and output_padding: what DCGAN's shapes never hit."""
    return ConvTransposeBNReLUCase("odd", batch, 3, 5, (3, 5), (7, 10), (4, 4), (2, 2),
                                   (1, 1), (1, 0),
                                   backward=True)


def check_cases(network, image_sizes, batch):
    """Every fused layer shape of the networks, and the odd case."""
    return [c for s in image_sizes for c in generator_layers(s, network, batch, backward=True)] + [
        odd_case(batch)]


def _conv_transpose_bn_relu_outputs(case, x, weight, gamma, beta, grad_out, fn):
    """Output, gradients and updated running statistics of ``fn`` (the op's signature)."""
    x, weight, gamma, beta = (t.detach().clone().requires_grad_(True)
                              for t in (x, weight, gamma, beta))
    running_mean = torch.zeros(case.c_out, device=x.device, dtype=gamma.dtype)
    running_var = torch.ones(case.c_out, device=x.device, dtype=gamma.dtype)
    out = fn(x, weight, gamma, beta, running_mean, running_var, stride=case.stride,
             padding=case.padding, output_padding=case.output_padding, training=True, momentum=0.1,
             eps=1e-5)
    grads = torch.autograd.grad(out, (x, weight, gamma, beta), grad_out)
    return dict(zip(("out", "grad_x", "grad_weight", "grad_bn_weight", "grad_bn_bias",
                     "running_mean",
                     "running_var"), (out, *grads, running_mean, running_var)))


def _torch_conv_transpose_bn_relu(x, weight, gamma, beta, running_mean, running_var, *, stride,
                                  padding, output_padding, training, momentum, eps):
    y = F.conv_transpose2d(x, weight, None, stride, padding, output_padding)
    return F.relu(F.batch_norm(y, running_mean, running_var, gamma, beta, training, momentum, eps))


def check_conv_transpose_bn_relu(case, device, dtype, impl):
    """One result per quantity: the fused op's error and eager PyTorch's, both against float64.
    x and weight take ``dtype``; BatchNorm's parameters and statistics stay float32, as under
    autocast."""
    g = torch.Generator(device="cpu").manual_seed(0)
    draw = lambda *shape: torch.randn(*shape, generator=g,  # noqa: E731
                                      dtype=torch.float64).to(device)
    x, weight = draw(*case.shapes["x"]), 0.1 * draw(*case.shapes["weight"])
    gamma, beta = 1 + 0.1 * draw(case.c_out), 0.1 * draw(case.c_out)
    grad_out = draw(*case.shapes["out"])
    ref = _conv_transpose_bn_relu_outputs(case, x, weight, gamma, beta, grad_out,
                                          _torch_conv_transpose_bn_relu)
    low = [t.to(dtype) for t in (x, weight)] + [t.float() for t in (gamma, beta)]
    fused = _conv_transpose_bn_relu_outputs(
        case, *low, grad_out.to(dtype),
        lambda *a, **k: functional.conv_transpose_bn_relu(*a, **k, impl=impl))
    eager = _conv_transpose_bn_relu_outputs(case, *low, grad_out.to(dtype),
                                            _torch_conv_transpose_bn_relu)
    return _results("conv_transpose_bn_relu", case.name, dtype, fused, eager, ref)


def check_bce_with_logits(batch, device, dtype, impl):
    """Loss and gradient of the fused BCE-with-logits against float64, beside PyTorch's."""
    g = torch.Generator(device="cpu").manual_seed(0)
    logits = (4 * torch.randn(batch, generator=g, dtype=torch.float64)).to(device)
    target = torch.rand(batch, generator=g, dtype=torch.float64).to(device)

    def outputs(fn, dtype):
        x = logits.to(dtype).requires_grad_(True)
        loss = fn(x, target.to(dtype))
        return {"loss": loss, "grad_logits": torch.autograd.grad(loss, x)[0]}

    ref = outputs(F.binary_cross_entropy_with_logits, torch.float64)
    fused = outputs(lambda x, t: functional.bce_with_logits(x, t, impl=impl), dtype)
    eager = outputs(F.binary_cross_entropy_with_logits, dtype)
    return _results("bce_with_logits", f"N={batch}", dtype, fused, eager, ref)


def _results(op, case, dtype, fused, eager, ref):
    return [{"op": op, "case": case, "dtype": str(dtype).replace("torch.", ""), "quantity": name,
             "fused_error": rel_error(fused[name], ref[name]),
             "torch_error": rel_error(eager[name], ref[name])} for name in ref]


def run_checks(conv_cases, bce_batch, device, dtypes, impl="triton"):
    """All checks, each marked ok when the fused error is within the dtype's tolerance. A check
    that raises is reported as failed with its error; the others still run."""
    results = []
    jobs = [(check_conv_transpose_bn_relu, c) for c in conv_cases] \
        + [(check_bce_with_logits, bce_batch)]
    for dtype in dtypes:
        tol = tolerance(dtype, device)
        for check, arg in jobs:
            try:
                rows = check(arg, device, dtype, impl)
            except Exception as e:  # a crash is a failed check, reported beside the others
                name = getattr(arg, "name", f"N={arg}")
                rows = [{"op": check.__name__.replace("check_", ""), "case": name,
                         "dtype": str(dtype).replace("torch.", ""), "quantity": "all",
                         "error": error_line(e)}]
            for row in rows:
                row["tolerance"] = tol
                row["ok"] = "error" not in row and row["fused_error"] <= tol
            results += rows
    return results
