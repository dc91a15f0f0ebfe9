"""The chain as a functional op: a run of conv [+ BatchNorm2d in training] [+ activation] layers as
one operator (``torch.ops.aigc_fast.conv_chain``, :mod:`aigc_fast.ops`) over our chain kernels
(:mod:`aigc_fast.kernels.chain`), which saves one tensor per layer (eager PyTorch saves two) and
launches about one GEMM per layer per pass.

Sits beside :mod:`aigc_fast.functional` (whose implementation choice, checks and autocast casts it
uses); :func:`aigc_fast.nn.fuse` builds chains from ``nn.Sequential`` runs.
"""
import torch

from . import functional, ops
from .kernels.activations import ACTIVATIONS
from .kernels.layers import LayerSpec as Link  # noqa: F401 (the public name of a layer's spec)


def _check_link(i, link, weight, bn, state, channels, x):
    """Layer i's link, weight, BN parameters and state; returns its output channels."""
    if link.activation not in ACTIVATIONS:
        raise ValueError(f"links[{i}].activation must be one of {tuple(ACTIVATIONS)}, got "
                         f"{link.activation!r}")
    slope = link.negative_slope
    if (not isinstance(slope, (int, float)) or isinstance(slope, bool)
            or not 0 <= slope < float("inf")):  # the backward reads act' from signs
        raise ValueError(f"links[{i}].negative_slope must be a finite float >= 0, got {slope!r}")
    in_dim = 0 if link.transposed else 1
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4 \
            or weight.shape[in_dim] != channels:
        raise ValueError(f"weights[{i}] must be a 4-D tensor with {channels} input channels "
                         f"(dim {in_dim}), got "
                         f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else weight!r}")
    if weight.dtype != x.dtype or weight.device != x.device:
        raise TypeError(f"weights[{i}] must be {x.dtype} on {x.device} like x, got "
                        f"{weight.dtype} on {weight.device}")
    c_out = weight.shape[1 - in_dim]
    if link.has_bn != (bn is not None):
        raise ValueError(f"bn_params[{i}] must be (gamma, beta) exactly when links[{i}].has_bn, "
                         f"got {'None' if bn is None else 'a pair'} with has_bn={link.has_bn}")
    if bn is None:
        if state is not None:
            raise ValueError(f"bn_states[{i}] must be None for a layer without BatchNorm "
                             f"(links[{i}].has_bn is False)")
        return c_out
    running_mean, running_var, batches = state if state is not None else (None, None, None)
    if batches is not None and (not isinstance(batches, torch.Tensor) or batches.dim() != 0
                                or batches.dtype != torch.long or batches.device != x.device):
        raise ValueError(f"bn_states[{i}] num_batches_tracked must be a 0-dim int64 tensor "
                         f"on {x.device}, got {batches!r}")
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"bn_states[{i}] running_mean and running_var must both be tensors or "
                         "both be None")
    if not link.training and running_mean is None:
        raise ValueError(f"bn_states[{i}] must hold running_mean and running_var: links[{i}] "
                         "normalises with them (training=False)")
    if link.momentum is None and link.training and batches is None and running_mean is not None:
        raise ValueError(f"bn_states[{i}] must hold num_batches_tracked: links[{i}].momentum is "
                         "None (the cumulative average)")
    for tensor, what in ((bn[0], "bn_params[{i}] gamma"), (bn[1], "bn_params[{i}] beta"),
                         (running_mean, "bn_states[{i}] running_mean"),
                         (running_var, "bn_states[{i}] running_var")):
        functional._check_channel_vector(tensor, what.format(i=i), c_out, x,
                                        optional="running" in what)
    return c_out


def _check(x, links, weights, bias, bn_params, bn_states):
    """One check per argument at the boundary: the layers' shapes must connect and each layer's
    tensors must be what its link says."""
    if not isinstance(links, (list, tuple)) or not links \
            or not all(isinstance(k, Link) for k in links):
        raise TypeError(f"links must be a non-empty list of aigc_fast.chain.Link, got {links!r}")
    if len(links) > ops.CHAIN_MAX_LAYERS:
        raise ValueError(f"links must hold at most {ops.CHAIN_MAX_LAYERS} layers (split a longer "
                         f"run into several chains), got {len(links)}")
    for name, value in (("weights", weights), ("bn_params", bn_params), ("bn_states", bn_states)):
        if not isinstance(value, (list, tuple)) or len(value) != len(links):
            raise ValueError(f"{name} must be a list with one entry per link ({len(links)}), got "
                             f"{type(value).__name__} of length "
                             f"{len(value) if isinstance(value, (list, tuple)) else '-'}")
    channels, hw = x.shape[1], tuple(x.shape[2:])
    for i, (link, weight, bn, state) in enumerate(zip(links, weights, bn_params, bn_states)):
        c_out = _check_link(i, link, weight, bn, state, channels, x)
        hw = functional._check_output_size(hw, weight, link.transposed, link.stride, link.padding,
                                          link.output_padding)
        if link.has_bn and link.training and x.shape[0] * hw[0] * hw[1] == 1:
            raise ValueError("Expected more than 1 value per channel when training, got output "
                             f"size {(x.shape[0], c_out, *hw)} at links[{i}]")
        channels = c_out
    functional._check_channel_vector(bias, "bias", channels, x, optional=True)


def conv_chain(x, links, weights, bn_params, bn_states, *, bias=None, impl="auto"):
    """x through a chain of layers, each ``act(batch_norm(conv(x)))`` (or ``act(conv(x))`` without
    BN), as one op.

    - ``links``: a :class:`Link` per layer; ``weights``: the conv weights in their modules' layouts
      (any strides: channels-last ones are read as they are, others are packed per call);
      ``bias``: the last layer's conv bias, or None (the layers before it have none);
      ``bn_params``: per layer (gamma, beta) or None; ``bn_states``: per BN layer (running_mean,
      running_var, num_batches_tracked), each may be None, updated in place as nn.BatchNorm2d does
      in training (num_batches_tracked advances, momentum=None reads it). A link with
      ``training=False`` normalises with the running statistics (eval), which it then needs.
    - ``impl``: "auto" | "triton" | "ref", as in :mod:`aigc_fast.functional`.
    Returns the last layer's output, channels-last on the Triton path. Gradients flow to x, the
    weights, the bias and the BN parameters, twice too (``create_graph=True``).
    Under ``torch.autocast`` x, the weights and the bias are cast as autocast casts convolutions'
    inputs.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    autocast = functional._autocast_dtype(x.device)
    if autocast is not None:
        x, bias, *weights = functional._cast_for_autocast(autocast, x, bias, *weights)
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor (N, C_in, H, W), got shape {tuple(x.shape)}")
    _check(x, links, weights, bias, bn_params, bn_states)
    return functional.run_chain(x, links, weights, bias, bn_params,
                                [None if s is None else (*s, None) for s in bn_states], impl)
