"""--dataset and pytorch/examples' dcgan command lines, run verbatim.

Tests marked ``extras`` need torchvision (see tests/extras_helpers.py); the others check what
needs no extra: ImageFolder's layout read by our own loader, the flags, and one-line errors.
"""
import json
import pickle
import struct
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from aigc_fast.models import build_models
from aigc_fast.train import main
from aigc_fast.training.data import find_labelled_images, load_data
from cli_helpers import assert_one_line_error, run_cli
from extras_helpers import require_extra

FAST = ["--ngf", "8", "--ndf", "8", "--nz", "16", "--eval-every", "0"]


def _cli(argv, capsys):
    return run_cli(main, argv, capsys, "aigc_fast.train")


def _png(path, rgb, size=8):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), rgb).save(path)


def _class_tree(root):
    """An ImageFolder tree: classes b_dogs, a_cats (sorted: a_cats = 0), nested files, one file at
    the top (ImageFolder skips it), one non-image."""
    _png(root / "b_dogs" / "z.png", (0, 0, 255))
    _png(root / "b_dogs" / "inner" / "y.jpg", (0, 255, 0))
    _png(root / "a_cats" / "x.png", (255, 0, 0))
    _png(root / "a_cats" / "w.PNG", (255, 255, 0))
    _png(root / "top.png", (9, 9, 9))
    (root / "a_cats" / "notes.txt").write_text("not an image")


def test_folder_reads_imagefolder_layout_and_class_order(tmp_path):
    _class_tree(tmp_path)
    files, labels, classes = find_labelled_images(tmp_path)  # a folder's files before its folders'
    rel = [str(f.relative_to(tmp_path)) for f in files]
    assert classes == ["a_cats", "b_dogs"]
    assert list(zip(rel, labels)) == [("top.png", None), ("a_cats/w.PNG", 0), ("a_cats/x.png", 0),
                                      ("b_dogs/z.png", 1), ("b_dogs/inner/y.jpg", 1)]
    images, desc = load_data(str(tmp_path), 32, 3, dataset="folder")[:2]
    assert images.shape == (5, 3, 32, 32) and "folder" in desc
    assert images[2, :, 0, 0].tolist() == [255, 0, 0]  # a_cats/x.png, third in that order


@pytest.mark.extras
def test_folder_labels_equal_torchvision_imagefolder(tmp_path):
    datasets = require_extra("torchvision.datasets")
    _class_tree(tmp_path)
    files, labels, classes = find_labelled_images(tmp_path)
    reference = datasets.ImageFolder(str(tmp_path))
    assert classes == reference.classes
    assert [(str(f), y) for f, y in zip(files, labels) if y is not None] == reference.samples


def test_examples_folder_command_line_runs_verbatim(tmp_path, capsys):
    """pytorch/examples' README command, on 64 images: one step an epoch, 25 epochs."""
    for i in range(64):
        _png(tmp_path / "data" / f"c{i % 2}" / f"{i:02d}.png", (4 * i, 255 - 4 * i, 128))
    out = tmp_path / "out"
    argv = (f"--dataset folder --dataroot {tmp_path / 'data'} --imageSize 64 --batchSize 64 "
            f"--niter 25 --lr 0.0002 --beta1 0.5 --manualSeed 1 --outf {out} --workers 2").split()
    status, stdout, err = _cli(argv + FAST, capsys)
    assert status == 0, err
    config = json.loads((out / "config.json").read_text())
    assert (config["dataset"], config["image_size"], config["batch_size"], config["steps"],
            config["seed"]) == ("folder", 64, 64, 25, 1)
    assert "done: step 25/25" in stdout


def test_data_flag_still_infers_the_dataset(tmp_path, capsys, shapes_npz):
    out = tmp_path / "run"
    status, _, err = _cli(["--data", shapes_npz(8, 0), "--batch-size", "4", "--dry-run",
                           "--out", str(out)] + FAST, capsys)
    assert status == 0, err
    assert json.loads((out / "config.json").read_text())["dataset"] == "npz"


@pytest.mark.parametrize("argv, fragments", [
    (["--dataset", "mnist"], ("--dataset mnist needs --dataroot DIR",)),
    (["--dataset", "folder", "--dataroot", "x", "--download"], ("--download", "cifar10, mnist")),
    (["--dataset", "npz", "--dataroot", "."], ("--dataset npz", "folder source")),
    (["--dataset", "celeba"], ("--dataset", "invalid choice")),
])
def test_dataset_flag_errors_are_one_line(argv, fragments, capsys):
    assert_one_line_error(*_cli(argv, capsys)[::2], *fragments)


def test_torchvision_missing_or_broken_is_one_line(tmp_path, capsys, monkeypatch):
    """Not installed, and installed but unimportable (as the CUDA wheel beside CPU torch is:
    RuntimeError at import): one line each, naming the fix."""
    monkeypatch.delitem(sys.modules, "torchvision.datasets", raising=False)
    monkeypatch.setitem(sys.modules, "torchvision", None)  # import raises ModuleNotFoundError
    status, _, err = _cli(["--dataset", "cifar10", "--dataroot", str(tmp_path)], capsys)
    assert_one_line_error(status, err, "--dataset cifar10 needs torchvision", "not installed",
                          "same package index")
    broken = tmp_path / "site" / "torchvision"
    broken.mkdir(parents=True)
    (broken / "__init__.py").write_text(
        "raise RuntimeError('operator torchvision::nms does not exist')\n")
    monkeypatch.delitem(sys.modules, "torchvision")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    status, _, err = _cli(["--dataset", "fake", "--dry-run"], capsys)
    assert_one_line_error(status, err, "cannot be imported here", "torchvision::nms")


def test_netG_netD_start_from_examples_state_dicts(tmp_path, capsys):
    """Their netG_epoch_N.pth is a plain state_dict with our keys; --netG/--netD load it, and a
    dry run's checkpoint starts from exactly those weights (lr 1e-12: one step moves nothing)."""
    G, D = build_models(64, 16, 8, 8, 3)
    torch.save(G.state_dict(), tmp_path / "netG_epoch_24.pth")
    torch.save(D.state_dict(), tmp_path / "netD_epoch_24.pth")
    out = tmp_path / "run"
    status, _, err = _cli(["--netG", str(tmp_path / "netG_epoch_24.pth"), "--netD",
                           str(tmp_path / "netD_epoch_24.pth"), "--imageSize", "64", "--lr",
                           "1e-12", "--batch-size", "4", "--seed", "5", "--dry-run", "--out",
                           str(out)] + FAST, capsys)
    assert status == 0, err
    ckpt = torch.load(out / "checkpoints" / "last.pt", weights_only=True)
    for key, module in (("G", G), ("D", D)):
        for name, value in module.state_dict().items():
            if value.is_floating_point() and "running" not in name:
                torch.testing.assert_close(ckpt[key][name], value, atol=1e-6, rtol=0)
    status, _, err = _cli(["--netG", str(tmp_path / "netD_epoch_24.pth"), "--imageSize", "64"]
                          + FAST, capsys)
    assert_one_line_error(status, err, "--netG", "keys do not match")


def test_ngpu_and_accel_are_accepted_with_a_note(tmp_path, capsys):
    status, _, err = _cli(["--ngpu", "2", "--accel", "--dry-run", "--batch-size", "4", "--out",
                           str(tmp_path / "run")] + FAST, capsys)
    assert status == 0 and "torchrun --nproc-per-node 2" in err


# --- torchvision's sets (extras) ----------------------------------------------------------------


def _write_idx(path, array):
    """An idx file of uint8: magic 0x0000, type 0x08 (ubyte), the dimension count, the sizes."""
    path.parent.mkdir(parents=True, exist_ok=True)
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.tobytes())


def _write_mnist(root, images):
    """MNIST's raw idx files, as torchvision reads them."""
    raw = root / "MNIST" / "raw"
    labels = np.arange(len(images), dtype=np.uint8) % 10
    for split in ("train", "t10k"):
        _write_idx(raw / f"{split}-images-idx3-ubyte", images)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", labels)


@pytest.mark.extras
def test_examples_mnist_command_line_present_and_missing(tmp_path, capsys):
    require_extra("torchvision.datasets")
    digits = np.random.default_rng(0).integers(0, 256, (8, 28, 28), dtype=np.uint8)
    _write_mnist(tmp_path / "mnist", digits)
    out = tmp_path / "run"
    status, _, err = _cli(["--dataset", "mnist", "--dataroot", str(tmp_path / "mnist"),
                           "--dry-run", "--batchSize", "4", "--outf", str(out)] + FAST, capsys)
    assert status == 0, err
    config = json.loads((out / "config.json").read_text())
    assert (config["dataset"], config["nc"]) == ("mnist", 1)  # one channel, as in examples
    images = load_data(str(tmp_path / "mnist"), 32, 1, dataset="mnist").images
    expected = torch.nn.functional.interpolate(torch.from_numpy(digits)[:, None].float(), 32,
                                               mode="bilinear", align_corners=False)
    assert (images.float() - expected.round().clamp(0, 255)).abs().max() <= 1
    labelled = load_data(str(tmp_path / "mnist"), 32, 1, dataset="mnist", conditional=True)
    assert labelled.num_classes == 10 and labelled.labels.tolist() == list(range(8))
    status, _, err = _cli(["--dataset", "mnist", "--dataroot", str(tmp_path / "none")], capsys)
    assert_one_line_error(status, err, "--dataset mnist", "MNIST/raw/train-images-idx3-ubyte",
                          "--download")


@pytest.mark.extras
def test_examples_cifar10_command_line_present_and_missing(tmp_path, capsys, monkeypatch):
    cifar = require_extra("torchvision.datasets.cifar")
    pixels = np.random.default_rng(1).integers(0, 256, (8, 3072), dtype=np.uint8)
    folder = tmp_path / "cifar" / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": pixels, "labels": list(range(8))}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [str(i) for i in range(10)]}, f)
    # these files are not CIFAR-10's, so they fail torchvision's md5 check of a real download
    monkeypatch.setattr(cifar, "check_integrity", lambda *args, **kwargs: True)
    out = tmp_path / "run"
    status, _, err = _cli(["--dataset", "cifar10", "--dataroot", str(tmp_path / "cifar"),
                           "--dry-run", "--batchSize", "4", "--outf", str(out)] + FAST, capsys)
    assert status == 0, err
    images = load_data(str(tmp_path / "cifar"), 32, 3, dataset="cifar10").images
    assert images.shape == (40, 3, 32, 32)  # five training batches of 8, the test batch unread
    assert torch.equal(images[:8], torch.from_numpy(pixels).view(8, 3, 32, 32))
    labelled = load_data(str(tmp_path / "cifar"), 32, 3, dataset="cifar10", conditional=True)
    assert labelled.num_classes == 10 and labelled.labels.tolist() == list(range(8)) * 5
    monkeypatch.undo()
    status, _, err = _cli(["--dataset", "cifar10", "--dataroot", str(tmp_path / "none")], capsys)
    assert_one_line_error(status, err, "--dataset cifar10", "cifar-10-batches-py", "--download")


@pytest.mark.extras
def test_examples_fake_dry_run(tmp_path, capsys):
    datasets = require_extra("torchvision.datasets")
    out = tmp_path / "run"
    status, stdout, err = _cli(["--dataset", "fake", "--dry-run", "--outf", str(out)] + FAST,
                               capsys)
    assert status == 0, err
    assert "fake (1000 images)" in stdout and "done: step 1/1" in stdout
    labelled = load_data(None, 16, 3, dataset="fake", conditional=True)
    reference = datasets.FakeData(1000, (3, 16, 16))
    assert labelled.num_classes == 10
    assert labelled.labels[:20].tolist() == [int(reference[i][1]) for i in range(20)]


def test_a_checkpoint_from_before_dataset_resumes(tmp_path, capsys, shapes_npz):
    """Configs written before --dataset existed lack "dataset" and "classes": a resume infers
    them from "data" as those versions read it."""
    out = tmp_path / "run"
    argv = ["--data", shapes_npz(8, 0), "--batch-size", "4", "--steps", "1", "--out", str(out)]
    assert _cli(argv + FAST, capsys)[0] == 0
    last = out / "checkpoints" / "last.pt"
    state = torch.load(last, weights_only=True)
    del state["config"]["dataset"], state["config"]["classes"]
    torch.save(state, last)
    status, _, err = _cli(["--resume", str(last), "--steps", "2"], capsys)
    assert status == 0, err
    assert json.loads((out / "config.json").read_text())["dataset"] == "npz"
