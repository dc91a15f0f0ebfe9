"""GAN variants through the fused path: losses, gradient penalty, lazy R1, spectral norm,
DiffAugment, class-conditional G and D, and 16..256 px models.

Each variant trains 2 steps (1 at 128 and 256 px) with our kernels (interpreted on the CPU) in
float32 and is held against the same steps in eager float64 PyTorch: losses, parameters and
running statistics within REL_TOL. The same variants run through the CLI with --backend eager
and fused from one --seed, and their checkpoints agree under the same keys. The augmentation
policies and the penalties are checked against direct implementations on fresh random data.
"""
import copy
import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from aigc_fast import chain
from aigc_fast.models import build_models
from aigc_fast.nn import fuse
from aigc_fast.train import main
from aigc_fast.training import augment
from aigc_fast.training.backends import prepare_backend, train_step
from aigc_fast.training.losses import GP_WEIGHT, Objective
from aigc_fast.training.variant import VARIANT_KEYS, graph_blocker
from cli_helpers import assert_one_line_error, run_cli

REL_TOL = 1e-4  # float32 (no tf32) against float64


def _rel(a, b, floor=1e-12):
    a, b = a.double(), b.double()
    return ((a - b).norm() / max(b.norm().item(), floor)).item()


# --- DiffAugment against direct implementations ---------------------------------------------------


def _images(n=3, c=3, h=16, w=12, seed=0, dtype=torch.float64):
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_translation_moves_each_image_and_fills_zeros():
    x = _images()
    dy, dx = torch.tensor([2, -1, 0]), torch.tensor([-2, 1, 2])
    got = augment.translate(x, dy, dx)
    for i in range(len(x)):
        want = torch.zeros_like(x[i])
        h, w = x.shape[2:]
        for r in range(h):
            for c in range(w):
                if 0 <= r + dy[i] < h and 0 <= c + dx[i] < w:
                    want[:, r, c] = x[i, :, r + dy[i], c + dx[i]]
        torch.testing.assert_close(got[i], want, rtol=0, atol=0)


def test_cutout_zeroes_one_half_side_square():
    x = _images(h=16, w=10)
    cy, cx = torch.tensor([0, 9, 16]), torch.tensor([3, 10, 5])
    got = augment.cutout(x, cy, cx)
    for i in range(len(x)):
        want = x[i].clone()
        top, left = max(int(cy[i]) - 4, 0), max(int(cx[i]) - 2, 0)  # sides 8 and 5: half-sides 4, 2
        want[:, top:int(cy[i]) - 4 + 8, left:int(cx[i]) - 2 + 5] = 0
        torch.testing.assert_close(got[i], want, rtol=0, atol=0)


def test_color_is_the_papers_formula_with_draws_independent_of_dtype():
    x = _images()
    got = augment.color(x, torch.Generator().manual_seed(4))
    got32 = augment.color(x.float(), torch.Generator().manual_seed(4))
    b, s, c = torch.rand(3, 3, generator=torch.Generator().manual_seed(4)).double().view(3, 3)
    b, s, c = (v.view(3, 1, 1, 1) for v in (b, s, c))
    want = x + (b - 0.5)
    want = (want - want.mean(1, keepdim=True)) * (2 * s) + want.mean(1, keepdim=True)
    want = (want - want.mean((1, 2, 3),
                             keepdim=True)) * (c + 0.5) + want.mean((1, 2, 3), keepdim=True)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    assert _rel(got32, want) < 1e-6


def test_diffaugment_is_differentiable_and_draws_in_range():
    x = _images(n=2, h=8, w=8).requires_grad_()
    policies = augment.parse_policy("translation,cutout,color")

    def apply(x):
        return augment.DiffAugment(policies, torch.Generator().manual_seed(1))(x)

    assert torch.autograd.gradcheck(apply, (x,))
    dy, dx = augment.draw_translation(_images(n=500, h=16, w=16), torch.Generator().manual_seed(2))
    assert set(dy.tolist()) == set(dx.tolist()) == set(range(-2, 3))
    assert augment.parse_policy("none") == ()
    with pytest.raises(ValueError, match="color,translation,cutout"):
        augment.parse_policy("translation,flip")


# --- losses and penalties -------------------------------------------------------------------------


def test_losses_match_their_textbook_forms():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(7, generator=g, dtype=torch.float64), torch.randn(7, generator=g,
                                                                               dtype=torch.float64)
    ones, zeros = torch.ones(7, dtype=torch.float64), torch.zeros(7, dtype=torch.float64)
    expected = {  # (D's loss, G's loss)
        "bce": (F.binary_cross_entropy(torch.sigmoid(real), ones)
                + F.binary_cross_entropy(torch.sigmoid(fake), zeros),
                F.binary_cross_entropy(torch.sigmoid(fake), ones)),
        "hinge": (torch.clamp(1 - real, min=0).mean() + torch.clamp(1 + fake, min=0).mean(),
                  -fake.mean()),
        "lsgan": (0.5 * F.mse_loss(real, ones) + 0.5 * F.mse_loss(fake, zeros),
                  0.5 * F.mse_loss(fake, ones)),
        "wgan-gp": (fake.mean() - real.mean(), -fake.mean()),
    }
    for loss, (d_want, g_want) in expected.items():
        objective = Objective(loss)
        torch.testing.assert_close(objective.d_loss(real, fake), d_want, rtol=1e-12, atol=0)
        torch.testing.assert_close(objective.g_loss(fake), g_want, rtol=1e-12, atol=0)


class _Linear(nn.Module):
    """D(x) = <w, x> per image: its input gradient is w, so the penalties have closed forms."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        return (x * self.w).sum((1, 2, 3))


def test_penalties_have_their_closed_forms():
    w = _images(n=1, seed=3)[0]
    D = _Linear(w)
    real, fake = _images(n=4, seed=5), _images(n=4, seed=6)
    objective = Objective("wgan-gp", r1_gamma=0.3, r1_every=4, rng=torch.Generator())
    gp = objective.gradient_penalty(D, real, fake)
    torch.testing.assert_close(gp, GP_WEIGHT * (w.norm() - 1) ** 2, rtol=1e-12, atol=0)
    leaf = real.clone().requires_grad_()
    r1 = objective.r1_penalty(D(leaf), leaf)
    torch.testing.assert_close(r1, 0.5 * 0.3 * 4 * w.square().sum(), rtol=1e-12, atol=0)
    r1.backward()  # the penalty trains D: d(r1)/dw = gamma * K * w
    torch.testing.assert_close(D.w.grad, 0.3 * 4 * w, rtol=1e-12, atol=0)
    assert [objective.r1_due(s) for s in range(6)] == [True, False, False, False, True, False]


def test_variants_that_cannot_be_graphed_say_why():
    base = {"loss": "bce", "r1": 0.0, "augment": ""}
    assert graph_blocker(base) is None
    assert "double backward" in graph_blocker({**base, "loss": "wgan-gp"})
    assert "double backward" in graph_blocker({**base, "r1": 1.0})
    assert "--augment" in graph_blocker({**base, "augment": "color"})


# --- 2 fused steps against eager float64 ----------------------------------------------------------

# (image size, build_models keywords, Objective keywords); each row is a variant of the issue.
# Interpreted, a step's cost grows with the pixels: 128 and 256 px take one step of one image at
# width 1 (about 10 and 21 s on 2 idle CPU cores: the slow marker's).
STEP_VARIANTS = {
    "hinge+sn+augment": (16, dict(spectral_norm=True),
                         dict(loss="hinge", policy="translation,cutout,color")),
    "lsgan+r1+layer": (16, dict(d_norm="layer"), dict(loss="lsgan", r1_gamma=0.5, r1_every=2)),
    "wgan-gp": (16, dict(d_norm="none"), dict(loss="wgan-gp")),
    # the fused BCE, R1 through the conditional D's double backward (head and projection)
    "conditional+r1": (16, dict(num_classes=3), dict(loss="bce", r1_gamma=0.5, r1_every=2)),
    "bce-128px": (128, {}, dict(loss="bce")),
    "bce-256px": (256, {}, dict(loss="bce")),
}


def _objective(bce, seed, loss, policy="", **kwargs):
    rng = torch.Generator().manual_seed(seed)
    return Objective(loss, bce, augment=augment.DiffAugment(augment.parse_policy(policy), rng),
                     rng=rng, **kwargs)


def _adam(module):
    return torch.optim.Adam(module.parameters(), lr=1e-3, betas=(0.5, 0.999))


@pytest.mark.parametrize("variant", [pytest.param(v, marks=pytest.mark.slow) if v.startswith("bce-")
                                     else v for v in STEP_VARIANTS])
def test_fused_steps_match_eager_float64(variant, device, capsys):
    size, model_kwargs, objective_kwargs = STEP_VARIANTS[variant]
    width, batch, steps = (4, 2, 2) if size <= 32 else (1, 1, 1)
    torch.manual_seed(0)
    G, D = build_models(size, nz=8, ngf=width, ndf=width, nc=3, **model_kwargs)
    G64, D64 = copy.deepcopy(G).double(), copy.deepcopy(D).double()
    fused = prepare_backend("fused", G.to(device), D.to(device))
    fuse(fused.G, verbose=True)
    fuse(fused.D, verbose=True)  # fuse() is idempotent: this prints what prepare_backend fused
    report = capsys.readouterr().out
    assert report.count("left 0 convolution(s)") == 2, report
    classes = model_kwargs.get("num_classes", 0)
    assert ("fused head.0" in report) == bool(classes), report  # a conditional D's final conv
    objectives = (_objective(fused.loss_fn, 7, **objective_kwargs),
                  _objective(F.binary_cross_entropy_with_logits, 7, **objective_kwargs))
    opts = (_adam(G), _adam(D)), (_adam(G64), _adam(D64))
    gen = torch.Generator().manual_seed(1)
    for step in range(steps):
        real = torch.rand(batch, 3, size, size, generator=gen) * 2 - 1
        z = torch.randn(batch, 8, generator=gen)
        labels = [torch.randint(classes, (batch,), generator=gen) for _ in range(2 * bool(classes))]
        got = train_step(G, D, *opts[0], real.to(device), z.to(device), objectives[0], step=step,
                         labels=[y.to(device) for y in labels] or None)
        want = train_step(G64, D64, *opts[1], real.double(), z.double(), objectives[1], step=step,
                          labels=labels or None)
        for key in want:
            assert abs(got[key].item() - want[key].item()) <= REL_TOL * max(abs(want[key].item()),
                                                                             1e-2), (step, key)
    for net, net64 in ((G, G64), (D, D64)):
        state64 = net64.state_dict()
        assert net.state_dict().keys() == state64.keys()
        for key, value in net.state_dict().items():
            if value.is_floating_point():
                assert _rel(value.cpu(), state64[key]) <= REL_TOL, (variant, key)
            else:
                assert torch.equal(value.cpu(), state64[key]), (variant, key)


# --- the CLI: eager and fused from one seed -------------------------------------------------------

TINY = ["--ngf", "4", "--ndf", "4", "--nz", "8", "--batch-size", "2", "--workers", "0",
        "--eval-every", "0", "--sample-every", "100", "--seed", "5", "--steps", "2",
        "--image-size", "16"]
CLI_VARIANTS = {
    "hinge+sn+augment+r1": ["--loss", "hinge", "--spectral-norm", "--augment",
                            "translation,cutout,color", "--r1", "0.5", "--r1-every", "2"],
    "wgan-gp": ["--loss", "wgan-gp"],
    "lsgan+layer": ["--loss", "lsgan", "--d-norm", "layer"],
    "conditional+wgan-gp": ["--conditional", "--loss", "wgan-gp"],
}


@pytest.fixture(scope="module")
def npz16(tmp_path_factory):
    import numpy as np

    from aigc_fast.training.data import LazyShapes

    path = tmp_path_factory.mktemp("data") / "shapes16.npz"
    shapes = LazyShapes(8, 16, seed=2)  # with their kinds as the classes of --conditional
    np.savez(path, images=shapes[:].permute(0, 2, 3, 1).numpy(), labels=shapes.labels.numpy())
    return str(path)


def _checkpoint(argv, backend, out):
    """Train ``argv`` through the CLI with ``backend`` into ``out``; its last checkpoint."""
    assert main(argv + ["--backend", backend, "--out", str(out)]) == 0
    return torch.load(out / "checkpoints" / "last.pt", weights_only=True)


def _assert_same_training(eager, other, tol):
    """Two runs' checkpoints: the same variant, G's and D's weights and buffers within ``tol``
    (norm-wise) under the same keys, and the same draws of noise (and fake labels), augmentation
    and penalty weights."""
    for key in VARIANT_KEYS + ("num_classes",):
        assert other["config"][key] == eager["config"][key]
    for net in ("G", "D"):
        assert eager[net].keys() == other[net].keys()
        for key, want in eager[net].items():
            got = other[net][key]
            if want.is_floating_point():
                assert _rel(got, want) <= tol, (net, key)
            else:
                assert torch.equal(got, want), (net, key)
    for stream in ("noise", "variant_rng"):
        assert torch.equal(eager[stream]["state"], other[stream]["state"])


@pytest.mark.parametrize("variant", list(CLI_VARIANTS))
def test_cli_eager_and_fused_checkpoints_agree(variant, tmp_path, npz16, monkeypatch):
    chain_calls = []
    conv_chain = chain.conv_chain
    monkeypatch.setattr(chain, "conv_chain",
                        lambda *a, **k: chain_calls.append(1) or conv_chain(*a, **k))
    argv = TINY + CLI_VARIANTS[variant] + ["--data", npz16]
    eager = _checkpoint(argv, "eager", tmp_path / "eager")
    assert chain_calls == []
    fused = _checkpoint(argv, "fused", tmp_path / "fused")
    # the fused run's convolutions ran as our chains: G once and D three times in each of 2 steps
    assert len(chain_calls) >= 8
    _assert_same_training(eager, fused, REL_TOL)
    assert fused["config"]["num_classes"] == (3 if "--conditional" in CLI_VARIANTS[variant] else 0)
    if "--spectral-norm" in CLI_VARIANTS[variant]:
        assert "main.0.parametrizations.weight.0._u" in fused["D"]


# float32 both: inductor's generated C++ sums in its own order (measured: <= 7e-7 after 2 steps)
COMPILE_TOL = 1e-5


@pytest.mark.slow  # about 30 s each on 2 cores: inductor compiles G and D
@pytest.mark.parametrize("variant", ["hinge+sn+augment+r1", "wgan-gp"])
def test_cli_compile_trains_the_variants_as_eager(variant, tmp_path, npz16):
    """--backend compile (torch.compile of G and D) trains as eager does, from one --seed at batch
    4: hinge with spectral norm, DiffAugment and lazy R1 (due at step 0, not at step 1) on a
    BatchNorm D, and wgan-gp's critic with its gradient penalty. The penalties run D uncompiled
    (AOTAutograd has no double backward), R1's step both of D's forwards of its D phase."""
    argv = TINY + ["--batch-size", "4"] + CLI_VARIANTS[variant] + ["--data", npz16]
    torch._dynamo.reset()
    try:
        compiled = _checkpoint(argv, "compile", tmp_path / "compile")
    finally:
        torch._dynamo.reset()
    _assert_same_training(_checkpoint(argv, "eager", tmp_path / "eager"), compiled, COMPILE_TOL)


def test_resume_refuses_another_variant_and_wgan_gp_refuses_batchnorm(tmp_path, npz16, capsys):
    out = tmp_path / "run"
    assert main(TINY[:-4] + ["--image-size", "16", "--steps", "1", "--data", npz16,
                                   "--backend", "eager", "--loss", "hinge", "--out", str(out)]) == 0
    last = str(out / "checkpoints" / "last.pt")
    capsys.readouterr()
    status, _, err = run_cli(main, TINY + ["--data", npz16, "--resume", last, "--loss", "bce"],
                             capsys, prog="aigc_fast.train")
    assert_one_line_error(status, err, "--loss bce", "'hinge'")
    status, _, err = run_cli(main, TINY + ["--data", npz16, "--resume", last, "--conditional"],
                             capsys, prog="aigc_fast.train")
    assert_one_line_error(status, err, "--conditional True", "checkpoint's False")
    status, _, err = run_cli(main, TINY + ["--data", npz16, "--loss", "wgan-gp", "--d-norm",
                                                 "batch"], capsys, prog="aigc_fast.train")
    assert_one_line_error(status, err, "wgan-gp", "--d-norm none or layer")
    # resuming without the variant flags continues the checkpoint's variant
    assert main(TINY + ["--data", npz16, "--resume", last]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["loss"] == "hinge" and config["d_norm"] == "batch"


def test_conditional_resume_refuses_data_with_other_classes(tmp_path, npz16, capsys):
    """The class embeddings are sized by the data's classes: a resume whose data now has another
    number of classes is one line, not a state_dict shape error."""
    import numpy as np

    data = tmp_path / "d.npz"
    with np.load(npz16) as archive:
        images, labels = archive["images"], archive["labels"]
    np.savez(data, images=images, labels=labels)
    out = tmp_path / "run"
    assert main(TINY[:-4] + ["--image-size", "16", "--steps", "1", "--data", str(data),
                             "--backend", "eager", "--conditional", "--out", str(out)]) == 0
    np.savez(data, images=images, labels=np.arange(len(labels)) % 5)
    capsys.readouterr()
    status, _, err = run_cli(main, ["--resume", str(out / "checkpoints" / "last.pt")], capsys,
                             prog="aigc_fast.train")
    assert_one_line_error(status, err, "trained on 3 classes", "now has 5", "expected the run's")
