"""Every fused op alone, provider by provider: ConvTranspose2d+BatchNorm2d+ReLU at each Generator
layer shape (forward; forward+backward) and BCE-with-logits forward+backward."""
import pytest

from benchmarks.cases import TrainStepCase
from benchmarks.providers import default_device, pair_id, plan

pytest.importorskip("pytest_benchmark")

OPS = [(c, p) for c, p in plan(default_device()) if not isinstance(c, TrainStepCase)]


@pytest.mark.parametrize(("case", "provider"), OPS, ids=[pair_id(c, p) for c, p in OPS])
def test_op(measure_case, case, provider):
    measure_case(case, provider)
