"""The GAN objectives a step trains with (``--loss``, ``--r1``, ``--augment``): :class:`Objective`.

All losses take D's logits. "bce" is the non-saturating loss of Goodfellow et al. through the
backend's BCE-with-logits (our fused kernel under ``--backend fused``); "hinge" (Lim and Ye;
SNGAN, BigGAN), "lsgan" (Mao et al., targets 1 and 0, G's target 1) and "wgan-gp" (Gulrajani et
al.) are a few elementwise PyTorch ops on a vector of N logits: launches whose cost is nothing
next to the convolutions, so they have no kernel of their own.

The penalties differentiate D's output with respect to its input and backpropagate through that
gradient (double backward), which the fused D supports exactly: "wgan-gp" penalises
(||grad D(x_hat)|| - 1)^2 at random interpolates x_hat of real and fake images (the images D
sees, after augmentation), weight :data:`GP_WEIGHT`; ``--r1 GAMMA`` penalises
GAMMA / 2 * ||grad D(x)||^2 at real images (Mescheder et al.), lazily as in StyleGAN2: every
``r1_every``-th step (step 0 included) with the weight multiplied by ``r1_every``.
"""
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
import torch.nn.functional as F

LOSSES = ("bce", "hinge", "wgan-gp", "lsgan")
GP_WEIGHT = 10.0  # Gulrajani et al.'s lambda
DEFAULT_R1_EVERY = 16  # StyleGAN2's lazy-regularisation interval for D


def _no_augment(x):
    return x


@dataclass
class Objective:
    """What one training step minimises. ``bce`` is the backend's BCE-with-logits (used by "bce"
    only); ``rng`` draws the gradient penalty's interpolation weights (float32, one per image);
    ``augment`` maps every image batch before D sees it (:class:`.augment.DiffAugment`)."""

    loss: str = "bce"
    bce: Callable = F.binary_cross_entropy_with_logits
    r1_gamma: float = 0.0
    r1_every: int = DEFAULT_R1_EVERY
    augment: Callable = field(default=_no_augment)
    rng: Optional[torch.Generator] = None

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")

    def d_loss(self, logits_real, logits_fake):
        """D's adversarial loss (penalties apart)."""
        if self.loss == "bce":
            return (self.bce(logits_real, torch.ones_like(logits_real))
                    + self.bce(logits_fake, torch.zeros_like(logits_fake)))
        if self.loss == "hinge":
            return F.relu(1 - logits_real).mean() + F.relu(1 + logits_fake).mean()
        if self.loss == "lsgan":
            return 0.5 * ((logits_real - 1).square().mean() + logits_fake.square().mean())
        return logits_fake.mean() - logits_real.mean()  # wgan-gp's critic

    def g_loss(self, logits_fake):
        if self.loss == "bce":
            return self.bce(logits_fake, torch.ones_like(logits_fake))
        if self.loss == "lsgan":
            return 0.5 * (logits_fake - 1).square().mean()
        return -logits_fake.mean()  # hinge and wgan-gp

    def r1_due(self, step):
        """Whether the step with index ``step`` (0 for the first) carries the lazy R1 penalty."""
        return self.r1_gamma > 0 and step % self.r1_every == 0

    def r1_penalty(self, logits_real, real):
        """GAMMA / 2 * E||d D(x) / d x||^2 * r1_every; ``real`` is the leaf the logits came from."""
        grad = _input_gradient(logits_real, real)
        return (0.5 * self.r1_gamma * self.r1_every) * grad.square().sum((1, 2, 3)).mean()

    def gradient_penalty(self, D, seen_real, seen_fake, *labels):
        """GP_WEIGHT * E(||d D(x_hat) / d x_hat|| - 1)^2 at x_hat = eps real + (1 - eps) fake,
        eps ~ U(0, 1) per image from ``rng``; ``D`` is run once more on x_hat (uncompiled under
        ``--backend compile``: AOTAutograd has no double backward)."""
        eps = torch.rand(len(seen_real), 1, 1, 1, generator=self.rng, device=seen_real.device)
        eps = eps.to(seen_real.dtype)
        x_hat = (eps * seen_real.detach() + (1 - eps) * seen_fake.detach()).requires_grad_(True)
        grad = _input_gradient(D(x_hat, *labels), x_hat)
        return GP_WEIGHT * (grad.flatten(1).norm(dim=1) - 1).square().mean()


def _input_gradient(logits, inputs):
    """d(sum of logits)/d inputs, kept in the graph (create_graph) so a penalty on it trains D."""
    (grad,) = torch.autograd.grad(logits.sum(), inputs, create_graph=True)
    return grad


def as_objective(loss_fn):
    """An :class:`Objective` as it is, or a BCE-with-logits callable as the "bce" objective."""
    return loss_fn if isinstance(loss_fn, Objective) else Objective(bce=loss_fn)
