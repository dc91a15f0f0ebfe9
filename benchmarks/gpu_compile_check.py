"""Compile every Triton launch of a fused training step for real GPUs, on a machine without one.

    python benchmarks/gpu_compile_check.py                    # sm_90, sm_80; all dtypes (see
    DTYPES)
    python benchmarks/gpu_compile_check.py --quick            # what the test suite runs: sm_90,
    fp32
    python benchmarks/gpu_compile_check.py --json rows.json   # also every row as JSON

It records the Triton launches of one fused training step (what ``--backend fused`` runs: D on
real and fake, G, both Adam updates) of the 32 px network at batch 64 and the 64 px network at
batch 512 (pytorch/examples' ngf = ndf = 64), of a step of each GAN variant (:data:`VARIANTS`:
hinge loss with spectral norm, wgan-gp, lazy R1 at a step where it is due, a class-conditional G
and D, 128 px at batch 64 and 256 px at batch 32), of the trainer's eval-mode G (samples, SWD)
and of both BCE losses on a batch large enough for their two-launch reduction, per dtype
(``amp-`` ones as ``--precision fp16|bf16`` trains, autocast emulated on the meta device) and per
target GPU (split-K factors follow its SM count), on meta tensors: shapes, no data, nothing
runs; fp32 steps twice, with tf32 products (``torch.backends.cudnn.allow_tf32``, PyTorch's default)
and with exact ones, since the tile rule (kernels/tiles.py) picks each launch's tile for its
products. A penalty's double backward launches none of our kernels (the fused ops' backward under
``create_graph`` is PyTorch's, aigc_fast.ops): its launches are D's forward on the images it
penalises. Then, with no interpreter, it compiles each distinct launch as recorded (its tile, warps
and stages), for each target, through Triton's launch path (``JITFunction.run(warmup=True)``), whose
launch-time checks run after the compile (Triton, 3.6 included, compares the globals a kernel used
with their compile-time values) and again on the cached path by a second call. ptxas, the one
Triton bundles, reports registers and spills.

It prints one row per compile (launch, kernel, dtype, products, config, arch, registers, spill
bytes, shared memory, tensor-core instruction, cp.async), a summary per kernel x dtype x arch, and
one line: ``compile check: N compiles, F failed, S spilling ... (triton X)``. It exits 1 on any
failure: a compile error, a launch-time check that raises, shared memory beyond the target's
per-block limit, registers x threads beyond the 64K registers of an SM, or a launch that spills (the
tile rule must pick only tiles that build spill-free).

It proves that this Triton builds every launch recorded here for those GPUs and that the builds fit;
other shapes give other integer specialisations (a value of 1, multiples of 16), which it has not
built. It does not time anything, check numerics on a GPU, or load a binary into a driver: only a
GPU can.
"""
import argparse
import collections
import contextlib
import importlib
import inspect
import io
import json
import os
import re
import sys
import tempfile
import time
from functools import partial
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]

# name: (compute capability, SM count of the GPU whose launches are recorded, opt-in shared memory
# per block in bytes): H100/H200 and A100.
ARCHS = {"sm_90": (90, 132, 232448), "sm_80": (80, 108, 166912)}
# dtype -> (the models' and inputs' dtype, the autocast dtype): fp16/bf16 models cast whole, and
# "amp-" ones as --precision fp16|bf16 trains: float32 weights and BN state, autocast around them.
DTYPES = {"fp32": (torch.float32, None), "fp16": (torch.float16, None),
          "bf16": (torch.bfloat16, None), "amp-fp16": (torch.float32, torch.float16),
          "amp-bf16": (torch.float32, torch.bfloat16)}
STEPS = ((32, 64), (64, 512))  # (image size, batch) of the default variant's step and eval G
# (label, image size, batch, the variant's config keys (aigc_fast.training.variant), classes): a
# step of each GAN variant, for the launches it adds to the default step's: spectral norm's
# weights (not channels-last), the critic without BatchNorm and its penalty's forward on the
# interpolates, R1's input gradient of D at the real images, the conditional G's 2 nz input
# channels and D's projection head (its trunk's last BN applied apart), the deeper networks.
VARIANTS = (("hinge + SN", 32, 64, {"loss": "hinge", "spectral_norm": True}, 0),
            ("wgan-gp", 32, 64, {"loss": "wgan-gp"}, 0),
            ("R1", 32, 64, {"r1": 10.0}, 0),
            ("conditional", 32, 64, {}, 10),
            ("", 128, 64, {}, 0),
            ("", 256, 32, {}, 0))
# logits for the losses: past one program (1024), so the partial sums get their own launch
LOSS_N = 4096


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="sm_90 and fp32 only (tf32 and ieee products): the test suite's form")
    p.add_argument("--archs", default=",".join(ARCHS),
                   help="comma-separated targets (default: all)")
    p.add_argument("--dtypes", default=",".join(DTYPES), help="comma-separated dtypes (default: "
                                                              "all)")
    p.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                   help="compiler processes (default: the CPUs this process may use)")
    p.add_argument("--json", type=Path, help="also write every row and the summary to this file")
    p.add_argument("--rows", choices=("all", "bad", "none"), default="all",
                   help="which per-compile rows to print (default all)")
    args = p.parse_args(argv)
    if args.quick:
        args.archs, args.dtypes = "sm_90", "fp32"
    args.archs, args.dtypes = args.archs.split(","), args.dtypes.split(",")
    for values, known, flag in ((args.archs, ARCHS, "--archs"), (args.dtypes, DTYPES, "--dtypes")):
        unknown = sorted(set(values) - set(known))
        if unknown:
            p.error(f"{flag}: unknown {unknown}; choose from {', '.join(known)}")
    return args


# --- a Triton driver that compiles for a named GPU and never runs anything -----------------------


def install_compile_only_driver():
    """Make Triton compile for ``ARCHS`` on a machine without a GPU: device index i stands for the
    i-th arch, so each arch gets its own binder and kernel cache, exactly as two GPUs would."""
    from triton.backends.compiler import GPUTarget
    from triton.backends.driver import DriverBase
    from triton.runtime.driver import driver

    class CompileOnlyDriver(DriverBase):
        device = 0

        @classmethod
        def is_active(cls):
            return False

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError("the compile check builds no launcher")

        def get_current_target(self):
            return GPUTarget("cuda", list(ARCHS.values())[self.device][0], 32)

        def get_current_device(self):
            return self.device

        def get_current_stream(self, device=None):
            return 0

        def get_active_torch_device(self):
            return torch.device("meta")

        def get_benchmarker(self):
            raise RuntimeError("the compile check times nothing")

    compile_only = CompileOnlyDriver()
    driver.set_active(compile_only)
    return compile_only


# --- recording -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pointer:
    """A tensor argument as Triton's binder sees it: a dtype and an address (for the 16-byte
    alignment it specialises on). Meta tensors' addresses are their byte offsets: allocations are
    aligned, views may not be."""

    dtype: torch.dtype
    address: int

    def data_ptr(self):
        return self.address


@dataclass
class Launch:
    """One distinct launch: the kernel (its module and name), its arguments, constexpr keywords."""

    module: str
    name: str
    args: tuple
    kwargs: dict
    dtype: str  # of the step that launched it
    arch: str
    seen_in: list = field(default_factory=list)

    def key(self):
        """What Triton specialises a compile on: pointer dtypes and alignment, integers that are 1
        or multiples of 16 and whether they need 64 bits, the constexprs (not the integers'
        values)."""
        def spec(a):
            if isinstance(a, Pointer):
                return ("ptr", a.dtype, a.address % 16 == 0)
            if isinstance(a, int) and not isinstance(a, bool):
                return ("int", a == 1, a % 16 == 0, -2**31 <= a < 2**31)
            return ("float",) if isinstance(a, float) else (type(a).__name__, repr(a))
        return (self.module, self.name, self.arch, tuple(map(spec, self.args)),
                tuple(sorted((k, repr(v)) for k, v in self.kwargs.items())))


def _unwrap(kernel, until):
    """The object under an Autotuner / Heuristics wrapper (``.fn`` chain) for which ``until``
    holds."""
    while not until(kernel):
        kernel = kernel.fn
    return kernel


@contextlib.contextmanager
def recording_launches(multiprocessors, autocast, capability=90):
    """Collect ``(kernel, args, kwargs, grid)`` of every Triton launch instead of running it, while
    our launchers take meta tensors for a GPU of ``multiprocessors`` SMs and compute
    ``capability`` (under ``autocast``'s dtype, or none) and every fused op is forced onto its
    Triton path (a silent fallback to the reference would leave its kernels unchecked)."""
    from triton.runtime.jit import JITFunction

    from aigc_fast.kernels import META_LAUNCHES

    launches = []

    def record(kernel, *args, grid, warmup, **kwargs):
        base = _unwrap(kernel, inspect.isfunction)
        launches.append((base.__module__, base.__name__, args, kwargs, grid))

    saved = (JITFunction.run, os.environ.get("AIGC_FAST_IMPL"))
    JITFunction.run = record
    META_LAUNCHES.enabled, META_LAUNCHES.multiprocessors = True, multiprocessors
    META_LAUNCHES.capability = capability
    META_LAUNCHES.autocast = autocast
    os.environ["AIGC_FAST_IMPL"] = "triton"
    try:
        yield launches
    finally:
        JITFunction.run = saved[0]
        META_LAUNCHES.enabled, META_LAUNCHES.autocast = False, None
        if saved[1] is None:
            del os.environ["AIGC_FAST_IMPL"]
        else:
            os.environ["AIGC_FAST_IMPL"] = saved[1]


def _as_recorded(value):
    if isinstance(value, torch.Tensor):
        return Pointer(value.dtype, value.data_ptr())
    return value


META = torch.device("meta")


def _training_step(image_size, batch, dtype, variant=None, num_classes=0):
    """What ``--backend fused`` runs for a step of ``variant`` (config keys; None: the default),
    built by the trainer's own pieces: the variant's checks and defaults, its models,
    prepare_backend's fusing, its objective (the penalty's weights drawn from the default
    generator), a channels-last batch as the trainer loads it, Adam; ``num_classes``: a
    conditional G and D (the library's, which the trainer's command line has no flag for), given
    labels. The step index is 0, where a lazy R1 is due."""
    from benchmarks.cases import DCGAN

    from aigc_fast.models import build_models
    from aigc_fast.training.backends import prepare_backend, train_step
    from aigc_fast.training.variant import VARIANT_DEFAULTS, build_objective, resolve_variant

    cfg = {**VARIANT_DEFAULTS, "d_norm": None, **(variant or {})}
    resolve_variant(cfg, world_size=1)
    with META:  # shapes only: the 256 px pair holds 93 M parameters
        G, D = build_models(image_size, DCGAN.nz, DCGAN.ngf, DCGAN.ndf, DCGAN.nc,
                            d_norm=cfg["d_norm"], spectral_norm=cfg["spectral_norm"],
                            num_classes=num_classes)
    model = prepare_backend("fused", G.to(dtype=dtype), D.to(dtype=dtype))
    opt_g, opt_d = (torch.optim.Adam(m.parameters()) for m in (model.G, model.D))
    real = torch.randn(batch, DCGAN.nc, image_size, image_size, device=META, dtype=dtype)
    z = torch.randn(batch, DCGAN.nz, device=META, dtype=dtype)
    labels = (torch.randint(num_classes, (batch,), device=META),) * 2 if num_classes else None
    train_step(model.G_run, model.D_run, opt_g, opt_d,
               real.contiguous(memory_format=torch.channels_last), z,
               build_objective(cfg, model.loss_fn, None), step=0, D_penalty=model.D,
               labels=labels)


def _sampling(image_size, batch, dtype):
    """Samples and SWD: the fused G (the trainer's EMA copy of it) in eval mode, without grad."""
    from benchmarks.cases import DCGAN

    import aigc_fast
    from aigc_fast.models import Generator

    G = aigc_fast.fuse(Generator(image_size, DCGAN.nz, DCGAN.ngf, DCGAN.nc).to(META, dtype)).eval()
    with torch.no_grad():
        G(torch.randn(batch, DCGAN.nz, device=META, dtype=dtype))


def _losses(n, dtype):
    """Both fused BCE losses, forward and backward, on more values than one program reduces."""
    from aigc_fast import functional

    logits = torch.randn(n, device=META, dtype=dtype, requires_grad=True)
    target = torch.rand(n, device=META, dtype=dtype)
    functional.bce_with_logits(logits, target).backward()
    functional.binary_cross_entropy(torch.sigmoid(logits), target).backward()


def _drop_ins(batch, dtype):
    """DCGAN-sized drop-in layers with a conv bias (chains of one whose epilogues add it), forward
    and backward in training and in eval."""
    from aigc_fast.nn import ConvBNAct, ConvTransposeBNReLU

    layers = [(ConvTransposeBNReLU(256, 128, 4, 2, 1), (batch, 256, 8, 8)),
              (ConvBNAct(128, 256, 4, 2, 1, negative_slope=0.2), (batch, 128, 16, 16))]
    for layer, shape in layers:
        layer.to(META, dtype)
        for training in (True, False):
            layer.train(training)
            x = torch.randn(shape, device=META, dtype=dtype, requires_grad=True)
            layer(x).sum().backward()


def workloads():
    """(label, call(dtype)) of everything recorded."""
    return ([(f"{s} px b{b} step", partial(_training_step, s, b)) for s, b in STEPS]
            + [(f"{s} px b{b} step" + (f" ({label})" if label else ""),
                partial(_training_step, s, b, variant=flags, num_classes=classes))
               for label, s, b, flags, classes in VARIANTS]
            + [(f"{s} px b{b} eval G", partial(_sampling, s, b)) for s, b in STEPS]
            + [(f"b{STEPS[0][1]} drop-in layers", partial(_drop_ins, STEPS[0][1]))]
            + [(f"BCE n={LOSS_N}", partial(_losses, LOSS_N))])


@contextlib.contextmanager
def _tf32(allowed):
    """PyTorch's tf32 switch for convolutions, which the kernels follow for float32 products."""
    saved = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32 = saved


def record_workload(call, arch, dtype, tf32=True):
    """The launches (:class:`Launch`, in launch order, repeats included) of one workload's
    ``call`` for ``arch`` in ``dtype``; fp32 with tf32 or exact products."""
    storage, autocast = DTYPES[dtype]
    with _tf32(tf32), recording_launches(ARCHS[arch][1], autocast, ARCHS[arch][0]) as launches:
        call(storage)
    return [Launch(module, name, tuple(map(_as_recorded, args)),
                   {k: _as_recorded(v) for k, v in kwargs.items()}, dtype, arch)
            for module, name, args, kwargs, _ in launches]


def record_launches(archs, dtypes):
    """The distinct launches of :func:`workloads` per (dtype, arch), in first-seen order; fp32 ones
    with tf32 and with exact products."""
    distinct = {}
    for arch in archs:
        for dtype in dtypes:
            for tf32 in ((True, False) if dtype == "fp32" else (True,)):
                for where, call in workloads():
                    for launch in record_workload(call, arch, dtype, tf32):
                        launch = distinct.setdefault(launch.key(), launch)
                        if where not in launch.seen_in:
                            launch.seen_in.append(where)
    return list(distinct.values())


# --- compiling -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    launch_id: str
    launch: Launch
    products: str  # "tf32" | "ieee" for float32 GEMMs, else ""


def _kernel(launch):
    return getattr(importlib.import_module(launch.module), launch.name)


def _products(launch):
    """A float32 GEMM's products as recorded: "ieee" (exact) or "tf32"; "" for other launches."""
    if launch.dtype != "fp32" or "DOT_PRECISION" not in launch.kwargs:
        return ""
    return "ieee" if launch.kwargs["DOT_PRECISION"] == "ieee" else "tf32"


def _config(kwargs):
    """The launch's tile, warps and stages, as a row shows them."""
    return ", ".join(f"{k}={v}" for k, v in kwargs.items()
                     if k.endswith(("BLOCK_M", "BLOCK_N", "BLOCK_K", "BLOCK_P", "BLOCK_C", "BLOCK"))
                     or k in ("num_warps", "num_stages"))


def plan_jobs(launches):
    return [Job(f"L{i:02d}", launch, _products(launch)) for i, launch in enumerate(launches, 1)]


_PTXAS = {"registers": re.compile(r"Used (\d+) registers"),
          "spill_stores": re.compile(r"(\d+) bytes spill stores"),
          "spill_loads": re.compile(r"(\d+) bytes spill loads")}


def _init_worker(cache_root):
    """Each compiler process: its own empty Triton cache under ``cache_root`` (so ptxas runs and
    logs every build), the project importable, the compile-only driver, ptxas's log on stdout."""
    os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(dir=cache_root)
    from benchmarks.gpu_report import prepare_imports
    prepare_imports()
    from triton import knobs

    knobs.nvidia.dump_ptxas_log = True
    global _DRIVER
    _DRIVER = install_compile_only_driver()


def compile_job(job):
    """One row: compile the job's launch for its arch, twice through the launch path."""
    from triton.runtime.jit import JITFunction

    launch = job.launch
    jit = _unwrap(_kernel(launch), lambda k: isinstance(k, JITFunction))
    _DRIVER.device = list(ARCHS).index(launch.arch)
    kwargs = launch.kwargs
    row = {"launch": job.launch_id, "kernel": launch.name, "dtype": launch.dtype,
           "products": job.products, "arch": launch.arch, "seen_in": launch.seen_in,
           "config": _config(kwargs), "error": ""}
    log = io.StringIO()
    started = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = jit.run(*launch.args, grid=(1,), warmup=True, **kwargs)
        jit.run(*launch.args, grid=(1,), warmup=True,
                **kwargs)  # cached: the launch-time checks again
    except Exception as e:  # noqa: BLE001 - every failure becomes its row
        lines = str(e).strip().splitlines() or [""]
        # a CompilationError's first line is the position, its last the cause
        where = f"{lines[0]} ... {lines[-1]}" if len(lines) > 1 else lines[0]
        row["error"] = f"{type(e).__name__}: {where[:400]}"
        return row
    row["seconds"] = round(time.perf_counter() - started, 2)
    usage = {k: rx.search(log.getvalue()) for k, rx in _PTXAS.items()}
    if not all(usage.values()):
        row["error"] = "no ptxas report for this build (was it taken from a cache?)"
        return row
    ptx = compiled.asm["ptx"]
    row.update({k: int(m.group(1)) for k, m in usage.items()})
    row["shared"] = compiled.metadata.shared
    row["tensor_cores"] = ("wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx
                           else "-")
    row["cp_async"] = "cp.async" in ptx
    limit = ARCHS[launch.arch][2]
    threads = 32 * compiled.metadata.num_warps
    if row["shared"] > limit:
        row["error"] = f"shared memory {row['shared']} B > {limit} B per block on {launch.arch}"
    elif row["registers"] * threads > 65536:
        row["error"] = f"{row['registers']} registers x {threads} threads > the 65536 of an SM"
    return row


def spills(row):
    return row.get("spill_stores", 0) + row.get("spill_loads", 0) > 0


# --- report --------------------------------------------------------------------------------------


def _row_line(r):
    head = f"| {r['launch']} | {r['kernel']} | {r['dtype']} {r['products']} | {r['config']} | " \
        f"{r['arch']} |"
    if r["error"]:
        return f"{head} FAILED: {r['error']} |"
    return (f"{head} {r['registers']} | {r['spill_stores']}/{r['spill_loads']} | {r['shared']} | "
            f"{r['tensor_cores']} | {'yes' if r['cp_async'] else 'no'} |")


def summarize(rows):
    """Per kernel x dtype x arch: compiles, failures, spilling configs, the worst spill, registers
    (min-max), tensor-core instructions, cp.async."""
    groups = collections.defaultdict(list)
    for r in rows:
        groups[(r["kernel"], r["dtype"], r["arch"])].append(r)
    out = []
    for (kernel, dtype, arch), rs in groups.items():
        ok = [r for r in rs if not r["error"]]
        out.append({
            "kernel": kernel, "dtype": dtype, "arch": arch, "compiles": len(rs),
            "failed": len(rs) - len(ok), "spilling": sum(map(spills, ok)),
            "worst_spill": max((r["spill_stores"] + r["spill_loads"] for r in ok), default=0),
            "registers": (f"{min(r['registers'] for r in ok)}-{max(r['registers'] for r in ok)}"
                          if ok else "-"),
            "tensor_cores": "/".join(sorted({r["tensor_cores"] for r in ok})) or "-",
            "cp_async": f"{sum(r['cp_async'] for r in ok)}/{len(ok)}"})
    return out


def main(argv=None):
    args = parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise SystemExit("gpu_compile_check: TRITON_INTERPRET=1 would interpret the kernels; the "
                         "check compiles them for real GPUs: run it without TRITON_INTERPRET")
    from benchmarks.gpu_report import prepare_imports
    prepare_imports()
    import triton

    started = time.monotonic()
    install_compile_only_driver()
    launches = record_launches(args.archs, args.dtypes)
    jobs = plan_jobs(launches)
    print(f"# GPU compile check: triton {triton.__version__}, torch {torch.__version__}; "
          f"{', '.join(args.archs)}; {', '.join(args.dtypes)}; "
          f"{', '.join(w for w, _ in workloads())}; {len(launches)} distinct launches, "
          f"{len(jobs)} compiles on {args.jobs} processes", flush=True)
    with tempfile.TemporaryDirectory(prefix="aigc_fast_compile_check_") as caches, \
            ProcessPoolExecutor(args.jobs, initializer=partial(_init_worker, caches)) as pool:
        rows = list(pool.map(compile_job, jobs, chunksize=1))
    if args.rows != "none":
        print("\n| launch | kernel | dtype | config | arch | registers | spill st/ld B | shared B "
              "| tensor cores | cp.async |\n|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            if args.rows == "all" or r["error"] or spills(r):
                print(_row_line(r))
    summary = summarize(rows)
    print("\n| kernel | dtype | arch | compiles | failed | spilling | worst spill B | registers | "
          "tensor cores | cp.async |\n|---|---|---|---|---|---|---|---|---|---|")
    for s in summary:
        print(f"| {s['kernel']} | {s['dtype']} | {s['arch']} | {s['compiles']} | {s['failed']} | "
              f"{s['spilling']} | {s['worst_spill']} | {s['registers']} | {s['tensor_cores']} | "
              f"{s['cp_async']} |")
    failed = sum(bool(r["error"]) for r in rows)
    spilling = sum(spills(r) for r in rows if not r["error"])
    line = (f"compile check: {len(rows)} compiles of {len(launches)} launches, {failed} failed, "
            f"{spilling} spilling ({', '.join(args.archs)}; {', '.join(args.dtypes)}; "
            f"triton {triton.__version__}) in {time.monotonic() - started:.0f} s")
    print(f"\n{line}", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"summary_line": line, "summary": summary, "rows": rows},
                                        indent=1, default=str))
    return 1 if failed or spilling else 0


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
