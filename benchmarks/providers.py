"""The implementations measured side by side, built on fresh random data and warmed up.

- ``eager``: PyTorch modules and functions, NCHW.
- ``eager-channels_last``: the same with modules and inputs in channels_last (NHWC) memory format.
- ``compile``: ``torch.compile`` (default mode; static shapes, whole graph) of the same modules.
- ``compile-reduce-overhead``: ``torch.compile(mode="reduce-overhead")`` (CUDA graphs), CUDA only.
- ``fused``: our Triton kernels (:mod:`aigc_fast.functional`, :func:`aigc_fast.fuse`), CUDA only.
- ``fused-graph``: the fused training step captured in one CUDA graph and replayed, as
  ``--cuda-graph on`` trains (:mod:`aigc_fast.training.step_graph`; capturable Adam; each call
  copies the batch and the noise into the graph's static inputs), CUDA only; the whole step at
  32 px b64 and 64 px b512 only (:data:`GRAPH_STEPS`).
- ``fused[ref]``: the fused ops' plain-PyTorch reference path: what ``aigc_fast`` runs on a CPU.
- ``fused[interpret]``: our Triton kernels under Triton's CPU interpreter (TRITON_INTERPRET=1):
  a sanity check at tiny sizes, its times mean nothing.
:func:`build` returns the call to time; compiling and autotuning happen in its warm-up.
"""
import contextlib
import functools
import os
import zlib
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

import aigc_fast
from aigc_fast import functional
from aigc_fast.kernels import interpreting
from aigc_fast.models import build_models, dcgan_init_
from aigc_fast.training.precision import Precision
from aigc_fast.training.step_graph import GraphedStep
from aigc_fast.train import train_step

from .cases import (CPU_BATCHES, CUDA_AUTOCAST_STEPS, CUDA_BATCHES, IMAGE_SIZES, BCECase,
                    ConvTransposeBNReLUCase, TrainStepCase, case_id, cases, tiny_cases)

CUDA_PROVIDERS = ("eager", "eager-channels_last", "compile", "compile-reduce-overhead", "fused",
                  "fused-graph")
CPU_PROVIDERS = ("eager", "eager-channels_last", "compile", "fused[ref]")
INTERPRET_PROVIDERS = ("eager", "eager-channels_last", "compile", "fused[interpret]")
ALL = ("eager", "eager-channels_last", "compile", "compile-reduce-overhead", "fused", "fused-graph",
       "fused[ref]", "fused[interpret]")
FUSED_IMPL = {"fused": "triton", "fused-graph": "triton", "fused[ref]": "ref",
              "fused[interpret]": "triton"}
# (image size, batch) of the training steps fused-graph measures: the launch-bound small end and the
# large end of the CUDA rows
GRAPH_STEPS = ((32, 64), (64, 512))
# Untimed calls after building: compile and autotune happen in the first; reduce-overhead records
# its CUDA graphs on a later one. A CPU has no graphs to record and its steps are slow.
WARMUP_CALLS = {"cuda": 3, "cpu": 1}


def default_device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def pair_id(case, provider):
    """A readable pytest id, ``<group>-<case>-<provider>``, in characters that ``-k`` accepts."""
    text = f"{case_id(case)}-{provider}".replace(" | ", "-").replace("->", "-to-").replace("=", "")
    return text.replace(" ", "_")


def applies(case, provider):
    """channels_last means nothing for the loss's 1-D logits; the interpreter cannot run bfloat16
    convolutions (numpy has no bfloat16 dot); fused-graph is a whole step at GRAPH_STEPS' sizes."""
    if provider == "fused-graph":
        return isinstance(case, TrainStepCase) and (case.image_size, case.batch) in GRAPH_STEPS
    return not ((isinstance(case, BCECase) and provider == "eager-channels_last")
                or (isinstance(case, TrainStepCase) and case.autocast
                    and provider == "fused[interpret]"))


def plan(device, dry_run=False):
    """``[(case, provider)]`` to measure on ``device``: on CUDA every case at batch 64, 256, 512 for
    every CUDA provider (and the training step under bf16 autocast at 32 px b64 and 64 px b512);
    on a CPU one small batch with the CPU providers (the steps under bf16 autocast too), plus the
    interpreter's tiny sanity sizes (eager beside fused[interpret]); a dry run: only the tiny sizes,
    all providers."""
    if device.type == "cuda":
        pairs = [(c, p) for c in cases(CUDA_BATCHES, CUDA_AUTOCAST_STEPS) for p in CUDA_PROVIDERS]
    elif dry_run:
        pairs = [(c, p) for c in tiny_cases() for p in INTERPRET_PROVIDERS]
    else:
        cpu_autocast = [(s, b) for b in CPU_BATCHES for s in IMAGE_SIZES]
        pairs = ([(c, p) for c in cases(CPU_BATCHES, cpu_autocast) for p in CPU_PROVIDERS]
                 + [(c, p) for c in tiny_cases() for p in ("eager", "fused[interpret]")])
    return [(c, p) for c, p in pairs if applies(c, p)]


@dataclass
class Workload:
    run: Callable[[], object]  # one call to time
    notes: dict  # what a reader needs to interpret the figure (the impl that ran, CUDA-graph skips)


def build(case, provider, device, dtype=torch.float32):
    """The warmed-up call of ``case`` through ``provider``, on inputs drawn fresh for this pair."""
    if provider == "fused":
        _require(device.type == "cuda", "fused runs our Triton kernels on CUDA")
    if provider == "fused-graph":
        _require(device.type == "cuda", "fused-graph replays the fused step in a CUDA graph: CUDA "
                                        "only")
    if provider == "fused[interpret]":
        _require(device.type == "cpu" and interpreting(),
                 "fused[interpret] needs CPU tensors and TRITON_INTERPRET=1 set before triton is "
                 "imported")
    if provider.startswith("compile"):
        # compile afresh per case: no recompile limit, no dynamic-shape carry-over
        torch._dynamo.reset()
    torch.manual_seed(zlib.crc32(f"{case}|{provider}".encode()))
    builder = {ConvTransposeBNReLUCase: _conv_transpose_bn_relu, BCECase: _bce,
               TrainStepCase: _train_step}[type(case)]
    run = builder(case, provider, device, dtype)
    notes = {}
    if provider in FUSED_IMPL:
        notes["impl"] = FUSED_IMPL[provider]
        run = _forcing_impl(FUSED_IMPL[provider], run)
    if provider == "compile-reduce-overhead":
        run = _marking_cudagraph_steps(run)
        skips_before = _cudagraph_skips()
    for _ in range(WARMUP_CALLS[device.type]):
        run()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    if provider == "compile-reduce-overhead":
        notes["cudagraph_skips"] = _cudagraph_skips() - skips_before
    return Workload(run, notes)


def _cudagraph_skips():
    """Graphs that inductor left out of CUDA graphs (e.g. for mutated inputs): then
    reduce-overhead runs like default mode for them."""
    from torch._dynamo.utils import counters

    return counters["inductor"]["cudagraph_skips"]


def _require(condition, why):
    if not condition:
        raise RuntimeError(why)


def _compile(fn, provider):
    mode = "reduce-overhead" if provider == "compile-reduce-overhead" else None
    return torch.compile(fn, mode=mode, fullgraph=True, dynamic=False)


def _marking_cudagraph_steps(run):
    """Tell CUDA-graph trees that each call starts a new iteration (outputs of the last may go)."""
    def call():
        torch.compiler.cudagraph_mark_step_begin()
        return run()

    return call


def _memory_format(provider):
    return torch.channels_last if provider == "eager-channels_last" else torch.contiguous_format


def _conv_transpose_bn_relu(case, provider, device, dtype):
    block = nn.Sequential(
        nn.ConvTranspose2d(case.c_in, case.c_out, case.kernel, case.stride, case.padding,
                           case.output_padding, bias=False),
        nn.BatchNorm2d(case.c_out), nn.ReLU())
    dcgan_init_(block)
    fmt = _memory_format(provider)
    block.to(device=device, dtype=dtype, memory_format=fmt)
    conv, bn = block[0], block[1]
    x = torch.randn(case.shapes["x"], device=device, dtype=dtype).contiguous(memory_format=fmt)
    x.requires_grad_(True)
    grad_out = torch.randn(case.shapes["out"], device=device,
                           dtype=dtype).contiguous(memory_format=fmt)
    if provider in FUSED_IMPL:
        forward = functools.partial(
            functional.conv_transpose_bn_relu, weight=conv.weight, bn_weight=bn.weight,
            bn_bias=bn.bias, running_mean=bn.running_mean, running_var=bn.running_var,
            stride=conv.stride, padding=conv.padding, output_padding=conv.output_padding,
            training=True, momentum=bn.momentum, eps=bn.eps, impl=FUSED_IMPL[provider])
    elif provider.startswith("compile"):
        forward = _compile(block, provider)
    else:
        forward = block
    if not case.backward:
        return lambda: forward(x)
    inputs = (x, conv.weight, bn.weight, bn.bias)
    return lambda: torch.autograd.grad(forward(x), inputs, grad_out)


def _bce(case, provider, device, dtype):
    logits = (4 * torch.randn(case.batch, device=device, dtype=dtype)).requires_grad_(True)
    target = torch.rand(case.batch, device=device, dtype=dtype)
    if provider in FUSED_IMPL:
        loss_fn = functools.partial(functional.bce_with_logits, impl=FUSED_IMPL[provider])
    elif provider.startswith("compile"):
        loss_fn = _compile(F.binary_cross_entropy_with_logits, provider)
    else:
        loss_fn = F.binary_cross_entropy_with_logits
    return lambda: torch.autograd.grad(loss_fn(logits, target), (logits,))


def _train_step(case, provider, device, dtype):
    n = case.network
    G, D = build_models(case.image_size, n.nz, n.ngf, n.ndf, n.nc)
    fmt = _memory_format(provider)
    G.to(device=device, dtype=dtype, memory_format=fmt)
    D.to(device=device, dtype=dtype, memory_format=fmt)
    adam = dict(lr=2e-4, betas=(0.5, 0.999), capturable=provider == "fused-graph")
    opt_g, opt_d = torch.optim.Adam(G.parameters(),
                                    **adam), torch.optim.Adam(D.parameters(), **adam)
    real = (torch.rand(case.shapes["real"], device=device, dtype=dtype) * 2 - 1).contiguous(
        memory_format=fmt)
    z = torch.randn(case.shapes["z"], device=device, dtype=dtype)
    loss_fn = F.binary_cross_entropy_with_logits
    if provider in FUSED_IMPL:  # fused modules run impl="auto": build() forces the provider's impl
        G, D = aigc_fast.fuse(G), aigc_fast.fuse(D)
        loss_fn = functools.partial(functional.bce_with_logits, impl=FUSED_IMPL[provider])
    elif provider.startswith("compile"):
        G, D = _compile(G, provider), _compile(D, provider)
    precision = Precision(case.autocast or "fp32", device)  # "fp32": no autocast, no scaler
    if provider == "fused-graph":  # captured at the second warm-up call
        graphed = GraphedStep(lambda real, z: train_step(G, D, opt_g, opt_d, real, z, loss_fn,
                                                         precision))
        return lambda: graphed(real, z)
    return lambda: train_step(G, D, opt_g, opt_d, real, z, loss_fn, precision)


def _forcing_impl(impl, fn):
    """``fn`` under ``AIGC_FAST_IMPL=impl``, the documented override of impl="auto", which is what
    fused modules run: so fused[ref] never drifts into the interpreter when TRITON_INTERPRET=1."""
    def call():
        with _environ("AIGC_FAST_IMPL", impl):
            return fn()

    return call


@contextlib.contextmanager
def _environ(name, value):
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            del os.environ[name]
        else:
            os.environ[name] = before
