"""FLOPs and minimum memory traffic of each benchmarked workload: the one place they are computed.

Conventions (so that achieved TFLOP/s and GB/s mean the same thing for every provider):
- FLOPs count the convolutions' useful multiply-adds as 2 FLOPs each: only kernel taps that land
  inside the input/output are counted (a stride-2 transposed convolution does not multiply zeros).
  Elementwise work (BatchNorm, activations, the optimiser) is O(1) per element and is not counted,
  except for BCE, which is nothing but elementwise work (see :func:`bce_with_logits`).
- Minimum bytes are a lower bound: every tensor the op's interface must read or write, touched
  exactly once. Whatever an implementation saves for backward or re-reads is not in it, so
  bytes / time is the effective bandwidth against that bound.
"""
from dataclasses import dataclass

import torch
from torch import nn

from aigc_fast.models import Discriminator, Generator

# BatchNorm parameters and running statistics are float32 in every benchmark.
_STAT_BYTES = 4


@dataclass(frozen=True)
class Cost:
    flops: int
    bytes: int


def _taps_1d(in_size, out_size, kernel, stride, padding):
    """(input index, output index, tap) triples of a 1-D convolution that touch real data: for a
    Conv2d ``i = o*stride - padding + k``; a transposed convolution has the same triples."""
    return sum(1 for o in range(out_size) for k in range(kernel)
               if 0 <= o * stride - padding + k < in_size)


def conv_flops(n, c_in, c_out, in_hw, out_hw, kernel, stride, padding, transposed=False):
    """2 * useful multiply-adds of a 2-D (transposed) convolution, groups=1, dilation=1."""
    if transposed:  # the adjoint of the Conv2d from out_hw to in_hw: the same (i, o, tap) triples
        in_hw, out_hw = out_hw, in_hw
    taps = 1
    for i, o, k, s, p in zip(in_hw, out_hw, kernel, stride, padding):
        taps *= _taps_1d(i, o, k, s, p)
    return 2 * n * c_in * c_out * taps


def conv_transpose_bn_relu(n, c_in, c_out, in_hw, out_hw, kernel, stride, padding, *, backward,
                           itemsize):
    """Forward (training): read x, W, gamma, beta, running stats; write out and running stats.
    Backward adds: read grad_out, x, W, gamma; write grad_x, grad_W, grad_gamma, grad_beta;
    the input, weight and output-gradient convolutions each cost the forward's FLOPs."""
    flops = conv_flops(n, c_in, c_out, in_hw, out_hw, kernel, stride, padding, transposed=True)
    x = n * c_in * in_hw[0] * in_hw[1]
    w = c_in * c_out * kernel[0] * kernel[1]
    out = n * c_out * out_hw[0] * out_hw[1]
    nbytes = (x + w + out) * itemsize + 6 * c_out * _STAT_BYTES
    if backward:
        flops *= 3
        nbytes += (out + 2 * x + 2 * w) * itemsize + 3 * c_out * _STAT_BYTES
    return Cost(flops, nbytes)


# Per element: forward max, mul, sub, abs, neg, exp, log1p, add, and the mean's add;
# backward: sigmoid (neg, exp, add, div), sub, and the scale by grad/N.
BCE_FLOPS_PER_ELEMENT = 9 + 6


def bce_with_logits(numel, *, itemsize):
    """Forward + backward with reduction="mean": read logits and target, write grad_logits."""
    return Cost(BCE_FLOPS_PER_ELEMENT * numel, 3 * numel * itemsize)


def conv_layers(meta_model, input_shape):
    """``(module, input shape, output shape)`` of every Conv2d/ConvTranspose2d of a meta-device
    model (shapes only: no memory, no compute)."""
    found = []
    for m in meta_model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.register_forward_hook(lambda m, i, o: found.append((m, i[0].shape, o.shape)))
    with torch.no_grad():
        meta_model(torch.empty(input_shape, device="meta"))
    return found


def _layer_flops(module, in_shape, out_shape):
    transposed = isinstance(module, nn.ConvTranspose2d)
    return conv_flops(in_shape[0], module.in_channels, module.out_channels, in_shape[2:],
                      out_shape[2:], module.kernel_size, module.stride, module.padding, transposed)


def train_step(batch, image_size, nz, ngf, ndf, nc, *, itemsize):
    """One :func:`aigc_fast.train.train_step`: G forward once; D forward on real, detached fake and
    fake; backward: D's weight and input gradients for real and fake (none into the real images or
    the detached fakes), then input gradients only through the frozen D into G's weight and input
    gradients (none into z). Bytes: the inputs once, and for every parameter the Adam update (read
    p, grad, exp_avg, exp_avg_sq; write them back bar grad) after its gradient is written."""
    with torch.device("meta"):
        G, D = Generator(image_size, nz, ngf, nc), Discriminator(image_size, ndf, nc)
    g_layers = [_layer_flops(*layer) for layer in conv_layers(G, (batch, nz, 1, 1))]
    d_layers = [_layer_flops(*layer)
                for layer in conv_layers(D, (batch, nc, image_size, image_size))]
    f_g, f_d = sum(g_layers), sum(d_layers)
    flops = (3 * f_g - g_layers[0]  # G: forward, weight grads, input grads bar the first layer
             + 3 * f_d  # D forwards: real, fake.detach(), fake
             + 2 * (f_d + f_d - d_layers[0])  # D step: weight + input grads, twice
             + f_d)  # G step: input grads through D, every layer
    params = sum(p.numel() for m in (G, D) for p in m.parameters())
    inputs = batch * (nz + nc * image_size * image_size)
    return Cost(flops, (inputs + 8 * params) * itemsize)
