"""curves.png of a run folder: losses, D outputs and SWD against step.

``python -m aigc_fast.curves RUN_DIR`` draws it on demand; the trainer draws it at the end of a
run. It is drawn from metrics.jsonl alone, so it can be redrawn at any time, also while a run goes
on. matplotlib is an optional extra (``pip install 'aigc_fast[plot]'``); without it the trainer
says so in one line and does everything else.
"""
import importlib.util
import io
import json
from pathlib import Path

from .checkpoint import write_bytes_atomic
from .cli import ArgumentParser, UsageError

INSTALL_HINT = "pip install 'aigc_fast[plot]'"
FILE_NAME = "curves.png"


def read_metrics(path):
    """(training rows, evaluation rows) of a metrics.jsonl, each sorted by step."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    train = sorted((r for r in rows if "loss_d" in r), key=lambda r: r["step"])
    evals = sorted((r for r in rows if "swd" in r), key=lambda r: r["step"])
    return train, evals


def _series(rows, key):
    return [r["step"] for r in rows], [r[key] for r in rows]


def draw(train, evals, title=""):
    """A matplotlib Figure of the three panels (no pyplot: no global state, no display needed)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 8.5), layout="constrained")
    losses, outputs, scores = fig.subplots(3, 1, sharex=True)
    for key, label in (("loss_d", "D loss"), ("loss_g", "G loss")):
        losses.plot(*_series(train, key), label=label)
    for key, label in (("d_real", "D(x), real"), ("d_fake", "D(G(z)), fake")):
        outputs.plot(*_series(train, key), label=label)
    outputs.set_ylim(0, 1)
    levels = [k for k in (evals[0]["swd"] if evals else {}) if k != "mean"]
    for level in levels:
        scores.plot([r["step"] for r in evals], [r["swd"][level] for r in evals], marker=".",
                    linewidth=1, alpha=0.6, label=f"{level} px")
    if evals:
        scores.plot([r["step"] for r in evals], [r["swd"]["mean"] for r in evals], marker="o",
                    linewidth=2, color="black", label="mean")
        generator = evals[-1].get("generator", "G")
        scores.set_title(f"SWD x1e3 of {generator}, n = {evals[-1].get('swd_n', '?')} (lower is "
                         "better)",
                         fontsize="medium")
        scores.set_ylim(bottom=0)
    else:
        scores.text(0.5, 0.5, "no SWD evaluations (--eval-every 0)", ha="center", va="center",
                    transform=scores.transAxes)
    for ax, ylabel in ((losses, "loss"), (outputs, "mean sigmoid(D)"), (scores, "SWD")):
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    scores.set_xlabel("step")
    fig.suptitle(title)
    return fig


def write_curves(run_dir, out=None):
    """Draw RUN_DIR/metrics.jsonl into ``out`` (default RUN_DIR/curves.png); returns the path.

    UsageError if matplotlib is not installed (saying how to get it) or there is nothing to draw.
    """
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.is_file():
        raise UsageError(f"{run_dir}: has no metrics.jsonl; expected a run folder written by "
                         "aigc_fast.train")
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"{FILE_NAME} needs matplotlib, which is not installed: "
                                f"{INSTALL_HINT}, then python -m aigc_fast.curves {run_dir}")
    train, evals = read_metrics(metrics)
    if not train and not evals:
        raise UsageError(f"{metrics}: holds no rows yet; expected at least one logged step")
    buffer = io.BytesIO()
    draw(train, evals, title=str(run_dir)).savefig(buffer, format="png", dpi=100)
    out = Path(out) if out else run_dir / FILE_NAME
    write_bytes_atomic(out, buffer.getvalue())
    return out


def build_parser():
    p = ArgumentParser(prog="python -m aigc_fast.curves",
                       description=f"Draw {FILE_NAME} (losses, D outputs and SWD against step) "
                                   "from a run folder's metrics.jsonl. Needs matplotlib: "
                                   f"{INSTALL_HINT}.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a run folder (e.g. runs/001)")
    p.add_argument("--out", metavar="FILE.png",
                   help=f"where to write (default RUN_DIR/{FILE_NAME})")
    return p


def main(argv=None):
    args = build_parser().parse_args(argv)
    print(f"wrote {write_curves(args.run_dir, args.out)}")
    return 0
