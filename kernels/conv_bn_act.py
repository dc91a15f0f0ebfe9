"""Conv2d or ConvTranspose2d, optionally BatchNorm2d, then ReLU / LeakyReLU / nothing: the
launchers of the whole fused op over the channels-last implicit-GEMM core.

Training forward with BN, 3 launches: the GEMM (writes y and per-(tile, channel) statistics
partials), finalize (Chan's combine, running-stat update), apply (act(y*scale+shift)). Eval with BN,
or no BN: 1 launch (the GEMM's epilogue applies the affine map or the bias, and the activation).
Backward: the BN/activation reductions and their finish (none without BN, or in eval, unless a
parameter wants its gradient), then dx (the other direction's forward) and dW (split-K), whose
operand loads compute dy from the output gradient and y (the BN + activation backward as a GEMM
prologue: dy is never stored).
Only the GEMM kernels are autotuned, and they only overwrite fresh buffers, so the repeated runs of
tuning are harmless; the running-stat update lives in the untuned finalize, applied exactly once.
Every activation tensor is channels-last (NHWC strides).
"""
import torch

from . import bn_act
from .bn_act import ACTIVATIONS
from .conv_gemm import (channels_last, conv, conv2d_weight_grad, empty_nhwc, input_grad,
                        output_size, pack_weight, row_tiling)


def _geometry(x, weight, transposed, stride, padding, output_padding):
    """(C_out, (OH, OW), kernel) of the layer."""
    kernel = tuple(weight.shape[2:])
    c_out = weight.shape[1] if transposed else weight.shape[0]
    return c_out, output_size(x.shape[2:], kernel, stride, padding, transposed, output_padding), kernel


def forward(x, weight, bias, bn, *, transposed, stride, padding, output_padding, activation, slope,
            training, momentum, eps, keep_for_backward):
    """(out, saved): ``out`` channels-last; ``saved`` what :func:`backward` needs besides the
    weight, (x, y, mean, invstd) with x in the layout the kernels read, or None unless
    ``keep_for_backward``.
    ``bn``: (gamma, beta, running_mean, running_var) or None (no BN: out = act(conv + bias)).
    In training y is the conv output without the bias (BN removes it; it only enters running_mean)
    and the running stats, when given, are updated in place. Without BN, y is ``out`` itself (None
    without an activation: nothing of the output is needed)."""
    x = channels_last(x)
    c_out, out_hw, kernel = _geometry(x, weight, transposed, stride, padding, output_padding)
    packed = pack_weight(weight, transposed)
    geo = dict(transposed=transposed, stride=stride, padding=padding, out_hw=out_hw)
    act = ACTIVATIONS[activation]
    out = empty_nhwc(x.shape[0], c_out, out_hw, x)
    mean = invstd = None
    if bn is None:
        conv(x, packed, kernel, out=out, bias=bias, activation=act, slope=slope, **geo)
        y = out if activation is not None else None  # act' from the output's sign
    elif training:
        y = torch.empty_like(out)
        block_m, tiles, phases = row_tiling(x.shape[0], out_hw, stride, transposed)
        partials = torch.empty((3, phases * tiles, c_out), device=x.device, dtype=torch.float32)
        conv(x, packed, kernel, y=y, partials=partials, **geo)
        mean, invstd, affine = bn_act.finalize_stats(partials, bn[0], bn[1], bias, bn[2], bn[3],
                                                     momentum, eps,
                                                     count=x.shape[0] * out_hw[0] * out_hw[1])
        out = bn_act.apply(y, affine, activation, slope)
    else:
        y = torch.empty_like(out) if keep_for_backward else None
        if keep_for_backward:
            mean = torch.empty(c_out, device=x.device, dtype=torch.float32)
            invstd = torch.empty_like(mean)
        conv(x, packed, kernel, out=out, y=y, bias=bias, bn=bn, stats=(mean, invstd), eps=eps,
             activation=act, slope=slope, **geo)
    return out, ((x, y, mean, invstd) if keep_for_backward else None)


def backward(grad_out, weight, saved, bn_params, *, transposed, stride, padding, activation, slope,
             training, need_x, need_weight, need_bias, need_bn_weight, need_bn_bias):
    """(dx, dW, dbias, dgamma, dbeta), each None unless asked for; the last three float32.
    ``saved``: :func:`forward`'s; ``bn_params``: (gamma, beta), or None for a layer without BN.
    The weight is packed again here rather than kept from the forward: a copy of every weight held
    until backward would cost more memory than eager PyTorch saves.
    The backward of BN and the activation runs inside the two gradient GEMMs' operand loads, after
    the per-channel reductions it needs (none without BN or in eval, unless a parameter wants its
    gradient)."""
    x, y, mean, invstd = saved
    packed = pack_weight(weight, transposed)
    grad_out = channels_last(grad_out)
    bn = (mean, invstd, *bn_params) if bn_params is not None else None
    training = training and bn is not None
    dgamma = dbeta = dbias = coef = None
    if need_bias or need_bn_weight or need_bn_bias or (training and (need_x or need_weight)):
        dgamma, dbeta, dbias, coef = bn_act.grad_reductions(grad_out, y, bn, activation, slope,
                                                            training, has_bias=need_bias)
    prologue = bn_act.prologue_args(y, bn, coef, activation, slope, training)
    dx = dw = None
    if need_x:
        dx = input_grad(grad_out, packed, transposed=transposed, stride=stride, padding=padding,
                        in_hw=x.shape[2:], prologue=prologue)
    if need_weight:
        inp, gout = (grad_out, x) if transposed else (x, grad_out)
        dw = conv2d_weight_grad(inp, gout, tuple(packed.shape[:2]), stride, padding,
                                prologue=prologue, prologue_operand=2 if transposed else 1)
    return (dx, dw, dbias, dgamma if need_bn_weight else None, dbeta if need_bn_bias else None)
