"""The activations a fused layer ends with: one table, read by the kernels (``code``: their ``ACT``
constexpr), the PyTorch reference, the operators (which pass codes) and the drop-ins (which
recognise the module classes).

The backward of every activation here reads its derivative from the layer's output alone:
ReLU and LeakyReLU with a slope >= 0 keep the sign of their input, and tanh' = 1 - tanh^2. So a
layer without BatchNorm saves its output, never its input.
"""
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Activation:
    """``code``: the kernels' ACT constexpr; ``reference``: PyTorch's op, (z, negative_slope) ->
    out; ``module``: the nn.Module class fuse() recognises (None: none, or not fused on its own)."""

    code: int
    reference: Callable[[torch.Tensor, float], torch.Tensor]
    module: Optional[type]


ACTIVATIONS = {
    None: Activation(0, lambda z, slope: z, None),
    "relu": Activation(1, lambda z, slope: F.relu(z), torch.nn.ReLU),
    "leaky_relu": Activation(2, F.leaky_relu, torch.nn.LeakyReLU),
    "tanh": Activation(3, lambda z, slope: torch.tanh(z), torch.nn.Tanh),
}

# the activation names by kernel code, for the operators' integer encoding
BY_CODE = {act.code: name for name, act in ACTIVATIONS.items()}


def code(name: Optional[str]) -> int:
    """The ACT code of ``name`` (a key of ACTIVATIONS)."""
    return ACTIVATIONS[name].code
