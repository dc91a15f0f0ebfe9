"""Data sources (embedded shapes, image folders, .npz), their errors, and the resumable batch
order."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from aigc_fast.training import data
from aigc_fast.training.cli import UsageError
from aigc_fast.training.data import (BatchOrder, batch_stream, load_images, make_shapes,
                                     to_model_range)


# --- shapes ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [32, 64])
def test_shapes_are_deterministic_and_varied(size):
    a = make_shapes(40, size, seed=3)
    assert a.shape == (40, 3, size, size) and a.dtype == torch.uint8
    assert torch.equal(a, make_shapes(40, size, seed=3))
    assert torch.equal(a, make_shapes(40, size, seed=3, chunk_pixels=5 * size * size))  # chunking
    assert not torch.equal(a, make_shapes(40, size, seed=4))
    # every image has a shape on a background: two clearly different colours
    flat = a.float().flatten(2)
    spread = (flat.max(2).values - flat.min(2).values).max(1).values
    assert (spread > 60).all()
    # backgrounds (corner pixels) differ between images, so do shape sizes (pixels unlike the
    # corner)
    assert len({tuple(c) for c in a[:, :, 0, 0].tolist()}) > 30
    corner = a[:, :, :1, :1].float()
    covered = ((a.float() - corner).abs().sum(1) > 40).float().mean((1, 2))
    assert covered.min() > 0.03 and covered.max() < 0.95 and covered.std() > 0.05


@pytest.mark.parametrize("size", [32, pytest.param(64, marks=pytest.mark.slow)])
def test_every_shape_lies_inside_the_frame(size):
    """Shapes are placed by their real extents: along the frame's edge a shape's coverage stays
    under 11 % (the soft ramp's tail at a triangle's base corners), so no shape is cut off."""
    p = data._shape_params(torch.Generator().manual_seed(5), 3000, size)
    edge = torch.linspace(0, size, 8 * size + 1)  # points along the frame's edge, not pixel centres
    dx = edge[None, None, :] - p["cx"][:, None, None]
    dy = edge[None, :, None] - p["cy"][:, None, None]
    r = p["radius"][:, None, None]
    fields = (data._circle, data._square, data._triangle)
    sd = torch.stack([f(dx, dy, r) for f in fields], 1)[torch.arange(3000), p["kind"]]
    coverage = (0.5 - sd / (data.EDGE * size)).clamp(0, 1)
    rim = torch.cat([coverage[:, 0], coverage[:, -1], coverage[:, :, 0], coverage[:, :, -1]], 1)
    assert rim.max() < 0.11
    assert set(p["kind"].tolist()) == {0, 1, 2}


def test_rgb_to_grayscale_is_luma(tmp_path):
    rgb = make_shapes(6, 32, seed=1)
    np.savez(tmp_path / "rgb.npz", rgb.permute(0, 2, 3, 1).numpy())
    grey, _ = load_images(str(tmp_path / "rgb.npz"), 32, 1)
    assert grey.shape == (6, 1, 32, 32) and grey.dtype == torch.uint8
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)
    expected = (rgb.double() * luma).sum(1, keepdim=True)
    assert (grey.double() - expected).abs().max() <= 0.5 + 1e-4


# --- image folders --------------------------------------------------------------------------------


def _write(path, w, h, colour=None, mode="RGB", middle=None):
    """An image of size w x h in ``colour``; ``middle`` paints the centre square another colour."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if colour is None:
        rng = np.random.default_rng(len(str(path)))
        image = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
    else:
        image = Image.new(mode, (w, h), colour)
    if middle is not None:
        side = min(w, h)
        image.paste(Image.new(mode, (side, side), middle), ((w - side) // 2, (h - side) // 2))
    image.save(path)


def test_folder_reads_every_format_resizes_crops_and_counts_bad_files(tmp_path):
    _write(tmp_path / "a.png", 64, 32, (0, 0, 255), middle=(255, 0, 0))  # sides blue, centre red
    _write(tmp_path / "sub" / "b.jpg", 50, 70)
    _write(tmp_path / "sub" / "deeper" / "c.JPEG", 33, 33)
    _write(tmp_path / "d.bmp", 16, 16, (10, 200, 30))  # upscaled
    _write(tmp_path / "e.webp", 40, 40)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (tmp_path / "sub" / "broken.jpg").write_bytes(b"")
    (tmp_path / "notes.txt").write_text("ignored: not an image extension")
    with pytest.warns(UserWarning, match=r"skipped 2 unreadable image file\(s\) of 7") as record:
        images, desc = load_images(str(tmp_path), 32, 3)
    assert len(record) == 1
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8 and "5 images" in desc
    # files are read in sorted path order: a.png, d.bmp, e.webp, sub/b.jpg, sub/deeper/c.JPEG
    assert (images[0] == torch.tensor([255, 0, 0]).view(3, 1, 1)).all()  # only the centre crop
    assert (images[1] == torch.tensor([10, 200, 30]).view(3, 1, 1)).all()


def test_folder_grayscale(tmp_path):
    _write(tmp_path / "red.png", 40, 40, (255, 0, 0))
    images, _ = load_images(str(tmp_path), 32, 1)
    assert images.shape == (1, 1, 32, 32)
    assert (images == 76).all()  # ITU-R 601 luma of pure red: 0.299 * 255


def test_folder_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file or folder"):
        load_images(str(tmp_path / "missing"), 32, 3)
    with pytest.raises(UsageError, match="no image files"):
        load_images(str(tmp_path), 32, 3)
    (tmp_path / "x.png").write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning before the error: the error says it all
        with pytest.raises(UsageError, match="none of its 1 image files could be read"):
            load_images(str(tmp_path), 32, 3)
    with pytest.raises(UsageError, match="--image-size 48 is not supported"):
        load_images("shapes", 48, 3)


# --- .npz -----------------------------------------------------------------------------------------


def test_npz_round_trip_and_resize(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=array)
    images, _ = load_images(str(tmp_path / "rgb.npz"), 32, 3)
    assert torch.equal(images, torch.from_numpy(array).permute(0, 3, 1, 2))

    grey = rng.integers(0, 256, (4, 32, 32), dtype=np.uint8)  # N x H x W: one channel
    np.savez(tmp_path / "grey.npz", grey)
    images, _ = load_images(str(tmp_path / "grey.npz"), 32, 3)
    assert images.shape == (4, 3, 32, 32)
    assert torch.equal(images[:, 1], torch.from_numpy(grey))

    # 96 x 64: centre 64 x 64 crop, then resized to 32; constant regions stay exactly constant
    wide = np.zeros((2, 64, 96, 3), dtype=np.uint8)
    wide[:, :, 16:80] = (200, 100, 50)
    np.savez(tmp_path / "wide.npz", wide)
    images, _ = load_images(str(tmp_path / "wide.npz"), 32, 3)
    assert images.shape == (2, 3, 32, 32)
    assert (images == torch.tensor([200, 100, 50], dtype=torch.uint8).view(3, 1, 1)).all()


@pytest.mark.parametrize("content, message", [
    ({"images": np.zeros((2, 8, 8, 3), np.float32)}, "expected a non-empty uint8 array"),
    ({"images": np.zeros((0, 8, 8, 3), np.uint8)}, "expected a non-empty uint8 array"),
    ({"images": np.zeros((2, 8, 8, 4), np.uint8)}, "expected 1 or 3"),
    ({"a": np.zeros((2, 8, 8, 3), np.uint8), "b": np.zeros(1)}, "expected one array"),
])
def test_npz_errors(tmp_path, content, message):
    np.savez(tmp_path / "bad.npz", **content)
    with pytest.raises(UsageError, match=message):
        load_images(str(tmp_path / "bad.npz"), 32, 3)


def test_npz_corrupt_file(tmp_path):
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UsageError, match="cannot be read as a .npz"):
        load_images(str(tmp_path / "corrupt.npz"), 32, 3)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UsageError, match="neither a folder nor a .npz file"):
        load_images(str(tmp_path / "file.txt"), 32, 3)


# --- batches --------------------------------------------------------------------------------------


def test_batch_order_is_resumable_and_covers_each_epoch():
    order = BatchOrder(n=23, batch_size=5, seed=7)
    assert order.steps_per_epoch == 4
    stream = order.batches(0)
    first = [next(stream) for _ in range(11)]
    resumed = order.batches(6)
    for expected in first[6:]:
        assert torch.equal(next(resumed), expected)
    for epoch in range(2):
        seen = torch.cat(first[epoch * 4:(epoch + 1) * 4])
        assert len(set(seen.tolist())) == 20 and seen.max() < 23  # full batches, no repeats
    assert not torch.equal(torch.cat(first[:4]), torch.cat(first[4:8]))  # reshuffled per epoch
    assert not torch.equal(first[0], BatchOrder(23, 5, seed=8).permutation(0)[:5])


def test_batch_stream_and_model_range():
    images = torch.arange(6 * 3 * 2 * 2,
                          dtype=torch.int64).remainder(256).to(torch.uint8).view(6, 3, 2, 2)
    order = BatchOrder(6, 2, seed=0)
    batches = batch_stream(images, order, 0, torch.device("cpu"))
    for index in [next(order.batches(0)), *list(_take(order.batches(1), 2))]:
        assert torch.equal(next(batches), images[index])
    x = to_model_range(torch.tensor([0, 255, 128], dtype=torch.uint8))
    torch.testing.assert_close(x, torch.tensor([-1.0, 1.0, 128 / 127.5 - 1]))
    batch = to_model_range(images[:2])  # image batches come channels-last, values unchanged
    assert batch.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(batch, images[:2].float() / 127.5 - 1)


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def test_batch_size_larger_than_data():
    with pytest.raises(UsageError, match="--batch-size 9 is larger than the data set"):
        BatchOrder(n=8, batch_size=9, seed=0)
