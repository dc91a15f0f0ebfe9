"""Opt-in autotuning of the conv GEMM tiles (``AIGC_FAST_AUTOTUNE=1``): the first launch of each
shape times the tile rule's few candidates (tiles.conv_candidates) and every later launch of that
shape takes the fastest, for the rest of the process.

Off by default, and never needed to run well: the rule is what the GPU compile check builds and
the GEMM plan prints. Tuning answers, on a given GPU, whether the rule leaves speed behind; it
costs a few timed launches per shape, once. A trial must leave no trace, so the launch's
running-statistics state is restored after each; outputs are rewritten by the real launch. It
never runs while a CUDA graph is being captured (timing synchronises) nor on meta tensors.
"""
import os
import time

import torch
from triton.runtime.errors import OutOfResources
from triton.testing import do_bench

_FASTEST = {}  # launch key -> its fastest tile


def wanted(device: torch.device) -> bool:
    """Whether this launch is tuned: asked for, on a device that runs it, outside a capture."""
    if os.environ.get("AIGC_FAST_AUTOTUNE", "0") != "1" or device.type == "meta":
        return False
    return device.type != "cuda" or not torch.cuda.is_current_stream_capturing()


def _median_seconds(run, device):
    """A trial's time: Triton's benchmark on CUDA; a few wall-clock runs elsewhere (the
    interpreter, where the choice only exercises the mechanism)."""
    if device.type == "cuda":
        return do_bench(run, warmup=5, rep=20, return_mode="median") / 1e3
    times = []
    for _ in range(3):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return sorted(times)[1]


def fastest_tile(key, candidates, run_with, state, device):
    """The candidate tile under which ``run_with(tile)`` (one launch) is fastest, remembered under
    ``key``; ``state``: the tensors a launch updates in place (running statistics), restored after
    the trials. A candidate that fails to build (shared memory, registers) is left out."""
    if key in _FASTEST:
        return _FASTEST[key]
    saved = [t.clone() for t in state]
    times = {}
    for tile in candidates:
        try:
            times[tile] = _median_seconds(lambda: run_with(tile), device)
        except OutOfResources:
            continue
        finally:
            for tensor, value in zip(state, saved):
                tensor.copy_(value)
    _FASTEST[key] = min(times, key=times.get)
    return _FASTEST[key]


def forget():
    """Drop every remembered choice (tests; a process that changes GPU)."""
    _FASTEST.clear()
