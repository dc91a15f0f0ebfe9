"""The training step and the backends that prepare what it runs.

:func:`train_step` is the hot path: one GAN step (any :mod:`.losses` objective) with no host sync. A
backend (:data:`BACKENDS`: "eager", "compile", "fused") turns the built G and D into the modules to
train and save and the callables and loss the step runs (:class:`Prepared`); :func:`resolve_backend`
turns ``--backend`` into one that can run on the device.
"""
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..functional import bce_with_logits, triton_can_run
from ..models import cpu_channels_last
from ..nn import fuse
from .losses import as_objective
from .precision import Precision


def _set_requires_grad(module, flag):
    for p in module.parameters():
        p.requires_grad_(flag)


def train_step(G, D, opt_g, opt_d, real, z, loss_fn, precision=None, *, step=0, D_penalty=None,
               labels=None):
    """One GAN step; returns 0-dim float32 tensors loss_d, loss_g, d_real, d_fake.

    ``loss_fn``: a BCE-with-logits callable (the non-saturating loss) or an
    :class:`~.losses.Objective` (the loss, penalties and augmentation of ``--loss``, ``--r1``,
    ``--augment``); ``step``: the step's index, which decides whether lazy R1 runs;
    ``D_penalty``: the D that penalties differentiate twice (default ``D``; the uncompiled module
    under ``--backend compile``, since AOTAutograd has no double backward), which also runs the
    fake forward of an R1 step's D phase; ``labels``: (real labels, fake labels) of a conditional
    run.
    The forward passes and losses run under ``precision.autocast()``, the backward passes and
    optimiser steps through ``precision.backward_and_step`` (:mod:`.precision`; None: float32).
    D sees the real batch and the detached fakes in two forwards (so its BatchNorm never mixes
    real and fake statistics) and takes one backward of its loss plus penalties; then G is trained
    on D(G(z)) against the updated D. D's parameters are frozen during G's backward so no weight
    gradient is computed for them. Random draws (augmentation, interpolation weights) happen in
    one order: real's augmentation, fake's, the interpolation weights, then fake's for G. Nothing
    here synchronises with the host (but fp16's GradScaler.step, which reads its overflow flag:
    PyTorch's own sync).
    """
    precision = precision or Precision()
    objective = as_objective(loss_fn)
    D_penalty = D_penalty or D
    real_labels, fake_labels = ((labels[0],), (labels[1],)) if labels is not None else ((), ())
    r1 = objective.r1_due(step)
    # R1 differentiates D(real) twice, so an R1 step's D phase runs D_penalty on real and on fake
    # alike: a compiled D between them would write BatchNorm's running statistics back with
    # copy_ (AOTAutograd), a version bump that fails the backward of the uncompiled forward,
    # which saved them (eager BatchNorm updates them unseen by autograd)
    D_phase = D_penalty if r1 else D
    with precision.autocast():
        fake = G(z, *fake_labels)
        if r1:  # R1 differentiates D at the (un-augmented) real images
            real = real.detach().requires_grad_(True)
        seen_real = objective.augment(real)
        logits_real = D_phase(seen_real, *real_labels)
        seen_fake = objective.augment(fake.detach())
        logits_fake = D_phase(seen_fake, *fake_labels)
        loss_d = objective.d_loss(logits_real, logits_fake)
        if r1:
            loss_d = loss_d + objective.r1_penalty(logits_real, real)
        if objective.loss == "wgan-gp":
            loss_d = loss_d + objective.gradient_penalty(D_penalty, seen_real, seen_fake,
                                                         *real_labels)
    opt_d.zero_grad(set_to_none=True)
    precision.backward_and_step("D", loss_d, opt_d)

    _set_requires_grad(D, False)
    with precision.autocast():
        loss_g = objective.g_loss(D(objective.augment(fake), *fake_labels))
    opt_g.zero_grad(set_to_none=True)
    precision.backward_and_step("G", loss_g, opt_g)
    _set_requires_grad(D, True)
    return {
        "loss_d": loss_d.detach(),
        "loss_g": loss_g.detach(),
        "d_real": torch.sigmoid(logits_real.detach().float()).mean(),
        "d_fake": torch.sigmoid(logits_fake.detach().float()).mean(),
    }


@dataclass
class Prepared:
    """What a backend hands the loop: the modules to train and save, the callables to run, the loss.

    ``G``/``D`` own the parameters (optimisers and checkpoints use them; their state_dict keys are
    the plain ``main.N.*``); ``G_run``/``D_run`` are what :func:`train_step` calls (the same
    modules, or compiled wrappers around them); ``D`` itself is what penalties differentiate twice.
    ``loss_fn`` is the backend's BCE-with-logits.
    """

    G: nn.Module
    D: nn.Module
    G_run: Callable
    D_run: Callable
    loss_fn: Callable


@dataclass(frozen=True)
class Backend:
    name: str
    help: str
    prepare: Callable  # (G, D) -> Prepared
    unavailable: Callable  # (device) -> None if it can run there, else the reason it cannot


def _prepare_eager(G, D):
    G, D = cpu_channels_last(G), cpu_channels_last(D)
    return Prepared(G, D, G, D, F.binary_cross_entropy_with_logits)


def _prepare_compile(G, D):
    return Prepared(G, D, torch.compile(G), torch.compile(D), F.binary_cross_entropy_with_logits)


def _prepare_fused(G, D):
    """Our Triton kernels: fuse() makes every convolution with its BatchNorm2d and ReLU / LeakyReLU
    one fused op, in G and D (the modules and state_dict keys stay as they are, so checkpoints are
    the eager ones), and the loss is the fused sigmoid + BCE."""
    fuse(G)
    fuse(D)
    return Prepared(G, D, G, D, bce_with_logits)


def _fused_unavailable(device):
    if triton_can_run(device):
        return None
    return ("our Triton kernels need CUDA (or TRITON_INTERPRET=1 set before start-up, which runs "
            "them slowly on the CPU)")


def _always(device):
    return None


def _compile_unavailable(device):
    if device.type == "cuda" and importlib.util.find_spec("triton") is None:
        return ("torch.compile on CUDA needs triton (inductor generates Triton kernels), not "
                "installed")
    return None


BACKENDS = {
    b.name: b
    for b in (
        Backend("eager", "plain PyTorch modules (channels_last on the CPU) and "
                         "F.binary_cross_entropy_with_logits",
                _prepare_eager, _always),
        Backend("compile", "torch.compile of G and D (inductor)", _prepare_compile,
                _compile_unavailable),
        Backend("fused", "our Triton kernels: aigc_fast.fuse() on G and on D (every convolution, "
                         "BatchNorm2d and ReLU / LeakyReLU) and the fused BCE loss",
                _prepare_fused, _fused_unavailable),
    )
}
# What --backend auto tries, in order, per device type. On CUDA our fused kernels first. On CPU they
# only run interpreted (slowly), and torch.compile's one-off compile costs more than it saves over a
# short run, so auto stays eager there.
AUTO_ORDER = {"cuda": ("fused", "compile", "eager"), "cpu": ("eager",)}


def resolve_backend(name, device):
    """Turn ``--backend`` into (backend name, why it was chosen); ValueError if it cannot run."""
    if name == "auto":
        order = AUTO_ORDER.get(device.type, ("eager",))
        for candidate in order:
            if BACKENDS[candidate].unavailable(device) is None:
                return candidate, f"auto: first available of {'/'.join(order)} on {device.type}"
        raise AssertionError("eager is always available")
    if name not in BACKENDS:
        raise ValueError(f"--backend must be one of {('auto',) + tuple(BACKENDS)}, got {name!r}")
    reason = BACKENDS[name].unavailable(device)
    if reason is not None:
        raise ValueError(f"--backend {name} cannot run on {device.type}: {reason}")
    return name, "requested"


def prepare_backend(name, G, D):
    """Prepare (G, D) for the resolved backend ``name``: the one place a backend is applied."""
    return BACKENDS[name].prepare(G, D)
