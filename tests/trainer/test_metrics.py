"""Sliced Wasserstein distance: it ranks degradations the way a human would, is deterministic and
order-free, its 1-D distance matches an independent float64 oracle, and bad input fails loudly."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from aigc_fast.training import metrics
from aigc_fast.training.data import make_shapes, to_model_range
from aigc_fast.training.metrics import Descriptors, describe, swd

N = 256  # images per side at 32 px: small enough for CPU tests, large enough for stable ranks


def gaussian_blur(x, sigma):
    radius = int(3 * sigma + 1)
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-t * t / (2 * sigma * sigma))
    k = k / k.sum()
    c = x.shape[1]
    x = F.pad(x, (radius,) * 4, mode="reflect")
    x = F.conv2d(x, k.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def add_noise(x, std, seed):
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(seed))
    return (x + std * noise).clamp(-1, 1)


@pytest.fixture(scope="module")
def halves():
    """Two independent halves of one shapes data set, in [-1, 1]."""
    images = to_model_range(make_shapes(2 * N, image_size=32, seed=101))
    return images[:N], images[N:]


@pytest.fixture(scope="module")
def real_desc(halves):
    return describe(halves[0])


@pytest.fixture(scope="module")
def baseline(real_desc, halves):
    return swd(real_desc, halves[1])


def test_independent_halves_score_small_and_pure_noise_far_worse(real_desc, halves, baseline):
    noise = torch.rand(halves[1].shape, generator=torch.Generator().manual_seed(3)) * 2 - 1
    pure = swd(real_desc, noise)
    assert list(baseline) == ["32", "16", "mean"]
    assert baseline["mean"] == pytest.approx((baseline["32"] + baseline["16"]) / 2, rel=1e-6)
    for key in baseline:
        assert 0 < baseline[key] < pure[key] / 4, (key, baseline, pure)
    assert pure["mean"] > 6 * baseline["mean"], (baseline, pure)  # measured 7.8x on this data


@pytest.mark.parametrize("degrade, strengths", [
    (lambda x, s: gaussian_blur(x, s), (1.0, 2.0, 3.0)),
    (lambda x, s: add_noise(x, s, seed=7), (0.05, 0.1, 0.2)),
], ids=["blur", "noise"])
def test_grows_monotonically_with_degradation(real_desc, halves, baseline, degrade, strengths):
    scores = [baseline] + [swd(real_desc, degrade(halves[1], s)) for s in strengths]
    for key in ("32", "mean"):  # noise averages out at 16 px, so that level alone need not move
        values = [s[key] for s in scores]
        assert all(a < b for a, b in zip(values, values[1:])), (key, values)
    assert scores[-1]["mean"] > 3 * baseline["mean"], scores


def test_identical_sets_score_exactly_zero(halves):
    """Positions follow the image content, so the same images give the same descriptors."""
    images = halves[0][:64]
    assert swd(describe(images), images.clone()) == {"32": 0.0, "16": 0.0, "mean": 0.0}


def test_independent_of_batch_order_and_chunking(halves):
    real, fake = halves[0][:48], halves[1][:40]
    expected = swd(real, fake, n_dirs=64)
    g = torch.Generator().manual_seed(0)
    shuffled = swd(real[torch.randperm(48, generator=g)], fake[torch.randperm(40, generator=g)],
                   n_dirs=64, chunk_size=7)
    assert shuffled == pytest.approx(expected, rel=1e-5)
    assert expected["mean"] > 0


def test_deterministic_for_a_seed_and_leaves_the_global_rng_alone(halves):
    real, fake = halves[0][:32], halves[1][:32]
    state = torch.get_rng_state()
    first = swd(real, fake, seed=5, n_dirs=64)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(1234)  # the global RNG must not matter
    assert swd(real, fake, seed=5, n_dirs=64) == first
    other = swd(real, fake, seed=6, n_dirs=64)
    assert other != first and other["mean"] == pytest.approx(first["mean"], rel=0.5)


def test_unequal_counts_compare_distributions(halves):
    """Repeating every fake image 3 times leaves its distribution, hence the SWD, unchanged."""
    real = describe(halves[0][:64])
    fake = halves[1][:20]
    once = swd(real, fake, n_dirs=64)
    thrice = swd(real, fake.repeat(3, 1, 1, 1), n_dirs=64)
    assert thrice == pytest.approx(once, rel=1e-5)
    assert once["mean"] > 0


def _w1_oracle(a, b):
    """float64 W1 of two 1-D empirical distributions as the integral of |CDF_a - CDF_b| dx."""
    xs = np.sort(np.concatenate([a, b]))
    cdf_a = np.searchsorted(np.sort(a), xs[:-1], side="right") / len(a)
    cdf_b = np.searchsorted(np.sort(b), xs[:-1], side="right") / len(b)
    return float(np.sum(np.abs(cdf_a - cdf_b) * np.diff(xs)))


@pytest.mark.parametrize("m, n", [(7, 5), (6, 6), (1, 4), (12, 9)])
def test_sliced_w1_matches_float64_cdf_oracle(m, n):
    g = torch.Generator().manual_seed(m * 100 + n)
    a, b = torch.randn(m, 3, generator=g), torch.randn(n, 3, generator=g) + 0.3
    dirs = torch.randn(3, 5, generator=g)
    dirs = dirs / dirs.norm(dim=0)
    got = metrics._sliced_w1(a, b, dirs).item()
    pa, pb = (a.double() @ dirs.double()).numpy(), (b.double() @ dirs.double()).numpy()
    want = np.mean([_w1_oracle(pa[:, j], pb[:, j]) for j in range(dirs.shape[1])])
    assert got == pytest.approx(want, rel=1e-5)


def test_pyramid_levels_and_constant_images():
    """A constant image has no band-pass energy and keeps its value at 16 px (filter mass 1,
    borders included); levels run from the full size down to 16 px."""
    x = torch.full((2, 3, 64, 64), 0.3)
    levels = metrics._laplacian_pyramid(x)
    assert [lv.shape[-1] for lv in levels] == [64, 32, 16]
    for band in levels[:-1]:
        assert band.abs().max().item() < 1e-6
    assert torch.allclose(levels[-1], torch.full_like(levels[-1], 0.3), atol=1e-6)
    ramp = torch.linspace(-1, 1, 64).expand(1, 1, 64, 64).contiguous()
    assert set(swd(ramp, ramp.flip(-1), n_dirs=8)) == {"64", "32", "16", "mean"}


def test_downsample_matches_float64_reference():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    taps = np.array([1, 4, 6, 4, 1], np.float64) / 16
    padded = np.pad(x.double().numpy(), ((0, 0), (0, 0), (2, 2), (2, 2)), mode="reflect")
    want = np.zeros((2, 3, 16, 16))
    for i in range(5):
        for j in range(5):
            want += taps[i] * taps[j] * padded[:, :, i:i + 32:2, j:j + 32:2]
    got = metrics._downsample(x).double().numpy()
    assert np.abs(got - want).max() < 1e-6


def _images(n=2, c=3, size=16):
    return torch.rand(n, c, size, size, generator=torch.Generator().manual_seed(n)) * 2 - 1


@pytest.mark.parametrize("real, fake, kwargs, error, match", [
    ([[0.0]], _images(), {}, TypeError, r"real must be a torch\.Tensor"),
    (_images(), _images()[0], {}, ValueError, r"fake must have shape \(N, C, H, W\)"),
    (_images(), (_images() * 127).to(torch.int8), {}, TypeError, r"fake must be a floating-point"),
    (_images(size=24), _images(size=24), {}, ValueError, r"real must be square with a side of 16"),
    (_images(), _images()[..., :8], {}, ValueError, r"fake must be square"),
    (_images(), _images()[:0], {}, ValueError, r"fake must hold at least 1 image"),
    (_images(), _images() * 100, {}, ValueError, r"fake must hold finite values in \[-1, 1\]"),
    (_images(), _images().index_fill(0, torch.tensor([1]), float("nan")), {}, ValueError,
     r"fake must hold finite values"),
    (_images(), _images(c=1), {}, ValueError, r"fake must have the real images' \(C, H, W\)"),
    (_images(size=32), _images(), {}, ValueError, r"fake must have the real images' \(C, H, W\) = "
                                                  r"\(3, 32, 32\)"),
    (_images(), _images(), {"seed": -1}, ValueError, r"seed must be an int >= 0"),
    (_images(), _images(), {"n_dirs": 0}, ValueError, r"n_dirs must be an int >= 1"),
    (_images(), _images(), {"chunk_size": 2.5}, ValueError, r"chunk_size must be an int >= 1"),
])
def test_bad_input_raises_naming_the_argument(real, fake, kwargs, error, match):
    with pytest.raises(error, match=match):
        swd(real, fake, **kwargs)


def test_descriptors_made_with_another_seed_are_refused():
    real = describe(_images(), seed=1)
    assert isinstance(real, Descriptors) and real.n_images == 2
    with pytest.raises(ValueError, match=r"real descriptors were made with seed=1"):
        swd(real, _images(), seed=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu(halves):
    real, fake = halves[0][:64], halves[1][:64]
    expected = swd(real, fake, n_dirs=128)
    got = swd(real.cuda(), fake.cuda(), n_dirs=128)
    assert got == pytest.approx(expected, rel=1e-4)
