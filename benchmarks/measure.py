"""Timing, memory, saved-for-backward bytes, kernel launches and the environment of a measurement.

GPU timing: :func:`time_calls` (the report) records a pair of CUDA events around each call, queued
back to back, and synchronises once at the end, so the host's own launch overhead is included
whenever the GPU outruns it; the pytest suite times with pytest-benchmark's host clock around
:func:`synchronized` (the call, then ``torch.cuda.synchronize()``), which adds one sync latency per
call to every provider alike. Both run warm (inputs and weights stay in L2 where they fit, as they
do between a network's layers).
"""
import datetime
import os
import platform
import statistics
import time

import torch


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synchronized(fn, device):
    """``fn`` followed by a device sync, so a host clock around it times the GPU work too."""
    if device.type != "cuda":
        return fn

    def call():
        fn()
        torch.cuda.synchronize(device)

    return call


def time_calls(fn, device, max_time=0.25, min_reps=5, max_reps=1000):
    """Seconds per call of ``fn``: a short warm-up, then as many calls as fit in ``max_time``
    (at least ``min_reps``). CUDA events on a GPU, the host's perf_counter otherwise."""
    start = time.perf_counter()
    fn()
    sync(device)
    estimate = max(time.perf_counter() - start, 1e-6)
    reps = int(min(max_reps, max(min_reps, max_time / estimate)))
    if device.type != "cuda":
        times = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return times
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
              for _ in range(reps)]
    for begin, end in events:
        begin.record()
        fn()
        end.record()
    torch.cuda.synchronize(device)
    return [begin.elapsed_time(end) / 1e3 for begin, end in events]


def summary(times):
    """Median and the 20th/80th percentiles (the spread), in seconds."""
    ordered = sorted(times)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * len(ordered)))]  # noqa: E731
    return {"median_s": statistics.median(ordered), "p20_s": pick(0.2), "p80_s": pick(0.8),
            "min_s": ordered[0], "reps": len(ordered)}


def describe(case, provider, dtype):
    """The fields every result carries, in the pytest-benchmark JSON and the report alike."""
    cost = case.cost(itemsize=dtype.itemsize)
    return {"group": case.group, "case": case.name, "provider": provider, "shapes": case.shapes,
            "dtype": str(dtype).replace("torch.", ""), "flops": cost.flops, "min_bytes": cost.bytes}


def achieved(described, median_s):
    """TFLOP/s and GB/s of a workload (fields of :func:`describe`) done in ``median_s`` seconds."""
    return {"tflops": described["flops"] / median_s / 1e12,
            "gbps": described["min_bytes"] / median_s / 1e9}


def peak_memory(fn, device):
    """Peak bytes allocated by PyTorch during one call (CUDA only; None elsewhere)."""
    if device.type != "cuda":
        return None
    sync(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    sync(device)
    return torch.cuda.max_memory_allocated(device)


def saved_bytes(fn):
    """Bytes that autograd keeps for backward during one call: the unique storages handed to
    ``saved_tensors_hooks`` (a tensor saved twice, or views of one buffer, count once). The saved
    tensors are held until the count is done so that no storage address is reused meanwhile."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    storages = {}
    for t in saved:
        s = t.untyped_storage()
        storages[(s.device, s.data_ptr())] = s.nbytes()
    return sum(storages.values())


def kernel_launches(fn, device):
    """GPU kernels executed by one call, from torch.profiler (CUDA only; None elsewhere). A CUDA
    graph replay is one launch of many kernels: what is counted is the kernels that ran."""
    if device.type != "cuda":
        return None
    from torch.profiler import ProfilerActivity, profile

    sync(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    return sum(1 for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA
               and not e.name.startswith(("Memcpy", "Memset")))


def probes(fn, device):
    """Peak memory, saved bytes and kernel launches of one call each (untimed). A probe that fails
    costs its own figure (None, and ``<name>_error``), not the measurement."""
    found = {}
    for name, probe in (("peak_memory_bytes", lambda: peak_memory(fn, device)),
                        ("saved_bytes", lambda: saved_bytes(fn)),
                        ("kernel_launches", lambda: kernel_launches(fn, device))):
        try:
            found[name] = probe()
        except Exception as e:
            found[name], found[name + "_error"] = None, error_line(e)
    return found


def error_line(error):
    """An exception as one short line, for a table cell or a JSON field."""
    return (f"{type(error).__name__}: {error}".strip().splitlines() or [""])[0][:300]


def _cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device):
    """What a figure came from: device, software versions, precision switches, date."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"{_cpu_name()} ({torch.get_num_threads()} threads)"
    return {
        "device": name,
        "device_type": device.type,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "tf32_conv": torch.backends.cudnn.allow_tf32 if device.type == "cuda" else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32 if device.type == "cuda" else None,
        "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
