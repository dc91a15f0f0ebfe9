"""The ordinary strided 2-D convolution (groups=1, dilation=1) as an implicit GEMM, and its weight
gradient as a GEMM with a deterministic split-K.

They are the input and weight gradients of the transposed convolution, and the forward and weight
gradient of a Discriminator's Conv2d. Inputs may have any strides (NCHW, channels_last, views):
addresses come from the strides, in int64, so nothing is copied. Accumulation is float32.
"""
import torch
import triton
import triton.language as tl

from ._config import dot_precision, gemm_tuning, multiprocessor_count

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages), each spill-free where it is used (see
# gemm_tuning); 4-warp conv tiles spilled up to 4 KB, and some configs spill only with exact products
# or only on one arch and Triton (e.g. the conv's 64x64x16 with tf32 on sm_80, Triton 3.6: 8 B).
_CONV_TUNING = gemm_tuning(("BLOCK_M", "BLOCK_N", "BLOCK_K"),
                           tensor_cores=[(128, 64, 16, 8, 3), (64, 64, 32, 8, 3)],
                           exact=[(64, 64, 16, 8, 3)], interpreter_blocks=(64, 32, 32))
_WEIGHT_GRAD_TUNING = gemm_tuning(
    ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    tensor_cores=[(128, 64, 16, 8, 3), (64, 64, 16, 8, 3), (128, 32, 32, 8, 3), (128, 128, 16, 8, 3),
                  (128, 64, 16, 4, 2), (64, 64, 16, 4, 2), (128, 32, 32, 4, 2)],
    exact=[(128, 64, 16, 8, 3), (64, 64, 16, 8, 3), (128, 32, 32, 8, 3)],
    interpreter_blocks=(64, 32, 32))


@triton.autotune(key=["N", "C_in", "H", "W", "C_out", "OH", "OW", "DOT_PRECISION"],
                 **_CONV_TUNING)
@triton.jit
def _conv2d_kernel(x_ptr, w_ptr, out_ptr,
                   N, C_in, H, W, C_out, OH, OW, PAD_H, PAD_W,
                   sxn, sxc, sxh, sxw, swo, swi, swh, sww, son, soc, soh, sow,
                   KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                   DOT_PRECISION: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n, co, oh, ow] = sum_{ci, kh, kw} x[n, ci, oh*SH-PAD_H+kh, ow*SW-PAD_W+kw] * w[co, ci, kh, kw].
    GEMM rows are output pixels (n, oh, ow), columns output channels, K = C_in per tap."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < N * OH * OW
    ow = rows % OW
    oh = (rows // OW) % OH
    n = (rows // (OW * OH)).to(tl.int64)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < C_out
    w_cols = w_ptr + co.to(tl.int64) * swo
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kh in range(KH):
        ih = oh * SH - PAD_H + kh
        for kw in range(KW):
            iw = ow * SW - PAD_W + kw
            ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_rows = x_ptr + n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
            w_tap = w_cols + kh * swh + kw * sww
            for k0 in range(0, C_in, BLOCK_K):
                ci = k0 + ks
                ci_ok = ci < C_in
                a = tl.load(x_rows[:, None] + ci.to(tl.int64)[None, :] * sxc,
                            mask=ok[:, None] & ci_ok[None, :], other=0.0)
                b = tl.load(w_tap[None, :] + ci.to(tl.int64)[:, None] * swi,
                            mask=ci_ok[:, None] & co_ok[None, :], other=0.0)
                acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    out_rows = out_ptr + n * son + oh.to(tl.int64) * soh + ow.to(tl.int64) * sow
    tl.store(out_rows[:, None] + co.to(tl.int64)[None, :] * soc, acc,
             mask=row_ok[:, None] & co_ok[None, :])


@triton.autotune(key=["N", "C_in", "H", "W", "C_out", "OH", "OW", "PIXELS_PER_SPLIT",
                      "DOT_PRECISION"],
                 **_WEIGHT_GRAD_TUNING)
@triton.jit
def _conv2d_weight_grad_kernel(x_ptr, g_ptr, part_ptr,
                               N, C_in, H, W, C_out, OH, OW, PAD_H, PAD_W, PIXELS_PER_SPLIT,
                               sxn, sxc, sxh, sxw, sgn, sgc, sgh, sgw,
                               KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                               DOT_PRECISION: tl.constexpr,
                               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """part[split, co, ci, kh, kw] = sum over the split's output pixels p = (n, oh, ow) of
    g[n, co, oh, ow] * x[n, ci, oh*SH-PAD_H+kh, ow*SW-PAD_W+kw]: one GEMM per tap, K = pixels."""
    pid_mn = tl.program_id(0)
    tap = tl.program_id(1)
    split = tl.program_id(2)
    num_m = tl.cdiv(C_out, BLOCK_M)
    co = (pid_mn % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    ci = (pid_mn // num_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < C_out
    ci_ok = ci < C_in
    kh = tap // KW
    kw = tap % KW
    g_cols = g_ptr + co.to(tl.int64) * sgc
    x_cols = x_ptr + ci.to(tl.int64) * sxc
    p_start = split * PIXELS_PER_SPLIT
    p_end = tl.minimum(p_start + PIXELS_PER_SPLIT, N * OH * OW)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(p_start, p_end, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K)
        p_ok = p < p_end
        ow = p % OW
        oh = (p // OW) % OH
        n = (p // (OW * OH)).to(tl.int64)
        ih = oh * SH - PAD_H + kh
        iw = ow * SW - PAD_W + kw
        x_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        g_pix = n * sgn + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw
        x_pix = n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        a = tl.load(g_cols[:, None] + g_pix[None, :], mask=co_ok[:, None] & p_ok[None, :], other=0.0)
        b = tl.load(x_cols[None, :] + x_pix[:, None], mask=x_ok[:, None] & ci_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    taps = KH * KW
    offs = ((split * C_out + co.to(tl.int64))[:, None] * C_in + ci[None, :]) * taps + tap
    tl.store(part_ptr + offs, acc, mask=co_ok[:, None] & ci_ok[None, :])


@triton.jit
def _sum_splits_kernel(part_ptr, out_ptr, numel, SPLITS, BLOCK: tl.constexpr):
    """out = sum over s of part[s], added in the order s = 0, 1, ...: the same bits every run."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < numel
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLITS):
        acc += tl.load(part_ptr + s * numel + offs, mask=ok, other=0.0)
    tl.store(out_ptr + offs, acc, mask=ok)


def _check_rows(count: int, what: str):
    if count >= 2**31 - 2**16:
        raise ValueError(f"{what} = {count} pixels is beyond the int32 row index of these kernels")


def conv2d(x: torch.Tensor, weight: torch.Tensor, stride, padding, out_hw=None) -> torch.Tensor:
    """``F.conv2d(x, weight, None, stride, padding)`` (weight (C_out, C_in, kH, kW)), as a new
    contiguous tensor. ``out_hw`` (default: the usual output size) may name a smaller output."""
    n, c_in, h, w = x.shape
    c_out, _, kh, kw = weight.shape
    (sh, sw), (ph, pw) = stride, padding
    oh, ow = out_hw if out_hw is not None else ((h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)
    _check_rows(n * oh * ow, "N*OH*OW")
    out = torch.empty((n, c_out, oh, ow), device=x.device, dtype=x.dtype)
    grid = lambda meta: (triton.cdiv(n * oh * ow, meta["BLOCK_M"]), triton.cdiv(c_out, meta["BLOCK_N"]))
    _conv2d_kernel[grid](x, weight, out, n, c_in, h, w, c_out, oh, ow, ph, pw,
                         *x.stride(), *weight.stride(), *out.stride(),
                         KH=kh, KW=kw, SH=sh, SW=sw, DOT_PRECISION=dot_precision(x.dtype, x.device))
    return out


def _split_count(pixels: int, tiles: int, device: torch.device) -> int:
    """Split-K factor: enough programs to fill the GPU twice over, each summing >= 512 pixels."""
    wanted = max(1, 2 * multiprocessor_count(device) // max(tiles, 1))
    return max(1, min(wanted, pixels // 512))


def conv2d_weight_grad(x: torch.Tensor, grad_out: torch.Tensor, kernel_size, stride, padding,
                       splits=None) -> torch.Tensor:
    """The gradient of ``F.conv2d(x, w, None, stride, padding)`` w.r.t. w, given ``grad_out``:
    shape (C_out, C_in, kH, kW) in x's dtype. The pixel sum is split into ``splits`` contiguous
    ranges (default: a heuristic) whose float32 partials are added in a fixed order."""
    n, c_in, h, w = x.shape
    _, c_out, oh, ow = grad_out.shape
    kh, kw = kernel_size
    (sh, sw), (ph, pw) = stride, padding
    pixels = n * oh * ow
    _check_rows(pixels, "N*OH*OW")
    if splits is None:
        splits = _split_count(pixels, triton.cdiv(c_out, 64) * triton.cdiv(c_in, 64) * kh * kw, x.device)
    per_split = triton.cdiv(triton.cdiv(pixels, splits), 16) * 16
    splits = triton.cdiv(pixels, per_split)
    dw = torch.empty((c_out, c_in, kh, kw), device=x.device, dtype=x.dtype)
    part = dw if splits == 1 else torch.empty((splits, c_out, c_in, kh, kw), device=x.device,
                                               dtype=torch.float32)
    grid = lambda meta: (triton.cdiv(c_out, meta["BLOCK_M"]) * triton.cdiv(c_in, meta["BLOCK_N"]),
                         kh * kw, splits)
    _conv2d_weight_grad_kernel[grid](x, grad_out, part, n, c_in, h, w, c_out, oh, ow, ph, pw, per_split,
                                     *x.stride(), *grad_out.stride(), KH=kh, KW=kw, SH=sh, SW=sw,
                                     DOT_PRECISION=dot_precision(x.dtype, x.device))
    if splits > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(dw.numel(), block),)](part, dw, dw.numel(), splits, BLOCK=block)
    return dw
