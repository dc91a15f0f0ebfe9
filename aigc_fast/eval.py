"""``python -m aigc_fast.eval``: score a checkpoint's generator by SWD to real images.

The command lives in :mod:`aigc_fast.training.eval`; this module is its entry point.
"""
from .training.cli import run_main
from .training.eval import main

if __name__ == "__main__":
    run_main(main, prog="aigc_fast.eval")
