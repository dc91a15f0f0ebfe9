"""The trainer's command line: its parser, argument types and the settings that define a run.

pytorch/examples' dcgan/main.py spellings are accepted too (:data:`EXAMPLES_ALIASES`).
"""
import argparse
import os

from ..models import SUPPORTED_IMAGE_SIZES
from .backends import BACKENDS
from .cli import ArgumentParser, UsageError, add_device_argument, positive_float, positive_int
from .data import DATASETS, SHAPES, infer_dataset
from .distributed import DEFAULT_TIMEOUT_S
from .ema import DEFAULT_DECAY
from .metrics import DEFAULT_N
from .precision import PRECISIONS
from .torchvision_sets import DOWNLOADABLE, LSUN_DEFAULT_CLASS
from .variant import VARIANT_DEFAULTS, VARIANT_KEYS, add_variant_arguments

# The no-argument run: ngf = ndf = 32 at ~37 ms a step on 2 idle CPU cores, so under 3 minutes of
# training; by 4000 steps it draws circles, squares and triangles (measured).
DEFAULT_STEPS = 4000
# One SWD evaluation at n = DEFAULT_N takes ~4 s on 2 CPU cores (describing the real set once:
# ~1 s more): the default run evaluates at steps 0, 1000, ..., 4000, ~12 % of its time.
DEFAULT_EVAL_EVERY = 1000
# Settings that define a run: a resumed run takes them from its checkpoint, and a flag that
# contradicts the checkpoint is an error (resuming continues that run; it cannot change its model).
RUN_KEYS = ("dataset", "data", "classes", "image_size", "nz", "ngf", "ndf", "nc",
            "batch_size", "lr",
            "beta1", "seed") + VARIANT_KEYS
# Settings a resumed run also keeps from its checkpoint unless a flag changes them.
KEPT_KEYS = ("sample_every", "checkpoint_every", "log_every", "ema", "eval_every", "eval_n",
             "tensorboard", "fid_weights", "prc_weights")


def upgrade_saved_config(saved):
    """A checkpoint's config with the RUN_KEYS that older versions did not store filled in as
    those versions behaved: the data set that "data" names, LSUN's default category, the default
    GAN variant."""
    missing = dict(VARIANT_DEFAULTS)
    if "dataset" not in saved:
        missing.update(dataset=infer_dataset(saved.get("data")), classes=LSUN_DEFAULT_CLASS)
    return {**missing, **saved}


def _beta(text):
    value = float(text)
    if not 0 <= value < 1:
        raise ValueError(text)
    return value


_beta.__name__ = "number in [0, 1)"


# pytorch/examples dcgan/main.py's spellings of our flags, accepted so that its users' commands run:
# (their flag, our flag's dest, argparse keywords). Hidden from --help's list; the epilog names
# them.
EXAMPLES_ALIASES = (
    ("--dataroot", "data", {}),
    ("--imageSize", "image_size", {"type": int, "choices": SUPPORTED_IMAGE_SIZES}),
    ("--batchSize", "batch_size", {"type": positive_int}),
    ("--manualSeed", "seed", {"type": int}),
    ("--outf", "out", {}),
    ("--cuda", "device", {"action": "store_const", "const": "cuda"}),
    ("--accel", "device", {"action": "store_const", "const": "auto"}),
)


def _add_examples_aliases(parser, length_group):
    for flag, dest, kwargs in EXAMPLES_ALIASES:
        parser.add_argument(flag, dest=dest, default=argparse.SUPPRESS, help=argparse.SUPPRESS,
                            **kwargs)
    length_group.add_argument("--niter", dest="epochs", type=positive_int,
                              default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def build_parser():
    p = ArgumentParser(
        prog="python -m aigc_fast.train",
        description="Train a DCGAN. With no arguments: 32 px images of the embedded 'shapes' data "
                    "set on the best available device, outputs in a new folder under runs/.",
        epilog="pytorch/examples' dcgan/main.py flags work too: "
               + ", ".join(flag for flag, _, _ in EXAMPLES_ALIASES)
               + " and --niter mean --data, --image-size, --batch-size, --seed, --out, "
                 "--device cuda, --device auto and --epochs.")
    add = p.add_argument
    add("--data", metavar="shapes|DIR|FILE.npz",
        help="training images: 'shapes' (the embedded procedural set, default), a folder (every "
             "png/jpg/jpeg/webp/bmp/... below it, resized and centre-cropped) or a .npz file "
             "holding a uint8 array N x H x W x C; with --dataset, that set's root folder")
    add("--dataset", choices=DATASETS, default=None,
        help="which data set --data holds: shapes, folder (class sub-folders as "
             "torchvision's ImageFolder reads them; imagenet and lfw are read the same way), npz, "
             "or through torchvision (pip install 'aigc_fast[data]'): cifar10, mnist (--nc 1 "
             "unless given), lsun (with lmdb) or fake (FakeData, needs no --data) "
             "(default: what --data is)")
    add("--download", action="store_true",
        help=f"download --dataset {' or '.join(DOWNLOADABLE)} into --data if its files are "
             "not there (default: never download)")
    add("--classes", default=LSUN_DEFAULT_CLASS, metavar="NAME",
        help="the LSUN category of --dataset lsun, whose NAME_train database is read "
             "(default %(default)s)")
    add("--image-size", type=int, default=32, choices=SUPPORTED_IMAGE_SIZES,
        help="image side in pixels, a power of two from 16 to 256; the depth follows log2(size): "
             "32 is our 4-layer DCGAN, 64 the pytorch/examples DCGAN (default %(default)s)")
    add("--batch-size", type=positive_int, default=64, metavar="N",
        help="images per step and per process: under torchrun the global batch is N x the number "
             "of processes (default %(default)s)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=positive_int, metavar="N",
                        help=f"total training steps of the run, counting steps done before a "
                             f"--resume (default {DEFAULT_STEPS}, or the resumed run's total)")
    length.add_argument("--epochs", type=positive_int, metavar="N",
                        help="total length in passes over the data, instead of --steps")
    add("--lr", type=positive_float, default=2e-4, help="Adam learning rate (default %(default)s)")
    add("--beta1", type=_beta, default=0.5, help="Adam beta1 (default %(default)s)")
    add("--nz", type=positive_int, default=100, metavar="N",
        help="noise dimension (default %(default)s)")
    add("--ngf", type=positive_int, default=32, metavar="N",
        help="Generator width (default %(default)s, sized for a CPU; pytorch/examples uses 64)")
    add("--ndf", type=positive_int, default=32, metavar="N",
        help="Discriminator width (default %(default)s, sized for a CPU; pytorch/examples uses 64)")
    add("--nc", type=int, default=3, choices=(1, 3),
        help="image channels: 3 (RGB) or 1 (grayscale) (default %(default)s)")
    add("--seed", type=int, default=0, metavar="N",
        help="seed of the weights, the noise and the data order (default %(default)s)")
    add_variant_arguments(p)
    add_device_argument(p, "train")
    add("--backend", choices=("auto",) + tuple(BACKENDS), default="auto",
        help="how the step runs: " + "; ".join(f"{b.name}: {b.help}" for b in BACKENDS.values())
             + " (default auto: the fastest available on the device)")
    add("--precision", choices=PRECISIONS, default=None,
        help="what the training step computes in: fp32 (float32, no tf32), tf32 (float32 storage, "
             "tf32 tensor-core products; CUDA only), bf16 or fp16 (torch.autocast for every "
             "backend, float32 master weights, optimiser state, BN statistics and losses; fp16 "
             "adds a gradient scaler per network). Samples, SWD and checkpoints stay float32. A "
             "resumed run keeps its own unless this is given (default: tf32 on CUDA, fp32 on CPU)")
    add("--cuda-graph", choices=("on", "off"), default=None,
        help="capture the whole training step (forwards, backwards, both Adam updates) in a CUDA "
             "graph and replay it, each batch and noise copied into its static buffers: one launch "
             "a step instead of a hundred-odd (default: on for --backend fused on one CUDA device "
             "unless --precision fp16, whose gradient scaler syncs with the host; else off)")
    add("--sync-bn", action="store_true",
        help="under torchrun with more than one process: BatchNorm statistics of the global batch "
             "(synchronised across processes) instead of each process's own; eager backend only")
    add("--dist-timeout", type=positive_float, default=DEFAULT_TIMEOUT_S, metavar="SECONDS",
        help="under torchrun: how long a process waits for the others in a collective before it "
             "fails, so a dead or stuck process ends the whole job (default %(default)s)")
    add("--out", metavar="DIR", help="output folder (default: a new numbered folder under runs/)")
    add("--resume", metavar="PATH|auto",
        help="continue from a checkpoint; 'auto' takes checkpoints/last.pt of --out (or of the "
             "newest run under runs/) and starts afresh if there is none")
    add("--sample-every", type=positive_int, default=250, metavar="N",
        help="write a sample grid every N steps (default %(default)s; and at the end)")
    add("--checkpoint-every", type=positive_int, default=500, metavar="N",
        help="write checkpoints/step_N.pt and last.pt every N steps (default %(default)s; "
             "last.pt also at the end and on Ctrl-C)")
    add("--log-every", type=positive_int, default=50, metavar="N",
        help="append to metrics.jsonl and update the progress bar's losses every N steps; between "
             "these the loop never waits for the device (default %(default)s)")
    add("--workers", type=int, default=min(4, os.cpu_count() or 1), metavar="N",
        help="processes that decode image files of a --data folder (default %(default)s)")
    add("--ema", type=_beta, default=DEFAULT_DECAY, metavar="DECAY",
        help="keep an exponential moving average of G's weights with this decay (its half-life "
             "ramps up over the run, as in StyleGAN2-ADA) and use it for samples and --eval-every; "
             "stored in checkpoints as G_ema; 0 turns it off (default %(default)s)")
    add("--eval-every", type=int, default=DEFAULT_EVAL_EVERY, metavar="N",
        help="append the SWD of the EMA generator (or G with --ema 0) to metrics.jsonl at the "
             "start, every N steps and at the end; 0 turns it off; never in --dry-run (default "
             "%(default)s; one evaluation at the default --eval-n takes ~4 s on a 2-core CPU)")
    add("--eval-n", type=positive_int, default=DEFAULT_N, metavar="N",
        help="images per side of each SWD evaluation, capped at the data set's size; SWD depends "
             "on it, so compare only figures made with the same n (default %(default)s, as "
             "python -m aigc_fast.eval)")
    add("--tensorboard", action="store_true",
        help="also write OUT/tensorboard/ event files: every metrics.jsonl value, the sample grids "
             "and the config (pip install 'aigc_fast[tensorboard]'); a resumed run continues them")
    add("--fid-weights", metavar="PATH",
        help="with --eval-every: also append FID and KID (torch-fidelity, pip install "
             "'aigc_fast[metrics]') of --eval-n images to metrics.jsonl, the Inception weights "
             "read from PATH (a state_dict of torch-fidelity's inception-v3-compat extractor)")
    add("--prc-weights", metavar="PATH",
        help="with --eval-every: also append precision and recall, the VGG16 weights read from "
             "PATH (a state_dict of torchvision's vgg16)")
    add("--netG", dest="net_g", metavar="PATH",
        help="start G from these weights: a state_dict file (pytorch/examples' netG_epoch_N.pth) "
             "or a checkpoint of ours (its G); loaded with weights_only=True")
    add("--netD", dest="net_d", metavar="PATH", help="start D from these weights, as --netG")
    add("--ngpu", type=positive_int, metavar="N",
        help="accepted for pytorch/examples' command lines: this trainer runs one device per "
             "process, and torchrun --nproc-per-node N runs N of them (see the README)")
    add("--dry-run", action="store_true",
        help="run a single step and write every output (a smoke test)")
    _add_examples_aliases(p, length)
    return p


def parse_args(argv=None):
    """(args, the names of the RUN_KEYS and KEPT_KEYS given explicitly on the command line)."""
    args = build_parser().parse_args(argv)
    probe = build_parser()
    probe.set_defaults(**{k: None for k in RUN_KEYS + KEPT_KEYS})
    explicit = {k for k, v in vars(probe.parse_args(argv)).items()
                if k in RUN_KEYS + KEPT_KEYS and v is not None}
    if args.workers < 0:
        raise UsageError(f"--workers {args.workers}: expected 0 or more")
    if args.eval_every < 0:
        raise UsageError(f"--eval-every {args.eval_every}: expected 0 (off) or more")
    _resolve_dataset(args, explicit)
    if (args.net_g or args.net_d) and args.resume:
        raise UsageError("--netG/--netD with --resume: the checkpoint holds the run's weights; "
                         "expected one of them")
    return args, explicit


def _resolve_dataset(args, explicit):
    """Fill in --dataset from --data (or --data "shapes"); MNIST trains on 1 channel as in
    pytorch/examples unless --nc says otherwise."""
    if args.data is None and args.dataset not in (None, SHAPES, "fake"):
        raise UsageError(f"--dataset {args.dataset} needs --dataroot DIR: the folder that holds "
                         "its files")
    if args.download and args.dataset not in DOWNLOADABLE:
        raise UsageError(f"--download: torchvision downloads only {', '.join(DOWNLOADABLE)}; got "
                         f"--dataset {args.dataset}")
    if args.dataset in (None, SHAPES, "folder", "npz"):
        inferred = infer_dataset(args.data)
        if args.dataset not in (None, inferred):
            raise UsageError(f"--dataset {args.dataset} --dataroot {args.data}: that is a "
                             f"{inferred} source; expected --dataset {inferred} or another root")
        args.dataset = inferred
    if args.dataset == SHAPES:
        args.data = SHAPES
    if args.dataset == "mnist" and "nc" not in explicit:
        args.nc = 1
