"""torch.compile(fullgraph=True) of fused models on the Triton path (AIGC_FAST_IMPL=triton; on a CPU
the kernels run interpreted): our ops are opaque operators (aigc_fast.ops), so Dynamo makes one
graph without breaks, AOTAutograd puts their backward operators in the compiled backward, and the
results equal the uncompiled model's. Tiny widths (ngf = ndf = 4, batch 2): compiling dominates the
time."""
import copy

import pytest
import torch

import aigc_fast
from aigc_fast import functional
from aigc_fast.models import Discriminator, Generator
from aigc_fast.train import train_step
from oracle import rel_err

RTOL = 1e-5  # norm-wise; eager and aot_eager run the same kernels in the same order (bitwise)

pytestmark = [pytest.mark.filterwarnings("ignore::RuntimeWarning"), pytest.mark.slow]


@pytest.fixture(autouse=True)
def triton_path(monkeypatch):
    monkeypatch.setenv("AIGC_FAST_IMPL", "triton")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def fused_models(device):
    torch.manual_seed(3)
    G = aigc_fast.fuse(Generator(32, nz=8, ngf=4)).to(device)
    D = aigc_fast.fuse(Discriminator(32, ndf=4)).to(device)
    return G, D


def inputs(name, device):
    shape = (2, 8, 1, 1) if name == "G" else (2, 3, 32, 32)
    return torch.randn(shape, device=device)


@pytest.mark.parametrize("backend", ["eager", "inductor"])  # aot_eager: the train-step test
def test_compiled_fused_models_match_uncompiled(backend, device):
    """Training forward and backward of fused G and D, twice (running stats advance): one graph
    each (fullgraph=True raises at any graph break), and outputs,
    input and parameter gradients and every buffer within RTOL of the uncompiled model. Inductor
    generates the surrounding PyTorch ops itself (C++ on a CPU), so its tanh and copies may round
    differently; eager and aot_eager are bitwise equal."""
    for name, model in zip("GD", fused_models(device)):
        reference = copy.deepcopy(model)
        compiled = torch.compile(model, backend=backend, fullgraph=True)
        for _ in range(2):
            x = inputs(name, device)
            x_a, x_b = x.clone().requires_grad_(), x.clone().requires_grad_()
            out_a, out_b = compiled(x_a), reference(x_b)
            grad = torch.randn_like(out_b)
            out_a.backward(grad)
            out_b.backward(grad)
            assert rel_err(out_a, out_b) <= RTOL, (name, "output")
            assert rel_err(x_a.grad, x_b.grad) <= RTOL, (name, "input gradient")
        for (key, p), q in zip(model.named_parameters(), reference.parameters()):
            assert rel_err(p.grad, q.grad) <= RTOL, (name, key)
        for (key, b), c in zip(model.named_buffers(), reference.buffers()):
            assert rel_err(b.float(), c.float()) <= RTOL, (name, key)
        counts = [int(b) for key, b in model.named_buffers() if key.endswith("num_batches_tracked")]
        assert counts and set(counts) == {2}, name


def test_train_step_with_compiled_fused_models(device):
    """The trainer's step with fullgraph-compiled fused G, D and loss: two steps (forward, backward
    through the compiled backward graphs, Adam) equal the uncompiled step. The step itself is not
    one graph: PyTorch 2.13 breaks the graph at Optimizer.zero_grad (marked skip), Tensor.backward
    and inside Optimizer.step (an explicit torch._dynamo.graph_break()); the CUDA graph of
    --cuda-graph captures the whole step instead."""
    G, D = fused_models(device)
    G_ref, D_ref = copy.deepcopy(G), copy.deepcopy(D)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.5, 0.999)) for m in (G, D)]
    opts_ref = [torch.optim.Adam(m.parameters(), lr=1e-3, betas=(0.5, 0.999))
                for m in (G_ref, D_ref)]
    compile_ = lambda f: torch.compile(f, backend="aot_eager", fullgraph=True)  # noqa: E731
    for _ in range(2):
        real, z = inputs("D", device), inputs("G", device)
        got = train_step(compile_(G), compile_(D), opts[0], opts[1], real, z,
                         compile_(functional.bce_with_logits))
        want = train_step(G_ref, D_ref, opts_ref[0], opts_ref[1], real, z,
                          functional.bce_with_logits)
        for key in want:
            assert rel_err(got[key], want[key]) <= RTOL, key
    for (key, p), q in zip([*G.named_parameters(), *D.named_parameters()],
                           [*G_ref.parameters(), *D_ref.parameters()]):
        assert rel_err(p, q) <= RTOL, key


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")  # our Python checks, traced
def test_jit_trace_of_a_fused_model(device):
    """torch.jit.trace records the chain as one graph node (its autograd Function, around our
    operator); the traced module reruns it: in eval, and in training with its backward."""
    G, _ = fused_models(device)
    z = inputs("G", device)
    with torch.no_grad():
        traced = torch.jit.trace(copy.deepcopy(G).eval(), z, check_trace=False)
        assert "^_ChainGrad" in str(traced.inlined_graph)
        assert rel_err(traced(z), copy.deepcopy(G).eval()(z)) == 0
    traced, reference = torch.jit.trace(copy.deepcopy(G), z, check_trace=False), copy.deepcopy(G)
    with torch.no_grad():
        reference(z)  # tracing ran one training forward: the same state on both sides
    assert "^_ChainGrad" in str(traced.inlined_graph)
    out, want = traced(z), reference(z)
    grad = torch.randn_like(want)
    out.backward(grad)
    want.backward(grad)
    assert rel_err(out, want) <= 1e-6
    for (key, p), q in zip(traced.named_parameters(), reference.parameters()):
        assert rel_err(p.grad, q.grad) <= 1e-5, key
