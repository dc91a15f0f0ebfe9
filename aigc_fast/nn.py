"""Drop-in modules backed by the fused ops, and ``fuse``/``unfuse``, which convert an existing model
in place with its state_dict unchanged."""
import torch
from torch import nn

from . import functional


# --- ConvTranspose2d + BatchNorm2d + ReLU -------------------------------------------------------


def _batch_norm_momentum(bn):
    """The running-average factor of a tracking ``bn`` (the only kind fused), after advancing
    ``num_batches_tracked`` in training as BatchNorm2d.forward does. ``momentum=None`` (cumulative
    average) gives the 0-dim tensor ``1 / num_batches_tracked``: nothing is read back to the host."""
    if not bn.training:
        return 0.0  # eval mode reads the running stats and does not update them
    bn.num_batches_tracked.add_(1)
    return 1.0 / bn.num_batches_tracked if bn.momentum is None else bn.momentum


def _fused_forward(conv, bn, x):
    """``relu(bn(conv(x)))`` through the fused op, reading the modules' parameters, buffers and mode."""
    return functional.conv_transpose_bn_relu(
        x, conv.weight, bn.weight, bn.bias, bn.running_mean, bn.running_var, bias=conv.bias,
        stride=conv.stride, padding=conv.padding, output_padding=conv.output_padding,
        training=bn.training, momentum=_batch_norm_momentum(bn), eps=bn.eps)


def _has_hooks(module):
    """Hooks expect to see this module's own input and output, which a fused run never materialises."""
    return bool(module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks)


def _overrides_forward(module, base):
    return type(module).forward is not base.forward


def _why_not_fusable(conv, bn):
    """None when ``relu(bn(conv(x)))`` can run as the fused op with the same result and state updates,
    else the reason, for ``fuse(verbose=True)``."""
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
    if bn.num_features != conv.out_channels:
        return (f"BatchNorm2d has num_features={bn.num_features} but the ConvTranspose2d gives "
                f"{conv.out_channels} channels")
    if _has_hooks(bn):
        return "the BatchNorm2d has hooks"
    return None


class ConvTransposeBNReLU(nn.Module):
    """ConvTranspose2d -> BatchNorm2d -> ReLU as one fused op. The state lives in the children ``conv``
    (nn.ConvTranspose2d) and ``bn`` (nn.BatchNorm2d), so their state_dicts load unchanged, and BN's
    bookkeeping (num_batches_tracked, momentum=None, eval mode) is PyTorch's. Children that the fused op
    cannot reproduce (see :func:`fuse`'s rules, e.g. a BN swapped for a non-tracking one) run eagerly."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0,
                 bias=False, eps=1e-5, momentum=0.1):
        super().__init__()
        self.conv = nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride, padding,
                                       output_padding, bias=bias)
        self.bn = nn.BatchNorm2d(out_channels, eps=eps, momentum=momentum)

    def forward(self, x):
        if _why_not_fusable(self.conv, self.bn) is None:
            return _fused_forward(self.conv, self.bn, x)
        return torch.relu(self.bn(self.conv(x)))


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


def _why_run_not_fusable(modules, i):
    """None when ``modules[i:i+3]`` (``modules[i]`` a ConvTranspose2d) is a ConvTranspose2d ->
    BatchNorm2d -> ReLU run that runs fused, else the reason."""
    rest = modules[i + 1:i + 3]
    if len(rest) < 2 or not isinstance(rest[0], nn.BatchNorm2d) or not isinstance(rest[1], nn.ReLU):
        found = " -> ".join(type(m).__name__ for m in rest) or "nothing"
        return f"followed by {found}, not BatchNorm2d -> ReLU"
    if _overrides_forward(rest[1], nn.ReLU):
        return f"{type(rest[1]).__name__} overrides ReLU.forward"
    if _has_hooks(rest[1]):
        return "the ReLU has hooks"
    return _why_not_fusable(modules[i], rest[0])


class FusedSequential(nn.Sequential):
    """An nn.Sequential that runs each fusable ConvTranspose2d -> BatchNorm2d -> ReLU run of its
    children as one fused op. :func:`fuse` swaps a Sequential's class to this one, so the children,
    hence the state_dict keys, stay where they were; :func:`unfuse` swaps it back. Fusability is
    checked at every call, so a hook or module added later is honoured (that run then runs eagerly)."""

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


def _conv_transpose_runs(model):
    """``(names, parent, reason)`` for every ConvTranspose2d child in ``model``: ``names`` of the run
    (of the ConvTranspose2d alone when left), ``reason`` None when fuse() makes the run fused."""
    for parent_name, parent in model.named_modules():
        names, modules = list(parent._modules), list(parent._modules.values())
        for i, child in enumerate(modules):
            if not isinstance(child, nn.ConvTranspose2d):
                continue
            if type(parent) in (nn.Sequential, FusedSequential):
                reason = _why_run_not_fusable(modules, i)
            elif isinstance(parent, ConvTransposeBNReLU):
                reason = "inside a ConvTransposeBNReLU, which is already fused"
            elif isinstance(parent, nn.Sequential):
                reason = (f"inside {type(parent).__name__}, a subclass of nn.Sequential (its forward "
                          "may differ; only plain nn.Sequential is rewritten)")
            else:
                reason = f"inside {type(parent).__name__}, not an nn.Sequential"
            run = names[i:i + 3] if reason is None else names[i:i + 1]
            yield [f"{parent_name}.{n}" if parent_name else n for n in run], parent, reason


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


def fuse(model, verbose=False):
    """Rewrite ``model`` in place, and return it, so that every ConvTranspose2d -> BatchNorm2d -> ReLU
    run inside an nn.Sequential, at any depth, runs as the fused op, and every nn.BCEWithLogitsLoss /
    nn.BCELoss module in it (or ``model`` itself being one) runs the fused loss. No module moves, so
    the state_dict keys are unchanged (checkpoints load both ways with strict=True). Runs the fused op
    cannot reproduce exactly (groups or dilation != 1, affine=False or non-tracking BatchNorm,
    mismatched channels, subclasses overriding forward, modules with hooks) are left as they are;
    ``verbose=True`` prints what was fused and what was left, and why. Calling it twice is harmless."""
    _check_model(model)
    runs = list(_conv_transpose_runs(model))
    for _, parent, reason in runs:
        if reason is None and type(parent) is nn.Sequential:
            parent.__class__ = FusedSequential
    losses = _losses(model)
    for _, loss in losses:
        if type(loss) in _FUSED_LOSSES:
            loss.__class__ = _FUSED_LOSSES[type(loss)]
    if verbose:
        fused = [names for names, _, reason in runs if reason is None]
        print(f"aigc_fast.fuse: fused {len(fused)} ConvTranspose2d -> BatchNorm2d -> ReLU run(s) and "
              f"{len(losses)} BCE loss(es); left {len(runs) - len(fused)} ConvTranspose2d as they are")
        for names in fused:
            print(f"  fused {' -> '.join(names)}")
        for name, loss in losses:
            print(f"  fused {name} ({type(loss).__name__})")
        for names, _, reason in runs:
            if reason is not None:
                print(f"  left  {names[0]}: {reason}")
    return model


def unfuse(model):
    """Undo :func:`fuse` in place and return ``model``: it runs eagerly again, state unchanged."""
    _check_model(model)
    for module in model.modules():
        if type(module) in _UNFUSED:
            module.__class__ = _UNFUSED[type(module)]
    return model
