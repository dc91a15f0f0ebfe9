"""A run: its settings, device, data, models, optimisers and output folder (:func:`setup`), the
resume from a checkpoint (:func:`restore`) and the checkpoints it writes (:func:`write_checkpoint`).
"""
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .. import __version__
from ..models import build_models
from .backends import Prepared, prepare_backend, resolve_backend
from .checkpoint import (checkpoint_bytes, load_checkpoint, load_state_checked, rng_states,
                         set_rng_states, write_bytes_atomic)
from .cli import UsageError, resolve_device
from .data import SHAPES, BatchOrder, data_of_config, to_model_range
from .distributed import World, convert_sync_bn
from .ema import EMA, EMA_KEY
from .board import Board
from .eval import Evaluator, FidelityEvaluator
from .losses import Objective
from .options import DEFAULT_STEPS, KEPT_KEYS, RUN_KEYS, upgrade_saved_config
from .precision import Precision, resolve_precision, set_tf32
from .report import Diverged, write_optional, write_run_file
from .sample import CLASS_COLUMNS, class_rows, save_grid
from .start_weights import load_start_weights
from .step_graph import graph_unavailable, set_capturable
from .variant import build_objective, graph_blocker, resolve_variant

SAMPLE_COUNT = 64  # images in each sample grid (an unconditional run's: 8 x 8)
SAMPLE_CLASSES = 16  # a conditional run's grid: one row for each of its first 16 classes
CHECKPOINT_FORMAT = "aigc_fast.dcgan/1"
CHECKPOINT_KEYS = ("G", "D", "opt_g", "opt_d", "step", "noise", "rng", "config")


@dataclass
class Run:
    """Everything the loop needs: :func:`setup` makes it; the loop (:mod:`.loop`) and its
    reports (:mod:`.report`) read and update it."""

    cfg: dict
    out: Optional[Path]  # None: a new numbered folder under runs/, made once set-up succeeded
    device: torch.device
    images: torch.Tensor
    labels: Optional[torch.Tensor]  # a conditional run's int64 class of each image; else None
    order: BatchOrder
    model: Prepared
    opt_g: torch.optim.Optimizer
    opt_d: torch.optim.Optimizer
    noise: torch.Generator  # G's inputs: each step's z, then (conditional) its fake labels
    fixed_noise: torch.Tensor
    fixed_labels: Optional[torch.Tensor]  # a conditional run's sample grid: one row per class
    variant_rng: torch.Generator  # augmentation parameters and gradient-penalty weights
    objective: Objective  # the loss, penalties and augmentation the step trains with
    world: World  # this process's rank among torchrun's processes (rank 0 of 1 without torchrun)
    step: int = 0
    seconds_before: float = 0.0  # training time spent before this process (resumed runs)
    data_desc: str = ""
    backend_reason: str = ""
    precision: Optional[Precision] = None  # --precision: the step's autocast and fp16 grad scalers
    precision_reason: str = ""
    cuda_graph_reason: str = ""  # why cfg["cuda_graph"] captures the step in a CUDA graph or not
    last_checkpoint: Optional[Path] = None
    last_checkpoint_step: int = 0
    write_failure: Optional[str] = None  # the first failed write of a file the run needs, one line
    optional_failures: set = field(default_factory=set)  # kinds of optional file already warned of
    ema: Optional[EMA] = None  # the moving average of G (--ema), the generator samples and SWD use
    eval_every: int = 0  # --eval-every, 0 in a --dry-run
    evaluator: Optional[Evaluator] = None  # made at the first evaluation (describes the real set)
    fidelity: Optional[FidelityEvaluator] = None  # --fid-weights/--prc-weights: idem, FID/KID/PR
    board: Optional[Board] = None  # --tensorboard's writer, opened with the outputs


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
            last = out / "checkpoints" / "last.pt"
            resume = last if last.exists() else None
        else:
            resume = _newest_run_checkpoint()
    elif args.resume:
        resume = Path(args.resume)
        if not resume.is_file():
            raise UsageError(f"--resume {resume}: no such file; expected a checkpoint .pt file or "
                             "'auto'")
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


def load_resume(path, auto, is_main):
    """(path, state) of the checkpoint to resume from.

    ``--resume PATH`` (``auto`` False): that file, or a UsageError. ``--resume auto`` (``path`` is
    a run's last.pt): last.pt, or when it cannot be read (a copy or a disk that failed mid-write)
    the periodic checkpoint beside it with the highest step that loads, saying which and why
    (rank 0); a UsageError if none loads, so a run is never started afresh over its own files.
    """
    try:
        return path, load_checkpoint(path, required=CHECKPOINT_KEYS)
    except UsageError as err:
        if not auto:
            raise
        why = err
    for periodic in sorted(path.parent.glob("step_*.pt"), key=_checkpoint_step, reverse=True):
        try:
            ckpt = load_checkpoint(periodic, required=CHECKPOINT_KEYS)
        except UsageError:
            continue
        if is_main:
            print(f"note: --resume auto: {why}; resuming from {periodic} (step {ckpt['step']}), "
                  "the newest checkpoint that loads")
        return periodic, ckpt
    raise UsageError(f"--resume auto: {why}, and no periodic checkpoint (step_NNNNNN.pt) beside it "
                     "loads either; expected a readable checkpoint in the run, or a new --out")


def _checkpoint_step(path):
    """The step in a periodic checkpoint's name step_NNNNNN.pt (-1 if the name holds none)."""
    digits = path.stem.removeprefix("step_")
    return int(digits) if digits.isdigit() else -1


def make_config(args, explicit, saved):
    """The run's settings: the flags, or for a resumed run its checkpoint's config ``saved``.

    RUN_KEYS come from the checkpoint (a contradicting flag is an error); KEPT_KEYS too, unless
    a flag changes them.
    """
    cfg = {k: getattr(args, k) for k in RUN_KEYS + KEPT_KEYS}
    for key in ("data", "fid_weights", "prc_weights"):  # paths stay valid from another folder
        if cfg[key] not in (None, SHAPES):
            cfg[key] = os.path.abspath(cfg[key])
    if saved is not None:
        saved = upgrade_saved_config(saved)
        for key in RUN_KEYS:
            saved_value = saved[key]
            if key in explicit and cfg[key] != saved_value:
                flag = "--" + key.replace("_", "-")
                raise UsageError(f"{flag} {getattr(args, key)} does not match the checkpoint's "
                                 f"{saved_value!r}; expected the run's own settings (drop the "
                                 "flag or start a new run)")
            cfg[key] = saved_value
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
    if resume:
        resume, ckpt = load_resume(resume, args.resume == "auto", world.is_main)
    else:
        ckpt = None
    # a resumed run keeps its global batch, whatever the number of processes now
    saved = world.per_process_config(ckpt["config"], f"checkpoint {resume}") if ckpt else None
    cfg = make_config(args, explicit, saved)
    resolve_variant(cfg, world.world_size)
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
                                                       world.world_size, cfg)

    data = data_of_config(cfg, args.workers, args.download, cfg["conditional"])
    trained_classes = saved.get("num_classes", 0) if saved is not None else data.num_classes
    if trained_classes != data.num_classes:  # G's and D's class embeddings would not load
        raise UsageError(f"checkpoint {resume}: trained on {trained_classes} classes, but its "
                         f"data now has {data.num_classes} ({data.desc}); expected the run's own "
                         "data")
    order = BatchOrder(len(data.images), cfg["batch_size"], cfg["seed"], world.rank,
                       world.world_size)
    start = ckpt["step"] if ckpt else 0
    cfg.update(steps=total_steps(args, saved, order.steps_per_epoch, start), backend=backend,
               device=device.type, workers=args.workers, version=__version__,
               num_classes=data.num_classes)
    cfg.update(world_size=world.world_size, sync_bn=sync_bn, precision=precision,
               cuda_graph=cuda_graph)

    torch.manual_seed(cfg["seed"])
    np.random.seed(cfg["seed"] % 2**32)
    random.seed(cfg["seed"])
    G, D = build_models(cfg["image_size"], cfg["nz"], cfg["ngf"], cfg["ndf"], cfg["nc"],
                        d_norm=cfg["d_norm"], spectral_norm=cfg["spectral_norm"],
                        num_classes=cfg["num_classes"])
    if ckpt:
        load_state_checked(G, ckpt["G"], f"checkpoint {resume} (G)")
        load_state_checked(D, ckpt["D"], f"checkpoint {resume} (D)")
    else:
        load_start_weights(G, D, args.net_g, args.net_d)
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
    fixed_noise, fixed_labels = sample_inputs(cfg, device)
    variant_rng = torch.Generator(device).manual_seed(cfg["seed"] + 2)
    objective = build_objective(cfg, model.loss_fn, variant_rng)
    ema = EMA(model.G, cfg["ema"]) if cfg["ema"] else None
    run = Run(cfg, out, device, data.images, data.labels, order, model, opt_g, opt_d, noise,
              fixed_noise, fixed_labels, variant_rng, objective, world,
              data_desc=data.desc, backend_reason=backend_reason, ema=ema,
              precision=Precision(precision, device), precision_reason=precision_reason,
              cuda_graph_reason=cuda_graph_reason,
              eval_every=0 if args.dry_run else cfg["eval_every"])
    if ckpt:
        restore(run, ckpt, resume)
    return run


def sample_inputs(cfg, device):
    """(noise, labels or None) of every sample grid, a pure function of the seed: 8 x 8 images;
    for a conditional run one row of CLASS_COLUMNS per class (its first SAMPLE_CLASSES)."""
    z = torch.randn(SAMPLE_COUNT, cfg["nz"], generator=torch.Generator().manual_seed(cfg["seed"]))
    if not cfg["num_classes"]:
        return z.to(device), None
    z, labels = class_rows(z[:CLASS_COLUMNS], list(range(min(cfg["num_classes"],
                                                               SAMPLE_CLASSES))))
    return z.to(device), labels.to(device)


def real_grid(images, labels, num_classes):
    """(images, nrow) of samples/real.png, laid out as the sample grids are: the first 64 images,
    or for a conditional run one row per class of its first SAMPLE_CLASSES, each its first
    CLASS_COLUMNS images in data order (a class with fewer leaves the end of its row black)."""
    if not num_classes:
        return images[:SAMPLE_COUNT], None
    rows = []
    for c in range(min(num_classes, SAMPLE_CLASSES)):
        row = images[(labels == c).nonzero().flatten()[:CLASS_COLUMNS]]
        blank = row.new_zeros((CLASS_COLUMNS - len(row),) + tuple(row.shape[1:]))
        rows.append(torch.cat([row, blank]))
    return torch.cat(rows), CLASS_COLUMNS


def resolve_cuda_graph(requested, backend, device, precision, world_size, cfg=None):
    """Turn ``--cuda-graph`` (None: on where it can) into (on, why); UsageError if "on" cannot.
    ``cfg``: the run's config, whose GAN variant may keep the step out of a graph (None: the
    default variant)."""
    blocker = (graph_unavailable(backend, device, precision, world_size)
               or (graph_blocker(cfg) if cfg else None))
    if requested == "on" and blocker:
        raise UsageError(f"--cuda-graph on: {blocker} (expected --backend fused on one CUDA "
                         "device, --precision other than fp16)")
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
    run.last_checkpoint, run.last_checkpoint_step = path, run.step
    if run.ema is not None and EMA_KEY in ckpt:
        load_state_checked(run.ema.module, ckpt[EMA_KEY], f"checkpoint {path} ({EMA_KEY})")
    elif run.ema is not None:
        print(f"note: checkpoint {path} has no {EMA_KEY} (trained with --ema 0); the moving "
              f"average starts from G at step {run.step}")
    _restore_generator(run, run.noise, ckpt["noise"], "noise", seed_offset=1)
    if "variant_rng" in ckpt:  # older checkpoints had no augmentation or penalty draws
        _restore_generator(run, run.variant_rng, ckpt["variant_rng"], "variant_rng", seed_offset=2)
    set_rng_states(ckpt["rng"])
    if ckpt.get("scalers") and run.precision.state_dict() is not None:
        run.precision.load_state_dict(ckpt["scalers"])


def _restore_generator(run, generator, saved, what, seed_offset):
    """Continue a seeded stream from its saved state; a state saved on another device type cannot
    be set here, so the stream restarts from a seed that depends on the step."""
    if saved["device"] == run.device.type:
        generator.set_state(saved["state"])
    else:
        print(f"note: checkpoint {what} stream is from {saved['device']}; it restarts on "
              f"{run.device.type}, so this resume is not bitwise exact")
        generator.manual_seed(run.cfg["seed"] + seed_offset + run.step)


def prepare_outputs(run):
    """config.json, the samples/ and checkpoints/ folders, samples/real.png; trims metrics.jsonl.

    Metrics logged after the resumed checkpoint were not kept by it and will be logged again.
    """
    if run.out is None:
        run.out = _next_run_dir()
    (run.out / "samples").mkdir(parents=True, exist_ok=True)
    (run.out / "checkpoints").mkdir(exist_ok=True)
    config = (json.dumps(run.cfg, indent=2) + "\n").encode()
    write_run_file(run, run.out / "config.json", lambda path: write_bytes_atomic(path, config))
    real = run.out / "samples" / "real.png"
    if not real.exists():
        images, nrow = real_grid(run.images, run.labels, run.cfg["num_classes"])
        write_optional(run, "sample grids", real,
                       lambda path: save_grid(to_model_range(images), path, nrow))
    metrics = run.out / "metrics.jsonl"
    if metrics.exists():
        kept = [line for line in metrics.read_text().splitlines(keepends=True)
                if line.strip() and json.loads(line)["step"] <= run.step]
        write_run_file(run, metrics, lambda path: write_bytes_atomic(path, "".join(kept).encode()))


def checkpoint_state(run, seconds):
    return {
        "format": CHECKPOINT_FORMAT, "version": __version__, "step": run.step, "seconds": seconds,
        "G": run.model.G.state_dict(), "D": run.model.D.state_dict(),
        "opt_g": run.opt_g.state_dict(), "opt_d": run.opt_d.state_dict(),
        "noise": {"device": run.device.type, "state": run.noise.get_state()},
        "variant_rng": {"device": run.device.type, "state": run.variant_rng.get_state()},
        "rng": rng_states(), "config": run.cfg,
        **({EMA_KEY: run.ema.state_dict()} if run.ema is not None else {}),
        **({"scalers": run.precision.state_dict()} if run.precision.state_dict() else {}),
    }


def write_checkpoint(run, seconds, periodic=False):
    """checkpoints/last.pt (and step_NNNNNN.pt if periodic), once the weights are checked finite.

    A failed write is kept in run.write_failure (:func:`~.report.write_run_file`); the file it
    would have replaced stays intact, and run.last_checkpoint names the last one written.
    """
    params = [p for m in (run.model.G, run.model.D) for p in m.parameters()]
    if not bool(torch.stack([torch.isfinite(p).all() for p in params]).all()):
        raise Diverged(f"non-finite weights at step {run.step}")
    if not run.world.is_main:  # the weights are the same on every rank (checked above on each)
        return
    data = checkpoint_bytes(checkpoint_state(run, seconds))

    def write(path):
        write_bytes_atomic(path, data)

    folder = run.out / "checkpoints"
    if write_run_file(run, folder / "last.pt", write):
        run.last_checkpoint, run.last_checkpoint_step = folder / "last.pt", run.step
    if periodic:
        write_run_file(run, folder / f"step_{run.step:06d}.pt", write)
