"""One channels-last implicit-GEMM core for Conv2d and ConvTranspose2d (groups=1, dilation=1):
forward, input gradient (each direction's input gradient is the other direction's forward) and
weight gradient (a GEMM over pixels with a deterministic split-K).

Layout: activations NHWC (any strides whose channel stride is 1; Triton specialises a stride of 1,
so a channel row is one contiguous vector load), weights packed ``[kH, kW, K, N]``: K (the GEMM's
reduction channels) and N (its output channels) contiguous, so every operand tile is a block of
contiguous rows that Triton can pipeline with cp.async. GEMM rows are output pixels, columns output
channels, and K runs over taps x input channels in one flat loop (pipelined across taps too).
Accumulation is float32. This module holds the main loops and the layout; the kernels that wrap
the forward / input-gradient loop with a layer's prologue and epilogue are in chain_gemm.
"""
import torch
import triton
import triton.language as tl

from . import META_LAUNCHES
from ._config import compute_capability, dot_precision, multiprocessor_count
from .bn_act import AS_STORED, Side, chain_operand
from .tiles import MAX_K_ITERATIONS, Tile, weight_grad_tile, wide_offsets

@triton.jit
def wide(x, INT64: tl.constexpr):
    """``x`` as 64-bit offsets when the launcher found a tensor past 2**31 elements
    (tiles.wide_offsets), else as it is: 32-bit offsets take half the registers of a tile's."""
    if INT64:
        return x.to(tl.int64)
    return x


@triton.jit
def gemm_rows(pid_m, TILES, N, OH, OW, PAD_H, PAD_W, KH: tl.constexpr, KW: tl.constexpr,
              SH: tl.constexpr, SW: tl.constexpr, TRANSPOSED: tl.constexpr, INT64: tl.constexpr,
              BLOCK_M: tl.constexpr):
    """The output pixels of GEMM row tile ``pid_m``: (row_ok, n, qh, qw, ph, pw, taps_h, taps_w).

    Conv2d: rows are pixels (n, qh, qw) = (n, oh, ow) of the output. TRANSPOSED uses phase
    decomposition: row tile pid_m serves one output phase (ph, pw) = ((oh+PAD_H) % SH,
    (ow+PAD_W) % SW) (``TILES`` tiles per phase); writing oh + PAD_H = qh*SH + ph, the taps that
    contribute are kh = ph + jh*SH with ih = qh - jh (taps_h x taps_w of them), so the loop visits
    only those, never a zero."""
    if TRANSPOSED:
        phase = pid_m // TILES
        ph = phase // SW
        pw = phase % SW
        qh0 = (PAD_H - ph + SH - 1) // SH  # first qh with oh >= 0
        qw0 = (PAD_W - pw + SW - 1) // SW
        rows_h = (OH + PAD_H - ph + SH - 1) // SH - qh0  # output rows of this phase (may be 0)
        rows_w = (OW + PAD_W - pw + SW - 1) // SW - qw0
        taps_h = (KH - ph + SH - 1) // SH
        taps_w = (KW - pw + SW - 1) // SW
        rows = (pid_m % TILES) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N * rows_h * rows_w
        rows_h = tl.maximum(rows_h, 1)  # no division by zero when a phase is empty
        rows_w = tl.maximum(rows_w, 1)
    else:
        ph = 0
        pw = 0
        qh0 = 0
        qw0 = 0
        rows_h = OH
        rows_w = OW
        taps_h = KH
        taps_w = KW
        rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < N * OH * OW
    qw = qw0 + rows % rows_w
    qh = qh0 + (rows // rows_w) % rows_h
    n = wide(rows // (rows_w * rows_h), INT64)
    return row_ok, n, qh, qw, ph, pw, taps_h, taps_w


@triton.jit
def tap_coords(it, k_blocks, taps_w, qh, qw, ph, pw, PAD_H, PAD_W, SH: tl.constexpr,
               SW: tl.constexpr, TRANSPOSED: tl.constexpr, BLOCK_K: tl.constexpr):
    """Step ``it`` of the flat (tap, channel block) loop: (ci, ih, iw, kh, kw), the input channels,
    the input pixel of each row and the weight tap."""
    tap = it // k_blocks
    ci = (it - tap * k_blocks) * BLOCK_K + tl.arange(0, BLOCK_K)
    jh = tap // taps_w
    jw = tap - jh * taps_w
    if TRANSPOSED:
        ih = qh - jh
        iw = qw - jw
        kh = ph + jh * SH
        kw = pw + jw * SW
    else:
        ih = qh * SH - PAD_H + jh
        iw = qw * SW - PAD_W + jw
        kh = jh
        kw = jw
    return ci, ih, iw, kh, kw


@triton.jit
def out_coords(qh, qw, ph, pw, PAD_H, PAD_W, SH: tl.constexpr, SW: tl.constexpr,
               TRANSPOSED: tl.constexpr):
    """The output pixel (oh, ow) of each GEMM row."""
    if TRANSPOSED:
        return qh * SH + ph - PAD_H, qw * SW + pw - PAD_W
    return qh, qw


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr):
    """acc + a @ b: on the tensor cores (``tl.dot``), or, for fewer than 16 columns (which
    ``tl.dot`` cannot take: a 3-channel layer would pad to 16), as float32 FMAs on the CUDA
    cores."""
    if BLOCK_N < 16:
        return acc + tl.sum(a.to(tl.float32)[:, :, None] * b.to(tl.float32)[None, :, :], axis=1)
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def split_range(steps, split, splits):
    """The loop steps [first, last) of run ``split`` of ``splits`` (the last runs may be shorter or
    empty)."""
    per = tl.cdiv(steps, splits)
    first = split * per
    return first, tl.minimum(first + per, steps)


@triton.jit
def implicit_gemm(x_ptr, w_ptr, ay_ptr, avec_ptr, acoef_ptr, row_ok, n, qh, qw, ph, pw, taps_h,
                  taps_w, co, co_ok, C_in, H, W, PAD_H, PAD_W, a_slope, sxn, sxh, sxw, sxc,
                  swh, sww, swk, swn, split, splits, SPLIT_K: tl.constexpr, KW: tl.constexpr,
                  SH: tl.constexpr, SW: tl.constexpr,
                  TRANSPOSED: tl.constexpr, PACK_K: tl.constexpr, INT64: tl.constexpr,
                  A_MODE: tl.constexpr, A_ACT: tl.constexpr, DOT_PRECISION: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """The float32 [BLOCK_M, BLOCK_N] accumulator of the GEMM rows of :func:`gemm_rows` and the
    output channels ``co``: one flat loop over (tap, input channel block), each A tile loaded
    through bn_act.chain_operand(A_MODE) (``ay_ptr``/``avec_ptr``/``acoef_ptr``: its layer's y or
    output, vec and coef). PACK_K (a Conv2d with fewer input channels than BLOCK_K: an image) runs K
    as (tap, channel) pairs, BLOCK_K of them per step, so no step pads a tap's few channels.
    SPLIT_K: the loop's steps are cut into ``splits`` equal runs; this sums run ``split`` (a
    constexpr, so that an unsplit loop keeps its constant start: its registers are counted)."""
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if PACK_K:
        k_total = taps_h * taps_w * C_in
        k_first = 0
        k_last = k_total
        if SPLIT_K:
            first, last = split_range(tl.cdiv(k_total, BLOCK_K), split, splits)
            k_first = first * BLOCK_K
            k_last = tl.minimum(last * BLOCK_K, k_total)
        for k0 in range(k_first, k_last, BLOCK_K):
            k = k0 + tl.arange(0, BLOCK_K)
            k_ok = k < k_total
            tap = k // C_in
            ci = k - tap * C_in
            kh = tap // KW
            kw = tap - kh * KW
            ih = qh[:, None] * SH - PAD_H + kh[None, :]
            iw = qw[:, None] * SW - PAD_W + kw[None, :]
            a_ok = (row_ok[:, None] & k_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0)
                    & (iw < W))
            a = tl.load(x_ptr + n[:, None] * sxn + wide(ih, INT64) * sxh + wide(iw, INT64) * sxw
                        + ci[None, :] * sxc, mask=a_ok, other=0.0)
            if A_MODE != AS_STORED:
                pix = (n[:, None] * H + ih) * W + iw
                a = chain_operand(a.to(tl.float32), A_MODE, A_ACT, a_slope, ay_ptr,
                                  pix * C_in + ci[None, :], avec_ptr, acoef_ptr, C_in, ci, k_ok,
                                  a_ok).to(x_ptr.dtype.element_ty)
            b = tl.load(w_ptr + (kh * swh + kw * sww + ci * swk)[:, None] + co[None, :] * swn,
                        mask=k_ok[:, None] & co_ok[None, :], other=0.0)
            acc = mma(a, b, acc, DOT_PRECISION, BLOCK_N)
        return acc
    k_blocks = tl.cdiv(C_in, BLOCK_K)
    first = 0
    last = taps_h * taps_w * k_blocks
    if SPLIT_K:
        first, last = split_range(last, split, splits)
    for it in range(first, last):
        ci, ih, iw, kh, kw = tap_coords(it, k_blocks, taps_w, qh, qw, ph, pw, PAD_H, PAD_W, SH, SW,
                                        TRANSPOSED, BLOCK_K)
        ci_ok = ci < C_in
        ok = row_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        x_rows = x_ptr + n * sxn + wide(ih, INT64) * sxh + wide(iw, INT64) * sxw
        a_ok = ok[:, None] & ci_ok[None, :]
        a = tl.load(x_rows[:, None] + ci[None, :] * sxc, mask=a_ok, other=0.0)
        if A_MODE != AS_STORED:
            pix = (n * H + ih) * W + iw
            a = chain_operand(a.to(tl.float32), A_MODE, A_ACT, a_slope, ay_ptr,
                              pix[:, None] * C_in + ci[None, :], avec_ptr, acoef_ptr, C_in, ci,
                              ci_ok, a_ok).to(x_ptr.dtype.element_ty)
        b = tl.load(w_ptr + kh * swh + kw * sww + ci[:, None] * swk + co[None, :] * swn,
                    mask=ci_ok[:, None] & co_ok[None, :], other=0.0)
        acc = mma(a, b, acc, DOT_PRECISION, BLOCK_N)
    return acc


def _check_rows(count: int, what: str):
    if count >= 2**31 - 2**16:
        raise ValueError(f"{what} = {count} pixels is beyond the int32 row index of these kernels")


def channels_last(x: torch.Tensor) -> torch.Tensor:
    """x itself when its channels are contiguous (NHWC strides, or any view with channel stride 1),
    else one channels-last copy."""
    if x.stride(1) == 1 or x.shape[1] == 1:
        return x
    return x.contiguous(memory_format=torch.channels_last)


def _nhwc_strides(x):
    return x.stride(0), x.stride(2), x.stride(3), x.stride(1)


def pack_weight(weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """The forward's GEMM operand, a ``[kH, kW, K, N]`` view of a parameter in Conv2d layout
    ``[G, I, kH, kW]`` (nn.ConvTranspose2d's ``[C_in, C_out, kH, kW]`` is the Conv2d layout of its
    adjoint): a Conv2d-geometry GEMM reduces over I and writes G, a transposed one the reverse. The
    input gradient reads the same tensor with K and N swapped (:func:`swap_kn`). Operand tiles are
    contiguous rows when K or N has stride 1, as in a channels-last parameter (which
    ``aigc_fast.fuse`` makes): then this is a view, else one packed copy."""
    view = weight.permute(2, 3, 0, 1) if transposed else weight.permute(2, 3, 1, 0)
    return view if 1 in (view.stride(2), view.stride(3)) else view.contiguous()


def swap_kn(packed: torch.Tensor) -> torch.Tensor:
    """The operand of the other direction's GEMM: a view, no copy (its K is then contiguous)."""
    return packed.transpose(2, 3)


def gemm_stride(kernel, stride, in_hw, transposed):
    """The stride a GEMM runs a convolution with: its own, but a transposed one whose input is one
    pixel along a side runs that side with stride = kernel (the same output: every output pixel
    then reads exactly one tap, so each of its kernel-many phases is a dense GEMM over K = C_in,
    where stride 1 would loop over every tap and find all but one out of the input). This is G's
    first layer (z, 1x1 -> 4x4) and the input gradient of D's last (4x4 -> 1x1)."""
    return tuple(k if transposed and size == 1 and s < k else s
                 for k, s, size in zip(kernel, stride, in_hw))


def conv_rows(n, out_hw, stride, transposed):
    """(GEMM rows per phase, phases) of a convolution: with TRANSPOSED every phase gets the row
    count of the largest one (the statistics partials have one row per row tile of every phase)."""
    oh, ow = out_hw
    _check_rows(n * oh * ow, "N*OH*OW")
    if not transposed:
        return n * oh * ow, 1
    return n * triton.cdiv(oh, stride[0]) * triton.cdiv(ow, stride[1]), stride[0] * stride[1]


def empty_nhwc(n, c, hw, like):
    """A fresh channels-last (n, c, *hw) tensor of ``like``'s dtype and device."""
    return torch.empty((n, c, *hw), device=like.device, dtype=like.dtype,
                       memory_format=torch.channels_last)


def _split_count(pixels: int, tiles: int, operands: int, weights: int, block_k: int,
                 device: torch.device) -> int:
    """Split-K factor: enough programs to fill the GPU twice over, each summing >= 512 pixels, and
    float32 partials (``weights`` elements per split) that move no more than the ``operands``
    elements the GEMM reads (small late layers would otherwise be dominated by partials); and in
    any case enough splits that no program loops more than MAX_K_ITERATIONS times."""
    wanted = max(1, 2 * multiprocessor_count(device) // max(tiles, 1))
    longest = triton.cdiv(pixels, MAX_K_ITERATIONS * block_k)
    return max(longest, min(wanted, pixels // 512, operands // weights))


# --- ticket counters: a reduction closed by the last program to arrive ----------------------------

# int32 counters per device, each 0 between launches (the program that closes a reduction resets
# its own); enough for every launch of the kernels here
_COUNTERS = 1 << 16
_counters_by_device = {}


def counters(count: int, device: torch.device) -> torch.Tensor:
    """The first ``count`` of ``device``'s ticket counters (a view: a launch is charged only what
    it may touch). A launch that fails midway may leave some set: see :func:`reset_counters`."""
    if count > _COUNTERS:
        raise ValueError(f"a launch needs {count} ticket counters, more than the {_COUNTERS} kept")
    found = _counters_by_device.get(device)
    if found is None:
        found = _counters_by_device[device] = torch.zeros(_COUNTERS, device=device,
                                                          dtype=torch.int32)
    return found[:count]


def reset_counters(device: torch.device):
    """Zero the counters of ``device`` in place (after a failed launch; in place, since a captured
    CUDA graph holds their address)."""
    found = _counters_by_device.get(device)
    if found is not None:
        found.zero_()


@triton.jit
def last_arrival(cnt_ptr, arrivals):
    """Whether this program is the last of ``arrivals`` programs to reach ``cnt_ptr`` (which it then
    resets to 0 for the next launch). The barrier puts every thread's stores before the ticket,
    whose acquire-release semantics make them visible to the last program (which reads its peers'
    results with ``.cg`` loads, past the L1)."""
    tl.debug_barrier()
    last = tl.atomic_add(cnt_ptr, 1, sem="acq_rel") == arrivals - 1
    if last:
        tl.atomic_xchg(cnt_ptr, 0, sem="relaxed")
    return last


@triton.jit
def _weight_grad_kernel(
        # operand X and what its load applies (bn_act.chain_operand: y or output, vec, coef)
        x_ptr, xy_ptr, xvec_ptr, xcoef_ptr,
        # operand G, likewise
        g_ptr, gy_ptr, gvec_ptr, gcoef_ptr,
        # the output, the split-K partials and their ticket counters
        dw_ptr, part_ptr, cnt_ptr,
        # sizes (plain arguments) and the two operands' activation slopes
        N, C_in, H, W, C_out, OH, OW, PAD_H, PAD_W, PIXELS_PER_SPLIT, x_slope, g_slope,
        # strides: X and G (n, h, w, c), dw (C_out, C_in, kH, kW)
        sxn, sxh, sxw, sxc, sgn, sgh, sgw, sgc, sdo, sdi, sdh, sdw,
        # geometry, operand modes, split-K, products, tile
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        X_MODE: tl.constexpr, X_ACT: tl.constexpr, G_MODE: tl.constexpr, G_ACT: tl.constexpr,
        SPLIT: tl.constexpr, PACK_N: tl.constexpr, INT64: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """:func:`weight_grad_program` on a (tiles, taps, splits) grid (taps 1 with PACK_N)."""
    weight_grad_program(tl.program_id(0), tl.program_id(1), tl.program_id(2), tl.num_programs(2),
                        x_ptr, xy_ptr, xvec_ptr, xcoef_ptr, g_ptr, gy_ptr, gvec_ptr, gcoef_ptr,
                        dw_ptr, part_ptr, cnt_ptr,
                        N, C_in, H, W, C_out, OH, OW, PAD_H, PAD_W, PIXELS_PER_SPLIT, x_slope,
                        g_slope, sxn, sxh, sxw, sxc, sgn, sgh, sgw, sgc, sdo, sdi, sdh, sdw,
                        KH, KW, SH, SW, X_MODE, X_ACT, G_MODE, G_ACT, SPLIT, PACK_N, INT64,
                        DOT_PRECISION, BLOCK_M, BLOCK_N, BLOCK_K)


@triton.jit
def weight_grad_columns(C_in, KH: tl.constexpr, KW: tl.constexpr, PACK_N: tl.constexpr):
    """(columns per tap, taps on the grid) of a weight gradient: C_in columns for each tap, or with
    PACK_N all (tap, channel) pairs as columns of one grid tap."""
    if PACK_N:
        return KH * KW * C_in, 1
    return C_in, KH * KW


@triton.jit
def weight_grad_program(
        pid_mn, tap, split, splits,
        x_ptr, xy_ptr, xvec_ptr, xcoef_ptr, g_ptr, gy_ptr, gvec_ptr, gcoef_ptr,
        dw_ptr, part_ptr, cnt_ptr,
        N, C_in, H, W, C_out, OH, OW, PAD_H, PAD_W, PIXELS_PER_SPLIT, x_slope, g_slope,
        sxn, sxh, sxw, sxc, sgn, sgh, sgw, sgc, sdo, sdi, sdh, sdw,
        KH: tl.constexpr, KW: tl.constexpr, SH: tl.constexpr, SW: tl.constexpr,
        X_MODE: tl.constexpr, X_ACT: tl.constexpr, G_MODE: tl.constexpr, G_ACT: tl.constexpr,
        SPLIT: tl.constexpr, PACK_N: tl.constexpr, INT64: tl.constexpr,
        DOT_PRECISION: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """dw[co, ci, kh, kw] = sum over output pixels p = (n, oh, ow) of G[n, oh, ow, co] *
    X[n, oh*SH-PAD_H+kh, ow*SW-PAD_W+kw, ci] (Conv2d geometry; a ConvTranspose2d swaps the
    operands): one GEMM per tap, K = pixels, both operand tiles rows of contiguous channels, with
    X = chain_operand(x, X_MODE) and G = chain_operand(g, G_MODE) (bn_act); PACK_N (an image's few
    channels) takes the (tap, channel) pairs as the columns of one GEMM, so no tile pads a tap's
    channels. With SPLIT, program axis 2 splits the pixels: each split stores float32 partials,
    and the last split to finish a tile adds them in split order into dw (any strides ``sd*``):
    the same bits every run. This program computes (co, column) tile ``pid_mn`` of tap ``tap``
    over pixel split ``split`` of ``splits``."""
    num_m = tl.cdiv(C_out, BLOCK_M)
    columns, _ = weight_grad_columns(C_in, KH, KW, PACK_N)
    co = (pid_mn % num_m) * BLOCK_M + tl.arange(0, BLOCK_M)
    j = (pid_mn // num_m) * BLOCK_N + tl.arange(0, BLOCK_N)
    co_ok = co < C_out
    j_ok = j < columns
    if PACK_N:  # each column its own tap
        taps = j // C_in
        ci = j - taps * C_in
        column_taps = taps
    else:  # one tap for the program: its coordinates stay scalars, the rows' 1-D
        taps = tap
        ci = j
        column_taps = j * 0 + tap
    kh = taps // KW
    kw = taps - kh * KW
    p_start = split * PIXELS_PER_SPLIT
    p_end = tl.minimum(p_start + PIXELS_PER_SPLIT, N * OH * OW)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for p0 in range(p_start, p_end, BLOCK_K):
        p = p0 + tl.arange(0, BLOCK_K)
        p_ok = p < p_end
        ow = p % OW
        oh = (p // OW) % OH
        n = wide(p // (OW * OH), INT64)
        g_ok = p_ok[:, None] & co_ok[None, :]
        g = tl.load(g_ptr + (n * sgn + wide(oh, INT64) * sgh + wide(ow, INT64) * sgw)[:, None]
                    + co[None, :] * sgc, mask=g_ok, other=0.0)
        if G_MODE != AS_STORED:
            g = chain_operand(g.to(tl.float32), G_MODE, G_ACT, g_slope, gy_ptr,
                              wide(p, INT64)[:, None] * C_out + co[None, :], gvec_ptr, gcoef_ptr,
                              C_out, co, co_ok, g_ok).to(g_ptr.dtype.element_ty)
        if PACK_N:
            ih = oh[:, None] * SH - PAD_H + kh[None, :]
            iw = ow[:, None] * SW - PAD_W + kw[None, :]
            b_ok = p_ok[:, None] & j_ok[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            pix = (n[:, None] * H + ih) * W + iw
            b_ptrs = (x_ptr + (n * sxn)[:, None] + wide(ih, INT64) * sxh + wide(iw, INT64) * sxw
                      + ci[None, :] * sxc)
        else:
            ih = oh * SH - PAD_H + kh
            iw = ow * SW - PAD_W + kw
            row_ok = p_ok & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            b_ok = row_ok[:, None] & j_ok[None, :]
            pix = ((n * H + ih) * W + iw)[:, None]
            b_ptrs = (x_ptr + (n * sxn + wide(ih, INT64) * sxh + wide(iw, INT64) * sxw)[:, None]
                      + ci[None, :] * sxc)
        b = tl.load(b_ptrs, mask=b_ok, other=0.0)
        if X_MODE != AS_STORED:
            b = chain_operand(b.to(tl.float32), X_MODE, X_ACT, x_slope, xy_ptr,
                              pix * C_in + ci[None, :], xvec_ptr, xcoef_ptr, C_in, ci, j_ok,
                              b_ok).to(x_ptr.dtype.element_ty)
        acc = tl.dot(tl.trans(g), b, acc, input_precision=DOT_PRECISION)
    ok = co_ok[:, None] & j_ok[None, :]
    dw_offs = wide(co, INT64)[:, None] * sdo + (ci * sdi + kh * sdh + kw * sdw)[None, :]
    if SPLIT:
        numel = split.to(tl.int64) * 0 + C_out * C_in * KH * KW  # int64: split * numel may not fit
        offs = (wide(co, INT64)[:, None] * C_in + ci[None, :]) * (KH * KW) + column_taps[None, :]
        tl.store(part_ptr + split * numel + offs, acc, mask=ok)
        if last_arrival(cnt_ptr + pid_mn * (KH * KW) + tap, splits):
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s in range(0, splits):
                total += tl.load(part_ptr + s * numel + offs, mask=ok, other=0.0,
                                 cache_modifier=".cg")
            tl.store(dw_ptr + dw_offs, total, mask=ok)
    else:
        tl.store(dw_ptr + dw_offs, acc, mask=ok)


class WeightGradLaunch:
    """The arguments of one weight-gradient launch (:func:`weight_grad_launch`): ``args``
    (positional), ``constexprs``, the output ``dw``, its ``tile`` and the grid's extent: (C_out,
    columns) tiled by (BLOCK_M, BLOCK_N), ``grid_taps`` and ``splits``; ``per_split`` pixels
    each. Columns are C_in per tap, or (``pack``) the taps x C_in pairs of one grid tap."""

    def __init__(self, dw, args, constexprs, tile: Tile, c_out, c_in, taps, pack, splits,
                 per_split, pixels):
        self.dw, self.args, self.constexprs, self.tile = dw, args, constexprs, tile
        self.c_out, self.c_in, self.taps, self.pack, self.splits = c_out, c_in, taps, pack, splits
        self.per_split, self.pixels = per_split, pixels

    @property
    def grid_taps(self) -> int:
        return 1 if self.pack else self.taps

    @property
    def tiles(self) -> int:
        columns = self.c_in * (self.taps if self.pack else 1)
        return triton.cdiv(self.c_out, self.tile.block_m) * triton.cdiv(columns, self.tile.block_n)

    @property
    def programs(self) -> int:
        return self.tiles * self.grid_taps * self.splits

    def k_iterations(self):
        """(summed over the programs, the most of one program): a program loops over its split's
        pixels, BLOCK_K at a time (the last split may hold fewer)."""
        block_k = self.tile.block_k
        last = self.pixels - (self.splits - 1) * self.per_split
        per_tap_tile = ((self.splits - 1) * triton.cdiv(self.per_split, block_k)
                        + triton.cdiv(last, block_k))
        return per_tap_tile * self.tiles * self.grid_taps, triton.cdiv(self.per_split, block_k)

    def useful_flops(self) -> int:
        """The weight gradient's multiply-adds x 2: every pixel of G against every tap of X."""
        return 2 * self.pixels * self.c_out * self.c_in * self.taps


def weight_grad_launch(x, grad_out, kernel_size, stride, padding, splits=None, out=None,
                       tickets_from=0, tile=None):
    """Plan :func:`conv2d_weight_grad` (its arguments, which see); its ticket counters start at
    ``tickets_from`` (so that another reduction can run in the same launch); ``tile``: the rule's
    (tiles.weight_grad_tile) unless given."""
    x = x if isinstance(x, Side) else Side(x)
    g = grad_out if isinstance(grad_out, Side) else Side(grad_out)
    n, c_in, h, w = x.tensor.shape
    _, c_out, oh, ow = g.tensor.shape
    kh, kw = kernel_size
    (sh, sw), (ph, pw) = stride, padding
    pixels = n * oh * ow
    _check_rows(pixels, "N*OH*OW")
    dev = x.tensor.device
    precision = dot_precision(x.tensor.dtype, dev)
    tile = tile or weight_grad_tile(c_out, c_in, kh * kw, precision == "ieee",
                                    compute_capability(dev))
    pack = c_in < tile.block_n
    tiles = triton.cdiv(c_out, tile.block_m) * triton.cdiv(c_in * (kh * kw if pack else 1),
                                                            tile.block_n)
    if splits is None:
        splits = _split_count(pixels, tiles * (1 if pack else kh * kw),
                              x.tensor.numel() + g.tensor.numel(), c_out * c_in * kh * kw,
                              tile.block_k, dev)
    per_split = triton.cdiv(triton.cdiv(pixels, splits), tile.block_k) * tile.block_k
    splits = triton.cdiv(pixels, per_split)
    dw = out if out is not None else torch.empty((c_out, c_in, kh, kw), device=dev,
                                                 dtype=x.tensor.dtype)
    part = dw if splits == 1 else torch.empty((splits, c_out, c_in, kh, kw), device=dev,
                                               dtype=torch.float32)
    # one counter per (tile, tap): the kernel's is cnt_ptr + tile * KH * KW + tap
    tickets = counters(tickets_from + tiles * kh * kw, dev)[tickets_from:]
    args = (x.tensor, x.y, x.vec, x.coef, g.tensor, g.y, g.vec, g.coef, dw, part, tickets,
            n, c_in, h, w, c_out, oh, ow, ph, pw, per_split, x.slope, g.slope,
            *_nhwc_strides(x.tensor), *_nhwc_strides(g.tensor), *dw.stride())
    constexprs = dict(KH=kh, KW=kw, SH=sh, SW=sw, X_MODE=x.mode, X_ACT=x.act, G_MODE=g.mode,
                      G_ACT=g.act, SPLIT=splits > 1, PACK_N=pack,
                      INT64=wide_offsets(x.tensor, g.tensor, x.y, g.y, dw),
                      DOT_PRECISION=precision,
                      **tile.constexprs())
    return WeightGradLaunch(dw, args, constexprs, tile, c_out, c_in, kh * kw, pack, splits,
                            per_split, pixels)


def conv2d_weight_grad(x, grad_out, kernel_size, stride, padding, splits=None, out=None):
    """The gradient of ``F.conv2d(X, w, None, stride, padding)`` w.r.t. w, given its output
    gradient G: shape (C_out, C_in, kH, kW), into ``out`` (any strides; default contiguous, in x's
    dtype). ``x`` and ``grad_out``: NHWC-strided tensors, or bn_act.Sides that load as X and G (a
    layer's BN and activation, forward or backward, applied in the load). A ConvTranspose2d's
    weight gradient is this with x and grad_out swapped. The pixel sum is split into ``splits``
    contiguous ranges (default: a heuristic) whose float32 partials the launch adds in a fixed
    order."""
    launch = weight_grad_launch(x, grad_out, kernel_size, stride, padding, splits, out)
    META_LAUNCHES.note("_weight_grad_kernel", launch)
    _weight_grad_kernel[(launch.tiles, launch.grid_taps, launch.splits)](
        *launch.args, **launch.constexprs, **launch.tile.options())
    return launch.dw
