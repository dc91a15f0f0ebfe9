"""The fused ops in plain PyTorch: the oracle for tests and the CPU fallback. Imports only torch."""
import torch
import torch.nn.functional as F


# --- ConvTranspose2d + BatchNorm2d + ReLU -------------------------------------------------------


# --- sigmoid + binary cross-entropy -------------------------------------------------------------
