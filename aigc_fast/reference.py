"""The fused ops in plain PyTorch: the oracle for tests and the CPU fallback. Imports only torch
and the activation table (plain PyTorch too)."""
import torch
import torch.nn.functional as F

from .kernels.activations import ACTIVATIONS


# --- Conv2d / ConvTranspose2d [+ BatchNorm2d] [+ ReLU / LeakyReLU] --------------------------------


def _batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps):
    """F.batch_norm, also for ``momentum`` as a 0-dim tensor (the exponential-average factor, e.g.
    ``1 / num_batches_tracked``): F.batch_norm only takes a float, so that case normalises with
    batch statistics and updates the running stats here, without a sync."""
    if isinstance(momentum, torch.Tensor):
        # F.batch_norm skips empty ones
        if training and running_mean is not None and y.shape[0] > 0:
            with torch.no_grad():
                var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=1)
                running_mean.mul_(1 - momentum).add_(momentum * mean)
                running_var.mul_(1 - momentum).add_(momentum * var)
            running_mean = running_var = None
        momentum = 0.0
    return F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)


def conv_bn_act(x, weight, bn_weight=None, bn_bias=None, running_mean=None, running_var=None, *,
                transposed, bias=None, stride=1, padding=0, output_padding=0, activation="relu",
                negative_slope=0.01, training=True, momentum=0.1, eps=1e-5):
    """``act(batch_norm(conv(x)))`` in plain PyTorch; arguments as in
    :func:`aigc_fast.functional.conv_bn_act` (no BatchNorm when bn_weight and bn_bias are None)."""
    if transposed:
        y = F.conv_transpose2d(x, weight, bias, stride, padding, output_padding)
    else:
        y = F.conv2d(x, weight, bias, stride, padding)
    if bn_weight is not None:
        y = _batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum, eps)
    return activate(y, activation, negative_slope)


def conv_chain(x, links, weights, bn_params, bn_states, bias=None):
    """Twin of :func:`aigc_fast.chain.conv_chain` (its ``links`` describe the layers; ``bias`` is
    the last layer's): per layer :func:`conv_bn_act`, advancing num_batches_tracked in training as
    nn.BatchNorm2d does. ``bn_states``: per BN layer (running_mean, running_var,
    num_batches_tracked) or None, optionally with a 0-dim momentum tensor fourth."""
    last = len(links) - 1
    for i, (link, weight, bn, state) in enumerate(zip(links, weights, bn_params, bn_states)):
        running_mean, running_var, batches, momentum_tensor = (*(state or ()), None, None, None,
                                                                None)[:4]
        momentum = link.momentum
        if bn is not None and link.training and batches is not None:
            batches.add_(1)
            if momentum is None:
                momentum = 1.0 / batches
        momentum = momentum_tensor if momentum_tensor is not None else momentum
        x = conv_bn_act(x, weight, *(bn or (None, None)), running_mean, running_var,
                        transposed=link.transposed, stride=link.stride, padding=link.padding,
                        output_padding=link.output_padding, bias=bias if i == last else None,
                        activation=link.activation, negative_slope=link.negative_slope,
                        training=link.training,
                        momentum=momentum if momentum is not None else 0.0, eps=link.eps)
    return x


def activate(y, activation, negative_slope=0.01):
    """An activation of kernels.activations.ACTIVATIONS (None: none), as PyTorch computes it."""
    return ACTIVATIONS[activation].reference(y, negative_slope)


# --- sigmoid + binary cross-entropy -------------------------------------------------------------


def bce_with_logits(logits, target, *, weight=None, pos_weight=None, reduction="mean"):
    """Twin of :func:`aigc_fast.functional.bce_with_logits`."""
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, pos_weight=pos_weight,
                                              reduction=reduction)


def binary_cross_entropy(probs, target, *, weight=None, reduction="mean"):
    """Twin of :func:`aigc_fast.functional.binary_cross_entropy`."""
    return F.binary_cross_entropy(probs, target, weight=weight, reduction=reduction)
