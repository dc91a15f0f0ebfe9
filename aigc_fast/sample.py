"""``python -m aigc_fast.sample``: generate images from a trained checkpoint (see ``--help``).

The command lives in :mod:`aigc_fast.training.sample`; this module is its entry point.
"""
from .training.cli import run_main
from .training.sample import main

if __name__ == "__main__":
    run_main(main, prog="aigc_fast.sample")
