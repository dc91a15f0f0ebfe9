"""``python -m aigc_fast.curves``: redraw a run folder's curves.png from its metrics.jsonl.

The command lives in :mod:`aigc_fast.training.curves`; this module is its entry point.
"""
from .training.cli import run_main
from .training.curves import main

if __name__ == "__main__":
    run_main(main, prog="aigc_fast.curves")
