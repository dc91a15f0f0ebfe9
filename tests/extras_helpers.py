"""The optional extras in tests: :func:`require_extra` imports one for a test marked ``extras``.

Where the extra is missing (or, like torchvision beside the CPU build of torch, installed but
broken) the test is skipped with the reason; with AIGC_FAST_REQUIRE_EXTRAS=1 (CI's environment
of the extras) it fails instead, so no extra's test goes unrun in CI.
"""
import importlib
import os

import pytest
import torch

REQUIRE_ENV = "AIGC_FAST_REQUIRE_EXTRAS"


def require_extra(module):
    try:
        return importlib.import_module(module)
    except Exception as err:  # ImportError, or RuntimeError from a torchvision of another torch
        if os.environ.get(REQUIRE_ENV) == "1":
            pytest.fail(f"{REQUIRE_ENV}=1 and `import {module}` failed: {err!r}")
        pytest.skip(f"optional extra {module} is not usable here ({type(err).__name__}: "
                    f"{str(err)[:120]})")


def inception_weights(path):
    """A randomly initialised state_dict of torch-fidelity's inception-v3-compat extractor, saved
    to ``path``. Its convolutions are Kaiming normal (variance-preserving): with PyTorch's default
    init the 2048 features of the 90-odd layers vanish and every FID is ~1e-13."""
    from unittest import mock

    from torch_fidelity import feature_extractor_inceptionv3 as fe

    # build the module without its weights: no download, and no load of a file we do not have
    with mock.patch.object(fe, "load_state_dict_from_url", lambda *a, **k: {}), \
            mock.patch.object(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda *a: None):
        model = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    torch.manual_seed(0)
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(m.weight)
    torch.save(model.state_dict(), path)
    return str(path)


def vgg16_weights(path):
    """A randomly initialised torchvision vgg16 state_dict (its own init: Kaiming normal convs)."""
    import torchvision

    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16().state_dict(), path)
    return str(path)
