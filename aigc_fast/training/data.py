"""Training data: the embedded procedural "shapes" set, image folders, .npz arrays and, through
torchvision (:mod:`.torchvision_sets`), the standard sets pytorch/examples' dcgan trains on.

Every source is decoded once into one uint8 tensor (N, C, S, S) held in memory: batches are then an
index operation, fast enough for any GPU, and the order of batches is a pure function of
(seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would have.

A conditional run (``--conditional``) also reads each image's class, an int64 tensor (N,) indexed
by the same batches: a folder's first-level sub-folders, an npz's ``labels`` array, the targets of
cifar10, mnist and fake, the shapes set's kinds (:data:`SHAPE_CLASSES`).
"""
import os
import warnings
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .cli import UsageError
from .torchvision_sets import LSUN_DEFAULT_CLASS, TORCHVISION_SETS, load_torchvision_set
from ..models import SUPPORTED_IMAGE_SIZES

SHAPES = "shapes"
FOLDER_SETS = ("folder", "imagenet", "lfw")  # pytorch/examples reads all three with ImageFolder
DATASETS = (SHAPES, "folder", "npz") + TORCHVISION_SETS + FOLDER_SETS[1:]
SHAPES_COUNT = 16384  # the embedded set: 50 MB of uint8 pixels at 32 px, made in about a second
SHAPES_SEED = 0  # one fixed data set for every run, like a data set on disk
# torchvision's ImageFolder extensions, so a folder holds the same images for both
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
# Shape edges ramp over this fraction of the image side (2.6 px at 32 px). With crisp 1-pixel edges
# the discriminator wins on edge sharpness alone, and the default run's DCGAN learned the shapes far
# more slowly (measured); the soft edges keep the shapes plainly recognisable.
EDGE = 0.08
# Shape radius as a fraction of the image side, and how far a shape's centre strays from the image's
# centre, as a fraction of the room the frame leaves it. With centres anywhere in the frame
# (SPREAD = 1) and radii from 0.2, the default run's DCGAN still drew rounded, mode-averaged blobs
# after 5500 steps; with these it draws circles, squares and triangles one can tell apart
# (measured).
RADIUS = (0.3, 0.42)
SPREAD = 0.4
# Each kind's half-extent (half its bounding box's larger side) in units of the radius: a circle r,
# a square 0.8 r, a triangle 1.04 r (half its 2.08 r base; it is 1.8 r tall, centred vertically).
HALF_EXTENT = (1.0, 0.8, 1.04)
DEVICE_RESIDENT_BYTES = 1 << 30  # data sets up to this size live on the GPU: no host copy per batch
SHAPE_CLASSES = ("circle", "square", "triangle")  # the shapes set's kinds: its conditional classes
LABELLED_SOURCES = ("a folder of class sub-folders, an npz with 'labels', cifar10, mnist, fake or "
                    "shapes")


# --- the embedded "shapes" set -----------------------------------------------------------------


def _hsv_to_rgb(h, s, v):
    """Vectorised HSV -> RGB for tensors of shape (N,) in [0, 1]; returns (N, 3)."""
    k = torch.stack([(5 + h * 6) % 6, (3 + h * 6) % 6, (1 + h * 6) % 6], dim=1)
    return v[:, None] - (v * s)[:, None] * (torch.minimum(k, 4 - k).clamp(0, 1))


def _uniform(g, n, low, high):
    return torch.rand(n, generator=g) * (high - low) + low


def _shape_params(g, n, size):
    """Per-image random parameters of the shapes set (drawn all at once: chunking cannot change
    them)."""
    kind = torch.randint(0, len(SHAPE_CLASSES), (n,), generator=g)  # an index of SHAPE_CLASSES
    radius = _uniform(g, n, *RADIUS) * size
    # how far the centre may move and keep the whole shape and its soft edge in the frame (only the
    # ramp's faint tail at a triangle's base corners, under 11 % coverage, can reach the frame's
    # edge)
    room = (size / 2 - radius * torch.tensor(HALF_EXTENT)[kind] - EDGE * size / 2).clamp_(min=0)
    cx = size / 2 + _uniform(g, n, -SPREAD, SPREAD) * room
    cy = size / 2 + _uniform(g, n, -SPREAD, SPREAD) * room
    light_bg = torch.rand(n, generator=g) < 0.5
    # background: weakly saturated, dark or light; the shape: saturated, of the opposite lightness
    bg = _hsv_to_rgb(torch.rand(n, generator=g), _uniform(g, n, 0.0, 0.45),
                     torch.where(light_bg, _uniform(g, n, 0.7, 0.95), _uniform(g, n, 0.05, 0.3)))
    fg = _hsv_to_rgb(torch.rand(n, generator=g), _uniform(g, n, 0.6, 1.0),
                     torch.where(light_bg, _uniform(g, n, 0.2, 0.55), _uniform(g, n, 0.75, 1.0)))
    angle = torch.rand(n, generator=g) * (2 * torch.pi)
    tilt = _uniform(g, n, -0.35, 0.35)  # lightness gradient across the background
    return dict(kind=kind, radius=radius, cx=cx, cy=cy, bg=bg, fg=fg,
                gx=tilt * torch.cos(angle) / size, gy=tilt * torch.sin(angle) / size)


def _circle(dx, dy, r):
    return torch.sqrt(dx * dx + dy * dy) - r


def _square(dx, dy, r):
    return torch.maximum(dx.abs(), dy.abs()) - 0.8 * r


def _triangle(dx, dy, r):
    # equilateral, apex up (image y points down): outward edge normals at 90, 210 and 330 degrees;
    # its centroid sits 0.3 r below (dx, dy) = 0, so the apex (1.2 r up) and base (0.6 r down) are
    # 0.9 r from it and the triangle is centred in its bounding box
    dy = dy - 0.3 * r
    return torch.maximum(torch.maximum(dy, -0.866 * dx - 0.5 * dy), 0.866 * dx - 0.5 * dy) - 0.6 * r


def _render(p, size):
    """Images in [0, 1], (n, 3, size, size), from the parameters ``p`` of n images.

    Each shape is a signed distance field (negative inside), so coverage = clamp(0.5 - sd / w, 0, 1)
    gives edges that ramp over w = EDGE * size pixels; each kind's field is computed only for its
    own images.
    """
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    dx = coords[None, None, :] - p["cx"][:, None, None]  # (n, 1, S)
    dy = coords[None, :, None] - p["cy"][:, None, None]  # (n, S, 1)
    r = p["radius"][:, None, None]
    sd = torch.empty(len(r), size, size)
    for k, field in enumerate((_circle, _square, _triangle)):
        idx = (p["kind"] == k).nonzero().view(-1)
        sd[idx] = field(dx[idx], dy[idx], r[idx])
    alpha = (0.5 - sd / (EDGE * size)).clamp_(0, 1)[:, None]
    shade = 1 + dx * p["gx"][:, None, None] + dy * p["gy"][:, None, None]  # (n, S, S)
    background = p["bg"][:, :, None, None] * shade[:, None]
    return background.add_(alpha * (p["fg"][:, :, None, None] - background)).clamp_(0, 1)


def make_shapes(n, image_size=32, seed=SHAPES_SEED, chunk_pixels=1 << 19):
    """The procedural "shapes" data set: uint8 (n, 3, S, S), a pure function of (n, size, seed).

    One soft-edged circle, square or triangle per image, of varied size, position (near the centre)
    and colour, on a dark or light background with a gentle gradient.
    """
    if image_size not in SUPPORTED_IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {SUPPORTED_IMAGE_SIZES}, got {image_size!r}")
    params = _shape_params(torch.Generator().manual_seed(seed), n, image_size)
    return _render_uint8(params, n, image_size, chunk_pixels)


def _render_uint8(params, n, image_size, chunk_pixels=1 << 19):
    """uint8 (n, 3, S, S) images of the shapes parameters ``params``, in cache-sized chunks."""
    chunk = max(1, chunk_pixels // (image_size * image_size))
    out = torch.empty(n, 3, image_size, image_size, dtype=torch.uint8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # cache-sized elementwise chunks: threads cost more than they gain
    try:
        for start in range(0, n, chunk):
            part = {k: v[start:start + chunk] for k, v in params.items()}
            out[start:start + chunk] = _render(part, image_size).mul_(255).round_().to(torch.uint8)
    finally:
        torch.set_num_threads(threads)
    return out


class LazyShapes:
    """The shapes set rendered on demand: ``shapes[index]`` (an int64 index tensor, a slice or an
    int) renders those images, the same pixels :func:`make_shapes` gives them. Above 64 px the
    whole set would take minutes and gigabytes to render (92 s and 805 MB at 128 px, measured),
    so training renders each batch as it draws it; only the per-image parameters live in memory.
    """

    def __init__(self, n, image_size, nc=3, seed=SHAPES_SEED):
        if image_size not in SUPPORTED_IMAGE_SIZES:
            raise ValueError(f"image_size must be one of {SUPPORTED_IMAGE_SIZES}, got "
                             f"{image_size!r}")
        self.n, self.image_size, self.nc = n, image_size, nc
        self.params = _shape_params(torch.Generator().manual_seed(seed), n, image_size)

    def __len__(self):
        return self.n

    @property
    def labels(self):
        """Each image's kind (an index of SHAPE_CLASSES): its class in a conditional run."""
        return self.params["kind"]

    def __getitem__(self, index):
        picked = torch.arange(self.n)[index].cpu()  # indexing as a tensor would (int: one image)
        part = {k: v[picked.reshape(-1)] for k, v in self.params.items()}
        images = _to_channels(_render_uint8(part, picked.numel(), self.image_size), self.nc,
                              "shapes")
        return images.reshape(*picked.shape, *images.shape[1:])


# the largest side at which the embedded shapes set is rendered whole at start-up (64 px: 200 MB,
# about 4 s); above it, lazily (LazyShapes)
SHAPES_EAGER_MAX_SIZE = 64


# --- conversions shared by the sources ------------------------------------------------------------


def _to_channels(images, nc, what):
    """uint8 (N, C, H, W) with C in (1, 3) -> C = nc (ITU-R 601 luma for RGB -> grey)."""
    c = images.shape[1]
    if c == nc:
        return images
    if c == 3 and nc == 1:
        luma = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
        grey = torch.empty(len(images), 1, *images.shape[2:], dtype=torch.uint8)
        for i in range(0, len(images), 1024):  # chunks: no float copy of the whole data set
            part = (images[i:i + 1024].float() * luma).sum(1, keepdim=True)
            grey[i:i + 1024] = part.round_().clamp_(0, 255).to(torch.uint8)
        return grey
    if c == 1 and nc == 3:
        return images.expand(-1, 3, -1, -1).contiguous()
    raise UsageError(f"{what}: images have {c} channels; expected 1 or 3")


def _resize_center_crop(images, size, chunk=1024):
    """uint8 (N, C, H, W) -> (N, C, size, size): centre square crop, then antialiased resize."""
    h, w = images.shape[-2:]
    if (h, w) == (size, size):
        return images
    side = min(h, w)
    top, left = (h - side) // 2, (w - side) // 2
    images = images[:, :, top:top + side, left:left + side]
    out = torch.empty(*images.shape[:2], size, size, dtype=torch.uint8)
    for i in range(0, len(images), chunk):
        part = F.interpolate(images[i:i + chunk].float(), size=(size, size), mode="bilinear",
                             antialias=side > size, align_corners=False)
        out[i:i + chunk] = part.round_().clamp_(0, 255).to(torch.uint8)
    return out


# --- .npz arrays --------------------------------------------------------------------------------


def load_npz(path, image_size, nc, conditional=False):
    """A uint8 N x H x W x C (or N x H x W) array from ``path`` -> (uint8 (N, nc, S, S), labels,
    number of classes): with ``conditional`` the int64 (N,) classes of its ``labels`` array and
    their count (the largest label + 1); else None and 0. A ``labels`` array is never taken for
    the images."""
    what = f"--data {path}"
    if not Path(path).is_file():
        raise UsageError(f"{what}: no such file; expected a .npz file")
    try:
        with np.load(path, allow_pickle=False) as archive:
            names = [n for n in archive.files if n != "labels"]
            name = "images" if "images" in names else (names[0] if len(names) == 1 else None)
            if name is None:
                raise UsageError(f"{what}: holds arrays {names}; expected one array "
                                 "(or one named 'images'), beside an optional 'labels'")
            array = archive[name]
            labels = archive["labels"] if conditional and "labels" in archive.files else None
    except UsageError:
        raise
    except Exception as err:  # zipfile/pickle/OS errors: the file is not a readable .npz
        raise UsageError(f"{what}: cannot be read as a .npz archive ({type(err).__name__}: {err})")
    if array.dtype != np.uint8 or array.ndim not in (3, 4) or len(array) == 0:
        raise UsageError(f"{what}: array {name!r} is {array.dtype} with shape {array.shape}; "
                         "expected a non-empty uint8 array N x H x W x C (C = 1 or 3) or N x H x W")
    images = torch.from_numpy(array if array.ndim == 4 else array[..., None]).permute(0, 3, 1, 2)
    images = _resize_center_crop(_to_channels(images, nc, what), image_size).contiguous()
    if not conditional:
        return images, None, 0
    return (images, *_npz_labels(labels, len(images), what))


def _npz_labels(labels, n, what):
    """(int64 (n,) labels, number of classes) of a conditional run's ``labels`` array."""
    expected = (f"expected an integer array 'labels' of {n} class indices 0..K-1 (K >= 2 classes) "
                "beside the images")
    if labels is None:
        raise UsageError(f"--conditional: {what} holds no 'labels' array; {expected}")
    if not np.issubdtype(labels.dtype, np.integer) or labels.shape != (n,):
        raise UsageError(f"--conditional: {what}: 'labels' is {labels.dtype} with shape "
                         f"{labels.shape}; {expected}")
    low, high = int(labels.min()), int(labels.max())
    if low < 0 or high < 1:
        raise UsageError(f"--conditional: {what}: 'labels' range over {low}..{high}; {expected}")
    return torch.from_numpy(labels.astype(np.int64)), high + 1


# --- folders of image files -----------------------------------------------------------------------


def _decode_image(path, size, nc):
    """One file -> uint8 (H, W[, C]) array of size x size, or None if it cannot be read."""
    try:
        with Image.open(path) as im:
            im.draft("L" if nc == 1 else "RGB", (size, size))  # JPEG: decode at reduced scale
            im = im.convert("L" if nc == 1 else "RGB")
            w, h = im.size
            scale = size / min(w, h)
            new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
            im = im.resize((new_w, new_h), Image.BICUBIC)
            left, top = (new_w - size) // 2, (new_h - size) // 2
            return np.asarray(im.crop((left, top, left + size, top + size)))
    except Exception:  # any decoder error: the caller counts it and warns once
        return None


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes one file per item, so a DataLoader can spread the decoding over worker processes."""

    def __init__(self, files, size, nc):
        self.files, self.size, self.nc = files, size, nc

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        return _decode_image(self.files[i], self.size, self.nc)


def _as_list(batch):
    return batch


def _walk_images(folder):
    """Image files below ``folder`` in ImageFolder's order: sorted folders, sorted names."""
    return [Path(d) / f for d, _, files in sorted(os.walk(folder, followlinks=True))
            for f in sorted(files) if f.lower().endswith(IMAGE_EXTENSIONS)]


def find_labelled_images(root):
    """(files, labels, classes) of every image file (by extension) anywhere below ``root``.

    The classes are ImageFolder's: the sub-folders of ``root``, sorted by name, and an image's
    label is its class's index; files in class folders come in ImageFolder's order, so for an
    ImageFolder tree the (file, label) pairs are its ``samples``. Images lying directly in ``root``
    (ImageFolder skips them; a flat folder holds nothing else) come first, labelled None.
    """
    root = Path(root)
    classes = sorted(entry.name for entry in os.scandir(root) if entry.is_dir())
    files = [root / f for f in sorted(os.listdir(root))
             if f.lower().endswith(IMAGE_EXTENSIONS) and (root / f).is_file()]
    labels = [None] * len(files)
    for index, name in enumerate(classes):
        found = _walk_images(root / name)
        files += found
        labels += [index] * len(found)
    return files, labels, classes


def load_folder(root, image_size, nc, workers=0, conditional=False):
    """Decode every image below ``root`` -> (uint8 (N, nc, S, S), labels, number of classes);
    unreadable files are skipped. With ``conditional`` the labels are the int64 (N,) indices of
    each image's class sub-folder (:func:`find_labelled_images`), else None and 0."""
    what = f"--data {root}"
    if not Path(root).is_dir():
        raise UsageError(f"{what}: no such folder; expected a folder of images")
    files, labels, classes = find_labelled_images(root)
    if not files:
        raise UsageError(f"{what}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found below "
                         "this folder; expected at least one")
    if conditional:
        _check_folder_classes(what, files, labels, classes)
    loader = torch.utils.data.DataLoader(_ImageFiles(files, image_size, nc), batch_size=64,
                                         num_workers=workers, collate_fn=_as_list)
    decoded = [a for batch in loader for a in batch]
    bad = [f for f, a in zip(files, decoded) if a is None]
    good = [a for a in decoded if a is not None]
    if not good:
        raise UsageError(f"{what}: none of its {len(files)} image files could be read; expected "
                         f"readable {'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} files")
    if bad:
        warnings.warn(f"{what}: skipped {len(bad)} unreadable image file(s) of {len(files)} "
                      f"(first: {bad[0]})", stacklevel=2)
    array = np.stack(good)
    images = torch.from_numpy(array if array.ndim == 4 else array[..., None])
    images = images.permute(0, 3, 1, 2).contiguous()
    if not conditional:
        return images, None, 0
    kept = [label for label, a in zip(labels, decoded) if a is not None]
    return images, torch.tensor(kept, dtype=torch.int64), len(classes)


def _check_folder_classes(what, files, labels, classes):
    """A conditional run's folder: every image in a class sub-folder, at least 2 classes."""
    rule = "the first-level sub-folders are the classes"
    loose = [f for f, label in zip(files, labels) if label is None]
    if loose:
        raise UsageError(f"--conditional: {what} holds {len(loose)} image(s) directly in it "
                         f"(first: {loose[0].name}); expected every image in a class sub-folder "
                         f"({rule})")
    if len(classes) < 2:
        raise UsageError(f"--conditional: {what} has {len(classes)} class sub-folder(s) "
                         f"{classes}; expected at least 2 ({rule})")


# --- one entry point -----------------------------------------------------------------------------


def infer_dataset(data):
    """The --dataset that ``--data`` means: "shapes", a folder or a .npz file; UsageError if
    none."""
    if data is None or data == SHAPES:
        return SHAPES
    path = Path(data)
    if path.is_dir():
        return "folder"
    if path.is_file() and path.suffix.lower() == ".npz":
        return "npz"
    expected = "a folder of images, a .npz file, or 'shapes' (the embedded set)"
    if path.exists():
        raise UsageError(f"--data {data}: is neither a folder nor a .npz file; expected {expected}")
    raise UsageError(f"--data {data}: no such file or folder; expected {expected}")


class Data(NamedTuple):
    """A training set as :func:`load_data` reads it."""

    images: Any  # uint8 (N, nc, S, S): a tensor, or LazyShapes (rendered per batch)
    desc: str  # a short description for the start-up line
    labels: Optional[torch.Tensor] = None  # a conditional run's int64 (N,) class of each image
    num_classes: int = 0  # 0: unconditional


def load_data(data, image_size, nc, workers=0, dataset=None, download=False,
              lsun_class=LSUN_DEFAULT_CLASS, conditional=False):
    """:class:`Data` of ``dataset`` read from ``data`` (its root), with each image's class when
    ``conditional``; a source without classes is then a UsageError.

    ``dataset`` None: the one ``data`` means (:func:`infer_dataset`). ``download`` and
    ``lsun_class`` concern the torchvision sets only.
    """
    if image_size not in SUPPORTED_IMAGE_SIZES:
        raise UsageError(f"--image-size {image_size} is not supported; expected one of "
                         f"{SUPPORTED_IMAGE_SIZES}")
    dataset = dataset or infer_dataset(data)
    if dataset == SHAPES:
        shapes = LazyShapes(SHAPES_COUNT, image_size, nc)
        lazy = image_size > SHAPES_EAGER_MAX_SIZE
        images = shapes if lazy else shapes[:]
        labels, num_classes = shapes.labels, len(SHAPE_CLASSES)
        desc = f"shapes (embedded, {SHAPES_COUNT} images{', rendered per batch' * lazy}"
    else:
        if dataset in FOLDER_SETS:
            images, labels, num_classes = load_folder(data, image_size, nc, workers, conditional)
        elif dataset == "npz":
            images, labels, num_classes = load_npz(data, image_size, nc, conditional)
        else:
            raw, labels, num_classes = load_torchvision_set(dataset, data, image_size, download,
                                                            lsun_class)
            images = _resize_center_crop(_to_channels(raw, nc, f"--dataset {dataset}"),
                                         image_size).contiguous()
        where = f"{dataset} in {data}" if data is not None else dataset
        desc = f"{where} ({len(images)} images"
    if not conditional:
        return Data(images, desc + ")")
    if labels is None:
        raise UsageError(f"--conditional: --dataset {dataset} has no class labels; expected a "
                         f"labelled source: {LABELLED_SOURCES}")
    return Data(images, f"{desc}, {num_classes} classes)", labels, num_classes)


def data_of_config(cfg, workers=0, download=False, conditional=False):
    """:func:`load_data` of a run's config (a checkpoint's "config", or config.json)."""
    dataset = cfg.get("dataset") or infer_dataset(cfg["data"])  # older runs had no "dataset"
    return load_data(cfg["data"], cfg["image_size"], cfg["nc"], workers, dataset, download,
                     cfg.get("classes", LSUN_DEFAULT_CLASS), conditional)


# --- batches ------------------------------------------------------------------------------------


class BatchOrder:
    """Which images form each batch: a fresh permutation per epoch, a pure function of (seed,
    epoch).

    Full batches only (BatchNorm statistics of a 3-image tail batch would be noise). Because the
    order depends on nothing but (seed, epoch), resuming at step s needs only s itself.

    With several processes (``world_size``) a step's global batch is the next world_size *
    batch_size images of the permutation and ``rank`` takes the rank-th batch_size of them: the
    shards are disjoint, and the order depends on the global batch only, not on how it is split.
    """

    def __init__(self, n, batch_size, seed, rank=0, world_size=1):
        global_batch = batch_size * world_size
        if global_batch > n:
            what = f"{batch_size}" if world_size == 1 else f"{batch_size} x {world_size} processes"
            raise UsageError(f"--batch-size {what} is larger than the data set ({n} images); "
                             f"expected at most {n} in all")
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.steps_per_epoch = n // global_batch

    def permutation(self, epoch):
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g)

    def batches(self, start_step, device=torch.device("cpu")):
        """Index tensors on ``device`` for steps start_step, start_step + 1, ... (endless)."""
        epoch, offset = divmod(start_step, self.steps_per_epoch)
        while True:
            perm = self.permutation(epoch)
            if device.type == "cuda":  # one pinned, non-blocking copy per epoch: no host sync
                perm = perm.pin_memory().to(device, non_blocking=True)
            for b in range(offset, self.steps_per_epoch):
                start = (b * self.world_size + self.rank) * self.batch_size
                yield perm[start:start + self.batch_size]
            epoch, offset = epoch + 1, 0


def batch_stream(images, order, start_step, device, labels=None):
    """Endless (uint8 images, int64 labels) batches on ``device`` from step ``start_step`` on,
    each batch's labels picked by the same indices (None for an unconditional run's None).

    On CUDA a data set that fits in DEVICE_RESIDENT_BYTES is moved to the GPU once and indexed
    there; a larger one is indexed on the host and copied from pinned memory without blocking.
    """
    sources = (images, labels)
    if device.type == "cuda" and torch.is_tensor(images) \
            and images.numel() <= DEVICE_RESIDENT_BYTES:
        sources = tuple(s if s is None else s.to(device) for s in sources)
        yield from (_pick(sources, index) for index in order.batches(start_step, device))
    elif device.type == "cuda":
        for index in order.batches(start_step):
            yield tuple(s if s is None else s.pin_memory().to(device, non_blocking=True)
                        for s in _pick(sources, index))
    else:
        yield from (_pick(sources, index) for index in order.batches(start_step))


def _pick(sources, index):
    """The rows ``index`` of each source tensor (None stays None)."""
    return tuple(s if s is None else s[index] for s in sources)


def to_model_range(batch):
    """uint8 [0, 255] -> float32 [-1, 1] (done on the device, after the 4x smaller uint8 copy); an
    image batch in channels-last memory: the layout our kernels and oneDNN read without a copy
    (the conversion is the copy that .float() makes anyway)."""
    layout = torch.channels_last if batch.dim() == 4 else torch.preserve_format
    return batch.to(torch.float32, memory_format=layout).div_(127.5).sub_(1.0)
