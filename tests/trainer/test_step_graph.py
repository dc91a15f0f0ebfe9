"""The training step in a CUDA graph (aigc_fast.training.step_graph, --cuda-graph). Capture needs
CUDA: the bitwise comparison of captured and uncaptured steps skips without it. On a CPU the rest
of what the capture relies on is tested: the fused step (Triton path) reads nothing back to the
host, GraphedStep copies every input (a conditional step's labels too) into the buffers a replay
reads, Adam's state follows the run's capturable setting across checkpoints, and --cuda-graph
resolves."""
import contextlib
import copy
from types import SimpleNamespace

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes

import aigc_fast
from aigc_fast import functional
from aigc_fast.training.cli import UsageError
from aigc_fast.models import Discriminator, Generator, build_models
from aigc_fast.training.step_graph import GraphedStep, set_capturable
from aigc_fast.train import train_step
from aigc_fast.training.run import resolve_cuda_graph

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")

# aten ops that read a tensor's value on the host (or need it for an output's shape)
HOST_READS = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default,
              torch.ops.aten.nonzero.default, torch.ops.aten.item.default}


class NoHostReads(TorchDispatchMode):
    """Fails at the first op that would synchronise a CUDA stream with the host to read a value."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            raise AssertionError(f"{func} reads a tensor on the host inside the step")
        return func(*args, **(kwargs or {}))


class Unwatched:
    """An optimiser whose zero_grad/step run outside the dispatch mode: PyTorch's Adam, captured as
    capturable=True on CUDA, which a CPU refuses (its non-capturable form reads the step count)."""

    def __init__(self, optimizer):
        self.optimizer = optimizer

    def zero_grad(self, set_to_none=True):
        self.optimizer.zero_grad(set_to_none=set_to_none)

    def step(self):
        with _disable_current_modes():
            self.optimizer.step()


def fused_pair(device):
    torch.manual_seed(5)
    return (aigc_fast.fuse(Generator(32, nz=8, ngf=4)).to(device),
            aigc_fast.fuse(Discriminator(32, ndf=4)).to(device))


def test_fused_step_reads_nothing_on_the_host(monkeypatch):
    """A fused step on the Triton path under a mode that fails on any host read: forwards, losses,
    backwards, BN bookkeeping, metrics (Adam, PyTorch's, runs outside the mode)."""
    monkeypatch.setenv("AIGC_FAST_IMPL", "triton")
    G, D = fused_pair("cpu")
    opts = [Unwatched(torch.optim.Adam(m.parameters(), lr=1e-3)) for m in (G, D)]
    with NoHostReads():
        metrics = train_step(G, D, *opts, torch.randn(2, 3, 32, 32), torch.randn(2, 8, 1, 1),
                             functional.bce_with_logits)
    assert all(torch.isfinite(v) for v in metrics.values())


def test_the_watch_catches_a_host_read():
    with pytest.raises(AssertionError, match="_local_scalar_dense"), NoHostReads():
        torch.ones(2).sum().item()


class _ReplayByRunning:
    """A CPU stand-in for torch.cuda.CUDAGraph: a replay runs ``graphed``'s step on its static
    inputs and writes the static outputs in place, as a replay of the recorded kernels would. A
    real capture records without running, and its first replay performs the captured call's
    step; here the capture ran it, so the first replay does nothing."""

    def __init__(self, graphed):
        self.graphed, self.replays = graphed, 0

    def replay(self):
        self.replays += 1
        if self.replays > 1:
            outputs = self.graphed.step(*self.graphed.static_inputs)
            for key, value in outputs.items():
                self.graphed.static_outputs[key].copy_(value)


def test_graphed_step_copies_every_input_into_its_buffers(monkeypatch):
    """A conditional step (real batch, noise, real and fake labels): one warm-up call, the
    capture, two replays, each call with fresh inputs; metrics and weights are bitwise those of
    the same calls uncaptured (labels left stale in the buffers would change them)."""
    torch.manual_seed(3)
    nets = build_models(16, nz=8, ngf=4, ndf=4, nc=3, num_classes=3)
    pairs = [nets, tuple(copy.deepcopy(m) for m in nets)]
    steps = []
    for G, D in pairs:
        opts = [torch.optim.Adam(m.parameters(), lr=1e-3) for m in (G, D)]

        def step(real, z, real_labels, fake_labels, G=G, D=D, opts=opts):
            return train_step(G, D, *opts, real, z, functional.bce_with_logits,
                              labels=(real_labels, fake_labels))

        steps.append(step)
    graphed = GraphedStep(steps[0])
    stream = SimpleNamespace(wait_stream=lambda other: None)
    monkeypatch.setattr(torch.cuda, "Stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: stream)
    monkeypatch.setattr(torch.cuda, "stream", lambda s: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "graph", lambda g: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: _ReplayByRunning(graphed))
    gen = torch.Generator().manual_seed(0)
    for call in range(4):
        inputs = (torch.rand(2, 3, 16, 16, generator=gen) * 2 - 1, torch.randn(2, 8, generator=gen),
                  torch.randint(3, (2,), generator=gen), torch.randint(3, (2,), generator=gen))
        got, want = graphed(*inputs), steps[1](*inputs)
        assert all(torch.equal(got[k], want[k]) for k in want), call
    assert graphed.graph.replays == 3 and len(graphed.static_inputs) == 4
    for a, b in zip(*pairs):
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), key


def test_set_capturable_follows_the_run_not_the_checkpoint():
    """A checkpoint from a captured CUDA run (capturable=True) resumes in an uncaptured run: its
    Adam steps like a fresh non-capturable one (unchanged, a CPU Adam refuses capturable state)."""
    torch.manual_seed(2)
    params = [torch.nn.Parameter(torch.randn(3, 4))]
    opt = torch.optim.Adam(params, lr=0.1)
    params[0].grad = torch.randn(3, 4)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    saved["param_groups"][0]["capturable"] = True
    twin = [torch.nn.Parameter(params[0].detach().clone())]
    resumed = torch.optim.Adam(twin, lr=0.1)
    resumed.load_state_dict(saved)
    assert resumed.param_groups[0]["capturable"]
    set_capturable(resumed, False)
    assert not resumed.param_groups[0]["capturable"]
    grad = torch.randn(3, 4)
    params[0].grad, twin[0].grad = grad, grad.clone()
    opt.step()
    resumed.step()
    assert torch.equal(params[0], twin[0])
    set_capturable(resumed, True)
    step = resumed.state[twin[0]]["step"]
    assert resumed.param_groups[0]["capturable"] and step.dtype == torch.float32
    assert step.device == twin[0].device


def test_resolve_cuda_graph():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert resolve_cuda_graph(None, "fused", cuda, "tf32", 1) == (True, "default for fused on CUDA")
    assert resolve_cuda_graph("on", "fused", cuda, "bf16", 1) == (True, "requested")
    assert resolve_cuda_graph("off", "fused", cuda, "tf32", 1) == (False, "--cuda-graph off")
    on, why = resolve_cuda_graph(None, "fused", cpu, "fp32", 1)
    assert not on and "CUDA graphs need a CUDA device" in why
    assert resolve_cuda_graph(None, "fused", cuda, "fp16", 1)[0] is False
    assert resolve_cuda_graph(None, "eager", cuda, "tf32", 1)[0] is False
    assert resolve_cuda_graph(None, "fused", cuda, "tf32", 2)[0] is False
    penalised = {"loss": "wgan-gp", "r1": 0.0, "augment": ""}
    on, why = resolve_cuda_graph(None, "fused", cuda, "tf32", 1, penalised)
    assert on is False and "double backward" in why
    with pytest.raises(UsageError, match="--cuda-graph on: fp16's gradient scaler"):
        resolve_cuda_graph("on", "fused", cuda, "fp16", 1)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="capturing a CUDA graph needs a CUDA device (none here)")
def test_captured_step_is_bitwise_the_uncaptured_step():
    """Five steps of the fused DCGAN, with capturable Adam: captured after one warm-up step and
    replayed, against the same steps uncaptured. Every parameter, buffer, Adam state and metric is
    bitwise equal."""
    G, D = fused_pair("cuda")
    pairs = [(G, D), tuple(copy.deepcopy(m) for m in (G, D))]
    runs = []
    for graphed, (g, d) in zip((True, False), pairs):
        opts = [torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.5, 0.999), capturable=True)
                for m in (g, d)]

        def step(real, z, g=g, d=d, opts=opts):
            return train_step(g, d, *opts, real, z, functional.bce_with_logits)

        run = GraphedStep(step) if graphed else step
        gen = torch.Generator("cuda").manual_seed(0)
        metrics = []
        for _ in range(5):
            real = torch.rand(4, 3, 32, 32, device="cuda", generator=gen) * 2 - 1
            z = torch.randn(4, 8, 1, 1, device="cuda", generator=gen)
            metrics.append(torch.stack(list(run(real, z).values())))
        runs.append((torch.stack(metrics), opts))
        if graphed:
            assert run.graph is not None
    assert torch.equal(runs[0][0], runs[1][0])
    for a, b in zip(pairs[0], pairs[1]):
        for (key, x), y in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(x, y), key
    for opt_a, opt_b in zip(runs[0][1], runs[1][1]):
        for sa, sb in zip(opt_a.state.values(), opt_b.state.values()):
            assert all(torch.equal(sa[k], sb[k]) for k in sa)
