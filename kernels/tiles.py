"""The tile of every GEMM launch: a rule on the launch's shape and products, not a search.

Products are "tensor cores" (tf32, float16, bfloat16: the default of ``tl.dot``) or "exact"
(float32 with IEEE products: FMA, more live registers, so smaller tiles). Under the interpreter,
where a program's cost is its count and a config only multiplies test time, one small tile each.
The GPU compile check (benchmarks/gpu_compile_check.py) builds every launch the rule picks for
sm_90 and sm_80 and fails on a spill; the GEMM plan (benchmarks/gemm_plan.py) prints what each
launch executes.
"""
import contextlib
import dataclasses
from dataclasses import dataclass

import triton

from . import interpreting
from ._config import pow2_block


@dataclass(frozen=True)
class Tile:
    """A GEMM program's block of outputs (BLOCK_M x BLOCK_N) and of the reduction per iteration
    (BLOCK_K), with its warps and software-pipeline stages."""

    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int

    def constexprs(self, prefix=""):
        return {f"{prefix}BLOCK_M": self.block_m, f"{prefix}BLOCK_N": self.block_n,
                f"{prefix}BLOCK_K": self.block_k}

    def options(self):
        """The launch options ``num_warps`` and ``num_stages``."""
        return {"num_warps": self.warps, "num_stages": self.stages}


# The tile of the large GEMMs on tensor cores: 128 x 128 outputs move half the operand bytes per
# multiply-add of 128 x 64, and BLOCK_K 32 issues fewer, larger MMAs per loop step.
BIG = Tile(128, 128, 32, 8, 3)
PAIR_BIG = Tile(128, 128, 16, 8, 3)  # a backward pair's two large GEMMs (see pair_tiles)

# No program loops more than this many times: a longer loop is a serial tail the GPU waits on.
MAX_K_ITERATIONS = 256

# the largest row tile: 128 rows on a GPU; the interpreter, whose cost is per program and per
# operation (not per element), takes more
_MAX_BLOCK_M = 2048 if interpreting() else 128

# the tiles :func:`forced` imposes, by rule name
_FORCED = {}


@contextlib.contextmanager
def forced(**tiles):
    """The test seam: inside the block the rules named (``conv``, ``weight_grad``, ``pair``: a
    Tile, or for ``pair`` a pair of them; ``conv_splits``: a count; ``int64``: True for 64-bit
    offsets) return what is given, so that interpreter tests can run any tile and variant against
    float64."""
    saved = dict(_FORCED)
    _FORCED.update(tiles)
    try:
        yield
    finally:
        _FORCED.clear()
        _FORCED.update(saved)


def _columns(n: int, widest: int, narrowest: int = 16) -> int:
    """A tile's columns for n output columns: the narrowest menu width (``narrowest`` ..
    ``widest``) that holds them, so that a 3-channel layer runs 4 columns (conv_gemm.mma: CUDA
    cores below 16), not 64."""
    return pow2_block(n, narrowest, widest)


def wide_offsets(*tensors) -> bool:
    """Whether a launch's offsets need 64 bits: a tensor past 2**31 elements (or ``int64`` forced
    by :func:`forced`, so that the interpreter runs that variant too)."""
    return _FORCED.get("int64", False) or any(t.numel() >= 2**31 for t in tensors)


def conv_tile(rows: int, phases: int, c_out: int, c_in: int, taps: int, exact: bool,
              multiprocessors: int, capability: int, epilogue: str = "",
              tf32: bool = False) -> Tile:
    """The tile of a convolution GEMM (forward or input gradient) with ``rows`` output pixels in
    each of its ``phases``, ``c_out`` output channels and ``taps`` x ``c_in`` reduced per pixel:
    columns as few as hold c_out; rows up to 128 (the statistics partials have one row per row
    tile), halved down to 16 while the launch would not give each of the GPU's
    ``multiprocessors`` a program (``taps``: a phase's); a deeper reduction step where 16 would
    loop past MAX_K_ITERATIONS; BIG for the large ones on sm_90 and later (``capability``; sm_80's
    mma.sync accumulators spill it), but under the eval-BN epilogue (``epilogue`` "running_bn"),
    whose registers it would spill, and with 2 stages under a BN backward's ("bn_grad");
    ``tf32``: float32 operands on tensor cores, whose sm_80 warp count differs (below)."""
    if "conv" in _FORCED:
        return _FORCED["conv"]
    block_m = pow2_block(rows, 16, _MAX_BLOCK_M)
    columns = triton.cdiv(c_out, _columns(c_out, 32 if exact else 64, 1))
    while (block_m > 16 and not interpreting()
           and triton.cdiv(rows, block_m) * phases * columns < multiprocessors):
        block_m //= 2
    if interpreting():  # the CUDA-core path below 16 columns too, so that tests run it
        return Tile(block_m, 32 if c_out >= 16 else _columns(c_out, 8, 1), 16, 4, 1)
    if (not exact and epilogue != "running_bn" and capability >= 90 and c_out >= 128
            and block_m == 128
            and triton.cdiv(rows, 128) * phases * triton.cdiv(c_out, 128) >= multiprocessors):
        return Tile(128, 128, 32, 8, 2) if epilogue == "bn_grad" else BIG
    block_k = 16 if taps * triton.cdiv(c_in, 16) <= MAX_K_ITERATIONS else 32
    # warps, rows and columns as built without spills by Triton 3.6 and 3.9 (the GPU compile check)
    cuda_cores = _columns(c_out, 16, 1) < 16  # conv_gemm.mma's product, not tl.dot's
    if exact and capability >= 90:  # FMAs: 4 warps; at 128 rows 16 columns, as the exact pair
        return Tile(block_m, _columns(c_out, 16 if block_m >= 128 else 32, 1), block_k, 4, 1)
    if exact:  # sm_80: 8 warps for 128 rows, but on the CUDA cores 4
        warps = 8 if block_m >= 128 and not cuda_cores else 4
        return Tile(block_m, _columns(c_out, 32, 1), block_k, warps, 1)
    if capability < 90:  # mma.sync keeps more in registers: at most 64 rows, 4 warps; below 64
        # rows 8 for 16-bit operands and 4 for tf32, the counts spill-free on both Tritons
        block_m = min(block_m, 64)
        return Tile(block_m, _columns(c_out, 64, 1), block_k,
                    4 if block_m == 64 or tf32 else 8, 2)
    # sm_90: 8 warps for 128 rows on tensor cores and for 16 rows, 4 between and on the CUDA
    # cores, where 8 do not fit in registers
    warps = 8 if (block_m >= 128 and not cuda_cores) or block_m == 16 else 4
    return Tile(block_m, _columns(c_out, 64, 1), block_k, warps, 2)


def conv_candidates(rule: Tile) -> list:
    """The tiles opt-in autotuning (kernels.autotune) times for a conv GEMM: the rule's first,
    then its neighbours: half the rows (twice the programs), the other reduction step (16 or 32),
    one more pipeline stage."""
    found = [rule]
    if rule.block_m > 16:
        found.append(dataclasses.replace(rule, block_m=rule.block_m // 2, warps=4))
    found.append(dataclasses.replace(rule, block_k=48 - rule.block_k if rule.block_k in (16, 32)
                                     else 16))
    found.append(dataclasses.replace(rule, stages=rule.stages + 1))
    return list(dict.fromkeys(found))


# A run of a split reduction sums at least this many loop steps: shorter runs would spend more on
# their partial sums than they save.
MIN_SPLIT_STEPS = 8


def conv_splits(programs: int, steps: int, multiprocessors: int, elementwise: bool) -> int:
    """Split-K runs of a convolution GEMM of ``programs`` programs that loop ``steps`` times: 1,
    unless its epilogue is ``elementwise`` (no BN: the last run to arrive adds the runs' sums and
    applies it) and it would leave most of the GPU idle (D's last conv: N = 1, K = 16 C_in, a
    program per 16 images); then enough runs to give every multiprocessor a program, each at
    least MIN_SPLIT_STEPS steps long. BN epilogues fill the GPU with smaller row tiles instead
    (:func:`conv_tile`)."""
    if "conv_splits" in _FORCED:
        return _FORCED["conv_splits"]
    if interpreting() or not elementwise or 2 * programs > multiprocessors:
        return 1
    return max(1, min(multiprocessors // programs, steps // MIN_SPLIT_STEPS))


def _weight_grad_columns(c_in: int, taps: int, widest: int) -> int:
    """Columns of a weight-gradient tile: C_in of one tap, or, for fewer than 16 (an image's
    channels, which the launcher then packs with the taps: conv_gemm.weight_grad_program), the
    taps x C_in pairs."""
    return _columns(c_in if c_in >= 16 else c_in * taps, widest)


def weight_grad_tile(c_out: int, c_in: int, taps: int, exact: bool, capability: int) -> Tile:
    """The tile of a weight-gradient GEMM: (C_out, C_in) outputs per tap, pixels reduced; each side
    as narrow as holds its channels."""
    if "weight_grad" in _FORCED:
        return _FORCED["weight_grad"]
    if interpreting():  # a deep step: the interpreter's cost is per loop step, not per element
        return Tile(32, 32, 512, 4, 1)
    if not exact and capability >= 90 and c_out >= 128 and c_in >= 128:
        return BIG
    if exact:
        return Tile(_columns(c_out, 64), _weight_grad_columns(c_in, taps, 64), 16, 8, 3)
    return Tile(_columns(c_out, 64), _weight_grad_columns(c_in, taps, 64), 32, 8, 3)


def pair_tiles(rows: int, phases: int, c_out: int, c_in: int, taps: int, w_c_out: int,
               w_c_in: int, exact: bool, multiprocessors: int, capability: int,
               tf32: bool = False):
    """(conv tile, weight-gradient tile) of a backward pair launch, which runs both GEMMs with one
    warp count and stage count and holds the registers of the larger branch; ``c_out``: the
    input gradient's columns, ``w_c_out`` x ``w_c_in``: the weight gradient's outputs per tap;
    ``tf32`` as for :func:`conv_tile`."""
    if "pair" in _FORCED:
        return _FORCED["pair"]
    conv = conv_tile(rows, phases, c_out, c_in, taps, exact, multiprocessors, capability,
                     tf32=tf32)
    if interpreting():
        return conv, weight_grad_tile(w_c_out, w_c_in, taps, exact, capability)
    if exact:  # 4 warps on sm_90; on sm_80 at most 64 rows, 8 warps (the compile check)
        warps = 4 if capability >= 90 else 8
        block_m = conv.block_m if capability >= 90 else min(conv.block_m, 64)
        return (Tile(block_m, min(conv.block_n, 16), 16, warps, 2),
                Tile(_columns(w_c_out, 64), _weight_grad_columns(w_c_in, taps, 32), 16, warps, 2))
    if conv == BIG:  # both branches BIG but with BLOCK_K 16: at 32 their loads' transforms spill
        if w_c_out >= 128 and w_c_in >= 128:
            return PAIR_BIG, PAIR_BIG
        return BIG, Tile(_columns(w_c_out, 64), _weight_grad_columns(w_c_in, taps, 64), 16, 8, 3)
    # the warp counts that fit both branches in registers on both Tritons: sm_90 the conv tile's,
    # but 4 at 16 rows; sm_80 8, but 4 for tf32 under a 32-deep input-gradient step
    if capability >= 90:
        warps = 4 if conv.block_m == 16 else conv.warps
    else:
        warps = 4 if conv.block_k == 32 and tf32 else 8
    return (Tile(conv.block_m, conv.block_n, conv.block_k, warps, 3),
            Tile(_columns(w_c_out, 64), _weight_grad_columns(w_c_in, taps, 64), 16, warps, 3))
