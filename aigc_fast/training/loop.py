"""The training loop: :func:`fit` runs a set-up :class:`~.run.Run` from its step to its total.

Each step trains G and D once (:func:`training_step`), updates the EMA of G and, at their
intervals, logs metrics, writes samples, evaluates SWD and writes checkpoints; Ctrl-C stops it at
the next step boundary with a checkpoint. Under torchrun only rank 0 samples, evaluates and prints.
"""
import signal
import sys
import threading
import time

import torch
from tqdm import tqdm

from .backends import train_step
from .cli import EXIT_INTERRUPTED
from .data import batch_stream, to_model_range
from .report import Meter, draw_curves, evaluate, format_rate, log_metrics, write_samples
from .run import write_checkpoint
from .step_graph import GraphedStep


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


def training_step(run):
    """``step(real, z)``: :func:`train_step` of the run's models and objective at step index
    ``run.step``, captured in a CUDA graph (:mod:`.step_graph`) when ``cfg["cuda_graph"]``; its
    metrics are read before the next call (Meter.add stacks them on the device)."""
    p = run.model

    def step(real, z):
        return train_step(p.G_run, p.D_run, run.opt_g, run.opt_d, real, z, run.objective,
                          run.precision, step=run.step, D_penalty=p.D)

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
    images = (run.step - start_step) * c["batch_size"] * run.world.world_size
    rate = images / (elapsed - eval_seconds)
    evals = f", {eval_seconds:.1f} s of it SWD evaluation" if eval_seconds else ""
    print(f"done: step {run.step}/{total}, {elapsed:.1f} s in this run{evals} ({format_rate(rate)} "
          f"images/s of training) | samples "
          f"{run.out / 'samples' / f'step_{run.step:06d}.png'} | checkpoint {run.last_checkpoint}")
    return 0
