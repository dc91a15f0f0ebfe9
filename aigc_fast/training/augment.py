"""DiffAugment (Zhao et al., "Differentiable Augmentation for Data-Efficient GAN Training", 2020):
the same random, differentiable transforms applied to every image D sees, real and fake, so that D
cannot memorise a small training set and G still gets gradients through the transform.

The policies are the paper's: "color" (brightness, saturation, contrast), "translation" (a shift
of up to 1/8 of the side, zero fill) and "cutout" (a zeroed square of half the side). Their
parameters are drawn per image from one ``torch.Generator`` (seeded by ``--seed``, saved in
checkpoints) in float32, whatever the images' dtype, so every backend and precision draws the
same numbers in the same order. Each policy is a draw (:func:`draw_translation`, ...) and a pure,
differentiable transform of the images and the drawn parameters (:func:`translate`, ...).
"""
import torch
import torch.nn.functional as F

POLICIES = ("color", "translation", "cutout")
TRANSLATION_RATIO = 0.125  # the paper's: shift by up to 1/8 of the side
CUTOUT_RATIO = 0.5  # the paper's: cut a square of half the side


def parse_policy(text):
    """"translation,cutout,color" -> ("translation", "cutout", "color"), applied in that order; ""
    or "none" -> () (no augmentation). ValueError naming an unknown policy."""
    if text in ("", "none"):
        return ()
    names = tuple(name.strip() for name in text.split(","))
    unknown = [name for name in names if name not in POLICIES]
    if unknown or len(set(names)) != len(names):
        raise ValueError(f"--augment {text}: expected a comma-separated subset of "
                         f"{','.join(POLICIES)} (each once), or none")
    return names


def _uniform(n, generator, device, dtype):
    """n values in [0, 1), shaped (n, 1, 1, 1) for broadcasting, drawn in float32."""
    return torch.rand(n, 1, 1, 1, generator=generator, device=device).to(dtype)


def color(x, generator):
    """The paper's colour policy: brightness += U(-0.5, 0.5); saturation (deviation from the
    per-pixel channel mean) x U(0, 2); contrast (deviation from the image mean) x U(0.5, 1.5)."""
    n = len(x)
    x = x + (_uniform(n, generator, x.device, x.dtype) - 0.5)
    mean = x.mean(dim=1, keepdim=True)
    x = (x - mean) * (_uniform(n, generator, x.device, x.dtype) * 2) + mean
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    return (x - mean) * (_uniform(n, generator, x.device, x.dtype) + 0.5) + mean


def draw_translation(x, generator):
    """Per-image shifts (dy, dx), each (N,) int64 in [-r, r] with r = round(side / 8)."""
    ry, rx = (int(side * TRANSLATION_RATIO + 0.5) for side in x.shape[2:])
    dy = torch.randint(-ry, ry + 1, (len(x),), generator=generator, device=x.device)
    dx = torch.randint(-rx, rx + 1, (len(x),), generator=generator, device=x.device)
    return dy, dx


def translate(x, dy, dx):
    """Each image moved by (dy[i], dx[i]) pixels, with zeros where it moved away from: output
    pixel (h, w) reads input (h + dy, w + dx). A gather from the zero-padded images (the paper's
    formulation, differentiable in x); shifts beyond 1 pixel clamp to the pad, which is zero."""
    n, _, h, w = x.shape
    padded = F.pad(x, (1, 1, 1, 1))
    rows = (torch.arange(h, device=x.device)[None, :] + dy[:, None] + 1).clamp(0, h + 1)
    cols = (torch.arange(w, device=x.device)[None, :] + dx[:, None] + 1).clamp(0, w + 1)
    batch = torch.arange(n, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)


def draw_cutout(x, generator):
    """Per-image centres (cy, cx), each (N,) int64, of the square :func:`cutout` zeroes."""
    sy, sx = (int(side * CUTOUT_RATIO + 0.5) for side in x.shape[2:])
    cy = torch.randint(0, x.shape[2] + (1 - sy % 2), (len(x),), generator=generator,
                       device=x.device)
    cx = torch.randint(0, x.shape[3] + (1 - sx % 2), (len(x),), generator=generator,
                       device=x.device)
    return cy, cx


def cutout(x, cy, cx):
    """Each image with the square of side round(side / 2) whose top-left corner is
    (cy - size // 2, cx - size // 2) set to zero (the part inside the image)."""
    h, w = x.shape[2:]
    sy, sx = (int(side * CUTOUT_RATIO + 0.5) for side in (h, w))
    rows = torch.arange(h, device=x.device)[None, :] - (cy[:, None] - sy // 2)
    cols = torch.arange(w, device=x.device)[None, :] - (cx[:, None] - sx // 2)
    keep_rows = (rows < 0) | (rows >= sy)
    keep_cols = (cols < 0) | (cols >= sx)
    keep = keep_rows[:, :, None] | keep_cols[:, None, :]
    return x * keep[:, None].to(x.dtype)


def _translation(x, generator):
    return translate(x, *draw_translation(x, generator))


def _cutout(x, generator):
    return cutout(x, *draw_cutout(x, generator))


_APPLY = {"color": color, "translation": _translation, "cutout": _cutout}


class DiffAugment:
    """``augment(images)``: the policies in order, each drawing its parameters from
    ``generator``. With no policy it returns the images unchanged and draws nothing."""

    def __init__(self, policies, generator):
        self.policies, self.generator = tuple(policies), generator

    def __call__(self, x):
        for name in self.policies:
            x = _APPLY[name](x, self.generator)
        return x
