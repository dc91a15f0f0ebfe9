"""Fused sigmoid + binary cross-entropy against float64 PyTorch: losses and gradients for every
reduction, weight/pos_weight broadcasting and dtype, determinism, launch counts, NaN, bad input, and
the drop-in loss modules. Errors are norm-wise: ||out - ref|| / ||ref||."""
import zlib

import pytest
import torch
import torch.nn.functional as F

from aigc_fast import functional
from aigc_fast import nn as fused_nn
from aigc_fast.kernels import bce as bce_kernels

IMPLS = ["triton", "ref"]
REDUCTIONS = ["none", "mean", "sum"]
SHAPE = (3, 5, 7)
# float32 against float64: a few ulps norm-wise; half precision: the rounding of the output.
TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1e-2}

# name -> (target kind, weight shape, pos_weight shape). (3, 1, 7) varies along two runs of
# dimensions, so the launcher copies it; every other shape is read in place.
LOGIT_CASES = {
    "hard": ("hard", None, None),
    "soft": ("soft", None, None),
    "weight": ("soft", (5, 1), None),
    "pos_weight": ("soft", None, (7,)),
    "both": ("hard", (3, 1, 1), (5, 7)),
    "copied_weight": ("soft", (3, 1, 7), (1,)),
}
PROB_CASES = {
    "hard": ("hard", None, False),
    "soft": ("soft", None, False),
    "weight": ("soft", (5, 1), False),
    "edges": ("soft", (7,), True),  # probabilities exactly 0 and 1 and below exp(-100)
}


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Every tensor the launchers allocate starts as NaN, so an element they fail to write shows."""
    for name in ("empty", "empty_like"):
        allocate = getattr(torch, name)

        def poisoned(*args, _allocate=allocate, **kwargs):
            out = _allocate(*args, **kwargs)
            if out.is_floating_point():
                out.detach().fill_(float("nan"))
            return out

        monkeypatch.setattr(bce_kernels.torch, name, poisoned)


def seeded(name):
    return torch.Generator().manual_seed(zlib.crc32(name.encode()))


def max_rel_err(out, ref):
    """Norm-wise relative error over the finite entries, after requiring that NaNs and infinities
    (with their signs) sit at the same places."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    assert out.shape == ref.shape
    assert torch.equal(out.isnan(), ref.isnan()), "NaNs differ"
    assert torch.equal(torch.where(out.isinf(), out, 0.0),
                       torch.where(ref.isinf(), ref, 0.0)), "infs differ"
    finite = ref.isfinite()
    return ((out[finite] - ref[finite]).norm() / ref[finite].norm().clamp_min(1e-300)).item()


def wide_logits(shape, gen):
    """Every regime: |x| up to 1e4 (exp(-|x|) underflows), moderate x where log1p(exp(-|x|))
    matters, and exact zeros."""
    x = torch.randn(shape, generator=gen) * 4
    wide = torch.empty(shape).uniform_(-1e4, 1e4, generator=gen)
    x = torch.where(torch.rand(shape, generator=gen) < 0.3, wide, x)
    x.view(-1)[::11] = 0.0
    return x


def make_target(kind, shape, gen):
    t = torch.rand(shape, generator=gen)
    return t.round() if kind == "hard" else t


def make_positive(shape, gen):
    return None if shape is None else torch.rand(shape, generator=gen) * 3 + 0.1


def run_with_grads(fn, inputs, reduction, need_target_grad):
    """Loss and gradients (input, target) of ``fn(input, target, reduction=..., **kwargs)`` through
    a fixed random upstream gradient, so that the gradient's scaling is checked too."""
    x, t, kwargs = inputs
    x = x.clone().requires_grad_()
    t = t.clone().requires_grad_(need_target_grad)
    loss = fn(x, t, reduction=reduction, **kwargs)
    upstream = torch.randn(loss.shape, generator=torch.Generator().manual_seed(0),
                           dtype=torch.float64)
    (loss * upstream.to(loss)).sum().backward()
    return loss, x.grad, t.grad


def float64_inputs(x, t, kwargs):
    return x.double(), t.double(), {k: None if v is None else v.double() for k, v in kwargs.items()}


def to_device(x, t, kwargs, device):
    return x.to(device), t.to(device), {k: None if v is None else v.to(device) for k,
                                        v in kwargs.items()}


def logit_case(name, gen):
    kind, w_shape, pw_shape = LOGIT_CASES[name]
    kwargs = {"weight": make_positive(w_shape, gen), "pos_weight": make_positive(pw_shape, gen)}
    return wide_logits(SHAPE, gen), make_target(kind, SHAPE, gen), kwargs


def prob_case(name, gen):
    kind, w_shape, edges = PROB_CASES[name]
    p = torch.sigmoid(torch.randn(SHAPE, generator=gen) * 4)
    if edges:
        p.view(-1)[:4] = torch.tensor([0.0, 1.0, 1e-30, 1.0 - 2.0 ** -24])
    return p, make_target(kind, SHAPE, gen), {"weight": make_positive(w_shape, gen)}


def check_parity(ours, theirs, case, reduction, impl, device, dtype=torch.float32):
    """Errors of ``ours`` (in ``dtype``, on ``device``) against ``theirs`` in float64 on the same
    (rounded) inputs: [loss, input gradient, target gradient or None for hard labels]."""
    x, t, kwargs = case
    x, t = x.to(dtype), t.to(dtype)
    kwargs = {k: None if v is None else v.to(dtype) for k, v in kwargs.items()}
    need_t = bool(t.ne(t.round()).any())  # hard labels: no target gradient, as in GAN training
    got = run_with_grads(lambda *a, **k: ours(*a, impl=impl, **k), to_device(x, t, kwargs, device),
                         reduction, need_t)
    want = run_with_grads(theirs, float64_inputs(x, t, kwargs), reduction, need_t)
    assert got[0].dtype == dtype and got[1].dtype == dtype
    assert (got[2] is None) == (not need_t)
    # The float64 result rounded to dtype: what an exact kernel would return, overflow included.
    return [None if w is None else max_rel_err(g, w.to(dtype)) for g, w in zip(got, want)]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # log(0) in the numpy interpreter
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(LOGIT_CASES))
def test_bce_with_logits_matches_float64_pytorch(name, reduction, impl, device):
    case = logit_case(name, seeded(name))
    errors = check_parity(functional.bce_with_logits, F.binary_cross_entropy_with_logits, case,
                          reduction, impl, device)
    assert max(e for e in errors if e is not None) <= TOL[torch.float32], errors


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("name", list(PROB_CASES))
def test_binary_cross_entropy_matches_float64_pytorch(name, reduction, impl, device):
    case = prob_case(name, seeded(name))
    errors = check_parity(functional.binary_cross_entropy, F.binary_cross_entropy, case,
                          reduction, impl, device)
    assert max(e for e in errors if e is not None) <= TOL[torch.float32], errors


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_other_dtypes_accumulate_in_float32_or_better(dtype, device):
    for reduction in ("none", "mean"):
        errors = check_parity(functional.bce_with_logits, F.binary_cross_entropy_with_logits,
                              logit_case("both", seeded("dtype")), reduction, "triton",
                              device, dtype)
        assert max(e for e in errors if e is not None) <= TOL[dtype], (reduction, errors)
        errors = check_parity(functional.binary_cross_entropy, F.binary_cross_entropy,
                              prob_case("weight", seeded("dtype")), reduction, "triton",
                              device, dtype)
        assert max(e for e in errors if e is not None) <= TOL[dtype], (reduction, errors)


class LaunchCounter:
    """Stands in for a @triton.jit kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, 0

    def __getitem__(self, grid):
        self.launches += 1
        return self.kernel[grid]


@pytest.fixture
def launches(monkeypatch):
    counters = {name: LaunchCounter(getattr(bce_kernels, name))
                for name in ("_bce_fwd_kernel", "_sum_partials_kernel", "_bce_bwd_kernel")}
    for name, counter in counters.items():
        monkeypatch.setattr(bce_kernels, name, counter)
    return lambda: {name: counter.launches for name, counter in counters.items()}


@pytest.mark.parametrize("max_programs", [bce_kernels.MAX_PROGRAMS, 2])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_reduction_over_several_programs_is_deterministic(reduction, max_programs, device,
                                                          monkeypatch, launches):
    """4 tiles: 4 programs, or 2 programs looping over 2 tiles each; then the fixed-order finish."""
    monkeypatch.setattr(bce_kernels, "MAX_PROGRAMS", max_programs)
    gen = seeded("determinism")
    n = 3 * bce_kernels.BLOCK + 5
    x, t = wide_logits((n,), gen), make_target("soft", (n,), gen)
    w = make_positive((n,), gen)
    first = functional.bce_with_logits(x.to(device), t.to(device), weight=w.to(device),
                                       reduction=reduction, impl="triton")
    second = functional.bce_with_logits(x.to(device), t.to(device), weight=w.to(device),
                                        reduction=reduction, impl="triton")
    assert torch.equal(first, second)
    want = F.binary_cross_entropy_with_logits(x.double(), t.double(), weight=w.double(),
                                              reduction=reduction)
    assert max_rel_err(first, want) <= TOL[torch.float32]
    assert launches() == {"_bce_fwd_kernel": 2, "_sum_partials_kernel": 2, "_bce_bwd_kernel": 0}


def test_a_discriminator_batch_takes_one_launch_each_way(device, launches):
    """128 logits fit one program, which writes the mean itself: one launch forward, one
    backward."""
    gen = seeded("gan")
    logits = wide_logits((128, 1), gen).to(device).requires_grad_()
    loss = functional.bce_with_logits(logits, torch.ones(()).expand(128, 1).to(device),
                                      impl="triton")
    loss.backward()
    assert launches() == {"_bce_fwd_kernel": 1, "_sum_partials_kernel": 0, "_bce_bwd_kernel": 1}


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_logits_expanded_target_and_expanded_gradient(impl, device):
    """Permuted logits, a stride-0 target (a constant label), and the stride-0 gradient that
    .sum() sends back through reduction="none"."""
    gen = seeded("layouts")
    logits = wide_logits((7, 5, 3), gen).permute(2, 1, 0)
    pos_weight = make_positive((5, 1), gen)

    def loss_and_grad(fn, x, pw, **kwargs):
        x = x.clone(memory_format=torch.preserve_format).requires_grad_()
        loss = fn(x, x.new_ones(()).expand(x.shape), pos_weight=pw, reduction="none", **kwargs)
        loss.sum().backward()
        return loss, x.grad

    got = loss_and_grad(functional.bce_with_logits, logits.to(device), pos_weight.to(device),
                        impl=impl)
    want = loss_and_grad(F.binary_cross_entropy_with_logits, logits.double(), pos_weight.double())
    assert max(max_rel_err(g, w) for g, w in zip(got, want)) <= TOL[torch.float32]


@pytest.mark.parametrize("w_shape, copied", [((), False), ((7,), False), ((5, 1), False),
                                             ((3, 1, 1), False), ((1, 5, 7), False),
                                             ((3, 1, 7), True)])
def test_periodic_view_reads_broadcast_operands_in_place(w_shape, copied):
    shape = (3, 5, 7)
    operand = torch.rand(w_shape, generator=seeded(str(w_shape)))
    view, inner, span = bce_kernels._periodic(operand, shape)
    flat = torch.as_strided(view, (span,), (1,))
    index = torch.arange(view.numel())
    assert torch.equal(flat[(index // inner) % span], operand.broadcast_to(shape).flatten())
    assert (view.data_ptr() != operand.data_ptr()) == copied


@pytest.mark.parametrize("impl", IMPLS)
def test_nan_logits_give_nan_loss_and_gradient_where_they_are(impl, device):
    gen = seeded("nan")
    x, t = wide_logits(SHAPE, gen), make_target("soft", SHAPE, gen)
    x.view(-1)[17] = float("nan")
    x = x.to(device).requires_grad_()
    for reduction in ("mean", "sum"):
        assert functional.bce_with_logits(x, t.to(device), reduction=reduction, impl=impl).isnan()
    loss = functional.bce_with_logits(x, t.to(device), reduction="none", impl=impl)
    loss.sum().backward()
    expected_nan = torch.zeros(SHAPE, dtype=torch.bool)
    expected_nan.view(-1)[17] = True
    assert torch.equal(loss.isnan().cpu(), expected_nan)
    assert torch.equal(x.grad.isnan().cpu(), expected_nan)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_out_of_range_probabilities_give_nan_in_the_kernel(device):
    """What CUDA users get (no host-side check there): NaN exactly where p or t leaves [0, 1]."""
    p = torch.tensor([0.5, -0.1, 1.1, 0.5, 0.5, float("nan"), 0.0, 1.0], device=device)
    t = torch.tensor([0.5, 0.5, 0.5, -0.1, 1.5, 0.5, 0.0, 1.0], device=device)
    loss = bce_kernels.bce_forward(p, t, None, None, "none", from_logits=False)
    assert loss.isnan().tolist() == [False, True, True, True, True, True, False, False]


def _bad_calls():
    """(id, our call given (x, p, t), PyTorch's equivalent or None, words the message must name)."""
    logits = functional.bce_with_logits
    probs = functional.binary_cross_entropy
    return [
        ("target_shape", lambda x, p, t, i: logits(x, t[..., :1], impl=i),
         lambda x, p, t: F.binary_cross_entropy_with_logits(x, t[..., :1]), "target"),
        ("target_shape_probs", lambda x, p, t, i: probs(p, t[:1], impl=i),
         lambda x, p, t: F.binary_cross_entropy(p, t[:1]), "target"),
        ("weight_no_broadcast", lambda x, p, t, i: logits(x, t, weight=torch.rand(4), impl=i),
         lambda x, p, t: F.binary_cross_entropy_with_logits(x, t, weight=torch.rand(4)), "weight"),
        ("weight_too_big", lambda x, p, t, i: probs(p, t, weight=torch.rand(2, *SHAPE), impl=i),
         lambda x, p, t: F.binary_cross_entropy(p, t, weight=torch.rand(2, *SHAPE)), "weight"),
        ("pos_weight", lambda x, p, t, i: logits(x, t, pos_weight=torch.rand(6), impl=i),
         lambda x, p, t: F.binary_cross_entropy_with_logits(x, t, pos_weight=torch.rand(6)),
         "pos_weight"),
        ("reduction", lambda x, p, t, i: logits(x, t, reduction="avg", impl=i),
         lambda x, p, t: F.binary_cross_entropy_with_logits(x, t, reduction="avg"), "reduction"),
        ("probs_above_1", lambda x, p, t, i: probs(p + 1, t, impl=i),
         lambda x, p, t: F.binary_cross_entropy(p + 1, t), "probs"),
        ("probs_nan", lambda x, p, t, i: probs(p.log() - 1, t, impl=i),  # NaN at p < 0 after log
         lambda x, p, t: F.binary_cross_entropy(p.log() - 1, t), "probs"),
        ("target_below_0", lambda x, p, t, i: probs(p, t - 1, impl=i),
         lambda x, p, t: F.binary_cross_entropy(p, t - 1), "target"),
        ("float_target", lambda x, p, t, i: logits(x, 1.0, impl=i), TypeError, "target"),
        ("int_target", lambda x, p, t, i: logits(x, t.long(), impl=i), TypeError, "target"),
        ("int_logits", lambda x, p, t, i: logits(x.long(), t, impl=i), TypeError, "logits"),
    ]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", _bad_calls(), ids=lambda case: case[0])
def test_bad_input_raises_what_pytorch_raises_naming_the_argument(case, impl):
    """On CPU, where PyTorch checks the range of probabilities and targets on the host."""
    _, ours, theirs, name = case
    gen = seeded("bad")
    x, t = wide_logits(SHAPE, gen), make_target("soft", SHAPE, gen)
    p = torch.sigmoid(x)
    expected = theirs
    if not isinstance(theirs, type):
        with pytest.raises(Exception) as pytorch_error:
            theirs(x, p, t)
        expected = type(pytorch_error.value)
    with pytest.raises(expected, match=name):
        ours(x, p, t, impl)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # log(0) in the numpy interpreter
@pytest.mark.parametrize("op, weights", [("bce_with_logits", ("weight",)),
                                         ("bce_with_logits", ("pos_weight",)),
                                         ("binary_cross_entropy", ("weight",))])
def test_weight_needing_a_gradient_runs_the_reference_under_auto(op, weights, device, monkeypatch):
    """The kernels do not differentiate weight or pos_weight: "auto" falls back to the reference,
    saying why, and so does what PyTorch does (today: refuse, as its op has no such gradient); a
    forced "triton" refuses, naming the argument. No gradient is silently dropped."""
    monkeypatch.setattr(functional, "_warned_fallbacks", set())
    gen = seeded(op + weights[0])
    x, t = wide_logits(SHAPE, gen).to(device), make_target("soft", SHAPE, gen).to(device)
    if op == "binary_cross_entropy":
        x = torch.sigmoid(x)
    kwargs = {name: make_positive((7,), gen).to(device).requires_grad_() for name in weights}
    theirs = {"bce_with_logits": F.binary_cross_entropy_with_logits,
              "binary_cross_entropy": F.binary_cross_entropy}[op]
    ours = getattr(functional, op)
    try:
        expected = theirs(x, t, **kwargs)
    except Exception as error:  # noqa: BLE001 - whatever PyTorch does, auto does
        expected = error
    with pytest.warns(UserWarning, match=f"differentiate with respect to {weights[0]}"):
        try:
            got = ours(x, t, impl="auto", **kwargs)
        except Exception as error:  # noqa: BLE001
            got = error
    assert type(got) is type(expected)
    if isinstance(expected, Exception):
        assert str(got) == str(expected)
    else:
        assert max_rel_err(got, expected) <= TOL[torch.float32]
    with pytest.raises(NotImplementedError, match=f"impl='triton' cannot run: .* {weights[0]}"):
        ours(x, t, impl="triton", **kwargs)
    with torch.no_grad():  # nothing to differentiate: the kernels run
        ours(x, t, impl="triton", **kwargs)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("x_dtype, t_dtype", [(torch.float32, torch.float64),
                                              (torch.float64, torch.float32),
                                              (torch.float16, torch.float32)])
def test_loss_dtype_follows_pytorch(x_dtype, t_dtype, impl, device):
    """PyTorch's loss has target's dtype (float32 logits, float64 target -> float64); ours too, and
    each gradient the dtype of its input."""
    gen = seeded("promotion")
    x, t = torch.randn(SHAPE, generator=gen) * 3, make_target("soft", SHAPE, gen)

    def run(fn, x, t, **kwargs):
        x, t = x.clone().requires_grad_(), t.clone().requires_grad_()
        loss = fn(x, t, reduction="sum", **kwargs)
        loss.backward()
        return loss, x.grad, t.grad

    ours = run(functional.bce_with_logits, x.to(device, x_dtype), t.to(device, t_dtype), impl=impl)
    want = run(F.binary_cross_entropy_with_logits, x.to(x_dtype), t.to(t_dtype))
    exact = run(F.binary_cross_entropy_with_logits, x.to(x_dtype).double(), t.to(t_dtype).double())
    assert [v.dtype for v in ours] == [v.dtype for v in want]
    narrowest = torch.float16 if torch.float16 in (x_dtype, t_dtype) else torch.float32
    for a, b in zip(ours, exact):
        assert max_rel_err(a, b) <= TOL[narrowest]


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # log(0) in the numpy interpreter
@pytest.mark.parametrize("impl", IMPLS)
def test_what_pytorch_accepts_is_accepted(impl, device):
    """reduction="elementwise_mean" (PyTorch's deprecated "mean", with its warning) and integer
    weight and pos_weight."""
    gen = seeded("accepted")
    x, t = wide_logits(SHAPE, gen).to(device), make_target("soft", SHAPE, gen).to(device)
    w, pw = torch.tensor([1, 2, 3, 1, 2, 3,
                          1]).to(device), torch.tensor([[2], [1], [3], [1], [4]]).to(device)
    with pytest.warns(UserWarning, match="elementwise_mean"):
        ours = functional.bce_with_logits(x, t, weight=w, pos_weight=pw,
                                          reduction="elementwise_mean",
                                          impl=impl)
    want = F.binary_cross_entropy_with_logits(x.double(), t.double(), weight=w, pos_weight=pw)
    assert max_rel_err(ours, want) <= TOL[torch.float32]
    p = torch.sigmoid(x)
    with pytest.warns(UserWarning, match="elementwise_mean"):
        ours = functional.binary_cross_entropy(p, t, weight=w, reduction="elementwise_mean",
                                               impl=impl)
    want = F.binary_cross_entropy(p.double(), t.double(), weight=w.double())
    assert max_rel_err(ours, want) <= TOL[torch.float32]
    module = fused_nn.BCEWithLogitsLoss(pos_weight=pw, reduction="elementwise_mean", impl=impl)
    with pytest.warns(UserWarning, match="elementwise_mean"):
        ours = module(x, t)
    assert max_rel_err(ours, F.binary_cross_entropy_with_logits(x.double(), t.double(),
                                                                pos_weight=pw)) \
        <= TOL[torch.float32]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_empty_input_matches_pytorch(reduction, impl, device):
    x = torch.empty(0, 3, device=device, requires_grad=True)
    ours = functional.bce_with_logits(x, torch.empty(0, 3, device=device), reduction=reduction,
                                      impl=impl)
    want = F.binary_cross_entropy_with_logits(x, torch.empty(0, 3, device=device),
                                              reduction=reduction)
    assert ours.shape == want.shape
    assert torch.equal(ours.isnan(), want.isnan())
    assert torch.equal(ours.nan_to_num(), want.nan_to_num())


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
# the legacy arguments, on purpose
@pytest.mark.filterwarnings("ignore:size_average and reduce args")
@pytest.mark.parametrize("ours, theirs, is_logits", [
    (fused_nn.BCEWithLogitsLoss, torch.nn.BCEWithLogitsLoss, True),
    (fused_nn.BCELoss, torch.nn.BCELoss, False),
])
def test_drop_in_modules_match_pytorch_modules(ours, theirs, is_logits, device):
    gen = seeded(theirs.__name__)
    x, t = wide_logits(SHAPE, gen).to(device), make_target("soft", SHAPE, gen).to(device)
    inp = x if is_logits else torch.sigmoid(x)
    buffers = {"weight": make_positive((5, 1), gen).to(device)}
    if is_logits:
        buffers["pos_weight"] = make_positive((7,), gen).to(device)
    for legacy in ({"reduction": "none"}, {"size_average": False}, {}):
        mine, pytorch = ours(**buffers, **legacy), theirs(**buffers, **legacy)
        assert isinstance(mine, theirs) and mine.reduction == pytorch.reduction
        assert mine.state_dict().keys() == pytorch.state_dict().keys()
        assert max_rel_err(mine(inp, t), pytorch(inp.double(), t.double())) <= TOL[torch.float32]
    mine.load_state_dict(pytorch.state_dict(), strict=True)
    swapped = theirs(**buffers)
    swapped.__class__ = ours  # how fuse() converts a loss module in place
    assert swapped.impl == "auto"
    assert max_rel_err(swapped(inp, t), pytorch(inp.double(), t.double())) <= TOL[torch.float32]
