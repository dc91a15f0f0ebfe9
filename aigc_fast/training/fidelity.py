"""FID, KID and precision/recall through torch-fidelity (the optional extra ``aigc_fast[metrics]``).

SWD (:mod:`.metrics`) needs nothing; these are the figures papers report, computed by the library
papers use. Four rules:

- Weights are local files, never downloaded: FID and KID read the Inception state_dict that
  torch-fidelity's ``inception-v3-compat`` extractor loads (``--fid-weights``, or the file named by
  ``AIGC_FAST_FID_WEIGHTS``); precision/recall read torchvision's VGG16 state_dict
  (``--prc-weights``) in a call of their own, since torch-fidelity gives one call one weights file.
- torch-fidelity loads a weights file with ``torch.load(weights_only=False)``, which runs any code
  pickled in it; every file is first loaded here with ``weights_only=True`` and refused, with one
  line, unless it is a plain state_dict of tensors.
- KID's subset size is ``min(1000, n)``: torch-fidelity's 1000, or all the images when fewer.
- A real set's features are cached by torch-fidelity (in ``$TORCH_HOME/fidelity_cache``) under a
  name made of what determines them (data set, size, channels, n, seed, the weights' SHA-256), so a
  training run computes them once.
"""
import hashlib
import json
import os
import warnings

import torch

from .checkpoint import load_weights_only
from .cli import UsageError
from .extras import import_extra

FID_WEIGHTS_ENV = "AIGC_FAST_FID_WEIGHTS"
FIDELITY_METRICS = ("fid", "kid", "prc")
KID_SUBSET_SIZE = 1000
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"  # torch-fidelity's release asset
# the output keys of each metric, and torch-fidelity's name for each
RESULT_KEYS = {
    "fid": {"fid": "frechet_inception_distance"},
    "kid": {"kid_mean": "kernel_inception_distance_mean",
            "kid_std": "kernel_inception_distance_std"},
    "prc": {"precision": "precision", "recall": "recall"},
}


def checked_weights(path, flag):
    """``path`` once it loads with ``weights_only=True`` as a dict of tensors; else UsageError."""
    what = f"{flag} {path}"
    state = load_weights_only(path, what, "a state_dict file of tensors")
    if not isinstance(state, dict) or not state or not all(
            isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise UsageError(f"{what}: holds {type(state).__name__}, not a state_dict; expected a "
                         "dict of parameter names to tensors")
    return os.path.abspath(path)


def fid_weights_path(path):
    """``--fid-weights`` or $AIGC_FAST_FID_WEIGHTS, checked; UsageError naming the file to get."""
    path = path or os.environ.get(FID_WEIGHTS_ENV)
    if not path:
        raise UsageError(f"FID and KID need the Inception weights torch-fidelity uses, which are "
                         f"never downloaded here: get {INCEPTION_FILE} (a release asset of "
                         f"github.com/toshas/torch-fidelity) and pass --fid-weights PATH or set "
                         f"{FID_WEIGHTS_ENV}")
    return checked_weights(path, "--fid-weights")


def prc_weights_path(path):
    if not path:
        raise UsageError("precision/recall need VGG16 weights, which are never downloaded here: "
                         "pass --prc-weights PATH, a state_dict of torchvision's vgg16 (e.g. its "
                         "IMAGENET1K_V1 weights file)")
    return checked_weights(path, "--prc-weights")


class TensorImages(torch.utils.data.Dataset):
    """uint8 images (N, C, H, W) as torch-fidelity reads a Dataset: one RGB uint8 tensor per item
    (grey images repeat their channel)."""

    def __init__(self, images):
        self.images = images

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        image = self.images[i]
        return image.expand(3, -1, -1) if image.shape[0] == 1 else image


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def real_cache_name(source, weights):
    """torch-fidelity's cache name for a real set: ``source`` (a JSON-able description of what
    determines the images) and the weights file's content."""
    key = json.dumps({"source": source, "weights": file_sha256(weights)}, sort_keys=True)
    return "aigc_fast-real-" + hashlib.sha256(key.encode()).hexdigest()[:24]


def _calculate(fidelity, what, **kwargs):
    """torch_fidelity.calculate_metrics, its errors (bad weights, too few images) as one line."""
    try:
        with warnings.catch_warnings():  # its loader's worker count is its own business
            warnings.filterwarnings("ignore", message="This DataLoader will create")
            return fidelity.calculate_metrics(verbose=False, **kwargs)
    except Exception as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise UsageError(f"{what}: torch-fidelity failed ({type(err).__name__}: {reason[:240]})")


def fidelity_scores(fake, real, metrics, n, fid_weights=None, prc_weights=None, device=None,
                    real_source=None):
    """{"fid", "kid_mean", "kid_std", "precision", "recall"} (those of ``metrics`` asked for) of
    ``fake`` against ``real``: each a folder path or a Dataset, given to torch-fidelity as it is.

    ``n``: the smaller set's size (KID's subset size is min(1000, n)). ``real_source``: a
    description of ``real`` that makes its features cacheable (None: not cached).
    """
    inception = [m for m in metrics if m in ("fid", "kid")]
    # (weights, metrics, what) of each torch-fidelity call; the weights are checked first, so a
    # missing or unsafe file is refused before anything is imported or read
    calls = []
    if inception:
        calls.append((fid_weights_path(fid_weights), "--metric " + ",".join(inception),
                      dict(fid="fid" in inception, kid="kid" in inception,
                           kid_subset_size=min(KID_SUBSET_SIZE, n))))
    if "prc" in metrics:
        calls.append((prc_weights_path(prc_weights), "--metric prc", dict(prc=True)))
    fidelity = import_extra("torch_fidelity", f"--metric {','.join(metrics)}")
    scores = {}
    for weights, what, asked in calls:
        name = real_cache_name(real_source, weights) if real_source is not None else None
        scores.update(_calculate(fidelity, what, input1=fake, input2=real,
                                 cuda=device is not None and device.type == "cuda",
                                 feature_extractor_weights_path=weights, input2_cache_name=name,
                                 **asked))
    return {ours: float(scores[theirs]) for m in metrics for ours, theirs in RESULT_KEYS[m].items()}
