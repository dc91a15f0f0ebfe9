"""A run's GAN variant: its flags (``--loss``, ``--d-norm``, ``--r1``, ``--r1-every``,
``--spectral-norm``, ``--augment``, ``--conditional``), the config keys that record it in
checkpoints, the checks that refuse combinations that cannot train as asked, and the
:class:`~.losses.Objective` it trains with.

The variant keys are run settings: a resumed run takes them from its checkpoint and a flag that
contradicts the checkpoint is an error (:func:`aigc_fast.training.run.make_config`); a checkpoint
written before they existed was the default variant (:data:`VARIANT_DEFAULTS`).
"""
import argparse

from .augment import DiffAugment, parse_policy
from .cli import UsageError, positive_int
from .losses import DEFAULT_R1_EVERY, LOSSES, Objective
from ..models import D_NORMS

VARIANT_DEFAULTS = {"loss": "bce", "d_norm": "batch", "r1": 0.0, "r1_every": DEFAULT_R1_EVERY,
                    "spectral_norm": False, "augment": "", "conditional": False}
VARIANT_KEYS = tuple(VARIANT_DEFAULTS)


def _non_negative_float(text):
    value = float(text)
    if not value >= 0:
        raise ValueError(text)
    return value


_non_negative_float.__name__ = "number >= 0"


def _augment(text):
    """The policy as a canonical string (stored in config.json and checkpoints)."""
    try:
        return ",".join(parse_policy(text))
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err))


def add_variant_arguments(parser):
    add = parser.add_argument
    add("--loss", choices=LOSSES, default=VARIANT_DEFAULTS["loss"],
        help="GAN loss on D's logits: bce (non-saturating, default), hinge (SNGAN/BigGAN), lsgan "
             "(least squares) or wgan-gp (Wasserstein critic with a gradient penalty of weight 10 "
             "at real/fake interpolates, through D's double backward; D without BatchNorm)")
    add("--d-norm", choices=D_NORMS, default=None,
        help="normalisation of D's layers after the first: batch (BatchNorm2d), none, or layer "
             "(GroupNorm with one group, run by PyTorch between fused convolutions) (default: "
             "none for --loss wgan-gp, whose per-sample penalty BatchNorm would couple; else "
             "batch)")
    add("--r1", type=_non_negative_float, default=VARIANT_DEFAULTS["r1"], metavar="GAMMA",
        help="R1 penalty GAMMA/2 * ||grad D(real)||^2 on D (Mescheder et al.), through D's double "
             "backward; 0 turns it off (default %(default)s)")
    add("--r1-every", type=positive_int, default=VARIANT_DEFAULTS["r1_every"], metavar="K",
        help="lazy R1 (StyleGAN2): apply it every K-th step, step 0 included, with GAMMA x K "
             "(default %(default)s)")
    add("--spectral-norm", action="store_true",
        help="spectral norm (PyTorch's parametrization) on every convolution of D; its original, "
             "_u and _v are saved in checkpoints")
    add("--augment", type=_augment, default=VARIANT_DEFAULTS["augment"],
        metavar="POLICY[,POLICY...]",
        help="DiffAugment (Zhao et al. 2020) of every image D sees, real and fake, differentiable: "
             "a comma-separated subset of color, translation, cutout, applied in the given order, "
             "parameters drawn from a generator seeded by --seed (default: none)")
    add("--conditional", action="store_true",
        help="class-conditional GAN: G takes a learned class embedding with z, D adds a "
             "projection head (Miyato and Koyama 2018). The classes: a folder's first-level "
             "sub-folders, an npz's 'labels' array, cifar10's, mnist's and fake's targets, the "
             "shapes' kinds (circle, square, triangle). Fake labels are drawn uniformly, after "
             "each step's noise, from the noise generator seeded by --seed; sample grids have one "
             "row per class")


def resolve_variant(cfg, world_size):
    """Fill the loss's default ``d_norm`` into ``cfg`` and refuse what cannot train as asked."""
    if cfg["d_norm"] is None:
        cfg["d_norm"] = "none" if cfg["loss"] == "wgan-gp" else "batch"
    if cfg["loss"] == "wgan-gp" and cfg["d_norm"] == "batch":
        raise UsageError("--loss wgan-gp with --d-norm batch: BatchNorm makes each image's critic "
                         "value depend on the batch, which the per-sample gradient penalty forbids "
                         "(Gulrajani et al.); expected --d-norm none or layer")
    if penalised(cfg) and world_size > 1:
        raise UsageError("--loss wgan-gp and --r1 run D's double backward, which "
                         "DistributedDataParallel does not support; expected a single process")


def penalised(cfg):
    """Whether some steps differentiate D twice (a gradient penalty or R1)."""
    return cfg["loss"] == "wgan-gp" or cfg["r1"] > 0


def graph_blocker(cfg):
    """Why a step of this variant cannot be captured in one CUDA graph (None when it can)."""
    if penalised(cfg):
        return "gradient penalties (wgan-gp, R1) run D's double backward outside a CUDA graph"
    if cfg["augment"]:
        return "--augment draws its parameters from a generator the graph does not replay"
    return None


def build_objective(cfg, bce, rng):
    """The run's :class:`Objective`: ``bce`` the backend's BCE-with-logits, ``rng`` the seeded
    generator of augmentation parameters and interpolation weights."""
    return Objective(cfg["loss"], bce, cfg["r1"], cfg["r1_every"],
                     DiffAugment(parse_policy(cfg["augment"]), rng), rng)


def describe_variant(cfg):
    """The variant for the start-up line, e.g. "loss hinge, D norm batch, spectral norm"."""
    parts = [f"loss {cfg['loss']}", f"D norm {cfg['d_norm']}"]
    if cfg["r1"]:
        parts.append(f"R1 {cfg['r1']:g} every {cfg['r1_every']}")
    if cfg["spectral_norm"]:
        parts.append("spectral norm")
    if cfg["augment"]:
        parts.append(f"DiffAugment {cfg['augment']}")
    if cfg["conditional"]:
        parts.append(f"conditional on {cfg['num_classes']} classes (projection D)")
    return ", ".join(parts)
