"""The chain (aigc_fast.chain.conv_chain, which fuse() builds from consecutive layers):
float32 chains against float64 eager models (relative error <= 1e-4, tests/oracle.py), in odd
configurations the DCGAN nets of test_nn_fuse do not reach; bitwise determinism; saved tensors;
half precision; double backward; bad input. Triton kernels run interpreted on the CPU."""
import copy

import pytest
import torch
from torch import nn

from aigc_fast import chain
from aigc_fast.nn import fuse
from oracle import poisoned  # noqa: F401 (fixture)
from oracle import assert_close, assert_matches_reference, forward_backward, \
    randomize_batch_norms_


@pytest.fixture(autouse=True)
def triton_path(monkeypatch):
    """The Triton kernels, never the reference fallback; IEEE float32 products on CUDA too."""
    monkeypatch.setenv("AIGC_FAST_IMPL", "triton")
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)


@pytest.fixture
def chain_calls(monkeypatch):
    """The number of layers of each conv_chain call (to prove the chain, not eager, ran)."""
    calls = []
    real = chain.conv_chain

    def counting(x, links, *args, **kwargs):
        calls.append(len(links))
        return real(x, links, *args, **kwargs)

    monkeypatch.setattr(chain, "conv_chain", counting)
    return calls


# Odd chains: channels 3, 5, 7 and 130 (> RECOMPUTE_MAX_CHANNELS: the first layer's y is kept),
# kernel sizes 1 to 4, strides 1 to 3, output_padding, non-square maps, both directions mixed,
# LeakyReLU slope 0.01, momentum=None, a layer without BN between BN layers, and chains that end
# on a BN layer (the apply and reduction launches the last layer needs) or on a Tanh.
CHAINS = {
    "mixed-ends-on-tanh": (lambda: nn.Sequential(
        nn.ConvTranspose2d(3, 5, 3, stride=2, padding=1, output_padding=1, bias=False),
        nn.BatchNorm2d(5, momentum=None), nn.ReLU(),
        nn.Conv2d(5, 7, 3, stride=1, padding=1, bias=False), nn.LeakyReLU(0.01),
        nn.Conv2d(7, 5, 2, stride=2, padding=0, bias=False), nn.BatchNorm2d(5), nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(5, 3, 1, bias=False), nn.Tanh()), (3, 5, 3), 4),
    "ends-on-bn-wide-input": (lambda: nn.Sequential(
        nn.Conv2d(130, 7, 4, stride=3, padding=2, bias=False), nn.BatchNorm2d(7), nn.ReLU(),
        nn.ConvTranspose2d(7, 3, 4, stride=3, padding=1, output_padding=2, bias=False),
        nn.BatchNorm2d(3), nn.LeakyReLU(0.01)), (130, 4, 5), 2),
}


@pytest.mark.parametrize("name", CHAINS)
def test_chain_matches_float64(name, chain_calls, device, poisoned):  # noqa: F811
    """Outputs, the input and every parameter gradient, running stats and num_batches_tracked over
    two training steps (then eval, a chain too) of the chained model against float64 eager."""
    torch.manual_seed(21)
    build, in_shape, layers = CHAINS[name]
    model = randomize_batch_norms_(build())
    reference = copy.deepcopy(model).double()
    fuse(model)
    assert_matches_reference(model, reference, lambda: torch.randn(2, *in_shape), device,
                             train_steps=2)
    assert chain_calls == [layers] * 3


def test_chain_is_deterministic(device):
    """Two runs from the same state give the same bits: no float atomics, fixed-order sums."""
    torch.manual_seed(22)
    build, in_shape, _ = CHAINS["mixed-ends-on-tanh"]
    first = fuse(randomize_batch_norms_(build())).to(device)
    second = copy.deepcopy(first)
    x = torch.randn(3, *in_shape, device=device)
    out, grad_x, grads, grad_out = forward_backward(first, x)
    out2, grad_x2, grads2, _ = forward_backward(second, x, grad_out)
    assert torch.equal(out, out2) and torch.equal(grad_x, grad_x2)
    assert all(torch.equal(g, g2) for (_, g), (_, g2) in zip(grads, grads2))
    assert all(torch.equal(a, b) for a, b in zip(first.state_dict().values(),
                                                 second.state_dict().values()))


def test_chain_saves_one_tensor_per_layer(device):
    """What autograd keeps: the input, the parameters, and per layer one activation-sized tensor
    (the first layer's is recomputed: 3 input channels) and one (4, C) vector; eager keeps two
    activation-sized tensors per BN layer."""
    torch.manual_seed(23)
    model = nn.Sequential(nn.Conv2d(3, 6, 4, 2, 1, bias=False), nn.LeakyReLU(0.2),
                          nn.Conv2d(6, 8, 4, 2, 1, bias=False), nn.BatchNorm2d(8),
                          nn.LeakyReLU(0.2),
                          nn.Conv2d(8, 1, 4, 1, 0, bias=False)).to(device)
    fuse(model)
    x = torch.randn(2, 3, 16, 16, device=device)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        out = model(x)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    activations = sorted(tuple(t.shape) for t in saved
                         if t.untyped_storage().data_ptr() not in params and t.dim() == 4)
    # x, and layer 2's y; not layer 1's output (recomputed) nor the logits (not needed)
    assert activations == [(2, 3, 16, 16), (2, 8, 4, 4)]
    assert sorted(tuple(t.shape) for t in saved if t.dim() == 2) == [(4, 8)]  # BN's vec
    out.sum().backward()  # and the backward works from that
    assert all(p.grad is not None for p in model.parameters())


def test_half_precision_chain(device, poisoned):  # noqa: F811
    """float16 activations and weights, float32 statistics and accumulation, against float64."""
    torch.manual_seed(24)
    build, in_shape, _ = CHAINS["mixed-ends-on-tanh"]
    model = randomize_batch_norms_(build())
    reference = copy.deepcopy(model).double().to(device)
    fused = fuse(model).to(device)
    for m in fused.modules():  # half convolutions, float32 BN (as --precision fp16 keeps BN state)
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            m.half()
    x = torch.randn(2, *in_shape, device=device)
    out64, grad_x64, grads64, grad_out = forward_backward(reference, x.double())
    out, grad_x, grads, _ = forward_backward(fused, x.half(), grad_out)
    assert out.dtype == torch.float16
    for got, want, what in [(out, out64, "output"), (grad_x, grad_x64, "input gradient"),
                            *((g, g64, n) for (n, g), (_, g64) in zip(grads, grads64))]:
        err = ((got.double() - want).norm() / want.norm()).item()
        assert err <= 5e-3, f"{what}: {err:.2e}"


def test_chain_double_backward_matches_float64(device):
    """An R1-style penalty through a fused D (create_graph=True: the chain's backward is then
    PyTorch's own ops, differentiable again) gives float64 eager's parameter gradients."""
    torch.manual_seed(25)
    model = randomize_batch_norms_(nn.Sequential(
        nn.Conv2d(3, 4, 4, 2, 1, bias=False), nn.LeakyReLU(0.2),
        nn.Conv2d(4, 6, 4, 2, 1, bias=False), nn.BatchNorm2d(6), nn.LeakyReLU(0.2),
        nn.Conv2d(6, 1, 2, 1, 0, bias=False)))
    reference = copy.deepcopy(model).double().to(device)
    fused = fuse(model).to(device)
    x = torch.randn(3, 3, 8, 8, device=device)

    def r1_grads(net, x):
        x = x.detach().requires_grad_()
        (grad_x,) = torch.autograd.grad(net(x).sum(), x, create_graph=True)
        grad_x.pow(2).sum().backward()
        return [p.grad.clone() for p in net.parameters()]

    got, want = r1_grads(fused, x), r1_grads(reference, x.double())
    total = torch.cat([g.flatten() for g in want]).norm().item()
    for g, g64 in zip(got, want):
        # BN's beta gets 0 in exact arithmetic (the penalty is shift-invariant): measured against
        # the whole gradient
        assert_close(g, g64, "R1 gradient", floor=total if g64.norm() <= 1e-9 * total else 0.0)


def test_frozen_chain_gives_the_input_gradient(device):
    """A frozen D (G's step: D's parameters need no gradient) still passes the input gradient
    through every BN layer's backward: against float64."""
    torch.manual_seed(27)
    model = randomize_batch_norms_(nn.Sequential(
        nn.Conv2d(3, 4, 4, 2, 1, bias=False), nn.LeakyReLU(0.2),
        nn.Conv2d(4, 6, 4, 2, 1, bias=False), nn.BatchNorm2d(6), nn.LeakyReLU(0.2),
        nn.Conv2d(6, 5, 3, 1, 1, bias=False), nn.BatchNorm2d(5), nn.LeakyReLU(0.2),
        nn.Conv2d(5, 1, 2, 1, 0, bias=False)))
    reference = copy.deepcopy(model).double().to(device)
    fused = fuse(model).to(device)
    for net in (fused, reference):
        net.requires_grad_(False)
    x = torch.randn(3, 3, 8, 8, device=device)
    grads = []
    for net, inp in ((fused, x), (reference, x.double())):
        inp = inp.clone().requires_grad_()
        net(inp).sum().backward()
        grads.append(inp.grad)
    assert_close(*grads, "input gradient of a frozen chain")


def test_verbose_report_and_long_runs(capsys, chain_calls, device):
    """fuse(verbose=True) names each chain; a run longer than the chain operator takes (8 layers)
    runs as several chains, matching eager."""
    from aigc_fast.models import Generator

    fuse(Generator(32, nz=8, ngf=4), verbose=True)
    assert "chain: main.0 .. main.10, 4 layers as one op" in capsys.readouterr().out
    torch.manual_seed(26)
    layers = []
    for _ in range(10):
        layers += [nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.ReLU()]
    model = randomize_batch_norms_(nn.Sequential(*layers))
    reference = copy.deepcopy(model).double()
    fuse(model, verbose=True)
    assert "10 layers as 2 ops of <= 8 layers" in capsys.readouterr().out
    assert_matches_reference(model, reference, lambda: torch.randn(2, 3, 3, 4), device,
                             train_steps=1)
    assert chain_calls == [8, 2] * 2  # a training step, then eval


def test_bad_links_name_the_argument(device):
    x = torch.randn(2, 3, 4, 4, device=device)
    weight = torch.randn(3, 5, 3, 3, device=device)
    link = chain.Link(transposed=True, stride=(1, 1), padding=(0, 0))
    with pytest.raises(TypeError, match="links must be a non-empty list"):
        chain.conv_chain(x, [], [], [], [])
    with pytest.raises(ValueError, match=r"bn_params must be a list with one entry per link \(1\)"):
        chain.conv_chain(x, [link], [weight], [], [None])
    with pytest.raises(ValueError,
                       match=r"weights\[0\] must be a 4-D tensor with 3 input channels"):
        chain.conv_chain(x, [link], [weight[:2]], [None], [None])
    with pytest.raises(ValueError, match=r"bn_params\[0\] must be \(gamma, beta\) exactly when"):
        chain.conv_chain(x, [chain.Link(True, (1, 1), (0, 0), has_bn=True)], [weight], [None],
                         [None])
    with pytest.raises(ValueError, match=r"links\[0\].activation must be one of"):
        chain.conv_chain(x, [chain.Link(True, (1, 1), (0, 0), activation="gelu")], [weight],
                         [None], [None])
    # the backward reads a layer's activation derivative from its output's sign: slope >= 0
    with pytest.raises(ValueError, match=r"links\[0\].negative_slope must be a finite float >= 0"):
        chain.conv_chain(x, [chain.Link(True, (1, 1), (0, 0), activation="leaky_relu",
                                        negative_slope=-0.1)], [weight], [None], [None])
    state = (torch.zeros(5, device=device), torch.ones(5, device=device),
             torch.tensor(0, device=device))
    with pytest.raises(ValueError, match=r"bn_states\[0\] must be None for a layer without"):
        chain.conv_chain(x, [link], [weight], [None], [state])
    bn_link = chain.Link(True, (1, 1), (0, 0), has_bn=True)
    params = [(torch.ones(5, device=device), torch.zeros(5, device=device))]
    with pytest.raises(ValueError, match=r"num_batches_tracked must be a 0-dim int64 tensor"):
        chain.conv_chain(x, [bn_link], [weight], params, [(*state[:2], torch.tensor(0.0))])


def test_reductions_over_many_row_tiles_close_in_two_levels(device):
    """With 16-row tiles forced, each GEMM of a BN chain has 80 row tiles: its statistics
    (forward) and its backward sums (the next layer's input gradient) close in two levels, groups
    of 64 row tiles, then the groups. Outputs, gradients and running stats against float64."""
    from aigc_fast.kernels import tiles

    torch.manual_seed(27)
    model = randomize_batch_norms_(nn.Sequential(
        nn.Conv2d(2, 6, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 5, 1, bias=False), nn.BatchNorm2d(5), nn.LeakyReLU(0.2)))
    reference = copy.deepcopy(model).double()
    fuse(model)
    forced = tiles.Tile(16, 32, 16, 4, 1)
    with tiles.forced(conv=forced, pair=(forced, tiles.Tile(32, 32, 128, 4, 1))):
        assert_matches_reference(model, reference, lambda: torch.randn(2, 2, 20, 32), device,
                                 train_steps=1)


def test_the_64_bit_offsets_variant(device):
    """Launches whose tensors pass 2**31 elements index with 64-bit offsets (tiles.wide_offsets):
    that variant, forced on small tensors, against float64 in training (a chain whose first layer
    packs an image's channels) and eval."""
    from aigc_fast.kernels import tiles

    torch.manual_seed(28)
    model = randomize_batch_norms_(nn.Sequential(
        nn.Conv2d(3, 6, 4, 2, 1, bias=False), nn.BatchNorm2d(6), nn.LeakyReLU(0.2),
        nn.ConvTranspose2d(6, 5, 4, 2, 1, bias=False), nn.BatchNorm2d(5), nn.ReLU(),
        nn.Conv2d(5, 2, 3, 1, 1, bias=False), nn.Tanh()))
    reference = copy.deepcopy(model).double()
    fuse(model)
    with tiles.forced(int64=True):
        assert_matches_reference(model, reference, lambda: torch.randn(2, 3, 8, 6), device,
                                 train_steps=1)


MENU = {  # tiles of the rule's menu the interpreter's shapes would not pick, with their pairs
    "128x128x32": "BIG",
    "128x128x16 pair": "PAIR_BIG",
    "64x64x16": (64, 64, 16),
    "128x4x16 CUDA cores": (128, 4, 16),
}


@pytest.mark.parametrize("name", MENU)
def test_every_menu_tile_against_float64(name, device):
    """Each tile of the rule's menu, forced on every GEMM of a training chain (forward, the
    backward pair, a lone weight gradient) through the seam, against float64."""
    from aigc_fast.kernels import tiles

    picked = MENU[name]
    tile = getattr(tiles, picked) if isinstance(picked, str) else tiles.Tile(*picked, 4, 1)
    wgrad = tile if tile.block_n >= 16 else tiles.Tile(64, 64, 16, 4, 1)
    torch.manual_seed(29)
    model = randomize_batch_norms_(nn.Sequential(
        nn.Conv2d(3, 20, 3, 1, 1, bias=False), nn.BatchNorm2d(20), nn.ReLU(),
        nn.ConvTranspose2d(20, 6, 4, 2, 1, bias=False), nn.BatchNorm2d(6), nn.LeakyReLU(0.2)))
    reference = copy.deepcopy(model).double()
    fuse(model)
    with tiles.forced(conv=tile, pair=(tile, wgrad), weight_grad=wgrad):
        assert_matches_reference(model, reference, lambda: torch.randn(2, 3, 6, 5), device,
                                 train_steps=1)


@pytest.fixture
def conv_launches(monkeypatch):
    """The plan (chain_gemm.ConvLaunch) of every conv GEMM launch, pairs included."""
    from aigc_fast.kernels import chain_gemm

    plans = []
    real = chain_gemm.conv_launch

    def recording(*args, **kwargs):
        plans.append(real(*args, **kwargs))
        return plans[-1]

    monkeypatch.setattr(chain_gemm, "conv_launch", recording)
    return plans


def test_split_k_runs_add_up_in_order(device, conv_launches):
    """Split-K (tiles.conv_splits, forced to 5 runs, more than some GEMMs have loop steps, so some
    runs are empty) on every GEMM whose epilogue is elementwise: the forwards of a chain without
    BN ending on a one-channel conv with a bias (D's last layer) and the lone input gradients;
    outputs, input and parameter gradients against float64."""
    from aigc_fast.kernels import tiles

    torch.manual_seed(30)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, 1, 1, bias=False), nn.LeakyReLU(0.2),
        nn.Conv2d(6, 5, 4, 2, 1, bias=False), nn.LeakyReLU(0.2),
        nn.Conv2d(5, 1, 3, 1, 0, bias=True))
    reference = copy.deepcopy(model).double()
    fuse(model)
    with tiles.forced(conv_splits=5):
        assert_matches_reference(model, reference, lambda: torch.randn(3, 3, 8, 6), device,
                                 train_steps=1)
    assert {p.splits for p in conv_launches} == {1, 5}  # pairs never split
    assert all(p.constexprs["SPLIT_K"] == (p.splits > 1) for p in conv_launches)


def test_a_one_pixel_transposed_conv_runs_one_tap_per_phase(device, conv_launches):
    """A transposed conv from a one-pixel side (G's first layer; the input gradient of D's last
    conv, 4x4 -> 1x1) runs that side with stride = kernel (conv_gemm.gemm_stride): every output
    pixel one tap, a dense GEMM per phase, no tap of the loop outside the input. With padding,
    output_padding, a 1 x 5 input (one side only) and a BN layer after it, against float64."""
    torch.manual_seed(31)
    model = randomize_batch_norms_(nn.Sequential(
        nn.ConvTranspose2d(6, 5, (4, 3), stride=1, padding=(1, 0), bias=False),
        nn.BatchNorm2d(5), nn.ReLU(),
        nn.ConvTranspose2d(5, 4, 3, stride=2, padding=1, output_padding=1, bias=False),
        nn.BatchNorm2d(4), nn.LeakyReLU(0.2),
        nn.Conv2d(4, 3, (2, 7), 1, 0, bias=False), nn.LeakyReLU(0.2),
        nn.Conv2d(3, 1, (3, 1), 1, 0, bias=False)))
    reference = copy.deepcopy(model).double()
    fuse(model)
    assert_matches_reference(model, reference, lambda: torch.randn(3, 6, 1, 5), device,
                             train_steps=1)
    one_pixel = {(p.kernel, p.stride) for p in conv_launches if p.transposed and p.x_shape[2] == 1}
    assert one_pixel == {((4, 3), (4, 1)), ((3, 1), (3, 1))}, one_pixel


def test_opt_in_autotune_times_candidates_and_leaves_no_trace(device, monkeypatch):
    """AIGC_FAST_AUTOTUNE=1: the first launch of each shape runs every candidate tile of the rule
    (tiles.conv_candidates) in turn; the fastest (here, by a stand-in clock, the last tried) serves
    that launch and every later one of its shape. The trials leave no trace: outputs, gradients
    and running statistics (updated once per step, not once per trial) match float64."""
    from aigc_fast.kernels import autotune, chain_gemm, tiles

    monkeypatch.setenv("AIGC_FAST_AUTOTUNE", "1")
    ran, clock = [], []
    real_launch = chain_gemm._launch_conv
    monkeypatch.setattr(chain_gemm, "_launch_conv",
                        lambda launch: ran.append(launch) or real_launch(launch))

    def stand_in_clock(run, device):
        run()
        clock.append(None)
        return -len(clock)  # each trial faster than the one before

    monkeypatch.setattr(autotune, "_median_seconds", stand_in_clock)
    autotune.forget()
    torch.manual_seed(32)
    model = randomize_batch_norms_(nn.Sequential(
        nn.Conv2d(3, 6, 3, 1, 1, bias=False), nn.BatchNorm2d(6), nn.ReLU(),
        nn.Conv2d(6, 1, 4, 1, 0, bias=False)))
    reference = copy.deepcopy(model).double()
    fuse(model)
    try:
        assert_matches_reference(model, reference, lambda: torch.randn(2, 3, 4, 4), device,
                                 train_steps=2)
    finally:
        autotune.forget()

    def shape(launch):
        c = launch.constexprs
        return launch.x_shape, launch.c_out, c["OUT_MODE"], c["A_MODE"], c["O_TRAINING"]

    first = ran[0]  # the first layer's training forward (2 x 4 x 4 rows, 6 x 27 columns)
    candidates = tiles.conv_candidates(tiles.conv_tile(32, 1, 6, 3, 9, True, 8, 90))
    assert len(candidates) >= 3
    assert [launch.tile for launch in ran[:len(candidates)]] == candidates
    same_shape = [launch.tile for launch in ran[len(candidates):] if shape(launch) == shape(first)]
    assert len(same_shape) == 2 and set(same_shape) == {candidates[-1]}  # a launch per step

