"""One whole DCGAN training step (D on real and fake, then G; Adam), provider by provider."""
import pytest

from benchmarks.cases import TrainStepCase
from benchmarks.providers import default_device, pair_id, plan

pytest.importorskip("pytest_benchmark")

STEPS = [(c, p) for c, p in plan(default_device()) if isinstance(c, TrainStepCase)]


@pytest.mark.parametrize(("case", "provider"), STEPS, ids=[pair_id(c, p) for c, p in STEPS])
def test_train_step(measure_case, case, provider):
    measure_case(case, provider)
