"""BatchNorm2d (training statistics or eval affine) and ReLU/LeakyReLU around a producer of the
pre-BN tensor y: the activations, statistics finalize, the normalise+activate apply, the backward
reductions, and the backward itself as a prologue that the gradient GEMMs run on their operand loads
(so dy is never stored).

y is channels-last, a contiguous (M, C) matrix with M = N*H*W (its producer, the convolution core,
allocates it); grad_out may have any strides. Statistics and reductions are float32 partials
combined in a fixed order: no atomics, the same bits every run. Layers without BN use the same
backward with the identity affine (``AFFINE=False``): there y is the layer's output, whose sign is
the activation's input's sign for ReLU and LeakyReLU with a slope >= 0.
"""
import enum

import torch
import triton
import triton.language as tl

from ._config import pow2_block
from .activations import code as activation_code

# A BN layer's per-channel numbers from its forward, one float32 (4, C) "vec" that its neighbours'
# kernels read: MEAN, INVSTD, SCALE, SHIFT (z = y * scale + shift). Its backward's reductions write
# dy's two coefficients into a separate float32 (2, C) "coef" (dy = scale*dz + coef0 + coef1*xhat),
# so that the saved vec is never written after the forward and a graph can be backpropagated again.
VEC_ROWS = ("mean", "invstd", "scale", "shift")
ROW = {name: i for i, name in enumerate(VEC_ROWS)}  # the rows' indices, for the launchers
# the same, for the kernels (which read only constexpr globals)
MEAN, INVSTD, SCALE, SHIFT = map(tl.constexpr, range(len(VEC_ROWS)))

# partial rows a finalize or finish loads per step, at most 64 channels wide: 16 rows of the
# finalize's three float32 tiles build without spills with 4 warps
PARTIAL_ROWS = tl.constexpr(16)


class Operand(enum.IntEnum):
    """How a GEMM operand tile is loaded (:func:`chain_operand`'s MODE), given its layer."""

    AS_STORED = 0  # the tensor as it is
    BN_ACT = 1  # act(y * scale + shift): the forward of a BN layer whose y is stored
    BN_ACT_GRAD = 2  # dy of a BN layer from its output gradient (y, vec and coef read)
    ACT_GRAD = 3  # dy of a layer without BN, act'(out) * g (its output read)


# the same, for the kernels
AS_STORED, BN_ACT, BN_ACT_GRAD, ACT_GRAD = (tl.constexpr(int(m)) for m in Operand)


def new_vec(c, device):
    """A (4, c) float32 vec (rows: VEC_ROWS), written by the kernels."""
    return torch.empty((len(VEC_ROWS), c), device=device, dtype=torch.float32)


def new_coef(c, device):
    """A (2, c) float32 coef (dy's coefficients), written by a backward's reductions."""
    return torch.empty((2, c), device=device, dtype=torch.float32)


class Side:
    """A GEMM operand (or output) and what a kernel does to it in its load (or epilogue):
    ``mode`` (an :class:`Operand`, or an epilogue's code), the layer's ``activation`` name and
    ``slope``, and the layer's saved y (BN) or output (no BN) ``y``, ``vec`` and ``coef``;
    placeholders (the tensor itself) where unused."""

    def __init__(self, tensor, mode=0, activation=None, slope=0.0, y=None, vec=None, coef=None):
        self.tensor, self.mode, self.slope = tensor, int(mode), slope
        self.act = activation_code(activation)
        self.y = y if y is not None else tensor
        self.vec = vec if vec is not None else tensor
        self.coef = coef if coef is not None else tensor


@triton.jit
def activate(z, ACT: tl.constexpr, slope):
    """ReLU (ACT=1), LeakyReLU(slope) (ACT=2) or tanh (ACT=3) of z, keeping NaN as PyTorch does
    (tl.maximum would drop it); ACT=0 is the identity."""
    if ACT == 1:
        z = tl.where((z > 0) | (z != z), z, 0.0)
    elif ACT == 2:
        z = tl.where(z > 0, z, z * slope)  # NaN * slope stays NaN
    elif ACT == 3:  # (1 - e) / (1 + e) with e = exp(-2|z|) <= 1: no overflow, odd by construction
        e = tl.exp(-2.0 * tl.abs(z))
        t = (1.0 - e) / (1.0 + e)
        z = tl.where(z < 0, -t, t)
    return z


@triton.jit
def activate_grad_from_out(out, g, ACT: tl.constexpr, slope):
    """The gradient through ``activate`` given its output ``out`` and the output gradient g: what a
    chain saves for a layer without BN is that output (for ReLU/LeakyReLU with slope >= 0 its sign
    is the input's; tanh' = 1 - tanh^2, as PyTorch's tanh_backward computes it)."""
    if ACT == 3:
        return g * (1.0 - out * out)
    return activate_grad(out, g, ACT, slope)


@triton.jit
def chain_operand(v, MODE: tl.constexpr, ACT: tl.constexpr, slope, y_ptr, y_offs, vec_ptr, coef_ptr,
                  C, c, c_ok, ok):
    """A float32 [pixels, channels ``c``] operand tile ``v`` as a GEMM uses it, given its layer's
    activation and BN (``vec_ptr``/``coef_ptr``: its (4, C) vec and (2, C) coef): MODE AS_STORED as
    it is; BN_ACT act(v*scale+shift), the forward prologue (v is the layer's y); BN_ACT_GRAD the
    backward of a BN layer whose output gradient is v, dy = scale*dz + coef0 + coef1*xhat,
    dz = act'(z)*v with z recomputed from y (at ``y_ptr + y_offs``) exactly as the forward computed
    it; ACT_GRAD the backward of a layer without BN, act'(out)*v (its output at ``y_ptr + y_offs``).
    0 outside ``ok`` (padding)."""
    if MODE == BN_ACT:
        scale = tl.load(vec_ptr + SCALE * C + c, mask=c_ok, other=0.0)
        shift = tl.load(vec_ptr + SHIFT * C + c, mask=c_ok, other=0.0)
        v = activate(v * scale[None, :] + shift[None, :], ACT, slope)
    elif MODE == BN_ACT_GRAD:
        y = tl.load(y_ptr + y_offs, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(vec_ptr + MEAN * C + c, mask=c_ok, other=0.0)
        invstd = tl.load(vec_ptr + INVSTD * C + c, mask=c_ok, other=0.0)
        scale = tl.load(vec_ptr + SCALE * C + c, mask=c_ok, other=0.0)
        shift = tl.load(vec_ptr + SHIFT * C + c, mask=c_ok, other=0.0)
        dz = activate_grad(y * scale[None, :] + shift[None, :], v, ACT, slope)
        v = scale[None, :] * dz
        v += (tl.load(coef_ptr + c, mask=c_ok, other=0.0)[None, :]
              + tl.load(coef_ptr + C + c, mask=c_ok, other=0.0)[None, :]
              * ((y - mean[None, :]) * invstd[None, :]))
    elif MODE == ACT_GRAD:
        out = tl.load(y_ptr + y_offs, mask=ok, other=0.0).to(tl.float32)
        v = activate_grad_from_out(out, v, ACT, slope)
    return tl.where(ok, v, 0.0)


@triton.jit
def activate_grad(z, g, ACT: tl.constexpr, slope):
    """The gradient through ``activate`` at z given the output gradient g, as PyTorch's
    threshold_backward / leaky_relu_backward compute it (z > 0 picks g)."""
    if ACT == 1:
        g = tl.where(z > 0, g, 0.0)
    elif ACT == 2:
        g = tl.where(z > 0, g, g * slope)
    elif ACT == 3:
        t = activate(z, ACT, slope)
        g = g * (1.0 - t * t)
    return g


@triton.jit
def scale_shift(gamma, beta, mean, invstd):
    """BN as one affine map: z = y * scale + shift."""
    scale = gamma * invstd
    return scale, beta - mean * scale


@triton.jit
def chan_combine(part_ptr, first, T, stride, C, c, c_ok, BLOCK_T: tl.constexpr,
                 BLOCK_C: tl.constexpr):
    """(count, mean, M2) per channel ``c`` from T (count, mean, M2) partial rows from row ``first``
    of a float32 (3, rows, C) buffer (``stride`` = rows x C): Chan's parallel combine, rows in
    ascending order, BLOCK_T at a time (a block is combined about its own mean, then merged into
    the running total). Stays exact when |mean| >> std. The partial loads bypass L1 (``.cg``): a
    chain's producer reads its peers' partials in the same launch."""
    total = tl.zeros((BLOCK_C,), dtype=tl.float32)
    mean = tl.zeros((BLOCK_C,), dtype=tl.float32)
    m2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = (t < T)[:, None] & c_ok[None, :]
        offs = (first + t).to(tl.int64)[:, None] * C + c[None, :]
        cnt = tl.load(part_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg")
        avg = tl.load(part_ptr + stride + offs, mask=ok, other=0.0, cache_modifier=".cg")
        dev2 = tl.load(part_ptr + 2 * stride + offs, mask=ok, other=0.0, cache_modifier=".cg")
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
    return total, mean, m2


@triton.jit
def bn_affine(gamma_ptr, beta_ptr, c, c_ok, mean, invstd):
    """(scale, shift) of the channels ``c``: BN with these statistics as one affine map."""
    gamma = tl.load(gamma_ptr + c, mask=c_ok, other=1.0).to(tl.float32)
    beta = tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    return scale_shift(gamma, beta, mean, invstd)


@triton.jit
def store_vec(vec_ptr, C, c, c_ok, mean, invstd, scale, shift):
    """The vec rows of the channels ``c``."""
    tl.store(vec_ptr + MEAN * C + c, mean, mask=c_ok)
    tl.store(vec_ptr + INVSTD * C + c, invstd, mask=c_ok)
    tl.store(vec_ptr + SCALE * C + c, scale, mask=c_ok)
    tl.store(vec_ptr + SHIFT * C + c, shift, mask=c_ok)


@triton.jit
def mean_invstd_affine(mean, m2, total, c, c_ok, eps, gamma_ptr, beta_ptr, vec_ptr, C):
    """Store into the vec at ``vec_ptr`` the mean, invstd = 1/sqrt(biased var + eps) and BN's
    affine map (scale, shift) of the channels ``c`` from their combined statistics."""
    var = m2 / tl.maximum(total, 1.0)  # total >= 2 on real channels; masked lanes stay finite
    invstd = 1.0 / tl.sqrt(var + eps)
    scale, shift = bn_affine(gamma_ptr, beta_ptr, c, c_ok, mean, invstd)
    store_vec(vec_ptr, C, c, c_ok, mean, invstd, scale, shift)


@triton.jit
def update_running(mean, m2, total, c, c_ok, momentum, unbias, bias_ptr, rmean_ptr, rvar_ptr,
                   HAS_BIAS: tl.constexpr):
    """running = (1 - momentum) * running + momentum * batch, with the unbiased variance
    (``unbias`` = M / (M - 1)) and the conv bias added back to the batch mean."""
    var = m2 / tl.maximum(total, 1.0)
    batch_mean = mean
    if HAS_BIAS:
        batch_mean += tl.load(bias_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    rmean = tl.load(rmean_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    rvar = tl.load(rvar_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
    tl.store(rmean_ptr + c, (1.0 - momentum) * rmean + momentum * batch_mean, mask=c_ok)
    tl.store(rvar_ptr + c, (1.0 - momentum) * rvar + momentum * (var * unbias), mask=c_ok)


@triton.jit
def _pixel_channel_tile(M, C, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """This program's (pixels, channels) tile of a channels-last (M, C) tensor: indices and
    masks."""
    p = tl.program_id(0) * BLOCK_P + tl.arange(0, BLOCK_P)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    ok = (p < M)[:, None] & c_ok[None, :]
    return p, c, c_ok, ok, p.to(tl.int64)[:, None] * C + c[None, :]


@triton.jit
def _apply_kernel(y_ptr, affine_ptr, out_ptr, M, C, slope, ACT: tl.constexpr,
                  BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """out = act(y * scale + shift) over a (pixels, channels) tile."""
    _, c, c_ok, ok, offs = _pixel_channel_tile(M, C, BLOCK_P, BLOCK_C)
    y = tl.load(y_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    scale = tl.load(affine_ptr + c, mask=c_ok, other=0.0)
    shift = tl.load(affine_ptr + C + c, mask=c_ok, other=0.0)
    tl.store(out_ptr + offs, activate(y * scale[None, :] + shift[None, :], ACT, slope), mask=ok)


@triton.jit
def bn_act_grad(g, y_ptr, y_offs, ok, c, c_ok, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, slope,
                ACT: tl.constexpr, AFFINE: tl.constexpr):
    """For a [pixels, channels] tile of the output gradient g (float32; y at ``y_offs``, channels
    ``c``): dz = g * act'(z), xhat and the channels' scale, with z recomputed from y exactly as the
    forward computed it (same scale and shift, same rounding). Without AFFINE, z = y, xhat = 0 and
    scale = 1 (and y is not read without an activation either)."""
    scale = tl.zeros_like(c).to(tl.float32) + 1.0
    xhat = tl.zeros_like(g)
    dz = g
    if AFFINE:
        y = tl.load(y_ptr + y_offs, mask=ok, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + c, mask=c_ok, other=0.0)
        invstd = tl.load(invstd_ptr + c, mask=c_ok, other=0.0)
        scale, shift = scale_shift(tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(tl.float32),
                                   tl.load(beta_ptr + c, mask=c_ok, other=0.0).to(tl.float32),
                                   mean, invstd)
        dz = activate_grad(y * scale[None, :] + shift[None, :], g, ACT, slope)
        xhat = (y - mean[None, :]) * invstd[None, :]
    elif ACT != 0:
        dz = activate_grad(tl.load(y_ptr + y_offs, mask=ok, other=0.0).to(tl.float32), g,
                           ACT, slope)
    return dz, xhat, scale


@triton.jit
def _grad_partials_kernel(g_ptr, y_ptr, mean_ptr, invstd_ptr, gamma_ptr, beta_ptr, part_ptr,
                          M, C, OHW, OW, sgn, sgh, sgw, sgc, slope, ACT: tl.constexpr,
                          AFFINE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per (pixel block, channel): sum(dz) and sum(dz * xhat) into part[0|1, block, channel]."""
    p, c, c_ok, ok, offs = _pixel_channel_tile(M, C, BLOCK_P, BLOCK_C)
    p64 = p.to(tl.int64)
    g_offs = ((p64 // OHW) * sgn + ((p64 % OHW) // OW) * sgh + (p64 % OW) * sgw)[:, None] \
        + c.to(tl.int64)[None, :] * sgc
    g = tl.load(g_ptr + g_offs, mask=ok, other=0.0).to(tl.float32)
    dz, xhat, _ = bn_act_grad(g, y_ptr, offs, ok, c, c_ok, mean_ptr, invstd_ptr, gamma_ptr,
                              beta_ptr,
                              slope, ACT, AFFINE)
    dz = tl.where(ok, dz, 0.0)
    offs = tl.program_id(0).to(tl.int64) * C + c
    tl.store(part_ptr + offs, tl.sum(dz, axis=0), mask=c_ok)
    tl.store(part_ptr + tl.num_programs(0).to(tl.int64) * C + offs, tl.sum(dz * xhat, axis=0),
             mask=c_ok)


@triton.jit
def sum_grad_partials(part_ptr, first, T, stride, C, c, c_ok, BLOCK_T: tl.constexpr,
                      BLOCK_C: tl.constexpr):
    """(sum(dz), sum(dz * xhat)) per channel ``c`` from T rows from row ``first`` of a float32
    (2, rows, C) buffer of partials (``stride`` = rows x C), rows added in ascending order (``.cg``
    loads, as in :func:`chan_combine`)."""
    dbeta = tl.zeros((BLOCK_C,), dtype=tl.float32)
    dgamma = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        ok = (t < T)[:, None] & c_ok[None, :]
        offs = (first + t).to(tl.int64)[:, None] * C + c[None, :]
        dbeta += tl.sum(tl.load(part_ptr + offs, mask=ok, other=0.0, cache_modifier=".cg"), axis=0)
        dgamma += tl.sum(tl.load(part_ptr + stride + offs, mask=ok, other=0.0,
                                 cache_modifier=".cg"), axis=0)
    return dbeta, dgamma


@triton.jit
def _grad_finish_kernel(part_ptr, T, C, gamma_ptr, invstd_ptr, inv_count,
                        dgamma_ptr, dbeta_ptr, dbias_ptr, coef_ptr,
                        TRAINING: tl.constexpr, HAS_BIAS: tl.constexpr, AFFINE: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    """dbeta = sum(dz), dgamma = sum(dz * xhat) over the T block partials in ascending order;
    dbias = sum(dy) (0 in training: BN removes any per-channel constant); and the coefficients of
    dy = scale * dz + coef0 + coef1 * xhat (both 0 in eval, where the statistics are constants, and
    without BN, where dy = dz)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_ok = c < C
    dbeta, dgamma = sum_grad_partials(part_ptr, 0, T, T * C, C, c, c_ok, BLOCK_T, BLOCK_C)
    tl.store(dbeta_ptr + c, dbeta, mask=c_ok)
    tl.store(dgamma_ptr + c, dgamma, mask=c_ok)
    scale = tl.full((BLOCK_C,), 1.0, tl.float32)
    if AFFINE:
        gamma = tl.load(gamma_ptr + c, mask=c_ok, other=0.0).to(tl.float32)
        scale = gamma * tl.load(invstd_ptr + c, mask=c_ok, other=0.0)
    if TRAINING:
        tl.store(coef_ptr + c, -scale * dbeta * inv_count, mask=c_ok)
        tl.store(coef_ptr + C + c, -scale * dgamma * inv_count, mask=c_ok)
        if HAS_BIAS:  # 0, or NaN as PyTorch's sum(dy) when the statistics are NaN
            tl.store(dbias_ptr + c, (dbeta + dgamma) * 0.0, mask=c_ok)
    else:
        zero = tl.zeros((BLOCK_C,), dtype=tl.float32)
        tl.store(coef_ptr + c, zero, mask=c_ok)
        tl.store(coef_ptr + C + c, zero, mask=c_ok)
        if HAS_BIAS:
            tl.store(dbias_ptr + c, scale * dbeta, mask=c_ok)


def _channel_block(c: int) -> int:
    return pow2_block(c, 16, 64)


def _tiles(m: int, c: int):
    """(BLOCK_P, BLOCK_C, grid) of the elementwise kernels: about 4096 elements per program."""
    block_c = _channel_block(c)
    block_p = pow2_block(triton.cdiv(4096, block_c), 16, 1024)
    return block_p, block_c, (triton.cdiv(m, block_p), triton.cdiv(c, block_c))


def apply(y, vec, activation, slope):
    """act(y * scale + shift) for channels-last contiguous y and its layer's vec; a new
    channels-last tensor in y's dtype. ``activation``: a key of activations.ACTIVATIONS."""
    n, c, h, w = y.shape
    out = torch.empty_like(y)
    block_p, block_c, grid = _tiles(n * h * w, c)
    _apply_kernel[grid](y, vec[ROW["scale"]:], out, n * h * w, c, slope,
                        ACT=activation_code(activation), BLOCK_P=block_p, BLOCK_C=block_c)
    return out


def grad_reductions(grad_out, y, vec, bn_params, activation, slope, training, has_bias):
    """The per-channel sums of the backward of act(bn(y)) given grad_out: (dgamma, dbeta, dbias,
    coef), fresh float32 each: (C,) sums (dgamma, dbeta None without BN; dbias None unless
    ``has_bias``) and dy's (2, C) coefficients (dy = scale * dz + coef0 + coef1 * xhat; zero in
    eval). ``vec``: the vec the forward wrote, and ``bn_params`` (gamma, beta), or both None for a
    layer without BN (then y is the output of act, or None without one)."""
    n, c, h, w = grad_out.shape
    m = n * h * w
    dev = grad_out.device
    affine = vec is not None
    y = y if y is not None else grad_out  # placeholder, never read
    coef = new_coef(c, dev)
    vec = vec if affine else coef  # without BN: placeholders, never read
    gamma, beta = bn_params if affine else (coef, coef)  # placeholders, never read
    dgamma, dbeta, dbias = (torch.empty(c, device=dev, dtype=torch.float32) for _ in range(3))
    block_p, block_c, grid = _tiles(m, c)
    partials = torch.empty((2, grid[0], c), device=dev, dtype=torch.float32)
    _grad_partials_kernel[grid](grad_out, y, vec[ROW["mean"]], vec[ROW["invstd"]], gamma, beta,
                                partials, m, c, h * w, w,
                                *(grad_out.stride(i) for i in (0, 2, 3, 1)), slope,
                                ACT=activation_code(activation), AFFINE=affine, BLOCK_P=block_p,
                                BLOCK_C=block_c)
    _grad_finish_kernel[(triton.cdiv(c, block_c),)](
        partials, grid[0], c, gamma, vec[ROW["invstd"]], 1.0 / m, dgamma, dbeta, dbias, coef,
        TRAINING=training and affine, HAS_BIAS=has_bias, AFFINE=affine, BLOCK_T=PARTIAL_ROWS,
        BLOCK_C=block_c)
    return (dgamma if affine else None, dbeta if affine else None, dbias if has_bias else None,
            coef)
