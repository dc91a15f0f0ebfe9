"""DCGAN models: output shapes, state_dict keys and checkpoint compatibility with
pytorch/examples."""
import pytest
import torch
from torch import nn

from aigc_fast.models import Discriminator, Generator, build_models, dcgan_init_


def _examples_generator(nz, ngf, nc):
    """pytorch/examples dcgan/main.py's netG, written out independently of our code."""
    return nn.Sequential(
        nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False), nn.BatchNorm2d(ngf * 8),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 4),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf * 2),
        nn.ReLU(True),
        nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False), nn.BatchNorm2d(ngf), nn.ReLU(True),
        nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False), nn.Tanh())


def _examples_discriminator(ndf, nc):
    """pytorch/examples dcgan/main.py's netD (it ends in a Sigmoid; ours returns the logits)."""
    return nn.Sequential(
        nn.Conv2d(nc, ndf, 4, 2, 1, bias=False), nn.LeakyReLU(0.2, inplace=True),
        nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 2),
        nn.LeakyReLU(0.2, True),
        nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 4),
        nn.LeakyReLU(0.2, True),
        nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False), nn.BatchNorm2d(ndf * 8),
        nn.LeakyReLU(0.2, True),
        nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False), nn.Sigmoid())


class _Wrapped(nn.Module):
    def __init__(self, main):
        super().__init__()
        self.main = main


@pytest.mark.parametrize("image_size", [32, 64])
@pytest.mark.parametrize("nc", [1, 3])
def test_shapes(image_size, nc):
    G, D = build_models(image_size, nz=7, ngf=4, ndf=5, nc=nc)
    z = torch.randn(3, 7)
    x = G(z)
    assert x.shape == (3, nc, image_size, image_size)
    assert x.abs().max() <= 1  # Tanh
    assert torch.equal(G(z[:, :, None, None]), x)  # (N, nz) and (N, nz, 1, 1) are the same input
    assert D(x).shape == (3,)


def test_32px_architecture():
    G, D = Generator(32, nz=10, ngf=4, nc=3), Discriminator(32, ndf=4, nc=3)
    convs = [m for m in G.main if isinstance(m, nn.ConvTranspose2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0], c.padding[0]) for c in convs] == [
        (10, 16, 1, 0), (16, 8, 2, 1), (8, 4, 2, 1), (4, 3, 2, 1)]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in G.main) == 3
    convs = [m for m in D.main if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.stride[0], c.padding[0]) for c in convs] == [
        (3, 4, 2, 1), (4, 8, 2, 1), (8, 16, 2, 1), (16, 1, 1, 0)]
    assert not isinstance(D.main[1], nn.BatchNorm2d)  # no BN after the first conv


def test_64px_loads_pytorch_examples_checkpoint_strictly():
    torch.manual_seed(0)
    theirs_g, theirs_d = \
        _Wrapped(_examples_generator(12, 4, 3)), _Wrapped(_examples_discriminator(5, 3))
    dcgan_init_(theirs_g), dcgan_init_(theirs_d)
    G, D = Generator(64, nz=12, ngf=4, nc=3), Discriminator(64, ndf=5, nc=3)
    assert list(G.state_dict()) == list(theirs_g.state_dict())
    G.load_state_dict(theirs_g.state_dict(), strict=True)
    D.load_state_dict(theirs_d.state_dict(), strict=True)
    G.eval(), D.eval(), theirs_g.eval(), theirs_d.eval()
    z = torch.randn(2, 12, 1, 1)
    x = G(z)
    torch.testing.assert_close(x, theirs_g.main(z), rtol=0, atol=0)
    torch.testing.assert_close(torch.sigmoid(D(x)), theirs_d.main(x).view(-1), rtol=1e-6, atol=1e-7)


def test_dcgan_init_statistics():
    torch.manual_seed(0)
    G, D = build_models(64, nz=100, ngf=32, ndf=32, nc=3)
    for model in (G, D):
        for m in model.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)) and m.weight.numel() > 5000:
                assert abs(m.weight.std().item() - 0.02) < 0.002
                assert abs(m.weight.mean().item()) < 0.002
            if isinstance(m, nn.BatchNorm2d):
                assert torch.equal(m.bias, torch.zeros_like(m.bias))
                assert (m.weight - 1).abs().max() < 0.1 and m.weight.std() > 0


@pytest.mark.parametrize("bad", [{"image_size": 48}, {"nz": 0}, {"ngf": -1}, {"nc": 2.0}])
def test_bad_arguments_name_the_argument(bad):
    kwargs = {"image_size": 32, "nz": 10, "ngf": 4, "nc": 3, **bad}
    with pytest.raises(ValueError, match=next(iter(bad))):
        Generator(**kwargs)


@pytest.mark.parametrize("image_size", [16, 128, 256])
def test_depth_follows_log2_of_the_size(image_size):
    G, D = build_models(image_size, nz=5, ngf=2, ndf=2, nc=3)
    layers = image_size.bit_length() - 2  # 4x4 seed, then one stride-2 layer per doubling
    assert sum(isinstance(m, nn.ConvTranspose2d) for m in G.main) == layers
    assert sum(isinstance(m, nn.Conv2d) for m in D.main) == layers
    x = G(torch.randn(2, 5))
    assert x.shape == (2, 3, image_size, image_size) and D(x).shape == (2,)


def test_d_norm_and_spectral_norm_variants():
    _, D = build_models(32, nz=5, ngf=2, ndf=3, d_norm="layer", spectral_norm=True)
    kinds = [("GroupNorm" if isinstance(m, nn.GroupNorm) else "Conv2d") for m in D.main
             if isinstance(m, (nn.Conv2d, nn.GroupNorm))]
    assert kinds == ["Conv2d", "Conv2d", "GroupNorm", "Conv2d", "GroupNorm", "Conv2d"]
    assert len(D.main) == 9  # and a LeakyReLU after every norm and after the first conv
    assert "main.0.parametrizations.weight.original" in D.state_dict()
    _, D = build_models(32, nz=5, ngf=2, ndf=3, d_norm="none")
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)) for m in D.main)


def test_conditional_models_embed_and_project_the_label():
    torch.manual_seed(0)
    G, D = build_models(16, nz=5, ngf=2, ndf=3, nc=3, num_classes=4)
    G.eval(), D.eval()
    z, labels = torch.randn(3, 5), torch.tensor([0, 3, 1])
    x = G(z, labels)
    want = G.main((z * G.embed.weight[labels])[:, :, None, None])
    torch.testing.assert_close(x, want, rtol=0, atol=0)
    features = D.main(x)  # (3, 2 ndf, 4, 4)
    projection = (D.embed.weight[labels] * features.sum((2, 3))).sum(1)
    torch.testing.assert_close(D(x, labels), D.head(features).view(-1) + projection)
    assert not torch.equal(D(x, labels), D(x, (labels + 1) % 4))
