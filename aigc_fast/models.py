"""DCGAN Generator and Discriminator at 32 px (our design) and 64 px (pytorch/examples' dcgan).

Layers live in an ``nn.Sequential`` named ``main`` so the state_dict keys are ``main.N.*`` exactly as
in pytorch/examples: a checkpoint of that example loads with ``strict=True``. The Discriminator
returns logits (no Sigmoid; it has no parameters, so the keys are unchanged): the loss is
BCE-with-logits, which is stable and autocast-safe.
"""
import torch
from torch import nn

SUPPORTED_IMAGE_SIZES = (32, 64)


def _check_image_size(image_size):
    if image_size not in SUPPORTED_IMAGE_SIZES:
        raise ValueError(f"image_size must be one of {SUPPORTED_IMAGE_SIZES}, got {image_size!r}")


def _check_positive(**values):
    for name, value in values.items():
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def _up(in_ch, out_ch, first=False):
    """ConvTranspose2d -> BatchNorm2d -> ReLU: the run that aigc_fast.fuse turns into one fused op."""
    stride, padding = (1, 0) if first else (2, 1)
    return [
        nn.ConvTranspose2d(in_ch, out_ch, 4, stride, padding, bias=False),
        nn.BatchNorm2d(out_ch),
        nn.ReLU(True),
    ]


def _down(in_ch, out_ch, batch_norm=True):
    layers = [nn.Conv2d(in_ch, out_ch, 4, 2, 1, bias=False)]
    if batch_norm:
        layers.append(nn.BatchNorm2d(out_ch))
    layers.append(nn.LeakyReLU(0.2, inplace=True))
    return layers


class Generator(nn.Module):
    """Maps noise (N, nz) or (N, nz, 1, 1) to images (N, nc, S, S) in [-1, 1]."""

    def __init__(self, image_size=32, nz=100, ngf=64, nc=3):
        super().__init__()
        _check_image_size(image_size)
        _check_positive(nz=nz, ngf=ngf, nc=nc)
        self.image_size, self.nz = image_size, nz
        # widths from the 4x4 seed layer down to ngf: 4ngf,2ngf,ngf (32 px); 8ngf..ngf (64 px)
        widths = [ngf * 2**i for i in reversed(range(3 if image_size == 32 else 4))]
        layers = _up(nz, widths[0], first=True)
        for in_ch, out_ch in zip(widths, widths[1:]):
            layers += _up(in_ch, out_ch)
        layers += [nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh()]
        self.main = nn.Sequential(*layers)

    def forward(self, z):
        if z.dim() == 2:
            z = z[:, :, None, None]
        return self.main(z)


class Discriminator(nn.Module):
    """Maps images (N, nc, S, S) to real/fake logits of shape (N,)."""

    def __init__(self, image_size=32, ndf=64, nc=3):
        super().__init__()
        _check_image_size(image_size)
        _check_positive(ndf=ndf, nc=nc)
        self.image_size = image_size
        widths = [ndf * 2**i for i in range(3 if image_size == 32 else 4)]
        layers = _down(nc, widths[0], batch_norm=False)
        for in_ch, out_ch in zip(widths, widths[1:]):
            layers += _down(in_ch, out_ch)
        layers.append(nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False))
        self.main = nn.Sequential(*layers)

    def forward(self, x):
        return self.main(x).view(-1)


@torch.no_grad()
def dcgan_init_(module):
    """DCGAN initialisation (Radford et al.): conv weights N(0, 0.02), BN weight N(1, 0.02), bias 0."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, 0.02)
            nn.init.zeros_(m.bias)
    return module


def cpu_channels_last(module):
    """``module`` in channels_last if it is on the CPU, else as it is: oneDNN's convolutions run a
    32 px DCGAN training step ~23 % faster than in NCHW (measured: 2 cores, ngf = ndf = 32, batch
    64). Training and sampling share this, so sampling runs a generator in the layout it trained in.
    """
    if next(module.parameters()).device.type == "cpu":
        module = module.to(memory_format=torch.channels_last)
    return module


def build_models(image_size=32, nz=100, ngf=64, ndf=64, nc=3):
    """A DCGAN-initialised (Generator, Discriminator) pair."""
    return (
        dcgan_init_(Generator(image_size, nz, ngf, nc)),
        dcgan_init_(Discriminator(image_size, ndf, nc)),
    )
