"""The implicit-GEMM core as a link of a chain: each operand load may apply the neighbouring layer's
BatchNorm-apply and activation (forward) or its backward (gradients), and the epilogue may close a
reduction over the whole launch, so that a run of layers never stores a post-BN activation and
needs no separate statistics launches.

Per BN layer a float32 ``vec`` (6, C) carries the per-channel numbers its neighbours read
(bn_act.VEC_ROWS): MEAN, INVSTD, SCALE, SHIFT written by the producing GEMM's finalize, COEF0,
COEF1 (and dgamma, dbeta into their own tensors) by the input-gradient GEMM that produces the
layer's output gradient.
Operands load through bn_act.chain_operand (its modes: as stored, the forward prologue
act(y*scale+shift), a BN layer's backward, an activation's backward).
Epilogues (``OUT_MODE``): 0 act(acc); 1 y plus per-(tile, channel) (count, mean, M2) partials;
2 the output gradient g of a BN layer plus per-tile sums of dz and dz*xhat; 3 dy = act'(out)*g of a
layer without BN. Modes 1 and 2 end with the last program of each column block (an integer ticket
counter, reset by that program) combining every tile's partials in ascending order: the finalize
(mean, invstd, scale, shift, running stats, num_batches_tracked) or the finish (dgamma, dbeta and
dy's coefficients), as conv_gemm's weight gradient closes its split-K sum (conv_gemm.last_arrival):
integer counters and fixed-order sums, the same bits every run, no float atomics.
"""
import torch
import triton
import triton.language as tl

from ._config import dot_precision, gemm_tuning
from .bn_act import (COEF0, COEF1, INVSTD, MEAN, SCALE, SHIFT, Side, activate,
                     activate_grad, activate_grad_from_out, chan_combine, mean_invstd_affine,
                     sum_grad_partials, update_running)
from .conv_gemm import (_nhwc_strides, counters, gemm_rows, implicit_gemm, last_arrival,
                        out_coords, row_tiling, weight_grad_launch, weight_grad_program)

# partial rows a finalize or finish loads per step (as bn_act._PARTIAL_ROWS: more spill)
_PARTIAL_ROWS = tl.constexpr(16)

# As conv_gemm's conv configs (BLOCK_M set by the launcher), less what spilled with the chain's
# prologues and epilogues (GPU compile check): (64, 16, 8, 3) (sm_80, Triton 3.6: 8 B), and with
# exact products (64, 16, 8, 1) (sm_90, Triton 3.9: 8 B).
_CHAIN_CONV_TUNING = gemm_tuning(("BLOCK_N", "BLOCK_K"),
                                 tensor_cores=[(64, 16, 8, 2)],
                                 exact=[(32, 16, 8, 1)],
                                 interpreter_blocks=(32, 16))
# The backward pair: a conv config and a weight-gradient config (W_*) sharing warps and stages;
# the kernel holds the registers of the larger branch. Spilled (GPU compile check, sm_90/sm_80,
# Triton 3.6 and 3.9): (64, 16, 128 or 64, 64 or 32, 16 or 32, 8, 3 or 2) but the one kept, and
# with exact products (32 or 16, 16, 64 or 32, 32 or 64, 16, 4 or 8, 1 or 2) but the one kept.
_PAIR_TUNING = gemm_tuning(("BLOCK_N", "BLOCK_K", "W_BLOCK_M", "W_BLOCK_N", "W_BLOCK_K"),
                           tensor_cores=[(64, 16, 64, 64, 16, 8, 3)],
                           exact=[(16, 16, 64, 32, 16, 4, 2)],
                           interpreter_blocks=(32, 16, 32, 32, 128))


@triton.autotune(**_CHAIN_CONV_TUNING,
                 key=["N", "C_in", "H", "W", "C_out", "OH", "OW", "BLOCK_M", "TRANSPOSED", "A_MODE",
                      "OUT_MODE", "DOT_PRECISION"],
                 restore_value=["rmean_ptr", "rvar_ptr", "nbt_ptr"])
@triton.jit
def _chain_conv_kernel(x_ptr, w_ptr, ay_ptr, avec_ptr, out_ptr, oy_ptr, ovec_ptr, part_ptr, cnt_ptr,
                       gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, nbt_ptr, dgamma_ptr, dbeta_ptr,
                       N, C_in, H, W, C_out, OH, OW, PAD_H, PAD_W, TILES,
                       momentum, unbias, eps, a_slope, o_slope,
                       sxn, sxh, sxw, sxc, swh, sww, swk, swn,
                       KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                       TRANSPOSED: tl.constexpr, A_MODE: tl.constexpr, A_ACT: tl.constexpr,
                       OUT_MODE: tl.constexpr, O_ACT: tl.constexpr, UPDATE_RUNNING: tl.constexpr,
                       HAS_NBT: tl.constexpr, MOMENTUM_FROM_NBT: tl.constexpr,
                       DOT_PRECISION: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """:func:`chain_conv_program` on a (row tiles, column blocks) grid."""
    chain_conv_program(tl.program_id(0), tl.program_id(1), tl.num_programs(0), tl.num_programs(1),
                       x_ptr, w_ptr, ay_ptr, avec_ptr, out_ptr, oy_ptr, ovec_ptr, part_ptr, cnt_ptr,
                       gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, nbt_ptr, dgamma_ptr, dbeta_ptr,
                       N, C_in, H, W, C_out, OH, OW, PAD_H, PAD_W, TILES,
                       momentum, unbias, eps, a_slope, o_slope,
                       sxn, sxh, sxw, sxc, swh, sww, swk, swn,
                       KH, KW, SH, SW, TRANSPOSED, A_MODE, A_ACT, OUT_MODE, O_ACT, UPDATE_RUNNING,
                       HAS_NBT, MOMENTUM_FROM_NBT, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def chain_conv_program(pid_m, pid_n, num_m, num_n, x_ptr, w_ptr, ay_ptr, avec_ptr, out_ptr, oy_ptr, ovec_ptr, part_ptr, cnt_ptr,
                       gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, nbt_ptr, dgamma_ptr, dbeta_ptr,
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
    (mode 3) and vec; ``gamma_ptr`` .. ``nbt_ptr``: its BN parameters and state for the finalize;
    ``dgamma_ptr``/``dbeta_ptr``: where mode 2 writes its BN parameters' gradients).
    Geometry as :func:`conv_gemm._conv_kernel`'s. This program computes row tile ``pid_m`` (of
    ``num_m``) and column block ``pid_n`` (of ``num_n``)."""
    row_ok, n, qh, qw, ph, pw, taps_h, taps_w = gemm_rows(pid_m, TILES, N, OH, OW, PAD_H, PAD_W, KH,
                                                          KW, SH, SW, TRANSPOSED, BLOCK_M)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < C_out
    acc = implicit_gemm(x_ptr, w_ptr, ay_ptr, avec_ptr, row_ok, n, qh, qw, ph, pw, taps_h, taps_w, co,
                        co_ok, C_in, H, W, PAD_H, PAD_W, a_slope, sxn, sxh, sxw, sxc, swh, sww, swk,
                        swn, SH, SW, TRANSPOSED, A_MODE, A_ACT, DOT_PRECISION, BLOCK_M, BLOCK_N,
                        BLOCK_K)

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
        tiles = num_m
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
        if last_arrival(cnt_ptr + pid_n, tiles):
            if OUT_MODE == 1:
                _finalize(part_ptr, tiles, C_out, co, co_ok, momentum, unbias, eps, gamma_ptr,
                          beta_ptr, rmean_ptr, rvar_ptr, nbt_ptr, ovec_ptr,
                          cnt_ptr + num_n, num_n, UPDATE_RUNNING, HAS_NBT,
                          MOMENTUM_FROM_NBT, BLOCK_N)
            else:
                dbeta, dgamma = sum_grad_partials(part_ptr, tiles, C_out, co, co_ok, _PARTIAL_ROWS,
                                                  BLOCK_N)
                scale = tl.load(ovec_ptr + SCALE * C_out + co, mask=co_ok, other=0.0)
                inv_count = 1.0 / (N * OH * OW).to(tl.float32)
                tl.store(ovec_ptr + COEF0 * C_out + co, -scale * dbeta * inv_count, mask=co_ok)
                tl.store(ovec_ptr + COEF1 * C_out + co, -scale * dgamma * inv_count, mask=co_ok)
                tl.store(dgamma_ptr + co, dgamma, mask=co_ok)
                tl.store(dbeta_ptr + co, dbeta, mask=co_ok)


@triton.autotune(**_PAIR_TUNING,
                 key=["N", "C_in", "H", "W", "C_out", "OH", "OW", "BLOCK_M", "TRANSPOSED", "A_MODE",
                      "OUT_MODE", "w_N", "w_C_in", "w_H", "w_W", "w_C_out", "w_OH", "w_OW",
                      "w_PIXELS_PER_SPLIT", "W_X_MODE", "W_G_MODE", "DOT_PRECISION"])
@triton.jit
def _backward_pair_kernel(x_ptr, w_ptr, ay_ptr, avec_ptr, out_ptr, oy_ptr, ovec_ptr, part_ptr,
                          cnt_ptr, gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, nbt_ptr,
                          dgamma_ptr, dbeta_ptr,
                          N, C_in, H, W, C_out, OH, OW, PAD_H, PAD_W, TILES,
                          momentum, unbias, eps, a_slope, o_slope,
                          sxn, sxh, sxw, sxc, swh, sww, swk, swn,
                          w_x_ptr, w_xy_ptr, w_xvec_ptr, w_g_ptr, w_gy_ptr, w_gvec_ptr, w_dw_ptr,
                          w_part_ptr, w_cnt_ptr, w_N, w_C_in, w_H, w_W, w_C_out, w_OH, w_OW, w_PAD_H,
                          w_PAD_W, w_PIXELS_PER_SPLIT, w_x_slope, w_g_slope, w_sxn, w_sxh, w_sxw,
                          w_sxc, w_sgn, w_sgh, w_sgw, w_sgc, w_sdo, w_sdi, w_sdh, w_sdw,
                          ROWS, W_SPLITS,
                          KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
                          TRANSPOSED: tl.constexpr, A_MODE: tl.constexpr, A_ACT: tl.constexpr,
                          OUT_MODE: tl.constexpr, O_ACT: tl.constexpr,
                          UPDATE_RUNNING: tl.constexpr, HAS_NBT: tl.constexpr,
                          MOMENTUM_FROM_NBT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          W_KH: tl.constexpr, W_KW: tl.constexpr, W_SH: tl.constexpr,
                          W_SW: tl.constexpr, W_X_MODE: tl.constexpr, W_X_ACT: tl.constexpr,
                          W_G_MODE: tl.constexpr, W_G_ACT: tl.constexpr, W_SPLIT: tl.constexpr,
                          W_DOT_PRECISION: tl.constexpr, W_BLOCK_M: tl.constexpr,
                          W_BLOCK_N: tl.constexpr, W_BLOCK_K: tl.constexpr):
    """:func:`chain_conv_program` on the first ROWS x (C_out / BLOCK_N) programs of a 1-D grid,
    conv_gemm.weight_grad_program (its arguments prefixed ``w_``/``W_``) on the rest."""
    pid = tl.program_id(0)
    col_blocks = tl.cdiv(C_out, BLOCK_N)
    if pid < ROWS * col_blocks:
        chain_conv_program(pid % ROWS, pid // ROWS, ROWS, col_blocks,
                           x_ptr, w_ptr, ay_ptr, avec_ptr, out_ptr, oy_ptr, ovec_ptr, part_ptr,
                           cnt_ptr, gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, nbt_ptr,
                          dgamma_ptr, dbeta_ptr,
                           N, C_in, H, W, C_out, OH, OW, PAD_H, PAD_W, TILES,
                           momentum, unbias, eps, a_slope, o_slope,
                           sxn, sxh, sxw, sxc, swh, sww, swk, swn,
                           KH, KW, SH, SW, TRANSPOSED, A_MODE, A_ACT, OUT_MODE, O_ACT,
                           UPDATE_RUNNING, HAS_NBT, MOMENTUM_FROM_NBT, DOT_PRECISION, BLOCK_M,
                           BLOCK_N, BLOCK_K)
    else:
        q = pid - ROWS * col_blocks
        tiles = tl.cdiv(w_C_out, W_BLOCK_M) * tl.cdiv(w_C_in, W_BLOCK_N)
        weight_grad_program(q % tiles, (q // tiles) % (W_KH * W_KW), q // (tiles * W_KH * W_KW),
                            W_SPLITS, w_x_ptr, w_xy_ptr, w_xvec_ptr, w_g_ptr, w_gy_ptr, w_gvec_ptr,
                            w_dw_ptr, w_part_ptr, w_cnt_ptr, w_N, w_C_in, w_H, w_W, w_C_out, w_OH,
                            w_OW, w_PAD_H, w_PAD_W, w_PIXELS_PER_SPLIT, w_x_slope, w_g_slope,
                            w_sxn, w_sxh, w_sxw, w_sxc, w_sgn, w_sgh, w_sgw, w_sgc,
                            w_sdo, w_sdi, w_sdh, w_sdw, W_KH, W_KW, W_SH, W_SW, W_X_MODE, W_X_ACT,
                            W_G_MODE, W_G_ACT, W_SPLIT, W_DOT_PRECISION, W_BLOCK_M, W_BLOCK_N,
                            W_BLOCK_K)


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
                       vec_ptr + INVSTD * C, vec_ptr + SCALE * C, vec_ptr + SHIFT * C,
                       vec_ptr + COEF0 * C, C)
    if HAS_NBT:
        batches = tl.load(nbt_ptr, cache_modifier=".cg")
    if UPDATE_RUNNING:
        if MOMENTUM_FROM_NBT:
            momentum = 1.0 / (batches + 1).to(tl.float32)
        update_running(mean, m2, total, c, c_ok, momentum, unbias, rmean_ptr, rmean_ptr, rvar_ptr,
                       False)
    if HAS_NBT:
        if last_arrival(layer_cnt_ptr, column_blocks):
            tl.store(nbt_ptr, batches + 1)


# --- launchers ------------------------------------------------------------------------------------

def _conv_launch(a, weight_view, kernel, transposed, stride, padding, out_hw, out, bn, momentum,
                 eps, bn_grads):
    """(args, constexprs, row tiles, C_out) of one chain GEMM launch (:func:`chain_conv`)."""
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
    if out.mode == 2 and None in bn_grads:
        raise ValueError("bn_grads must be two float32 (C_out,) tensors for out.mode 2")
    if out.mode == 1 and momentum is None and nbt is None:
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    fill = lambda t: t if t is not None else out.vec  # noqa: E731 (placeholders)
    args = (x, weight_view, a.y, a.vec, out.tensor, out.y, out.vec, fill(partials),
            counters(conv_tickets(c_out), dev), fill(gamma), fill(beta), fill(rmean), fill(rvar),
            fill(nbt), *map(fill, bn_grads), n, c_in, h, w, c_out, *out_hw, pad_h, pad_w, tiles,
            0.0 if momentum is None else float(momentum), _unbias(n * out_hw[0] * out_hw[1]), eps,
            a.slope, out.slope, *_nhwc_strides(x), *weight_view.stride())
    constexprs = dict(KH=kernel[0], KW=kernel[1], SH=sh, SW=sw, TRANSPOSED=transposed,
                      A_MODE=a.mode, A_ACT=a.act, OUT_MODE=out.mode, O_ACT=out.act,
                      UPDATE_RUNNING=rmean is not None, HAS_NBT=nbt is not None,
                      MOMENTUM_FROM_NBT=momentum is None,
                      DOT_PRECISION=dot_precision(x.dtype, dev), BLOCK_M=block_m)
    return args, constexprs, phases * tiles, c_out


def conv_tickets(c_out: int) -> int:
    """Ticket counters a chain GEMM may use: one per column block (BLOCK_N >= 16), one per layer."""
    return triton.cdiv(c_out, 16) + 1


def chain_conv(a: Side, weight_view, kernel, *, transposed, stride, padding, out_hw, out: Side,
               bn=None, momentum=0.0, eps=0.0, bn_grads=(None, None)):
    """One chain GEMM launch into ``out.tensor`` (channels-last (N, C_out, OH, OW)). ``weight_view``:
    a ``[kH, kW, C_in, C_out]`` view (conv_gemm.pack_weight / swap_kn). ``out.mode`` 1 (the forward
    of a BN layer) takes ``bn`` = (gamma, beta, running_mean, running_var, num_batches_tracked),
    each may be None but gamma and beta, and ``momentum`` (a float, or None: from
    num_batches_tracked); ``out.mode`` 2 writes the output side layer's (dgamma, dbeta) into
    ``bn_grads`` (required then)."""
    args, constexprs, rows, c_out = _conv_launch(a, weight_view, kernel, transposed, stride,
                                                 padding, out_hw, out, bn, momentum, eps, bn_grads)
    grid = lambda meta: (rows, triton.cdiv(c_out, meta["BLOCK_N"]))  # noqa: E731
    _chain_conv_kernel[grid](*args, **constexprs)


def chain_backward_pair(a: Side, weight_view, kernel, *, transposed, stride, padding, out_hw,
                        out: Side, wgrad_x: Side, wgrad_g: Side, dw, bn_grads=(None, None)):
    """A layer's two backward GEMMs in one launch: its input gradient (:func:`chain_conv`'s
    arguments, no BN finalize) and its weight gradient (conv_gemm.conv2d_weight_grad of
    ``wgrad_x``, ``wgrad_g`` into ``dw``, same kernel, stride and padding). They are independent: the first writes the previous
    layer's output gradient and backward sums, the second reads this layer's dy and the previous
    layer's forward numbers. One launch instead of two, and each tile of dy is read from L2 by
    both."""
    args, constexprs, rows, c_out = _conv_launch(a, weight_view, kernel, transposed, stride,
                                                 padding, out_hw, out, None, 0.0, 0.0, bn_grads)
    wgrad = weight_grad_launch(wgrad_x, wgrad_g, kernel, stride, padding, out=dw,
                               tickets_from=conv_tickets(c_out))
    w_constexprs = {"W_" + k: v for k, v in wgrad.constexprs.items()}

    def grid(meta):
        conv_programs = rows * triton.cdiv(c_out, meta["BLOCK_N"])
        return (conv_programs + wgrad.tiles(meta["W_BLOCK_M"], meta["W_BLOCK_N"]) * wgrad.taps
                * wgrad.splits,)

    _backward_pair_kernel[grid](*args, *wgrad.args, rows, wgrad.splits, **constexprs,
                                **w_constexprs)


def _unbias(count: int) -> float:
    """M / (M - 1): the running variance is unbiased (M >= 2 in training, checked at the boundary)."""
    return count / max(count - 1, 1)
