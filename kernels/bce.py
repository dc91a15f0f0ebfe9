"""Fused sigmoid + binary cross-entropy: Triton kernels and their launchers.

One kernel computes the loss of both ``binary_cross_entropy_with_logits`` (``FROM_LOGITS``) and
``binary_cross_entropy`` (probabilities) and, for "mean"/"sum", reduces it without float atomics:
each program sums its tiles into one partial, and a one-program finish adds the partials in a fixed
order, so the result is bitwise reproducible. When one program covers the whole input (a GAN
discriminator's batch of logits) it writes the final value itself: one launch per loss.
The backward is one elementwise launch recomputed from the saved input.

Operands that broadcast (weight, pos_weight, an expanded target, the incoming gradient) are read in
place as ``ptr[(i // inner) % span]`` where i is the flat index into the input, so a per-channel
weight or an expanded scalar costs no copy.
"""
import math

import torch
import triton
import triton.language as tl

BLOCK = 1024
# Fixed, not derived from the GPU, so the order of the reduction (hence the bits) is the same on
# every device. Programs loop over tiles when the input has more than MAX_PROGRAMS * BLOCK elements.
MAX_PROGRAMS = 1024
# PyTorch's binary_cross_entropy: log terms clamped at -100, gradient denominator at least 1e-12.
LOG_CLAMP = tl.constexpr(-100.0)
GRAD_EPS = tl.constexpr(1e-12)
# What lanes past the end load as the input: a probability (and a logit) at which no log or division
# is singular, so that the lanes whose results are discarded raise no floating-point warning.
UNUSED_LANE_INPUT = tl.constexpr(0.5)


@triton.jit
def _log1p(e):
    """log(1 + e) accurate for tiny |e| (Goldberg's trick), as tl has no log1p on every version."""
    u = 1.0 + e
    d = u - 1.0
    return tl.where(d == 0.0, e, tl.log(u) * (e / tl.where(d == 0.0, 1.0, d)))


@triton.jit
def _load_periodic(ptr, offs, inner, span, mask, COMPUTE: tl.constexpr):
    return tl.load(ptr + (offs // inner) % span, mask=mask, other=0.0).to(COMPUTE)


@triton.jit
def _clamp_log(v):
    # tl.where, not tl.maximum: a NaN must stay NaN.
    return tl.where(v < LOG_CLAMP, LOG_CLAMP, v)


@triton.jit
def _loss(x, t, pw, FROM_LOGITS: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr):
    """Elementwise loss before weighting. With logits it is PyTorch's
    (1-t)*x + (1+(pw-1)*t)*softplus(-x), rearranged so that no large terms cancel for |x| >> 1:
    x >= 0: (1-t)*x + c*log1p(e);  x < 0: pw*t*|x| + c*log1p(e);  e = exp(-|x|), c = 1-t+pw*t."""
    if FROM_LOGITS:
        sp = _log1p(tl.exp(-tl.abs(x)))
        if HAS_POS_WEIGHT:
            loss = tl.where(x >= 0, (1.0 - t) * x, -(pw * t) * x) + ((1.0 - t) + pw * t) * sp
        else:
            loss = tl.where(x >= 0, (1.0 - t) * x, -t * x) + sp
    else:
        loss = -(t * _clamp_log(tl.log(x)) + (1.0 - t) * _clamp_log(_log1p(-x)))
        # On CUDA nothing checks the range on the host (that would sync): a target outside [0, 1]
        # gives NaN, as does a probability outside it (through the logs). The NaN is a literal: a
        # global tl.constexpr(nan) never equals itself, and Triton (3.6 too) compares every global
        # a kernel used with its compile-time value at each launch.
        loss = tl.where((t >= 0.0) & (t <= 1.0), loss, float("nan"))
    return loss


@triton.jit
def _bce_fwd_kernel(
    x_ptr, t_ptr, t_inner, t_span, w_ptr, w_inner, w_span, pw_ptr, pw_inner, pw_span,
    out_ptr, n, denom,
    FROM_LOGITS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr,
    REDUCE: tl.constexpr, FINISH_HERE: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    acc = tl.zeros([BLOCK], dtype=COMPUTE)
    for tile in range(pid, tl.cdiv(n, BLOCK), tl.num_programs(0)):
        # tile * BLOCK < n fits in int32; the lanes are int64 so that offs does not overflow.
        offs = tl.arange(0, BLOCK).to(tl.int64) + tile * BLOCK
        mask = offs < n
        x = tl.load(x_ptr + offs, mask=mask, other=UNUSED_LANE_INPUT).to(COMPUTE)
        t = _load_periodic(t_ptr, offs, t_inner, t_span, mask, COMPUTE)
        pw = 1.0
        if HAS_POS_WEIGHT:
            pw = _load_periodic(pw_ptr, offs, pw_inner, pw_span, mask, COMPUTE)
        loss = _loss(x, t, pw, FROM_LOGITS, HAS_POS_WEIGHT)
        if HAS_WEIGHT:
            loss = loss * _load_periodic(w_ptr, offs, w_inner, w_span, mask, COMPUTE)
        if REDUCE:
            acc += tl.where(mask, loss, 0.0)
        else:
            tl.store(out_ptr + offs, loss.to(out_ptr.dtype.element_ty), mask=mask)
    if REDUCE:
        total = tl.sum(acc, axis=0)
        if FINISH_HERE:
            tl.store(out_ptr, (total / denom).to(out_ptr.dtype.element_ty))
        else:
            tl.store(out_ptr + pid, total)


@triton.jit
def _sum_partials_kernel(partials_ptr, n_partials, out_ptr, denom, BLOCK: tl.constexpr):
    """One program: add the per-program partials in a fixed order, divide, cast."""
    acc = tl.zeros([BLOCK], dtype=partials_ptr.dtype.element_ty)
    for start in range(0, n_partials, BLOCK):
        offs = start + tl.arange(0, BLOCK)
        acc += tl.load(partials_ptr + offs, mask=offs < n_partials, other=0.0)
    tl.store(out_ptr, (tl.sum(acc, axis=0) / denom).to(out_ptr.dtype.element_ty))


@triton.jit
def _bce_bwd_kernel(
    x_ptr, t_ptr, t_inner, t_span, w_ptr, w_inner, w_span, pw_ptr, pw_inner, pw_span,
    g_ptr, g_inner, g_span, denom, dx_ptr, dt_ptr, n,
    FROM_LOGITS: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_POS_WEIGHT: tl.constexpr,
    NEED_DX: tl.constexpr, NEED_DT: tl.constexpr, COMPUTE: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.arange(0, BLOCK).to(tl.int64) + tl.program_id(0) * BLOCK
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=UNUSED_LANE_INPUT).to(COMPUTE)
    t = _load_periodic(t_ptr, offs, t_inner, t_span, mask, COMPUTE)
    # "mean" divides the incoming gradient by n here, exactly as the forward divided the sum.
    g = _load_periodic(g_ptr, offs, g_inner, g_span, mask, COMPUTE) / denom
    if HAS_WEIGHT:
        g = g * _load_periodic(w_ptr, offs, w_inner, w_span, mask, COMPUTE)
    pw = 1.0
    if HAS_POS_WEIGHT:
        pw = _load_periodic(pw_ptr, offs, pw_inner, pw_span, mask, COMPUTE)
    if FROM_LOGITS:
        e = tl.exp(-tl.abs(x))
        sig = tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))
        if HAS_POS_WEIGHT:
            dx = ((1.0 - t) + pw * t) * sig - pw * t
            dt = -x + (pw - 1.0) * (_log1p(e) + tl.where(x < 0, -x, 0.0))
        else:
            dx = sig - t
            dt = -x
    else:
        den = x * (1.0 - x)
        dx = (x - t) / tl.where(den < GRAD_EPS, GRAD_EPS, den)
        # PyTorch's target gradient does not clamp the logs.
        dt = _log1p(-x) - tl.log(x)
    if NEED_DX:
        tl.store(dx_ptr + offs, (g * dx).to(dx_ptr.dtype.element_ty), mask=mask)
    if NEED_DT:
        tl.store(dt_ptr + offs, (g * dt).to(dt_ptr.dtype.element_ty), mask=mask)


def _periodic(operand, shape):
    """(tensor, inner, span) such that element i of a contiguous tensor of ``shape`` broadcast from
    ``operand`` sits at ``tensor.data_ptr()[(i // inner) % span]``. No copy when the varying
    dimensions of the broadcast view form one contiguous run (per-channel weights, expanded
    scalars, contiguous tensors); otherwise a contiguous copy."""
    view = operand.broadcast_to(shape)
    varying = [d for d in range(view.dim()) if view.shape[d] > 1 and view.stride(d) != 0]
    if not varying:
        return view, 1, 1
    first, last = varying[0], varying[-1] + 1
    span = 1
    for d in reversed(range(first, last)):
        if view.shape[d] > 1:
            if view.stride(d) != span:
                view = view.contiguous()
                return view, 1, view.numel()
            span *= view.shape[d]
    return view, math.prod(shape[last:]), span


def _operand_args(operand, shape, placeholder):
    """Kernel arguments (pointer, inner, span) of an optional broadcast operand."""
    if operand is None:
        return placeholder, 1, 1
    return _periodic(operand, shape)


def _compute_dtype(dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def bce_forward(x, target, weight, pos_weight, reduction, from_logits):
    """Loss of ``x`` (logits if ``from_logits`` else probabilities) against ``target``; a 0-dim
    tensor for "mean"/"sum", else x's shape. Arguments are assumed validated; dtype is x's."""
    x = x.contiguous()
    n = x.numel()
    reduce = reduction != "none"
    denom = n if reduction == "mean" else 1
    if n == 0:
        return torch.full((), math.nan if reduction == "mean" else 0.0, dtype=x.dtype,
                          device=x.device) if reduce else torch.empty_like(x)
    compute = _compute_dtype(x.dtype)
    operands = [a for op in (target, weight, pos_weight) for a in _operand_args(op, x.shape, x)]
    n_programs = min(triton.cdiv(n, BLOCK), MAX_PROGRAMS)
    finish_here = n_programs == 1
    out = torch.empty((), dtype=x.dtype, device=x.device) if reduce else torch.empty_like(x)
    partials = out
    if reduce and not finish_here:
        partials = torch.empty(n_programs, dtype=torch.float64 if compute == tl.float64
                               else torch.float32, device=x.device)
    _bce_fwd_kernel[(n_programs if reduce else triton.cdiv(n, BLOCK),)](
        x, *operands, partials, n, denom,
        FROM_LOGITS=from_logits, HAS_WEIGHT=weight is not None,
        HAS_POS_WEIGHT=pos_weight is not None, REDUCE=reduce, FINISH_HERE=finish_here,
        COMPUTE=compute, BLOCK=BLOCK,
    )
    if reduce and not finish_here:
        _sum_partials_kernel[(1,)](partials, n_programs, out, denom,
                                   BLOCK=triton.next_power_of_2(MAX_PROGRAMS))
    return out


def bce_backward(grad, x, target, weight, pos_weight, reduction, from_logits, need_dx, need_dt):
    """Gradients (d x, d target) of :func:`bce_forward` given the gradient of its output; each is
    None unless asked for. One elementwise launch."""
    x = x.contiguous()
    n = x.numel()
    dx = torch.empty_like(x) if need_dx else None
    dt = torch.empty(x.shape, dtype=target.dtype, device=x.device) if need_dt else None
    if n == 0 or not (need_dx or need_dt):
        return dx, dt
    operands = [a for op in (target, weight, pos_weight, grad)
                for a in _operand_args(op, x.shape, x)]
    _bce_bwd_kernel[(triton.cdiv(n, BLOCK),)](
        x, *operands, n if reduction == "mean" else 1,
        dx if need_dx else x, dt if need_dt else x, n,
        FROM_LOGITS=from_logits, HAS_WEIGHT=weight is not None,
        HAS_POS_WEIGHT=pos_weight is not None, NEED_DX=need_dx, NEED_DT=need_dt,
        COMPUTE=_compute_dtype(x.dtype), BLOCK=BLOCK,
    )
    return dx, dt
