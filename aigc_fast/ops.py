"""The Triton paths of the public ops as PyTorch operators in the ``aigc_fast::`` namespace.

``torch.ops.aigc_fast.conv_chain`` (+ ``conv_chain_backward``: every convolution, a lone layer being
a chain of one), ``bce_with_logits``, ``binary_cross_entropy`` (+ ``bce_backward``): each has a
fake implementation that allocates exactly what the real one returns (channels-last outputs
included), an autograd formula whose backward is itself an operator, and declares what it mutates
(the running statistics; no backward mutates anything, so a graph can be backpropagated again). So
torch.compile (Dynamo, AOTAutograd, Inductor) and CUDA-graph capture see one opaque node per op
instead of tracing into our launchers. :mod:`aigc_fast.functional` validates, casts for autocast and
chooses the implementation before it calls them.

Why ``custom_op`` (opaque), not ``triton_op`` + ``wrap_triton``:
- Under ``TRITON_INTERPRET=1`` (how our tests run the kernels on a CPU), torch 2.13's
  ``wrap_triton`` returns the interpreter's kernel unwrapped (torch/_library/triton.py), so a
  triton_op's body cannot be traced: on FakeTensors the interpreter copies their storage to the
  host and fails ("Cannot access data pointer of Tensor"). A triton_op could not be compiled in CI.
- The kernels are already fused, and the launchers choose tiles (kernels/tiles.py) and split-K
  factors in Python: Inductor would have nothing to fuse into them.
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
from .kernels.activations import BY_CODE as ACTIVATION_BY_CODE
from .kernels.activations import code as activation_code
from .kernels.layers import LayerSpec


def _launchers(module):
    """A launcher module, imported on first use so that a CPU-only install never imports triton."""
    from .kernels import bce, chain

    return {"bce": bce, "chain": chain}[module]


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


# --- the convolution: a chain of conv [+ BatchNorm2d] [+ activation] layers (a lone layer: one) ---

# The chain operators return fixed tuples sized for this many layers (placeholders beyond the
# chain's): torch.compile cannot functionalize an operator that mutates inputs and returns a list.
CHAIN_MAX_LAYERS = 8
_CHAIN_FORWARD_OUTPUTS = Tuple[tuple([Tensor] * (1 + 2 * CHAIN_MAX_LAYERS))]
_CHAIN_BACKWARD_OUTPUTS = Tuple[tuple([Tensor] * (2 + 3 * CHAIN_MAX_LAYERS))]


def _padded(outputs, per_layer, layers, like):
    """``outputs`` (leading tensors, then ``per_layer`` groups of ``layers`` tensors, then trailing
    ones: ``outputs`` is (lead, groups, trail)) with each group padded by placeholders to
    CHAIN_MAX_LAYERS."""
    lead, groups, trail = outputs
    padded = list(lead)
    for group in groups:
        padded += list(group) + [_placeholder(like) for _ in range(CHAIN_MAX_LAYERS - layers)]
    return tuple(padded + list(trail))


def _encode(specs):
    """The operators' plain-list form of the layers' specs (kernels.layers.LayerSpec); flags as
    0/1 ints, since torch.jit.trace cannot record a list of bools."""
    return ([int(s.transposed) for s in specs],
            [v for s in specs for v in (*s.stride, *s.padding, *s.output_padding)],
            [int(s.has_bn) for s in specs], [int(s.training) for s in specs],
            [float(s.eps) for s in specs],
            [0.0 if s.momentum is None else float(s.momentum) for s in specs],
            [int(s.momentum is None) for s in specs],
            [activation_code(s.activation) for s in specs],
            [float(s.negative_slope) for s in specs])


def _decode(transposed, geometry, has_bn, training, eps, momentum, cumulative, activation, slope):
    """The inverse of :func:`_encode`."""
    return [LayerSpec(bool(transposed[i]), tuple(geometry[6 * i:6 * i + 2]),
                      tuple(geometry[6 * i + 2:6 * i + 4]), tuple(geometry[6 * i + 4:6 * i + 6]),
                      bool(has_bn[i]), eps[i], None if cumulative[i] else momentum[i],
                      ACTIVATION_BY_CODE[activation[i]], slope[i], bool(training[i]))
            for i in range(len(transposed))]


def _layers(specs, weights, bias, gammas, betas, running_means, running_vars, batch_counts,
            momentum_tensors):
    """The kernels' layers (kernels.chain.Layer): the BN tensors are listed for the BN layers in
    order, an empty tensor standing for a state tensor that is absent."""
    launchers = _launchers("chain")
    bn_tensors = iter(zip(gammas, betas, running_means, running_vars, batch_counts,
                          momentum_tensors))
    layers = []
    for i, (spec, weight) in enumerate(zip(specs, weights)):
        bn = None
        if spec.has_bn:
            gamma, beta, *state = next(bn_tensors)
            bn = launchers.BatchNorm(gamma, beta, *map(_present, state), spec.momentum, spec.eps,
                                     spec.training)
        layers.append(launchers.Layer(spec, weight, bias if i == len(specs) - 1 else None, bn))
    return layers


def _kept(specs, in_channels, stored_sizes):
    """Per layer, whether the forward operator returns its stored tensor for backward: not the
    first when backward recomputes it, not the last without BN (the output itself, or unneeded)."""
    first = int(_launchers("chain").recomputes_first(stored_sizes, in_channels))
    return [first <= i and (i < len(specs) - 1 or specs[i].has_bn) for i in range(len(specs))]


@custom_op("aigc_fast::conv_chain",
           mutates_args=("running_means", "running_vars", "batch_counts"))
def conv_chain(x: Tensor, weights: list[Tensor], bias: Optional[Tensor], gammas: list[Tensor],
               betas: list[Tensor], running_means: list[Tensor], running_vars: list[Tensor],
               batch_counts: list[Tensor], momentum_tensors: list[Tensor], transposed: list[int],
               geometry: list[int], has_bn: list[int], training: list[int], eps: list[float],
               momentum: list[float], cumulative: list[int], activation: list[int],
               slope: list[float], keep: bool) -> _CHAIN_FORWARD_OUTPUTS:
    """The chain on the Triton kernels (validated by aigc_fast.chain.conv_chain; per layer its
    spec in plain lists (:func:`_encode`); ``bias``: the last layer's conv bias; the BN tensors of
    the BN layers in order, empty tensors for absent state; at most CHAIN_MAX_LAYERS layers).
    Returns (out, *stored, *vecs), CHAIN_MAX_LAYERS of each: with ``keep``, per layer the tensor
    backward reads and BN's vec, else (and where backward needs none, and beyond the chain's
    layers) placeholders. Updates training BN's running stats and num_batches_tracked."""
    _require_kernels(x.device)
    specs = _decode(transposed, geometry, has_bn, training, eps, momentum, cumulative, activation,
                    slope)
    layers = _layers(specs, weights, bias, gammas, betas, running_means, running_vars,
                     batch_counts, momentum_tensors)
    out, saved = _launchers("chain").forward(x, layers, keep=keep)
    if not keep:
        return _padded(([out], [[], []], []), 2, 0, out)
    kept = _kept(specs, x.shape[1], [y.numel() for y, _ in saved])
    return _padded(([out], [[y if k else _placeholder(out) for (y, _), k in zip(saved, kept)],
                            [_or_placeholder(vec, out) for _, vec in saved]], []),
                   2, len(layers), out)


@conv_chain.register_fake
def _conv_chain_fake(x, weights, bias, gammas, betas, running_means, running_vars, batch_counts,
                     momentum_tensors, transposed, geometry, has_bn, training, eps, momentum,
                     cumulative, activation, slope, keep):
    from .kernels.bn_act import new_vec
    from .kernels.conv_gemm import empty_nhwc

    specs = _decode(transposed, geometry, has_bn, training, eps, momentum, cumulative, activation,
                    slope)
    ys, hw = [], tuple(x.shape[2:])
    for spec, weight in zip(specs, weights):
        hw = spec.out_hw(hw, weight)
        ys.append(empty_nhwc(x.shape[0], spec.out_channels(weight), hw, x))
    out = ys[-1] if not specs[-1].has_bn else torch.empty_like(ys[-1])
    if not keep:
        return _padded(([out], [[], []], []), 2, 0, out)
    kept = _kept(specs, x.shape[1], [y.numel() for y in ys])
    return _padded(([out], [[y if k else _placeholder(out) for y, k in zip(ys, kept)],
                            [new_vec(y.shape[1], x.device) if spec.has_bn else _placeholder(out)
                             for y, spec in zip(ys, specs)]], []), 2, len(specs), out)


_register_meta_launches(conv_chain, conv_chain._init_fn, _conv_chain_fake)


@custom_op("aigc_fast::conv_chain_backward", mutates_args=())
def conv_chain_backward(grad_out: Tensor, x: Tensor, weights: list[Tensor], bias: Optional[Tensor],
                        gammas: list[Tensor], betas: list[Tensor], stored: list[Tensor],
                        vecs: list[Tensor], transposed: list[int], geometry: list[int],
                        has_bn: list[int], training: list[int], eps: list[float],
                        momentum: list[float], cumulative: list[int], activation: list[int],
                        slope: list[float], need_x: bool, need_weight: list[bool],
                        need_bn: list[bool], need_bias: bool) -> _CHAIN_BACKWARD_OUTPUTS:
    """(dx, *dweights, *dgammas, *dbetas, dbias) of :func:`conv_chain` (CHAIN_MAX_LAYERS of each
    per-layer kind), placeholders where not asked for, without BN or beyond the chain; the BN and
    bias gradients float32. ``stored``/``vecs``: the forward's, the last layer's stored tensor
    being the output when it has no BN. Writes none of its inputs."""
    _require_kernels(grad_out.device)
    specs = _decode(transposed, geometry, has_bn, training, eps, momentum, cumulative, activation,
                    slope)
    none = [_placeholder(x)] * len(gammas)
    layers = _layers(specs, weights, bias, gammas, betas, none, none, none, none)
    dx, dws, dbn, dbias = _launchers("chain").backward(
        grad_out, x, layers, [(_present(y), _present(v)) for y, v in zip(stored, vecs)],
        need_x=need_x, need_weight=need_weight, need_bn=need_bn, need_bias=need_bias)
    pairs = [pair or (None, None) for pair in dbn]
    return _padded(([_or_placeholder(dx, grad_out)],
                    [[_or_placeholder(dw, grad_out) for dw in dws],
                     [_or_placeholder(g, grad_out) for g, _ in pairs],
                     [_or_placeholder(b, grad_out) for _, b in pairs]],
                    [_or_placeholder(dbias, grad_out)]), 3, len(layers), grad_out)


@conv_chain_backward.register_fake
def _conv_chain_backward_fake(grad_out, x, weights, bias, gammas, betas, stored, vecs, transposed,
                              geometry, has_bn, training, eps, momentum, cumulative, activation,
                              slope, need_x, need_weight, need_bn, need_bias):
    from .kernels.conv_gemm import empty_nhwc

    channels = [w.shape[1] if t else w.shape[0] for w, t in zip(weights, transposed)]
    per_channel = [[grad_out.new_empty(c, dtype=torch.float32) if need else _placeholder(grad_out)
                    for c, need in zip(channels, need_bn)] for _ in range(2)]  # dgammas, dbetas
    dbias = (grad_out.new_empty(channels[-1], dtype=torch.float32) if need_bias
             else _placeholder(grad_out))
    return _padded(([empty_nhwc(*x.shape[:2], x.shape[2:], grad_out) if need_x
                     else _placeholder(grad_out)],
                    [[torch.empty_like(w) if need else _placeholder(grad_out)
                      for w, need in zip(weights, need_weight)], *per_channel], [dbias]),
                   3, len(weights), grad_out)


_register_meta_launches(conv_chain_backward, conv_chain_backward._init_fn,
                        _conv_chain_backward_fake)


def _differentiable_chain(x, specs, weights, bias, bn_params, vecs):
    """The chain's output in PyTorch's ops, for a backward that must itself be differentiable.
    Training BN normalises with the batch statistics, recomputed here; eval BN with the statistics
    the forward used, from its vec: mean = running_mean - bias, and invstd."""
    last = len(specs) - 1
    for i, (spec, weight, bn, vec) in enumerate(zip(specs, weights, bn_params, vecs)):
        layer_bias = bias if i == last else None
        geometry = dict(transposed=spec.transposed, stride=spec.stride, padding=spec.padding,
                        output_padding=spec.output_padding)
        if bn is None or spec.training:
            x = reference.conv_bn_act(x, weight, *(bn or (None, None)), bias=layer_bias,
                                      training=True, eps=spec.eps, activation=spec.activation,
                                      negative_slope=spec.negative_slope, **geometry)
            continue
        y = reference.conv_bn_act(x, weight, bias=layer_bias, activation=None, **geometry)
        mean = vec[0] if layer_bias is None else vec[0] + layer_bias.detach()
        per_channel = lambda v: v.view(-1, 1, 1)  # noqa: E731
        z = (y - per_channel(mean)) * per_channel(vec[1] * bn[0]) + per_channel(bn[1])
        x = reference.activate(z, spec.activation, spec.negative_slope).to(y.dtype)
    return x


class _ChainGrad(torch.autograd.Function):
    """The autograd of :func:`conv_chain`: an autograd.Function around the operator, not
    ``register_autograd``, which refuses operators that mutate an input (the running statistics);
    torch.compile traces it, the operator and its backward operator alike, into one graph. Saves
    x, the parameters, and per layer what the operator kept (one activation-sized tensor at most)
    and BN's vec. Under ``create_graph=True`` the backward is PyTorch's ops
    (:func:`_differentiable_chain`), so it can be differentiated again."""

    @staticmethod
    def forward(ctx, x, specs, keep, bias, *tensors):
        n, n_bn = len(specs), sum(spec.has_bn for spec in specs)
        weights, bn_tensors = tensors[:n], tensors[n:n + 2 * n_bn]
        states = [list(tensors[n + 2 * n_bn + k::4]) for k in range(4)]
        encoded = _encode(specs)
        outs = torch.ops.aigc_fast.conv_chain(x, list(weights), bias, list(bn_tensors[0::2]),
                                              list(bn_tensors[1::2]), *states, *encoded, keep)
        m = CHAIN_MAX_LAYERS
        out, stored, vecs = outs[0], list(outs[1:n + 1]), outs[1 + m:1 + m + n]
        if keep:
            if not specs[-1].has_bn and specs[-1].activation is not None:
                stored[-1] = out  # its activation's derivative is read from the output
            ctx.save_for_backward(x, bias, *weights, *bn_tensors, *stored, *vecs)
        ctx.specs, ctx.encoded = specs, encoded
        return out

    @staticmethod
    def backward(ctx, grad_out):
        specs, n = ctx.specs, len(ctx.specs)
        x, bias, *rest = ctx.saved_tensors
        n_bn = sum(spec.has_bn for spec in specs)
        weights, bn_tensors = rest[:n], rest[n:n + 2 * n_bn]
        stored, vecs = rest[n + 2 * n_bn:2 * n + 2 * n_bn], rest[2 * n + 2 * n_bn:]
        need_x, need_bias = ctx.needs_input_grad[0], ctx.needs_input_grad[3]
        needs = ctx.needs_input_grad[4:4 + n + 2 * n_bn]
        need_weight, need_bn_tensor = list(needs[:n]), needs[n:]
        if torch.is_grad_enabled():  # create_graph=True
            def recompute(x, bias, *params):
                pairs = iter(zip(params[n::2], params[n + 1::2]))
                bn_params = [next(pairs) if spec.has_bn else None for spec in specs]
                return _differentiable_chain(x, specs, params[:n], bias, bn_params, vecs)

            grads = differentiable_grads(recompute, (x, bias, *weights, *bn_tensors),
                                         (need_x, need_bias, *needs), grad_out)
            return (grads[0], None, None, grads[1], *grads[2:], *[None] * 4 * n_bn)
        need_bn = iter(any(need_bn_tensor[2 * k:2 * k + 2]) for k in range(n_bn))
        need_bn = [next(need_bn) if spec.has_bn else False for spec in specs]
        outs = torch.ops.aigc_fast.conv_chain_backward(
            grad_out, x, list(weights), bias, list(bn_tensors[0::2]), list(bn_tensors[1::2]),
            list(stored), list(vecs), *ctx.encoded, need_x, need_weight, need_bn, need_bias)
        m = CHAIN_MAX_LAYERS
        dx, dws = _present(outs[0]), [_present(g) for g in outs[1:n + 1]]
        dgammas, dbetas = outs[1 + m:1 + m + n], outs[1 + 2 * m:1 + 2 * m + n]
        bn_grads = []
        for i, spec in enumerate(specs):
            if spec.has_bn:
                bn_grads += [_present(dgammas[i]), _present(dbetas[i])]
        bn_grads = [g.to(p.dtype) if need else None
                    for g, p, need in zip(bn_grads, bn_tensors, need_bn_tensor)]
        dbias = _present(outs[-1]).to(bias.dtype) if need_bias else None
        return (dx, None, None, dbias, *dws, *bn_grads, *[None] * 4 * n_bn)


def conv_chain_trainable(x, specs, weights, bias, bn_params, bn_states, keep):
    """:func:`conv_chain`'s output, differentiable w.r.t. x, the weights, the last layer's conv
    ``bias`` and the BN parameters (``specs``: kernels.layers.LayerSpec per layer; ``bn_params``:
    per layer (gamma, beta) or None; ``bn_states``: per BN layer (running_mean, running_var,
    num_batches_tracked, momentum tensor), each may be None; ``keep``: whether backward may
    follow). Every tensor reaches the autograd Function as an argument of its own (the tracer of
    torch.jit.trace sees no tensor inside a container)."""
    bn_tensors = [t for pair in bn_params if pair is not None for t in pair]
    states = [_or_placeholder(t, x) for state in bn_states if state is not None for t in state]
    return _ChainGrad.apply(x, tuple(specs), keep, bias, *weights, *bn_tensors, *states)


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
