"""DCGAN training: ``python -m aigc_fast.train`` (see ``--help``).

The hot path is :func:`train_step` (one non-saturating GAN step, no host sync); the backend seam
:data:`BACKENDS` prepares the models and the loss for "eager" or "compile" (and later "fused").
The loop is small parts around it: :func:`setup` (data, models, backend, resume),
:func:`log_metrics`, :func:`write_samples`, :func:`evaluate`, :func:`write_checkpoint`, and
:func:`fit`. The EMA of G (:mod:`aigc_fast.ema`) is updated after every step and is the generator
of the samples and the SWD evaluations (:mod:`aigc_fast.eval`).

A run folder holds config.json, metrics.jsonl (one row per --log-every steps, plus one row with
"swd" per evaluation), samples/real.png, samples/step_NNNNNN.png (fixed noise),
checkpoints/last.pt + step_NNNNNN.pt and curves.png (with matplotlib).
"""
import argparse
import importlib.util
import json
import math
import os
import random
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from . import __version__
from .training.checkpoint import (load_checkpoint, load_state_checked, rng_states, save_checkpoint,
                         set_rng_states, write_bytes_atomic)
from .training.cli import (EXIT_INTERRUPTED, ArgumentParser, UsageError, add_device_argument,
                  positive_float, positive_int, resolve_device, run_main)
from .functional import bce_with_logits, triton_can_run
from .training.curves import write_curves
from .training.data import SHAPES, BatchOrder, batch_stream, load_images, to_model_range
from .training.distributed import DEFAULT_TIMEOUT_S, World, convert_sync_bn, init_world
from .training.ema import DEFAULT_DECAY, EMA, EMA_KEY
from .training.eval import Evaluator
from .training.metrics import DEFAULT_N
from .models import SUPPORTED_IMAGE_SIZES, build_models, cpu_channels_last
from .nn import fuse
from .training.precision import PRECISIONS, Precision, resolve_precision, set_tf32
from .training.sample import eval_mode, save_grid
from .training.step_graph import GraphedStep, graph_unavailable, set_capturable


def _set_requires_grad(module, flag):
    for p in module.parameters():
        p.requires_grad_(flag)


def train_step(G, D, opt_g, opt_d, real, z, loss_fn, precision=None):
    """One non-saturating GAN step; returns 0-dim float32 tensors loss_d, loss_g, d_real, d_fake.

    The forward passes and losses run under ``precision.autocast()``, the backward passes and
    optimiser steps through ``precision.backward_and_step`` (:mod:`aigc_fast.precision`; None:
    float32). D sees the real batch (target 1) and the detached fakes (target 0) in two forwards (so its
    BatchNorm never mixes real and fake statistics) and takes one backward; then G is trained with
    target 1 on D(G(z)) against the updated D. D's parameters are frozen during G's backward so no
    weight gradient is computed for them. Nothing here synchronises with the host (but fp16's
    GradScaler.step, which reads its overflow flag: PyTorch's own sync).
    """
    precision = precision or Precision()
    with precision.autocast():
        fake = G(z)
        logits_real = D(real)
        logits_fake = D(fake.detach())
        ones = torch.ones_like(logits_real)
        loss_d = loss_fn(logits_real, ones) + loss_fn(logits_fake, torch.zeros_like(logits_fake))
    opt_d.zero_grad(set_to_none=True)
    precision.backward_and_step("D", loss_d, opt_d)

    _set_requires_grad(D, False)
    with precision.autocast():
        loss_g = loss_fn(D(fake), ones)
    opt_g.zero_grad(set_to_none=True)
    precision.backward_and_step("G", loss_g, opt_g)
    _set_requires_grad(D, True)
    return {
        "loss_d": loss_d.detach(),
        "loss_g": loss_g.detach(),
        "d_real": torch.sigmoid(logits_real.detach().float()).mean(),
        "d_fake": torch.sigmoid(logits_fake.detach().float()).mean(),
    }


# --- backends -------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """What a backend hands the loop: the modules to train and save, the callables to run, the loss.

    ``G``/``D`` own the parameters (optimisers and checkpoints use them; their state_dict keys are
    the plain ``main.N.*``); ``G_run``/``D_run`` are what :func:`train_step` calls (the same modules,
    or compiled wrappers around them).
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
    one fused op, in G and D (the modules and state_dict keys stay as they are, so checkpoints are the
    eager ones), and the loss is the fused sigmoid + BCE."""
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
        return "torch.compile on CUDA needs triton (inductor generates Triton kernels), not installed"
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
    """Turn ``--backend`` into (backend name, why it was chosen); raises ValueError if it cannot run."""
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


# --- command line -----------------------------------------------------------------------------------

# The no-argument run: ngf = ndf = 32 at ~37 ms a step on 2 idle CPU cores, so under 3 minutes of
# training; by 4000 steps it draws circles, squares and triangles (measured).
DEFAULT_STEPS = 4000
# One SWD evaluation at n = DEFAULT_N takes ~4 s on 2 CPU cores (describing the real set once:
# ~1 s more): the default run evaluates at steps 0, 1000, ..., 4000, ~12 % of its time.
DEFAULT_EVAL_EVERY = 1000
# Settings that define a run: a resumed run takes them from its checkpoint, and a flag that
# contradicts the checkpoint is an error (resuming continues that run; it cannot change its model).
RUN_KEYS = ("data", "image_size", "nz", "ngf", "ndf", "nc", "batch_size", "lr", "beta1", "seed")
# Settings a resumed run also keeps from its checkpoint unless a flag changes them.
KEPT_KEYS = ("sample_every", "checkpoint_every", "log_every", "ema", "eval_every", "eval_n")
METRIC_KEYS = ("loss_d", "loss_g", "d_real", "d_fake")
SAMPLE_COUNT = 64  # images in each sample grid
CHECKPOINT_FORMAT = "aigc_fast.dcgan/1"
CHECKPOINT_KEYS = ("G", "D", "opt_g", "opt_d", "step", "noise", "rng", "config")


def _beta(text):
    value = float(text)
    if not 0 <= value < 1:
        raise ValueError(text)
    return value


_beta.__name__ = "number in [0, 1)"


# pytorch/examples dcgan/main.py's spellings of our flags, accepted so that its users' commands run:
# (their flag, our flag's dest, argparse keywords). Hidden from --help's list; its epilog names them.
EXAMPLES_ALIASES = (
    ("--dataroot", "data", {}),
    ("--imageSize", "image_size", {"type": int, "choices": SUPPORTED_IMAGE_SIZES}),
    ("--batchSize", "batch_size", {"type": positive_int}),
    ("--manualSeed", "seed", {"type": int}),
    ("--outf", "out", {}),
    ("--cuda", "device", {"action": "store_const", "const": "cuda"}),
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
        description="Train a DCGAN. With no arguments: 32 px images of the embedded 'shapes' data set "
                    "on the best available device, outputs in a new folder under runs/.",
        epilog="pytorch/examples' dcgan/main.py flags work too: "
               + ", ".join(flag for flag, _, _ in EXAMPLES_ALIASES)
               + " and --niter mean --data, --image-size, --batch-size, --seed, --out, --device cuda "
                 "and --epochs.")
    add = p.add_argument
    add("--data", default=SHAPES, metavar="shapes|DIR|FILE.npz",
        help="training images: 'shapes' (the embedded procedural set, default), a folder (every "
             "png/jpg/jpeg/webp/bmp below it, resized and centre-cropped) or a .npz file holding a "
             "uint8 array N x H x W x C")
    add("--image-size", type=int, default=32, choices=SUPPORTED_IMAGE_SIZES,
        help="image side in pixels: 32 (our 4-layer DCGAN) or 64 (the pytorch/examples DCGAN) "
             "(default %(default)s)")
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
    add("--nz", type=positive_int, default=100, metavar="N", help="noise dimension (default %(default)s)")
    add("--ngf", type=positive_int, default=32, metavar="N",
        help="Generator width (default %(default)s, sized for a CPU; pytorch/examples uses 64)")
    add("--ndf", type=positive_int, default=32, metavar="N",
        help="Discriminator width (default %(default)s, sized for a CPU; pytorch/examples uses 64)")
    add("--nc", type=int, default=3, choices=(1, 3),
        help="image channels: 3 (RGB) or 1 (grayscale) (default %(default)s)")
    add("--seed", type=int, default=0, metavar="N",
        help="seed of the weights, the noise and the data order (default %(default)s)")
    add_device_argument(p, "train")
    add("--backend", choices=("auto",) + tuple(BACKENDS), default="auto",
        help="how the step runs: " + "; ".join(f"{b.name}: {b.help}" for b in BACKENDS.values())
             + " (default auto: the fastest available on the device)")
    add("--precision", choices=PRECISIONS, default=None,
        help="what the training step computes in: fp32 (float32, no tf32), tf32 (float32 storage, "
             "tf32 tensor-core products; CUDA only), bf16 or fp16 (torch.autocast for every "
             "backend, float32 master weights, optimiser state, BN statistics and losses; fp16 adds a "
             "gradient scaler per network). Samples, SWD and checkpoints stay float32. A resumed run "
             "keeps its own unless this is given (default: tf32 on CUDA, fp32 on CPU)")
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
        help="images per side of each SWD evaluation, capped at the data set's size; SWD depends on "
             "it, so compare only figures made with the same n (default %(default)s, as "
             "python -m aigc_fast.eval)")
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
    return args, explicit


# --- set-up -------------------------------------------------------------------------------------


@dataclass
class Run:
    """Everything the loop needs; the small functions below read and update it."""

    cfg: dict
    out: Optional[Path]  # None: a new numbered folder under runs/, made once set-up succeeded
    device: torch.device
    images: torch.Tensor
    order: BatchOrder
    model: Prepared
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    noise: torch.Generator
    fixed_noise: torch.Tensor
    world: World  # this process's rank among torchrun's processes (rank 0 of 1 without torchrun)
    step: int = 0
    seconds_before: float = 0.0  # training time spent before this process (resumed runs)
    data_desc: str = ""
    backend_reason: str = ""
    precision: Optional[Precision] = None  # --precision: autocast and the fp16 gradient scalers of the step
    precision_reason: str = ""
    cuda_graph_reason: str = ""  # why the step is (not) captured in a CUDA graph (cfg["cuda_graph"])
    last_checkpoint: Optional[Path] = None
    ema: Optional[EMA] = None  # the moving average of G (--ema), the generator samples and SWD use
    eval_every: int = 0  # --eval-every, 0 in a --dry-run
    evaluator: Optional[Evaluator] = None  # made at the first evaluation (describes the real set)


def _next_run_dir(root=Path("runs")):
    """A new numbered folder runs/NNN, created here so two runs cannot pick the same one."""
    root.mkdir(parents=True, exist_ok=True)
    numbers = [int(p.name) for p in root.iterdir() if p.name.isdigit()]
    n = max(numbers, default=0) + 1
    while True:
        try:
            (root / f"{n:03d}").mkdir()
            return root / f"{n:03d}"
        except FileExistsError:
            n += 1


def _newest_run_checkpoint(root=Path("runs")):
    candidates = sorted(root.glob("*/checkpoints/last.pt"), key=lambda p: p.stat().st_mtime)
    return candidates[-1] if candidates else None


def resolve_out_and_resume(args):
    """(output folder or None for a new one, checkpoint to resume or None).

    Refuses anything that would replace files of another run.
    """
    out = Path(args.out) if args.out else None
    resume = None
    if args.resume == "auto":
        if out is not None:
            resume = out / "checkpoints" / "last.pt" if (out / "checkpoints" / "last.pt").exists() else None
        else:
            resume = _newest_run_checkpoint()
    elif args.resume:
        resume = Path(args.resume)
        if not resume.is_file():
            raise UsageError(f"--resume {resume}: no such file; expected a checkpoint .pt file or 'auto'")
    if resume is not None and out is None:
        out = resume.parent.parent if resume.parent.name == "checkpoints" else resume.parent
    if out is None:
        return None, None
    last = out / "checkpoints" / "last.pt"
    if last.exists() and (resume is None or not os.path.samefile(last, resume)):
        what = "a run" if resume is None else f"a run whose last.pt is not {resume}"
        raise UsageError(f"--out {out}: already holds {what} ({last}); expected a new folder, or "
                         f"--resume {last} to continue it")
    return out, resume


def make_config(args, explicit, saved):
    """The run's settings: the flags, or for a resumed run its checkpoint's config ``saved``.

    RUN_KEYS come from the checkpoint (a contradicting flag is an error); KEPT_KEYS too, unless
    a flag changes them.
    """
    cfg = {k: getattr(args, k) for k in RUN_KEYS + KEPT_KEYS}
    if cfg["data"] != SHAPES:
        cfg["data"] = os.path.abspath(cfg["data"])
    if saved is not None:
        for key in RUN_KEYS:
            if key in explicit and cfg[key] != saved.get(key):
                flag = "--" + key.replace("_", "-")
                raise UsageError(f"{flag} {getattr(args, key)} does not match the checkpoint's "
                                 f"{saved.get(key)!r}; expected the run's own settings (drop the flag "
                                 "or start a new run)")
            cfg[key] = saved[key]
        # a checkpoint older than a KEPT_KEY (e.g. ema) takes that flag's default
        cfg.update({k: saved[k] for k in KEPT_KEYS if k not in explicit and k in saved})
    return cfg


def total_steps(args, saved, steps_per_epoch, start_step):
    if args.dry_run:
        return start_step + 1
    if args.epochs:
        return args.epochs * steps_per_epoch
    return args.steps or (saved["steps"] if saved else DEFAULT_STEPS)


def setup(args, explicit, world=None):
    """Resolve the device, data, models, backend, optimisers and output folder of a run.

    ``world``: this process's place under torchrun (:func:`aigc_fast.distributed.init_world`);
    None for a single process on --device.
    """
    world = world or World(resolve_device(args.device))
    device = world.device
    out, resume = resolve_out_and_resume(args)
    ckpt = load_checkpoint(resume, required=CHECKPOINT_KEYS) if resume else None
    # a resumed run keeps its global batch, whatever the number of processes now
    saved = world.per_process_config(ckpt["config"], f"checkpoint {resume}") if ckpt else None
    cfg = make_config(args, explicit, saved)
    try:
        backend, backend_reason = resolve_backend(args.backend, device)
        precision, precision_reason = resolve_precision(
            args.precision, device, saved.get("precision") if saved else None)
    except ValueError as err:
        raise UsageError(str(err))
    sync_bn = args.sync_bn and world.enabled  # one process: BatchNorm2d is already synchronised
    if sync_bn and backend != "eager":
        if args.backend != "auto":
            raise UsageError(f"--sync-bn runs on the eager backend only; got --backend {backend} "
                             "(expected --backend eager or auto)")
        backend, backend_reason = "eager", "auto: --sync-bn runs on eager"
    cuda_graph, cuda_graph_reason = resolve_cuda_graph(args.cuda_graph, backend, device, precision,
                                                       world.world_size)

    images, data_desc = load_images(cfg["data"], cfg["image_size"], cfg["nc"], args.workers)
    order = BatchOrder(len(images), cfg["batch_size"], cfg["seed"], world.rank, world.world_size)
    start = ckpt["step"] if ckpt else 0
    cfg.update(steps=total_steps(args, saved, order.steps_per_epoch, start), backend=backend,
               device=device.type, workers=args.workers, version=__version__)
    cfg.update(world_size=world.world_size, sync_bn=sync_bn, precision=precision,
               cuda_graph=cuda_graph)

    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"] % 2**32)
    random.seed(cfg["seed"])
    G, D = build_models(cfg["image_size"], cfg["nz"], cfg["ngf"], cfg["ndf"], cfg["nc"])
    if ckpt:
        load_state_checked(G, ckpt["G"], f"checkpoint {resume} (G)")
        load_state_checked(D, ckpt["D"], f"checkpoint {resume} (D)")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    set_tf32(precision, device)
    if sync_bn:
        for module in (G, D):
            convert_sync_bn(module)
    model = prepare_backend(backend, G.to(device), D.to(device))
    # DistributedDataParallel around what the step runs; the checkpoint keeps saving model.G/D
    model.G_run, model.D_run = world.wrap(model.G_run), world.wrap(model.D_run)
    betas = (cfg["beta1"], 0.999)
    opt_g = torch.optim.Adam(model.G.parameters(), lr=cfg["lr"], betas=betas, capturable=cuda_graph)
    opt_d = torch.optim.Adam(model.D.parameters(), lr=cfg["lr"], betas=betas, capturable=cuda_graph)
    noise = torch.Generator(device).manual_seed(cfg["seed"] + 1)
    fixed_noise = torch.randn(SAMPLE_COUNT, cfg["nz"],
                              generator=torch.Generator().manual_seed(cfg["seed"])).to(device)
    ema = EMA(model.G, cfg["ema"]) if cfg["ema"] else None
    run = Run(cfg, out, device, images, order, model, opt_g, opt_d, noise, fixed_noise, world,
              data_desc=data_desc, backend_reason=backend_reason, ema=ema,
              precision=Precision(precision, device), precision_reason=precision_reason,
              cuda_graph_reason=cuda_graph_reason,
              eval_every=0 if args.dry_run else cfg["eval_every"])
    if ckpt:
        restore(run, ckpt, resume)
    return run


def resolve_cuda_graph(requested, backend, device, precision, world_size):
    """Turn ``--cuda-graph`` (None: on where it can be) into (on, why); UsageError if "on" cannot."""
    blocker = graph_unavailable(backend, device, precision, world_size)
    if requested == "on" and blocker:
        raise UsageError(f"--cuda-graph on: {blocker} (expected --backend fused on one CUDA device, "
                         "--precision other than fp16)")
    if requested == "off":
        return False, "--cuda-graph off"
    return blocker is None, "requested" if requested else (blocker or "default for fused on CUDA")


def restore(run, ckpt, path):
    """Continue exactly where the checkpoint ``ckpt`` stopped: optimisers, step, time and RNGs."""
    for optimizer, key in ((run.opt_g, "opt_g"), (run.opt_d, "opt_d")):
        optimizer.load_state_dict(ckpt[key])
        set_capturable(optimizer, run.cfg["cuda_graph"])  # the checkpoint's run may have differed
    run.step = ckpt["step"]
    run.seconds_before = ckpt.get("seconds", 0.0)
    run.last_checkpoint = path
    if run.ema is not None and EMA_KEY in ckpt:
        load_state_checked(run.ema.module, ckpt[EMA_KEY], f"checkpoint {path} ({EMA_KEY})")
    elif run.ema is not None:
        print(f"note: checkpoint {path} has no {EMA_KEY} (trained with --ema 0); the moving "
              f"average starts from G at step {run.step}")
    if ckpt["noise"]["device"] == run.device.type:
        run.noise.set_state(ckpt["noise"]["state"])
    else:
        print(f"note: checkpoint noise stream is from {ckpt['noise']['device']}; it restarts on "
              f"{run.device.type}, so this resume is not bitwise exact")
        run.noise.manual_seed(run.cfg["seed"] + 1 + run.step)
    set_rng_states(ckpt["rng"])
    if ckpt.get("scalers") and run.precision.state_dict() is not None:
        run.precision.load_state_dict(ckpt["scalers"])


def prepare_outputs(run):
    """config.json, the samples/ and checkpoints/ folders, samples/real.png; trims metrics.jsonl.

    Metrics logged after the resumed checkpoint were not kept by it and will be logged again.
    """
    if run.out is None:
        run.out = _next_run_dir()
    (run.out / "samples").mkdir(parents=True, exist_ok=True)
    (run.out / "checkpoints").mkdir(exist_ok=True)
    write_bytes_atomic(run.out / "config.json", (json.dumps(run.cfg, indent=2) + "\n").encode())
    real = run.out / "samples" / "real.png"
    if not real.exists():
        save_grid(to_model_range(run.images[:SAMPLE_COUNT]), real)
    metrics = run.out / "metrics.jsonl"
    if metrics.exists():
        kept = [line for line in metrics.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line)["step"] <= run.step]
        write_bytes_atomic(metrics, "".join(kept).encode())


# --- the loop's parts -----------------------------------------------------------------------------


def format_rate(per_second):
    """A throughput for people: whole numbers from 100 up, three significant digits below, so a
    slow run (Triton interpreted on a CPU: well under one image a second) does not print 0."""
    return f"{per_second:.0f}" if per_second >= 100 else f"{per_second:.3g}"


class Diverged(Exception):
    """A loss or weight became NaN/inf: the run stops and keeps its last good checkpoint."""


class Meter:
    """Sums the step metrics on the device; reads them back (one host sync) only at log time.

    ``world``: under torchrun each read averages the sums over the processes (one all-reduce).
    """

    def __init__(self, world=None):
        self.sums, self.count, self.t0 = None, 0, time.perf_counter()
        self.world = world

    def add(self, metrics):
        values = torch.stack([metrics[k] for k in METRIC_KEYS])
        self.sums = values if self.sums is None else self.sums + values
        self.count += 1

    def read(self):
        """Means since the last read and images/s, or None if no step was added."""
        if not self.count:
            return None
        sums = self.sums if self.world is None else self.world.mean(self.sums)
        means = dict(zip(METRIC_KEYS, (sums / self.count).tolist()))
        elapsed = time.perf_counter() - self.t0
        result = (means, self.count, elapsed)
        self.sums, self.count, self.t0 = None, 0, time.perf_counter()
        return result

    def skip(self, seconds):
        """Leave ``seconds`` spent on something else (an evaluation) out of the images/s."""
        self.t0 += seconds


def log_metrics(run, meter, bar, t_start):
    """Append the interval's means to metrics.jsonl and the progress bar; Diverged if non-finite."""
    read = meter.read()
    if read is None:
        return
    means, count, elapsed = read
    if not all(math.isfinite(v) for v in means.values()):
        raise Diverged(f"non-finite loss in steps {run.step - count + 1}..{run.step} ("
                       + ", ".join(f"{k}={v:.4g}" for k, v in means.items()) + ")")
    row = {"step": run.step, "epoch": round(run.step / run.order.steps_per_epoch, 4), **means,
           "images_per_s": count * run.cfg["batch_size"] * run.world.world_size / elapsed,
           "seconds": run.seconds_before + time.perf_counter() - t_start}
    if run.world.is_main:  # every rank took part in the average; rank 0 alone writes it
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps(row) + "\n")
    bar.set_postfix_str(f"loss_d {means['loss_d']:.3f} loss_g {means['loss_g']:.3f} "
                        f"D(x) {means['d_real']:.2f} D(G(z)) {means['d_fake']:.2f} "
                        f"{format_rate(row['images_per_s'])} img/s", refresh=False)


def sampling_generator(run):
    """The generator samples and SWD come from: the moving average if --ema is on, else G."""
    return run.ema.module if run.ema is not None else run.model.G


@torch.no_grad()
def write_samples(run):
    """samples/step_NNNNNN.png from the fixed noise, G in eval mode (no state changes)."""
    path = run.out / "samples" / f"step_{run.step:06d}.png"
    with eval_mode(sampling_generator(run)) as G:
        save_grid(G(run.fixed_noise), path)
    return path


def evaluate(run, bar, meter):
    """Append the SWD of the sampling generator (against a fixed real subset, described at the
    first call) to metrics.jsonl; returns the seconds it took, which ``meter``'s images/s skips."""
    t0 = time.perf_counter()
    if run.evaluator is None:
        run.evaluator = Evaluator(run.images, run.cfg["eval_n"], run.device)
        if run.evaluator.n < run.cfg["eval_n"]:
            bar.write(f"note: SWD uses n = {run.evaluator.n} images a side: --eval-n "
                      f"{run.cfg['eval_n']} capped at the data set's size")
    scores = run.evaluator(sampling_generator(run))
    seconds = time.perf_counter() - t0
    row = {"step": run.step, "epoch": round(run.step / run.order.steps_per_epoch, 4), "swd": scores,
           "swd_n": run.evaluator.n, "generator": EMA_KEY if run.ema is not None else "G",
           "eval_seconds": round(seconds, 2)}
    with open(run.out / "metrics.jsonl", "a") as f:
        f.write(json.dumps(row) + "\n")
    levels = ", ".join(f"{k} px {v:.1f}" for k, v in scores.items() if k != "mean")
    bar.write(f"step {run.step}: SWD x1e3 of {row['generator']} {scores['mean']:.1f} ({levels}; "
              f"n = {run.evaluator.n}, {seconds:.0f} s)")
    meter.skip(seconds)
    return seconds


def draw_curves(run):
    """curves.png of the run folder, or the one line that says how to get it."""
    try:
        return f"curves {write_curves(run.out)}"
    except UsageError as err:  # matplotlib is not installed (or nothing was logged yet)
        return f"note: {err}"


def checkpoint_state(run, seconds):
    return {
        "format": CHECKPOINT_FORMAT, "version": __version__, "step": run.step, "seconds": seconds,
        "G": run.model.G.state_dict(), "D": run.model.D.state_dict(),
        "opt_g": run.opt_g.state_dict(), "opt_d": run.opt_d.state_dict(),
        "noise": {"device": run.device.type, "state": run.noise.get_state()},
        "rng": rng_states(), "config": run.cfg,
        **({EMA_KEY: run.ema.state_dict()} if run.ema is not None else {}),
        **({"scalers": run.precision.state_dict()} if run.precision.state_dict() else {}),
    }


def write_checkpoint(run, seconds, periodic=False):
    """checkpoints/last.pt (and step_NNNNNN.pt if periodic), after checking the weights are finite."""
    params = [p for m in (run.model.G, run.model.D) for p in m.parameters()]
    if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        raise Diverged(f"non-finite weights at step {run.step}")
    if not run.world.is_main:  # the weights are the same on every rank (checked above on each)
        return None
    folder = run.out / "checkpoints"
    paths = [folder / "last.pt"] + ([folder / f"step_{run.step:06d}.pt"] if periodic else [])
    save_checkpoint(checkpoint_state(run, seconds), *paths)
    run.last_checkpoint = paths[0]
    return paths[0]


class GracefulInterrupt:
    """The first Ctrl-C asks the loop to stop at the next step boundary; a second one aborts."""

    def __enter__(self):
        self.requested = False
        self._previous = None
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def start_line(run):
    c = run.cfg
    return (f"aigc_fast {__version__}: DCGAN {c['image_size']}px on {run.data_desc} | device "
            f"{run.device.type} | backend {c['backend']} ({run.backend_reason}) | precision "
            f"{c['precision']} ({run.precision_reason}) | cuda graph "
            f"{'on' if c['cuda_graph'] else 'off'} ({run.cuda_graph_reason}) | steps "
            f"{run.step}->{c['steps']} x {run.world.describe_batch(c['batch_size'])} | out {run.out}")


def training_step(run):
    """``step(real, z)``: :func:`train_step` of the run's models, captured in a CUDA graph
    (:mod:`aigc_fast.step_graph`) when ``cfg["cuda_graph"]``; its metrics are read before the next
    call (Meter.add stacks them on the device)."""
    p = run.model

    def step(real, z):
        return train_step(p.G_run, p.D_run, run.opt_g, run.opt_d, real, z, p.loss_fn, run.precision)

    return GraphedStep(step) if run.cfg["cuda_graph"] else step


def fit(run):
    """Train from run.step to the configured total; returns the exit status."""
    c = run.cfg
    total = c["steps"]
    stream = batch_stream(run.images, run.order, run.step, run.device)
    meter, start_step, t_start = Meter(run.world), run.step, time.perf_counter()
    main_rank = run.world.is_main  # under torchrun only rank 0 samples, evaluates and prints
    eval_seconds = 0.0
    step = training_step(run)

    def seconds():
        return run.seconds_before + time.perf_counter() - t_start

    with GracefulInterrupt() as interrupt, tqdm(total=total, initial=run.step, unit="step",
                                                  dynamic_ncols=True, disable=not main_rank) as bar:
        if run.eval_every and run.step == 0 and main_rank:  # the untrained G: where SWD starts
            eval_seconds += evaluate(run, bar, meter)
        stop = run.world.agree_to_stop(interrupt.requested, at_log_step=True)
        while run.step < total and not stop:
            real = to_model_range(next(stream))
            # every rank draws the global batch's noise and keeps its own rows
            z = run.world.shard(torch.randn(run.world.world_size * c["batch_size"], c["nz"],
                                            device=run.device, generator=run.noise))
            meter.add(step(real, z))
            run.step += 1
            if run.ema is not None:
                run.ema.update(run.step)
            bar.update(1)
            end = run.step == total
            periodic = run.step % c["checkpoint_every"] == 0
            logged = end or periodic or run.step % c["log_every"] == 0
            if logged:
                log_metrics(run, meter, bar, t_start)
            if main_rank and (end or run.step % c["sample_every"] == 0):
                write_samples(run)
            if main_rank and run.eval_every and (end or run.step % run.eval_every == 0):
                eval_seconds += evaluate(run, bar, meter)
            if end or periodic:
                write_checkpoint(run, seconds(), periodic=periodic)
            stop = run.world.agree_to_stop(interrupt.requested, logged)
        if stop:
            log_metrics(run, meter, bar, t_start)
            path = write_checkpoint(run, seconds())
    if not main_rank:
        return EXIT_INTERRUPTED if stop else 0
    print(draw_curves(run))
    if stop:
        print(f"interrupted at step {run.step}/{total}; checkpoint saved to {path}\n"
              f"resume with: python -m aigc_fast.train --resume {path}", file=sys.stderr)
        return EXIT_INTERRUPTED
    elapsed = time.perf_counter() - t_start
    rate = (run.step - start_step) * c["batch_size"] * run.world.world_size / (elapsed - eval_seconds)
    evals = f", {eval_seconds:.1f} s of it SWD evaluation" if eval_seconds else ""
    print(f"done: step {run.step}/{total}, {elapsed:.1f} s in this run{evals} ({format_rate(rate)} "
          f"images/s of training) | samples "
          f"{run.out / 'samples' / f'step_{run.step:06d}.png'} | checkpoint {run.last_checkpoint}")
    return 0


def main(argv=None):
    args, explicit = parse_args(argv)
    world = init_world(args.device, args.dist_timeout)  # a process group only under torchrun
    finished = False
    try:
        status = run_training(args, explicit, world)
        finished = True
        return status
    finally:  # a rank that raised leaves without waiting for peers that may be gone
        world.shutdown(clean=finished)


def run_training(args, explicit, world):
    """Set up and fit a run; the exit status. Under torchrun rank 0 alone prints and writes."""
    run = setup(args, explicit, world)
    if run.step >= run.cfg["steps"]:
        if world.is_main:
            print(f"nothing to do: the checkpoint is at step {run.step} and the run's total is "
                  f"{run.cfg['steps']} (pass a larger --steps to train further)")
        return 0
    if world.is_main:
        prepare_outputs(run)
        print(start_line(run), flush=True)
    try:
        return fit(run)
    except Diverged as err:
        where = (f"the last good checkpoint, {run.last_checkpoint}, was not overwritten"
                 if run.last_checkpoint else "no checkpoint was written")
        if world.is_main:  # the metrics and weights it checked are the same on every rank
            print(f"aigc_fast.train: stopped: {err}; {where}; a lower --lr may help", file=sys.stderr)
        return 1


if __name__ == "__main__":
    run_main(main, prog="aigc_fast.train")
