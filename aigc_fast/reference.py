"""The fused ops in plain PyTorch: the oracle for tests and the CPU fallback. Imports only torch."""
import torch
import torch.nn.functional as F


# --- ConvTranspose2d + BatchNorm2d + ReLU -------------------------------------------------------


def conv_transpose_bn_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, *, bias=None,
                           stride=1, padding=0, output_padding=0, training=True, momentum=0.1,
                           eps=1e-5):
    """``relu(batch_norm(conv_transpose2d(x)))`` in plain PyTorch; arguments as in
    :func:`aigc_fast.functional.conv_transpose_bn_relu`. ``momentum`` may be a 0-dim tensor (the
    exponential-average factor, e.g. ``1 / num_batches_tracked``): F.batch_norm only takes a float, so
    that case normalises with batch statistics and updates the running stats here, without a sync."""
    y = F.conv_transpose2d(x, weight, bias, stride, padding, output_padding)
    if isinstance(momentum, torch.Tensor):
        if training and running_mean is not None and y.shape[0] > 0:  # F.batch_norm skips empty ones
            with torch.no_grad():
                var, mean = torch.var_mean(y, dim=(0, 2, 3), correction=1)
                running_mean.mul_(1 - momentum).add_(momentum * mean)
                running_var.mul_(1 - momentum).add_(momentum * var)
            running_mean = running_var = None
        momentum = 0.0
    return F.relu(F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, training, momentum,
                               eps))


# --- sigmoid + binary cross-entropy -------------------------------------------------------------


def bce_with_logits(logits, target, *, weight=None, pos_weight=None, reduction="mean"):
    """Twin of :func:`aigc_fast.functional.bce_with_logits`."""
    return F.binary_cross_entropy_with_logits(logits, target, weight=weight, pos_weight=pos_weight,
                                              reduction=reduction)


def binary_cross_entropy(probs, target, *, weight=None, reduction="mean"):
    """Twin of :func:`aigc_fast.functional.binary_cross_entropy`."""
    return F.binary_cross_entropy(probs, target, weight=weight, reduction=reduction)
