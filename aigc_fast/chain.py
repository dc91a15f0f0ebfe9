"""The chain as a functional op: a run of conv [+ BatchNorm2d in training] [+ activation] layers as
one autograd Function over our chain kernels (:mod:`aigc_fast.kernels.chain`), which saves one
tensor per layer (eager PyTorch saves two) and launches about one GEMM per layer per pass.

Sits beside :mod:`aigc_fast.functional` (whose implementation choice, checks and autocast casts it
uses); :func:`aigc_fast.nn.fuse` builds chains from ``nn.Sequential`` runs.
"""
from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from . import functional, reference

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


def _kernels():
    """The launcher module, imported on first use so that a CPU-only install never imports triton."""
    from .kernels import chain as launchers

    return launchers


def _check(x, links, weights, bn_params, bn_states):
    """One check per argument at the boundary: the layers' shapes must connect and each layer's
    tensors must be what its link says."""
    if not isinstance(links, (list, tuple)) or not links or not all(isinstance(k, Link) for k in links):
        raise TypeError(f"links must be a non-empty list of aigc_fast.chain.Link, got {links!r}")
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
        if bn is not None:
            for tensor, what in zip((*bn, *(state or (None, None, None))[:2]),
                                    ("gamma", "beta", "running_mean", "running_var")):
                functional._check_channel_vector(tensor, f"bn_params[{i}] {what}"
                                                 if what in ("gamma", "beta") else
                                                 f"bn_states[{i}] {what}", c_out, x,
                                                 optional=what.startswith("running"))
        hw = functional._check_output_size(torch.empty((1, channels, *hw), device="meta"), weight,
                                           link.transposed, link.stride, link.padding,
                                           link.output_padding)
        if link.has_bn and x.shape[0] * hw[0] * hw[1] == 1:
            raise ValueError("Expected more than 1 value per channel when training, got output size "
                             f"{(x.shape[0], c_out, *hw)} at links[{i}]")
        channels = c_out


def _reference(x, links, weights, bn_params, bn_states):
    """The chain in PyTorch's ops (the fallback and, differentiated, the double backward): per layer
    as :func:`reference.conv_bn_act`, advancing num_batches_tracked as nn.BatchNorm2d does."""
    for link, weight, bn, state in zip(links, weights, bn_params, bn_states):
        running_mean, running_var, batches = state if state is not None else (None, None, None)
        momentum = link.momentum
        if bn is not None and batches is not None:
            batches.add_(1)
            if momentum is None:
                momentum = 1.0 / batches
        x = reference.conv_bn_act(
            x, weight, *(bn or (None, None)), running_mean, running_var, transposed=link.transposed,
            stride=link.stride, padding=link.padding, output_padding=link.output_padding,
            activation=link.activation, negative_slope=link.negative_slope, training=True,
            momentum=momentum if momentum is not None else 0.0, eps=link.eps)
    return x


def _kernel_layers(links, weights, bn_params, bn_states):
    launchers = _kernels()
    layers = []
    for link, weight, bn, state in zip(links, weights, bn_params, bn_states):
        chain_bn = None
        if bn is not None:
            running_mean, running_var, batches = state if state is not None else (None,) * 3
            chain_bn = launchers.ChainBN(bn[0], bn[1], running_mean, running_var, batches,
                                         link.momentum, link.eps)
        layers.append(launchers.ChainLayer(weight, link.transposed, link.stride, link.padding,
                                           link.output_padding, link.activation,
                                           float(link.negative_slope), chain_bn))
    return layers


class _Chain(torch.autograd.Function):
    """Autograd binding of the chain kernels. Saves x, the weights and BN parameters, and per layer
    one tensor (y, or the output of a layer without BN when its backward needs it; the first
    layer's is recomputed when that is cheap and saves much, see kernels.chain.recomputes_first)
    and a float32 (8, C) vector: nothing else. Under ``create_graph=True`` the backward is
    PyTorch's, so it can be differentiated again."""

    @staticmethod
    def forward(ctx, x, links, bn_states, grad_needed, *params):
        weights, bn_params = _unflatten(links, params)
        layers = _kernel_layers(links, weights, bn_params, bn_states)
        out, saved = _kernels().forward(x, layers, keep=grad_needed)
        if grad_needed:
            # the last layer's output is not needed without BN or activation (D's logits); the
            # first one's is recomputed when cheap
            last, first = links[-1], int(_kernels().recomputes_first(saved, x))
            stored = [y if first <= i and (i < len(links) - 1 or last.has_bn or last.activation)
                      else None for i, (y, _) in enumerate(saved)]
            ctx.save_for_backward(x, *params, *stored, *(vec for _, vec in saved))
        ctx.links, ctx.bn_states = links, bn_states
        return out

    @staticmethod
    def backward(ctx, grad_out):
        links, n = ctx.links, len(ctx.links)
        tensors = ctx.saved_tensors
        x, params = tensors[0], tensors[1:1 + _param_count(links)]
        stored = tensors[1 + len(params):1 + len(params) + n]
        vecs = tensors[1 + len(params) + n:]
        need = ctx.needs_input_grad
        weights, bn_params = _unflatten(links, params)
        if torch.is_grad_enabled():  # create_graph=True: PyTorch's ops, differentiable again
            no_state = [None] * n  # the recompute must not advance running stats again
            grads = functional._differentiable_grads(
                lambda x, *p: _reference(x, links, *_unflatten(links, p), no_state),
                (x, *params), (need[0], *need[4:]), grad_out)
            return (grads[0], None, None, None, *grads[1:])
        layers = _kernel_layers(links, weights, bn_params, ctx.bn_states)
        need_params = iter(need[4:])
        need_weight, need_bn = [], []
        for link in links:
            need_weight.append(next(need_params))
            need_bn.append(any([next(need_params), next(need_params)]) if link.has_bn else False)
        dx, dws, dbn = _kernels().backward(grad_out, x, layers, list(zip(stored, vecs)),
                                           need_x=need[0], need_weight=need_weight,
                                           need_bn=need_bn)
        grads = []
        for dw, pair, link in zip(dws, dbn, links):
            grads.append(dw)
            if link.has_bn:
                grads.extend(pair if pair is not None else (None, None))
        return (dx, None, None, None, *grads)


def _param_count(links):
    return sum(3 if link.has_bn else 1 for link in links)


def _flatten(weights, bn_params):
    params = []
    for weight, bn in zip(weights, bn_params):
        params.append(weight)
        if bn is not None:
            params.extend(bn)
    return params


def _unflatten(links, params):
    """(weights, bn_params) from the flat parameter list of :func:`_flatten`."""
    it = iter(params)
    weights, bn_params = [], []
    for link in links:
        weights.append(next(it))
        bn_params.append((next(it), next(it)) if link.has_bn else None)
    return weights, bn_params


def conv_chain(x, links, weights, bn_params, bn_states, *, impl="auto"):
    """x through a chain of layers, each ``act(batch_norm(conv(x)))`` in training (or
    ``act(conv(x))`` without BN), as one op.

    - ``links``: a :class:`Link` per layer; ``weights``: the conv weights in their modules' layouts
      (any strides: channels-last ones are read as they are, others are packed per call);
      ``bn_params``: per layer (gamma, beta) or None; ``bn_states``: per BN layer (running_mean,
      running_var, num_batches_tracked), each may be None, updated in place as nn.BatchNorm2d does
      in training (num_batches_tracked advances, momentum=None reads it), or None.
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
    if functional.resolve_impl(impl, x.device, x.dtype, dtypes) == "ref" or x.shape[0] == 0:
        return _reference(x, links, weights, bn_params, bn_states)
    params = _flatten(weights, bn_params)
    grad_needed = torch.is_grad_enabled() and any(t.requires_grad for t in (x, *params))
    return _Chain.apply(x, tuple(links), tuple(bn_states), grad_needed, *params)
