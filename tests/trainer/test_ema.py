"""The EMA of G's weights: the closed form, the ramp-up, buffers copied, no host sync."""
import math

import pytest
import torch
from torch import nn

from aigc_fast.training.ema import EMA


def _net(seed=0):
    """A parameter-and-BatchNorm module like G's layers (odd sizes)."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.ConvTranspose2d(3, 5, 3, bias=False), nn.BatchNorm2d(5), nn.ReLU())


def _step_to(module, seed):
    """Set every parameter to fresh random values (a stand-in for an optimiser step); returns
    them in float64, and runs a training forward so the BatchNorm buffers move too."""
    g = torch.Generator().manual_seed(seed)
    values = []
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
            values.append(p.double().clone())
        module(torch.randn(4, 3, 2, 3, generator=g))
    return values


def _params(module):
    return [p.detach().double() for p in module.parameters()]


def test_constant_decay_matches_the_closed_form():
    d, k = 0.9, 7
    G = _net()
    p = [_params(G)]  # p_0: the weights the average starts from
    ema = EMA(G, d, rampup=None)
    for t in range(1, k + 1):
        p.append(_step_to(G, seed=t))
        ema.update(t)
    for j, got in enumerate(_params(ema.module)):
        # ema_k = d^k p_0 + (1 - d) * sum_{i=1..k} d^(k-i) p_i
        expected = d**k * p[0][j] + (1 - d) * sum(d ** (k - i) * p[i][j] for i in range(1, k + 1))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        assert not torch.allclose(got, p[k][j], atol=1e-3)  # an average, not the last weights


def test_ramp_up_decays_match_the_product_form():
    d, k = 0.999, 6
    G = _net(1)
    p = [_params(G)]
    ema = EMA(G, d, rampup=0.05)
    decays = [ema.decay_at(t) for t in range(1, k + 1)]
    for t in range(1, k + 1):
        p.append(_step_to(G, seed=10 + t))
        ema.update(t)
    # weight of p_i: (1 - d_i) * prod_{j>i} d_j, and prod_j d_j for p_0
    weights = [math.prod(decays)] + [(1 - decays[i - 1]) * math.prod(decays[i:])
                                     for i in range(1, k + 1)]
    assert sum(weights) == pytest.approx(1.0)
    for j, got in enumerate(_params(ema.module)):
        expected = sum(w * p[i][j] for i, w in enumerate(weights))
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_ramp_up_schedule():
    ema = EMA(_net(), 0.999, rampup=0.05)
    # half-life of update t is capped at 5% of t: d_t = 0.5 ** (1 / (0.05 t)) until it reaches 0.999
    assert ema.decay_at(1) == pytest.approx(0.5**20)
    assert ema.decay_at(1000) == pytest.approx(0.5 ** (1 / 50))
    full = math.ceil(math.log(0.5) / (0.05 * math.log(0.999)))  # 13 860
    assert ema.decay_at(full - 1) < 0.999 == ema.decay_at(full) == ema.decay_at(10 * full)
    steps = [ema.decay_at(t) for t in range(1, 3000, 7)]
    assert steps == sorted(steps)
    assert EMA(_net(), 0.9, rampup=None).decay_at(1) == 0.9


def test_buffers_are_copied_and_the_copy_is_detached():
    G = _net(2)
    ema = EMA(G, 0.99)
    assert not ema.module.training and not any(p.requires_grad for p in ema.module.parameters())
    assert all(p.requires_grad for p in G.parameters()) and G.training  # the source is untouched
    _step_to(G, seed=3)
    ema.update(1)
    for (name, own), theirs in zip(ema.module.named_buffers(), G.buffers()):
        assert torch.equal(own, theirs), name  # running_mean/var and num_batches_tracked
        assert own.data_ptr() != theirs.data_ptr()
    before = [p.clone() for p in ema.module.parameters()]
    with torch.no_grad():
        for p in G.parameters():
            p.add_(1.0)  # no update: the average must not follow (no shared storage)
    assert all(torch.equal(a, b) for a, b in zip(before, ema.module.parameters()))


def test_update_never_syncs_with_the_host(monkeypatch):
    G = _net(3)
    ema = EMA(G, 0.999)

    def forbidden(*args, **kwargs):
        raise AssertionError("host sync inside EMA.update")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    ema.update(5)
    monkeypatch.undo()


@pytest.mark.parametrize("decay", [0.0, 1.0, -0.5, 1.5])
def test_bad_decay_is_a_value_error(decay):
    with pytest.raises(ValueError, match="decay must be in \\(0, 1\\)"):
        EMA(_net(), decay)
    with pytest.raises(ValueError, match="rampup must be > 0"):
        EMA(_net(), 0.9, rampup=0.0)
