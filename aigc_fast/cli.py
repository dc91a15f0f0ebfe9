"""Shared command-line error handling: bad input is one clear line on stderr and exit status 2.

A user who points a tool at a missing folder or a corrupt checkpoint needs to know which thing was
wrong and what was expected, not a traceback. Code raises :class:`UsageError` for such input;
:func:`run_main` turns it into that one line.
"""
import argparse
import sys
import warnings

import torch

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class UsageError(ValueError):
    """Bad input from the user (a flag, a file, a folder): reported as one line, exit status 2."""


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line (``prog: error: ...``), not the usage block, exit 2."""

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


def resolve_device(name):
    """``auto|cpu|cuda`` -> torch.device; UsageError if CUDA is asked for but absent."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available; expected --device cpu or auto")
    return torch.device(name)


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
