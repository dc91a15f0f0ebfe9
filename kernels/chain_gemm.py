"""The convolution kernels: the implicit-GEMM core (conv_gemm) with a layer's prologue and
epilogue, so that a run of layers never stores a post-BN activation and needs no separate
statistics launches. A lone layer is a chain of one.

Per BN layer a float32 ``vec`` (4, C) carries the per-channel numbers its neighbours read
(bn_act.VEC_ROWS: MEAN, INVSTD, SCALE, SHIFT), written by the GEMM that produces the layer's y;
its backward's reductions write dy's two coefficients into a separate (2, C) ``coef`` (and dgamma,
dbeta into their own tensors), written by the input-gradient GEMM that produces the layer's
output gradient.
Operands load through bn_act.chain_operand (bn_act.Operand). Epilogues: :class:`Epilogue`.
BN_BATCH and BN_ACT_GRAD end with the last program of each column block (an integer ticket
counter, reset by that program) combining every tile's partials in ascending order: the finalize
(mean, invstd, scale, shift, running stats, num_batches_tracked) or the finish (dgamma, dbeta and
dy's coefficients), as conv_gemm's weight gradient closes its split-K sum (conv_gemm.last_arrival):
integer counters and fixed-order sums, the same bits every run, no float atomics.
"""
import enum

import torch
import triton
import triton.language as tl

from . import META_LAUNCHES, autotune
from ._config import compute_capability, dot_precision, multiprocessor_count
from .bn_act import (INVSTD, MEAN, PARTIAL_ROWS, SCALE, SHIFT, Side, activate, activate_grad,
                     activate_grad_from_out, bn_affine, chan_combine, mean_invstd_affine,
                     store_vec, sum_grad_partials, update_running)
from .conv_gemm import (_nhwc_strides, conv_rows, counters, gemm_rows, gemm_stride,
                        implicit_gemm, last_arrival, out_coords, weight_grad_columns,
                        weight_grad_launch, weight_grad_program)
from .tiles import conv_candidates, conv_splits, conv_tile, pair_tiles, wide_offsets


class Epilogue(enum.IntEnum):
    """What a GEMM does with its accumulator (the kernels' OUT_MODE)."""

    ACT = 0  # out = act(acc + bias)
    BN_BATCH = 1  # y = acc and its statistics; the finalize (training BN)
    BN_ACT_GRAD = 2  # a BN layer's output gradient g and its backward sums; their finish
    ACT_GRAD = 3  # dy = act'(out) * acc of a layer without BN
    BN_RUNNING = 4  # out = act(acc * scale + shift) from the running statistics (eval BN)


EPI_ACT, EPI_BN_BATCH, EPI_BN_ACT_GRAD, EPI_ACT_GRAD, EPI_BN_RUNNING = (
    tl.constexpr(int(e)) for e in Epilogue)


class Momentum(enum.IntEnum):
    """Where the finalize reads BN's running-average factor (MOMENTUM_FROM)."""

    VALUE = 0  # the float argument
    CUMULATIVE = 1  # 1 / (num_batches_tracked + 1): nn.BatchNorm2d's momentum=None
    TENSOR = 2  # a 0-dim tensor on the device


MOMENTUM_CUMULATIVE, MOMENTUM_TENSOR = tl.constexpr(int(Momentum.CUMULATIVE)), tl.constexpr(
    int(Momentum.TENSOR))

@triton.jit
def _chain_conv_kernel(
        # operand A (the input) and what its load applies: its layer's y or output, vec, coef
        x_ptr, ay_ptr, avec_ptr, acoef_ptr,
        # the packed weight [kH, kW, C_in, C_out]
        w_ptr,
        # the output; the epilogue's layer: its y or output, vec, coef and conv bias
        out_ptr, oy_ptr, ovec_ptr, ocoef_ptr, bias_ptr,
        # the epilogue's per-tile partials and ticket counters
        part_ptr, cnt_ptr,
        # the epilogue layer's BN: parameters, state, momentum tensor, parameter gradients
        gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, nbt_ptr, momentum_ptr, dgamma_ptr, dbeta_ptr,
        # sizes (plain arguments: they vary) and scalars
        N, C_in, H, W, C_out, OH, OW, PAD_H, PAD_W, TILES, GROUP_ROWS,
        momentum, unbias, eps, a_slope, o_slope,
        # strides of x (n, h, w, c) and of the weight (kh, kw, k, n)
        sxn, sxh, sxw, sxc, swh, sww, swk, swn,
        # geometry
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        TRANSPOSED: tl.constexpr, PACK_K: tl.constexpr, INT64: tl.constexpr,
        # prologue (bn_act.Operand) and epilogue (Epilogue) with their activations
        A_MODE: tl.constexpr, A_ACT: tl.constexpr, OUT_MODE: tl.constexpr, O_ACT: tl.constexpr,
        # the epilogue layer: conv bias, batch statistics (training), what the BN epilogues write
        HAS_BIAS: tl.constexpr, O_TRAINING: tl.constexpr, WRITE_Y: tl.constexpr,
        UPDATE_RUNNING: tl.constexpr, HAS_NBT: tl.constexpr, MOMENTUM_FROM: tl.constexpr,
        # split-K, products and tile
        SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """:func:`chain_conv_program` on a (row tiles, column blocks, K splits) grid."""
    chain_conv_program(tl.program_id(0), tl.program_id(1), tl.num_programs(0), tl.num_programs(1),
                       tl.program_id(2), tl.num_programs(2),
                       x_ptr, ay_ptr, avec_ptr, acoef_ptr, w_ptr,
                       out_ptr, oy_ptr, ovec_ptr, ocoef_ptr, bias_ptr, part_ptr, cnt_ptr,
                       gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, nbt_ptr, momentum_ptr,
                       dgamma_ptr, dbeta_ptr,
                       N, C_in, H, W, C_out, OH, OW, PAD_H, PAD_W, TILES, GROUP_ROWS,
                       momentum, unbias, eps, a_slope, o_slope,
                       sxn, sxh, sxw, sxc, swh, sww, swk, swn,
                       KH, KW, SH, SW, TRANSPOSED, PACK_K, INT64, A_MODE, A_ACT, OUT_MODE, O_ACT,
                       HAS_BIAS, O_TRAINING, WRITE_Y, UPDATE_RUNNING, HAS_NBT, MOMENTUM_FROM,
                       SPLIT_K, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def chain_conv_program(
        pid_m, pid_n, num_m, num_n, pid_s, num_s,
        x_ptr, ay_ptr, avec_ptr, acoef_ptr, w_ptr,
        out_ptr, oy_ptr, ovec_ptr, ocoef_ptr, bias_ptr, part_ptr, cnt_ptr,
        gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, nbt_ptr, momentum_ptr, dgamma_ptr, dbeta_ptr,
        N, C_in, H, W, C_out, OH, OW, PAD_H, PAD_W, TILES, GROUP_ROWS,
        momentum, unbias, eps, a_slope, o_slope,
        sxn, sxh, sxw, sxc, swh, sww, swk, swn,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        TRANSPOSED: tl.constexpr, PACK_K: tl.constexpr, INT64: tl.constexpr,
        A_MODE: tl.constexpr, A_ACT: tl.constexpr, OUT_MODE: tl.constexpr, O_ACT: tl.constexpr,
        HAS_BIAS: tl.constexpr, O_TRAINING: tl.constexpr, WRITE_Y: tl.constexpr,
        UPDATE_RUNNING: tl.constexpr, HAS_NBT: tl.constexpr, MOMENTUM_FROM: tl.constexpr,
        SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[n, oh, ow, co] = epilogue(sum over taps and ci of A[n, ih, iw, ci] * w[kh, kw, ci, co])
    where ih = oh*SH - PAD_H + kh (Conv2d), or oh = ih*SH - PAD_H + kh (TRANSPOSED,
    phase-decomposed: conv_gemm.gemm_rows), with A = chain_operand(x, A_MODE) and the OUT_MODE
    epilogue. This program computes row tile ``pid_m`` (of ``num_m``) and column block ``pid_n`` (of
    ``num_n``), and with SPLIT_K run ``pid_s`` of the ``num_s`` runs its reduction is cut into (an
    elementwise epilogue only: :func:`_split_k_epilogue`)."""
    row_ok, n, qh, qw, ph, pw, taps_h, taps_w = gemm_rows(pid_m, TILES, N, OH, OW, PAD_H, PAD_W, KH,
                                                          KW, SH, SW, TRANSPOSED, INT64, BLOCK_M)
    co = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < C_out
    acc = implicit_gemm(x_ptr, w_ptr, ay_ptr, avec_ptr, acoef_ptr, row_ok, n, qh, qw, ph, pw,
                        taps_h, taps_w, co, co_ok, C_in, H, W, PAD_H, PAD_W, a_slope,
                        sxn, sxh, sxw, sxc, swh, sww, swk, swn, pid_s, num_s, SPLIT_K, KW, SH,
                        SW, TRANSPOSED, PACK_K, INT64, A_MODE, A_ACT, DOT_PRECISION, BLOCK_M,
                        BLOCK_N, BLOCK_K)

    oh, ow = out_coords(qh, qw, ph, pw, PAD_H, PAD_W, SH, SW, TRANSPOSED)
    ok2 = row_ok[:, None] & co_ok[None, :]
    offs = ((n * OH + oh) * OW + ow)[:, None] * C_out + co[None, :]
    if SPLIT_K:
        _split_k_epilogue(acc, pid_m * num_n + pid_n, pid_s, num_s, part_ptr, cnt_ptr, offs, ok2,
                          co, co_ok, out_ptr, oy_ptr, bias_ptr, o_slope, OUT_MODE, O_ACT, HAS_BIAS,
                          BLOCK_M, BLOCK_N)
    elif OUT_MODE == EPI_ACT or OUT_MODE == EPI_ACT_GRAD:
        _elementwise_epilogue(acc, offs, ok2, co, co_ok, out_ptr, oy_ptr, bias_ptr, o_slope,
                              OUT_MODE, O_ACT, HAS_BIAS)
    elif OUT_MODE == EPI_BN_RUNNING:
        # the values stored and reread, in the output dtype
        _running_bn_epilogue(acc.to(out_ptr.dtype.element_ty).to(tl.float32), offs, ok2, pid_m,
                             co, co_ok, out_ptr, oy_ptr, ovec_ptr, bias_ptr, gamma_ptr, beta_ptr,
                             rmean_ptr, rvar_ptr, C_out, eps, o_slope, O_ACT, HAS_BIAS, WRITE_Y)
    else:
        v = acc.to(out_ptr.dtype.element_ty).to(tl.float32)  # the values stored and reread
        tl.store(out_ptr + offs, v, mask=ok2)
        groups = tl.cdiv(num_m, GROUP_ROWS)
        p_offs = pid_m.to(tl.int64) * C_out + co
        stride = (num_m + groups).to(tl.int64) * C_out  # tile rows, then one row per group
        if OUT_MODE == EPI_BN_BATCH:  # this tile's (count, mean, M2) per channel
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
            dz = tl.where(ok2,
                          activate_grad(y * scale[None, :] + shift[None, :], v, O_ACT, o_slope),
                          0.0)
            tl.store(part_ptr + p_offs, tl.sum(dz, axis=0), mask=co_ok)
            tl.store(part_ptr + stride + p_offs,
                     tl.sum(dz * ((y - mean[None, :]) * invstd[None, :]), axis=0), mask=co_ok)
        group = pid_m // GROUP_ROWS
        first = group * GROUP_ROWS
        members = tl.minimum(GROUP_ROWS, num_m - first)
        # two levels, so that no program walks more than GROUP_ROWS or `groups` rows: the last
        # tile of a group to arrive combines the group's rows into its group row, and the last
        # group of the column block combines the group rows and closes the reduction
        if last_arrival(cnt_ptr + pid_n * groups + group, members):
            g_offs = (num_m + group).to(tl.int64) * C_out + co
            if OUT_MODE == EPI_BN_BATCH:
                total, mean, m2 = chan_combine(part_ptr, first, members, stride, C_out, co, co_ok,
                                               PARTIAL_ROWS, BLOCK_N)
                tl.store(part_ptr + g_offs, total, mask=co_ok)
                tl.store(part_ptr + stride + g_offs, mean, mask=co_ok)
                tl.store(part_ptr + 2 * stride + g_offs, m2, mask=co_ok)
            else:
                dbeta, dgamma = sum_grad_partials(part_ptr, first, members, stride, C_out, co,
                                                  co_ok, PARTIAL_ROWS, BLOCK_N)
                tl.store(part_ptr + g_offs, dbeta, mask=co_ok)
                tl.store(part_ptr + stride + g_offs, dgamma, mask=co_ok)
            column_cnt_ptr = cnt_ptr + num_n * groups
            if last_arrival(column_cnt_ptr + pid_n, groups):
                if OUT_MODE == EPI_BN_BATCH:
                    _finalize(part_ptr, num_m, groups, stride, C_out, co, co_ok, momentum, unbias,
                              eps, gamma_ptr, beta_ptr, bias_ptr, rmean_ptr, rvar_ptr, nbt_ptr,
                              momentum_ptr, ovec_ptr, column_cnt_ptr + num_n, num_n, HAS_BIAS,
                              UPDATE_RUNNING, HAS_NBT, MOMENTUM_FROM, BLOCK_N)
                else:
                    _finish_grad(part_ptr, num_m, groups, stride, C_out, co, co_ok, ovec_ptr,
                                 ocoef_ptr, dgamma_ptr, dbeta_ptr,
                                 1.0 / (N * OH * OW).to(tl.float32), O_TRAINING, BLOCK_N)


@triton.jit
def _elementwise_epilogue(acc, offs, ok2, co, co_ok, out_ptr, oy_ptr, bias_ptr, o_slope,
                          OUT_MODE: tl.constexpr, O_ACT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """The epilogues of a layer without BN: out = act(acc + bias) (ACT), or the gradient through
    the activation from the layer's stored output (ACT_GRAD)."""
    if OUT_MODE == EPI_ACT and HAS_BIAS:  # a BN layer folds its bias into the statistics instead
        acc += tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)[None, :]
    v = acc.to(out_ptr.dtype.element_ty).to(tl.float32)  # the values stored and reread
    if OUT_MODE == EPI_ACT:
        tl.store(out_ptr + offs, activate(v, O_ACT, o_slope), mask=ok2)
    else:
        out = tl.load(oy_ptr + offs, mask=ok2, other=0.0).to(tl.float32)
        tl.store(out_ptr + offs, activate_grad_from_out(out, v, O_ACT, o_slope), mask=ok2)


@triton.jit
def _split_k_epilogue(acc, tile, split, splits, part_ptr, cnt_ptr, offs, ok2, co, co_ok, out_ptr,
                      oy_ptr, bias_ptr, o_slope, OUT_MODE: tl.constexpr, O_ACT: tl.constexpr,
                      HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Split-K: every run stores its float32 sum in its slot of ``tile``'s ``splits`` slots in
    ``part_ptr``; the last to arrive (ticket ``cnt_ptr + tile``) adds the slots in split order,
    whatever the arrival order (deterministic), and runs the elementwise epilogue."""
    size: tl.constexpr = BLOCK_M * BLOCK_N
    local = tl.arange(0, BLOCK_M)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]
    slots = part_ptr + tile.to(tl.int64) * splits * size + local
    tl.store(slots + split * size, acc)
    if last_arrival(cnt_ptr + tile, splits):
        total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for s in range(0, splits):
            total += tl.load(slots + s * size, cache_modifier=".cg")
        _elementwise_epilogue(total, offs, ok2, co, co_ok, out_ptr, oy_ptr, bias_ptr, o_slope,
                              OUT_MODE, O_ACT, HAS_BIAS)


@triton.jit
def _running_bn_epilogue(v, offs, ok2, pid_m, co, co_ok, out_ptr, y_ptr, vec_ptr, bias_ptr,
                         gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, C, eps, slope,
                         ACT: tl.constexpr, HAS_BIAS: tl.constexpr, WRITE_Y: tl.constexpr):
    """Eval BN: out = act(v * scale + shift) with the running statistics (the conv bias, which v
    excludes, folded into the mean); with WRITE_Y also y = v and (row tile 0) the vec, which the
    backward reads."""
    invstd = 1.0 / tl.sqrt(tl.load(rvar_ptr + co, mask=co_ok, other=1.0).to(tl.float32) + eps)
    mean = tl.load(rmean_ptr + co, mask=co_ok, other=0.0).to(tl.float32)
    if HAS_BIAS:
        mean -= tl.load(bias_ptr + co, mask=co_ok, other=0.0).to(tl.float32)
    scale, shift = bn_affine(gamma_ptr, beta_ptr, co, co_ok, mean, invstd)
    tl.store(out_ptr + offs, activate(v * scale[None, :] + shift[None, :], ACT, slope), mask=ok2)
    if WRITE_Y:
        tl.store(y_ptr + offs, v, mask=ok2)
        if pid_m == 0:
            store_vec(vec_ptr, C, co, co_ok, mean, invstd, scale, shift)


@triton.jit
def _finalize(part_ptr, first, rows, stride, C, c, c_ok, momentum, unbias, eps, gamma_ptr,
              beta_ptr, bias_ptr, rmean_ptr, rvar_ptr, nbt_ptr, momentum_ptr, vec_ptr,
              layer_cnt_ptr, column_blocks,
              HAS_BIAS: tl.constexpr, UPDATE_RUNNING: tl.constexpr, HAS_NBT: tl.constexpr,
              MOMENTUM_FROM: tl.constexpr, BLOCK_C: tl.constexpr):
    """BN's finalize for the channels ``c``: Chan's combine of ``rows`` partial rows from row
    ``first`` (the groups' rows), the vec, the
    running stats (the conv bias added back to the batch mean) and, by the last column block to
    finish, num_batches_tracked += 1. The cumulative average reads the count before any block has
    advanced it: 1 / (num_batches_tracked + 1), as nn.BatchNorm2d."""
    total, mean, m2 = chan_combine(part_ptr, first, rows, stride, C, c, c_ok, PARTIAL_ROWS, BLOCK_C)
    mean_invstd_affine(mean, m2, total, c, c_ok, eps, gamma_ptr, beta_ptr, vec_ptr, C)
    if HAS_NBT:
        batches = tl.load(nbt_ptr, cache_modifier=".cg")
    if UPDATE_RUNNING:
        if MOMENTUM_FROM == MOMENTUM_CUMULATIVE:
            momentum = 1.0 / (batches + 1).to(tl.float32)
        elif MOMENTUM_FROM == MOMENTUM_TENSOR:
            momentum = tl.load(momentum_ptr).to(tl.float32)
        update_running(mean, m2, total, c, c_ok, momentum, unbias, bias_ptr, rmean_ptr, rvar_ptr,
                       HAS_BIAS)
    if HAS_NBT:
        if last_arrival(layer_cnt_ptr, column_blocks):
            tl.store(nbt_ptr, batches + 1)


@triton.jit
def _finish_grad(part_ptr, first, rows, stride, C, c, c_ok, vec_ptr, coef_ptr, dgamma_ptr,
                 dbeta_ptr, inv_count, TRAINING: tl.constexpr, BLOCK_C: tl.constexpr):
    """A BN layer's backward sums for the channels ``c`` from ``rows`` partial rows from row
    ``first``: dbeta = sum(dz), dgamma = sum(dz * xhat) and dy's coefficients (zero in eval, where
    the statistics are constants)."""
    dbeta, dgamma = sum_grad_partials(part_ptr, first, rows, stride, C, c, c_ok, PARTIAL_ROWS,
                                      BLOCK_C)
    coef0 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    coef1 = coef0
    if TRAINING:
        scale = tl.load(vec_ptr + SCALE * C + c, mask=c_ok, other=0.0)
        coef0 = -scale * dbeta * inv_count
        coef1 = -scale * dgamma * inv_count
    tl.store(coef_ptr + c, coef0, mask=c_ok)
    tl.store(coef_ptr + C + c, coef1, mask=c_ok)
    tl.store(dgamma_ptr + c, dgamma, mask=c_ok)
    tl.store(dbeta_ptr + c, dbeta, mask=c_ok)


@triton.jit
def _backward_pair_kernel(
        # the input-gradient GEMM: _chain_conv_kernel's arguments
        x_ptr, ay_ptr, avec_ptr, acoef_ptr, w_ptr,
        out_ptr, oy_ptr, ovec_ptr, ocoef_ptr, bias_ptr, part_ptr, cnt_ptr,
        gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, nbt_ptr, momentum_ptr, dgamma_ptr, dbeta_ptr,
        N, C_in, H, W, C_out, OH, OW, PAD_H, PAD_W, TILES, GROUP_ROWS,
        momentum, unbias, eps, a_slope, o_slope,
        sxn, sxh, sxw, sxc, swh, sww, swk, swn,
        # the weight-gradient GEMM: conv_gemm._weight_grad_kernel's arguments, prefixed w_ / W_
        w_x_ptr, w_xy_ptr, w_xvec_ptr, w_xcoef_ptr, w_g_ptr, w_gy_ptr, w_gvec_ptr, w_gcoef_ptr,
        w_dw_ptr, w_part_ptr, w_cnt_ptr,
        w_N, w_C_in, w_H, w_W, w_C_out, w_OH, w_OW, w_PAD_H, w_PAD_W, w_PIXELS_PER_SPLIT,
        w_x_slope, w_g_slope,
        w_sxn, w_sxh, w_sxw, w_sxc, w_sgn, w_sgh, w_sgw, w_sgc, w_sdo, w_sdi, w_sdh, w_sdw,
        # the weight gradient's pixel splits; the input gradient's row tiles
        W_SPLITS, ROWS,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        TRANSPOSED: tl.constexpr, PACK_K: tl.constexpr, INT64: tl.constexpr,
        A_MODE: tl.constexpr, A_ACT: tl.constexpr, OUT_MODE: tl.constexpr, O_ACT: tl.constexpr,
        HAS_BIAS: tl.constexpr, O_TRAINING: tl.constexpr, WRITE_Y: tl.constexpr,
        UPDATE_RUNNING: tl.constexpr, HAS_NBT: tl.constexpr, MOMENTUM_FROM: tl.constexpr,
        SPLIT_K: tl.constexpr, DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        W_KH: tl.constexpr, W_KW: tl.constexpr, W_SH: tl.constexpr, W_SW: tl.constexpr,
        W_X_MODE: tl.constexpr, W_X_ACT: tl.constexpr, W_G_MODE: tl.constexpr,
        W_G_ACT: tl.constexpr, W_SPLIT: tl.constexpr, W_PACK_N: tl.constexpr,
        W_INT64: tl.constexpr,
        W_DOT_PRECISION: tl.constexpr,
        W_BLOCK_M: tl.constexpr, W_BLOCK_N: tl.constexpr, W_BLOCK_K: tl.constexpr):
    """conv_gemm.weight_grad_program on the first programs of a 1-D grid, (tiles, taps, splits) of
    them (their loops are the longest: they start first), :func:`chain_conv_program`
    (ROWS x (C_out / BLOCK_N)) on the rest."""
    pid = tl.program_id(0)
    columns, taps = weight_grad_columns(w_C_in, W_KH, W_KW, W_PACK_N)
    tiles = tl.cdiv(w_C_out, W_BLOCK_M) * tl.cdiv(columns, W_BLOCK_N)
    w_programs = tiles * taps * W_SPLITS
    if pid < w_programs:
        weight_grad_program(pid % tiles, (pid // tiles) % taps, pid // (tiles * taps), W_SPLITS,
                            w_x_ptr, w_xy_ptr, w_xvec_ptr, w_xcoef_ptr,
                            w_g_ptr, w_gy_ptr, w_gvec_ptr, w_gcoef_ptr, w_dw_ptr, w_part_ptr,
                            w_cnt_ptr, w_N, w_C_in, w_H, w_W, w_C_out, w_OH, w_OW, w_PAD_H,
                            w_PAD_W, w_PIXELS_PER_SPLIT, w_x_slope, w_g_slope,
                            w_sxn, w_sxh, w_sxw, w_sxc, w_sgn, w_sgh, w_sgw, w_sgc,
                            w_sdo, w_sdi, w_sdh, w_sdw, W_KH, W_KW, W_SH, W_SW, W_X_MODE, W_X_ACT,
                            W_G_MODE, W_G_ACT, W_SPLIT, W_PACK_N, W_INT64, W_DOT_PRECISION,
                            W_BLOCK_M,
                            W_BLOCK_N, W_BLOCK_K)
    else:
        q = pid - w_programs
        col_blocks = tl.cdiv(C_out, BLOCK_N)
        chain_conv_program(q % ROWS, q // ROWS, ROWS, col_blocks, 0, 1,
                           x_ptr, ay_ptr, avec_ptr, acoef_ptr, w_ptr,
                           out_ptr, oy_ptr, ovec_ptr, ocoef_ptr, bias_ptr, part_ptr, cnt_ptr,
                           gamma_ptr, beta_ptr, rmean_ptr, rvar_ptr, nbt_ptr, momentum_ptr,
                           dgamma_ptr, dbeta_ptr,
                           N, C_in, H, W, C_out, OH, OW, PAD_H, PAD_W, TILES, GROUP_ROWS,
                           momentum, unbias, eps, a_slope, o_slope,
                           sxn, sxh, sxw, sxc, swh, sww, swk, swn,
                           KH, KW, SH, SW, TRANSPOSED, PACK_K, INT64, A_MODE, A_ACT,
                           OUT_MODE, O_ACT,
                           HAS_BIAS, O_TRAINING, WRITE_Y, UPDATE_RUNNING, HAS_NBT, MOMENTUM_FROM,
                           SPLIT_K, DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


# --- launchers ------------------------------------------------------------------------------------

# No finalize program walks more than this many rows of partials per level (of two) while a launch
# has at most its square of row tiles.
FINALIZE_ROWS = 64


def finalize_groups(rows: int):
    """(row tiles per group, groups) of a launch with ``rows`` row tiles."""
    group_rows = max(FINALIZE_ROWS, triton.cdiv(rows, FINALIZE_ROWS))
    return group_rows, triton.cdiv(rows, group_rows)


def conv_tickets(c_out: int, groups: int) -> int:
    """Ticket counters a conv GEMM may use: per column block (BLOCK_N >= 16) one per group of row
    tiles and one for the groups, and one for the layer."""
    return triton.cdiv(c_out, 16) * (groups + 1) + 1


class ConvLaunch:
    """One conv GEMM launch as :func:`conv_launch` plans it: ``args`` (positional), ``constexprs``
    (its tile's included), the ``tile``, the grid's extent (``tiles`` row tiles per phase,
    ``phases``, ``c_out`` columns) and the convolution it computes (``x_shape`` its input's, the
    rest as named), from which the GEMM plan counts its work."""

    def __init__(self, args, constexprs, tile, tiles, phases, splits, x_shape, c_out, out_hw,
                 kernel, stride, transposed, tickets):
        self.args, self.constexprs, self.tile, self.tickets = args, constexprs, tile, tickets
        self.tiles, self.phases, self.splits = tiles, phases, splits
        self.x_shape, self.c_out = x_shape, c_out
        self.out_hw, self.kernel, self.stride, self.transposed = out_hw, kernel, stride, transposed

    @property
    def rows(self) -> int:
        """Row tiles of all phases: the grid's first axis."""
        return self.phases * self.tiles

    def finalize_rows(self) -> int:
        """The most partial rows one program combines to close this launch's reduction (0: none)."""
        if self.constexprs["OUT_MODE"] not in (Epilogue.BN_BATCH, Epilogue.BN_ACT_GRAD):
            return 0
        group_rows, groups = finalize_groups(self.rows)
        return max(min(group_rows, self.rows), groups)

    @property
    def columns(self) -> int:
        return triton.cdiv(self.c_out, self.tile.block_n)

    @property
    def programs(self) -> int:
        """The grid's (row tiles, column blocks, K splits) programs."""
        return self.rows * self.columns * self.splits

    def k_iterations(self):
        """(summed over the programs, the most of one program): the runs of a split reduction
        partition its steps (:func:`phase_steps`)."""
        per_phase = phase_steps(self.kernel, self.stride, self.x_shape[1], self.transposed,
                                self.constexprs["PACK_K"], self.tile.block_k)
        return sum(per_phase) * self.tiles * self.columns, triton.cdiv(max(per_phase), self.splits)

    def useful_flops(self) -> int:
        """The convolution's own multiply-adds x 2, as torch.utils.flop_counter counts them: over
        the input's pixels for a transposed convolution, the output's otherwise."""
        n, c_in, h, w = self.x_shape
        pixels = n * (h * w if self.transposed else self.out_hw[0] * self.out_hw[1])
        return 2 * pixels * c_in * self.c_out * self.kernel[0] * self.kernel[1]


# the epilogues the tile rule tells apart (tiles.conv_tile)
TILE_EPILOGUES = {Epilogue.BN_RUNNING: "running_bn", Epilogue.BN_ACT_GRAD: "bn_grad"}


def phase_steps(kernel, stride, c_in, transposed, pack_k, block_k):
    """The reduction loop's steps of a GEMM row in each phase: its phase's taps
    (conv_gemm.gemm_rows) times the input channels' blocks, or (``pack_k``) the (tap, channel)
    pairs, ``block_k`` at a time."""
    (kh, kw), (sh, sw) = kernel, stride
    if pack_k:
        return [triton.cdiv(kh * kw * c_in, block_k)]
    blocks = triton.cdiv(c_in, block_k)
    if transposed:
        return [triton.cdiv(kh - ph, sh) * triton.cdiv(kw - pw, sw) * blocks
                for ph in range(sh) for pw in range(sw)]
    return [kh * kw * blocks]


def phase_taps(kernel, stride, transposed) -> int:
    """The most taps a GEMM row reduces over: all of them, or a transposed conv's phase's."""
    if not transposed:
        return kernel[0] * kernel[1]
    return triton.cdiv(kernel[0], stride[0]) * triton.cdiv(kernel[1], stride[1])


def conv_launch(a: Side, weight_view, kernel, transposed, stride, padding, out_hw, out: Side,
                bias, bn, bn_grads, tile=None, may_split=True):
    """Plan one conv GEMM launch (:func:`chain_conv`'s arguments, which see); ``tile``: the rule's
    (tiles.conv_tile) unless given; split-K (tiles.conv_splits) where ``may_split``."""
    x = a.tensor
    n, c_in, h, w = x.shape
    c_out = weight_view.shape[3]
    stride = gemm_stride(kernel, stride, (h, w), transposed)
    (sh, sw), (pad_h, pad_w) = stride, padding
    dev = x.device
    precision = dot_precision(x.dtype, dev)
    rows, phases = conv_rows(n, out_hw, stride, transposed)
    tile = tile or conv_tile(rows, phases, c_out, c_in, phase_taps(kernel, stride, transposed),
                             precision == "ieee", multiprocessor_count(dev),
                             compute_capability(dev), TILE_EPILOGUES.get(out.mode, ""),
                             tf32=x.dtype == torch.float32 and precision != "ieee")
    tiles = triton.cdiv(rows, tile.block_m)
    group_rows, groups = finalize_groups(phases * tiles)
    pack_k = not transposed and c_in < tile.block_k
    columns = triton.cdiv(c_out, tile.block_n)
    splits = 1 if not may_split else conv_splits(
        phases * tiles * columns,
        max(phase_steps(kernel, stride, c_in, transposed, pack_k, tile.block_k)),
        multiprocessor_count(dev), out.mode in (Epilogue.ACT, Epilogue.ACT_GRAD))
    partials, tickets = None, conv_tickets(c_out, groups)
    if splits > 1:  # a float32 tile per run, a ticket per tile (_split_k_epilogue)
        partials = torch.empty(phases * tiles * columns * splits * tile.block_m * tile.block_n,
                               device=dev, dtype=torch.float32)
        tickets = phases * tiles * columns
    elif out.mode in (Epilogue.BN_BATCH, Epilogue.BN_ACT_GRAD):
        width = 3 if out.mode == Epilogue.BN_BATCH else 2
        partials = torch.empty((width, phases * tiles + groups, c_out), device=dev,
                               dtype=torch.float32)
    if out.mode == Epilogue.BN_ACT_GRAD and None in bn_grads:
        raise ValueError("bn_grads must be two float32 (C_out,) tensors for Epilogue.BN_ACT_GRAD")
    bn_tensors = (bn.gamma, bn.beta, bn.running_mean, bn.running_var, bn.num_batches_tracked,
                  bn.momentum_tensor) if bn is not None else (None,) * 6
    momentum_from = Momentum.VALUE if bn is None else bn.momentum_from()
    if (out.mode == Epilogue.BN_BATCH and momentum_from == Momentum.CUMULATIVE
            and bn.running_mean is not None and bn.num_batches_tracked is None):
        raise ValueError("momentum=None (cumulative average) needs num_batches_tracked")
    fill = lambda t: t if t is not None else out.tensor  # noqa: E731 (placeholders, never read)
    args = (x, a.y, a.vec, a.coef, weight_view, out.tensor, out.y, out.vec, out.coef, fill(bias),
            fill(partials), counters(tickets, dev), *map(fill, bn_tensors),
            *map(fill, bn_grads), n, c_in, h, w, c_out, *out_hw, pad_h, pad_w, tiles, group_rows,
            bn.momentum_value() if bn is not None else 0.0, _unbias(n * out_hw[0] * out_hw[1]),
            bn.eps if bn is not None else 0.0, a.slope, out.slope, *_nhwc_strides(x),
            *weight_view.stride())
    constexprs = dict(KH=kernel[0], KW=kernel[1], SH=sh, SW=sw, TRANSPOSED=transposed,
                      PACK_K=pack_k,
                      INT64=wide_offsets(x, out.tensor, a.y, out.y), A_MODE=a.mode, A_ACT=a.act,
                      OUT_MODE=out.mode, O_ACT=out.act,
                      HAS_BIAS=bias is not None, O_TRAINING=bn is not None and bn.training,
                      WRITE_Y=out.mode == Epilogue.BN_RUNNING and out.y is not out.tensor,
                      UPDATE_RUNNING=bn is not None and bn.running_mean is not None,
                      HAS_NBT=bn is not None and bn.num_batches_tracked is not None,
                      MOMENTUM_FROM=int(momentum_from), SPLIT_K=splits > 1,
                      DOT_PRECISION=precision, **tile.constexprs())
    return ConvLaunch(args, constexprs, tile, tiles, phases, splits, tuple(x.shape), c_out,
                      tuple(out_hw), tuple(kernel), tuple(stride), transposed, tickets)


def chain_conv(a: Side, weight_view, kernel, *, transposed, stride, padding, out_hw, out: Side,
               bias=None, bn=None, bn_grads=(None, None)):
    """One conv GEMM launch into ``out.tensor`` (channels-last (N, C_out, OH, OW)), its epilogue
    ``out.mode`` (an :class:`Epilogue`). ``weight_view``: a ``[kH, kW, C_in, C_out]`` view
    (conv_gemm.pack_weight / swap_kn); ``bias``: the conv bias (ACT, BN_BATCH, BN_RUNNING) or None;
    ``bn``: the output side layer's chain.BatchNorm (BN_BATCH, BN_RUNNING; BN_ACT_GRAD reads its
    ``training``); BN_ACT_GRAD writes its (dgamma, dbeta) into ``bn_grads`` (required then)."""
    def plan(tile=None):
        return conv_launch(a, weight_view, kernel, transposed, stride, padding, out_hw, out, bias,
                           bn, bn_grads, tile)

    launch = plan()
    if autotune.wanted(a.tensor.device):
        key = ("_chain_conv_kernel", launch.x_shape, launch.c_out, launch.out_hw,
               tuple(sorted(launch.constexprs.items())))
        state = [t for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)
                 if t is not None] if bn is not None else []
        tile = autotune.fastest_tile(key, conv_candidates(launch.tile),
                                     lambda t: _launch_conv(plan(t)), state, a.tensor.device)
        launch = plan(tile)
    META_LAUNCHES.note("_chain_conv_kernel", launch)
    _launch_conv(launch)


def _launch_conv(launch: ConvLaunch):
    grid = (launch.rows, launch.columns, launch.splits)
    _chain_conv_kernel[grid](*launch.args, **launch.constexprs, **launch.tile.options())


def chain_backward_pair(a: Side, weight_view, kernel, *, transposed, stride, padding, out_hw,
                        out: Side, wgrad_x: Side, wgrad_g: Side, dw, bn=None,
                        bn_grads=(None, None)):
    """A layer's two backward GEMMs in one launch: its input gradient (:func:`chain_conv`'s
    arguments, ``bn`` only for its ``training``) and its weight gradient
    (conv_gemm.conv2d_weight_grad of ``wgrad_x``, ``wgrad_g`` into ``dw``, same kernel, stride and
    padding). They are independent: the first writes the previous layer's output gradient and
    backward sums, the second reads this layer's dy and the previous layer's forward numbers. One
    launch instead of two, and each tile of dy is read from L2 by both."""
    rows, phases = conv_rows(a.tensor.shape[0], out_hw,
                             gemm_stride(kernel, stride, a.tensor.shape[2:], transposed),
                             transposed)
    w_x, w_g = wgrad_x.tensor, wgrad_g.tensor
    precision = dot_precision(w_x.dtype, w_x.device)
    conv_tile_, wgrad_tile = pair_tiles(rows, phases, weight_view.shape[3], weight_view.shape[2],
                                        kernel[0] * kernel[1], w_g.shape[1], w_x.shape[1],
                                        precision == "ieee", multiprocessor_count(w_x.device),
                                        compute_capability(w_x.device),
                                        tf32=w_x.dtype == torch.float32 and precision != "ieee")
    conv = conv_launch(a, weight_view, kernel, transposed, stride, padding, out_hw, out, None, bn,
                       bn_grads, tile=conv_tile_, may_split=False)  # one 1-D grid: no K splits
    wgrad = weight_grad_launch(wgrad_x, wgrad_g, kernel, stride, padding, out=dw,
                               tickets_from=conv.tickets, tile=wgrad_tile)
    w_constexprs = {"W_" + k: v for k, v in wgrad.constexprs.items()}
    META_LAUNCHES.note("_backward_pair_kernel", wgrad, conv)
    _backward_pair_kernel[(wgrad.programs + conv.programs,)](
        *conv.args, *wgrad.args, wgrad.splits, conv.rows, **conv.constexprs, **w_constexprs,
        **conv_tile_.options())


def _unbias(count: int) -> float:
    """M / (M - 1): the running variance is unbiased (M >= 2 in training, checked at the
    boundary)."""
    return count / max(count - 1, 1)
