"""Drop-in modules backed by the fused ops, and ``fuse``/``unfuse``, which convert an existing model
in place with its state_dict unchanged."""
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn.modules.lazy import LazyModuleMixin

from . import functional


# --- ConvTranspose2d + BatchNorm2d + ReLU -------------------------------------------------------


def _batch_norm_momentum(bn):
    """The running-average factor of a tracking ``bn`` (the only kind fused) for this call, as
    BatchNorm2d.forward computes it after advancing ``num_batches_tracked`` (which
    :func:`_advance_batch_count` does once the op has accepted the call). ``momentum=None``
    (cumulative average) gives the 0-dim tensor ``1 / (num_batches_tracked + 1)``: nothing is read
    back to the host."""
    if not bn.training:
        return 0.0  # eval mode reads the running stats and does not update them
    return 1.0 / (bn.num_batches_tracked + 1) if bn.momentum is None else bn.momentum


def _advance_batch_count(bn):
    """BatchNorm2d's ``num_batches_tracked += 1`` in training, after the fused op ran: a call the op
    rejects (bad input) leaves every piece of state as it was."""
    if bn.training:
        bn.num_batches_tracked.add_(1)


def _fused_forward(conv, bn, x, output_size=None):
    """``relu(bn(conv(x, output_size)))`` through the fused op, reading the modules' parameters,
    buffers and mode."""
    output_padding = conv.output_padding if output_size is None else conv._output_padding(
        x, output_size, conv.stride, conv.padding, conv.kernel_size, 2, conv.dilation)
    out = functional.conv_transpose_bn_relu(
        x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bias=conv.bias,
        stride=conv.stride, padding=conv.padding, output_padding=output_padding,
        training=bn.training, momentum=_batch_norm_momentum(bn), eps=bn.eps)
    _advance_batch_count(bn)
    return out


class _WarnIfRunUnfused:
    """Forward pre-hook that :func:`fuse` puts on the first module of each run it reports fused.
    FusedSequential runs a fused run without calling its modules, so a call means the run ran
    unfused after all: its parent called the modules one by one (``for m in self.main: x = m(x)``),
    or the run stopped qualifying (a hook added later). Warns once, naming the run, so the report
    never stands uncorrected. A run with lazy modules runs eagerly once by design: that call is
    let pass."""

    def __init__(self, run, lazy):
        self.run, self.unfused_calls_left = run, int(lazy)  # -1 once it has warned

    def __call__(self, module, args):
        if self.unfused_calls_left < 0 or torch.compiler.is_compiling():
            return
        self.unfused_calls_left -= 1
        if self.unfused_calls_left < 0:
            warnings.warn(f"aigc_fast.fuse: {self.run}, reported fused, ran unfused: its modules were "
                          "called one by one (does the parent iterate over or index its "
                          "nn.Sequential? call the Sequential itself to run the fused op), or the run "
                          "no longer qualifies (see fuse(verbose=True))", stacklevel=2)


def _uninitialized_lazy(*modules):
    """Whether any of ``modules`` is a lazy module still waiting for its first forward."""
    return any(isinstance(m, LazyModuleMixin) and m.has_uninitialized_params() for m in modules)


def _is_or_becomes(module, cls):
    """isinstance, also for a lazy module whose first forward turns it into ``cls`` (LazyBatchNorm2d
    is no BatchNorm2d until then)."""
    return isinstance(module, cls) or (_uninitialized_lazy(module)
                                       and issubclass(module.cls_to_become or object, cls))


def _is_bookkeeping_hook(hook):
    """Hooks that do not look at a module's input or output: fuse()'s warning and a lazy module's
    parameter inference (which runs, and removes itself, at the first forward)."""
    return (isinstance(hook, _WarnIfRunUnfused)
            or getattr(hook, "__func__", None) is LazyModuleMixin._infer_parameters)


def _has_hooks(module):
    """Hooks expect to see this module's own input and output, which a fused run never materialises."""
    pre_hooks = [h for h in module._forward_pre_hooks.values() if not _is_bookkeeping_hook(h)]
    return bool(pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks)


def _overrides_forward(module, base):
    return type(module).forward is not base.forward


def _why_not_fusable(conv, bn, lazy_ok=False):
    """None when ``relu(bn(conv(x)))`` can run as the fused op with the same result and state updates,
    else the reason, for ``fuse(verbose=True)``. ``lazy_ok``: judge lazy modules by what they will be
    once their first forward has initialised them (as fuse() does), not as they are now."""
    lazy = _uninitialized_lazy(conv, bn)
    if lazy and not lazy_ok:
        return "a lazy module is not initialised yet (its first forward does it)"
    if _overrides_forward(conv, nn.ConvTranspose2d):
        return f"{type(conv).__name__} overrides ConvTranspose2d.forward"
    if conv.groups != 1:
        return f"ConvTranspose2d has groups={conv.groups} (the fused op needs 1)"
    if tuple(conv.dilation) != (1, 1):
        return f"ConvTranspose2d has dilation={tuple(conv.dilation)} (the fused op needs 1)"
    if _has_hooks(conv):
        return "the ConvTranspose2d has hooks"
    if _overrides_forward(bn, nn.BatchNorm2d):
        return f"{type(bn).__name__} overrides BatchNorm2d.forward"
    if not bn.affine:
        return "BatchNorm2d has affine=False"
    if not bn.track_running_stats:
        return "BatchNorm2d has track_running_stats=False"
    if bn.num_features != conv.out_channels and not _uninitialized_lazy(bn):
        return (f"BatchNorm2d has num_features={bn.num_features} but the ConvTranspose2d gives "
                f"{conv.out_channels} channels")
    if _has_hooks(bn):
        return "the BatchNorm2d has hooks"
    return None


class _ConvBN(nn.Module):
    """Base of the fused conv -> BatchNorm2d -> activation modules. The state lives in the children
    ``conv`` and ``bn``, so their state_dicts load unchanged, and BN's bookkeeping (num_batches_tracked,
    momentum=None, eval mode) is PyTorch's. ``weight`` and ``bias`` are the conv's, so code written for
    the conv finds them: pytorch/examples' ``weights_init`` initialises every module whose class name
    contains "Conv" through ``m.weight``. A configuration the fused op cannot run (``why_not_fused``)
    is accepted, as PyTorch accepts it, and runs eagerly; construction warns once."""

    def __init__(self, conv, *, eps, momentum, affine, track_running_stats, device, dtype):
        super().__init__()
        self.conv = conv
        self.bn = nn.BatchNorm2d(conv.out_channels, eps, momentum, affine, track_running_stats,
                                 device=device, dtype=dtype)
        reason = self.why_not_fused()
        if reason is not None:
            warnings.warn(f"{type(self).__name__}: {reason}: this module runs eagerly, unfused",
                          stacklevel=3)

    def why_not_fused(self):
        """None when the children run as the fused op, else the reason."""
        raise NotImplementedError

    @property
    def weight(self):
        return self.conv.weight

    @property
    def bias(self):
        return self.conv.bias


class ConvTransposeBNReLU(_ConvBN):
    """ConvTranspose2d -> BatchNorm2d -> ReLU as one fused op, a drop-in for that nn.Sequential. Its
    arguments are nn.ConvTranspose2d's, in its order and with its defaults (``bias=True``; a BN that
    follows makes the bias redundant, so DCGANs pass ``bias=False``), then BatchNorm2d's as keywords.
    ``forward`` takes ConvTranspose2d's ``output_size`` too. Children that the fused op cannot
    reproduce (see :func:`fuse`'s rules, e.g. a BN swapped for a non-tracking one) run eagerly."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
                 groups=1, bias=True, dilation=1, padding_mode="zeros", device=None, dtype=None, *,
                 eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        conv = nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride, padding,
                                  output_padding, groups, bias, dilation, padding_mode, device, dtype)
        super().__init__(conv, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)

    def why_not_fused(self):
        return _why_not_fusable(self.conv, self.bn)

    def forward(self, x, output_size=None):
        if self.why_not_fused() is None:
            return _fused_forward(self.conv, self.bn, x, output_size)
        return torch.relu(self.bn(self.conv(x, output_size)))


# --- sigmoid + binary cross-entropy -------------------------------------------------------------


class BCEWithLogitsLoss(nn.BCEWithLogitsLoss):
    """nn.BCEWithLogitsLoss through the fused kernel. A subclass with PyTorch's constructor, so the
    buffers (weight, pos_weight) and state_dict are the same, and swapping the class of an existing
    nn.BCEWithLogitsLoss to this one is enough to fuse it (``impl`` then is the class default)."""

    impl = "auto"

    def __init__(self, weight=None, size_average=None, reduce=None, reduction="mean",
                 pos_weight=None, *, impl="auto"):
        super().__init__(weight, size_average, reduce, reduction, pos_weight)
        self.impl = impl

    def forward(self, input, target):
        return functional.bce_with_logits(input, target, weight=self.weight,
                                          pos_weight=self.pos_weight, reduction=self.reduction,
                                          impl=self.impl)


class BCELoss(nn.BCELoss):
    """nn.BCELoss through the fused kernel; see :class:`BCEWithLogitsLoss`."""

    impl = "auto"

    def __init__(self, weight=None, size_average=None, reduce=None, reduction="mean", *,
                 impl="auto"):
        super().__init__(weight, size_average, reduce, reduction)
        self.impl = impl

    def forward(self, input, target):
        return functional.binary_cross_entropy(input, target, weight=self.weight,
                                               reduction=self.reduction, impl=self.impl)


# --- fuse / unfuse ------------------------------------------------------------------------------

_RUN_RULE = ("a run fuses only when ConvTranspose2d, BatchNorm2d and ReLU are consecutive children "
             "of one nn.Sequential")


def _not_a_run(rest):
    """Why a ConvTranspose2d followed by ``rest`` (its next two siblings, fewer at the end of its
    Sequential) is not a ConvTranspose2d -> BatchNorm2d -> ReLU run. A run split across nested
    Sequentials (its rest in a child Sequential, or past the end of this one) says so."""
    found = " -> ".join(("a nested " if isinstance(m, nn.Sequential) else "") + type(m).__name__
                        for m in rest)
    cut = len(rest) < 2 and all(isinstance(m, (nn.BatchNorm2d, nn.Sequential)) for m in rest)
    if cut:
        found += (", then " if found else "") + "the end of its nn.Sequential"
    split = cut or any(isinstance(m, nn.Sequential) for m in rest)
    return f"followed by {found}, not BatchNorm2d -> ReLU" + (f" ({_RUN_RULE})" if split else "")


def _why_run_not_fusable(modules, i, lazy_ok=False):
    """None when ``modules[i:i+3]`` (``modules[i]`` a ConvTranspose2d) is a ConvTranspose2d ->
    BatchNorm2d -> ReLU run that runs fused, else the reason (``lazy_ok`` as in _why_not_fusable)."""
    rest = modules[i + 1:i + 3]
    if (len(rest) < 2 or not _is_or_becomes(rest[0], nn.BatchNorm2d)
            or not isinstance(rest[1], nn.ReLU)):
        return _not_a_run(rest)
    if _overrides_forward(rest[1], nn.ReLU):
        return f"{type(rest[1]).__name__} overrides ReLU.forward"
    if _has_hooks(rest[1]):
        return "the ReLU has hooks"
    return _why_not_fusable(modules[i], rest[0], lazy_ok)


class FusedSequential(nn.Sequential):
    """An nn.Sequential that runs each fusable ConvTranspose2d -> BatchNorm2d -> ReLU run of its
    children as one fused op. :func:`fuse` swaps a Sequential's class to this one, so the children,
    hence the state_dict keys, stay where they were; :func:`unfuse` swaps it back. Fusability is
    checked at every call, so a hook or module added later is honoured (that run then runs eagerly),
    and a lazy run runs eagerly once, then fused."""

    def forward(self, input):
        modules = list(self._modules.values())
        i = 0
        while i < len(modules):
            if isinstance(modules[i], nn.ConvTranspose2d) and _why_run_not_fusable(modules, i) is None:
                input = _fused_forward(modules[i], modules[i + 1], input)
                i += 3
            else:
                input = modules[i](input)
                i += 1
        return input


@dataclass
class _Run:
    """A ConvTranspose2d in a model and what fuse() makes of it: ``reason`` None when fused, then
    ``names``/``modules`` hold the whole run (else the ConvTranspose2d alone)."""

    names: list
    modules: list
    parent: nn.Module
    reason: Optional[str]

    def describe(self):
        return " -> ".join(self.names)


def _conv_transpose_runs(model):
    """A :class:`_Run` for every ConvTranspose2d child in ``model``."""
    for parent_name, parent in model.named_modules():
        names, modules = list(parent._modules), list(parent._modules.values())
        for i, child in enumerate(modules):
            if not isinstance(child, nn.ConvTranspose2d):
                continue
            if type(parent) in (nn.Sequential, FusedSequential):
                reason = _why_run_not_fusable(modules, i, lazy_ok=True)
            elif isinstance(parent, ConvTransposeBNReLU):
                reason = "inside a ConvTransposeBNReLU, which is already fused"
            elif isinstance(parent, nn.Sequential):
                reason = (f"inside {type(parent).__name__}, a subclass of nn.Sequential (its forward "
                          "may differ; only plain nn.Sequential is rewritten)")
            else:
                reason = f"inside {type(parent).__name__}, not an nn.Sequential"
            end = i + 3 if reason is None else i + 1
            yield _Run([f"{parent_name}.{n}" if parent_name else n for n in names[i:end]],
                       modules[i:end], parent, reason)


def _run_warnings(module):
    """The keys of fuse()'s :class:`_WarnIfRunUnfused` hooks on ``module``."""
    return [key for key, hook in module._forward_pre_hooks.items()
            if isinstance(hook, _WarnIfRunUnfused)]


# the loss classes fuse() swaps in (a subclass each: same buffers and state_dict), and unfuse() back
_FUSED_LOSSES = {nn.BCEWithLogitsLoss: BCEWithLogitsLoss, nn.BCELoss: BCELoss}
_UNFUSED = {FusedSequential: nn.Sequential, **{v: k for k, v in _FUSED_LOSSES.items()}}


def _check_model(model):
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _losses(model):
    """``(name, module)`` of every BCE loss module in ``model`` (itself included), fused or not."""
    kinds = (*_FUSED_LOSSES, *_FUSED_LOSSES.values())
    return [(name or "(the model)", m) for name, m in model.named_modules() if type(m) in kinds]


def _print_report(runs, losses):
    fused = [run for run in runs if run.reason is None]
    print(f"aigc_fast.fuse: fused {len(fused)} ConvTranspose2d -> BatchNorm2d -> ReLU run(s) and "
          f"{len(losses)} BCE loss(es); left {len(runs) - len(fused)} ConvTranspose2d as they are")
    for run in fused:
        lazy = _uninitialized_lazy(*run.modules)
        print(f"  fused {run.describe()}"
              + (" (from its second call: the first initialises its lazy modules)" if lazy else ""))
    for name, loss in losses:
        print(f"  fused {name} ({type(loss).__name__})")
    for run in runs:
        if run.reason is not None:
            print(f"  left  {run.names[0]}: {run.reason}")
    if fused:
        print("  (a fused run runs fused when its nn.Sequential is called; if its modules are called "
              "one by one, it runs unfused and warns)")


def fuse(model, verbose=False):
    """Rewrite ``model`` in place, and return it, so that every ConvTranspose2d -> BatchNorm2d -> ReLU
    run inside an nn.Sequential, at any depth, runs as the fused op when that Sequential is called,
    and every nn.BCEWithLogitsLoss / nn.BCELoss module in it (or ``model`` itself being one) runs the
    fused loss. No module moves, so the state_dict keys are unchanged (checkpoints load both ways
    with strict=True). Runs the fused op cannot reproduce exactly (groups or dilation != 1,
    affine=False or non-tracking BatchNorm, mismatched channels, subclasses overriding forward,
    modules with hooks) are left as they are; lazy modules fuse from their second call.
    ``verbose=True`` prints what was fused and what was left, and why. A fused run whose modules are
    called one by one (a parent that iterates over the Sequential) runs unfused and warns once.
    Calling it twice is harmless."""
    _check_model(model)
    runs = list(_conv_transpose_runs(model))
    for run in runs:
        if run.reason is None:
            if type(run.parent) is nn.Sequential:
                run.parent.__class__ = FusedSequential
            if not _run_warnings(run.modules[0]):
                run.modules[0].register_forward_pre_hook(
                    _WarnIfRunUnfused(run.describe(), _uninitialized_lazy(*run.modules)))
    losses = _losses(model)
    for _, loss in losses:
        if type(loss) in _FUSED_LOSSES:
            loss.__class__ = _FUSED_LOSSES[type(loss)]
    if verbose:
        _print_report(runs, losses)
    return model


def unfuse(model):
    """Undo :func:`fuse` in place and return ``model``: it runs eagerly again, state unchanged."""
    _check_model(model)
    for module in model.modules():
        if type(module) in _UNFUSED:
            module.__class__ = _UNFUSED[type(module)]
        for key in _run_warnings(module):
            del module._forward_pre_hooks[key]
    return model
