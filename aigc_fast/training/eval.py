"""Score a generator by the sliced Wasserstein distance to real images: ``python -m aigc_fast.eval``.

Also the :class:`Evaluator` the trainer uses for ``--eval-every``, so a run's metrics.jsonl and
this command give the same figures for the same checkpoint: both compare ``n`` generated images
(noise drawn from ``seed``) with ``n`` real images (a subset drawn from ``seed``), where ``n`` is
``--n`` (default :data:`~aigc_fast.training.metrics.DEFAULT_N`) capped at the size of the data set. SWD
depends on ``n``: compare only figures made with the same ``n``.
"""
import json
import sys

import torch

from .checkpoint import load_checkpoint
from .cli import (ArgumentParser, UsageError, add_device_argument, positive_int,
                  resolve_device)
from .data import SHAPES, load_images, to_model_range
from .ema import EMA_KEY
from .metrics import DEFAULT_N, describe, swd
from .sample import eval_mode, generate, generator_from_state, generator_key

EVAL_SEED = 0  # one seed for every run's evaluations: runs of different --seed stay comparable
GENERATE_BATCH = 256


def real_subset(images, n, seed=EVAL_SEED):
    """``min(n, len(images))`` images drawn without replacement, a pure function of ``seed`` (a
    folder's sorted file order could otherwise put one class first)."""
    g = torch.Generator().manual_seed(seed)
    return images[torch.randperm(len(images), generator=g)[:n]]


class Evaluator:
    """SWD of generators against one fixed real set, whose descriptors are computed once."""

    def __init__(self, images, n=DEFAULT_N, device=torch.device("cpu"), seed=EVAL_SEED):
        """``images``: uint8 (N, C, S, S) as :func:`aigc_fast.training.data.load_images` returns them."""
        self.n, self.seed, self.device = min(n, len(images)), seed, device
        real = to_model_range(real_subset(images, self.n, seed).to(device))
        self.real = describe(real, seed=seed)

    @torch.no_grad()
    def __call__(self, G):
        """{level: SWD x1e3, ..., "mean": ...} of ``self.n`` images of G (run in eval mode)."""
        with eval_mode(G):
            fake = torch.cat(list(generate(G, self.n, self.seed, GENERATE_BATCH, self.device)))
        return swd(self.real, fake, seed=self.seed)


# --- command line ---------------------------------------------------------------------------------


def build_parser():
    p = ArgumentParser(
        prog="python -m aigc_fast.eval",
        description="Sliced Wasserstein distance (Karras et al. 2018; x1e3, lower is better) between "
                    "images of a checkpoint's generator and real images, per Laplacian-pyramid "
                    "level and their mean.")
    add = p.add_argument
    add("--checkpoint", required=True, metavar="PATH",
        help="a checkpoint written by aigc_fast.train (e.g. runs/001/checkpoints/last.pt)")
    add("--data", metavar="shapes|DIR|FILE.npz",
        help="real images, read and resized as training reads them (default: the data the run was "
             "trained on, from the checkpoint's config)")
    add("--n", type=positive_int, default=DEFAULT_N,
        help="images per side (default %(default)s, capped at the data set's size); SWD depends on "
             "it, so compare only figures made with the same n")
    add("--seed", type=int, default=EVAL_SEED,
        help="seed of the noise, the real subset and the metric's random choices (default "
             "%(default)s, as in training)")
    add("--json", action="store_true",
        help="print only the result, as one JSON object: {level: SWD, ..., \"mean\": SWD}")
    add("--no-ema", action="store_true",
        help="score the trained weights G, not their moving average G_ema (the default when the "
             "checkpoint has one)")
    add_device_argument(p, "generate and measure")
    add("--workers", type=int, default=0, metavar="N",
        help="processes that decode image files of a --data folder (default %(default)s)")
    return p


def _real_images(data, explicit, cfg, workers):
    """uint8 real images at the checkpoint's size and channels, and their description."""
    try:
        return load_images(data, cfg["image_size"], cfg["nc"], workers)
    except UsageError as err:
        if explicit:
            raise
        raise UsageError(f"{err} (this is the run's --data, from the checkpoint's config; pass "
                         "--data to score against other images)") from None


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed}: expected 0 or more")
    device = resolve_device(args.device)
    state = load_checkpoint(args.checkpoint, required=("G", "config"))
    key = generator_key(state, ema=not args.no_ema)
    G = generator_from_state(state, args.checkpoint, key).to(device)
    cfg = state["config"]
    data = args.data if args.data is not None else cfg.get("data", SHAPES)
    images, data_desc = _real_images(data, args.data is not None, cfg, args.workers)
    which = (f"the EMA generator {EMA_KEY} (--no-ema for G)" if key == EMA_KEY
             else "the trained generator G")
    if key != EMA_KEY and not args.no_ema:
        which += " (the checkpoint has no G_ema: trained with --ema 0)"
    n = min(args.n, len(images))
    print(f"aigc_fast.eval: step {state.get('step', '?')}, {which}; n = {n} images a side"
          + (f" (--n {args.n} capped at the data set's size)" if n < args.n else ""), file=sys.stderr)
    scores = Evaluator(images, n, device, args.seed)(G)
    if args.json:
        print(json.dumps(scores))
        return 0
    print(f"SWD x1e3 (lower is better) of {args.checkpoint} vs {data_desc}, n = {n}, seed {args.seed}:")
    for level, value in scores.items():
        label = "mean" if level == "mean" else f"{level} px"
        print(f"  {label:>6}  {value:8.2f}")
    return 0
