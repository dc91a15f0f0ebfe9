"""aigc_fast: a DCGAN trainer whose hot path is hand-written Triton kernels.

``aigc_fast.fuse(model)`` makes an existing model run its Conv2d / ConvTranspose2d [-> BatchNorm2d]
[-> ReLU / LeakyReLU] runs (and BCE losses) through the fused kernels, with its state_dict
unchanged.
"""
__version__ = "0.1.0"


def fuse(model, verbose=False):
    """See :func:`aigc_fast.nn.fuse` (imported lazily so ``import aigc_fast`` stays light)."""
    from .nn import fuse as _fuse

    return _fuse(model, verbose=verbose)


def unfuse(model):
    """See :func:`aigc_fast.nn.unfuse`."""
    from .nn import unfuse as _unfuse

    return _unfuse(model)
