"""impl dispatch: "auto" picks Triton only where the kernels can run, "ref" and AIGC_FAST_IMPL force
a path, and a forced path that cannot run fails loudly instead of silently falling back."""
import pytest
import torch

from aigc_fast import functional


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="impl must be one of"):
        functional.resolve_impl("cuda", torch.device("cpu"))


def test_auto_picks_triton_under_the_interpreter():
    # tests/conftest.py sets TRITON_INTERPRET=1 when there is no GPU
    assert functional.resolve_impl("auto", torch.device("cpu"), torch.float32) == "triton"


def test_auto_falls_back_for_dtypes_the_kernel_lacks(monkeypatch):
    monkeypatch.setattr(functional, "_warned_fallbacks", set())
    with pytest.warns(UserWarning, match="float64"):
        assert functional.resolve_impl("auto", torch.device("cpu"), torch.float64) == "ref"


def test_fallback_warns_once_per_cause(monkeypatch, recwarn, device):
    """A second cause gets its own warning; a cause already reported gets none."""
    monkeypatch.setattr(functional, "_warned_fallbacks", set())
    for _ in range(2):
        assert functional.resolve_impl("auto", device, torch.float64) == "ref"
        assert functional.resolve_impl("auto", device, unsupported="a reason of the op's") == "ref"
    assert [str(w.message) for w in recwarn] == [
        "aigc_fast: Triton kernels cannot run here (this kernel takes torch.float32, "
        "torch.float16, torch.bfloat16, got torch.float64); using the PyTorch reference.",
        "aigc_fast: Triton kernels cannot run here (a reason of the op's); using the PyTorch "
        "reference."]
    with pytest.raises(RuntimeError, match="impl='triton' cannot run: a reason of the op's"):
        functional.resolve_impl("triton", device, unsupported="a reason of the op's")


def test_forced_triton_that_cannot_run_raises():
    with pytest.raises(RuntimeError, match="impl='triton' cannot run: .*float64"):
        functional.resolve_impl("triton", torch.device("cpu"), torch.float64)


def test_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv("AIGC_FAST_IMPL", "ref")
    assert functional.resolve_impl("auto", torch.device("cpu")) == "ref"
    assert functional.resolve_impl("triton", torch.device("cpu")) == "triton"  # explicit wins
    monkeypatch.setenv("AIGC_FAST_IMPL", "fast")
    with pytest.raises(ValueError, match="AIGC_FAST_IMPL"):
        functional.resolve_impl("auto", torch.device("cpu"))


def test_float64_model_runs_through_auto():
    """A float64 fused op (gradient checks, references) falls back to the reference under "auto"."""
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    w = torch.randn(3, 4, 3, 3, dtype=torch.float64)
    g, b = torch.rand(4, dtype=torch.float64) + 0.5, torch.randn(4, dtype=torch.float64)
    out = functional.conv_transpose_bn_relu(x, w, g, b, None, None, stride=2)
    bn = torch.nn.functional.batch_norm(torch.nn.functional.conv_transpose2d(x, w, stride=2), None,
                                        None, g, b, True)
    torch.testing.assert_close(out, torch.relu(bn), rtol=1e-12, atol=1e-12)
