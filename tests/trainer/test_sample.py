"""``python -m aigc_fast.sample``: grids, single PNGs, repeatability, errors; the grid helper;
a conditional checkpoint's class rows and ``--class``."""
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image

from aigc_fast.training.data import load_data
from aigc_fast.training.run import real_grid
from aigc_fast.training.sample import generate, load_generator, main, make_grid, to_uint8
from aigc_fast.train import main as train_main
from cli_helpers import assert_one_line_error, run_cli

_cli = partial(run_cli, main, prog="aigc_fast.sample")  # _cli(argv, capsys) -> (status, out, err)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A real (one-step, tiny) training checkpoint."""
    out = tmp_path_factory.mktemp("run")
    argv = ["--dry-run", "--ngf", "4", "--ndf", "4", "--nz", "8", "--batch-size", "4", "--out",
            str(out)]
    assert train_main(argv) == 0
    return out / "checkpoints" / "last.pt"


@pytest.fixture(scope="module")
def conditional(tmp_path_factory):
    """A one-step conditional checkpoint on the embedded shapes (3 classes), 16 px."""
    out = tmp_path_factory.mktemp("conditional")
    argv = ["--dry-run", "--conditional", "--image-size", "16", "--ngf", "4", "--ndf", "4", "--nz",
            "8", "--batch-size", "4", "--out", str(out)]
    assert train_main(argv) == 0
    return out / "checkpoints" / "last.pt"


def _cells(path, rows, columns, side):
    """The images of a grid PNG (padding 2), as uint8 (rows, columns, side, side, 3)."""
    grid = np.asarray(Image.open(path))
    assert grid.shape == (rows * (side + 2) + 2, columns * (side + 2) + 2, 3)
    return np.stack([np.stack([grid[2 + r * (side + 2):2 + r * (side + 2) + side,
                                    2 + c * (side + 2):2 + c * (side + 2) + side]
                               for c in range(columns)]) for r in range(rows)])


def test_make_grid_places_cells_and_padding():
    pixels = np.stack([np.full((2, 3, 1), 10 * (i + 1), np.uint8) for i in range(5)])
    grid = make_grid(pixels, nrow=2, padding=1, pad_value=255)
    assert grid.shape == (3 * 3 + 1, 2 * 4 + 1, 1)
    for i in range(5):
        top, left = 1 + (i // 2) * 3, 1 + (i % 2) * 4
        assert (grid[top:top + 2, left:left + 3] == 10 * (i + 1)).all()
    assert (grid[0] == 255).all() and (grid[:, 0] == 255).all() and (grid[7:9, 5:8] == 255).all()


def test_to_uint8_maps_the_model_range():
    x = torch.tensor([-1.0, 0.0, 1.0, 2.0, -3.0]).view(1, 1, 1, 5)
    assert to_uint8(x).reshape(-1).tolist() == [0, 128, 255, 255, 0]


def test_grid_holds_the_generator_output(checkpoint, tmp_path, capsys):
    grid_path = tmp_path / "sub" / "grid.png"
    status, out, _ = _cli(["--checkpoint", str(checkpoint), "--n", "10", "--out", str(grid_path),
                           "--seed", "3"], capsys)
    assert status == 0 and "10 images" in out
    grid = np.asarray(Image.open(grid_path))
    assert grid.shape == (3 * 34 + 2, 4 * 34 + 2, 3)  # 10 images: 4 per row, 3 rows, padding 2
    G = load_generator(checkpoint, torch.device("cpu"))
    expected = to_uint8(torch.cat(list(generate(G, 10, seed=3, batch_size=4, device="cpu"))))
    assert np.array_equal(grid[2 + 34:2 + 34 + 32, 2 + 34:2 + 34 + 32], expected[5])  # row 1, col 1


def test_out_dir_writes_single_pngs_repeatably(checkpoint, tmp_path, capsys):
    for name, seed in (("a", "1"), ("b", "1"), ("c", "2")):
        status, _, _ = _cli(["--checkpoint", str(checkpoint), "--n", "5", "--batch-size", "2",
                             "--out-dir", str(tmp_path / name), "--seed", seed], capsys)
        assert status == 0
    files = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert files == [f"{i:06d}.png" for i in range(5)]
    first = np.asarray(Image.open(tmp_path / "a" / "000000.png"))
    assert first.shape == (32, 32, 3) and first.std() > 0
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
               for f in files)
    assert (tmp_path / "a" / files[0]).read_bytes() != (tmp_path / "c" / files[0]).read_bytes()


def test_errors_are_one_line_exit_2(tmp_path, capsys):
    missing = tmp_path / "missing.pt"
    status, _, err = _cli(["--checkpoint", str(missing), "--out", str(tmp_path / "g.png")], capsys)
    assert status == 2 and err.count("\n") == 1 and str(missing) in err and "no such file" in err
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"\x00" * 100)
    status, _, err = _cli(["--checkpoint", str(corrupt), "--out", str(tmp_path / "g.png")], capsys)
    assert status == 2 and err.count("\n") == 1 and "cannot be read" in err
    status, _, err = _cli(["--checkpoint", str(corrupt)], capsys)  # neither --out nor --out-dir
    assert status == 2 and err.count("\n") == 1 and "--out" in err
    assert not (tmp_path / "g.png").exists()


def test_conditional_grid_has_one_row_per_class(conditional, tmp_path, capsys):
    """Without --class every class, --n (default 8) of each; with --class those, in that order.
    Row r, column j is G(z_j, class of row r): the same noise down a column."""
    G = load_generator(conditional, torch.device("cpu"))

    def row(k, n=8):
        z = torch.randn(n, 8, generator=torch.Generator().manual_seed(3))
        with torch.no_grad():
            return to_uint8(G(z, torch.full((n,), k)))

    status, out, _ = _cli(["--checkpoint", str(conditional), "--out", str(tmp_path / "all.png"),
                           "--seed", "3"], capsys)
    assert status == 0 and "8 images of each of classes [0, 1, 2]" in out
    cells = _cells(tmp_path / "all.png", 3, 8, 16)
    for k in range(3):
        assert np.array_equal(cells[k], row(k))
        assert not np.array_equal(cells[k], cells[k - 1])  # the class changes the images
    status, _, _ = _cli(["--checkpoint", str(conditional), "--out", str(tmp_path / "some.png"),
                         "--seed", "3", "--class", "2,0", "--n", "3"], capsys)
    assert status == 0
    cells = _cells(tmp_path / "some.png", 2, 3, 16)
    assert np.array_equal(cells[0], row(2, 3)) and np.array_equal(cells[1], row(0, 3))
    status, out, _ = _cli(["--checkpoint", str(conditional), "--out-dir", str(tmp_path / "one"),
                           "--class", "1", "--n", "2", "--seed", "3"], capsys)
    assert status == 0 and sorted(p.name for p in (tmp_path / "one").iterdir()) == [
        "000000.png", "000001.png"]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "one" / "000001.png")), row(1, 2)[1])


def test_trainer_samples_have_one_row_per_class(conditional):
    """The run's grids: 8 columns of fixed noise, one row per class (3 shapes)."""
    _cells(conditional.parent.parent / "samples" / "step_000001.png", 3, 8, 16)


def test_evaluation_draws_every_class_alike(conditional):
    """Without classes a conditional G gets labels drawn uniformly from the seed (SWD, FID)."""
    G = load_generator(conditional, torch.device("cpu"))
    seen = []
    forward = G.forward
    G.forward = lambda z, labels: seen.append(labels) or forward(z, labels)
    torch.cat(list(generate(G, 3000, seed=1, batch_size=1000, device="cpu")))
    labels = torch.cat(seen)
    assert len(labels) == 3000 and torch.bincount(labels, minlength=3).min() > 900
    seen.clear()
    list(generate(G, 3000, seed=1, batch_size=700, device="cpu"))
    assert torch.equal(torch.cat(seen), labels)  # a pure function of the seed, not the batching


@pytest.mark.parametrize("flags, fragments", [
    (["--class", "3"], ("--class 3", "has 3 classes", "expected indices 0..2")),
    (["--class", "x"], ("--class", "invalid class index")),
], ids=["out-of-range", "not-an-int"])
def test_class_errors(conditional, tmp_path, capsys, flags, fragments):
    status, _, err = _cli(["--checkpoint", str(conditional), "--out", str(tmp_path / "g.png")]
                          + flags, capsys)
    assert_one_line_error(status, err, *fragments)
    assert not (tmp_path / "g.png").exists()


def test_class_on_an_unconditional_checkpoint(checkpoint, tmp_path, capsys):
    status, _, err = _cli(["--checkpoint", str(checkpoint), "--out", str(tmp_path / "g.png"),
                           "--class", "0"], capsys)
    assert_one_line_error(status, err, "--class", "unconditional", "expected no --class")


def test_trainer_real_grid_has_one_row_per_class(conditional):
    """samples/real.png of a conditional run: row k holds the first 8 images of class k in data
    order, as the sample grids hold G's images of class k."""
    data = load_data("shapes", 16, 3, conditional=True)
    cells = _cells(conditional.parent.parent / "samples" / "real.png", 3, 8, 16)
    for k in range(3):
        first = data.images[(data.labels == k).nonzero().flatten()[:8]]
        assert np.array_equal(cells[k], first.permute(0, 2, 3, 1).numpy())


def test_real_grid_leaves_a_short_class_row_black():
    images = torch.randint(1, 256, (5, 3, 4, 4), dtype=torch.uint8)
    labels = torch.tensor([1, 0, 1, 1, 0])
    grid, nrow = real_grid(images, labels, num_classes=3)
    assert nrow == 8 and grid.shape == (24, 3, 4, 4)
    assert torch.equal(grid[:2], images[[1, 4]]) and torch.equal(grid[8:11], images[[0, 2, 3]])
    assert not grid[2:8].any() and not grid[11:].any()  # the rest of rows 0 and 1, all of row 2
    unconditional, nrow = real_grid(images, None, num_classes=0)
    assert nrow is None and torch.equal(unconditional, images)
