"""Score a generator against real images: ``python -m aigc_fast.eval``. By the sliced Wasserstein
distance (needs nothing) and, through torch-fidelity (:mod:`.fidelity`), by FID, KID and
precision/recall; also a folder of exported samples (``--fake DIR --real DIR``).

Also the :class:`Evaluator` (SWD) and :class:`FidelityEvaluator` the trainer uses for
``--eval-every``, so a run's metrics.jsonl and
this command give the same figures for the same checkpoint: both compare ``n`` generated images
(noise drawn from ``seed``) with ``n`` real images (a subset drawn from ``seed``), where ``n`` is
``--n`` (default :data:`~aigc_fast.training.metrics.DEFAULT_N`) capped at the size of the data set.
SWD depends on ``n``: compare only figures made with the same ``n``.
"""
import json
import os
import sys
from pathlib import Path

import torch

from .checkpoint import load_checkpoint
from .cli import (ArgumentParser, UsageError, add_device_argument, positive_int,
                  resolve_device)
from .data import data_of_config, infer_dataset, to_model_range
from .ema import EMA_KEY
from .fidelity import FIDELITY_METRICS, TensorImages, fidelity_scores
from .metrics import DEFAULT_N, describe, swd
from .sample import eval_mode, generate, generator_from_state, generator_key, to_uint8

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
        """``images``: uint8 (N, C, S, S) as :func:`aigc_fast.training.data.load_data` reads
        them."""
        self.n, self.seed, self.device = min(n, len(images)), seed, device
        real = to_model_range(real_subset(images, self.n, seed).to(device))
        self.real = describe(real, seed=seed)

    @torch.no_grad()
    def __call__(self, G):
        """{level: SWD x1e3, ..., "mean": ...} of ``self.n`` images of G (run in eval mode)."""
        with eval_mode(G):
            fake = torch.cat(list(generate(G, self.n, self.seed, GENERATE_BATCH, self.device)))
        return swd(self.real, fake, seed=self.seed)


class FidelityEvaluator:
    """FID/KID/precision-recall of generators against one fixed real subset, the one SWD uses;
    torch-fidelity caches its features under ``source`` (what determines the real images)."""

    def __init__(self, images, n, metrics, source, fid_weights=None, prc_weights=None,
                 device=torch.device("cpu"), seed=EVAL_SEED):
        self.n, self.seed, self.device, self.metrics = min(n, len(images)), seed, device, metrics
        self.real = TensorImages(real_subset(images, self.n, seed))
        self.source = {**source, "n": self.n, "seed": seed}
        self.fid_weights, self.prc_weights = fid_weights, prc_weights

    @torch.no_grad()
    def __call__(self, G):
        with eval_mode(G):
            pixels = [torch.from_numpy(to_uint8(batch)) for batch in
                      generate(G, self.n, self.seed, GENERATE_BATCH, self.device)]
        fake = TensorImages(torch.cat(pixels).permute(0, 3, 1, 2))
        return fidelity_scores(fake, self.real, self.metrics, self.n, self.fid_weights,
                               self.prc_weights, self.device, self.source)


def real_source(cfg):
    """What determines a run's real images, for the feature cache's name."""
    return {k: cfg.get(k) for k in ("dataset", "data", "classes", "image_size", "nc")}


# --- command line ---------------------------------------------------------------------------------


def build_parser():
    p = ArgumentParser(
        prog="python -m aigc_fast.eval",
        description="Sliced Wasserstein distance (Karras et al. 2018; x1e3, lower is better) "
                    "between images of a checkpoint's generator and real images, per "
                    "Laplacian-pyramid level and their mean.")
    add = p.add_argument
    add("--checkpoint", metavar="PATH",
        help="a checkpoint written by aigc_fast.train (e.g. runs/001/checkpoints/last.pt)")
    add("--fake", metavar="DIR",
        help="instead of --checkpoint: score this folder of images (e.g. python -m "
             "aigc_fast.sample --out-dir) against --real DIR, both given to torch-fidelity as "
             "they are (unresized, every image); FID/KID/PRC only")
    add("--data", "--real", metavar="shapes|DIR|FILE.npz",
        help="real images; with --checkpoint read and resized as training reads them (default: the "
             "data the run was trained on, from the checkpoint's config); with --fake a folder")
    add("--metric", type=_metric_list, default=("swd",), metavar="swd,fid,kid,prc",
        help="what to compute, comma-separated: swd (needs nothing), fid and kid (torch-fidelity, "
             "pip install 'aigc_fast[metrics]', and --fid-weights), prc: precision and recall "
             "(and --prc-weights) (default swd)")
    add("--fid-weights", metavar="PATH",
        help="the Inception weights of FID and KID: the state_dict torch-fidelity's "
             "inception-v3-compat extractor loads (default: $AIGC_FAST_FID_WEIGHTS); never "
             "downloaded, loaded with weights_only=True first")
    add("--prc-weights", metavar="PATH",
        help="the VGG16 weights of precision/recall: a state_dict of torchvision's vgg16")
    add("--n", type=positive_int, default=DEFAULT_N,
        help="images per side (default %(default)s, capped at the data set's size); SWD depends on "
             "it, so compare only figures made with the same n")
    add("--seed", type=int, default=EVAL_SEED,
        help="seed of the noise, the real subset and the metric's random choices (default "
             "%(default)s, as in training)")
    add("--json", action="store_true",
        help="print only the result, as one JSON object: for swd alone {level: SWD, ..., "
             "\"mean\": SWD}; else the keys fid, kid_mean, kid_std, precision, recall (those "
             "asked for) and swd (that object)")
    add("--no-ema", action="store_true",
        help="score the trained weights G, not their moving average G_ema (the default when the "
             "checkpoint has one)")
    add_device_argument(p, "generate and measure")
    add("--workers", type=int, default=0, metavar="N",
        help="processes that decode image files of a --data folder (default %(default)s)")
    return p


def _metric_list(text):
    metrics = tuple(dict.fromkeys(m.strip() for m in text.split(",")))
    if not metrics or any(m not in ("swd",) + FIDELITY_METRICS for m in metrics):
        raise ValueError(text)
    return metrics


_metric_list.__name__ = "comma-separated list of swd, fid, kid, prc"


def _real_images(args, cfg):
    """uint8 real images at the checkpoint's size and channels, their description, and the
    settings that determine them (``--data``'s, else the run's own)."""
    if args.data is not None:
        cfg = {**cfg, "dataset": infer_dataset(args.data), "data": args.data}
    try:
        images, desc = data_of_config(cfg, args.workers)[:2]
        return images, desc, cfg
    except UsageError as err:
        if args.data is not None:
            raise
        raise UsageError(f"{err} (this is the run's --data, from the checkpoint's config; pass "
                         "--data to score against other images)") from None


def _swd_lines(levels):
    return [f"  {'mean' if k == 'mean' else k + ' px':>6}  {v:8.2f}" for k, v in levels.items()]


def _print_scores(scores, title, as_json):
    """The result: SWD alone as its levels (the output before FID existed); else one flat object
    of the fidelity scores, SWD's levels under "swd"."""
    if list(scores) == ["swd"]:
        scores = scores["swd"]
        lines = _swd_lines(scores)
    else:
        lines = [f"  {k:>9}  {v:.6g}" for k, v in scores.items() if k != "swd"]
        lines += ["  SWD x1e3:"] + _swd_lines(scores["swd"]) if "swd" in scores else []
    print(json.dumps(scores) if as_json else "\n".join([title] + lines))


def _score_folders(args):
    """--fake DIR --real DIR|NPZ: torch-fidelity's own figures for the two sets, unchanged."""
    if "swd" in args.metric:
        raise UsageError("--fake: scores FID/KID/PRC only; expected --metric of fid, kid, prc")
    if args.data is None:
        raise UsageError("--fake DIR needs --real DIR (or FILE.npz): the images to compare with")
    n = min(_count_images(args.fake, "--fake"), _count_images(args.data, "--real"))
    scores = fidelity_scores(args.fake, args.data, args.metric, n, args.fid_weights,
                             args.prc_weights, resolve_device(args.device))
    _print_scores(scores, f"{args.fake} vs {args.data}, n = {n}:", args.json)
    return 0


# the files torch-fidelity reads from a folder (its samples_find_ext; not in sub-folders)
FIDELITY_EXTENSIONS = (".png", ".jpg", ".jpeg")


def _count_images(folder, flag):
    """How many images torch-fidelity reads from ``folder``; UsageError if none."""
    count = (sum(1 for p in Path(folder).iterdir() if p.suffix.lower() in FIDELITY_EXTENSIONS)
             if os.path.isdir(folder) else 0)
    if not count:
        raise UsageError(f"{flag} {folder}: no png/jpg/jpeg images in this folder; expected a "
                         "folder of images (not searched below)")
    return count


def main(argv=None):
    args = build_parser().parse_args(argv)
    if args.seed < 0:
        raise UsageError(f"--seed {args.seed}: expected 0 or more")
    if (args.checkpoint is None) == (args.fake is None):
        raise UsageError("expected --checkpoint PATH (score a generator) or --fake DIR (score a "
                         "folder of images), one of them")
    if args.fake is not None:
        return _score_folders(args)
    device = resolve_device(args.device)
    state = load_checkpoint(args.checkpoint, required=("G", "config"))
    key = generator_key(state, ema=not args.no_ema)
    G = generator_from_state(state, args.checkpoint, key).to(device)
    images, data_desc, data_cfg = _real_images(args, state["config"])
    which = (f"the EMA generator {EMA_KEY} (--no-ema for G)" if key == EMA_KEY
             else "the trained generator G")
    if key != EMA_KEY and not args.no_ema:
        which += " (the checkpoint has no G_ema: trained with --ema 0)"
    n = min(args.n, len(images))
    print(f"aigc_fast.eval: step {state.get('step', '?')}, {which}; n = {n} images a side"
          + (f" (--n {args.n} capped at the data set's size)" if n < args.n else ""),
          file=sys.stderr)
    scores = {}
    fidelity = [m for m in args.metric if m != "swd"]
    if fidelity:
        scores.update(FidelityEvaluator(images, n, fidelity, real_source(data_cfg),
                                        args.fid_weights, args.prc_weights, device, args.seed)(G))
    if "swd" in args.metric:
        scores["swd"] = Evaluator(images, n, device, args.seed)(G)
    title = (f"{'SWD x1e3 (lower is better)' if args.metric == ('swd',) else 'Scores'} of "
             f"{args.checkpoint} vs {data_desc}, n = {n}, seed {args.seed}:")
    _print_scores(scores, title, args.json)
    return 0
