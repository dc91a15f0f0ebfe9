"""aigc_fast.nn.ConvTransposeBNReLU / ConvBNAct and fuse()/unfuse(): the fused model must behave
as the eager one (outputs, gradients, running statistics, num_batches_tracked, state_dict), in
train and eval mode.

Fused float32 models are compared with float64 eager copies: relative error (Frobenius norm) <=
1e-4. The fused op runs through "auto": the Triton kernels here (interpreted on CPU), the reference
elsewhere.
"""
import copy
import inspect
import io
import warnings
from collections import OrderedDict

import pytest
import torch
from torch import nn

import aigc_fast
from aigc_fast import functional
from aigc_fast import nn as fused_nn
from aigc_fast.models import Discriminator, Generator
from aigc_fast.nn import ConvBNAct, ConvTransposeBNReLU, FusedSequential, fuse, unfuse
from oracle import (assert_close, assert_matches_reference, count_calls, forward_backward,
                          randomize_batch_norms_, record_fused_calls)


@pytest.fixture(autouse=True)
def no_tf32(monkeypatch):
    """oracle.TOL is for IEEE float32 products; the kernels follow cudnn.allow_tf32 on CUDA,
    as PyTorch does."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)

# pytorch/examples dcgan/main.py reads these as globals; tiny here to keep the interpreter fast.
nz, ngf, ndf, nc = 8, 2, 2, 3


class DcganNetG(nn.Module):
    """netG exactly as pytorch/examples dcgan/main.py defines it (class ``Generator`` there)."""

    def __init__(self, ngpu):
        super(DcganNetG, self).__init__()
        self.ngpu = ngpu
        self.main = nn.Sequential(
            # input is Z, going into a convolution
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 8),
            nn.ReLU(True),
            # state size. (ngf*8) x 4 x 4
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            # state size. (ngf*4) x 8 x 8
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            # state size. (ngf*2) x 16 x 16
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            # state size. (ngf) x 32 x 32
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False),
            nn.Tanh()
            # state size. (nc) x 64 x 64
        )

    def forward(self, input):
        if input.is_cuda and self.ngpu > 1:
            output = nn.parallel.data_parallel(self.main, input, range(self.ngpu))
        else:
            output = self.main(input)
        return output


class DcganNetD(nn.Module):
    """netD exactly as pytorch/examples dcgan/main.py defines it (class ``Discriminator`` there)."""

    def __init__(self, ngpu):
        super(DcganNetD, self).__init__()
        self.ngpu = ngpu
        self.main = nn.Sequential(
            # input is (nc) x 64 x 64
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf) x 32 x 32
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf*2) x 16 x 16
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 4),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf*4) x 8 x 8
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 8),
            nn.LeakyReLU(0.2, inplace=True),
            # state size. (ndf*8) x 4 x 4
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),
            nn.Sigmoid()
        )

    def forward(self, input):
        if input.is_cuda and self.ngpu > 1:
            output = nn.parallel.data_parallel(self.main, input, range(self.ngpu))
        else:
            output = self.main(input)

        return output.view(-1, 1).squeeze(1)


@pytest.fixture
def fused_calls(monkeypatch):
    return record_fused_calls(monkeypatch)


# --- the drop-in module ---------------------------------------------------------------------------


def eager_run(in_channels, out_channels, **conv_args):
    """The eager nn.Sequential(ConvTranspose2d, BatchNorm2d, ReLU) that ConvTransposeBNReLU
    replaces."""
    momentum = conv_args.pop("momentum", 0.1)
    return randomize_batch_norms_(nn.Sequential(
        nn.ConvTranspose2d(in_channels, out_channels, **conv_args),
        nn.BatchNorm2d(out_channels, momentum=momentum),
        nn.ReLU(inplace=True)))


@pytest.mark.parametrize("bias, momentum", [(False, 0.1), (True, None)])
def test_module_matches_eager_sequential(bias, momentum, fused_calls, device):
    torch.manual_seed(0)
    args = dict(kernel_size=3, stride=2, padding=1, output_padding=1, bias=bias)
    eager = eager_run(5, 7, momentum=momentum, **args)
    module = ConvTransposeBNReLU(5, 7, momentum=momentum, **args)
    # its children hold the state under their own names: an eager run's state loads into them
    module.conv.load_state_dict(eager[0].state_dict(), strict=True)
    module.bn.load_state_dict(eager[1].state_dict(), strict=True)
    assert_matches_reference(module, copy.deepcopy(eager).double(), lambda: torch.randn(3, 5, 3, 2),
                             device)
    assert module.bn.num_batches_tracked.item() == 3
    assert fused_calls == [True, True, True, False]


def test_conv_bn_act_module_matches_eager_sequential(fused_calls, device):
    """ConvBNAct, a Discriminator layer's drop-in: nn.Conv2d's arguments, its children's state
    loads from the eager run's, and it behaves as that run."""
    torch.manual_seed(17)
    eager = randomize_batch_norms_(nn.Sequential(nn.Conv2d(3, 5, 4, 2, 1, bias=False),
                                                 nn.BatchNorm2d(5), nn.LeakyReLU(0.2)))
    module = ConvBNAct(3, 5, 4, 2, 1, bias=False, negative_slope=0.2)
    module.conv.load_state_dict(eager[0].state_dict(), strict=True)
    module.bn.load_state_dict(eager[1].state_dict(), strict=True)
    assert_matches_reference(module, copy.deepcopy(eager).double(), lambda: torch.randn(2, 3, 6, 5),
                             device, train_steps=2)
    assert fused_calls == [True, True, False]
    with pytest.raises(ValueError, match="activation must be 'relu' or 'leaky_relu'"):
        ConvBNAct(3, 5, 4, activation="gelu")


def test_module_with_non_tracking_batch_norm_behaves_as_pytorch(device):
    torch.manual_seed(1)
    eager = eager_run(4, 5, kernel_size=4, stride=2, padding=1, bias=False)
    eager[1] = nn.BatchNorm2d(5, track_running_stats=False)
    module = ConvTransposeBNReLU(4, 5, 4, stride=2, padding=1, bias=False)
    module.conv.load_state_dict(eager[0].state_dict())
    module.bn = copy.deepcopy(eager[1])
    # eval mode too normalises with batch statistics, as PyTorch does without running stats
    assert_matches_reference(module, copy.deepcopy(eager).double(), lambda: torch.randn(2, 4, 3, 3),
                             device, train_steps=1)
    assert dict(module.named_buffers()) == {}


def weights_init(m):
    """pytorch/examples dcgan/main.py's initialisation, verbatim."""
    classname = m.__class__.__name__
    if classname.find('Conv') != -1:
        torch.nn.init.normal_(m.weight, 0.0, 0.02)
    elif classname.find('BatchNorm') != -1:
        torch.nn.init.normal_(m.weight, 1.0, 0.02)
        torch.nn.init.zeros_(m.bias)


def test_module_takes_conv_transpose2ds_arguments_in_its_order():
    """nn.ConvTranspose2d's parameters (names, order, defaults: bias=True), then BatchNorm2d's as
    keywords with BatchNorm2d's defaults."""
    conv = list(inspect.signature(nn.ConvTranspose2d).parameters.values())
    bn = inspect.signature(nn.BatchNorm2d).parameters
    ours = list(inspect.signature(ConvTransposeBNReLU).parameters.values())
    assert [(p.name, p.default, p.kind) for p in ours[:len(conv)]] == [
        (p.name, p.default, p.kind) for p in conv]
    assert {p.name: p.default for p in ours[len(conv):]} == {
        name: bn[name].default for name in ("eps", "momentum", "affine", "track_running_stats")}
    assert all(p.kind is p.KEYWORD_ONLY for p in ours[len(conv):])


def test_module_is_a_drop_in_for_the_examples_code(fused_calls, device):
    """Positional arguments as nn.ConvTranspose2d's, pytorch/examples' weights_init, forward's
    output_size: it still runs fused and matches the eager run."""
    torch.manual_seed(12)
    module = ConvTransposeBNReLU(4, 6, 3, 2, 1, 0, 1, False)  # ..., output_padding, groups, bias
    assert module.conv.bias is None and module.weight is module.conv.weight and module.bias is None
    module.apply(weights_init)
    assert 0.015 < module.conv.weight.std().item() < 0.025
    assert (module.bn.weight - 1).abs().max().item() < 0.1 and not module.bn.bias.any()
    randomize_batch_norms_(module)
    eager = nn.Sequential(copy.deepcopy(module.conv), copy.deepcopy(module.bn), nn.ReLU()).double()
    assert_matches_reference(module, eager, lambda: torch.randn(2, 4, 3, 2), device, train_steps=1)
    x = torch.randn(2, 4, 3, 2, device=device)
    module.train()
    eager.train().to(device)
    out = module(x, output_size=[6, 4])  # output_padding (1, 1)
    want = eager[2](eager[1](eager[0](x.double(), output_size=[6, 4])))
    assert out.shape == want.shape == (2, 6, 6, 4)
    assert_close(out, want, "output with output_size")
    assert fused_calls == [True, False, True]


def test_module_accepts_device_dtype_and_what_it_cannot_fuse(device):
    """device=, dtype= build both children there; dilation or groups the fused op lacks are accepted
    as PyTorch accepts them: a warning says the module runs eagerly, and it matches PyTorch."""
    torch.manual_seed(13)
    module = ConvTransposeBNReLU(2, 3, 3, device=device, dtype=torch.float64)
    assert {t.dtype for name, t in module.state_dict().items()
            if not name.endswith("num_batches_tracked")} == {torch.float64}
    assert {t.device for t in module.state_dict().values()} == {torch.device(device)}
    eager = nn.Sequential(copy.deepcopy(module.conv), copy.deepcopy(module.bn), nn.ReLU())
    x = torch.randn(2, 2, 3, 3, device=device, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "auto" falls back to the reference for float64
        assert_close(module(x), eager(x), "float64 output")
    for args in (dict(dilation=2), dict(groups=2)):
        with pytest.warns(UserWarning, match=f"ConvTransposeBNReLU: ConvTranspose2d has "
                                             f"{next(iter(args))}=.*runs eagerly"):
            module = ConvTransposeBNReLU(4, 6, 3, stride=2, **args)
        eager = nn.Sequential(copy.deepcopy(module.conv), copy.deepcopy(module.bn), nn.ReLU())
        x = torch.randn(2, 4, 3, 3)
        assert torch.equal(module(x), eager(x))
    with pytest.raises(ValueError, match='"zeros" padding mode'):  # nn.ConvTranspose2d's error
        ConvTransposeBNReLU(4, 6, 3, padding_mode="reflect")


# --- fuse() on whole models -----------------------------------------------------------------------


# (model, fused runs with BN, training steps); netG is Generator(64)'s architecture, so one step
# suffices. The last ConvTranspose2d (before Tanh) is fused too, as a lone convolution.
GENERATORS = {
    "generator32": (lambda: Generator(32, nz=8, ngf=4), 3, 3),
    "generator64": (lambda: Generator(64, nz=8, ngf=2), 4, 2),
    "dcgan_netG": (lambda: DcganNetG(ngpu=1), 4, 1),
}


@pytest.mark.parametrize("name", GENERATORS)
def test_fused_generator_matches_eager(name, fused_calls, device):
    torch.manual_seed(2)
    build, runs, train_steps = GENERATORS[name]
    model = randomize_batch_norms_(build())
    reference = copy.deepcopy(model).double()
    assert fuse(model) is model
    assert type(model.main) is FusedSequential
    assert_matches_reference(model, reference, lambda: torch.randn(2, nz, 1, 1), device,
                             train_steps)
    # one chain of the BN runs and the last ConvTranspose2d (with its Tanh), in training and eval
    assert fused_calls == [("chain", runs + 1)] * (train_steps + 1)


# (model, image size, fused runs with BN, training steps): the first and last convolutions have no
# BN
DISCRIMINATORS = {
    "discriminator32": (lambda: Discriminator(32, ndf=4), 32, 2, 2),
    "discriminator64": (lambda: Discriminator(64, ndf=2), 64, 3, 1),
    "dcgan_netD": (lambda: DcganNetD(ngpu=1), 64, 3, 1),
}


@pytest.mark.parametrize("name", DISCRIMINATORS)
def test_fused_discriminator_matches_eager(name, fused_calls, device):
    torch.manual_seed(10)
    build, size, runs, train_steps = DISCRIMINATORS[name]
    model = randomize_batch_norms_(build())
    reference = copy.deepcopy(model).double()
    fuse(model)
    assert type(model.main) is FusedSequential
    assert_matches_reference(model, reference, lambda: torch.randn(2, nc, size, size), device,
                             train_steps)
    assert fused_calls == [("chain", runs + 2)] * (train_steps + 1)


def test_state_dict_round_trips_both_ways():
    torch.manual_seed(3)
    eager = randomize_batch_norms_(Generator(64, nz=8, ngf=2))
    fused = fuse(randomize_batch_norms_(Generator(64, nz=8, ngf=2)))
    eager_state, fused_state = eager.state_dict(), fused.state_dict()
    assert list(eager_state) == list(fused_state)
    fused.load_state_dict(eager_state, strict=True)          # saved before fusing, loaded after
    for key, value in fused.state_dict().items():
        assert torch.equal(value, eager_state[key]), key
    other = randomize_batch_norms_(Generator(64, nz=8, ngf=2))
    other.load_state_dict(fused_state, strict=True)          # saved fused, loaded unfused
    for key, value in other.state_dict().items():
        assert torch.equal(value, fused_state[key]), key


def test_unfuse_restores_exact_eager_behaviour(fused_calls):
    """On the CPU, where eager PyTorch is deterministic, so bitwise equality is the test."""
    torch.manual_seed(4)
    model = randomize_batch_norms_(Generator(32, nz=8, ngf=4))
    eager = copy.deepcopy(model)
    assert unfuse(fuse(model)) is model
    assert [type(m) for m in model.modules()] == [type(m) for m in eager.modules()]
    for training in (True, False):
        model.train(training)
        eager.train(training)
        z = torch.randn(3, 8)
        out, grad_z, grads, grad_out = forward_backward(eager, z)
        out2, grad_z2, grads2, _ = forward_backward(model, z, grad_out)
        assert torch.equal(out, out2) and torch.equal(grad_z, grad_z2)
        assert all(n == n2 and torch.equal(g, g2) for (n, g), (n2, g2) in zip(grads, grads2))
    for (key, a), b in zip(eager.state_dict().items(), model.state_dict().values()):
        assert torch.equal(a, b), key
    assert fused_calls == []


def test_fuse_twice_copy_pickle_and_root_sequential(capsys, device):
    torch.manual_seed(5)
    model = randomize_batch_norms_(nn.Sequential(
        nn.ConvTranspose2d(3, 4, 3, bias=True), nn.BatchNorm2d(4), nn.ReLU(),  # not in place
        nn.ConvTranspose2d(4, 2, 2, stride=2), nn.BatchNorm2d(2, momentum=None), nn.ReLU(True)))
    reference = copy.deepcopy(model).double()
    assert fuse(model, verbose=True) is model          # the root itself is the Sequential
    first = capsys.readouterr().out
    assert fuse(model, verbose=True) is model          # idempotent: same state, same report
    assert capsys.readouterr().out == first
    assert type(model) is FusedSequential
    assert_matches_reference(model, reference, lambda: torch.randn(2, 3, 2, 3), device)

    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    for clone in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
        assert type(clone) is FusedSequential
        x = torch.randn(2, 3, 2, 3, device=device)
        model.eval()
        clone.eval()
        assert torch.equal(clone(x), model(x))


def test_unfusable_runs_are_left_and_still_work(capsys, fused_calls, device):
    torch.manual_seed(6)

    class MySequential(nn.Sequential):
        pass

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv, self.bn, self.relu = \
                nn.ConvTranspose2d(4, 4, 1), nn.BatchNorm2d(4), nn.ReLU()

        def forward(self, x):
            return self.relu(self.bn(self.conv(x)))

    def run(conv=None, bn=None, act=None, container=nn.Sequential):
        return container(conv or nn.ConvTranspose2d(4, 4, 1), bn or nn.BatchNorm2d(4),
                         act or nn.ReLU(inplace=True))

    hooked = run()
    model = randomize_batch_norms_(nn.Sequential(OrderedDict(
        grouped=run(conv=nn.ConvTranspose2d(4, 4, 3, groups=2)),
        dilated=run(conv=nn.ConvTranspose2d(4, 4, 2, dilation=2)),
        no_affine=run(bn=nn.BatchNorm2d(4, affine=False)),
        no_tracking=run(bn=nn.BatchNorm2d(4, track_running_stats=False)),
        hooked=hooked,
        leaky=run(act=nn.LeakyReLU(0.2)),
        subclass=run(container=MySequential),
        holder=Holder(),
        fusable=run(conv=nn.ConvTranspose2d(4, 4, 3, stride=2)),
        reflect=nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), nn.ReLU()),
        negative=nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.LeakyReLU(-0.1)),
    )))
    reference = copy.deepcopy(model).double()
    hook_calls = []
    hooked[0].register_forward_hook(lambda *_: hook_calls.append(1))
    fuse(model, verbose=True)
    report = capsys.readouterr().out
    assert [name for name, m in model.named_modules() if type(m) is FusedSequential] == [
        "leaky", "fusable"]
    assert type(model) is nn.Sequential and type(model.subclass) is MySequential
    for line in ["fused 2 convolution run(s) and 0 BCE loss(es); left 9 convolution(s)",
                 "fused leaky.0 -> leaky.1 -> leaky.2",
                 "fused fusable.0 -> fusable.1 -> fusable.2",
                 "left  grouped.0: ConvTranspose2d has groups=2",
                 "left  dilated.0: ConvTranspose2d has dilation=(2, 2)",
                 "left  no_affine.0: BatchNorm2d has affine=False",
                 "left  no_tracking.0: BatchNorm2d has track_running_stats=False",
                 "left  hooked.0: the ConvTranspose2d has hooks",
                 "left  reflect.0: Conv2d has padding_mode='reflect'",
                 "left  negative.0: LeakyReLU has negative_slope=-0.1 (the fused op needs >= 0)",
                 "left  subclass.0: inside MySequential, a subclass of nn.Sequential",
                 "left  holder.conv: inside Holder, not an nn.Sequential"]:
        assert line in report, f"{line!r} not in:\n{report}"
    assert_matches_reference(model, reference, lambda: torch.randn(2, 4, 2, 2), device,
                             train_steps=2)
    assert fused_calls == [True, True, True, True, False, False]
    assert len(hook_calls) == 3  # the hooked run ran eagerly, hook and all


def test_mismatched_batch_norm_and_fused_module_are_left(capsys):
    model = nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(5), nn.ReLU(),
                          ConvTransposeBNReLU(4, 4, 3))
    fuse(model, verbose=True)
    report = capsys.readouterr().out
    assert "left  0: BatchNorm2d has num_features=5 but the ConvTranspose2d gives 4 channels" \
        in report
    assert "left  3.conv: inside a ConvTransposeBNReLU, which is already fused" in report
    assert type(model) is nn.Sequential
    # the mismatched run fails exactly as it does eagerly
    with pytest.raises(RuntimeError, match="running_mean should contain 4 elements not 5"):
        model(torch.randn(2, 3, 2, 2))


def test_verbose_report_on_generator_and_package_entry_points(capsys):
    model = aigc_fast.fuse(Generator(64, nz=8, ngf=2), verbose=True)
    assert capsys.readouterr().out.splitlines() == [
        "aigc_fast.fuse: fused 5 convolution run(s) and 0 BCE loss(es); left 0 convolution(s) as "
        "they are",
        "  fused main.0 -> main.1 -> main.2",
        "  fused main.3 -> main.4 -> main.5",
        "  fused main.6 -> main.7 -> main.8",
        "  fused main.9 -> main.10 -> main.11",
        "  fused main.12",
        "  chain: main.0 .. main.13, 5 layers as one op",
        "  (a fused run runs fused when its nn.Sequential is called; if its modules are called one "
        "by one, it runs unfused and warns)",
    ]
    assert type(aigc_fast.unfuse(model).main) is nn.Sequential
    for bad in (fuse, unfuse):
        with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
            bad(Generator)


def test_fuse_swaps_bce_losses_and_unfuse_restores_them(capsys, monkeypatch, device):
    torch.manual_seed(8)
    calls = [count_calls(monkeypatch, functional, op)
             for op in ("bce_with_logits", "binary_cross_entropy")]
    losses = nn.ModuleDict({
        "logits": nn.BCEWithLogitsLoss(pos_weight=torch.rand(5) + 0.5),
        "probs": nn.BCELoss(weight=torch.rand(5), reduction="sum")}).to(device)
    eager = copy.deepcopy(losses)
    assert fuse(losses, verbose=True) is losses
    assert "fused 0 convolution run(s) and 2 BCE loss(es)" in (
        capsys.readouterr().out)
    assert type(losses.logits) is fused_nn.BCEWithLogitsLoss
    assert type(losses.probs) is fused_nn.BCELoss
    for (key, a), (key2, b) in zip(losses.state_dict().items(), eager.state_dict().items()):
        assert key == key2 and torch.equal(a, b)

    def loss_and_grad(criterion, x, target):
        x = x.detach().requires_grad_()
        loss = criterion(x, target)
        loss.backward()
        return loss.detach(), x.grad

    logits, target = torch.randn(4, 5, device=device) * 3, torch.rand(4, 5, device=device)
    cases = [(losses.logits, eager.logits, logits), (losses.probs, eager.probs, logits.sigmoid())]
    for fused_loss, eager_loss, x in cases:
        expected = loss_and_grad(copy.deepcopy(eager_loss).double(), x.double(), target.double())
        for actual, wanted, what in zip(loss_and_grad(fused_loss, x, target), expected, "lg"):
            assert_close(actual, wanted, f"{type(fused_loss).__name__} {what}")
    assert [len(c) for c in calls] == [1, 1]

    assert unfuse(losses) is losses
    assert type(losses.logits) is nn.BCEWithLogitsLoss and type(losses.probs) is nn.BCELoss
    root = fuse(nn.BCELoss())                           # a loss as the model itself
    assert type(root) is fused_nn.BCELoss and type(unfuse(root)) is nn.BCELoss


def test_fused_generator_compiles_without_graph_breaks(monkeypatch):
    """fuse()'s rewrite (the Sequential's walk and BatchNorm's bookkeeping) is traceable in one
    graph; the reference op stands in for the kernels, whose own tracing is the functional
    layer's."""
    monkeypatch.setenv("AIGC_FAST_IMPL", "ref")
    torch.manual_seed(9)
    model = fuse(randomize_batch_norms_(Generator(32, nz=8, ngf=2)))
    reference = copy.deepcopy(model)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    try:
        for _ in range(2):
            z = torch.randn(3, 8)
            assert torch.allclose(compiled(z), reference(z), rtol=1e-5, atol=1e-6)
    finally:
        torch._dynamo.reset()
    for (key, a), b in zip(model.state_dict().items(), reference.state_dict().values()):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7), key
    assert model.main[1].num_batches_tracked.item() == 2


def test_fused_generator_saves_no_more_for_backward_than_eager(monkeypatch, device):
    """Bytes of the unique storages the autograd graph keeps for backward during one training
    forward (two saved views of one storage count once); the eager ReLUs are in place."""
    monkeypatch.setenv("AIGC_FAST_IMPL", "triton")

    def saved_bytes(model, z):
        storages = {}

        def pack(t):
            storage = t.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(z)  # alive until counted, so no storage address is reused
        assert out.requires_grad
        return sum(storages.values())

    torch.manual_seed(7)
    eager = Generator(32, nz=8, ngf=4).to(device)
    fused = fuse(copy.deepcopy(eager))
    z = torch.randn(4, 8, device=device)
    eager_bytes, fused_bytes = saved_bytes(eager, z), saved_bytes(fused, z)
    print(f"saved for backward: eager {eager_bytes} B, fused {fused_bytes} B, "
          f"ratio {fused_bytes / eager_bytes:.3f}")
    assert fused_bytes <= eager_bytes


@pytest.mark.parametrize("momentum", [0.1, None])
def test_empty_batch_after_fuse_is_what_eager_gives(momentum, fused_calls, device):
    """N = 0: PyTorch returns an empty output, advances num_batches_tracked and leaves the running
    stats; the fused model does the same."""
    torch.manual_seed(14)
    model = randomize_batch_norms_(nn.Sequential(nn.ConvTranspose2d(3, 4, 3, stride=2),
                                                 nn.BatchNorm2d(4, momentum=momentum), nn.ReLU()))
    eager = copy.deepcopy(model).to(device)
    fuse(model).to(device)
    for training in (True, False):
        model.train(training)
        eager.train(training)
        x = torch.randn(0, 3, 2, 5, device=device)
        out, grad_x, grads, grad_out = forward_backward(eager, x)
        out2, grad_x2, grads2, _ = forward_backward(model, x, grad_out)
        assert out2.shape == out.shape == (0, 4, 5, 11) and grad_x2.shape == grad_x.shape
        assert all(torch.equal(g, g2) for (_, g), (_, g2) in zip(grads, grads2))
        for (key, a), b in zip(eager.state_dict().items(), model.state_dict().values()):
            assert torch.equal(a, b), key
    assert model[1].num_batches_tracked.item() == 1
    assert fused_calls == [True, False]


def test_a_rejected_call_changes_no_state(device):
    """Bad input raises before num_batches_tracked or a running statistic changes."""
    model = fuse(nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4, momentum=None),
                               nn.ReLU())).to(device)
    model(torch.randn(2, 3, 2, 2, device=device))
    before = copy.deepcopy(model.state_dict())
    for bad in (torch.randint(0, 4, (2, 3, 2, 2)), torch.randn(3, 2, 2), torch.randn(2, 5, 2, 2)):
        with pytest.raises((TypeError, ValueError)):
            model(bad.to(device))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


class IteratingNetG(nn.Module):
    """A generator whose forward walks its Sequential, as many user models do."""

    def __init__(self):
        super().__init__()
        self.main = nn.Sequential(nn.ConvTranspose2d(nz, 4, 4, 1, 0, bias=False), nn.BatchNorm2d(4),
                                  nn.ReLU(True), nn.ConvTranspose2d(4, nc, 4, 2, 1), nn.Tanh())

    def forward(self, x):
        for m in self.main:
            x = m(x)
        return x


def test_a_run_that_never_runs_fused_is_not_left_claimed(capsys, fused_calls, device):
    """fuse() cannot see how a parent calls its Sequential: its report says a fused run runs fused
    when the Sequential is called, and a run whose modules are called one by one warns, once."""
    model = fuse(IteratingNetG(), verbose=True).to(device)
    report = capsys.readouterr().out
    assert "  fused main.0 -> main.1 -> main.2\n" in report
    assert "a fused run runs fused when its nn.Sequential is called; if its modules are called " \
           "one by one, it runs unfused and warns" in report
    z = torch.randn(2, nz, 1, 1, device=device)
    with pytest.warns(UserWarning, match=r"main\.0 -> main\.1 -> main\.2, reported fused, ran "
                                         r"unfused: its modules were called one by one"):
        model(z)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(z)                     # warned once
        model.main(z)                # the Sequential itself: fused, and no warning
    # the BN run and the last ConvTranspose2d (its bias and Tanh included) as one chain
    assert fused_calls == [("chain", 2)]
    unfuse(model)
    assert not model.main[0]._forward_pre_hooks


def test_lazy_run_fuses_from_its_second_call(capsys, fused_calls, device):
    """A lazy ConvTranspose2d/BatchNorm2d is fused before its first forward: that forward
    initialises it eagerly (silently), the following ones run fused."""
    torch.manual_seed(15)
    model = nn.Sequential(nn.LazyConvTranspose2d(5, 3, stride=2), nn.LazyBatchNorm2d(), nn.ReLU())
    fuse(model, verbose=True).to(device)
    assert "  fused 0 -> 1 -> 2 (from its second call: the first initialises its lazy modules)" in (
        capsys.readouterr().out)
    assert type(model) is FusedSequential
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(torch.randn(2, 4, 3, 3, device=device))
    assert fused_calls == [] and type(model[0]) is nn.ConvTranspose2d
    randomize_batch_norms_(model)
    reference = unfuse(copy.deepcopy(model)).double()
    assert_matches_reference(model, reference, lambda: torch.randn(2, 4, 3, 3), device,
                             train_steps=2)
    assert fused_calls == [True, True, False]


def test_a_run_split_across_nested_sequentials_fuses_what_each_holds(capsys):
    """fuse() rewrites runs of consecutive children of one nn.Sequential: a convolution whose BN or
    activation sits in another Sequential is fused with what its own Sequential holds, and the
    rest runs eagerly (the same result)."""
    model = nn.Sequential(OrderedDict(
        head=nn.Sequential(nn.ConvTranspose2d(3, 4, 3), nn.BatchNorm2d(4)), act=nn.ReLU(),
        conv=nn.ConvTranspose2d(4, 4, 3), tail=nn.Sequential(nn.BatchNorm2d(4), nn.ReLU())))
    fuse(model, verbose=True)
    report = capsys.readouterr().out
    for line in ["fused 2 convolution run(s)", "  fused head.0 -> head.1\n", "  fused conv\n"]:
        assert line in report, f"{line!r} not in:\n{report}"
    torch.manual_seed(16)
    x = torch.randn(2, 3, 3, 3)
    eager = unfuse(copy.deepcopy(model)).double()
    assert_close(model(x), eager(x.double()), "output")
