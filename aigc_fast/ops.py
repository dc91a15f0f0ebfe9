"""The Triton paths of the public ops as PyTorch operators in the ``aigc_fast::`` namespace.

``torch.ops.aigc_fast.conv_bn_act`` (+ ``conv_bn_act_backward``), ``conv_chain`` (+
``conv_chain_backward``), ``bce_with_logits``,
``binary_cross_entropy`` (+ ``bce_backward``): each has a fake implementation that allocates
exactly what the real one returns (channels-last outputs included), an autograd formula whose
backward is itself an operator, and declares what it mutates (the running statistics). So
torch.compile (Dynamo, AOTAutograd, Inductor) and CUDA-graph capture see one opaque node per op
instead of tracing into our launchers. :mod:`aigc_fast.functional` validates, casts for autocast and
chooses the implementation before it calls them.

Why ``custom_op`` (opaque), not ``triton_op`` + ``wrap_triton``:
- Under ``TRITON_INTERPRET=1`` (how our tests run the kernels on a CPU), torch 2.13's
  ``wrap_triton`` returns the interpreter's kernel unwrapped (torch/_library/triton.py), so a
  triton_op's body cannot be traced: on FakeTensors the interpreter copies their storage to the
  host and fails ("Cannot access data pointer of Tensor"). A triton_op could not be compiled in CI.
- The kernels are already fused, and the launchers choose tilings, split-K factors and pruned
  autotune configs in Python: Inductor would have nothing to fuse into them.
- It leaves the device code (kernels/) untouched.
The cost: Inductor cannot fuse the surrounding elementwise ops into our kernels' prologues.

Outputs an op does not need for a call (what backward keeps when no gradient is wanted, gradients
not asked for) are empty tensors: a custom op returns no None and no alias of an input or another
output. The double backward (``create_graph=True``) recomputes the op in PyTorch's own ops and
differentiates that, so it is exact.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor
from torch.library import custom_op

from . import reference
from .kernels import META_LAUNCHES, launches_take


def _launchers(module):
    """A launcher module, imported on first use so that a CPU-only install never imports triton."""
    from .kernels import bce, chain, conv_bn_act

    return {"conv": conv_bn_act, "bce": bce, "chain": chain}[module]


def _require_kernels(device: torch.device):
    if not launches_take(device):
        raise NotImplementedError(
            f"aigc_fast's Triton kernels cannot take {device.type} tensors here (CUDA, or the CPU "
            "with TRITON_INTERPRET=1 set before triton is imported); call the public functions of "
            "aigc_fast.functional, which fall back to the PyTorch reference")


def _placeholder(like: Tensor) -> Tensor:
    """The empty tensor standing for an output this call does not produce."""
    return like.new_empty(0)


def _or_placeholder(value: Optional[Tensor], like: Tensor) -> Tensor:
    return _placeholder(like) if value is None else value


def _present(value: Tensor) -> Optional[Tensor]:
    """The inverse of :func:`_or_placeholder` (real outputs here are never empty)."""
    return value if value.numel() else None


def _register_meta_launches(op, impl, fake):
    """On meta tensors the op runs its launchers while the GPU compile check records their launches
    (benchmarks/gpu_compile_check.py), and is its fake implementation otherwise."""
    op.register_kernel("meta", lambda *args, **kwargs: (impl if META_LAUNCHES.enabled else fake)(
        *args, **kwargs))


def differentiable_grads(recompute, inputs, needs, grad_outputs):
    """The gradients of ``recompute(*inputs)`` (the op in PyTorch's own ops) for a backward under
    ``create_graph=True``: built as a graph, so that they can be differentiated again (double
    backward: an R1 or path-length penalty). Exact, at the price of one more forward in PyTorch.
    Each input that needs a gradient enters through a fresh view, so the gradient is this op's own
    derivative, not one that also flows back into the input's history (a weight used twice)."""
    entries = [t.view_as(t) if need else t for t, need in zip(inputs, needs)]
    wanted = [t for t, need in zip(entries, needs) if need]
    grads = iter(torch.autograd.grad(recompute(*entries), wanted, grad_outputs, create_graph=True,
                                     allow_unused=True))
    return [next(grads) if need else None for need in needs]


# --- Conv2d / ConvTranspose2d [+ BatchNorm2d] [+ ReLU / LeakyReLU] --------------------------------

_CONV_SCALARS = 11  # conv_bn_act's arguments after the 7 tensors (momentum_tensor ... keep_for_backward)


@custom_op("aigc_fast::conv_bn_act", mutates_args=("running_mean", "running_var"))
def conv_bn_act(x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                bn_bias: Optional[Tensor], running_mean: Optional[Tensor],
                running_var: Optional[Tensor], momentum_tensor: Optional[Tensor], momentum: float,
                transposed: bool, stride: list[int], padding: list[int], output_padding: list[int],
                activation: Optional[str], negative_slope: float, training: bool, eps: float,
                keep_for_backward: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """act(bn(conv(x))) on the Triton kernels (arguments validated by functional.conv_bn_act;
    ``momentum_tensor``, when given, replaces ``momentum``; ``training`` means training BN, false
    without BN). Returns (out, x_read, y, vec): out channels-last; with ``keep_for_backward`` what
    backward needs besides x and out: x_read, x's channels-last copy when x was in another layout,
    y (the pre-BN tensor; none when it is out itself, without BN), BN's float32 (6, C) vec
    (kernels.bn_act.VEC_ROWS); placeholders otherwise. Updates the running stats in training."""
    _require_kernels(x.device)
    bn = (bn_weight, bn_bias, running_mean, running_var) if bn_weight is not None else None
    out, saved = _launchers("conv").forward(
        x, weight, bias, bn, transposed=transposed, stride=tuple(stride), padding=tuple(padding),
        output_padding=tuple(output_padding), activation=activation, slope=negative_slope,
        training=training, momentum=momentum if momentum_tensor is None else momentum_tensor,
        eps=eps, keep_for_backward=keep_for_backward)
    if saved is None:
        return out, *(_placeholder(out) for _ in range(3))
    x_read, y, vec = saved
    return (out, _placeholder(x) if x_read is x else x_read,
            _placeholder(out) if y is None or y is out else y, _or_placeholder(vec, out))


@conv_bn_act.register_fake
def _conv_bn_act_fake(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                      momentum_tensor, momentum, transposed, stride, padding, output_padding,
                      activation, negative_slope, training, eps, keep_for_backward):
    from .kernels.bn_act import new_vec
    from .kernels.conv_gemm import channels_last, empty_nhwc, output_size

    c_out = weight.shape[1] if transposed else weight.shape[0]
    out_hw = output_size(x.shape[2:], tuple(weight.shape[2:]), stride, padding, transposed,
                         output_padding)
    out = empty_nhwc(x.shape[0], c_out, out_hw, x)
    if not keep_for_backward:
        return out, *(_placeholder(out) for _ in range(3))
    x_read = _placeholder(x) if channels_last(x) is x else empty_nhwc(*x.shape[:2], x.shape[2:], x)
    if bn_weight is None:
        return out, x_read, *(_placeholder(out) for _ in range(2))
    return out, x_read, torch.empty_like(out), new_vec(c_out, x.device)


_register_meta_launches(conv_bn_act, conv_bn_act._init_fn, _conv_bn_act_fake)


@custom_op("aigc_fast::conv_bn_act_backward", mutates_args=("vec",))
def conv_bn_act_backward(grad_out: Tensor, x_read: Tensor, weight: Tensor, bias: Optional[Tensor],
                         bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], y: Tensor,
                         vec: Tensor, transposed: bool, stride: list[int],
                         padding: list[int], activation: Optional[str], negative_slope: float,
                         training: bool, needs: list[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor,
                                                                     Tensor]:
    """(dx, dweight, dbias, dbn_weight, dbn_bias) of :func:`conv_bn_act`, each a placeholder unless
    ``needs`` asks for it; the last three in their parameter's dtype. ``x_read``: x as the kernels
    read it (channels-last); ``y``: the pre-BN tensor (the output itself without BN; a placeholder
    without BN and activation); ``vec``: BN's, a placeholder without BN, into whose COEF rows the
    backward writes dy's coefficients."""
    _require_kernels(grad_out.device)
    has_bn = bn_weight is not None
    grads = _launchers("conv").backward(
        grad_out, weight, (x_read, _present(y), _present(vec)),
        (bn_weight, bn_bias) if has_bn else None, transposed=transposed, stride=tuple(stride),
        padding=tuple(padding), activation=activation, slope=negative_slope, training=training,
        need_x=needs[0], need_weight=needs[1], need_bias=needs[2], need_bn_weight=needs[3],
        need_bn_bias=needs[4])
    params = (x_read, weight, bias, bn_weight, bn_bias)
    # the per-channel sums are rows of one buffer, and outputs may neither alias each other nor
    # (as the fake allocates them) start inside a buffer: all but its first row (dgamma) are copied
    return tuple(_placeholder(grad_out) if g is None
                 else g if i < 2 else g.to(p.dtype, copy=g.storage_offset() != 0)
                 for i, (g, p) in enumerate(zip(grads, params)))


@conv_bn_act_backward.register_fake
def _conv_bn_act_backward_fake(grad_out, x_read, weight, bias, bn_weight, bn_bias, y, vec,
                               transposed, stride, padding, activation, negative_slope, training,
                               needs):
    from .kernels.conv_gemm import empty_nhwc

    dx = empty_nhwc(x_read.shape[0], x_read.shape[1], x_read.shape[2:], grad_out)
    dw = weight.new_empty(weight.shape, dtype=(grad_out if transposed else x_read).dtype)
    c_out = grad_out.shape[1]
    grads = [dx, dw] + [p.new_empty(c_out) if p is not None else None
                        for p in (bias, bn_weight, bn_bias)]
    return tuple(g if need and g is not None else _placeholder(grad_out)
                 for g, need in zip(grads, needs))


_register_meta_launches(conv_bn_act_backward, conv_bn_act_backward._init_fn,
                        _conv_bn_act_backward_fake)


def _conv_graph(x, weight, bias, bn_weight, bn_bias, mean, invstd, layer):
    """The op's output in PyTorch's ops, for a backward that must itself be differentiable.
    Training normalises with the batch statistics, recomputed here; eval with those the forward
    used: ``mean`` = running_mean - bias and ``invstd`` as the eval kernel saved them."""
    act = dict(activation=layer["activation"], negative_slope=layer["slope"])
    geometry = dict(transposed=layer["transposed"], stride=layer["stride"], padding=layer["padding"],
                    output_padding=layer["output_padding"])
    if bn_weight is None or layer["training"]:
        return reference.conv_bn_act(x, weight, bn_weight, bn_bias, None, None, bias=bias,
                                     training=True, eps=layer["eps"], **geometry, **act)
    y = reference.conv_bn_act(x, weight, bias=bias, activation=None, **geometry)
    running_mean = mean if bias is None else mean + bias.detach()
    per_channel = lambda v: v.view(-1, 1, 1)  # noqa: E731
    z = (y - per_channel(running_mean)) * per_channel(invstd * bn_weight) + per_channel(bn_bias)
    return reference.activate(z, **act).to(x.dtype)


class _ConvBNActGrad(torch.autograd.Function):
    """The autograd of :func:`conv_bn_act`. An autograd.Function around the operator, not
    ``register_autograd``, which refuses operators that mutate an input (the running statistics);
    torch.compile traces it, the operator and its backward operator alike, into one graph."""

    @staticmethod
    def forward(ctx, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                momentum_tensor, momentum, transposed, stride, padding, output_padding, activation,
                slope, training, eps, keep):
        out, x_read, y, vec = torch.ops.aigc_fast.conv_bn_act(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, momentum_tensor,
            momentum, transposed, stride, padding, output_padding, activation, slope, training, eps,
            keep)
        ctx.layer = dict(transposed=transposed, stride=tuple(stride), padding=tuple(padding),
                         output_padding=tuple(output_padding), activation=activation, slope=slope,
                         training=training, eps=eps)
        if keep:  # without BN an activation's derivative is read from the output's sign
            y = out if bn_weight is None and activation is not None else y
            ctx.save_for_backward(x, x_read, weight, bias, bn_weight, bn_bias, y, vec)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        x, x_read, weight, bias, bn_weight, bn_bias, y, vec = ctx.saved_tensors
        needs = list(ctx.needs_input_grad[:5])
        layer = ctx.layer
        if torch.is_grad_enabled():  # create_graph=True
            mean, invstd = (vec[0], vec[1]) if vec.numel() else (None, None)
            grads = differentiable_grads(
                lambda *inputs: _conv_graph(*inputs, mean, invstd, layer),
                (x, weight, bias, bn_weight, bn_bias), needs, grad_out)
        else:
            grads = [_present(g) if need else None for g, need in zip(
                torch.ops.aigc_fast.conv_bn_act_backward(
                    grad_out, x_read if x_read.numel() else x, weight, bias, bn_weight, bn_bias,
                    y, vec, layer["transposed"], layer["stride"], layer["padding"],
                    layer["activation"], layer["slope"], layer["training"], needs), needs)]
        return (*grads, None, None) + (None,) * _CONV_SCALARS


def conv_bn_act_trainable(*args):
    """:func:`conv_bn_act`'s output ``out``, differentiable (arguments as there)."""
    return _ConvBNActGrad.apply(*args)


# --- the chain: a run of conv [+ BatchNorm2d in training] [+ activation] layers --------------------

_CHAIN_ACTIVATIONS = (None, "relu", "leaky_relu", "tanh")  # the operators' activation codes
# The chain operators return fixed tuples sized for this many layers (placeholders beyond the
# chain's): torch.compile cannot functionalize an operator that mutates inputs and returns a list.
CHAIN_MAX_LAYERS = 8
_CHAIN_FORWARD_OUTPUTS = Tuple[tuple([Tensor] * (1 + 2 * CHAIN_MAX_LAYERS))]
_CHAIN_BACKWARD_OUTPUTS = Tuple[tuple([Tensor] * (1 + 3 * CHAIN_MAX_LAYERS))]


def _padded(outputs, per_layer, layers, like):
    """``outputs`` (a leading tensor, then ``per_layer`` groups of ``layers`` tensors) with each
    group padded by placeholders to CHAIN_MAX_LAYERS."""
    padded = [outputs[0]]
    for k in range(per_layer):
        padded += list(outputs[1 + k * layers:1 + (k + 1) * layers])
        padded += [_placeholder(like) for _ in range(CHAIN_MAX_LAYERS - layers)]
    return tuple(padded)


def _encode_links(links):
    """The operators' plain-list form of a chain's links (aigc_fast.chain.Link); flags as 0/1 ints,
    since torch.jit.trace cannot record a list of bools."""
    return ([int(link.transposed) for link in links],
            [v for link in links for v in (*link.stride, *link.padding, *link.output_padding)],
            [int(link.has_bn) for link in links], [float(link.eps) for link in links],
            [0.0 if link.momentum is None else float(link.momentum) for link in links],
            [int(link.momentum is None) for link in links],
            [_CHAIN_ACTIVATIONS.index(link.activation) for link in links],
            [float(link.negative_slope) for link in links])


def _chain_layers(weights, gammas, betas, running_means, running_vars, batch_counts, transposed,
                  geometry, has_bn, eps, momentum, cumulative, activation, slope):
    """The kernels' description of the chain (kernels.chain.ChainLayer per layer)."""
    launchers = _launchers("chain")
    bn_tensors = iter(zip(gammas, betas, running_means, running_vars, batch_counts))
    layers = []
    for i, weight in enumerate(weights):
        g = geometry[6 * i:6 * i + 6]
        bn = None
        if has_bn[i]:
            bn = launchers.ChainBN(*next(bn_tensors), None if cumulative[i] else momentum[i],
                                   eps[i])
        layers.append(launchers.ChainLayer(weight, bool(transposed[i]), tuple(g[0:2]),
                                           tuple(g[2:4]), tuple(g[4:6]),
                                           _CHAIN_ACTIVATIONS[activation[i]], slope[i], bn))
    return layers


def _chain_kept(layers, in_channels, stored_sizes):
    """Per layer, whether the chain's operator returns its stored tensor for backward: not the
    first when backward recomputes it, not the last without BN (the output itself, or unneeded)."""
    first = int(_launchers("chain").recomputes_first(stored_sizes, in_channels))
    return [first <= i and (i < len(layers) - 1 or layers[i].bn is not None)
            for i in range(len(layers))]


@custom_op("aigc_fast::conv_chain",
           mutates_args=("running_means", "running_vars", "batch_counts"))
def conv_chain(x: Tensor, weights: list[Tensor], gammas: list[Tensor], betas: list[Tensor],
               running_means: list[Tensor], running_vars: list[Tensor],
               batch_counts: list[Tensor], transposed: list[int], geometry: list[int],
               has_bn: list[int], eps: list[float], momentum: list[float],
               cumulative: list[int], activation: list[int], slope: list[float],
               keep: bool) -> _CHAIN_FORWARD_OUTPUTS:
    """The chain on the Triton kernels (validated by aigc_fast.chain.conv_chain; per layer its
    geometry, BN and activation in plain lists, the BN tensors of the BN layers in order; at most
    CHAIN_MAX_LAYERS layers). Returns (out, *stored, *vecs), CHAIN_MAX_LAYERS of each: with
    ``keep``, per layer the tensor backward reads and BN's vec, else (and where backward needs
    none, and beyond the chain's layers) placeholders. Updates the running stats and
    num_batches_tracked."""
    _require_kernels(x.device)
    layers = _chain_layers(weights, gammas, betas, running_means, running_vars, batch_counts,
                           transposed, geometry, has_bn, eps, momentum, cumulative, activation,
                           slope)
    out, saved = _launchers("chain").forward(x, layers, keep=keep)
    if not keep:
        return _padded([out], 2, 0, out)
    kept = _chain_kept(layers, x.shape[1], [y.numel() for y, _ in saved])
    return _padded([out] + [y if k else _placeholder(out) for (y, _), k in zip(saved, kept)]
                   + [_or_placeholder(vec, out) for _, vec in saved], 2, len(layers), out)


@conv_chain.register_fake
def _conv_chain_fake(x, weights, gammas, betas, running_means, running_vars, batch_counts,
                     transposed, geometry, has_bn, eps, momentum, cumulative, activation, slope,
                     keep):
    from .kernels.bn_act import new_vec
    from .kernels.conv_gemm import empty_nhwc

    layers = _chain_layers(weights, gammas, betas, running_means, running_vars, batch_counts,
                           transposed, geometry, has_bn, eps, momentum, cumulative, activation,
                           slope)
    ys, hw = [], tuple(x.shape[2:])
    for layer in layers:
        hw = layer.out_hw(hw)
        ys.append(empty_nhwc(x.shape[0], layer.c_out(), hw, x))
    out = ys[-1] if layers[-1].bn is None else torch.empty_like(ys[-1])
    if not keep:
        return _padded([out], 2, 0, out)
    kept = _chain_kept(layers, x.shape[1], [y.numel() for y in ys])
    return _padded([out] + [y if k else _placeholder(out) for y, k in zip(ys, kept)]
                   + [new_vec(y.shape[1], x.device) if layer.bn is not None else _placeholder(out)
                      for y, layer in zip(ys, layers)], 2, len(layers), out)


_register_meta_launches(conv_chain, conv_chain._init_fn, _conv_chain_fake)


@custom_op("aigc_fast::conv_chain_backward", mutates_args=("vecs",))
def conv_chain_backward(grad_out: Tensor, x: Tensor, weights: list[Tensor], gammas: list[Tensor],
                        betas: list[Tensor], stored: list[Tensor], vecs: list[Tensor],
                        transposed: list[int], geometry: list[int], has_bn: list[int],
                        eps: list[float], momentum: list[float], cumulative: list[int],
                        activation: list[int], slope: list[float], need_x: bool,
                        need_weight: list[bool], need_bn: list[bool]) -> _CHAIN_BACKWARD_OUTPUTS:
    """(dx, *dweights, *dgammas, *dbetas) of :func:`conv_chain` (CHAIN_MAX_LAYERS of each, one per
    layer), placeholders where not asked for, without BN or beyond the chain. ``stored``/``vecs``:
    the forward's, the last layer's stored tensor being the output when it has no BN; the backward
    writes dy's coefficients into the vecs (their COEF rows)."""
    _require_kernels(grad_out.device)
    layers = _chain_layers(weights, gammas, betas, [None] * len(gammas), [None] * len(gammas),
                           [None] * len(gammas), transposed, geometry, has_bn, eps, momentum,
                           cumulative, activation, slope)
    dx, dws, dbn = _launchers("chain").backward(
        grad_out, x, layers, [(_present(y), _present(v)) for y, v in zip(stored, vecs)],
        need_x=need_x, need_weight=need_weight, need_bn=need_bn)
    pairs = [pair or (None, None) for pair in dbn]
    return _padded([_or_placeholder(dx, grad_out)] + [_or_placeholder(dw, grad_out) for dw in dws]
                   + [_or_placeholder(g, grad_out) for g, _ in pairs]
                   + [_or_placeholder(b, grad_out) for _, b in pairs], 3, len(layers), grad_out)


@conv_chain_backward.register_fake
def _conv_chain_backward_fake(grad_out, x, weights, gammas, betas, stored, vecs, transposed,
                              geometry, has_bn, eps, momentum, cumulative, activation, slope,
                              need_x, need_weight, need_bn):
    from .kernels.conv_gemm import empty_nhwc

    channels = [w.shape[1] if t else w.shape[0] for w, t in zip(weights, transposed)]
    per_channel = [[grad_out.new_empty(c, dtype=torch.float32) if need else _placeholder(grad_out)
                    for c, need in zip(channels, need_bn)] for _ in range(2)]  # dgammas, dbetas
    return _padded([empty_nhwc(*x.shape[:2], x.shape[2:], grad_out) if need_x
                    else _placeholder(grad_out)]
                   + [torch.empty_like(w) if need else _placeholder(grad_out)
                      for w, need in zip(weights, need_weight)]
                   + per_channel[0] + per_channel[1], 3, len(weights), grad_out)


_register_meta_launches(conv_chain_backward, conv_chain_backward._init_fn,
                        _conv_chain_backward_fake)


class _ChainGrad(torch.autograd.Function):
    """The autograd of :func:`conv_chain`, around the operator as for conv_bn_act (it mutates the
    running statistics). Saves x, the parameters, and per layer what the operator kept (one
    activation-sized tensor at most) and BN's vec. Under ``create_graph=True`` the backward is
    PyTorch's ops (reference.conv_chain), so it can be differentiated again."""

    @staticmethod
    def forward(ctx, x, links, bn_params, bn_states, keep, *weights_and_bn):
        n = len(links)
        weights, bn_tensors = weights_and_bn[:n], weights_and_bn[n:]
        gammas, betas = list(bn_tensors[0::2]), list(bn_tensors[1::2])
        states = [state for state in bn_states if state is not None]
        encoded = _encode_links(links)
        outs = torch.ops.aigc_fast.conv_chain(
            x, list(weights), gammas, betas, [s[0] for s in states], [s[1] for s in states],
            [s[2] for s in states], *encoded, keep)
        m = CHAIN_MAX_LAYERS
        out, stored, vecs = outs[0], list(outs[1:n + 1]), outs[1 + m:1 + m + n]
        if keep:
            if not links[-1].has_bn and links[-1].activation is not None:
                stored[-1] = out  # its activation's derivative is read from the output
            ctx.save_for_backward(x, *weights, *bn_tensors, *stored, *vecs)
        ctx.links, ctx.bn_params, ctx.encoded = links, bn_params, encoded
        return out

    @staticmethod
    def backward(ctx, grad_out):
        links, n = ctx.links, len(ctx.links)
        x, *rest = ctx.saved_tensors
        n_bn = sum(link.has_bn for link in links)
        weights, bn_tensors = rest[:n], rest[n:n + 2 * n_bn]
        stored, vecs = rest[n + 2 * n_bn:2 * n + 2 * n_bn], rest[2 * n + 2 * n_bn:]
        needs = ctx.needs_input_grad[5:]
        need_weight, need_bn_tensor = list(needs[:n]), needs[n:]
        if torch.is_grad_enabled():  # create_graph=True
            def recompute(x, *params):
                bn_iter = iter(zip(params[n::2], params[n + 1::2]))
                bn_params = [next(bn_iter) if link.has_bn else None for link in links]
                return reference.conv_chain(x, links, params[:n], bn_params, [None] * n)

            grads = differentiable_grads(recompute, (x, *weights, *bn_tensors),
                                         (ctx.needs_input_grad[0], *needs), grad_out)
            return (grads[0], None, None, None, None, *grads[1:])
        need_bn = iter(any(need_bn_tensor[2 * k:2 * k + 2]) for k in range(n_bn))
        need_bn = [next(need_bn) if link.has_bn else False for link in links]
        outs = torch.ops.aigc_fast.conv_chain_backward(
            grad_out, x, list(weights), list(bn_tensors[0::2]), list(bn_tensors[1::2]),
            list(stored), list(vecs), *ctx.encoded, ctx.needs_input_grad[0], need_weight, need_bn)
        m = CHAIN_MAX_LAYERS
        dx, dws = _present(outs[0]), [_present(g) for g in outs[1:n + 1]]
        dgammas, dbetas = outs[1 + m:1 + m + n], outs[1 + 2 * m:1 + 2 * m + n]
        bn_grads = []
        for i, link in enumerate(links):
            if link.has_bn:
                bn_grads += [_present(dgammas[i]), _present(dbetas[i])]
        bn_grads = [g if need else None for g, need in zip(bn_grads, need_bn_tensor)]
        return (dx, None, None, None, None, *dws, *bn_grads)


def conv_chain_trainable(x, links, bn_params, bn_states, keep, weights):
    """:func:`conv_chain`'s output, differentiable w.r.t. x, the weights and the BN parameters
    (``bn_params``: per layer (gamma, beta) or None; ``bn_states``: per layer (running_mean,
    running_var, num_batches_tracked) or None; ``keep``: whether backward may follow)."""
    bn_tensors = [t for pair in bn_params if pair is not None for t in pair]
    return _ChainGrad.apply(x, tuple(links), tuple(bn_params), tuple(bn_states), keep, *weights,
                            *bn_tensors)


# --- sigmoid + binary cross-entropy -------------------------------------------------------------


def _loss_fake(input, reduction):
    return input.new_empty(() if reduction != "none" else input.shape)


@custom_op("aigc_fast::bce_with_logits", mutates_args=())
def bce_with_logits(logits: Tensor, target: Tensor, weight: Optional[Tensor],
                    pos_weight: Optional[Tensor], reduction: str) -> Tensor:
    """F.binary_cross_entropy_with_logits on the kernels; arguments validated and of one dtype."""
    _require_kernels(logits.device)
    return _launchers("bce").bce_forward(logits, target, weight, pos_weight, reduction, True)


@bce_with_logits.register_fake
def _bce_with_logits_fake(logits, target, weight, pos_weight, reduction):
    return _loss_fake(logits, reduction)


@custom_op("aigc_fast::binary_cross_entropy", mutates_args=())
def binary_cross_entropy(probs: Tensor, target: Tensor, weight: Optional[Tensor],
                         reduction: str) -> Tensor:
    """F.binary_cross_entropy on the kernels (NaN, not an error, for values outside [0, 1])."""
    _require_kernels(probs.device)
    return _launchers("bce").bce_forward(probs, target, weight, None, reduction, False)


@binary_cross_entropy.register_fake
def _binary_cross_entropy_fake(probs, target, weight, reduction):
    return _loss_fake(probs, reduction)


_register_meta_launches(bce_with_logits, bce_with_logits._init_fn, _bce_with_logits_fake)
_register_meta_launches(binary_cross_entropy, binary_cross_entropy._init_fn,
                        _binary_cross_entropy_fake)


@custom_op("aigc_fast::bce_backward", mutates_args=())
def bce_backward(grad: Tensor, input: Tensor, target: Tensor, weight: Optional[Tensor],
                 pos_weight: Optional[Tensor], reduction: str, from_logits: bool, need_input: bool,
                 need_target: bool) -> tuple[Tensor, Tensor]:
    """(d input, d target) of either loss; a placeholder for a gradient not asked for."""
    _require_kernels(input.device)
    grads = _launchers("bce").bce_backward(grad, input, target, weight, pos_weight, reduction,
                                           from_logits, need_input, need_target)
    return tuple(_or_placeholder(g, input) for g in grads)


@bce_backward.register_fake
def _bce_backward_fake(grad, input, target, weight, pos_weight, reduction, from_logits, need_input,
                       need_target):
    return (input.new_empty(input.shape) if need_input else _placeholder(input),
            target.new_empty(input.shape) if need_target else _placeholder(input))


_register_meta_launches(bce_backward, bce_backward._init_fn, _bce_backward_fake)


def _bce_setup_context(from_logits):
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs[:4 if from_logits else 3])
        ctx.reduction, ctx.from_logits = inputs[-1], from_logits
    return setup_context


def _bce_backward(ctx, grad):
    input, target, weight, *rest = ctx.saved_tensors
    pos_weight = rest[0] if rest else None
    needs = ctx.needs_input_grad[:2]
    if torch.is_grad_enabled():  # create_graph=True
        def loss(input, target):
            if ctx.from_logits:
                return reference.bce_with_logits(input, target, weight=weight,
                                                 pos_weight=pos_weight, reduction=ctx.reduction)
            return reference.binary_cross_entropy(input, target, weight=weight,
                                                  reduction=ctx.reduction)

        grads = differentiable_grads(loss, (input, target), needs, grad)
    else:
        grads = [_present(g) for g in torch.ops.aigc_fast.bce_backward(
            grad, input, target, weight, pos_weight, ctx.reduction, ctx.from_logits, *needs)]
    return (*grads, None, None, None)[:len(ctx.needs_input_grad)]


bce_with_logits.register_autograd(_bce_backward, setup_context=_bce_setup_context(True))
binary_cross_entropy.register_autograd(_bce_backward, setup_context=_bce_setup_context(False))
