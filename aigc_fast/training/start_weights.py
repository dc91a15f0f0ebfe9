"""``--netG`` / ``--netD``: start a new run from saved weights, as pytorch/examples' dcgan does.

Their files are plain ``state_dict``s (``netG_epoch_N.pth``) whose keys (``main.N.*``) are ours;
a checkpoint of ours works too (its "G" or "D"). Both load with ``weights_only=True``.
"""
from .checkpoint import load_state_checked, load_weights_only


def _state_dict(path, flag, key):
    what = f"{flag} {path}"
    state = load_weights_only(path, what, f"a state_dict file, or a checkpoint holding {key}")
    if isinstance(state, dict) and isinstance(state.get(key), dict):
        return state[key]  # a checkpoint of aigc_fast.train
    return state


def load_start_weights(G, D, net_g=None, net_d=None):
    """Load ``net_g`` into G and ``net_d`` into D (either may be None); UsageError on mismatch."""
    for module, path, flag, key in ((G, net_g, "--netG", "G"), (D, net_d, "--netD", "D")):
        if path:
            load_state_checked(module, _state_dict(path, flag, key), f"{flag} {path}")
