"""What a run reports as it trains: metrics rows and the progress bar (:class:`Meter`,
:func:`log_metrics`), sample grids, SWD rows, curves and the start-up line; and what a failed write
of the run's files does (:func:`write_run_file`, :func:`write_optional`).
"""
import errno
import json
import math
import time
import warnings

import torch

from .. import __version__
from .cli import UsageError
from .curves import FILE_NAME as CURVES_FILE
from .curves import write_curves
from .ema import EMA_KEY
from .eval import Evaluator, FidelityEvaluator, real_source
from .sample import CLASS_COLUMNS, eval_mode, make_grid, save_png, to_uint8
from .variant import describe_variant

METRIC_KEYS = ("loss_d", "loss_g", "d_real", "d_fake")


def format_rate(per_second):
    """A throughput for people: whole numbers from 100 up, three significant digits below, so a
    slow run (Triton interpreted on a CPU: well under one image a second) does not print 0."""
    return f"{per_second:.0f}" if per_second >= 100 else f"{per_second:.3g}"


class Diverged(Exception):
    """A loss or weight became NaN/inf: the run stops and keeps its last good checkpoint."""


def describe_os_error(err):
    """``No space left on device, ENOSPC``: the cause of a failed write, for people and for
    search."""
    name = errno.errorcode.get(err.errno)
    return f"{err.strerror}, {name}" if err.strerror and name else str(err) or type(err).__name__


def write_run_file(run, path, write):
    """``write(path)`` for a file the run cannot go on without (a checkpoint, metrics.jsonl,
    config.json); True if it was written.

    A failure (a full disk, a quota) is not raised but kept as one line in ``run.write_failure``:
    under torchrun rank 0 alone writes, and every rank has to learn of it at the same step
    (:class:`~.loop.StopAgreement`) to stop together. From then on no such file is written, so none
    is left half-appended and the last good checkpoint stays the last one written.
    """
    if run.write_failure is not None:
        return False
    try:
        write(path)
    except OSError as err:
        run.write_failure = f"cannot write {path} ({describe_os_error(err)})"
        return False
    return True


def write_optional(run, kind, path, write):
    """``write(path)`` for a file training does not need (a sample grid, the curves): a failure
    warns once per ``kind`` and the run goes on (later writes are tried, silently)."""
    try:
        write(path)
    except OSError as err:
        warn_once(run, kind, f"cannot write {path} ({describe_os_error(err)}); training goes on "
                             f"without {kind} (said once)")


def warn_once(run, kind, message):
    if kind not in run.optional_failures:
        run.optional_failures.add(kind)
        warnings.warn(message, stacklevel=2)


def append_metrics_row(run, row):
    """One JSON line appended to metrics.jsonl (rank 0; see :func:`write_run_file`), and the
    row's scalars to the --tensorboard event files."""
    line = (json.dumps(row) + "\n").encode()
    write_run_file(run, run.out / "metrics.jsonl", lambda path: append_whole(path, line))
    if run.board is not None:
        run.board.add_row(row)


def append_whole(path, data):
    """Append ``data`` to ``path`` whole or not at all: a write that fails part-way (a full disk)
    is cut off again, so the file never ends in half a row that would stop a resume reading it."""
    with open(path, "ab", buffering=0) as f:  # unbuffered: every byte written is known
        start = f.tell()
        try:
            written = 0
            while written < len(data):
                written += f.write(data[written:])
        except OSError:
            f.truncate(start)
            raise


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
        append_metrics_row(run, row)
    bar.set_postfix_str(f"loss_d {means['loss_d']:.3f} loss_g {means['loss_g']:.3f} "
                        f"D(x) {means['d_real']:.2f} D(G(z)) {means['d_fake']:.2f} "
                        f"{format_rate(row['images_per_s'])} img/s", refresh=False)


def sampling_generator(run):
    """The generator samples and SWD come from: the moving average if --ema is on, else G."""
    return run.ema.module if run.ema is not None else run.model.G


@torch.no_grad()
def write_samples(run):
    """samples/step_NNNNNN.png from the fixed noise (and a conditional run's fixed labels: one
    row per class), G in eval mode (no state changes)."""
    path = run.out / "samples" / f"step_{run.step:06d}.png"
    labels = () if run.fixed_labels is None else (run.fixed_labels,)
    with eval_mode(sampling_generator(run)) as G:
        grid = make_grid(to_uint8(G(run.fixed_noise, *labels)), nrow=CLASS_COLUMNS if labels
                         else None)
    write_optional(run, "sample grids", path, lambda p: save_png(grid, p))
    if run.board is not None:
        run.board.add_grid("samples", grid, run.step)


def fidelity_evaluator(run):
    """FID and KID with --fid-weights, precision/recall with --prc-weights; None without both."""
    c = run.cfg
    metrics = ("fid", "kid") * bool(c["fid_weights"]) + ("prc",) * bool(c["prc_weights"])
    if not metrics:
        return None
    return FidelityEvaluator(run.images, c["eval_n"], metrics, real_source(c), c["fid_weights"],
                             c["prc_weights"], run.device)


def evaluate(run, bar, meter):
    """Append the SWD (and FID/KID/PR, with their weights) of the sampling generator, against a
    fixed real subset described at the first call, to metrics.jsonl; returns the seconds it
    took, which ``meter``'s images/s skips."""
    t0 = time.perf_counter()
    if run.evaluator is None:
        run.evaluator = Evaluator(run.images, run.cfg["eval_n"], run.device)
        run.fidelity = fidelity_evaluator(run)
        if run.evaluator.n < run.cfg["eval_n"]:
            bar.write(f"note: SWD uses n = {run.evaluator.n} images a side: --eval-n "
                      f"{run.cfg['eval_n']} capped at the data set's size")
    scores = run.evaluator(sampling_generator(run))
    fidelity = run.fidelity(sampling_generator(run)) if run.fidelity is not None else {}
    seconds = time.perf_counter() - t0
    row = {"step": run.step, "epoch": round(run.step / run.order.steps_per_epoch, 4), "swd": scores,
           "swd_n": run.evaluator.n, **fidelity,
           "generator": EMA_KEY if run.ema is not None else "G",
           "eval_seconds": round(seconds, 2)}
    append_metrics_row(run, row)
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
    except OSError as err:
        return f"warning: cannot write {run.out / CURVES_FILE} ({describe_os_error(err)})"


def start_line(run):
    c = run.cfg
    return (f"aigc_fast {__version__}: DCGAN {c['image_size']}px on {run.data_desc} | device "
            f"{run.device.type} | backend {c['backend']} ({run.backend_reason}) | precision "
            f"{c['precision']} ({run.precision_reason}) | cuda graph "
            f"{'on' if c['cuda_graph'] else 'off'} ({run.cuda_graph_reason}) | steps "
            f"{run.step}->{c['steps']} x {run.world.describe_batch(c['batch_size'])} | out "
            f"{run.out} | {describe_variant(c)}")
