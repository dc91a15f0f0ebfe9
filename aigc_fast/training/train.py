"""DCGAN training: ``python -m aigc_fast.train`` (see ``--help``).

:func:`main` parses the command line (:mod:`.options`), joins torchrun's processes if launched by
it (:mod:`.distributed`), sets the run up (:mod:`.run`) and fits it (:mod:`.loop`). A run folder
holds config.json, metrics.jsonl (one row per --log-every steps, plus one row with "swd" per
evaluation), samples/real.png, samples/step_NNNNNN.png (fixed noise), checkpoints/last.pt +
step_NNNNNN.pt and curves.png (with matplotlib).
"""
import sys

from .board import Board
from .distributed import init_world
from .loop import fit
from .options import parse_args
from .report import Diverged, start_line
from .run import prepare_outputs, setup


def main(argv=None):
    """``python -m aigc_fast.train`` with ``argv`` (None: sys.argv); returns the exit status."""
    args, explicit = parse_args(argv)
    if args.ngpu and args.ngpu > 1:
        print(f"note: --ngpu {args.ngpu}: this trainer runs one device per process; torchrun "
              f"--nproc-per-node {args.ngpu} -m aigc_fast.train ... trains on {args.ngpu} GPUs",
              file=sys.stderr)
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
        if run.cfg["tensorboard"]:
            run.board = Board(run.out, run.step, run.cfg)
        print(start_line(run), flush=True)
    try:
        return fit(run)
    except Diverged as err:
        where = (f"the last good checkpoint, {run.last_checkpoint}, was not overwritten"
                 if run.last_checkpoint else "no checkpoint was written")
        if world.is_main:  # the metrics and weights it checked are the same on every rank
            print(f"aigc_fast.train: stopped: {err}; {where}; a lower --lr may help",
                  file=sys.stderr)
        return 1
    finally:
        if run.board is not None:
            run.board.close()
