"""Checkpoint files: atomic writes, safe loads, RNG state capture.

Checkpoints hold only tensors and plain Python values, so ``torch.load(path, weights_only=True)``
reads them without running pickled code. Every write goes to a temporary file in the same folder,
is fsync'ed and then renamed over the target: a crash or Ctrl-C mid-write leaves the previous file
intact, never a truncated one.
"""
import io
import os
import random
import tempfile

import numpy as np
import torch

from .cli import UsageError


def write_bytes_atomic(path, data):
    """Write ``data`` to ``path`` so readers see the old file or the new one, never a partial
    one."""
    path = os.fspath(path)
    folder = os.path.dirname(path) or "."
    fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    if hasattr(os, "O_DIRECTORY"):  # make the rename itself durable (POSIX)
        dir_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def checkpoint_bytes(state):
    """``state`` serialised as torch.save writes it: once, for last.pt and a periodic copy alike."""
    buffer = io.BytesIO()
    torch.save(state, buffer)
    return buffer.getvalue()


def load_weights_only(path, what, expected):
    """``torch.load(path, weights_only=True)`` on the CPU: a file that would need pickled code to
    load (or is no file, or is corrupt) is refused with a UsageError naming ``what`` and
    ``expected``, before anything else reads it."""
    if not os.path.isfile(path):
        raise UsageError(f"{what}: no such file; expected {expected}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated zip, foreign pickle, ...: the file is not usable
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{what}: cannot be read with weights_only=True ({reason[:200]}); "
                         f"expected {expected}")


def load_checkpoint(path, required=("G", "config")):
    """Load a checkpoint safely (weights_only); UsageError naming the file if it is not usable."""
    what = f"checkpoint {path}"
    state = load_weights_only(path, what, "a checkpoint .pt file written by aigc_fast.train")
    missing = [k for k in required if not isinstance(state, dict) or k not in state]
    if missing:
        raise UsageError(f"{what}: lacks {', '.join(missing)}; expected a checkpoint written by "
                         "aigc_fast.train")
    return state


def load_state_checked(module, state_dict, what):
    """``module.load_state_dict(strict=True)``, with mismatches reported as one UsageError line."""
    own = module.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    if missing or unexpected:
        raise UsageError(f"{what}: keys do not match the model built from the flags (missing "
                         f"{missing[:3]}, unexpected {unexpected[:3]})")
    for key, value in own.items():
        if tuple(state_dict[key].shape) != tuple(value.shape):
            raise UsageError(f"{what}: {key} has shape {tuple(state_dict[key].shape)}, but the "
                             f"flags build {tuple(value.shape)}; pass the flags the checkpoint was "
                             "trained with")
    module.load_state_dict(state_dict)


# --- random number generator states ---------------------------------------------------------------


def rng_states():
    """Every global RNG a training run touches (torch CPU and CUDA, numpy, random) as plain
    values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": [random.getstate()[0], list(random.getstate()[1]), random.getstate()[2]],
    }


def set_rng_states(states):
    """Restore what :func:`rng_states` captured (CUDA states only if this process has CUDA)."""
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
    n = states["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))
