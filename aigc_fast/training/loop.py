"""The training loop: :func:`fit` runs a set-up :class:`~.run.Run` from its step to its total.

Each step trains G and D once (:func:`training_step`), updates the EMA of G and, at their
intervals, logs metrics, writes samples, evaluates SWD and writes checkpoints; Ctrl-C or SIGTERM
stops it at a step boundary with a checkpoint, and a failed write of a checkpoint or metrics.jsonl
ends it with one line (:class:`StopAgreement`). Under torchrun only rank 0 samples, evaluates,
writes and prints.
"""
import signal
import sys
import threading
import time

import torch
from tqdm import tqdm

from .backends import train_step
from .data import batch_stream, to_model_range
from .report import Meter, draw_curves, evaluate, format_rate, log_metrics, write_samples
from .run import write_checkpoint
from .step_graph import GraphedStep


STOP_CHECK_SECONDS = 1.0  # under torchrun: training time between the ranks' agreements to stop


class GracefulInterrupt:
    """Ctrl-C (SIGINT) and SIGTERM (a scheduler's preemption; torchrun stopping its workers) ask
    the loop to stop after the current step, with a checkpoint.

    The handler only records the signal: the step in progress is left to finish, and the loop
    checks :attr:`signal_number` between steps. A second Ctrl-C aborts at once; a second SIGTERM
    is ignored, so the checkpoint completes within the sender's grace period before its SIGKILL.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __enter__(self):
        self.signal_number = 0  # the first signal received, 0 for none
        self._previous = {}
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}
        return self

    def _handle(self, signum, frame):
        if signum == signal.SIGINT and self.signal_number:
            raise KeyboardInterrupt
        self.signal_number = self.signal_number or signum

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            # None: a handler not set from Python, which cannot be restored
            if previous is not None:
                signal.signal(signum, previous)


class StopAgreement:
    """Whether every rank stops after a step, and why: a signal (its number), a failed write.

    Alone: after every step (reading a flag costs nothing). Under torchrun the ranks must stop after
    the same step, also when a signal reached one rank only, without a collective and host sync
    every step: they agree with one small all-reduce (MAX) after every step that wrote the run's
    files (rank 0's write may have failed) and otherwise about every STOP_CHECK_SECONDS of training.
    The same all-reduce carries the slowest rank's seconds per step, from which every rank computes
    the same next step to agree at: a signal stops the job about a second later, whatever the
    step time and --log-every.
    """

    def __init__(self, world, step):
        self.world = world
        self.next_step, self.since_step, self.since = step, step, time.perf_counter()

    def __call__(self, step, signal_number, write_failed, wrote):
        """(signal number or 0, whether a write failed), the same on every rank, after ``step``;
        ``wrote``: whether this step wrote files (the same on every rank)."""
        if not self.world.enabled:
            return signal_number, write_failed
        if step < self.next_step and not wrote:
            return 0, False
        now, steps = time.perf_counter(), step - self.since_step
        signal_number, write_failed, seconds_per_step = self.world.max_over_ranks(
            [signal_number, float(write_failed), (now - self.since) / steps if steps else 0.0])
        self.next_step = step + self._interval(seconds_per_step)
        self.since_step, self.since = step, now
        return int(signal_number), bool(write_failed)

    @staticmethod
    def _interval(seconds_per_step):
        """Steps to the next agreement: about STOP_CHECK_SECONDS of training; 1 when unmeasured."""
        return max(1, int(STOP_CHECK_SECONDS / seconds_per_step)) if seconds_per_step else 1


def training_step(run):
    """``step(real, z, *labels)``: :func:`train_step` of the run's models and objective at step
    index ``run.step`` (``labels``: a conditional run's real and fake labels), captured in a CUDA
    graph (:mod:`.step_graph`) when ``cfg["cuda_graph"]``; its metrics are read before the next
    call (Meter.add stacks them on the device)."""
    p = run.model

    def step(real, z, *labels):
        return train_step(p.G_run, p.D_run, run.opt_g, run.opt_d, real, z, run.objective,
                          run.precision, step=run.step, D_penalty=p.D, labels=labels or None)

    return GraphedStep(step) if run.cfg["cuda_graph"] else step


def draw_fake_inputs(run):
    """This rank's rows of the step's global draw of G's inputs from ``run.noise``: the noise z
    and, for a conditional run, then the fake labels, uniform over the classes (None else). Every
    rank draws the whole global batch and keeps its own rows, so the draws (saved with the
    generator in checkpoints) are the same on every backend and for any number of processes."""
    c, world = run.cfg, run.world
    rows = world.world_size * c["batch_size"]
    z = world.shard(torch.randn(rows, c["nz"], device=run.device, generator=run.noise))
    if not c["num_classes"]:
        return z, None
    return z, world.shard(torch.randint(c["num_classes"], (rows,), device=run.device,
                                        generator=run.noise))


def fit(run):
    """Train from run.step to the configured total; returns the exit status: 0, 128 + the signal's
    number after Ctrl-C (130) or SIGTERM (143), 1 after a failed write of the run's files."""
    c = run.cfg
    total = c["steps"]
    stream = batch_stream(run.images, run.order, run.step, run.device, run.labels)
    meter, start_step, t_start = Meter(run.world), run.step, time.perf_counter()
    main_rank = run.world.is_main  # under torchrun only rank 0 samples, evaluates and prints
    eval_seconds = 0.0
    step = training_step(run)
    agree = StopAgreement(run.world, run.step)

    def seconds():
        return run.seconds_before + time.perf_counter() - t_start

    with GracefulInterrupt() as interrupt, tqdm(total=total, initial=run.step, unit="step",
                                                  dynamic_ncols=True, disable=not main_rank) as bar:
        if run.eval_every and run.step == 0 and main_rank:  # the untrained G: where SWD starts
            eval_seconds += evaluate(run, bar, meter)
        # set-up wrote config.json and may have failed to
        signal_number, failed = agree(run.step, interrupt.signal_number,
                                      run.write_failure is not None, wrote=True)
        while run.step < total and not (signal_number or failed):
            real, real_labels = next(stream)
            z, fake_labels = draw_fake_inputs(run)
            labels = () if fake_labels is None else (real_labels, fake_labels)
            meter.add(step(to_model_range(real), z, *labels))
            run.step += 1
            if run.ema is not None:
                run.ema.update(run.step)
            bar.update(1)
            end = run.step == total
            periodic = run.step % c["checkpoint_every"] == 0
            logged = end or periodic or run.step % c["log_every"] == 0
            evaluated = bool(run.eval_every) and (end or run.step % run.eval_every == 0)
            if logged:
                log_metrics(run, meter, bar, t_start)
            if main_rank and (end or run.step % c["sample_every"] == 0):
                write_samples(run)
            if main_rank and evaluated:
                eval_seconds += evaluate(run, bar, meter)
            if end or periodic:
                write_checkpoint(run, seconds(), periodic=periodic)
            signal_number, failed = agree(run.step, interrupt.signal_number,
                                          run.write_failure is not None, wrote=logged or evaluated)
        if signal_number and not failed:  # the checkpoint of the last completed step
            log_metrics(run, meter, bar, t_start)
            write_checkpoint(run, seconds())
            _, failed = agree(run.step, signal_number, run.write_failure is not None, wrote=True)
    if failed:
        if main_rank:
            print(f"aigc_fast.train: stopped: {run.write_failure}; {last_good_checkpoint(run)}",
                  file=sys.stderr)
        return 1
    if not main_rank:
        return 128 + signal_number if signal_number else 0
    print(draw_curves(run))
    if signal_number:
        path = run.last_checkpoint
        print(f"interrupted at step {run.step}/{total} ({signal.Signals(signal_number).name}); "
              f"checkpoint saved to {path}\n"
              f"resume with: python -m aigc_fast.train --resume {path}", file=sys.stderr)
        return 128 + signal_number
    elapsed = time.perf_counter() - t_start
    images = (run.step - start_step) * c["batch_size"] * run.world.world_size
    rate = images / (elapsed - eval_seconds)
    evals = f", {eval_seconds:.1f} s of it SWD evaluation" if eval_seconds else ""
    print(f"done: step {run.step}/{total}, {elapsed:.1f} s in this run{evals} ({format_rate(rate)} "
          f"images/s of training) | samples "
          f"{run.out / 'samples' / f'step_{run.step:06d}.png'} | checkpoint {run.last_checkpoint}")
    return 0


def last_good_checkpoint(run):
    """Where a stopped run can resume from, as the end of its one-line message."""
    if run.last_checkpoint is None:
        return "no checkpoint was written; nothing to resume"
    return (f"the last good checkpoint is {run.last_checkpoint} (step {run.last_checkpoint_step}); "
            f"resume with: python -m aigc_fast.train --resume {run.last_checkpoint}")
