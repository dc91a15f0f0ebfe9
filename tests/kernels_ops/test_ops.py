"""The ``aigc_fast::`` operators (aigc_fast.ops) pass torch.library.opcheck on their Triton path:
schema (declared mutation of the running statistics, no aliasing), fake implementations equal to
the real outputs' shapes, strides and dtypes, autograd registration, and AOTAutograd with dynamic
shapes. Fresh random inputs, odd channel counts."""
import pytest
import torch

from aigc_fast import ops

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning")  # log(0) in the numpy interpreter


def _layer_args(device, *, transposed, bn, training, activation, momentum_tensor=False,
                channels_last=True, bias=False, keep=True):
    """The arguments of aigc_fast::conv_chain for one 3 -> 5 channel layer (a chain of one),
    k=3, stride 2: what the per-layer drop-ins and functional.conv_bn_act run."""
    from aigc_fast.chain import Link

    gen = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    x = rand(2, 3, 5, 4)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    weight = rand(3, 5, 3, 3) if transposed else rand(5, 3, 3, 3)
    link = Link(transposed, (2, 2), (1, 1), (1, 0) if transposed else (0, 0), bn, 1e-5, 0.1,
                activation, 0.2, training)
    state = ([[rand(5)], [rand(5)], [rand(5)], [rand(5).abs() + 0.5],
              [torch.tensor(3, device=device)],
              [torch.tensor(0.25, device=device) if momentum_tensor else x.new_empty(0)]]
             if bn else [[]] * 6)
    return (x, [weight], rand(5) if bias else None, *state, *ops._encode([link]), keep)


LAYER_CASES = {
    "transposed-bn-train-relu": dict(transposed=True, bn=True, training=True, activation="relu"),
    "conv-bn-train-leaky-nchw": dict(transposed=False, bn=True, training=True,
                                     activation="leaky_relu", channels_last=False, bias=True),
    "conv-bn-momentum-tensor": dict(transposed=False, bn=True, training=True, activation="relu",
                                    momentum_tensor=True),
    "conv-bn-eval-leaky": dict(transposed=False, bn=True, training=False, activation="leaky_relu",
                               bias=True),
    "transposed-plain-bias": dict(transposed=True, bn=False, training=False, activation=None,
                                  bias=True),
    "conv-leaky-no-backward": dict(transposed=False, bn=False, training=False,
                                   activation="leaky_relu", keep=False),
}


@pytest.mark.parametrize("case", LAYER_CASES)
def test_chain_of_one_opcheck(case, device):
    torch.library.opcheck(torch.ops.aigc_fast.conv_chain.default,
                          _layer_args(device, **LAYER_CASES[case]))


def _backward_args(args, layers, grad):
    """conv_chain_backward's arguments after a conv_chain call with ``args``, every gradient
    asked for."""
    outs = torch.ops.aigc_fast.conv_chain(*args)
    m = ops.CHAIN_MAX_LAYERS
    out, stored, vecs = outs[0], list(outs[1:1 + layers]), list(outs[1 + m:1 + m + layers])
    x, weights, bias, gammas, betas = args[:5]
    specs = ops._decode(*args[9:18])
    if not specs[-1].has_bn and specs[-1].activation is not None:
        stored[-1] = out  # the last layer (no BN) reads its activation's derivative from the output
    return (grad(out), x, weights, bias, gammas, betas, stored, vecs, *args[9:18], True,
            [True] * layers, [spec.has_bn for spec in specs], bias is not None)


@pytest.mark.parametrize("case", ["transposed-bn-train-relu", "conv-bn-train-leaky-nchw",
                                  "conv-bn-eval-leaky", "transposed-plain-bias"])
def test_chain_of_one_backward_opcheck(case, device):
    args = _layer_args(device, **LAYER_CASES[case])
    torch.library.opcheck(torch.ops.aigc_fast.conv_chain_backward.default,
                          _backward_args(args, 1, torch.randn_like))


def _chain_args(device, keep=True):
    """The arguments of aigc_fast::conv_chain for a ConvTranspose2d 3 -> 5 + BN + ReLU, Conv2d
    5 -> 7 + LeakyReLU, ConvTranspose2d 7 -> 3 + Tanh chain (odd channels, strides 2, 1, 2)."""
    from aigc_fast.chain import Link

    gen = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    cl = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    links = [Link(True, (2, 2), (1, 1), (1, 1), True, 1e-5, None, "relu"),
             Link(False, (1, 1), (1, 1), (0, 0), False, activation="leaky_relu",
                  negative_slope=0.2),
             Link(True, (2, 2), (0, 0), (0, 0), activation="tanh")]
    weights = [cl(rand(3, 5, 3, 3)), cl(rand(7, 5, 3, 3)), cl(rand(7, 3, 2, 2))]
    bn = [rand(5), rand(5), rand(5), rand(5).abs() + 0.5, torch.tensor(3, device=device)]
    return (cl(rand(2, 3, 4, 3)), weights, None, bn[:1], bn[1:2], bn[2:3], bn[3:4], bn[4:5],
            [weights[0].new_empty(0)], *ops._encode(links), keep)


@pytest.mark.parametrize("keep", [True, False])
def test_conv_chain_opcheck(keep, device):
    torch.library.opcheck(torch.ops.aigc_fast.conv_chain.default, _chain_args(device, keep))


def test_conv_chain_backward_opcheck(device):
    torch.library.opcheck(torch.ops.aigc_fast.conv_chain_backward.default,
                          _backward_args(_chain_args(device), 3, torch.randn_like))


def test_operators_declare_what_they_mutate():
    def mutated(name):
        schema = getattr(torch.ops.aigc_fast, name).default._schema
        return {a.name for a in schema.arguments if a.alias_info is not None
                and a.alias_info.is_write}

    assert mutated("conv_chain") == {"running_means", "running_vars", "batch_counts"}
    # the backward writes nothing it is given: a graph can be backpropagated again
    assert mutated("conv_chain_backward") == set()
    for name in ("bce_with_logits", "binary_cross_entropy", "bce_backward"):
        assert getattr(torch.ops.aigc_fast, name).default._schema.is_mutable is False, name


def _bce_inputs(device, dtype=torch.float32):
    gen = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 7, generator=gen) * 3).to(device, dtype).requires_grad_()
    target = torch.rand(3, 7, generator=gen).to(device, dtype).requires_grad_()
    weight = (torch.rand(7, generator=gen) + 0.5).to(device, dtype)
    pos_weight = (torch.rand(3, 1, generator=gen) + 0.5).to(device, dtype)
    return logits, target, weight, pos_weight


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_bce_with_logits_opcheck(reduction, device):
    logits, target, weight, pos_weight = _bce_inputs(device)
    torch.library.opcheck(torch.ops.aigc_fast.bce_with_logits.default,
                          (logits, target, weight, pos_weight, reduction))
    torch.library.opcheck(torch.ops.aigc_fast.bce_with_logits.default,
                          (logits, target, None, None, reduction))


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_binary_cross_entropy_opcheck(reduction, device):
    logits, target, weight, _ = _bce_inputs(device)
    probs = (0.05 + 0.9 * torch.sigmoid(logits)).detach().requires_grad_()
    torch.library.opcheck(torch.ops.aigc_fast.binary_cross_entropy.default,
                          (probs, target, weight, reduction))


@pytest.mark.parametrize("from_logits", [True, False])
def test_bce_backward_opcheck(from_logits, device):
    logits, target, weight, pos_weight = _bce_inputs(device)
    inputs = logits.detach() if from_logits else torch.sigmoid(logits).detach()
    grad = torch.rand((), device=device)
    for needs in ((True, True), (True, False)):
        torch.library.opcheck(torch.ops.aigc_fast.bce_backward.default,
                              (grad, inputs, target.detach(), weight,
                               pos_weight if from_logits else None, "mean", from_logits, *needs))


def test_ops_refuse_devices_the_kernels_cannot_take(monkeypatch):
    """Called directly where Triton cannot run, an operator says so and where to go instead."""
    monkeypatch.setattr(ops, "launches_take", lambda device: False)
    logits, target, _, _ = _bce_inputs("cpu")
    with pytest.raises(NotImplementedError, match="aigc_fast.functional"):
        torch.ops.aigc_fast.bce_with_logits(logits, target, None, None, "mean")
