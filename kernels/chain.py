"""A chain: a run of Conv2d / ConvTranspose2d [+ BatchNorm2d (training statistics)] [+ activation]
layers, each consuming the previous one's output, run as about one GEMM launch per layer per pass.

Forward: layer i's GEMM loads layer i-1's pre-BN output y_{i-1} and applies its BN and activation
on the fly (the prologue); its epilogue stores y_i and closes the statistics (the finalize, in the
same launch). A layer without BN stores its activation's output instead. No post-BN activation is
ever stored: a chain keeps one tensor per layer for backward (y_i, or the output of a layer
without BN), against eager PyTorch's two (BN's input and the activation's output).
Backward, for layers L..1: the input-gradient GEMM of layer i loads dy_i (the BN and activation
backward of layer i as its prologue) and its epilogue stores layer i-1's output gradient and closes
the reductions layer i-1's backward needs; the weight-gradient GEMM of layer i reads dy_i and
recomputes layer i-1's activation from y_{i-1}, both in its operand loads. The two are independent
and run as one launch.
The chain's last layer, when it has BN, stores its output with one apply launch (and its backward
needs the two reduction launches of bn_act), since no consumer applies it.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import bn_act
from .bn_act import ROW, Side, new_vec
from .chain_gemm import chain_backward_pair, chain_conv
from .conv_gemm import (channels_last, conv2d_weight_grad, empty_nhwc, output_size, pack_weight,
                        reset_counters, swap_kn)


@dataclass
class ChainBN:
    """A layer's BatchNorm2d in training: parameters, state (running stats and
    num_batches_tracked may be None) and momentum (None: cumulative average)."""

    gamma: torch.Tensor
    beta: torch.Tensor
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    num_batches_tracked: Optional[torch.Tensor]
    momentum: Optional[float]
    eps: float


@dataclass
class ChainLayer:
    """A conv (no bias, groups=1, dilation=1), its optional BN and activation."""

    weight: torch.Tensor
    transposed: bool
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    output_padding: Tuple[int, int]
    activation: Optional[str]
    slope: float
    bn: Optional[ChainBN]

    @property
    def act(self) -> int:
        return bn_act.ACTIVATIONS[self.activation]

    def out_hw(self, in_hw):
        return output_size(in_hw, tuple(self.weight.shape[2:]), self.stride, self.padding,
                           self.transposed, self.output_padding)

    def c_out(self) -> int:
        return self.weight.shape[1] if self.transposed else self.weight.shape[0]


def _input_side(x, layers, i, saved):
    """Layer i's input as a GEMM operand: the chain's input, or layer i-1's stored tensor with its
    BN and activation applied in the load (nothing to apply when it stored its activation's output)."""
    if i == 0:
        return Side(x)
    prev = layers[i - 1]
    y, vec = saved[i - 1]
    return Side(y, 1, prev.act, prev.slope, vec=vec) if prev.bn is not None else Side(y)


def forward(x, layers, *, keep):
    """(out, saved): the chain's channels-last output and, per layer, (stored tensor, vec or None).
    BN running stats and num_batches_tracked are updated in place. ``keep``: whether the caller
    keeps ``saved`` for backward (the stored tensors exist anyway: each is the next GEMM's input)."""
    x = channels_last(x)
    saved = []
    try:
        for i, layer in enumerate(layers):
            a = _input_side(x, layers, i, saved)
            out_hw = layer.out_hw(x.shape[2:] if i == 0 else saved[i - 1][0].shape[2:])
            y = empty_nhwc(x.shape[0], layer.c_out(), out_hw, x)
            geo = dict(transposed=layer.transposed, stride=layer.stride, padding=layer.padding,
                       out_hw=out_hw)
            weight_view = pack_weight(layer.weight, layer.transposed)
            if layer.bn is None:
                chain_conv(a, weight_view, tuple(layer.weight.shape[2:]), **geo,
                           out=Side(y, 0, layer.act, layer.slope))
                saved.append((y, None))
                continue
            bn = layer.bn
            vec = new_vec(y.shape[1], x.device)
            chain_conv(a, weight_view, tuple(layer.weight.shape[2:]), **geo,
                       out=Side(y, 1, vec=vec), momentum=bn.momentum, eps=bn.eps,
                       bn=(bn.gamma, bn.beta, bn.running_mean, bn.running_var,
                           bn.num_batches_tracked))
            saved.append((y, vec))
    except BaseException:
        reset_counters(x.device)
        raise
    last, (y, vec) = layers[-1], saved[-1]
    out = y if last.bn is None else bn_act.apply(y, vec[ROW["scale"]:ROW["shift"] + 1],
                                                 last.activation, last.slope)
    return out, (saved if keep else None)


# A chain's first layer is recomputed in backward rather than kept when its input is thin (at most
# RECOMPUTE_MAX_CHANNELS channels: an image or noise, so its GEMM is a small part of the chain's
# work) and its output is a large part (at least RECOMPUTE_MIN_SHARE) of what the chain keeps: a
# DCGAN D's first layer (over half of what D keeps; eager D keeps twice as much), not G's (an eighth
# of G's, not worth its launch).
RECOMPUTE_MAX_CHANNELS = 128
RECOMPUTE_MIN_SHARE = 0.25


def recomputes_first(stored_sizes, in_channels) -> bool:
    """Whether :func:`backward` recomputes the first layer's stored tensor from the chain's input
    (``in_channels`` channels), so that the caller need not keep it; ``stored_sizes``: the element
    counts of what :func:`forward` stores per layer."""
    return (len(stored_sizes) > 1 and in_channels <= RECOMPUTE_MAX_CHANNELS
            and stored_sizes[0] >= RECOMPUTE_MIN_SHARE * sum(stored_sizes))


def _recompute_first(x, layer):
    """The first layer's stored tensor again (y, or its activation's output without BN): the same
    GEMM as the forward's, so the same bits, with a plain epilogue."""
    out_hw = layer.out_hw(x.shape[2:])
    y = empty_nhwc(x.shape[0], layer.c_out(), out_hw, x)
    chain_conv(Side(x), pack_weight(layer.weight, layer.transposed), tuple(layer.weight.shape[2:]),
               transposed=layer.transposed, stride=layer.stride, padding=layer.padding,
               out_hw=out_hw, out=Side(y, 0, layer.act if layer.bn is None else 0, layer.slope))
    return y


def backward(grad_out, x, layers, saved, *, need_x, need_weight, need_bn):
    """(dx, [dW], [(dgamma, dbeta)]): the gradients of the chain given ``grad_out`` (any strides),
    each None unless asked for (``need_weight``, ``need_bn``: per layer). ``x``: the chain's input
    (copied once more when not channels-last, as the forward did); ``saved``: :func:`forward`'s,
    where the first stored tensor may be None when :func:`recomputes_first`."""
    x = channels_last(x)
    grad_out = channels_last(grad_out)
    if saved[0][0] is None:  # not kept: recomputes_first
        saved = [(_recompute_first(x, layers[0]), saved[0][1]), *saved[1:]]
    last = layers[-1]
    y, vec = saved[-1]
    dbn = [None] * len(layers)
    if last.bn is not None:  # no consumer closed the last layer's reductions: bn_act's launches
        dgamma, dbeta, _ = bn_act.grad_reductions(grad_out, y, vec, (last.bn.gamma, last.bn.beta),
                                                  last.activation, last.slope, training=True,
                                                  has_bias=False)
        dbn[-1] = (dgamma, dbeta) if need_bn[-1] else None
        grad = Side(grad_out, 2, last.act, last.slope, y=y, vec=vec)
    else:
        grad = Side(grad_out, 3 if last.act else 0, last.act, last.slope, y=y)
    dx, dws = None, [None] * len(layers)
    try:
        for i in reversed(range(len(layers))):
            layer = layers[i]
            kernel = tuple(layer.weight.shape[2:])
            in_grad = wgrad = None
            if i > 0 or need_x:  # the input gradient: the other direction's GEMM
                prev = layers[i - 1] if i > 0 else None
                stored = saved[i - 1][0] if i > 0 else x
                da = empty_nhwc(grad.tensor.shape[0], stored.shape[1], stored.shape[2:], grad.tensor)
                bn_grads = (None, None)
                if prev is None:
                    out = Side(da)
                elif prev.bn is not None:  # the epilogue writes dgamma, dbeta: wanted or not
                    out = Side(da, 2, prev.act, prev.slope, y=stored, vec=saved[i - 1][1])
                    bn_grads = tuple(torch.empty(stored.shape[1], device=da.device,
                                                 dtype=torch.float32) for _ in range(2))
                    dbn[i - 1] = bn_grads if need_bn[i - 1] else None
                else:
                    out = Side(da, 3 if prev.act else 0, prev.act, prev.slope, y=stored)
                in_grad = dict(a=grad, weight_view=swap_kn(pack_weight(layer.weight,
                                                                       layer.transposed)),
                               kernel=kernel, transposed=not layer.transposed, stride=layer.stride,
                               padding=layer.padding, out_hw=tuple(stored.shape[2:]), out=out,
                               bn_grads=bn_grads)
            if need_weight[i]:  # the weight gradient (a ConvTranspose2d's: its operands swapped)
                dws[i] = torch.empty_like(layer.weight)
                inp = _input_side(x, layers, i, saved)
                wgrad = (grad, inp) if layer.transposed else (inp, grad)
            if in_grad and wgrad:
                chain_backward_pair(**in_grad, wgrad_x=wgrad[0], wgrad_g=wgrad[1], dw=dws[i])
            elif in_grad:
                chain_conv(**in_grad)
            elif wgrad:
                conv2d_weight_grad(*wgrad, kernel, layer.stride, layer.padding, out=dws[i])
            if i > 0:
                grad = Side(da, out.mode if out.mode == 2 else 0, out.act, out.slope, y=out.y,
                            vec=out.vec)
            else:
                dx = da if need_x else None
    except BaseException:
        reset_counters(x.device)
        raise
    return dx, dws, dbn
