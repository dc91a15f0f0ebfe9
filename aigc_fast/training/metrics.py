"""Sliced Wasserstein distance (SWD) between two sets of images, after Karras et al., "Progressive
Growing of GANs" (ICLR 2018, section 5 and appendix D). Written from the paper's description.

It measures image quality offline, without pretrained weights (FID needs Inception weights):

1. Each image goes through a Laplacian pyramid (5-tap binomial filter [1, 4, 6, 4, 1] / 16, applied
   separably with reflect padding; downsample = filter then keep every second pixel; upsample =
   insert zeros, filter, times 4). Level ``S`` (S = H, H/2, ..., 32) is the band-pass residual
   ``G_S - up(G_{S/2})``; the coarsest level is the 16 px Gaussian image ``G_16`` itself.
2. At each level, 128 7x7 neighbourhoods per image (positions drawn independently, so they may
   repeat) become descriptors of 7*7*C values.
3. Each set's descriptors of a level are normalised by that set's own per-channel mean and standard
   deviation (population std), taken over all of its descriptors of the level and all 49 positions
   ("normalize {x} and {y} w.r.t. the mean and standard deviation of each color channel"). As in the
   paper, this makes every level blind to a per-channel affine change (e.g. a fake set with half the
   real contrast scores like one with the right contrast).
4. The distance between the two descriptor sets of a level is the mean, over 512 random unit
   directions (the paper's 512 projections; they are projected 128 at a time only to bound memory,
   which does not change the value), of the 1-D Wasserstein-1 distance between the projections:
   the mean absolute difference between the sorted projections. When the sets differ in size the
   sorted projections are compared as quantile functions (the exact 1-D W1 of the two empirical
   distributions), which reduces to that mean when the sizes are equal.
5. Values are reported multiplied by 1e3, the paper's convention, keyed by the level's resolution
   as a string ("32", "16", ...) plus "mean", the average over levels.

The value depends on the number of images (fewer images: a noisier, on average larger estimate;
two independent halves of the 32 px "shapes" set score a mean of 35 with 128 images a side, 17 with
512, 9 with 2048). Compare only figures made with the same counts; commands use ``DEFAULT_N``.

Determinism and batch order: every random choice comes from ``torch.Generator`` objects seeded from
``seed`` (never the global RNG), created on the CPU so CPU and CUDA runs share them. Patch positions
must not depend on where an image sits in the batch, or permuting the batch would change the
descriptor multiset. So an image's positions are a function of the seed and of the image itself: the
image is quantised to 8 bits and hashed exactly in integers (a seed-drawn random linear hash modulo
the prime p = 2^31 - 1), and patch k of level S lands at ``(a_Sk * hash + b_Sk) mod p`` (a universal
hash with seed-drawn a, b) reduced to a valid position. Distinct images thus get independent-looking
positions, as in the paper, while the descriptor multiset depends only on the multiset of images;
the sorted projections then do not see the order at all (the values agree to float round-off,
as the normalising sums run in another order). (One set of positions shared by all
images would also be order-free, but would look at the same 128 places of every image forever.)
A side effect: an image present in both sets yields identical descriptors, so ``swd(x, x)`` is 0.

In a training loop, describe the real set once with :func:`describe` and pass the result as
``real``; each evaluation then costs only the fake set's pyramid and the projections.
"""
import math
from dataclasses import dataclass
from typing import Dict, Tuple, Union

import torch
import torch.nn.functional as F

DEFAULT_N = 2048
"""Images per side that commands (eval CLI, training evaluations) use; SWD depends on the count."""

PATCHES_PER_IMAGE = 128
PATCH_SIZE = 7
COARSEST = 16
N_DIRS = 512
DIRS_PER_CHUNK = 128
SCALE = 1e3
DEFAULT_CHUNK = 64
_PRIME = 2**31 - 1  # keeps every product of two residues below 2^62: exact in int64
_RANGE_SLACK = 1e-3  # tolerate round-off of a tanh or a resampler at the ends
_STD_FLOOR = 1e-5  # a (numerically) constant level maps to ~0 instead of amplified round-off
_BINOMIAL = (1 / 16, 4 / 16, 6 / 16, 4 / 16, 1 / 16)


@dataclass(frozen=True)
class Descriptors:
    """One image set's normalised descriptors per pyramid level, reusable across :func:`swd` calls.

    ``levels`` maps resolution -> (n_images * 128, C * 49) float32 tensor. ``seed`` and
    ``image_shape`` are kept so :func:`swd` can refuse descriptors made under other settings.
    """

    levels: Dict[int, torch.Tensor]
    seed: int
    image_shape: Tuple[int, int, int]
    n_images: int

    @property
    def device(self) -> torch.device:
        return next(iter(self.levels.values())).device


ImagesOrDescriptors = Union[torch.Tensor, Descriptors]


def describe(images: torch.Tensor, *, seed: int = 0,
             chunk_size: int = DEFAULT_CHUNK) -> Descriptors:
    """Laplacian-pyramid descriptors of ``images`` (N, C, H, W) in [-1, 1], normalised per level.

    Describe a fixed real set once and pass the result to :func:`swd` as ``real`` for every
    evaluation. Images go through the pyramid ``chunk_size`` at a time, so memory beyond the
    descriptors themselves (N * 128 * C * 49 floats per level) is bounded by the chunk, not by N.
    """
    _check_int(seed, "seed", minimum=0)
    _check_int(chunk_size, "chunk_size", minimum=1)
    _check_images(images, "images")
    return _describe(images, seed, chunk_size)


def swd(real: ImagesOrDescriptors, fake: ImagesOrDescriptors, *, seed: int = 0,
        n_dirs: int = N_DIRS, chunk_size: int = DEFAULT_CHUNK) -> Dict[str, float]:
    """Sliced Wasserstein distance (x1e3) of ``real`` and ``fake`` per pyramid level, and "mean".

    ``real`` and ``fake`` are image batches (N, C, H, W) in [-1, 1] with the same C, H, W (H == W, a
    power-of-two multiple of 16) on one device; N may differ. Either may instead be the
    :class:`Descriptors` of a set, made by :func:`describe` with the same ``seed``. Deterministic
    for a given ``seed`` and independent of the order of the images in either batch (module doc).
    Returns e.g. ``{"32": 4.1, "16": 2.7, "mean": 3.4}``.
    """
    _check_int(seed, "seed", minimum=0)
    _check_int(n_dirs, "n_dirs", minimum=1)
    _check_int(chunk_size, "chunk_size", minimum=1)
    for x, name in ((real, "real"), (fake, "fake")):
        if not isinstance(x, Descriptors):
            _check_images(x, name)
        elif x.seed != seed:
            raise ValueError(f"{name} descriptors were made with seed={x.seed}; pass seed={x.seed} "
                             f"to swd (got seed={seed})")
    if _image_shape(fake) != _image_shape(real):
        raise ValueError(f"fake must have the real images' (C, H, W) = {_image_shape(real)}, "
                         f"got {_image_shape(fake)}")
    if fake.device != real.device:
        raise ValueError(f"fake must be on real's device {real.device}, got {fake.device}")
    real, fake = (x if isinstance(x, Descriptors) else _describe(x, seed, chunk_size)
                  for x in (real, fake))

    gen = _generator(seed, stream=1)
    dim = real.image_shape[0] * PATCH_SIZE * PATCH_SIZE
    results = {}
    with torch.no_grad():
        for res in sorted(real.levels, reverse=True):
            dirs = torch.randn(dim, n_dirs, generator=gen)
            dirs = (dirs / dirs.norm(dim=0, keepdim=True)).to(real.device)
            results[str(res)] = _sliced_w1(real.levels[res], fake.levels[res], dirs) * SCALE
        values = torch.stack(list(results.values()))
        floats = torch.cat([values, values.mean().reshape(1)]).tolist()
    return dict(zip(list(results) + ["mean"], floats))


def _describe(images: torch.Tensor, seed: int, chunk_size: int) -> Descriptors:
    """:func:`describe` on checked arguments."""
    n, c, h, _ = images.shape
    resolutions = _resolutions(h)
    gen = _generator(seed, stream=0)
    hash_weights = torch.randint(1, _PRIME, (c * h * h,), generator=gen, dtype=torch.int64)
    hash_a = torch.randint(1, _PRIME, (len(resolutions), PATCHES_PER_IMAGE), generator=gen,
                           dtype=torch.int64)
    hash_b = torch.randint(0, _PRIME, (len(resolutions), PATCHES_PER_IMAGE), generator=gen,
                           dtype=torch.int64)
    hash_weights, hash_a, hash_b = (t.to(images.device) for t in (hash_weights, hash_a, hash_b))

    dim = c * PATCH_SIZE * PATCH_SIZE
    levels = {res: images.new_empty(n * PATCHES_PER_IMAGE, dim, dtype=torch.float32)
              for res in resolutions}
    with torch.no_grad():
        for start in range(0, n, chunk_size):
            chunk = images[start:start + chunk_size].detach().float()
            image_hash = _content_hash(chunk, hash_weights)
            rows_out = slice(start * PATCHES_PER_IMAGE, (start + len(chunk)) * PATCHES_PER_IMAGE)
            for li, level in enumerate(_laplacian_pyramid(chunk)):
                res = level.shape[-1]
                rows, cols = _patch_positions(image_hash, hash_a[li], hash_b[li], res)
                levels[res][rows_out] = _extract_patches(level, rows, cols)
        for desc in levels.values():
            _normalise_(desc, c)
    return Descriptors(levels=levels, seed=seed, image_shape=(c, h, h), n_images=n)


# --- checks ---------------------------------------------------------------------------------------

def _check_int(value, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def _check_images(x, name: str) -> None:
    """One check per property at the boundary; the value check is one reduction and one sync."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor (N, C, H, W) in [-1, 1] or Descriptors, "
                        f"got {type(x).__name__}")
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape (N, C, H, W), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor with values in [-1, 1], "
                        f"got {x.dtype}")
    n, _, h, w = x.shape
    if n < 1:
        raise ValueError(f"{name} must hold at least 1 image, got N={n}")
    if h != w or h < COARSEST or h % COARSEST or (h // COARSEST) & (h // COARSEST - 1):
        raise ValueError(f"{name} must be square with a side of 16 * 2^k (16, 32, 64, ...), "
                         f"got H={h}, W={w}")
    lo, hi = torch.stack(torch.aminmax(x.detach())).tolist()  # NaN propagates, fails below
    if not (-1.0 - _RANGE_SLACK <= lo and hi <= 1.0 + _RANGE_SLACK):
        raise ValueError(f"{name} must hold finite values in [-1, 1] (map [0, 1] images with "
                         f"x * 2 - 1); got min {lo:.4g}, max {hi:.4g}")


def _image_shape(x: ImagesOrDescriptors) -> Tuple[int, int, int]:
    return x.image_shape if isinstance(x, Descriptors) else tuple(x.shape[1:])


# --- Laplacian pyramid ----------------------------------------------------------------------------

def _resolutions(size: int):
    """Pyramid levels from finest to coarsest: size, size/2, ..., 16."""
    return [size >> k for k in range(int(math.log2(size // COARSEST)) + 1)]


def _blur(x: torch.Tensor) -> torch.Tensor:
    """Separable 5-tap binomial filter with reflect padding (a constant image stays constant).

    Shifted slices rather than a grouped conv: exact fp32 on every device (cuDNN may use TF32)
    and faster than depthwise conv2d on the CPU.
    """
    h, w = x.shape[-2:]
    x = F.pad(x, (2, 2, 2, 2), mode="reflect")
    x = sum(tap * x[..., :, i:i + w] for i, tap in enumerate(_BINOMIAL))
    return sum(tap * x[..., i:i + h, :] for i, tap in enumerate(_BINOMIAL))


def _downsample(x: torch.Tensor) -> torch.Tensor:
    return _blur(x)[..., ::2, ::2]


def _upsample(x: torch.Tensor) -> torch.Tensor:
    n, c, h, w = x.shape
    up = x.new_zeros(n, c, 2 * h, 2 * w)
    up[..., ::2, ::2] = x * 4.0  # the zeros take 3/4 of the filter's mass
    return _blur(up)


def _laplacian_pyramid(x: torch.Tensor):
    """[band-pass at H, H/2, ..., 32] + [Gaussian at 16], finest first."""
    levels = []
    while x.shape[-1] > COARSEST:
        coarser = _downsample(x)
        levels.append(x - _upsample(coarser))
        x = coarser
    levels.append(x)
    return levels


# --- patches --------------------------------------------------------------------------------------

def _generator(seed: int, stream: int) -> torch.Generator:
    """Independent CPU generators per purpose (positions, directions), distinct for every seed."""
    return torch.Generator().manual_seed(2 * seed + stream)


def _content_hash(images: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(n,) int64 in [0, p): exact integer hash of each image quantised to 8 bits.

    q <= 255 and weights < 2^31, so the sum stays below 2^63 for up to 2^24 values per image.
    """
    q = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.int64).flatten(1)
    return (q * weights).sum(dim=1) % _PRIME


def _patch_positions(image_hash, a, b, size: int):
    """(n, P) top-left rows and cols of each image's patches: a function of its hash only."""
    side = size - PATCH_SIZE + 1
    u = (image_hash[:, None] * a[None, :] + b[None, :]) % _PRIME % (side * side)
    return u // side, u % side


def _extract_patches(level: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """(n * P, C * 49) descriptors gathered by index (no unfold of every position)."""
    n, c = level.shape[:2]
    offs = torch.arange(PATCH_SIZE, device=level.device)
    r = (rows[:, :, None] + offs)[:, :, :, None]  # (n, P, 7, 1)
    q = (cols[:, :, None] + offs)[:, :, None, :]  # (n, P, 1, 7)
    img = torch.arange(n, device=level.device)[:, None, None, None]
    patches = level[img, :, r, q]  # (n, P, 7, 7, C): advanced dims first, the sliced C last
    return patches.permute(0, 1, 4, 2, 3).reshape(n * rows.shape[1], c * PATCH_SIZE * PATCH_SIZE)


def _normalise_(desc: torch.Tensor, channels: int) -> None:
    """In place: per-channel standardisation over all this set's descriptors and 49 positions."""
    per_channel = desc.view(desc.shape[0], channels, -1)
    var, mean = torch.var_mean(per_channel, dim=(0, 2), unbiased=False, keepdim=True)
    per_channel.sub_(mean).div_(var.sqrt().clamp_min(_STD_FLOOR))


# --- sliced Wasserstein-1 -------------------------------------------------------------------------

def _quantile_pairs(m: int, n: int, device):
    """Indices into two sorted arrays of sizes m and n, and weights, such that
    sum(w * |a[ia] - b[ib]|) is the W1 distance of their empirical distributions.

    Quantile breakpoints i/m and j/n are merged on the exact integer grid of lcm(m, n).
    """
    grid = math.lcm(m, n)
    step_a, step_b = grid // m, grid // n
    ends = torch.cat([torch.arange(1, m + 1) * step_a, torch.arange(1, n + 1) * step_b]).unique()
    starts = torch.cat([ends.new_zeros(1), ends[:-1]])
    weights = (ends - starts).double() / grid
    ia, ib = (ends - 1) // step_a, (ends - 1) // step_b
    return ia.to(device), ib.to(device), weights.float().to(device)


def _sort_rows_(x: torch.Tensor) -> torch.Tensor:
    """Sort each row of a tensor we own, in place. On the CPU numpy's SIMD sort is several times
    faster than torch.sort."""
    if x.device.type == "cpu":
        x.numpy().sort(axis=1)
        return x
    return x.sort(dim=1).values


def _sliced_w1(a: torch.Tensor, b: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Mean over the columns of ``dirs`` of the 1-D W1 between the projections of a and b."""
    equal = a.shape[0] == b.shape[0]
    if not equal:
        ia, ib, weights = _quantile_pairs(a.shape[0], b.shape[0], a.device)
    total = a.new_zeros(())
    for start in range(0, dirs.shape[1], DIRS_PER_CHUNK):
        d = dirs[:, start:start + DIRS_PER_CHUNK].T.contiguous()
        pa = _sort_rows_(d @ a.T)  # (dirs, M): one contiguous row per direction
        pb = _sort_rows_(d @ b.T)
        if equal:  # the quantile pairing below, without the gather
            total = total + (pa - pb).abs().mean(dim=1).sum()
        else:
            total = total + ((pa[:, ia] - pb[:, ib]).abs() @ weights).sum()
    return total / dirs.shape[1]
