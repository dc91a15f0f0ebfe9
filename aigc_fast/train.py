"""``python -m aigc_fast.train``: train a DCGAN (see ``--help``).

The trainer lives in :mod:`aigc_fast.training` (:mod:`~aigc_fast.training.train`: the command);
this module is its entry point and keeps the public names ``main``, ``train_step`` (one GAN step)
and ``prepare_backend``.
"""
from .training.backends import BACKENDS, prepare_backend, resolve_backend, train_step
from .training.cli import run_main
from .training.train import main

__all__ = ["BACKENDS", "main", "prepare_backend", "resolve_backend", "train_step"]

if __name__ == "__main__":
    run_main(main, prog="aigc_fast.train")
