"""The chain as a functional op: a run of conv [+ BatchNorm2d in training] [+ activation] layers as
one operator (``torch.ops.aigc_fast.conv_chain``, :mod:`aigc_fast.ops`) over our chain kernels
(:mod:`aigc_fast.kernels.chain`), which saves one tensor per layer (eager PyTorch saves two) and
launches about one GEMM per layer per pass.

Sits beside :mod:`aigc_fast.functional` (whose implementation choice, checks and autocast casts it
uses); :func:`aigc_fast.nn.fuse` builds chains from ``nn.Sequential`` runs.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import functional, ops, reference

CHAIN_ACTIVATIONS = ("relu", "leaky_relu", "tanh", None)


@dataclass(frozen=True)
class Link:
    """What a chain knows of one layer besides its tensors: the conv's geometry (a ConvTranspose2d
    when ``transposed``; no bias, groups=1, dilation=1), whether a BatchNorm2d in training follows
    (with its ``eps`` and ``momentum``, None for the cumulative average), and the activation."""

    transposed: bool
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    output_padding: Tuple[int, int] = (0, 0)
    has_bn: bool = False
    eps: float = 1e-5
    momentum: Optional[float] = 0.1
    activation: Optional[str] = None
    negative_slope: float = 0.0


def _check(x, links, weights, bn_params, bn_states):
    """One check per argument at the boundary: the layers' shapes must connect and each layer's
    tensors must be what its link says."""
    if not isinstance(links, (list, tuple)) or not links or not all(isinstance(k, Link) for k in links):
        raise TypeError(f"links must be a non-empty list of aigc_fast.chain.Link, got {links!r}")
    if len(links) > ops.CHAIN_MAX_LAYERS:
        raise ValueError(f"links must hold at most {ops.CHAIN_MAX_LAYERS} layers (split a longer run "
                         f"into several chains), got {len(links)}")
    for name, value in (("weights", weights), ("bn_params", bn_params), ("bn_states", bn_states)):
        if not isinstance(value, (list, tuple)) or len(value) != len(links):
            raise ValueError(f"{name} must be a list with one entry per link ({len(links)}), got "
                             f"{type(value).__name__} of length "
                             f"{len(value) if isinstance(value, (list, tuple)) else '-'}")
    channels, hw = x.shape[1], tuple(x.shape[2:])
    for i, (link, weight, bn, state) in enumerate(zip(links, weights, bn_params, bn_states)):
        if link.activation not in CHAIN_ACTIVATIONS:
            raise ValueError(f"links[{i}].activation must be one of {CHAIN_ACTIVATIONS}, got "
                             f"{link.activation!r}")
        slope = link.negative_slope
        if (not isinstance(slope, (int, float)) or isinstance(slope, bool)
                or not 0 <= slope < float("inf")):  # the backward reads act' from signs
            raise ValueError(f"links[{i}].negative_slope must be a finite float >= 0, got {slope!r}")
        in_dim = 0 if link.transposed else 1
        if (not isinstance(weight, torch.Tensor) or weight.dim() != 4
                or weight.shape[in_dim] != channels):
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
        if bn is None and state is not None:
            raise ValueError(f"bn_states[{i}] must be None for a layer without BatchNorm "
                             f"(links[{i}].has_bn is False)")
        if bn is not None and state is not None and state[2] is not None:
            batches = state[2]
            if (not isinstance(batches, torch.Tensor) or batches.dim() != 0
                    or batches.dtype != torch.long or batches.device != x.device):
                raise ValueError(f"bn_states[{i}] num_batches_tracked must be a 0-dim int64 tensor "
                                 f"on {x.device}, got {batches!r}")
        if bn is not None:
            for tensor, what in zip((*bn, *(state or (None, None, None))[:2]),
                                    ("gamma", "beta", "running_mean", "running_var")):
                functional._check_channel_vector(tensor, f"bn_params[{i}] {what}"
                                                 if what in ("gamma", "beta") else
                                                 f"bn_states[{i}] {what}", c_out, x,
                                                 optional=what.startswith("running"))
        hw = functional._check_output_size(hw, weight, link.transposed, link.stride, link.padding,
                                           link.output_padding)
        if link.has_bn and x.shape[0] * hw[0] * hw[1] == 1:
            raise ValueError("Expected more than 1 value per channel when training, got output size "
                             f"{(x.shape[0], c_out, *hw)} at links[{i}]")
        channels = c_out


def conv_chain(x, links, weights, bn_params, bn_states, *, impl="auto"):
    """x through a chain of layers, each ``act(batch_norm(conv(x)))`` in training (or
    ``act(conv(x))`` without BN), as one op.

    - ``links``: a :class:`Link` per layer; ``weights``: the conv weights in their modules' layouts
      (any strides: channels-last ones are read as they are, others are packed per call);
      ``bn_params``: per layer (gamma, beta) or None; ``bn_states``: per BN layer (running_mean,
      running_var, num_batches_tracked), updated in place as nn.BatchNorm2d does in training
      (num_batches_tracked advances, momentum=None reads it). The kernels need all three; a BN
      layer without them (None, or None inside) runs the reference ("auto", warning once).
    - ``impl``: "auto" | "triton" | "ref", as in :mod:`aigc_fast.functional`.
    Returns the last layer's output, channels-last on the Triton path. Gradients flow to x, the
    weights and the BN parameters, twice too (``create_graph=True``).
    Under ``torch.autocast`` x and the weights are cast as autocast casts convolutions' inputs.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    autocast = functional._autocast_dtype(x.device)
    if autocast is not None:
        x, *weights = functional._cast_for_autocast(autocast, x, *weights)
    if x.dim() != 4:
        raise ValueError(f"x must be a 4-D tensor (N, C_in, H, W), got shape {tuple(x.shape)}")
    _check(x, links, weights, bn_params, bn_states)
    dtypes = (torch.float32, torch.float16) + ((torch.bfloat16,) if x.device.type != "cpu" else ())
    untracked = [i for i, (link, state) in enumerate(zip(links, bn_states))
                 if link.has_bn and (state is None or any(t is None for t in state))]
    unsupported = (f"links {untracked} have BatchNorm without running_mean, running_var and "
                   "num_batches_tracked" if untracked else "")
    if (functional.resolve_impl(impl, x.device, x.dtype, dtypes, unsupported) == "ref"
            or x.shape[0] == 0):
        return reference.conv_chain(x, links, weights, bn_params, bn_states)
    params = [*weights, *(t for pair in bn_params if pair is not None for t in pair)]
    keep = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params))
    return ops.conv_chain_trainable(x, links, bn_params, bn_states, keep, weights)
