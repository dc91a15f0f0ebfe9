"""DCGAN Generator and Discriminator at any power-of-two size from 16 to 256 px.

The depth follows log2(size): one stride-2 layer per doubling above the 4x4 seed, widths doubling
towards the seed, so 64 px is pytorch/examples' dcgan and 32 px our 4-layer design. Layers live in
an ``nn.Sequential`` named ``main`` so the state_dict keys are ``main.N.*`` exactly as in
pytorch/examples: a checkpoint of that example loads with ``strict=True``. The Discriminator
returns logits (no Sigmoid; it has no parameters, so the keys are unchanged): every loss takes
logits, which is stable and autocast-safe.

Variants: D's normalisation (``d_norm``: BatchNorm, none, or a layer norm, for losses whose
penalty is per sample), spectral norm on D's convolutions (:func:`spectral_norm_convs`), and class
conditioning (``num_classes``): G multiplies z by a learned class embedding, D adds a projection
head (Miyato and Koyama, 2018) to its logit.
"""
import torch
from torch import nn
from torch.nn.utils import parametrizations

SUPPORTED_IMAGE_SIZES = (16, 32, 64, 128, 256)
D_NORMS = ("batch", "none", "layer")


def _check_image_size(image_size):
    if image_size not in SUPPORTED_IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {SUPPORTED_IMAGE_SIZES}, got {image_size!r}")


def _check_positive(**values):
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _up(in_ch, out_ch, first=False):
    """ConvTranspose2d -> BatchNorm2d -> ReLU: the run that aigc_fast.fuse turns into one fused
    op."""
    stride, padding = (1, 0) if first else (2, 1)
    return [
        nn.ConvTranspose2d(in_ch, out_ch, 4, stride, padding, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(True),
    ]


def _down(in_ch, out_ch, norm="batch"):
    """Conv2d [-> norm] -> LeakyReLU(0.2). "layer" is GroupNorm with one group: LayerNorm over
    (C, H, W) with a per-channel affine, which normalises each sample on its own (a gradient
    penalty's per-sample gradients stay independent); it runs as a PyTorch op between fused
    convolutions. A convolution followed by a norm has no bias (the norm removes it)."""
    layers = [nn.Conv2d(in_ch, out_ch, 4, 2, 1, bias=False)]
    if norm == "batch":
        layers.append(nn.BatchNorm2d(out_ch))
    elif norm == "layer":
        layers.append(nn.GroupNorm(1, out_ch))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


def _widths(image_size, base):
    """Channel widths from the full-resolution side towards the 4x4 seed: base, 2 base, ...,
    one per stride-2 layer between the image and 4x4 (log2(size) - 2 of them)."""
    return [base * 2**i for i in range(image_size.bit_length() - 3)]


def _check_num_classes(num_classes):
    if not isinstance(num_classes, int) or num_classes < 0 or num_classes == 1:
        raise ValueError("num_classes must be 0 (unconditional) or an int >= 2, got "
                         f"{num_classes!r}")


class Generator(nn.Module):
    """Maps noise (N, nz) or (N, nz, 1, 1) to images (N, nc, S, S) in [-1, 1]; with
    ``num_classes`` it also takes class labels (N,), whose learned nz-wide embedding multiplies z
    elementwise. Multiplied, every class reads the noise through its own gains; concatenated (the
    other common form), G learned to ignore z and drew one image per class (measured: 32 px
    shapes, 1000 steps, spread over noise 0.012 concatenated vs 0.37 multiplied, over classes
    0.45 and 0.32)."""

    def __init__(self, image_size=32, nz=100, ngf=64, nc=3, num_classes=0):
        super().__init__()
        _check_image_size(image_size)
        _check_positive(nz=nz, ngf=ngf, nc=nc)
        _check_num_classes(num_classes)
        self.image_size, self.nz, self.num_classes = image_size, nz, num_classes
        if num_classes:
            self.embed = nn.Embedding(num_classes, nz)
        widths = _widths(image_size, ngf)[::-1]  # from the 4x4 seed layer down to ngf
        layers = _up(nz, widths[0], first=True)
        for in_ch, out_ch in zip(widths, widths[1:]):
            layers += _up(in_ch, out_ch)
        layers += [nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z, labels=None):
        z = z.flatten(1)
        if self.num_classes:
            z = z * self.embed(labels).to(z.dtype)
        return self.main(z[:, :, None, None])


class Discriminator(nn.Module):
    """Maps images (N, nc, S, S) to real/fake logits of shape (N,).

    ``d_norm`` normalises every layer but the first ("batch", "none" or "layer"). With
    ``num_classes`` it also takes labels (N,): ``main`` is then the feature trunk, ``head`` the
    final 4x4 convolution, and the logit gains the projection <embed(y), sum-pooled features>
    (Miyato and Koyama, 2018).
    """

    def __init__(self, image_size=32, ndf=64, nc=3, d_norm="batch", num_classes=0):
        super().__init__()
        _check_image_size(image_size)
        _check_positive(ndf=ndf, nc=nc)
        _check_num_classes(num_classes)
        if d_norm not in D_NORMS:
            raise ValueError(f"d_norm must be one of {D_NORMS}, got {d_norm!r}")
        self.image_size, self.num_classes = image_size, num_classes
        widths = _widths(image_size, ndf)
        layers = _down(nc, widths[0], norm="none")
        for in_ch, out_ch in zip(widths, widths[1:]):
            layers += _down(in_ch, out_ch, d_norm)
        final = nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False)
        if num_classes:
            self.main = nn.Sequential(*layers)
            self.head = nn.Sequential(final)  # a Sequential, so fuse() runs it fused
            self.embed = nn.Embedding(num_classes, widths[-1])
        else:
            self.main = nn.Sequential(*layers, final)

    def forward(self, x, labels=None):
        if not self.num_classes:
            return self.main(x).view(-1)
        features = self.main(x)
        projection = (self.embed(labels).to(features.dtype) * features.sum((2, 3))).sum(1)
        return self.head(features).view(-1) + projection


@torch.no_grad()
def dcgan_init_(module):
    """DCGAN initialisation (Radford et al.): conv weights N(0, 0.02), BN weight N(1, 0.02), bias
    0. A conditional Discriminator's class embedding is N(0, 0.02) too: its projection
    <embed(y), sum-pooled features> is a convolution of the features with embed(y) at every
    position, so it starts at the final convolution's scale (PyTorch's N(0, 1) made it ~50 times
    larger: the untrained D's logits were the projection alone). G's embedding keeps N(0, 1), the
    scale of the noise it joins."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
        elif isinstance(m, Discriminator) and m.num_classes:
            nn.init.normal_(m.embed.weight, 0.0, 0.02)
    return module


def cpu_channels_last(module):
    """``module`` in channels_last if it is on the CPU, else as it is: oneDNN's convolutions run a
    32 px DCGAN training step ~23 % faster than in NCHW (measured: 2 cores, ngf = ndf = 32, batch
    64). Training and sampling share this, so sampling runs a generator in the layout it trained in.
    """
    if next(module.parameters()).device.type == "cpu":
        module = module.to(memory_format=torch.channels_last)
    return module


def spectral_norm_convs(module):
    """Put PyTorch's spectral-norm parametrization on every Conv2d of ``module`` (SNGAN's D) and
    return it. Runs after the initialisation: the parametrization divides the initialised weight
    by its largest singular value; its ``original``, ``_u`` and ``_v`` join the state_dict."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            parametrizations.spectral_norm(m)
    return module


def build_models(image_size=32, nz=100, ngf=64, ndf=64, nc=3, *, d_norm="batch",
                 spectral_norm=False, num_classes=0):
    """A DCGAN-initialised (Generator, Discriminator) pair of the given variant."""
    G = dcgan_init_(Generator(image_size, nz, ngf, nc, num_classes))
    D = dcgan_init_(Discriminator(image_size, ndf, nc, d_norm, num_classes))
    return G, spectral_norm_convs(D) if spectral_norm else D
