"""A chain: a run of Conv2d / ConvTranspose2d [+ BatchNorm2d] [+ activation] layers, each consuming
the previous one's output, run as one GEMM launch per layer per pass. A lone layer is a chain of
one: this is the only convolution path.

Forward: layer i's GEMM loads its input through the previous layer's prologue (the BN and
activation of a training BN layer, applied on the fly to its stored pre-BN y) and its epilogue is
its own: a training BN layer stores y and closes the statistics in the same launch (the finalize);
an eval BN layer applies the running statistics (and keeps y when backward may follow); a layer
without BN stores act(conv + bias). No post-BN activation of a training layer is ever stored: a
chain keeps one tensor per layer for backward (y, or the output of a layer without BN), against
eager PyTorch's two (BN's input and the activation's output).
Backward, for layers L..1: the input-gradient GEMM of layer i loads dy_i (the BN and activation
backward of layer i as its prologue) and its epilogue stores layer i-1's output gradient and closes
the reductions layer i-1's backward needs; the weight-gradient GEMM of layer i reads dy_i and
recomputes layer i-1's activation from y_{i-1}, both in its operand loads. The two are independent
and run as one launch.
The chain's last layer, when it has training BN, stores its output with one apply launch, and its
backward needs bn_act's two reduction launches (as does a last layer with a bias that wants a
gradient), since no neighbour closes them. Only the last layer may have a conv bias.
"""
from dataclasses import dataclass
from typing import Optional

import torch

from . import bn_act
from .activations import code as activation_code
from .bn_act import Operand, Side, new_coef, new_vec
from .chain_gemm import Epilogue, Momentum, chain_backward_pair, chain_conv
from .conv_gemm import (channels_last, conv2d_weight_grad, empty_nhwc, pack_weight, reset_counters,
                        swap_kn)
from .layers import LayerSpec


@dataclass
class BatchNorm:
    """A layer's BatchNorm2d tensors: parameters and state (running stats, num_batches_tracked and
    a 0-dim momentum tensor may each be None) and, from its spec, the numbers."""

    gamma: torch.Tensor
    beta: torch.Tensor
    running_mean: Optional[torch.Tensor]
    running_var: Optional[torch.Tensor]
    num_batches_tracked: Optional[torch.Tensor]
    momentum_tensor: Optional[torch.Tensor]
    momentum: Optional[float]
    eps: float
    training: bool

    def momentum_from(self) -> Momentum:
        if self.momentum_tensor is not None:
            return Momentum.TENSOR
        return Momentum.CUMULATIVE if self.momentum is None else Momentum.VALUE

    def momentum_value(self) -> float:
        return 0.0 if self.momentum is None else float(self.momentum)


@dataclass
class Layer:
    """A layer of a chain: its spec and tensors (``bn`` None without BN)."""

    spec: LayerSpec
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    bn: Optional[BatchNorm]

    @property
    def kernel(self):
        return tuple(self.weight.shape[2:])

    def packed(self):
        return pack_weight(self.weight, self.spec.transposed)

    def geometry(self, out_hw):
        s = self.spec
        return dict(transposed=s.transposed, stride=s.stride, padding=s.padding, out_hw=out_hw)

    def side(self, tensor, mode, **saved):
        """``tensor`` as an operand or output of this layer's prologue or epilogue ``mode``."""
        return Side(tensor, mode, self.spec.activation, self.spec.negative_slope, **saved)


def _forward_input(layer, y, out, vec):
    """What the next layer's forward GEMM reads of ``layer``: its stored y through its training
    BN and activation, else its output."""
    if layer.bn is not None and layer.bn.training:
        return layer.side(y, Operand.BN_ACT, vec=vec)
    return Side(out)


def _backward_input(x, layers, i, saved):
    """Layer i's input as the weight-gradient GEMM reads it: the chain's input, or layer i-1's
    stored tensor (y through its BN and activation; the output of a layer without BN)."""
    if i == 0:
        return Side(x)
    prev = layers[i - 1]
    y, vec = saved[i - 1]
    return prev.side(y, Operand.BN_ACT, vec=vec) if prev.bn is not None else Side(y)


def _layer_forward(a, layer, in_hw, keep):
    """One layer's GEMM: (out, stored, vec, next input), ``out`` None for a training BN layer (its
    consumer applies it), ``stored`` what backward reads (None when not kept)."""
    like = a.tensor
    out_hw = layer.spec.out_hw(in_hw, layer.weight)
    c_out = layer.spec.out_channels(layer.weight)
    fresh = lambda: empty_nhwc(like.shape[0], c_out, out_hw, like)  # noqa: E731
    geo = layer.geometry(out_hw)
    bn = layer.bn
    if bn is None:
        out = fresh()
        chain_conv(a, layer.packed(), layer.kernel, **geo, out=layer.side(out, Epilogue.ACT),
                   bias=layer.bias)
        return out, out, None, Side(out)
    vec = new_vec(c_out, like.device)
    if bn.training:
        y = fresh()
        chain_conv(a, layer.packed(), layer.kernel, **geo, out=Side(y, Epilogue.BN_BATCH, vec=vec),
                   bias=layer.bias, bn=bn)
        return None, y, vec, _forward_input(layer, y, None, vec)
    out = fresh()
    y = fresh() if keep else None
    chain_conv(a, layer.packed(), layer.kernel, **geo,
               out=layer.side(out, Epilogue.BN_RUNNING, y=y, vec=vec), bias=layer.bias, bn=bn)
    return out, y, vec if keep else None, Side(out)


def forward(x, layers, *, keep):
    """(out, saved): the chain's channels-last output and, per layer, (stored tensor, vec or None)
    for backward (None unless ``keep``: whether backward may follow). Training BN's running stats
    and num_batches_tracked are updated in place."""
    x = channels_last(x)
    saved, a, hw = [], Side(x), tuple(x.shape[2:])
    try:
        for layer in layers:
            out, stored, vec, a = _layer_forward(a, layer, hw, keep)
            hw = tuple(a.tensor.shape[2:])
            saved.append((stored, vec))
    except BaseException:
        reset_counters(x.device)
        raise
    last = layers[-1]
    if out is None:  # a training BN layer: nothing applied its statistics yet
        out = bn_act.apply(stored, vec, last.spec.activation, last.spec.negative_slope)
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
    out_hw = layer.spec.out_hw(x.shape[2:], layer.weight)
    y = empty_nhwc(x.shape[0], layer.spec.out_channels(layer.weight), out_hw, x)
    out = layer.side(y, Epilogue.ACT) if layer.bn is None else Side(y, Epilogue.ACT)
    chain_conv(Side(x), layer.packed(), layer.kernel, **layer.geometry(out_hw), out=out,
               bias=layer.bias if layer.bn is None else None)
    return y


def _last_layer_grad(grad_out, last, stored, vec, need_bn, need_bias):
    """(operand that loads as the last layer's dy, (dgamma, dbeta) or None, dbias or None): no
    neighbour closes the last layer's reductions, so bn_act's launches do where there are any."""
    dbn = dbias = coef = None
    if last.bn is not None or need_bias:
        bn_params = (last.bn.gamma, last.bn.beta) if last.bn is not None else None
        dgamma, dbeta, dbias, coef = bn_act.grad_reductions(
            grad_out, stored, vec, bn_params, last.spec.activation, last.spec.negative_slope,
            training=last.bn is not None and last.bn.training, has_bias=need_bias)
        dbn = (dgamma, dbeta) if need_bn and last.bn is not None else None
    if last.bn is not None:
        return last.side(grad_out, Operand.BN_ACT_GRAD, y=stored, vec=vec, coef=coef), dbn, dbias
    if activation_code(last.spec.activation):
        return last.side(grad_out, Operand.ACT_GRAD, y=stored), dbn, dbias
    return Side(grad_out), dbn, dbias


def backward(grad_out, x, layers, saved, *, need_x, need_weight, need_bn, need_bias):
    """(dx, [dW], [(dgamma, dbeta)], dbias): the gradients of the chain given ``grad_out`` (any
    strides), each None unless asked for (``need_weight``, ``need_bn``: per layer; ``need_bias``:
    the last layer's). ``x``: the chain's input (copied once more when not channels-last, as the
    forward did); ``saved``: :func:`forward`'s, where the first stored tensor may be None when
    :func:`recomputes_first`. Writes nothing that the forward returned: a graph can be
    backpropagated again."""
    x = channels_last(x)
    grad_out = channels_last(grad_out)
    if len(layers) > 1 and saved[0][0] is None:  # not kept: recomputes_first
        saved = [(_recompute_first(x, layers[0]), saved[0][1]), *saved[1:]]
    grad, last_dbn, dbias = _last_layer_grad(grad_out, layers[-1], *saved[-1], need_bn[-1],
                                             need_bias)
    dbn = [None] * (len(layers) - 1) + [last_dbn]
    dx, dws = None, [None] * len(layers)
    try:
        for i in reversed(range(len(layers))):
            layer = layers[i]
            in_grad = wgrad = None
            if i > 0 or need_x:  # the input gradient: the other direction's GEMM
                prev = layers[i - 1] if i > 0 else None
                stored = saved[i - 1][0] if i > 0 else x
                da = empty_nhwc(grad.tensor.shape[0], stored.shape[1], stored.shape[2:],
                                grad.tensor)
                bn_grads = (None, None)
                if prev is None:
                    out = Side(da)
                elif prev.bn is not None:  # the epilogue writes dgamma, dbeta: wanted or not
                    out = prev.side(da, Epilogue.BN_ACT_GRAD, y=stored, vec=saved[i - 1][1],
                                    coef=new_coef(stored.shape[1], da.device))
                    bn_grads = tuple(torch.empty(stored.shape[1], device=da.device,
                                                 dtype=torch.float32) for _ in range(2))
                    dbn[i - 1] = bn_grads if need_bn[i - 1] else None
                elif activation_code(prev.spec.activation):
                    out = prev.side(da, Epilogue.ACT_GRAD, y=stored)
                else:
                    out = Side(da)
                in_grad = dict(a=grad, weight_view=swap_kn(layer.packed()), kernel=layer.kernel,
                               transposed=not layer.spec.transposed, stride=layer.spec.stride,
                               padding=layer.spec.padding, out_hw=tuple(stored.shape[2:]), out=out,
                               bn=prev.bn if prev is not None else None, bn_grads=bn_grads)
            if need_weight[i]:  # the weight gradient (a ConvTranspose2d's: its operands swapped)
                dws[i] = torch.empty_like(layer.weight)
                inp = _backward_input(x, layers, i, saved)
                wgrad = (grad, inp) if layer.spec.transposed else (inp, grad)
            if in_grad and wgrad:
                chain_backward_pair(**in_grad, wgrad_x=wgrad[0], wgrad_g=wgrad[1], dw=dws[i])
            elif in_grad:
                chain_conv(**in_grad)
            elif wgrad:
                conv2d_weight_grad(*wgrad, layer.kernel, layer.spec.stride, layer.spec.padding,
                                   out=dws[i])
            if i > 0:
                grad = (prev.side(da, Operand.BN_ACT_GRAD, y=out.y, vec=out.vec, coef=out.coef)
                        if prev.bn is not None else Side(da))
            else:
                dx = da if need_x else None
    except BaseException:
        reset_counters(x.device)
        raise
    return dx, dws, dbn, dbias
