"""Public functional ops: argument checks, autocast casts, and the choice of implementation.

Every op takes ``impl="auto"|"triton"|"ref"``: "triton" runs our kernels (CUDA tensors, or CPU
tensors when TRITON_INTERPRET=1), "ref" runs the plain-PyTorch twin in :mod:`aigc_fast.reference`,
"auto" picks Triton where it can run and otherwise falls back to the reference, warning once. The
environment variable ``AIGC_FAST_IMPL=ref|triton`` overrides "auto".
"""
import contextlib
import os
import warnings

import torch

from . import ops, reference
from .kernels import META_LAUNCHES, TRITON_AVAILABLE, launches_take
from .kernels.activations import ACTIVATIONS
from .kernels.layers import LayerSpec, output_size

IMPLS = ("auto", "triton", "ref")
_warned_fallbacks = set()  # the causes "auto" has already warned about: one warning per cause


def _triton_blocker(device: torch.device, dtype: torch.dtype, dtypes) -> str:
    """Why our Triton kernels cannot run on ``dtype`` tensors of ``device`` here ("" when they
    can)."""
    if not TRITON_AVAILABLE:
        return "triton is not installed"
    if not launches_take(device):
        return (f"tensors are on {device.type}; Triton needs CUDA, or TRITON_INTERPRET=1 set "
                "before triton is imported for CPU tensors")
    if dtype not in dtypes:
        return f"this kernel takes {', '.join(str(d) for d in dtypes)}, got {dtype}"
    return ""


def triton_can_run(device: torch.device, dtype: torch.dtype = torch.float32,
                   dtypes=(torch.float32, torch.float16, torch.bfloat16)) -> bool:
    """Whether our Triton kernels can execute on ``dtype`` tensors of ``device`` in this process."""
    return not _triton_blocker(device, dtype, dtypes)


def resolve_impl(impl: str, device: torch.device, dtype: torch.dtype = torch.float32,
                 dtypes=(torch.float32, torch.float16, torch.bfloat16),
                 unsupported: str = "") -> str:
    """Turn ``impl`` ("auto"|"triton"|"ref") into the implementation that will run, "triton" or
    "ref", for inputs of ``device`` and ``dtype``; ``dtypes`` are those the op's kernels take, and
    ``unsupported`` (when not "") says what else about this call the kernels cannot do. "auto" then
    falls back to the reference, warning once per cause; a forced "triton" raises."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl == "auto":
        forced = os.environ.get("AIGC_FAST_IMPL", "")
        if forced:
            if forced not in ("triton", "ref"):
                raise ValueError(f"AIGC_FAST_IMPL must be 'triton' or 'ref', got {forced!r}")
            impl = forced
    blocker = (_triton_blocker(device, dtype, dtypes) or unsupported) if impl != "ref" else ""
    if impl == "auto":
        if not blocker:
            return "triton"
        if blocker not in _warned_fallbacks:
            _warned_fallbacks.add(blocker)
            warnings.warn(f"aigc_fast: Triton kernels cannot run here ({blocker}); using the "
                          "PyTorch reference.", stacklevel=3)
        return "ref"
    if blocker:  # NotImplementedError is a RuntimeError
        raise NotImplementedError(f"impl='triton' cannot run: {blocker}; use impl='ref'")
    return impl


# --- torch.autocast -------------------------------------------------------------------------------
# Each public op does at its boundary what autocast does for the PyTorch ops it replaces, before it
# calls its operator (aigc_fast.ops): the fused conv's rule (x, weight and bias to autocast's dtype,
# BN's parameters and statistics as they are) is not torch.library.register_autocast's, which casts
# every floating input alike.
_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves float64 alone


def _autocast_dtype(device: torch.device):
    """The dtype ``torch.autocast`` runs convolutions in on ``device`` here, or None when it is off
    (on meta tensors while the GPU compile check records an autocast region: the one it records)."""
    if device.type == "meta" and META_LAUNCHES.enabled:
        return META_LAUNCHES.autocast
    if torch.amp.is_autocast_available(device.type) and torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


def _cast_for_autocast(dtype, *tensors):
    """``tensors`` as autocast casts an op's arguments: the float32/float16/bfloat16 ones to
    ``dtype`` (differentiably, so gradients reach float32 master weights in float32), the rest
    unchanged."""
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in _AUTOCAST_ELIGIBLE else t
                 for t in tensors)


# --- Conv2d / ConvTranspose2d [+ BatchNorm2d] [+ ReLU / LeakyReLU] --------------------------------



def _int_pair(value, name, minimum):
    """``(h, w)`` from an int or a pair of ints, each ``>= minimum``."""
    pair = (value, value) if isinstance(value, int) else value
    if (not isinstance(pair, (tuple, list)) or len(pair) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) and v >= minimum
                       for v in pair)):
        raise ValueError(f"{name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return tuple(pair)


def _check_channel_vector(value, name, channels, x, optional):
    if value is None and optional:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of shape ({channels},)"
                        + (" or None" if optional else "") + f", got {type(value).__name__}")
    if tuple(value.shape) != (channels,):
        raise ValueError(f"{name} must have shape ({channels},) = (C_out,), got "
                         f"{tuple(value.shape)}")
    if value.device != x.device:
        raise ValueError(f"{name} must be on {x.device} like x, got {value.device}")
    if value.dtype not in (x.dtype, torch.float32):
        allowed = " or ".join(sorted({str(x.dtype), str(torch.float32)}))
        raise TypeError(f"{name} must be {allowed} (x's dtype, or float32), got {value.dtype}")


def _check_x_and_weight(x, weight, transposed):
    """x (N, C_in, H, W) and a weight in its module's layout; returns C_out."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a tensor, got {type(x).__name__}")
    if x.dim() != 4 or min(x.shape[1:], default=0) < 1:
        raise ValueError("x must be a 4-D tensor (N, C_in, H, W) with C_in, H, W >= 1 (N may be "
                         f"0), got shape {tuple(x.shape)}")
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"x must be float32, float16, bfloat16 or float64, got {x.dtype}")
    if not isinstance(transposed, bool):
        raise TypeError(f"transposed must be a bool, got {type(transposed).__name__}")
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"weight must be a tensor, got {type(weight).__name__}")
    in_dim, layout = (0, f"(C_in={x.shape[1]}, C_out, kH, kW) as in nn.ConvTranspose2d") \
        if transposed else (1, f"(C_out, C_in={x.shape[1]}, kH, kW) as in nn.Conv2d")
    if weight.dim() != 4 or weight.shape[in_dim] != x.shape[1] or weight.numel() == 0:
        raise ValueError(f"weight must have shape {layout}, got {tuple(weight.shape)}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight must have x's dtype {x.dtype}, got {weight.dtype}")
    if weight.device != x.device:
        raise ValueError(f"weight must be on {x.device} like x, got {weight.device}")
    return weight.shape[1 - in_dim]


def _check_output_size(in_hw, weight, transposed, stride, padding, output_padding):
    """The (OH, OW) of the convolution of an ``in_hw`` input, which must be at least 1x1."""
    kernel = tuple(weight.shape[2:])
    out_hw = output_size(in_hw, kernel, stride, padding, transposed, output_padding)
    if min(out_hw) < 1:
        what = "large" if transposed else "small"
        raise ValueError(f"the output would be {out_hw[0]}x{out_hw[1]}: padding {padding} is too "
                         f"{what} for input {tuple(in_hw)}, kernel {tuple(kernel)}")
    return out_hw


def _check_batch_norm(x, c_out, out_hw, bn_weight, bn_bias, running_mean, running_var, training,
                      momentum, eps):
    """Validate BN's arguments; returns whether there is a BN (bn_weight and bn_bias given)."""
    if (bn_weight is None) != (bn_bias is None):
        missing, given = ("bn_weight", "bn_bias") if bn_weight is None else ("bn_bias", "bn_weight")
        raise TypeError(f"{missing} must be a tensor of shape ({c_out},) when {given} is (both, or "
                        "neither for a layer without BatchNorm), got None")
    if not isinstance(training, bool):
        raise TypeError(f"training must be a bool, got {type(training).__name__}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be tensors or both be None")
    if bn_weight is None:
        if running_mean is not None:
            raise ValueError("running_mean and running_var must be None without BatchNorm "
                             "(bn_weight=None and bn_bias=None)")
        return False
    _check_channel_vector(bn_weight, "bn_weight", c_out, x, optional=False)
    _check_channel_vector(bn_bias, "bn_bias", c_out, x, optional=False)
    _check_channel_vector(running_mean, "running_mean", c_out, x, optional=True)
    _check_channel_vector(running_var, "running_var", c_out, x, optional=True)
    if training and x.shape[0] * out_hw[0] * out_hw[1] == 1:
        raise ValueError("Expected more than 1 value per channel when training, got output size "
                         f"{(x.shape[0], c_out, *out_hw)}")
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    if isinstance(momentum, torch.Tensor):
        if momentum.dim() != 0 or not momentum.is_floating_point() or momentum.device != x.device:
            raise ValueError(f"momentum as a tensor must be a 0-dim floating tensor on {x.device}, "
                             f"got shape {tuple(momentum.shape)}, {momentum.dtype} on "
                             f"{momentum.device}")
    elif not isinstance(momentum, (int, float)) or isinstance(momentum, bool):
        raise TypeError("momentum must be a float or a 0-dim tensor (for nn.BatchNorm2d's "
                        "momentum=None, pass 1 / num_batches_tracked as a tensor), got "
                        f"{momentum!r}")
    # as F.batch_norm: eps > 0 in training; eval may take 0 (the running variance is the divisor)
    if (not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps >= 0
            or (training and eps == 0)):
        raise ValueError(f"eps must be a float > 0 in training, >= 0 in eval, got {eps!r}")
    return True


def _check_activation(activation, negative_slope):
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")
    if (not isinstance(negative_slope, (int, float)) or isinstance(negative_slope, bool)
            or not 0 <= negative_slope < float("inf")):
        raise ValueError(f"negative_slope must be a finite float >= 0, got {negative_slope!r}")


def _check_conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, bias, transposed,
                       stride, padding, output_padding, activation, negative_slope, training,
                       momentum, eps):
    """Validate every argument once; return (stride, padding, output_padding) as (h, w) pairs and
    whether the layer has a BN."""
    c_out = _check_x_and_weight(x, weight, transposed)
    _check_channel_vector(bias, "bias", c_out, x, optional=True)
    stride = _int_pair(stride, "stride", 1)
    padding = _int_pair(padding, "padding", 0)
    output_padding = _int_pair(output_padding, "output_padding", 0)
    if any(op >= s for op, s in zip(output_padding, stride)) \
            or (not transposed and any(output_padding)):
        limit = f"smaller than stride {stride}" if transposed else "0 for a Conv2d"
        raise ValueError(f"output_padding must be {limit}, got {output_padding}")
    out_hw = _check_output_size(x.shape[2:], weight, transposed, stride, padding, output_padding)
    has_bn = _check_batch_norm(x, c_out, out_hw, bn_weight, bn_bias, running_mean, running_var,
                               training, momentum, eps)
    _check_activation(activation, negative_slope)
    return stride, padding, output_padding, has_bn


def conv_bn_act(x, weight, bn_weight=None, bn_bias=None, running_mean=None, running_var=None, *,
                transposed, bias=None, stride=1, padding=0, output_padding=0, activation="relu",
                negative_slope=0.01, training=True, momentum=0.1, eps=1e-5, impl="auto"):
    """``act(batch_norm(conv(x, weight, bias, stride, padding), running_mean, running_var,
    bn_weight, bn_bias, training, momentum, eps))`` as one fused op, where conv is
    ``conv_transpose2d`` (with ``output_padding``) when ``transposed`` else ``conv2d``.

    - ``weight``: the module's own layout, (C_in, C_out, kH, kW) for nn.ConvTranspose2d, (C_out,
      C_in, kH, kW) for nn.Conv2d (groups=1, dilation=1, zero padding); ``bias``: optional (C_out,).
    - ``bn_weight=None, bn_bias=None`` (and no running stats): no BatchNorm, ``act(conv(x) +
      bias)``.
    - ``activation``: "relu", "leaky_relu" (``negative_slope`` >= 0) or None; NaN propagates.
    - ``training=True`` normalises with the batch statistics (biased variance) and, when the running
      stats are tensors, updates them in place with the unbiased variance M/(M-1), M = N*OH*OW. In
      training BN cancels a conv bias from the output, not from running_mean. ``running_mean`` /
      ``running_var`` may be None in training; they are required in eval.
    - ``momentum``: the exponential-average factor, a float or a 0-dim tensor on x's device. For
      nn.BatchNorm2d's ``momentum=None`` (cumulative average) increment ``num_batches_tracked`` and
      pass the tensor ``1.0 / num_batches_tracked``: read on the device, so there is no host sync.
    - ``training=False`` folds the running statistics into one per-channel scale and shift.
    - ``impl``: "auto" | "triton" | "ref" (see module docstring). The Triton path takes float32 and
      float16 (bfloat16 off the CPU, whose interpreter lacks it), with float32 statistics and
      accumulation. It reads x in any layout whose channels are contiguous (channels_last) as it is,
      and copies any other (e.g. contiguous NCHW) once; it returns channels_last tensors, as the
      reference does for channels_last x. Float32 products use tf32 on CUDA exactly when
      ``torch.backends.cudnn.allow_tf32`` is set, as PyTorch's own convolutions do.
    - Under ``torch.autocast`` it does what autocast does for the convolution followed by
      batch_norm: x, weight and bias in autocast's dtype (a float16/bfloat16 output), BN's
      parameters and running statistics as they are (float32), statistics and accumulation in
      float32.
    Gradients flow to x, weight, bias, bn_weight and bn_bias, twice too (``create_graph=True``).
    """
    autocast = _autocast_dtype(x.device) if isinstance(x, torch.Tensor) else None
    if autocast is not None:
        x, weight, bias = _cast_for_autocast(autocast, x, weight, bias)
    stride, padding, output_padding, has_bn = _check_conv_bn_act(
        x, weight, bn_weight, bn_bias, running_mean, running_var, bias, transposed, stride, padding,
        output_padding, activation, negative_slope, training, momentum, eps)
    spec = LayerSpec(transposed, stride, padding, output_padding, has_bn, float(eps),
                     momentum if isinstance(momentum, (int, float)) else 0.0, activation,
                     float(negative_slope), training)
    bn_state = (running_mean, running_var, None,
                momentum if isinstance(momentum, torch.Tensor) else None)
    return run_chain(x, [spec], [weight], bias, [(bn_weight, bn_bias) if has_bn else None],
                     [bn_state if has_bn else None], impl)


def run_chain(x, specs, weights, bias, bn_params, bn_states, impl):
    """Validated convolution layers (kernels.layers.LayerSpec each; ``bias``: the last one's;
    ``bn_states``: per BN layer (running_mean, running_var, num_batches_tracked, momentum tensor),
    each may be None) on the implementation ``impl`` resolves to: the reference, or our operator.
    The interpreter's tl.dot has no bfloat16 (numpy lacks it): no bfloat16 convolutions on the CPU.
    An empty batch is PyTorch's own business: an empty output, running stats untouched."""
    dtypes = (torch.float32, torch.float16) + ((torch.bfloat16,) if x.device.type != "cpu" else ())
    if resolve_impl(impl, x.device, x.dtype, dtypes) == "ref" or x.shape[0] == 0:
        return reference.conv_chain(x, specs, weights, bn_params, bn_states, bias=bias)
    # ctx.needs_input_grad ignores torch.no_grad(), so whether backward can happen is decided here
    params = [*weights, bias, *(t for pair in bn_params if pair is not None for t in pair)]
    keep = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, *params))
    return ops.conv_chain_trainable(x, specs, weights, bias, bn_params, bn_states, keep)


def conv_transpose_bn_relu(x, weight, bn_weight, bn_bias, running_mean, running_var, *, bias=None,
                           stride=1, padding=0, output_padding=0, training=True, momentum=0.1,
                           eps=1e-5, impl="auto"):
    """``relu(batch_norm(conv_transpose2d(x, ...)))``: :func:`conv_bn_act` with
    ``transposed=True, activation="relu"`` and a BatchNorm (bn_weight and bn_bias required)."""
    for value, name in ((bn_weight, "bn_weight"), (bn_bias, "bn_bias")):
        if not isinstance(value, torch.Tensor):
            raise TypeError(f"{name} must be a tensor of shape (C_out,), got "
                            f"{type(value).__name__}")
    return conv_bn_act(x, weight, bn_weight, bn_bias, running_mean, running_var, transposed=True,
                       bias=bias, stride=stride, padding=padding, output_padding=output_padding,
                       activation="relu", training=training, momentum=momentum, eps=eps, impl=impl)


# --- sigmoid + binary cross-entropy -------------------------------------------------------------


BCE_REDUCTIONS = ("none", "mean", "sum")
_BCE_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _check_broadcast_operand(value, name, input, input_name):
    """``value`` (weight or pos_weight) must be None or a floating or integer tensor (as in PyTorch)
    on input's device whose shape broadcasts to input's. Not broadcasting raises RuntimeError, as
    PyTorch does."""
    if value is None:
        return
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a tensor or None, got {type(value).__name__}")
    if value.is_complex() or value.dtype == torch.bool:
        raise TypeError(f"{name} must be a floating-point or integer tensor, got {value.dtype}")
    if value.device != input.device:
        raise ValueError(f"{name} must be on {input.device} like {input_name}, got {value.device}")
    try:
        broadcasts = torch.broadcast_shapes(value.shape, input.shape) == input.shape
    except RuntimeError:
        broadcasts = False
    if not broadcasts:
        raise RuntimeError(f"{name} of shape {tuple(value.shape)} must broadcast to {input_name}'s "
                           f"shape {tuple(input.shape)}")


def _check_bce(input, input_name, target, weight, pos_weight, reduction):
    """Validate the arguments of both BCE ops once, with PyTorch's exception types; returns the
    reduction, with PyTorch's deprecated alias "elementwise_mean" turned into "mean"."""
    if not isinstance(input, torch.Tensor):
        raise TypeError(f"{input_name} must be a tensor, got {type(input).__name__}")
    if input.dtype not in _BCE_DTYPES:
        raise TypeError(f"{input_name} must be float32, float16, bfloat16 or float64, got "
                        f"{input.dtype}")
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a tensor of {input_name}'s shape {tuple(input.shape)}, "
                        f"got {type(target).__name__} (for a constant target pass e.g. "
                        f"{input_name}.new_ones(()).expand_as({input_name}): read without a copy)")
    if target.shape != input.shape:
        raise ValueError(f"target size {tuple(target.shape)} must be the same as {input_name} size "
                         f"{tuple(input.shape)}")
    if not target.is_floating_point():
        raise TypeError(f"target must be a floating-point tensor, got {target.dtype}")
    if target.device != input.device:
        raise ValueError(f"target must be on {input.device} like {input_name}, got {target.device}")
    _check_broadcast_operand(weight, "weight", input, input_name)
    _check_broadcast_operand(pos_weight, "pos_weight", input, input_name)
    if reduction == "elementwise_mean":
        warnings.warn("reduction='elementwise_mean' is deprecated, please use reduction='mean' "
                      "instead.", stacklevel=3)
        return "mean"
    if reduction not in BCE_REDUCTIONS:
        raise ValueError(f"reduction must be one of {BCE_REDUCTIONS}, got {reduction!r}")
    return reduction


def _as_floating(value, dtype):
    """An integer weight or pos_weight (PyTorch takes them) as ``dtype``; others as they are."""
    return value if value is None or value.is_floating_point() else value.to(dtype)


def _weights_needing_grad(weight, pos_weight):
    """What the kernels cannot do for this call ("" if nothing): they differentiate input and
    target only, so a weight that needs a gradient must not reach them (it would get none)."""
    names = [name for value, name in ((weight, "weight"), (pos_weight, "pos_weight"))
             if value is not None and value.requires_grad]
    if not (names and torch.is_grad_enabled()):
        return ""
    return (f"the kernels do not differentiate with respect to {' and '.join(names)}, which "
            "requires grad (detach it; PyTorch's own op does not differentiate it either)")


def _check_unit_interval(value, name):
    """PyTorch's CPU check (RuntimeError; NaN fails it too). ``torch._assert_async`` raises at once
    on CPU and stays traceable by torch.compile. Only CPU tensors are checked: on CUDA a check needs
    a host sync or a device-side assert that kills the context, so there the kernel returns NaN."""
    torch._assert_async(((value >= 0) & (value <= 1)).all(),
                        f"all elements of {name} should be between 0 and 1")


def bce_with_logits(logits, target, *, weight=None, pos_weight=None, reduction="mean", impl="auto"):
    """``F.binary_cross_entropy_with_logits`` fused: one launch (two when logits has more than 1024
    elements: per-program partials, then a fixed-order sum), deterministic, stable for |logits| up
    to 1e4 and beyond.

    - ``target``: a floating tensor of logits' shape (hard or soft labels; broadcast views such as
      ``torch.ones(()).expand_as(logits)`` are read without a copy). The loss has target's dtype,
      as in PyTorch; it is computed in the wider of logits' and target's dtypes.
    - ``weight``, ``pos_weight``: optional, broadcast to logits' shape as in PyTorch.
    - ``reduction``: "none" | "mean" | "sum". ``impl``: "auto" | "triton" | "ref".
    Gradients flow to logits and target, twice too (``create_graph=True``). A weight or pos_weight
    that needs a gradient runs the reference ("auto") or raises (impl="triton").
    Under ``torch.autocast`` the loss is computed and returned in float32, as autocast does for
    F.binary_cross_entropy_with_logits.
    """
    if isinstance(logits, torch.Tensor) and _autocast_dtype(logits.device) is not None:
        logits, target, weight, pos_weight = _cast_for_autocast(torch.float32, logits, target,
                                                                weight, pos_weight)
    reduction = _check_bce(logits, "logits", target, weight, pos_weight, reduction)
    dtype = torch.promote_types(logits.dtype, target.dtype)
    weight, pos_weight = _as_floating(weight, dtype), _as_floating(pos_weight, dtype)
    if resolve_impl(impl, logits.device, dtype, _BCE_DTYPES,
                    _weights_needing_grad(weight, pos_weight)) == "ref":
        return reference.bce_with_logits(logits, target, weight=weight, pos_weight=pos_weight,
                                         reduction=reduction)
    loss = ops.bce_with_logits(logits.to(dtype), target.to(dtype), weight, pos_weight, reduction)
    return loss.to(target.dtype)  # PyTorch's loss is built from (1 - target) in place


def binary_cross_entropy(probs, target, *, weight=None, reduction="mean", impl="auto"):
    """``F.binary_cross_entropy`` (each log clamped at -100) fused like :func:`bce_with_logits`.

    Probabilities or targets outside [0, 1] (or NaN) raise RuntimeError on CPU, as in PyTorch. On
    CUDA the Triton path gives a NaN loss instead (a check would synchronise with the host, or kill
    the CUDA context as PyTorch's device-side assert, which impl="ref" keeps, does).
    Arguments as in :func:`bce_with_logits`, without ``pos_weight``.
    Under ``torch.autocast`` the loss is computed and returned in float32, as CPU autocast does
    (CUDA autocast refuses F.binary_cross_entropy, because probabilities from a half-precision
    sigmoid may have saturated; prefer :func:`bce_with_logits`).
    """
    autocast = isinstance(probs, torch.Tensor) and _autocast_dtype(probs.device) is not None
    if autocast:
        probs, target, weight = _cast_for_autocast(torch.float32, probs, target, weight)
    reduction = _check_bce(probs, "probs", target, weight, None, reduction)
    if probs.device.type == "cpu":
        _check_unit_interval(probs, "probs")
        _check_unit_interval(target, "target")
    weight = _as_floating(weight, probs.dtype)
    if resolve_impl(impl, probs.device, probs.dtype, _BCE_DTYPES,
                    _weights_needing_grad(weight, None)) == "ref":
        # the inputs are float32 already; CUDA's autocast would refuse F.binary_cross_entropy
        autocast_off = (torch.autocast(probs.device.type, enabled=False) if autocast
                        else contextlib.nullcontext())
        with autocast_off:
            return reference.binary_cross_entropy(probs, target, weight=weight, reduction=reduction)
    return ops.binary_cross_entropy(probs, target, weight, reduction)
