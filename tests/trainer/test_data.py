"""Data sources (embedded shapes, image folders, .npz), their class labels for --conditional,
their errors, and the resumable batch order."""
import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from aigc_fast.training import data
from aigc_fast.training.cli import UsageError
from aigc_fast.training.data import (BatchOrder, batch_stream, load_data, make_shapes,
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
    grey = load_data(str(tmp_path / "rgb.npz"), 32, 1).images
    assert grey.shape == (6, 1, 32, 32) and grey.dtype == torch.uint8
    luma = torch.tensor([0.299, 0.587, 0.114], dtype=torch.float64).view(1, 3, 1, 1)
    expected = (rgb.double() * luma).sum(1, keepdim=True)
    assert (grey.double() - expected).abs().max() <= 0.5 + 1e-4


def test_shapes_labels_name_the_shape_drawn():
    """Each image's label is the kind of shape its pixels show: the pixels nearer the shape's
    colour than the background's cover the kind's area (circle pi r^2, square (1.6 r)^2,
    equilateral triangle of inradius 0.6 r: 1.87 r^2) within 12 %; the bands do not overlap."""
    shapes = data.LazyShapes(300, 32, seed=5)
    pixels, p = shapes[:].double(), shapes.params
    fg, bg = (p[k].double()[:, :, None, None] * 255 for k in ("fg", "bg"))
    covered = ((pixels - fg).norm(dim=1) < (pixels - bg).norm(dim=1)).double().sum((1, 2))
    area = torch.tensor([torch.pi, 1.6**2, 3 * 3**0.5 * 0.6**2], dtype=torch.float64)
    ratio = covered / p["radius"].double() ** 2 / area[shapes.labels]
    assert (ratio - 1).abs().max() < 0.12
    assert data.SHAPE_CLASSES == ("circle", "square", "triangle")
    assert set(shapes.labels.tolist()) == {0, 1, 2}
    # the embedded set's labels, rendered whole (16 px) or per batch (128 px): the same kinds
    whole = load_data("shapes", 16, 3, conditional=True)
    assert (whole.num_classes, whole.labels.dtype, len(whole.labels)) == (3, torch.int64,
                                                                          data.SHAPES_COUNT)
    assert torch.equal(whole.labels, data.LazyShapes(data.SHAPES_COUNT, 128).labels)
    assert "3 classes" in whole.desc and load_data("shapes", 16, 3).labels is None


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
        images, desc = load_data(str(tmp_path), 32, 3)[:2]
    assert len(record) == 1
    assert images.shape == (5, 3, 32, 32) and images.dtype == torch.uint8 and "5 images" in desc
    # files are read in sorted path order: a.png, d.bmp, e.webp, sub/b.jpg, sub/deeper/c.JPEG
    assert (images[0] == torch.tensor([255, 0, 0]).view(3, 1, 1)).all()  # only the centre crop
    assert (images[1] == torch.tensor([10, 200, 30]).view(3, 1, 1)).all()


def test_folder_grayscale(tmp_path):
    _write(tmp_path / "red.png", 40, 40, (255, 0, 0))
    images = load_data(str(tmp_path), 32, 1).images
    assert images.shape == (1, 1, 32, 32)
    assert (images == 76).all()  # ITU-R 601 luma of pure red: 0.299 * 255


def test_folder_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file or folder"):
        load_data(str(tmp_path / "missing"), 32, 3)
    with pytest.raises(UsageError, match="no image files"):
        load_data(str(tmp_path), 32, 3)
    (tmp_path / "x.png").write_bytes(b"garbage")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning before the error: the error says it all
        with pytest.raises(UsageError, match="none of its 1 image files could be read"):
            load_data(str(tmp_path), 32, 3)
    with pytest.raises(UsageError, match="--image-size 48 is not supported"):
        load_data("shapes", 48, 3)


def test_conditional_folder_labels_are_its_class_sub_folders(tmp_path):
    """Labels follow the images kept: an unreadable file is skipped with its label."""
    _write(tmp_path / "b" / "x.png", 8, 8, (0, 0, 255))
    _write(tmp_path / "a" / "y.png", 8, 8, (255, 0, 0))
    _write(tmp_path / "b" / "deeper" / "z.png", 8, 8, (0, 255, 0))
    (tmp_path / "a" / "broken.png").write_bytes(b"not a png")
    with pytest.warns(UserWarning, match="skipped 1 unreadable"):
        got = load_data(str(tmp_path), 16, 3, conditional=True)
    assert got.num_classes == 2 and "2 classes" in got.desc
    assert got.labels.tolist() == [0, 1, 1]  # a/y.png; b/x.png, b/deeper/z.png
    assert got.images[:, :, 0, 0].tolist() == [[255, 0, 0], [0, 0, 255], [0, 255, 0]]


def test_conditional_folder_errors(tmp_path):
    _write(tmp_path / "only" / "x.png", 8, 8, (0, 0, 255))
    with pytest.raises(UsageError, match=r"--conditional: .* has 1 class sub-folder\(s\) "
                                         r"\['only'\]; expected at least 2"):
        load_data(str(tmp_path), 16, 3, conditional=True)
    _write(tmp_path / "other" / "y.png", 8, 8, (0, 0, 255))
    _write(tmp_path / "loose.png", 8, 8, (0, 0, 255))
    with pytest.raises(UsageError, match=r"--conditional: .* holds 1 image\(s\) directly in it "
                                         r"\(first: loose.png\); expected every image in a class"):
        load_data(str(tmp_path), 16, 3, conditional=True)
    assert len(load_data(str(tmp_path), 16, 3).images) == 3  # unconditional: every image


def test_a_source_without_labels_refuses_conditional(monkeypatch):
    """LSUN reads one category: no labels (torchvision's reader stubbed: it needs lmdb)."""
    monkeypatch.setattr(data, "load_torchvision_set",
                        lambda *args: (torch.zeros(4, 3, 8, 8, dtype=torch.uint8), None, 0))
    assert len(load_data("root", 16, 3, dataset="lsun").images) == 4
    with pytest.raises(UsageError, match="--conditional: --dataset lsun has no class labels; "
                                         "expected a labelled source: a folder of class"):
        load_data("root", 16, 3, dataset="lsun", conditional=True)


# --- .npz -----------------------------------------------------------------------------------------


def test_npz_round_trip_and_resize(tmp_path):
    rng = np.random.default_rng(0)
    array = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "rgb.npz", images=array)
    images = load_data(str(tmp_path / "rgb.npz"), 32, 3).images
    assert torch.equal(images, torch.from_numpy(array).permute(0, 3, 1, 2))

    grey = rng.integers(0, 256, (4, 32, 32), dtype=np.uint8)  # N x H x W: one channel
    np.savez(tmp_path / "grey.npz", grey)
    images = load_data(str(tmp_path / "grey.npz"), 32, 3).images
    assert images.shape == (4, 3, 32, 32)
    assert torch.equal(images[:, 1], torch.from_numpy(grey))

    # 96 x 64: centre 64 x 64 crop, then resized to 32; constant regions stay exactly constant
    wide = np.zeros((2, 64, 96, 3), dtype=np.uint8)
    wide[:, :, 16:80] = (200, 100, 50)
    np.savez(tmp_path / "wide.npz", wide)
    images = load_data(str(tmp_path / "wide.npz"), 32, 3).images
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
        load_data(str(tmp_path / "bad.npz"), 32, 3)


def test_npz_labels(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 16, 16, 3), dtype=np.uint8)
    labels = np.array([3, 0, 2, 3, 1], dtype=np.int16)
    np.savez(tmp_path / "l.npz", images=images, labels=labels)
    got = load_data(str(tmp_path / "l.npz"), 16, 3, conditional=True)
    assert got.num_classes == 4 and got.labels.dtype == torch.int64
    assert got.labels.tolist() == labels.tolist()
    assert torch.equal(got.images, torch.from_numpy(images).permute(0, 3, 1, 2))
    np.savez(tmp_path / "unnamed.npz", images, labels=labels)  # labels are never the images
    assert torch.equal(load_data(str(tmp_path / "unnamed.npz"), 16, 3).images, got.images)


@pytest.mark.parametrize("labels, message", [
    (None, "holds no 'labels' array"),
    (np.array([0.0, 1, 1, 0]), "'labels' is float64 with shape (4,)"),
    (np.array([0, 1, 1]), "'labels' is int64 with shape (3,)"),
    (np.array([0, -1, 1, 0]), "'labels' range over -1..1"),
    (np.array([0, 0, 0, 0]), "'labels' range over 0..0"),
])
def test_npz_labels_errors(tmp_path, labels, message):
    arrays = {"images": np.zeros((4, 8, 8, 3), np.uint8)}
    if labels is not None:
        arrays["labels"] = labels
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(UsageError) as err:
        load_data(str(tmp_path / "bad.npz"), 16, 3, conditional=True)
    text = str(err.value)
    assert text.startswith("--conditional: --data ") and message in text
    assert "expected an integer array 'labels' of 4 class indices 0..K-1 (K >= 2" in text
    assert len(load_data(str(tmp_path / "bad.npz"), 16, 3).images) == 4  # unconditional: fine


def test_npz_corrupt_file(tmp_path):
    (tmp_path / "corrupt.npz").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(UsageError, match="cannot be read as a .npz"):
        load_data(str(tmp_path / "corrupt.npz"), 32, 3)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(UsageError, match="neither a folder nor a .npz file"):
        load_data(str(tmp_path / "file.txt"), 32, 3)


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
    labels = torch.tensor([5, 3, 0, 4, 1, 2])  # a class per image, unlike its index
    order = BatchOrder(6, 2, seed=0)
    batches = batch_stream(images, order, 0, torch.device("cpu"))
    labelled = batch_stream(images, order, 0, torch.device("cpu"), labels)
    for index in [next(order.batches(0)), *list(_take(order.batches(1), 2))]:
        batch, no_labels = next(batches)
        assert torch.equal(batch, images[index]) and no_labels is None
        batch, batch_labels = next(labelled)
        assert torch.equal(batch, images[index]) and torch.equal(batch_labels, labels[index])
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
