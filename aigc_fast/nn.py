"""Drop-in modules backed by the fused ops, and ``fuse``/``unfuse``, which convert an existing model
in place with its state_dict unchanged."""
import torch
from torch import nn

from . import functional


# --- ConvTranspose2d + BatchNorm2d + ReLU -------------------------------------------------------


# --- sigmoid + binary cross-entropy -------------------------------------------------------------


# --- fuse / unfuse ------------------------------------------------------------------------------
