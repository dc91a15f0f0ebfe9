"""Fused ConvTranspose2d + BatchNorm2d + ReLU: the transposed convolution as an implicit GEMM with a
statistics (training) or affine+ReLU (eval) epilogue, and the launchers of the whole op.

Training forward, 3 launches: conv-transpose (writes y and per-(tile, channel) statistics partials),
finalize (Chan's combine, running-stat update), apply (relu(y*scale+shift)). Eval forward: 1 launch.
Backward: BN+ReLU reductions, finish, dy, then dx = conv2d(dy, W) and dW = sum x (x) dy, split-K.
Only the GEMM kernels are autotuned, and they only overwrite fresh buffers, so the repeated runs of
tuning are harmless; the running-stat update lives in the untuned finalize, applied exactly once.
"""
import torch
import triton
import triton.language as tl

from . import bn_relu
from ._config import dot_precision, gemm_tuning, pow2_block
from .bn_relu import relu_nan, scale_shift
from .conv2d import conv2d, conv2d_weight_grad

# BLOCK_M is set by the launcher, not tuned: the statistics partials have one row per row tile.
# (BLOCK_N, BLOCK_K, num_warps, num_stages), spill-free where used (see gemm_tuning); with
# BLOCK_M = 128, 4-warp or 32-wide-K tiles spilled up to 4.6 KB, and BLOCK_N = 64 in eval (16 B).
_TUNING = gemm_tuning(("BLOCK_N", "BLOCK_K"), tensor_cores=[(32, 16, 8, 2), (32, 16, 8, 3)],
                      exact=[(32, 16, 8, 2)], interpreter_blocks=(32, 32))


@triton.autotune(key=["N", "C_in", "H", "W", "C_out", "OH", "OW", "BLOCK_M", "DOT_PRECISION"],
                 **_TUNING)
@triton.jit
def _conv_transpose_kernel(x_ptr, w_ptr, y_ptr, out_ptr, part_ptr,
                           bias_ptr, gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, mean_ptr, invstd_ptr,
                           N, C_in, H, W, C_out, OH, OW, PAD_H, PAD_W, TILES, eps,
                           sxn, sxc, sxh, sxw, swi, swo, swh, sww,
                           KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                           TRAINING: tl.constexpr, WRITE_Y: tl.constexpr, HAS_BIAS: tl.constexpr,
                           DOT_PRECISION: tl.constexpr,
                           BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """y[n, co, oh, ow] = sum x[n, ci, ih, iw] * w[ci, co, kh, kw] over oh = ih*SH - PAD_H + kh.

    Phase decomposition: program row pid_m serves one output phase (ph, pw) = ((oh+PAD_H) % SH,
    (ow+PAD_W) % SW). Writing oh + PAD_H = qh*SH + ph, the contributing taps are kh = ph + jh*SH with
    ih = qh - jh, so the loops visit only those taps, never a masked-out zero.
    Training epilogue: y (contiguous NCHW) and this tile's (count, mean, M2) per channel into
    part[:, pid_m, :]. Eval epilogue: relu(y*scale+shift) from the running stats; with WRITE_Y also
    y and the (mean, invstd) that backward needs."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    phase = pid_m // TILES
    ph = phase // SW
    pw = phase % SW
    qh0 = (PAD_H - ph + SH - 1) // SH  # first qh with oh >= 0
    qw0 = (PAD_W - pw + SW - 1) // SW
    rows_h = (OH + PAD_H - ph + SH - 1) // SH - qh0  # output rows of this phase (may be 0)
    rows_w = (OW + PAD_W - pw + SW - 1) // SW - qw0
    rows = (pid_m % TILES) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N * rows_h * rows_w
    rows_h = tl.maximum(rows_h, 1)  # no division by zero when the phase is empty
    rows_w = tl.maximum(rows_w, 1)
    qw = qw0 + rows % rows_w
    qh = qh0 + (rows // rows_w) % rows_h
    n = (rows // (rows_w * rows_h)).to(tl.int64)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < C_out
    w_cols = w_ptr + co.to(tl.int64) * swo
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for jh in range(0, (KH - ph + SH - 1) // SH):
        ih = qh - jh
        for jw in range(0, (KW - pw + SW - 1) // SW):
            iw = qw - jw
            ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_rows = x_ptr + n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            w_tap = w_cols + (ph + jh * SH) * swh + (pw + jw * SW) * sww
            for k0 in range(0, C_in, BLOCK_K):
                ci = k0 + ks
                ci_ok = ci < C_in
                a = tl.load(x_rows[:, None] + ci.to(tl.int64)[None, :] * sxc,
                            mask=ok[:, None] & ci_ok[None, :], other=0.0)
                b = tl.load(w_tap[None, :] + ci.to(tl.int64)[:, None] * swi,
                            mask=ci_ok[:, None] & co_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    oh = qh * SH + ph - PAD_H
    ow = qw * SW + pw - PAD_W
    ok2 = row_ok[:, None] & co_ok[None, :]
    y_offs = ((n * C_out)[:, None] + co[None, :]) * (OH * OW) + (oh * OW + ow).to(tl.int64)[:, None]
    y = acc.to(y_ptr.dtype.element_ty).to(tl.float32)  # statistics of the values stored and reread
    if TRAINING:
        tl.store(y_ptr + y_offs, y, mask=ok2)
        count = tl.sum(row_ok.to(tl.float32), axis=0)
        tile_mean = tl.sum(tl.where(ok2, y, 0.0), axis=0) / tl.maximum(count, 1.0)
        dev = tl.where(ok2, y - tile_mean[None, :], 0.0)
        p_offs = pid_m.to(tl.int64) * C_out + co
        stride = tl.num_programs(0).to(tl.int64) * C_out
        tl.store(part_ptr + p_offs, tl.zeros((BLOCK_N,), dtype=tl.float32) + count, mask=co_ok)
        tl.store(part_ptr + stride + p_offs, tile_mean, mask=co_ok)
        tl.store(part_ptr + 2 * stride + p_offs, tl.sum(dev * dev, axis=0), mask=co_ok)
    else:
        invstd = 1.0 / tl.sqrt(tl.load(rvar_ptr + co, mask=co_ok, other=1.0).to(tl.float32) + eps)
        mean = tl.load(rmean_ptr + co, mask=co_ok, other=0.0).to(tl.float32)
        if HAS_BIAS:  # y excludes the conv bias: fold it into the mean
            mean -= tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)
        scale, shift = scale_shift(tl.load(gamma_ptr + co, mask=co_ok, other=0.0).to(tl.float32),
                                   tl.load(beta_ptr + co, mask=co_ok, other=0.0).to(tl.float32),
                                   mean, invstd)
        tl.store(out_ptr + y_offs, relu_nan(y * scale[None, :] + shift[None, :]), mask=ok2)
        if WRITE_Y:
            tl.store(y_ptr + y_offs, y, mask=ok2)
            if pid_m == 0:
                tl.store(mean_ptr + co, mean, mask=co_ok)
                tl.store(invstd_ptr + co, invstd, mask=co_ok)


def _launch_conv_transpose(x, weight, stride, padding, *, training, y, out, partials, bias=None,
                           bn=(None,) * 4, stats=(None, None), eps=0.0):
    """One launch of the conv-transpose kernel into y / out / partials (unused ones None); the
    output size is theirs."""
    n, c_in, h, w = x.shape
    _, c_out, kh, kw = weight.shape
    (sh, sw), (pad_h, pad_w) = stride, padding
    oh, ow = y.shape[2:] if y is not None else out.shape[2:]
    block_m, tiles = _row_tiling(n, oh, ow, stride)
    any_buf = y if y is not None else out
    fill = lambda t: t if t is not None else any_buf  # noqa: E731 (placeholders for unused pointers)
    grid = lambda meta: (sh * sw * tiles, triton.cdiv(c_out, meta["BLOCK_N"]))  # noqa: E731
    _conv_transpose_kernel[grid](
        x, weight, fill(y), fill(out), fill(partials), fill(bias), *map(fill, bn), *map(fill, stats),
        n, c_in, h, w, c_out, oh, ow, pad_h, pad_w, tiles, eps, *x.stride(), *weight.stride(),
        KH=kh, KW=kw, SH=sh, SW=sw, TRAINING=training, WRITE_Y=y is not None and not training,
        HAS_BIAS=bias is not None, DOT_PRECISION=dot_precision(x.dtype, x.device), BLOCK_M=block_m)


def _row_tiling(n, oh, ow, stride):
    """(BLOCK_M, row tiles per phase): every phase gets the tile count of the largest one."""
    rows = n * triton.cdiv(oh, stride[0]) * triton.cdiv(ow, stride[1])
    if n * oh * ow >= 2**31 - 2**16:
        raise ValueError(f"N*OH*OW = {n * oh * ow} is beyond the int32 row index of these kernels")
    block_m = pow2_block(rows, 16, 128)
    return block_m, triton.cdiv(rows, block_m)


def _output_shape(x, weight, stride, padding, output_padding):
    return (x.shape[0], weight.shape[1],
            *[(size - 1) * s - 2 * p + k + op for size, s, p, k, op in
              zip(x.shape[2:], stride, padding, weight.shape[2:], output_padding)])


def forward_train(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                  output_padding, momentum, eps):
    """Training forward: (out, y, mean, invstd). y is the conv output without the bias (BN removes
    it); the bias only enters running_mean. Running stats are updated in place when given."""
    shape = _output_shape(x, weight, stride, padding, output_padding)
    y = torch.empty(shape, device=x.device, dtype=x.dtype)
    block_m, tiles = _row_tiling(shape[0], shape[2], shape[3], stride)
    partials = torch.empty((3, stride[0] * stride[1] * tiles, shape[1]), device=x.device,
                           dtype=torch.float32)
    _launch_conv_transpose(x, weight, stride, padding, training=True, y=y, out=None,
                           partials=partials)
    mean, invstd, affine = bn_relu.finalize_stats(partials, bn_weight, bn_bias, bias, running_mean,
                                                  running_var, momentum, eps,
                                                  count=shape[0] * shape[2] * shape[3])
    return bn_relu.apply_relu(y, affine), y, mean, invstd


def forward_eval(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, stride, padding,
                 output_padding, eps, keep_for_backward):
    """Eval forward in one launch: (out, y, mean, invstd), the last three None unless
    ``keep_for_backward`` (then mean = running_mean - bias, invstd = 1/sqrt(running_var + eps))."""
    shape = _output_shape(x, weight, stride, padding, output_padding)
    out = torch.empty(shape, device=x.device, dtype=x.dtype)
    y = mean = invstd = None
    if keep_for_backward:
        y = torch.empty_like(out)
        mean = torch.empty(shape[1], device=x.device, dtype=torch.float32)
        invstd = torch.empty_like(mean)
    _launch_conv_transpose(x, weight, stride, padding, training=False, y=y, out=out,
                           partials=None, bias=bias,
                           bn=(bn_weight, bn_bias, running_mean, running_var), stats=(mean, invstd),
                           eps=eps)
    return out, y, mean, invstd


def backward(grad_out, x, weight, y, mean, invstd, bn_weight, bn_bias, stride, padding, training, *,
             need_x, need_weight, need_bias, need_bn_weight, need_bn_bias):
    """(dx, dW, dbias, dgamma, dbeta), each None unless asked for; the last three float32."""
    need_params = need_bias or need_bn_weight or need_bn_bias
    dy, dgamma, dbeta, dbias = bn_relu.backward(grad_out, y, mean, invstd, bn_weight, bn_bias, training,
                                                has_bias=need_bias, need_dy=need_x or need_weight,
                                                need_params=need_params)
    dx = conv2d(dy, weight, stride, padding, out_hw=x.shape[2:]) if need_x else None
    dw = conv2d_weight_grad(dy, x, weight.shape[2:], stride, padding) if need_weight else None
    return (dx, dw, dbias, dgamma if need_bn_weight else None, dbeta if need_bn_bias else None)
