"""Generate images from a trained checkpoint: ``python -m aigc_fast.sample`` (see ``--help``).

A conditional checkpoint (``--conditional``) draws the classes of ``--class`` (default: every
class), ``--n`` images of each, and its grid has one row per class, image j of every row from the
same noise, so that the rows differ by their class alone.

Also home of the small image-writing helpers the trainer uses for its sample grids (a grid and a
PNG writer on pillow, so torchvision is not a dependency).
"""
import math
import os
from contextlib import contextmanager

import numpy as np
import torch
from PIL import Image

from .checkpoint import load_checkpoint, load_state_checked
from .cli import (ArgumentParser, UsageError, add_device_argument, positive_int,
                  resolve_device)
from .ema import EMA_KEY
from ..models import Generator, cpu_channels_last

DEFAULT_COUNT = 64  # --n's default for an unconditional checkpoint
CLASS_COLUMNS = 8  # a conditional grid's images per class (the trainer's, and --n's default)


def to_uint8(images):
    """Float images in [-1, 1], (N, C, H, W) -> uint8 (N, H, W, C) numpy array on the host."""
    pixels = images.detach().float().add(1).mul_(127.5).round_().clamp_(0, 255).to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).cpu().numpy()


def make_grid(pixels, nrow=None, padding=2, pad_value=0):
    """uint8 (N, H, W, C) -> one uint8 (rows*H', nrow*W', C) image, ``padding`` pixels apart."""
    n, h, w, c = pixels.shape
    nrow = nrow or math.ceil(math.sqrt(n))
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + padding) + padding, nrow * (w + padding) + padding, c), pad_value,
                   dtype=np.uint8)
    for i in range(n):
        top, left = padding + (i // nrow) * (h + padding), padding + (i % nrow) * (w + padding)
        grid[top:top + h, left:left + w] = pixels[i]
    return grid


def save_png(pixels, path):
    """uint8 (H, W, C) with C = 1 or 3 -> a PNG file (grey or RGB)."""
    Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).save(path, format="PNG")


def save_grid(images, path, nrow=None):
    """Float images in [-1, 1] -> a grid PNG at ``path``."""
    save_png(make_grid(to_uint8(images), nrow), path)


def generator_key(state, ema=True):
    """Which generator of a checkpoint to use: its EMA weights (``"G_ema"``) when asked for and
    present (runs trained with ``--ema 0`` have none), else the trained weights (``"G"``)."""
    return EMA_KEY if ema and EMA_KEY in state else "G"


def generator_from_state(state, path, key):
    """The Generator stored under ``key`` of a loaded checkpoint ``state`` (read from ``path``);
    conditional if its config has classes (an older config has none: unconditional)."""
    cfg = state["config"]
    try:
        G = Generator(cfg["image_size"], cfg["nz"], cfg["ngf"], cfg["nc"],
                      cfg.get("num_classes", 0))
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"checkpoint {path}: its config cannot build a Generator ({err}); "
                         "expected a checkpoint written by aigc_fast.train")
    load_state_checked(G, state[key], f"checkpoint {path} ({key})")
    return G


def load_generator(path, device, ema=True):
    """The Generator of a training checkpoint (see :func:`generator_key`), in eval mode on
    ``device``."""
    state = load_checkpoint(path, required=("G", "config"))
    G = generator_from_state(state, path, generator_key(state, ema)).to(device)
    return cpu_channels_last(G).eval()


@contextmanager
def eval_mode(module):
    """Run ``module`` in eval mode (BatchNorm uses, and does not update, its running statistics),
    then put back the mode it had."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)


def class_rows(z, classes):
    """(noise, labels) of a grid with one row per class of ``classes``: row r is ``z`` with class
    ``classes[r]``, so the rows differ by their class alone."""
    return z.repeat(len(classes), 1), torch.as_tensor(classes).repeat_interleave(len(z))


@torch.no_grad()
def generate(G, n, seed, batch_size, device, classes=None):
    """``n`` images in [-1, 1] from G, in batches; noise and labels are a pure function of
    ``seed``. A conditional G draws ``n`` images of each of ``classes`` (:func:`class_rows` of
    ``n`` noise vectors), or without them ``n`` images of classes drawn uniformly after the noise
    (as evaluations do: every class alike)."""
    g = torch.Generator().manual_seed(seed)
    # drawn a batch at a time: the noise every evaluation of an unconditional G has used
    z = torch.cat([torch.randn(min(batch_size, n - start), G.nz, generator=g)
                   for start in range(0, n, batch_size)])
    labels = None
    if G.num_classes and classes is None:
        labels = torch.randint(G.num_classes, (n,), generator=g)
    elif G.num_classes:
        z, labels = class_rows(z, classes)
    for start in range(0, len(z), batch_size):
        part = slice(start, start + batch_size)
        yield G(z[part].to(device), *(() if labels is None else (labels[part].to(device),)))


def build_parser():
    p = ArgumentParser(prog="python -m aigc_fast.sample",
                       description="Generate images with the Generator of a training checkpoint.")
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="a checkpoint written by aigc_fast.train (e.g. "
                        "runs/001/checkpoints/last.pt)")
    p.add_argument("--n", type=positive_int, default=None,
                   help=f"how many images (default {DEFAULT_COUNT}); of a conditional "
                        f"checkpoint, how many of each class (default {CLASS_COLUMNS})")
    out = p.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", metavar="FILE.png", help="write one grid of all images to this PNG")
    out.add_argument("--out-dir", metavar="DIR",
                     help="write each image as its own PNG (000000.png, ...) into DIR, e.g. to use "
                          "generated images as augmentation data")
    p.add_argument("--seed", type=int, default=0, help="noise seed: same seed, same images "
                                                       "(default 0)")
    p.add_argument("--class", dest="classes", type=_class_list, action="extend", metavar="K[,K...]",
                   help="of a conditional checkpoint (trained with --conditional): the classes to "
                        "draw, by index (0 .. classes-1), one grid row each; repeatable (default: "
                        "every class)")
    p.add_argument("--batch-size", type=positive_int, default=256,
                   help="images generated per forward pass (default 256)")
    add_device_argument(p, "run the Generator")
    p.add_argument("--no-ema", action="store_true",
                   help="use the trained weights G, not their moving average G_ema (the default "
                        "when the checkpoint has one)")
    return p


def _class_list(text):
    """argparse type: one class index or a comma-separated list of them."""
    values = [int(part) for part in text.split(",")]
    if any(v < 0 for v in values):
        raise ValueError(text)
    return values


_class_list.__name__ = "class index or comma-separated list of them"


def chosen_classes(G, classes, path):
    """The classes to draw: ``--class`` checked against G's classes, or every class of a
    conditional G; None for an unconditional G (which refuses ``--class``)."""
    if not G.num_classes:
        if classes:
            raise UsageError(f"--class: checkpoint {path} is unconditional (trained without "
                             "--conditional); expected no --class")
        return None
    wrong = [k for k in classes or () if k >= G.num_classes]
    if wrong:
        raise UsageError(f"--class {wrong[0]}: checkpoint {path} has {G.num_classes} classes; "
                         f"expected indices 0..{G.num_classes - 1}")
    return classes or list(range(G.num_classes))


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = resolve_device(args.device)
    G = load_generator(args.checkpoint, device, ema=not args.no_ema)
    classes = chosen_classes(G, args.classes, args.checkpoint)
    n = args.n or (DEFAULT_COUNT if classes is None else CLASS_COLUMNS)
    batches = generate(G, n, args.seed, args.batch_size, device, classes)
    what = f"{n} images" if classes is None else f"{n} images of each of classes {classes}"
    if args.out:
        images = torch.cat([b.cpu() for b in batches])
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        save_grid(images, args.out, nrow=None if classes is None else n)
        print(f"wrote a grid of {what} to {args.out}"
              + ("" if classes is None else ", one row per class"))
        return 0
    os.makedirs(args.out_dir, exist_ok=True)
    index = 0
    for batch in batches:
        for pixels in to_uint8(batch):
            save_png(pixels, os.path.join(args.out_dir, f"{index:06d}.png"))
            index += 1
    print(f"wrote {what} to {args.out_dir}"
          + ("" if classes is None else " (class by class, in that order)"))
    return 0
