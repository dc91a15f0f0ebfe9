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
from .bn_act import ACTIVATIONS, ROW, grad_side, new_vec
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
    weight, (x, y, vec) with x in the layout the kernels read and vec BN's (bn_act.VEC_ROWS), or
    None unless ``keep_for_backward``.
    ``bn``: (gamma, beta, running_mean, running_var) or None (no BN: out = act(conv + bias)).
    In training y is the conv output without the bias (BN removes it; it only enters running_mean)
    and the running stats, when given, are updated in place. Without BN, y is ``out`` itself (None
    without an activation: nothing of the output is needed) and vec None."""
    x = channels_last(x)
    c_out, out_hw, kernel = _geometry(x, weight, transposed, stride, padding, output_padding)
    packed = pack_weight(weight, transposed)
    geo = dict(transposed=transposed, stride=stride, padding=padding, out_hw=out_hw)
    act = ACTIVATIONS[activation]
    out = empty_nhwc(x.shape[0], c_out, out_hw, x)
    vec = None
    if bn is None:
        conv(x, packed, kernel, out=out, bias=bias, activation=act, slope=slope, **geo)
        y = out if activation is not None else None  # act' from the output's sign
    elif training:
        y = torch.empty_like(out)
        block_m, tiles, phases = row_tiling(x.shape[0], out_hw, stride, transposed)
        partials = torch.empty((3, phases * tiles, c_out), device=x.device, dtype=torch.float32)
        conv(x, packed, kernel, y=y, partials=partials, **geo)
        vec = bn_act.finalize_stats(partials, bn[0], bn[1], bias, bn[2], bn[3], momentum, eps,
                                    count=x.shape[0] * out_hw[0] * out_hw[1])
        out = bn_act.apply(y, vec[ROW["scale"]:ROW["shift"] + 1], activation, slope)
    else:
        y = torch.empty_like(out) if keep_for_backward else None
        vec = new_vec(c_out, x.device) if keep_for_backward else None
        conv(x, packed, kernel, out=out, y=y, bias=bias, bn=bn, vec=vec, eps=eps, activation=act,
             slope=slope, **geo)
    return out, ((x, y, vec) if keep_for_backward else None)


def backward(grad_out, weight, saved, bn_params, *, transposed, stride, padding, activation, slope,
             training, need_x, need_weight, need_bias, need_bn_weight, need_bn_bias):
    """(dx, dW, dbias, dgamma, dbeta), each None unless asked for; the last three float32.
    ``saved``: :func:`forward`'s; ``bn_params``: (gamma, beta), or None for a layer without BN.
    The weight is not kept from the forward: pack_weight views a channels-last parameter (which
    fuse() makes) and copies others, as the forward did.
    The backward of BN and the activation runs inside the two gradient GEMMs' operand loads, after
    the per-channel reductions it needs (none without BN or in eval, unless a parameter wants its
    gradient)."""
    x, y, vec = saved
    packed = pack_weight(weight, transposed)
    grad_out = channels_last(grad_out)
    training = training and vec is not None
    dgamma = dbeta = dbias = None
    if need_bias or need_bn_weight or need_bn_bias or (training and (need_x or need_weight)):
        dgamma, dbeta, dbias = bn_act.grad_reductions(grad_out, y, vec, bn_params, activation,
                                                      slope, training, has_bias=need_bias)
    grad = grad_side(grad_out, y, vec, activation, slope)
    dx = dw = None
    if need_x:
        dx = input_grad(grad, packed, transposed=transposed, stride=stride, padding=padding,
                        in_hw=x.shape[2:])
    if need_weight:
        dw = conv2d_weight_grad(*((grad, x) if transposed else (x, grad)), tuple(packed.shape[:2]),
                                stride, padding)
    return (dx, dw, dbias, dgamma if need_bn_weight else None, dbeta if need_bn_bias else None)
