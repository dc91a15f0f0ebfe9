"""Shared command-line error handling: bad input is one clear line on stderr and exit status 2.

A user who points a tool at a missing folder or a corrupt checkpoint needs to know which thing was
wrong and what was expected, not a traceback. Code raises :class:`UsageError` for such input;
:func:`run_main` turns it into that one line.
"""
import argparse
import sys
import textwrap
import warnings

import torch

from .. import __version__

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """Bad input from the user (a flag, a file, a folder): reported as one line, exit status 2."""


class HelpFormatter(argparse.HelpFormatter):
    """argparse's help, wrapped without breaking a flag such as --image-size at its hyphens."""

    def _split_lines(self, text, width):
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)

    def _fill_text(self, text, width, indent):
        return textwrap.fill(" ".join(text.split()), width, initial_indent=indent,
                             subsequent_indent=indent, break_on_hyphens=False)


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``prog: error: ...``), not the usage block, exit 2; and
    every command answers ``--version``."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=f"aigc_fast {__version__}")

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def positive_int(text):
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise ValueError(text)
    return value


def positive_float(text):
    """argparse type: a finite float > 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise ValueError(text)
    return value


positive_int.__name__ = "positive integer"  # argparse names the type in its error message
positive_float.__name__ = "positive number"


def device_name(text):
    """argparse type: ``auto`` or any string torch.device takes (cpu, cuda, cuda:1, mps, ...)."""
    if text != "auto":
        try:
            torch.device(text)
        except RuntimeError as err:  # argparse reports ValueError and TypeError only
            raise ValueError(text) from err
    return text


device_name.__name__ = "device (auto, cpu, cuda, cuda:N or another torch device)"


def add_device_argument(parser, what):
    """The ``--device`` flag of every command; ``what`` says what runs there."""
    parser.add_argument("--device", type=device_name, default="auto",
                        metavar="auto|cpu|cuda[:N]|...",
                        help=f"where to {what}: auto (cuda if available, else cpu) or any torch "
                             "device, e.g. cuda:1 (default auto)")


def resolve_device(name):
    """``auto`` or a torch device string -> torch.device; UsageError if that device is absent. A
    CUDA device becomes the current one: Triton launches its kernels on the current device."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA device is available; expected --device cpu "
                             "or auto")
        count = torch.cuda.device_count()
        if device.index is not None and device.index >= count:
            raise UsageError(f"--device {name}: this machine has {count} CUDA device(s); expected "
                             f"cuda:0 to cuda:{count - 1}")
        torch.cuda.set_device(device)
    else:
        try:
            torch.empty(0, device=device)
        except (RuntimeError, AssertionError) as err:
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise UsageError(f"--device {name}: cannot be used here ({reason}); expected auto, cpu "
                             "or an available device") from None
    return device


def run_main(main, argv=None, prog="aigc_fast"):
    """Run ``main(argv)`` and exit with its status; UsageError -> one stderr line + exit 2.

    Warnings print as one ``prog: warning: ...`` line too: a CLI user has no use for source lines.
    """
    previous_format = warnings.formatwarning  # restored: callers in-process (tests) keep theirs
    warnings.formatwarning = lambda message, *args, **kwargs: f"{prog}: warning: {message}\n"
    try:
        status = main(argv)
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        status = EXIT_USAGE
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        status = EXIT_INTERRUPTED
    finally:
        warnings.formatwarning = previous_format
    sys.exit(status or 0)
