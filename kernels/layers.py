"""What describes a convolution layer, without its tensors: importable without Triton, so that the
PyTorch reference and the argument checks use the same description and the same output size."""
from dataclasses import dataclass
from typing import Optional, Tuple


def output_size(in_hw, kernel, stride, padding, transposed, output_padding=(0, 0)):
    """Spatial output size of a Conv2d or ConvTranspose2d."""
    if transposed:
        return tuple((i - 1) * s - 2 * p + k + op for i, k, s, p, op in
                     zip(in_hw, kernel, stride, padding, output_padding))
    return tuple((i + 2 * p - k) // s + 1 for i, k, s, p in zip(in_hw, kernel, stride, padding))


@dataclass(frozen=True)
class LayerSpec:
    """What a chain knows of one layer besides its tensors: the conv's geometry (a ConvTranspose2d
    when ``transposed``; groups=1, dilation=1), whether a BatchNorm2d follows (with its ``eps`` and
    ``momentum``, None for the cumulative average, and ``training``: whether it normalises with
    the batch's statistics, else the running ones), and the activation (a key of
    activations.ACTIVATIONS) with its ``negative_slope``."""

    transposed: bool
    stride: Tuple[int, int]
    padding: Tuple[int, int]
    output_padding: Tuple[int, int] = (0, 0)
    has_bn: bool = False
    eps: float = 1e-5
    momentum: Optional[float] = 0.1
    activation: Optional[str] = None
    negative_slope: float = 0.0
    training: bool = True

    def out_channels(self, weight) -> int:
        return weight.shape[1] if self.transposed else weight.shape[0]

    def out_hw(self, in_hw, weight):
        return output_size(in_hw, tuple(weight.shape[2:]), self.stride, self.padding,
                           self.transposed, self.output_padding)
