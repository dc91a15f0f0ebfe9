"""The workloads, derived from :mod:`aigc_fast.models` so they follow the networks we ship:
every ConvTranspose2d+BatchNorm2d+ReLU layer of the 32 and 64 px Generators (forward, and forward +
backward), the BCE-with-logits loss on D's logits, and one whole training step of each network."""
from dataclasses import dataclass

import torch
from torch import nn

from aigc_fast.models import Generator

from . import cost


@dataclass(frozen=True)
class Network:
    nz: int
    ngf: int
    ndf: int
    nc: int


DCGAN = Network(nz=100, ngf=64, ndf=64, nc=3)  # pytorch/examples' defaults
TINY = Network(nz=8, ngf=4, ndf=4, nc=3)  # for the Triton interpreter and dry runs
IMAGE_SIZES = (32, 64)
CUDA_BATCHES = (64, 256, 512)
CPU_BATCHES = (8,)
TINY_BATCH = 2
# The training steps also measured under bf16 autocast (the trainer's --precision bf16), as
# (image size, batch): the small and the large end of the float32 rows.
CUDA_AUTOCAST_STEPS = ((32, 64), (64, 512))


@dataclass(frozen=True)
class ConvTransposeBNReLUCase:
    """One fused layer: x (N, C_in, H, W) -> (N, C_out, OH, OW), training mode, x requires grad."""

    layer: str  # "G64.2": the Generator, its image size, the layer's position (1 = the first)
    batch: int
    c_in: int
    c_out: int
    in_hw: tuple
    out_hw: tuple
    kernel: tuple
    stride: tuple
    padding: tuple
    output_padding: tuple
    backward: bool

    @property
    def group(self):
        return "conv_transpose_bn_relu " + ("fwd+bwd" if self.backward else "fwd")

    @property
    def name(self):
        (h, w), (oh, ow) = self.in_hw, self.out_hw
        return f"{self.layer} N={self.batch} {self.c_in}x{h}x{w}->{self.c_out}x{oh}x{ow}"

    @property
    def shapes(self):
        return {"x": [self.batch, self.c_in, *self.in_hw],
                "weight": [self.c_in, self.c_out, *self.kernel],
                "out": [self.batch, self.c_out, *self.out_hw]}

    def cost(self, itemsize):
        return cost.conv_transpose_bn_relu(
            self.batch, self.c_in, self.c_out, self.in_hw, self.out_hw, self.kernel, self.stride,
            self.padding, backward=self.backward, itemsize=itemsize)


@dataclass(frozen=True)
class BCECase:
    """BCE-with-logits (reduction="mean") forward + backward on D's (N,) logits."""

    batch: int
    group = "bce_with_logits fwd+bwd"

    @property
    def name(self):
        return f"N={self.batch}"

    @property
    def shapes(self):
        return {"logits": [self.batch], "target": [self.batch]}

    def cost(self, itemsize):
        return cost.bce_with_logits(self.batch, itemsize=itemsize)


@dataclass(frozen=True)
class TrainStepCase:
    """One :func:`aigc_fast.train.train_step` (D on real and fake, then G) with Adam; ``autocast``
    "bf16" runs it as ``--precision bf16`` does (float32 weights and inputs, bfloat16 autocast),
    "" in the workload's own dtype."""

    image_size: int
    batch: int
    network: Network
    autocast: str = ""
    group = "train_step"

    @property
    def name(self):
        return (f"{self.image_size}px N={self.batch}" + ("" if self.network == DCGAN else " tiny")
                + (f" autocast {self.autocast}" if self.autocast else ""))

    @property
    def shapes(self):
        n = self.network
        return {"real": [self.batch, n.nc, self.image_size, self.image_size],
                "z": [self.batch, n.nz],
                "nz": n.nz, "ngf": n.ngf, "ndf": n.ndf}

    def cost(self, itemsize):
        """Under autocast the activations, which dominate the bytes, are 2-byte (the float32
        weights are counted at 2 bytes too: a slight undercount)."""
        n = self.network
        return cost.train_step(self.batch, self.image_size, n.nz, n.ngf, n.ndf, n.nc,
                               itemsize=2 if self.autocast else itemsize)


def case_id(case):
    """Unique and readable: the pytest id, the benchmark group and the report's row key."""
    return f"{case.group} | {case.name}"


def generator_layers(image_size, network, batch, backward):
    """A case for every ConvTranspose2d -> BatchNorm2d -> ReLU run of the Generator (shapes
    only)."""
    with torch.device("meta"):
        G = Generator(image_size, network.nz, network.ngf, network.nc)
    following = dict(zip(G.main, list(G.main)[1:]))
    layers = cost.conv_layers(G, (batch, network.nz, 1, 1))
    return [ConvTransposeBNReLUCase(
        f"G{image_size}.{i}", batch, m.in_channels, m.out_channels, tuple(in_shape[2:]),
        tuple(out_shape[2:]), m.kernel_size, m.stride, m.padding, m.output_padding, backward)
        for i, (m, in_shape, out_shape) in enumerate(layers, 1)
        if isinstance(following.get(m), nn.BatchNorm2d)]


def cases(batches, autocast_steps=(), network=DCGAN, image_sizes=IMAGE_SIZES):
    """All workloads, most telling first (the report measures in this order, so a run cut short by
    its time budget loses the least): the training step (then under bf16 autocast at
    ``autocast_steps``, (image size, batch) pairs), the fused layer forward+backward, the loss, the
    fused layer's forward alone; each at every batch size, smallest first."""
    steps = ([TrainStepCase(s, b, network) for b in batches for s in image_sizes]
             + [TrainStepCase(s, b, network, "bf16") for s, b in autocast_steps])
    layers = {backward: [c for b in batches for s in image_sizes
                         for c in generator_layers(s, network, b, backward)]
              for backward in (True, False)}
    return steps + layers[True] + [BCECase(b) for b in batches] + layers[False]


def tiny_cases():
    """The interpreter's sanity sizes: a tiny 32 px network at batch 2 (one fused layer, the loss, a
    step, in float32 and under bf16 autocast), small enough for Triton's numpy interpreter."""
    layer = generator_layers(32, TINY, TINY_BATCH, backward=True)[1]
    forward_only = generator_layers(32, TINY, TINY_BATCH, backward=False)[1]
    return [TrainStepCase(32, TINY_BATCH, TINY), TrainStepCase(32, TINY_BATCH, TINY, "bf16"), layer,
            forward_only, BCECase(TINY_BATCH)]
