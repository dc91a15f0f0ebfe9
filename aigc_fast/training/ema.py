"""An exponential moving average (EMA) of a Generator's weights, the generator GANs are judged by.

The averaged weights smooth out the step-to-step oscillation of adversarial training, so samples
and scores from them are better and steadier than from the trained G (Karras et al. 2018, Yazici
et al. 2019). After update ``t`` (1, 2, ...) with decay ``d_t``::

    ema_t = d_t * ema_{t-1} + (1 - d_t) * p_t,   ema_0 = p_0 (the weights at construction)

so with a constant decay d, ema_k = d^k p_0 + (1 - d) * sum_{i=1..k} d^(k-i) p_i.

Ramp-up: with the long-run decay alone (e.g. 0.999, a half-life of 693 updates) a run of a few
thousand steps would end with a noticeable share of its random start still in the average. As in
StyleGAN2-ADA, the half-life is therefore capped at ``rampup`` (5 %) of the updates so far:
``d_t = min(decay, 0.5 ** (1 / (rampup * t)))``; it reaches ``decay`` after
``ln 0.5 / (rampup * ln decay)`` updates (13 860 for 0.999). ``rampup=None`` keeps ``d_t = decay``.

Buffers (BatchNorm running statistics) are not averaged but copied from G at every update, as
StyleGAN/ADA do: running statistics are already averages, and G's are the ones gathered under the
current weights. The EMA copy lives in eval mode with gradients off; the update is two foreach
kernels with a Python-float weight, so it never waits for the device.
"""
import copy
from typing import Optional

import torch
from torch import nn

DEFAULT_DECAY = 0.999
DEFAULT_RAMPUP = 0.05
EMA_KEY = "G_ema"  # the averaged Generator's state_dict in a training checkpoint (same keys as "G")


class EMA:
    """``EMA(G, decay).update(step)`` after each optimiser step of G; ``.module`` is the average."""

    def __init__(self, source: nn.Module, decay: float = DEFAULT_DECAY,
                 rampup: Optional[float] = DEFAULT_RAMPUP):
        if not 0 < decay < 1:
            raise ValueError(f"decay must be in (0, 1), got {decay!r}")
        if rampup is not None and not rampup > 0:
            raise ValueError(f"rampup must be > 0 or None, got {rampup!r}")
        self.decay, self.rampup = decay, rampup
        self.module = copy.deepcopy(source).eval().requires_grad_(False)
        # pair tensors by name once: the optimiser updates G's parameters in place
        own_params, own_buffers = \
            dict(self.module.named_parameters()), dict(self.module.named_buffers())
        src_params, src_buffers = dict(source.named_parameters()), dict(source.named_buffers())
        self._params = ([own_params[k] for k in src_params], list(src_params.values()))
        self._buffers = ([own_buffers[k] for k in src_buffers], list(src_buffers.values()))

    def decay_at(self, step: int) -> float:
        """The decay of update number ``step`` (1-based; the ramp-up needs to know how far in)."""
        if self.rampup is None:
            return self.decay
        return min(self.decay, 0.5 ** (1.0 / (self.rampup * max(step, 1))))

    @torch.no_grad()
    def update(self, step: int) -> None:
        """Move the average towards the source's current weights and copy its buffers."""
        ema, src = self._params
        torch._foreach_lerp_(ema, src, 1.0 - self.decay_at(step))
        for own, theirs in zip(*self._buffers):  # a few small BatchNorm vectors and counters
            own.copy_(theirs)

    def state_dict(self):
        return self.module.state_dict()

