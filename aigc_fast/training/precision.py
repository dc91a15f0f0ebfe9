"""The training precision (``--precision``): what the step computes in, and the state that goes with
it.

- ``fp32``: float32 throughout; tf32 off on CUDA, for PyTorch's convolutions and matmuls and for our
  kernels (they follow ``torch.backends.cudnn.allow_tf32``).
- ``tf32``: float32 storage with tf32 tensor-core products (CUDA only; the default there).
- ``bf16`` / ``fp16``: ``torch.autocast`` around the forward passes and the losses, for every
  backend (our fused ops cast at their boundary as autocast does). Master weights, optimiser state,
  BN statistics and the losses stay float32. ``fp16`` adds one ``torch.amp.GradScaler`` per network,
  so that small gradients survive float16 and an overflowing step is skipped; their state is part of
  a checkpoint.
Sampling and evaluation run outside :meth:`Precision.autocast`, from the float32 weights.
"""
import contextlib

import torch

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
NETWORKS = ("G", "D")


def default_precision(device: torch.device) -> str:
    """PyTorch's own default: tf32 convolutions on CUDA, float32 elsewhere."""
    return "tf32" if device.type == "cuda" else "fp32"


def unavailable(precision: str, device: torch.device) -> str:
    """Why ``precision`` cannot train on ``device`` ("" when it can)."""
    if precision not in PRECISIONS:
        return f"expected one of {', '.join(PRECISIONS)}"
    if precision == "tf32" and device.type != "cuda":
        return f"tf32 is a CUDA tensor-core format; expected fp32, bf16 or fp16 on {device.type}"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bfloat16 support (it needs compute capability 8.0 or newer)"
    return ""


def resolve_precision(requested, device, saved=None):
    """(precision, why) for a run on ``device``: ``requested`` (None: not given), else a resumed
    run's ``saved`` one where it can run here, else the device's default. ValueError if
    ``requested`` cannot run here."""
    if requested is not None:
        reason = unavailable(requested, device)
        if reason:
            raise ValueError(f"--precision {requested}: {reason}")
        choice, why = requested, "requested"
    elif saved is not None and not unavailable(saved, device):
        choice, why = saved, "the checkpoint's"
    else:
        choice, why = default_precision(device), f"default on {device.type}"
    if saved is not None and saved != choice:
        why += f"; the checkpoint trained in {saved}"
    return choice, why


class Precision:
    """What :func:`aigc_fast.train.train_step` needs of a precision: the autocast context of the
    forward passes and, per network, the backward-and-step (through its GradScaler under fp16; a
    disabled scaler is a plain ``backward(); step()``)."""

    def __init__(self, name="fp32", device=torch.device("cpu")):
        self.name = name
        self.device_type = torch.device(device).type
        self.dtype = AUTOCAST_DTYPES.get(name)
        self.scalers = {net: torch.amp.GradScaler(self.device_type, enabled=name == "fp16")
                        for net in NETWORKS}

    def autocast(self):
        """torch.autocast to bf16/fp16; nothing at all for fp32/tf32 (so any device, meta too)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, self.dtype)

    def backward_and_step(self, net, loss, optimizer):
        """``loss.backward(); optimizer.step()`` for network ``net`` ("G" or "D"), scaled under
        fp16: a step whose gradients overflowed is skipped and the scale lowered."""
        scaler = self.scalers[net]
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def state_dict(self):
        """The scalers' state (a checkpoint's "scalers"), or None when there is none (not fp16)."""
        if self.name != "fp16":
            return None
        return {net: scaler.state_dict() for net, scaler in self.scalers.items()}

    def load_state_dict(self, state):
        for net, scaler in self.scalers.items():
            scaler.load_state_dict(state[net])


def set_tf32(precision: str, device: torch.device):
    """tf32 products on CUDA for every precision but fp32 (for PyTorch's convolutions and matmuls,
    and our kernels, which follow cudnn's switch); nothing to set elsewhere."""
    if device.type == "cuda":
        allow = precision != "fp32"
        torch.backends.cudnn.allow_tf32 = allow
        torch.backends.cuda.matmul.allow_tf32 = allow
