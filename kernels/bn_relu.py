"""BatchNorm2d (training statistics) + ReLU around a producer of the pre-BN tensor y:
statistics finalize, the normalise+ReLU apply, and the backward reductions and input gradient.

y is contiguous NCHW (its producer allocates it); grad_out may have any strides. Statistics and
reductions are float32 partials combined in a fixed order: no atomics, the same bits every run.
"""
import torch
import triton
import triton.language as tl

from ._config import pow2_block


@triton.jit
def relu_nan(z):
    """max(z, 0) that keeps NaN as torch.relu does (tl.maximum would drop it)."""
    return tl.where((z > 0) | (z != z), z, 0.0)


@triton.jit
def scale_shift(gamma, beta, mean, invstd):
    """BN as one affine map: z = y * scale + shift."""
    scale = gamma * invstd
    return scale, beta - mean * scale


@triton.jit
def _bn_finalize_kernel(part_ptr, T, C, gamma_ptr, beta_ptr, bias_ptr, rmean_ptr, rvar_ptr,
                        momentum_ptr, momentum, unbias, eps, mean_ptr, invstd_ptr, affine_ptr,
                        HAS_BIAS: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
                        MOMENTUM_FROM_PTR: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """Chan's parallel combine of the (count, mean, M2) partials, tiles in ascending order, BLOCK_T at
    a time (a block is combined about its own mean, then merged into the running total), then
    mean/invstd, the affine map and the running-stat update. Stays exact when |mean| >> std."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = (t < T)[:, None] & c_ok[None, :]
        offs = t.to(tl.int64)[:, None] * C + c[None, :]
        cnt = tl.load(part_ptr + offs, mask=ok, other=0.0)
        avg = tl.load(part_ptr + T * C + offs, mask=ok, other=0.0)
        dev2 = tl.load(part_ptr + 2 * T * C + offs, mask=ok, other=0.0)
        blk_cnt = tl.sum(cnt, axis=0)
        blk_mean = tl.sum(cnt * avg, axis=0) / tl.maximum(blk_cnt, 1.0)
        spread = avg - blk_mean[None, :]
        blk_m2 = tl.sum(dev2, axis=0) + tl.sum(cnt * spread * spread, axis=0)
        new_total = total + blk_cnt
        frac = blk_cnt / tl.maximum(new_total, 1.0)
        delta = blk_mean - mean
        mean = mean + delta * frac
        m2 = m2 + blk_m2 + delta * delta * total * frac
        total = new_total
    var = m2 / tl.maximum(total, 1.0)  # total >= 2 on real channels; masked lanes stay finite
    invstd = 1.0 / tl.sqrt(var + eps)
    gamma = tl.load(gamma_ptr + c, mask=c_ok, other=1.0).to(tl.float32)
    beta = tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    scale, shift = scale_shift(gamma, beta, mean, invstd)
    tl.store(mean_ptr + c, mean, mask=c_ok)
    tl.store(invstd_ptr + c, invstd, mask=c_ok)
    tl.store(affine_ptr + c, scale, mask=c_ok)
    tl.store(affine_ptr + C + c, shift, mask=c_ok)
    if UPDATE_RUNNING:
        if MOMENTUM_FROM_PTR:
            momentum = tl.load(momentum_ptr).to(tl.float32)
        batch_mean = mean
        if HAS_BIAS:
            batch_mean += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        rmean = tl.load(rmean_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        rvar = tl.load(rvar_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        tl.store(rmean_ptr + c, (1.0 - momentum) * rmean + momentum * batch_mean, mask=c_ok)
        tl.store(rvar_ptr + c, (1.0 - momentum) * rvar + momentum * (var * unbias), mask=c_ok)


@triton.jit
def _bn_relu_apply_kernel(y_ptr, affine_ptr, out_ptr, C, HW, BLOCK: tl.constexpr):
    """out = relu(y * scale + shift), one (n, c) plane per row of the grid."""
    plane = tl.program_id(0)
    c = plane % C
    hw = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = hw < HW
    offs = plane.to(tl.int64) * HW + hw
    y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    z = y * tl.load(affine_ptr + c) + tl.load(affine_ptr + C + c)
    tl.store(out_ptr + offs, relu_nan(z), mask=ok)


@triton.jit
def _relu_grad_and_xhat(g_ptr, y_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, plane, C, OW, HW,
                        sgn, sgc, sgh, sgw, BLOCK: tl.constexpr):
    """For BLOCK pixels of plane (n, c): dz = g * (z > 0) and xhat, recomputed from y exactly as the
    forward computed z (same scale and shift, same rounding), and this channel's scale."""
    n = plane // C
    c = plane % C
    hw = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    ok = hw < HW
    y = tl.load(y_ptr + plane.to(tl.int64) * HW + hw, mask=ok, other=0.0).to(tl.float32)
    g_offs = (n.to(tl.int64) * sgn + c.to(tl.int64) * sgc + (hw // OW).to(tl.int64) * sgh
              + (hw % OW).to(tl.int64) * sgw)
    g = tl.load(g_ptr + g_offs, mask=ok, other=0.0).to(tl.float32)
    mean = tl.load(mean_ptr + c)
    invstd = tl.load(invstd_ptr + c)
    scale, shift = scale_shift(tl.load(gamma_ptr + c).to(tl.float32),
                               tl.load(beta_ptr + c).to(tl.float32), mean, invstd)
    dz = tl.where(y * scale + shift > 0, g, 0.0)
    return dz, (y - mean) * invstd, scale, hw, ok


@triton.jit
def _bn_relu_grad_partials_kernel(g_ptr, y_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, part_ptr,
                                  C, OW, HW, NB, sgn, sgc, sgh, sgw, BLOCK: tl.constexpr):
    """Per (plane, pixel block): sum(dz) and sum(dz * xhat) into part[0|1, plane, block]."""
    plane = tl.program_id(0)
    dz, xhat, _, _, _ = _relu_grad_and_xhat(g_ptr, y_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr,
                                            plane, C, OW, HW, sgn, sgc, sgh, sgw, BLOCK)
    offs = plane.to(tl.int64) * NB + tl.program_id(1)
    tl.store(part_ptr + offs, tl.sum(dz, axis=0))
    tl.store(part_ptr + tl.num_programs(0).to(tl.int64) * NB + offs, tl.sum(dz * xhat, axis=0))


@triton.jit
def _bn_relu_grad_finish_kernel(part_ptr, N, C, NB, gamma_ptr, invstd_ptr, inv_count,
                                dgamma_ptr, dbeta_ptr, dbias_ptr, coef_ptr,
                                TRAINING: tl.constexpr, HAS_BIAS: tl.constexpr,
                                BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """dbeta = sum(dz), dgamma = sum(dz * xhat) over the partials, (n, block) in ascending order;
    dbias = sum(dy) (0 in training: BN removes any per-channel constant); and the coefficients of
    dy = scale * dz + coef0 + coef1 * xhat (both 0 in eval, where the statistics are constants)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    dbeta = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dgamma = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, N * NB, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = (t < N * NB)[:, None] & c_ok[None, :]
        offs = ((t // NB).to(tl.int64)[:, None] * C + c[None, :]) * NB + (t % NB)[:, None]
        dbeta += tl.sum(tl.load(part_ptr + offs, mask=ok, other=0.0), axis=0)
        dgamma += tl.sum(tl.load(part_ptr + N * C * NB + offs, mask=ok, other=0.0), axis=0)
    tl.store(dbeta_ptr + c, dbeta, mask=c_ok)
    tl.store(dgamma_ptr + c, dgamma, mask=c_ok)
    gamma = tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    scale = gamma * tl.load(invstd_ptr + c, mask=c_ok, other=0.0)
    if TRAINING:
        tl.store(coef_ptr + c, -scale * dbeta * inv_count, mask=c_ok)
        tl.store(coef_ptr + C + c, -scale * dgamma * inv_count, mask=c_ok)
        if HAS_BIAS:
            tl.store(dbias_ptr + c, tl.zeros((BLOCK_C,), dtype=tl.float32), mask=c_ok)
    elif HAS_BIAS:
        tl.store(dbias_ptr + c, scale * dbeta, mask=c_ok)


@triton.jit
def _bn_relu_grad_input_kernel(g_ptr, y_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, coef_ptr,
                               dy_ptr, C, OW, HW, sgn, sgc, sgh, sgw,
                               TRAINING: tl.constexpr, BLOCK: tl.constexpr):
    """dy = scale * (dz - (dbeta + xhat * dgamma) / M) in training, scale * dz in eval."""
    plane = tl.program_id(0)
    dz, xhat, scale, hw, ok = _relu_grad_and_xhat(g_ptr, y_ptr, mean_ptr, invstd_ptr, gamma_ptr,
                                                  beta_ptr, plane, C, OW, HW, sgn, sgc, sgh, sgw, BLOCK)
    dy = scale * dz
    if TRAINING:
        c = plane % C
        dy += tl.load(coef_ptr + c) + tl.load(coef_ptr + C + c) * xhat
    tl.store(dy_ptr + plane.to(tl.int64) * HW + hw, dy, mask=ok)


# Rows of partials a finalize or finish program loads per step (at most 64 channels wide): with 4
# warps, 128 and even 32 rows of the finalize's three float32 tiles spilled on sm_90 (GPU compile
# check: 240 registers + 12 B, and 80 + 12 B); 16 rows build in 56 registers without spills.
_PARTIAL_ROWS = 16


def _plane_block(hw: int) -> int:
    return pow2_block(hw, 16, 1024)


def _channel_block(c: int) -> int:
    return pow2_block(c, 16, 64)


def finalize_stats(partials, gamma, beta, bias, running_mean, running_var, momentum, eps, count):
    """Float32 mean and invstd (C,) and the affine map (2, C) = (scale, shift) from the partials a
    producer's epilogue wrote: float32 (3, T, C), per tile and channel the count, the mean and M2
    (sum of squared deviations from that mean) of its values; ``count`` values per channel in all.
    Updates the running stats in place when they are given (``bias`` is added to the batch mean
    there). ``momentum``: a float or a 0-dim tensor, read on the device."""
    _, tiles, c = partials.shape
    dev = partials.device
    mean = torch.empty(c, device=dev, dtype=torch.float32)
    invstd = torch.empty_like(mean)
    affine = torch.empty((2, c), device=dev, dtype=torch.float32)
    from_ptr = isinstance(momentum, torch.Tensor)
    block_c = _channel_block(c)
    _bn_finalize_kernel[(triton.cdiv(c, block_c),)](
        partials, tiles, c, gamma, beta, bias if bias is not None else mean,
        running_mean if running_mean is not None else mean,
        running_var if running_var is not None else mean,
        momentum if from_ptr else mean, 0.0 if from_ptr else float(momentum),
        count / (count - 1), eps, mean, invstd, affine,
        HAS_BIAS=bias is not None, UPDATE_RUNNING=running_mean is not None,
        MOMENTUM_FROM_PTR=from_ptr, BLOCK_T=_PARTIAL_ROWS, BLOCK_C=block_c)
    return mean, invstd, affine


def apply_relu(y, affine):
    """relu(y * scale + shift) for contiguous NCHW y; a new tensor in y's dtype."""
    n, c, h, w = y.shape
    out = torch.empty_like(y)
    block = _plane_block(h * w)
    _bn_relu_apply_kernel[(n * c, triton.cdiv(h * w, block))](y, affine, out, c, h * w, BLOCK=block)
    return out


def backward(grad_out, y, mean, invstd, gamma, beta, training, has_bias, need_dy, need_params):
    """Gradients of relu(bn(y)) given grad_out: (dy, dgamma, dbeta, dbias), dy in y's dtype or None
    unless ``need_dy``; the rest float32 (C,), or None unless ``need_params`` (dbias: unless
    ``has_bias`` too). ``mean``/``invstd``: the statistics the forward normalised with."""
    n, c, h, w = y.shape
    dev = y.device
    block = _plane_block(h * w)
    blocks = triton.cdiv(h * w, block)
    plane_args = (c, w, h * w)
    sums = torch.empty((5, c), device=dev, dtype=torch.float32)  # dgamma, dbeta, dbias, coef0, coef1
    if need_params or (need_dy and training):
        partials = torch.empty((2, n, c, blocks), device=dev, dtype=torch.float32)
        _bn_relu_grad_partials_kernel[(n * c, blocks)](
            grad_out, y, mean, invstd, gamma, beta, partials, *plane_args, blocks, *grad_out.stride(),
            BLOCK=block)
        block_c = _channel_block(c)
        _bn_relu_grad_finish_kernel[(triton.cdiv(c, block_c),)](
            partials, n, c, blocks, gamma, invstd, 1.0 / (n * h * w), sums[0], sums[1], sums[2],
            sums[3:], TRAINING=training, HAS_BIAS=has_bias, BLOCK_T=_PARTIAL_ROWS,
            BLOCK_C=block_c)
    dy = None
    if need_dy:
        dy = torch.empty_like(y)
        _bn_relu_grad_input_kernel[(n * c, blocks)](
            grad_out, y, mean, invstd, gamma, beta, sums[3:], dy, *plane_args, *grad_out.stride(),
            TRAINING=training, BLOCK=block)
    if not need_params:
        return dy, None, None, None
    return dy, sums[0], sums[1], sums[2] if has_bias else None
