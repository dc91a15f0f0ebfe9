"""The implicit-GEMM core as a link of a chain: each operand load may apply the neighbouring layer's
BatchNorm-apply and activation (forward) or its backward (gradients), and the epilogue may close a
reduction over the whole launch, so that a run of layers never stores a post-BN activation and
needs no separate statistics launches.

Per BN layer a float32 ``vec`` buffer (8, C) carries the per-channel numbers its neighbours read:
rows MEAN, INVSTD, SCALE, SHIFT (written by the producing GEMM's finalize), COEF0, COEF1, DGAMMA,
DBETA (written by the input-gradient GEMM that produces the layer's output gradient).

Operand modes (:func:`chain_operand`): 0 as stored; 1 act(y*scale+shift), the forward prologue;
2 the backward of a BN layer, dy = scale*dz + coef0 + coef1*xhat with dz = act'(z)*g (z recomputed
from y as the forward computed it); 3 the backward of a layer without BN, dy = act'(out)*g.
Epilogues (``OUT_MODE``): 0 act(acc); 1 y plus per-(tile, channel) (count, mean, M2) partials;
2 the output gradient g of a BN layer plus per-tile sums of dz and dz*xhat; 3 dy = act'(out)*g of a
layer without BN. Modes 1 and 2 end with the last program of each column block (an integer ticket
counter, reset by that program) combining every tile's partials in ascending order: the finalize
(mean, invstd, scale, shift, running stats, num_batches_tracked) or the finish (dgamma, dbeta and
dy's coefficients). The weight gradient's split-K sum closes the same way. Integer counters and
fixed-order sums: the same bits every run, and no float atomics.
"""
import torch
import triton
import triton.language as tl

from ._config import dot_precision, gemm_tuning
from .bn_act import (activate, activate_grad, activate_grad_from_out, chan_combine,
                     mean_invstd_affine, sum_grad_partials, update_running)
from .conv_gemm import _check_rows, _nhwc_strides, _split_count, gemm_rows, out_coords, row_tiling, \
    tap_coords

VEC_ROWS = ("mean", "invstd", "scale", "shift", "coef0", "coef1", "dgamma", "dbeta")
ROW = {name: i for i, name in enumerate(VEC_ROWS)}  # the rows' indices, for the launchers
# the same, for the kernels (which read only constexpr globals)
MEAN, INVSTD, SCALE, SHIFT, COEF0, COEF1, DGAMMA, DBETA = map(tl.constexpr, range(len(VEC_ROWS)))
# partial rows a finalize or finish loads per step (as bn_act._PARTIAL_ROWS: more spill)
_PARTIAL_ROWS = tl.constexpr(16)
# the ticket counters: reset to 0 by the program that closes each reduction
_COUNTERS = 1 << 16

# Configs as conv_gemm's (BLOCK_M set by the launcher), minus those that spill with the chain's
# prologues and closing reductions (GPU compile check, sm_90, Triton 3.9): conv (64, 16, 8, 1) with
# exact products (8 B); weight gradient (128, 128, 32, 8, 3) (1 KB), and with exact products
# (128, 64, 16, 8, 3) (12-116 B) and (64, 32, 16, 4, 2) (4 B).
_CHAIN_CONV_TUNING = gemm_tuning(("BLOCK_N", "BLOCK_K"),
                                 tensor_cores=[(64, 16, 8, 3)],
                                 exact=[(32, 16, 8, 1)],
                                 interpreter_blocks=(32, 16))
_CHAIN_WEIGHT_GRAD_TUNING = gemm_tuning(
    ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
    tensor_cores=[(128, 64, 16, 8, 3), (64, 64, 32, 8, 3), (64, 32, 64, 4, 3)],
    exact=[(64, 64, 16, 8, 3), (64, 32, 16, 8, 2)],
    interpreter_blocks=(32, 32, 32))


@triton.jit
def chain_operand(v, MODE: tl.constexpr, ACT: tl.constexpr, slope, y_ptr, y_offs, vec_ptr, C, c,
                  c_ok, ok):
    """A float32 [pixels, channels ``c``] operand tile ``v`` as the GEMM uses it (see the module
    docstring for the modes); ``y_ptr``/``y_offs``: the layer's saved y (mode 2) or output (mode 3)
    at the tile's positions; ``vec_ptr``: its (8, C) vec. 0 outside ``ok`` (padding)."""
    if MODE == 1:
        scale = tl.load(vec_ptr + SCALE * C + c, mask=c_ok, other=0.0)
        shift = tl.load(vec_ptr + SHIFT * C + c, mask=c_ok, other=0.0)
        v = activate(v * scale[None, :] + shift[None, :], ACT, slope)
    elif MODE == 2:
        y = tl.load(y_ptr + y_offs, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(vec_ptr + MEAN * C + c, mask=c_ok, other=0.0)
        invstd = tl.load(vec_ptr + INVSTD * C + c, mask=c_ok, other=0.0)
        scale = tl.load(vec_ptr + SCALE * C + c, mask=c_ok, other=0.0)
        shift = tl.load(vec_ptr + SHIFT * C + c, mask=c_ok, other=0.0)
        dz = activate_grad(y * scale[None, :] + shift[None, :], v, ACT, slope)
        v = scale[None, :] * dz
        v += (tl.load(vec_ptr + COEF0 * C + c, mask=c_ok, other=0.0)[None, :]
              + tl.load(vec_ptr + COEF1 * C + c, mask=c_ok, other=0.0)[None, :]
              * ((y - mean[None, :]) * invstd[None, :]))
    elif MODE == 3:
        out = tl.load(y_ptr + y_offs, mask=ok, other=0.0).to(tl.float32)
        v = activate_grad_from_out(out, v, ACT, slope)
    return tl.where(ok, v, 0.0)


@triton.jit
def _last_arrival(cnt_ptr, arrivals):
    """Whether this program is the last of ``arrivals`` programs to reach ``cnt_ptr`` (which it then
    resets to 0 for the next launch). The barrier puts every thread's stores before the ticket,
    whose acquire-release semantics make them visible to the last program."""
    tl.debug_barrier()
    last = tl.atomic_add(cnt_ptr, 1, sem="acq_rel") == arrivals - 1
    if last:
        tl.atomic_xchg(cnt_ptr, 0, sem="relaxed")
    return last


@triton.autotune(**_CHAIN_CONV_TUNING,
                 key=["N", "C_in", "H", "W", "C_out", "OH", "OW", "BLOCK_M", "TRANSPOSED", "A_MODE",
                      "OUT_MODE", "DOT_PRECISION"],
                 restore_value=["rmean_ptr", "rvar_ptr", "nbt_ptr"])
@triton.jit
def _chain_conv_kernel(x_ptr, w_ptr, ay_ptr, avec_ptr, out_ptr, oy_ptr, ovec_ptr, part_ptr, cnt_ptr,
                       gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, nbt_ptr,
                       N, C_in, H, W, C_out, OH, OW, PAD_H, PAD_W, TILES,
                       momentum, unbias, eps, a_slope, o_slope,
                       sxn, sxh, sxw, sxc, swh, sww, swk, swn,
                       KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                       TRANSPOSED: tl.constexpr, A_MODE: tl.constexpr, A_ACT: tl.constexpr,
                       OUT_MODE: tl.constexpr, O_ACT: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
                       HAS_NBT: tl.constexpr, MOMENTUM_FROM_NBT: tl.constexpr,
                       DOT_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n, oh, ow, co] = epilogue(sum over taps and ci of A[n, ih, iw, ci] * w[kh, kw, ci, co])
    with A = chain_operand(x, A_MODE) (``ay_ptr``/``avec_ptr``: the A side layer's y and vec) and
    the OUT_MODE epilogue (``oy_ptr``/``ovec_ptr``: the output side layer's y (mode 2) or output
    (mode 3) and vec; ``gamma_ptr`` .. ``nbt_ptr``: its BN parameters and state for the finalize).
    Geometry as :func:`conv_gemm._conv_kernel`'s."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    row_ok, n, qh, qw, ph, pw, taps_h, taps_w = gemm_rows(pid_m, TILES, N, OH, OW, PAD_H, PAD_W, KH,
                                                          KW, SH, SW, TRANSPOSED, BLOCK_M)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < C_out
    k_blocks = tl.cdiv(C_in, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for it in range(0, taps_h * taps_w * k_blocks):
        ci, ih, iw, kh, kw = tap_coords(it, k_blocks, taps_w, qh, qw, ph, pw, PAD_H, PAD_W, SH, SW,
                                        TRANSPOSED, BLOCK_K)
        ci_ok = ci < C_in
        ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_rows = x_ptr + n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw
        a_ok = ok[:, None] & ci_ok[None, :]
        a = tl.load(x_rows[:, None] + ci[None, :] * sxc, mask=a_ok, other=0.0)
        if A_MODE != 0:
            pix = (n * H + ih) * W + iw
            a = chain_operand(a.to(tl.float32), A_MODE, A_ACT, a_slope, ay_ptr,
                              pix[:, None] * C_in + ci[None, :], avec_ptr, C_in, ci, ci_ok,
                              a_ok).to(x_ptr.dtype.element_ty)
        b = tl.load(w_ptr + kh * swh + kw * sww + ci[:, None] * swk + co[None, :] * swn,
                    mask=ci_ok[:, None] & co_ok[None, :], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    oh, ow = out_coords(qh, qw, ph, pw, PAD_H, PAD_W, SH, SW, TRANSPOSED)
    ok2 = row_ok[:, None] & co_ok[None, :]
    offs = ((n * OH + oh) * OW + ow)[:, None] * C_out + co[None, :]
    v = acc.to(out_ptr.dtype.element_ty).to(tl.float32)  # reduce the values stored and reread
    if OUT_MODE == 0:
        tl.store(out_ptr + offs, activate(v, O_ACT, o_slope), mask=ok2)
    elif OUT_MODE == 3:
        out = tl.load(oy_ptr + offs, mask=ok2, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, activate_grad_from_out(out, v, O_ACT, o_slope), mask=ok2)
    else:
        tl.store(out_ptr + offs, v, mask=ok2)
        tiles = tl.num_programs(0)
        p_offs = pid_m.to(tl.int64) * C_out + co
        stride = tiles.to(tl.int64) * C_out
        if OUT_MODE == 1:  # this tile's (count, mean, M2) per channel
            count = tl.sum(row_ok.to(tl.float32), axis=0)
            tile_mean = tl.sum(tl.where(ok2, v, 0.0), axis=0) / tl.maximum(count, 1.0)
            dev = tl.where(ok2, v - tile_mean[None, :], 0.0)
            tl.store(part_ptr + p_offs, tl.zeros((BLOCK_N,), dtype=tl.float32) + count, mask=co_ok)
            tl.store(part_ptr + stride + p_offs, tile_mean, mask=co_ok)
            tl.store(part_ptr + 2 * stride + p_offs, tl.sum(dev * dev, axis=0), mask=co_ok)
        else:  # this tile's sums of dz and dz * xhat of the output side BN layer
            y = tl.load(oy_ptr + offs, mask=ok2, other=0.0).to(tl.float32)
            mean = tl.load(ovec_ptr + MEAN * C_out + co, mask=co_ok, other=0.0)
            invstd = tl.load(ovec_ptr + INVSTD * C_out + co, mask=co_ok, other=0.0)
            scale = tl.load(ovec_ptr + SCALE * C_out + co, mask=co_ok, other=0.0)
            shift = tl.load(ovec_ptr + SHIFT * C_out + co, mask=co_ok, other=0.0)
            dz = tl.where(ok2, activate_grad(y * scale[None, :] + shift[None, :], v, O_ACT, o_slope),
                          0.0)
            tl.store(part_ptr + p_offs, tl.sum(dz, axis=0), mask=co_ok)
            tl.store(part_ptr + stride + p_offs,
                     tl.sum(dz * ((y - mean[None, :]) * invstd[None, :]), axis=0), mask=co_ok)
        if _last_arrival(cnt_ptr + pid_n, tiles):
            if OUT_MODE == 1:
                _finalize(part_ptr, tiles, C_out, co, co_ok, momentum, unbias, eps, gamma_ptr,
                          beta_ptr, rmean_ptr, rvar_ptr, nbt_ptr, ovec_ptr,
                          cnt_ptr + tl.num_programs(1), tl.num_programs(1), UPDATE_RUNNING, HAS_NBT,
                          MOMENTUM_FROM_NBT, BLOCK_N)
            else:
                dbeta, dgamma = sum_grad_partials(part_ptr, tiles, C_out, co, co_ok, _PARTIAL_ROWS,
                                                  BLOCK_N)
                scale = tl.load(ovec_ptr + SCALE * C_out + co, mask=co_ok, other=0.0)
                inv_count = 1.0 / (N * OH * OW).to(tl.float32)
                tl.store(ovec_ptr + COEF0 * C_out + co, -scale * dbeta * inv_count, mask=co_ok)
                tl.store(ovec_ptr + COEF1 * C_out + co, -scale * dgamma * inv_count, mask=co_ok)
                tl.store(ovec_ptr + DGAMMA * C_out + co, dgamma, mask=co_ok)
                tl.store(ovec_ptr + DBETA * C_out + co, dbeta, mask=co_ok)


@triton.jit
def _finalize(part_ptr, tiles, C, c, c_ok, momentum, unbias, eps, gamma_ptr, beta_ptr, rmean_ptr,
              rvar_ptr, nbt_ptr, vec_ptr, layer_cnt_ptr, column_blocks,
              UPDATE_RUNNING: tl.constexpr, HAS_NBT: tl.constexpr,
              MOMENTUM_FROM_NBT: tl.constexpr, BLOCK_C: tl.constexpr):
    """BN's finalize for the channels ``c`` (as bn_act._bn_finalize_kernel) and, by the last column
    block to finish, num_batches_tracked += 1. momentum=None (cumulative average) reads the count
    before any block has advanced it: 1 / (num_batches_tracked + 1), as nn.BatchNorm2d."""
    total, mean, m2 = chan_combine(part_ptr, tiles, C, c, c_ok, _PARTIAL_ROWS, BLOCK_C)
    mean_invstd_affine(mean, m2, total, c, c_ok, eps, gamma_ptr, beta_ptr, vec_ptr + MEAN * C,
                       vec_ptr + INVSTD * C, vec_ptr + SCALE * C, vec_ptr + SHIFT * C)
    if HAS_NBT:
        batches = tl.load(nbt_ptr, cache_modifier=".cg")
    if UPDATE_RUNNING:
        if MOMENTUM_FROM_NBT:
            momentum = 1.0 / (batches + 1).to(tl.float32)
        update_running(mean, m2, total, c, c_ok, momentum, unbias, rmean_ptr, rmean_ptr, rvar_ptr,
                       False)
    if HAS_NBT:
        if _last_arrival(layer_cnt_ptr, column_blocks):
            tl.store(nbt_ptr, batches + 1)


@triton.autotune(**_CHAIN_WEIGHT_GRAD_TUNING,
                 key=["N", "C_in", "H", "W", "C_out", "OH", "OW", "PIXELS_PER_SPLIT", "X_MODE",
                      "G_MODE", "DOT_PRECISION"])
@triton.jit
def _chain_weight_grad_kernel(x_ptr, xy_ptr, xvec_ptr, g_ptr, gy_ptr, gvec_ptr, dw_ptr, part_ptr,
                              cnt_ptr, N, C_in, H, W, C_out, OH, OW, PAD_H, PAD_W, PIXELS_PER_SPLIT,
                              x_slope, g_slope, sxn, sxh, sxw, sxc, sgn, sgh, sgw, sgc,
                              sdo, sdi, sdh, sdw,
                              KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr,
                              SW: tl.constexpr, X_MODE: tl.constexpr, X_ACT: tl.constexpr,
                              G_MODE: tl.constexpr, G_ACT: tl.constexpr, SPLIT: tl.constexpr,
                              DOT_PRECISION: tl.constexpr, BLOCK_M: tl.constexpr,
                              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dw[co, ci, kh, kw] = sum over output pixels p = (n, oh, ow) of G[n, oh, ow, co] *
    X[n, oh*SH-PAD_H+kh, ow*SW-PAD_W+kw, ci] (Conv2d geometry; a ConvTranspose2d swaps the
    operands), with X = chain_operand(x, X_MODE) and G = chain_operand(g, G_MODE). With SPLIT,
    program axis 2 splits the pixels: each split stores float32 partials, and the last split to
    finish a tile adds them in split order into dw (any strides ``sd*``)."""
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
        g_ok = p_ok[:, None] & co_ok[None, :]
        g = tl.load(g_ptr + (n * sgn + oh.to(tl.int64) * sgh + ow.to(tl.int64) * sgw)[:, None]
                    + co[None, :] * sgc, mask=g_ok, other=0.0)
        if G_MODE != 0:
            g = chain_operand(g.to(tl.float32), G_MODE, G_ACT, g_slope, gy_ptr,
                              p.to(tl.int64)[:, None] * C_out + co[None, :], gvec_ptr, C_out, co,
                              co_ok, g_ok).to(g_ptr.dtype.element_ty)
        b_ok = x_ok[:, None] & ci_ok[None, :]
        b = tl.load(x_ptr + (n * sxn + ih.to(tl.int64) * sxh + iw.to(tl.int64) * sxw)[:, None]
                    + ci[None, :] * sxc, mask=b_ok, other=0.0)
        if X_MODE != 0:
            b = chain_operand(b.to(tl.float32), X_MODE, X_ACT, x_slope, xy_ptr,
                              ((n * H + ih) * W + iw)[:, None] * C_in + ci[None, :], xvec_ptr, C_in,
                              ci, ci_ok, b_ok).to(x_ptr.dtype.element_ty)
        acc = tl.dot(tl.trans(g), b, acc, input_precision=DOT_PRECISION)
    ok = co_ok[:, None] & ci_ok[None, :]
    dw_offs = co.to(tl.int64)[:, None] * sdo + ci[None, :] * sdi + kh * sdh + kw * sdw
    if SPLIT:
        numel = C_out * C_in * KH * KW
        offs = (co.to(tl.int64)[:, None] * C_in + ci[None, :]) * (KH * KW) + tap
        tl.store(part_ptr + split * numel + offs, acc, mask=ok)
        splits = tl.num_programs(2)
        if _last_arrival(cnt_ptr + pid_mn * (KH * KW) + tap, splits):
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, splits):
                total += tl.load(part_ptr + s * numel + offs, mask=ok, other=0.0,
                                 cache_modifier=".cg")
            tl.store(dw_ptr + dw_offs, total, mask=ok)
    else:
        tl.store(dw_ptr + dw_offs, acc, mask=ok)


# --- launchers ------------------------------------------------------------------------------------

_counters_by_device = {}


def counters(device: torch.device) -> torch.Tensor:
    """The device's int32 ticket counters, all 0 between launches (each closing program resets its
    own). A launch that fails midway may leave some set: :func:`reset_counters` after an error."""
    found = _counters_by_device.get(device)
    if found is None:
        found = _counters_by_device[device] = torch.zeros(_COUNTERS, device=device, dtype=torch.int32)
    return found


def reset_counters(device: torch.device):
    """Forget the counters of ``device`` (after a failed launch): the next use allocates zeroed ones."""
    _counters_by_device.pop(device, None)


def _counters_for(count: int, device: torch.device) -> torch.Tensor:
    """The first ``count`` counters (a view: a launch is charged only what it may touch)."""
    if count > _COUNTERS:
        raise ValueError(f"a launch needs {count} ticket counters, more than the {_COUNTERS} kept")
    return counters(device)[:count]


class Side:
    """One side of a chain GEMM (its A operand, its output, a weight gradient operand): the tensor,
    how it is transformed (a ``mode`` of the module docstring, with the layer's activation code and
    slope) and the layer's saved y or output (``y``) and vec."""

    def __init__(self, tensor, mode=0, act=0, slope=0.0, y=None, vec=None):
        self.tensor, self.mode, self.act, self.slope = tensor, mode, act, slope
        self.y = y if y is not None else tensor  # placeholders where unused
        self.vec = vec if vec is not None else tensor


def chain_conv(a: Side, weight_view, kernel, *, transposed, stride, padding, out_hw, out: Side,
               bn=None, momentum=0.0, eps=0.0):
    """One chain GEMM launch into ``out.tensor`` (channels-last (N, C_out, OH, OW)). ``weight_view``:
    a ``[kH, kW, C_in, C_out]`` view (conv_gemm.pack_weight / swap_kn). ``out.mode`` 1 (the forward
    of a BN layer) takes ``bn`` = (gamma, beta, running_mean, running_var, num_batches_tracked),
    each may be None but gamma and beta, and ``momentum`` (a float, or None: from
    num_batches_tracked)."""
    x = a.tensor
    n, c_in, h, w = x.shape
    c_out = weight_view.shape[3]
    (sh, sw), (pad_h, pad_w) = stride, padding
    block_m, tiles, phases = row_tiling(n, out_hw, stride, transposed)
    dev = x.device
    partials = None
    if out.mode in (1, 2):
        partials = torch.empty((3 if out.mode == 1 else 2, phases * tiles, c_out), device=dev,
                               dtype=torch.float32)
    gamma, beta, rmean, rvar, nbt = bn if bn is not None else (None,) * 5
    fill = lambda t: t if t is not None else out.vec  # noqa: E731 (placeholders)
    grid = lambda meta: (phases * tiles, triton.cdiv(c_out, meta["BLOCK_N"]))  # noqa: E731
    _chain_conv_kernel[grid](
        x, weight_view, a.y, a.vec, out.tensor, out.y, out.vec, fill(partials),
        _counters_for(triton.cdiv(c_out, 16) + 1, dev),
        fill(gamma), fill(beta), fill(rmean), fill(rvar), fill(nbt),
        n, c_in, h, w, c_out, *out_hw, pad_h, pad_w, tiles,
        0.0 if momentum is None else float(momentum), _unbias(n * out_hw[0] * out_hw[1]), eps,
        a.slope, out.slope, *_nhwc_strides(x), *weight_view.stride(),
        KH=kernel[0], KW=kernel[1], SH=sh, SW=sw, TRANSPOSED=transposed, A_MODE=a.mode,
        A_ACT=a.act, OUT_MODE=out.mode, O_ACT=out.act, UPDATE_RUNNING=rmean is not None,
        HAS_NBT=nbt is not None, MOMENTUM_FROM_NBT=momentum is None,
        DOT_PRECISION=dot_precision(x.dtype, dev), BLOCK_M=block_m)


def _unbias(count: int) -> float:
    """M / (M - 1): the running variance is unbiased (M >= 2 in training, checked at the boundary)."""
    return count / max(count - 1, 1)


def chain_weight_grad(x: Side, g: Side, dw, kernel_size, stride, padding):
    """The gradient of ``F.conv2d(X, w, None, stride, padding)`` w.r.t. w into ``dw`` (any strides,
    (C_out, C_in, kH, kW)), given its output gradient G: X and G the operands of ``x`` and ``g``
    (NHWC-strided). A ConvTranspose2d's weight gradient is this with the sides swapped. The pixel
    sum splits as conv_gemm.conv2d_weight_grad's, closed in the launch (:func:`_last_arrival`)."""
    n, c_in, h, w = x.tensor.shape
    _, c_out, oh, ow = g.tensor.shape
    kh, kw = kernel_size
    (sh, sw), (ph, pw) = stride, padding
    pixels = n * oh * ow
    _check_rows(pixels, "N*OH*OW")
    splits = _split_count(pixels, triton.cdiv(c_out, 64) * triton.cdiv(c_in, 64) * kh * kw,
                          x.tensor.numel() + g.tensor.numel(), c_out * c_in * kh * kw, dw.device)
    per_split = triton.cdiv(triton.cdiv(pixels, splits), 16) * 16
    splits = triton.cdiv(pixels, per_split)
    part = dw if splits == 1 else torch.empty((splits, c_out, c_in, kh, kw), device=dw.device,
                                               dtype=torch.float32)
    # the smallest tile is 32 x 32: counters for every (tile, tap) of any config
    tickets = _counters_for(triton.cdiv(c_out, 32) * triton.cdiv(c_in, 32) * kh * kw, dw.device)
    grid = lambda meta: (triton.cdiv(c_out, meta["BLOCK_M"]) * triton.cdiv(c_in, meta["BLOCK_N"]),  # noqa: E731
                         kh * kw, splits)
    _chain_weight_grad_kernel[grid](
        x.tensor, x.y, x.vec, g.tensor, g.y, g.vec, dw, part, tickets,
        n, c_in, h, w, c_out, oh, ow, ph, pw, per_split, x.slope, g.slope,
        *_nhwc_strides(x.tensor), *_nhwc_strides(g.tensor), *dw.stride(),
        KH=kh, KW=kw, SH=sh, SW=sw, X_MODE=x.mode, X_ACT=x.act, G_MODE=g.mode, G_ACT=g.act,
        SPLIT=splits > 1, DOT_PRECISION=dot_precision(x.tensor.dtype, dw.device))
