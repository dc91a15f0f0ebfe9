"""Launches and bytes of one DCGAN training step, eager against fused, counted without a GPU.

Counting: one :class:`TorchDispatchMode` sees every aten op, inside our ``aigc_fast::`` operators
too; each op that computes (not a view, not an allocation) counts as one launch, and its bytes
are those of the unique tensors it reads and writes. Each Triton launch counts as one launch, its
bytes those of the unique tensors passed to it. Both are upper bounds of real traffic: a kernel
that reads only part of a tensor is charged all of it.
With ``execute=False`` the Triton kernels are counted but not run: the ops have no data-dependent
control flow, so the launches and bytes are the same, and on meta tensors (shapes, no data; the
fused ops are let through to their launchers) the full-size steps of both backends count in seconds.
The optimisers are Adam with ``foreach=True``, as PyTorch picks on CUDA.

    python -m benchmarks.step_traffic [--image-size 32] [--batch 64] [--width 64]
"""
import argparse
import collections
import contextlib
import functools

import torch
from torch._library import custom_ops
from torch.utils._python_dispatch import TorchDispatchMode

# ops that launch no device kernel: allocations, aliasing, the profiler's markers, dtype arithmetic
# (promote_types returns a dtype), and reading a CPU scalar (Adam's step count lives on the host
# unless capturable)
_NO_KERNEL = {"empty", "empty_strided", "empty_like", "new_empty", "lift_fresh", "set_", "detach",
              "_record_function_enter_new", "_record_function_exit", "_local_scalar_dense",
              "promote_types"}


def _tensors(tree):
    return [t for t in torch.utils._pytree.tree_leaves(tree) if isinstance(t, torch.Tensor)]


def _unique_bytes(tensors):
    """Bytes of the unique tensors (views of one buffer with the same extent count once; meta
    tensors, which have no addresses, are told apart by their storages)."""
    seen = {}
    for t in tensors:
        key = (t.untyped_storage()._cdata, t.storage_offset(), t.shape, t.stride(), t.dtype)
        seen[key] = t.numel() * t.element_size()
    return sum(seen.values())


def _computes(func, args, kwargs, out):
    """Whether an op writes memory: it mutates an input, or returns a tensor that aliases none of
    its inputs. Judged by the result, since the ops inside our operators arrive undecomposed (a
    ``contiguous`` or ``to`` that returns its input, or a copy)."""
    if func._schema.is_mutable:
        return True
    inputs = {t.untyped_storage()._cdata for t in _tensors((args, kwargs))}
    return any(t.untyped_storage()._cdata not in inputs for t in _tensors(out))


class AtenTraffic(TorchDispatchMode):
    """Counts the aten ops that compute (views and allocations excluded) and their bytes; those run
    inside :meth:`apart` (the optimiser steps) go to ``apart_ops`` / ``apart_bytes`` instead."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()
        self.bytes = collections.Counter()
        self.apart_ops = collections.Counter()
        self.apart_bytes = collections.Counter()
        self._apart = False

    @contextlib.contextmanager
    def apart(self):
        self._apart = True
        try:
            yield
        finally:
            self._apart = False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "aigc_fast":  # our operators: count the aten ops and launches inside
            implementation = custom_ops.OPDEFS[func._schema.name]._init_fn
            with self:
                return implementation(*args, **(kwargs or {}))
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in _NO_KERNEL and _computes(func, args, kwargs, out):
            ops, nbytes = (self.apart_ops,
                           self.apart_bytes) if self._apart else (self.ops, self.bytes)
            ops[name] += 1
            nbytes[name] += _unique_bytes(_tensors((args, kwargs)) + _tensors(out))
        return out


@contextlib.contextmanager
def triton_traffic(execute=True):
    """Counts Triton launches and their bytes (Counters by kernel name); ``execute=False`` skips
    running them."""
    from aigc_fast.kernels import bn_act

    kernel_class = type(bn_act._apply_kernel)  # JITFunction, or InterpretedFunction
    real_run = kernel_class.run
    found = {"launches": collections.Counter(), "bytes": collections.Counter()}

    def counting_run(self, *args, **kwargs):
        found["launches"][self.__name__] += 1
        found["bytes"][self.__name__] += _unique_bytes(_tensors((args, kwargs)))
        return real_run(self, *args, **kwargs) if execute else None

    kernel_class.run = counting_run
    try:
        yield found
    finally:
        kernel_class.run = real_run


@contextlib.contextmanager
def _launchers_take_meta(device):
    """Let the fused ops take meta tensors to their launchers (whose launches are only counted), as
    the GPU compile check does."""
    from aigc_fast.kernels import META_LAUNCHES

    before = META_LAUNCHES.enabled
    META_LAUNCHES.enabled = before or torch.device(device).type == "meta"
    try:
        yield
    finally:
        META_LAUNCHES.enabled = before


def step_traffic(backend, *, image_size=32, batch=64, nz=100, ngf=64, ndf=64, execute=False,
                 device="cpu", seed=0):
    """Launches and bytes of the second training step (the first initialises Adam's state) with
    ``backend`` "eager" (NCHW modules) or "fused": Counters of aten ops, Triton launches and the
    bytes of each (by name), and the totals."""
    from aigc_fast import functional, nn as fused_nn
    from aigc_fast.models import build_models
    from aigc_fast.train import train_step

    torch.manual_seed(seed)
    G, D = (m.to(device) for m in build_models(image_size, nz, ngf, ndf))
    loss_fn = torch.nn.functional.binary_cross_entropy_with_logits
    if backend == "fused":
        fused_nn.fuse(G)
        fused_nn.fuse(D)
        loss_fn = functional.bce_with_logits
    opts = [torch.optim.Adam(m.parameters(), lr=2e-4, betas=(0.5, 0.999), foreach=True)
            for m in (G, D)]
    # channels-last, as the trainer's batches are (data.to_model_range)
    real = torch.randn(batch, 3, image_size, image_size, device=device).contiguous(
        memory_format=torch.channels_last)
    z = torch.randn(batch, nz, device=device)
    with _launchers_take_meta(device):
        with triton_traffic(execute):
            train_step(G, D, *opts, real, z, loss_fn)
        with triton_traffic(execute) as triton_found, AtenTraffic() as aten, _apart(opts, aten):
            train_step(G, D, *opts, real, z, loss_fn)
        with triton_traffic(execute):
            saved = {"G": saved_bytes(lambda: G(z)), "D": saved_bytes(lambda: D(real))}
    launches = sum(aten.ops.values()) + sum(triton_found["launches"].values())
    nbytes = aten.bytes + triton_found["bytes"]
    return {"aten_ops": aten.ops, "triton_launches": triton_found["launches"], "launches": launches,
            "bytes_by_name": nbytes, "bytes": sum(nbytes.values()),
            "optimizer_launches": sum(aten.apart_ops.values()),
            "optimizer_bytes": sum(aten.apart_bytes.values()), "saved_bytes": saved}


@contextlib.contextmanager
def _apart(optimizers, aten):
    """Count the optimisers' steps apart from the model's work (the issue's "model only")."""
    real = [opt.step for opt in optimizers]

    def counted_apart(step):
        def run(*args, **kwargs):
            with aten.apart():
                return step(*args, **kwargs)
        return run

    for opt, step in zip(optimizers, real):
        opt.step = counted_apart(step)
    try:
        yield
    finally:
        for opt in optimizers:
            del opt.step  # back to the class's method


def saved_bytes(forward):
    """Bytes of the unique storages autograd saves for backward during one training forward
    (benchmarks.measure.saved_bytes, keyed by storage so that meta tensors count too). The
    parameters are among them, in both backends."""
    storages = {}

    def pack(t):
        storages[t.untyped_storage()._cdata] = (t, t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()  # noqa: F841 (alive until counted)
    return sum(nbytes for _, nbytes in storages.values())


def counted_for(case, provider):
    """A training step's counted launches, bytes and saved bytes beside its measured time, for the
    backend the provider runs: eager PyTorch, or our fused kernels (a CUDA graph replays the same
    launches); {} for other cases. Compiled providers run Inductor's kernels, not counted here."""
    from benchmarks.cases import TrainStepCase
    from benchmarks.providers import FUSED_IMPL

    if not isinstance(case, TrainStepCase) or case.autocast:
        return {}
    backend = ("fused" if provider in FUSED_IMPL
               else "eager" if provider.startswith("eager") else None)
    if backend is None:
        return {"counted_launches": None, "counted_by": "not counted: Inductor's own kernels"}
    n = case.network
    return counted(backend, case.image_size, case.batch, n.nz, n.ngf, n.ndf)


@functools.lru_cache(maxsize=None)
def counted(backend, image_size, batch, nz, ngf, ndf):
    """The counted proxies of one training step (model only) for the benchmark suite's extra_info:
    launches, bytes, the optimisers' launches apart, and the bytes G and D save for backward."""
    row = step_traffic(backend, image_size=image_size, batch=batch, nz=nz, ngf=ngf, ndf=ndf,
                       device="meta")
    return {"counted_launches": row["launches"], "counted_bytes": row["bytes"],
            "counted_optimizer_launches": row["optimizer_launches"],
            "counted_saved_bytes_G": row["saved_bytes"]["G"],
            "counted_saved_bytes_D": row["saved_bytes"]["D"],
            "counted_by": "benchmarks.step_traffic on meta tensors (model only; 132-SM split-K)"}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-size", type=int, default=32, choices=(32, 64))
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--width", type=int, default=64, help="ngf = ndf")
    parser.add_argument("--sms", type=int, default=132,
                        help="streaming multiprocessors the split-K factors fill (default: H100's "
                             "132)")
    args = parser.parse_args(argv)
    shape = dict(image_size=args.image_size, batch=args.batch, ngf=args.width, ndf=args.width,
                 device="meta")
    from aigc_fast.kernels import conv_gemm

    conv_gemm.multiprocessor_count = lambda device: args.sms
    rows = {backend: step_traffic(backend, **shape) for backend in ("eager", "fused")}
    eager = rows["eager"]
    print(f"one {args.image_size} px batch-{args.batch} step, ngf = ndf = {args.width}; model only "
          "(the optimisers' launches and bytes apart)")
    print("| backend | launches | MB moved | launches vs eager | bytes vs eager | optimiser "
          "launches | G saves MB | D saves MB | G saved vs eager | D saved vs eager |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for backend, row in rows.items():
        saved, eager_saved = row["saved_bytes"], eager["saved_bytes"]
        print(f"| {backend} | {row['launches']} | {row['bytes'] / 1e6:.1f} | "
              f"{row['launches'] / eager['launches']:.2f}x | {row['bytes'] / eager['bytes']:.2f}x "
              f"| {row['optimizer_launches']} | {saved['G'] / 1e6:.2f} | {saved['D'] / 1e6:.2f} | "
              f"{saved['G'] / eager_saved['G']:.2f}x | {saved['D'] / eager_saved['D']:.2f}x |")
    for backend, row in rows.items():
        print(f"{backend} aten ops: {dict(row['aten_ops'].most_common())}")
        if row["triton_launches"]:
            print(f"{backend} Triton launches: {dict(row['triton_launches'].most_common())}")
        print(f"{backend} MB by op: " + ", ".join(
            f"{name} {b / 1e6:.1f}" for name, b in row["bytes_by_name"].most_common(12)))


if __name__ == "__main__":
    main()
