"""The standard data sets of pytorch/examples' dcgan, read through ``torchvision.datasets`` (the
optional extra ``aigc_fast[data]``): cifar10, mnist, lsun and fake (FakeData).

Each returns its training images as one uint8 tensor (N, C, H, W) at their stored size, with their
class labels (cifar10's and mnist's targets, FakeData's random ones; none for lsun, which reads one
category); :mod:`.data` converts channels and size as for every other source. Nothing is
downloaded unless ``download`` (``--download``) asks for it, and missing files are one line that
says where they are expected.
"""
import numpy as np
import torch

from .cli import UsageError
from .extras import import_extra

TORCHVISION_SETS = ("cifar10", "mnist", "lsun", "fake")
DOWNLOADABLE = ("cifar10", "mnist")  # torchvision cannot download LSUN; FakeData needs no files
LSUN_DEFAULT_CLASS = "bedroom"
FAKE_COUNT = 1000  # torchvision FakeData's default size, as pytorch/examples uses it
# where torchvision looks for each set's files below --dataroot, for the error that they are missing
EXPECTED_FILES = {
    "cifar10": "{root}/cifar-10-batches-py/data_batch_1 ... data_batch_5",
    "mnist": "{root}/MNIST/raw/train-images-idx3-ubyte",
    "lsun": "{root}/{lsun_class}_train_lmdb (made by LSUN's download script)",
}


def _open(factory, name, root, lsun_class, download):
    """``factory()``, with a set whose files are missing or unreadable turned into one line."""
    try:
        return factory()
    except UsageError:
        raise
    except Exception as err:  # torchvision: RuntimeError "Dataset not found"; lmdb.Error; ...
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        where = EXPECTED_FILES[name].format(root=root, lsun_class=lsun_class)
        fetch = ("; pass --download to fetch them" if name in DOWNLOADABLE and not download
                 else "")
        raise UsageError(f"--dataset {name} --dataroot {root}: cannot read its files "
                         f"({reason[:160]}); expected {where}{fetch}") from None


def _stack_pil(dataset):
    """Every item (PIL image, target), decoded in order -> (uint8 (N, C, H, W), int64 (N,))."""
    items = [dataset[i] for i in range(len(dataset))]
    array = np.stack([np.asarray(image) for image, _ in items])
    images = torch.from_numpy(array if array.ndim == 4 else array[..., None]).permute(0, 3, 1, 2)
    return images, torch.tensor([int(target) for _, target in items], dtype=torch.int64)


def load_torchvision_set(name, root, image_size, download=False, lsun_class=LSUN_DEFAULT_CLASS):
    """The training set of torchvision's ``name`` under ``root``: (uint8 images (N, C, H, W),
    int64 labels (N,) or None, number of classes; 0 for lsun, whose one category has no labels)."""
    datasets = import_extra("torchvision.datasets", f"--dataset {name}")
    if name == "fake":
        fake = datasets.FakeData(FAKE_COUNT, (3, image_size, image_size))
        return (*_stack_pil(fake), fake.num_classes)
    if name == "cifar10":
        train = _open(lambda: datasets.CIFAR10(root, train=True, download=download),
                      name, root, lsun_class, download)
        return (torch.from_numpy(train.data).permute(0, 3, 1, 2),
                torch.tensor(train.targets, dtype=torch.int64), len(train.classes))
    if name == "mnist":
        train = _open(lambda: datasets.MNIST(root, train=True, download=download),
                      name, root, lsun_class, download)
        return train.data[:, None], train.targets.to(torch.int64), len(train.classes)
    if name == "lsun":
        import_extra("lmdb", "--dataset lsun")
        train = _open(lambda: datasets.LSUN(root, classes=[f"{lsun_class}_train"]),
                      name, root, lsun_class, download)
        return _stack_pil(train)[0], None, 0
    raise ValueError(f"not a torchvision set: {name!r}; expected one of {TORCHVISION_SETS}")
