"""Drop-in modules backed by the fused ops, and ``fuse``/``unfuse``, which convert an existing model
in place with its state_dict unchanged."""
import warnings
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn
from torch.nn.modules import module as module_hooks
from torch.nn.modules.lazy import LazyModuleMixin
from torch.nn.utils import parametrize

from . import chain, functional
from .kernels.activations import ACTIVATIONS


# --- Conv2d / ConvTranspose2d [+ BatchNorm2d] [+ ReLU / LeakyReLU] --------------------------------

_CONVS = (nn.Conv2d, nn.ConvTranspose2d)
# the activation modules a run ends with (fuse()'s table entries with a module; a Tanh only ends a
# chain: _trailing_tanh), by class
_ACTIVATIONS = {act.module: name for name, act in ACTIVATIONS.items()
                if act.module is not None and name != "tanh"}


def _activation_kind(act):
    """The fused op's ``activation`` for an nn.ReLU / nn.LeakyReLU module (or None)."""
    if act is None:
        return None
    return next(name for cls, name in _ACTIVATIONS.items() if isinstance(act, cls))


def _link(conv, bn, activation, negative_slope, output_padding=None):
    """The chain's description of ``act(bn(conv(x)))`` (``bn`` a module or None), in the modules'
    current mode."""
    transposed = isinstance(conv, nn.ConvTranspose2d)
    if output_padding is None:
        output_padding = tuple(conv.output_padding) if transposed else (0, 0)
    return chain.Link(transposed, tuple(conv.stride), tuple(conv.padding), tuple(output_padding),
                      bn is not None, bn.eps if bn is not None else 1e-5,
                      bn.momentum if bn is not None else 0.0, activation, negative_slope,
                      bn.training if bn is not None else True)


def _bn_state(bn):
    return (bn.running_mean, bn.running_var, bn.num_batches_tracked) if bn is not None else None


def _fused_forward(conv, bn, activation, negative_slope, x, output_size=None):
    """``act(bn(conv(x, output_size)))`` (bn: a module or None; ``activation``: "relu",
    "leaky_relu" or None) as a chain of one, reading the modules' parameters, buffers and mode (BN's
    num_batches_tracked advances in the kernel, as nn.BatchNorm2d advances it in training)."""
    output_padding = None
    if isinstance(conv, nn.ConvTranspose2d) and output_size is not None:
        output_padding = conv._output_padding(x, output_size, conv.stride, conv.padding,
                                              conv.kernel_size, 2, conv.dilation)
    return chain.conv_chain(x, [_link(conv, bn, activation, negative_slope, output_padding)],
                            [conv.weight], [(bn.weight, bn.bias) if bn is not None else None],
                            [_bn_state(bn)], bias=conv.bias)


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
            warnings.warn(f"aigc_fast.fuse: {self.run}, reported fused, ran unfused: its modules "
                          "were called one by one (does the parent iterate over or index its "
                          "nn.Sequential? call the Sequential itself to run the fused op), or the "
                          "run no longer qualifies (a hook added later, a global module hook: see "
                          "fuse(verbose=True))", stacklevel=2)


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
    """Hooks expect to see this module's own input and output, which a fused run never
    materialises."""
    pre_hooks = [h for h in module._forward_pre_hooks.values() if not _is_bookkeeping_hook(h)]
    return bool(pre_hooks or module._forward_hooks or module._backward_pre_hooks
                or module._backward_hooks)


def _why_global_hooks():
    """The reason every run falls back while a global module hook is registered
    (torch.nn.modules.module.register_module_forward_pre_hook, _forward_hook,
    _full_backward_pre_hook, _full_backward_hook): such a hook expects to see the input and output
    of every module called, which a fused run never materialises. None when there is none."""
    if (module_hooks._global_forward_pre_hooks or module_hooks._global_forward_hooks
            or module_hooks._global_backward_pre_hooks or module_hooks._global_backward_hooks):
        return "a global module hook is registered (torch.nn.modules.module.register_module_*_hook)"
    return None


def _overrides_forward(module, base):
    return type(module).forward is not base.forward


def _why_conv_not_fusable(conv):
    kind = nn.ConvTranspose2d if isinstance(conv, nn.ConvTranspose2d) else nn.Conv2d
    name = kind.__name__
    if _overrides_forward(conv, kind):
        return f"{type(conv).__name__} overrides {name}.forward"
    if conv.groups != 1:
        return f"{name} has groups={conv.groups} (the fused op needs 1)"
    if tuple(conv.dilation) != (1, 1):
        return f"{name} has dilation={tuple(conv.dilation)} (the fused op needs 1)"
    if conv.padding_mode != "zeros":
        return f"{name} has padding_mode={conv.padding_mode!r} (the fused op pads with zeros)"
    if isinstance(conv.padding, str):
        return f"{name} has padding={conv.padding!r} (the fused op takes explicit padding)"
    if _has_hooks(conv):
        return f"the {name} has hooks"
    return None


def _why_bn_not_fusable(conv, bn):
    if _overrides_forward(bn, nn.BatchNorm2d):
        return f"{type(bn).__name__} overrides BatchNorm2d.forward"
    if not bn.affine:
        return "BatchNorm2d has affine=False"
    if not bn.track_running_stats:
        return "BatchNorm2d has track_running_stats=False"
    if bn.num_features != conv.out_channels and not _uninitialized_lazy(bn):
        return (f"BatchNorm2d has num_features={bn.num_features} but the {type(conv).__name__} "
                f"gives {conv.out_channels} channels")
    if _has_hooks(bn):
        return "the BatchNorm2d has hooks"
    return None


def _why_act_not_fusable(act):
    kind = nn.LeakyReLU if isinstance(act, nn.LeakyReLU) else nn.ReLU
    if _overrides_forward(act, kind):
        return f"{type(act).__name__} overrides {kind.__name__}.forward"
    if _has_hooks(act):
        return f"the {kind.__name__} has hooks"
    if kind is nn.LeakyReLU and not act.negative_slope >= 0:
        return f"LeakyReLU has negative_slope={act.negative_slope} (the fused op needs >= 0)"
    return None


def _why_not_fusable(conv, bn, act, lazy_ok=False):
    """None when ``act(bn(conv(x)))`` (bn, act: modules or None) can run as the fused op with the
    same result and state updates, else the reason, for ``fuse(verbose=True)``. ``lazy_ok``: judge
    lazy modules by what they will be once their first forward has initialised them (as fuse()
    does), not as they are now."""
    if _uninitialized_lazy(conv, bn) and not lazy_ok:
        return "a lazy module is not initialised yet (its first forward does it)"
    return (_why_conv_not_fusable(conv) or (bn is not None and _why_bn_not_fusable(conv, bn))
            or (act is not None and _why_act_not_fusable(act)) or None)


class _ConvBN(nn.Module):
    """Base of the fused conv -> BatchNorm2d -> activation modules. The state lives in the children
    ``conv`` and ``bn``, so their state_dicts load unchanged, and BN's bookkeeping
    (num_batches_tracked, momentum=None, eval mode) is PyTorch's. ``weight`` and ``bias`` are the
    conv's, so code written for the conv finds them: pytorch/examples' ``weights_init`` initialises
    every module whose class name contains "Conv" through ``m.weight``. A configuration the fused op
    cannot run (``why_not_fused``) is accepted, as PyTorch accepts it, and runs eagerly;
    construction warns once."""

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
    follows makes the bias redundant, so DCGANs pass ``bias=False``), then BatchNorm2d's as
    keywords. ``forward`` takes ConvTranspose2d's ``output_size`` too. Children that the fused op
    cannot reproduce (see :func:`fuse`'s rules, e.g. a BN swapped for a non-tracking one) run
    eagerly."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0,
                 output_padding=0,
                 groups=1, bias=True, dilation=1, padding_mode="zeros", device=None, dtype=None, *,
                 eps=1e-5, momentum=0.1, affine=True, track_running_stats=True):
        conv = nn.ConvTranspose2d(in_channels, out_channels, kernel_size, stride, padding,
                                  output_padding, groups, bias, dilation, padding_mode,
                                  device, dtype)
        super().__init__(conv, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)

    def why_not_fused(self):
        return _why_not_fusable(self.conv, self.bn, None)

    def forward(self, x, output_size=None):
        if self.why_not_fused() is None and _why_global_hooks() is None:
            return _fused_forward(self.conv, self.bn, "relu", 0.0, x, output_size)
        return torch.relu(self.bn(self.conv(x, output_size)))


class ConvBNAct(_ConvBN):
    """Conv2d -> BatchNorm2d -> LeakyReLU (or ReLU) as one fused op, a drop-in for that
    nn.Sequential (a Discriminator's layer). Its arguments are nn.Conv2d's, in its order and with
    its defaults, then the activation's and BatchNorm2d's as keywords. Children that the fused op
    cannot reproduce run eagerly."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1,
                 groups=1, bias=True, padding_mode="zeros", device=None, dtype=None, *,
                 activation="leaky_relu", negative_slope=0.01, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True):
        if activation not in ("relu", "leaky_relu"):
            raise ValueError(f"activation must be 'relu' or 'leaky_relu', got {activation!r}")
        self.activation, self.negative_slope = activation, negative_slope  # plain attributes
        conv = nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device, dtype)
        super().__init__(conv, eps=eps, momentum=momentum, affine=affine,
                         track_running_stats=track_running_stats, device=device, dtype=dtype)

    def why_not_fused(self):
        if self.activation == "leaky_relu" and not self.negative_slope >= 0:
            return f"negative_slope={self.negative_slope} (the fused op needs >= 0)"
        return _why_not_fusable(self.conv, self.bn, None)

    def forward(self, x):
        if self.why_not_fused() is None and _why_global_hooks() is None:
            return _fused_forward(self.conv, self.bn, self.activation, self.negative_slope, x)
        z = self.bn(self.conv(x))
        if self.activation == "relu":
            return torch.relu(z)
        return torch.nn.functional.leaky_relu(z, self.negative_slope)


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

def _run_at(modules, i):
    """``(conv, bn, act)`` of the run starting at the convolution ``modules[i]``: the BatchNorm2d
    (or a lazy one) and the ReLU / LeakyReLU that follow it, each None when absent."""
    following = modules[i + 1:i + 3] + [None, None]
    bn = following[0] if _is_or_becomes(following[0], nn.BatchNorm2d) else None
    act = following[1 if bn is not None else 0]
    return modules[i], bn, act if isinstance(act, tuple(_ACTIVATIONS)) else None


def _run_length(run):
    return sum(m is not None for m in run)


def _trailing_tanh(modules, i):
    """Whether ``modules[i]`` is an nn.Tanh a chain may absorb (no hooks, forward not
    overridden)."""
    return (i < len(modules) and type(modules[i]) is nn.Tanh and not _has_hooks(modules[i]))


def _fusable_runs(modules, i):
    """(runs, end): the consecutive fusable runs starting at ``modules[i]`` (each (conv, bn, act)),
    and the index after them."""
    runs = []
    if _why_global_hooks() is not None:
        return runs, i
    while i < len(modules) and isinstance(modules[i], _CONVS):
        run = _run_at(modules, i)
        if _why_not_fusable(*run) is not None:
            break
        runs.append(run)
        i += _run_length(run)
    return runs, i


def _chain_groups(runs):
    """``runs`` split into chains: a run whose conv has a bias ends its chain (only a chain's last
    layer may have one), and a chain holds at most CHAIN_MAX_LAYERS runs."""
    groups, group = [], []
    for run in runs:
        group.append(run)
        if run[0].bias is not None or len(group) == chain.ops.CHAIN_MAX_LAYERS:
            groups.append(group)
            group = []
    return groups + ([group] if group else [])


def _chain_forward(runs, tanh, input):
    """``runs`` (and a trailing Tanh when ``tanh``) as one :func:`conv_chain` call."""
    last = len(runs) - 1
    links = [_link(conv, bn, "tanh" if tanh and k == last else _activation_kind(act),
                   getattr(act, "negative_slope", 0.0)) for k, (conv, bn, act) in enumerate(runs)]
    return chain.conv_chain(input, links, [conv.weight for conv, _, _ in runs],
                            [(bn.weight, bn.bias) if bn is not None else None for _, bn, _ in runs],
                            [_bn_state(bn) for _, bn, _ in runs], bias=runs[-1][0].bias)


class FusedSequential(nn.Sequential):
    """An nn.Sequential that runs its fusable Conv2d / ConvTranspose2d [-> BatchNorm2d] [-> ReLU /
    LeakyReLU] runs as chains (:func:`aigc_fast.chain.conv_chain`: consecutive runs as one op, a
    conv bias ending one, a Tanh that ends the runs included). :func:`fuse` swaps a Sequential's
    class to this one, so the children, hence the state_dict keys, stay where they were;
    :func:`unfuse` swaps it back. Fusability is checked at every call, so a hook or module added
    later is honoured (that run then runs eagerly), and a lazy run runs eagerly once, then
    fused."""

    def forward(self, input):
        modules = list(self._modules.values())
        i = 0
        while i < len(modules):
            runs, end = _fusable_runs(modules, i)
            if not runs:
                input = modules[i](input)
                i += 1
                continue
            groups = _chain_groups(runs)
            for group in groups[:-1]:
                input = _chain_forward(group, False, input)
            tail = groups[-1][-1]
            tanh = tail[1] is None and tail[2] is None and _trailing_tanh(modules, end)
            input = _chain_forward(groups[-1], tanh, input)
            i = end + int(tanh)
        return input


@dataclass
class _Run:
    """A Conv2d / ConvTranspose2d in a model and what fuse() makes of it: ``reason`` None when
    fused, then ``names``/``modules`` hold the whole run (else the convolution alone)."""

    names: list
    modules: list
    parent: nn.Module
    reason: Optional[str]

    def describe(self):
        return " -> ".join(self.names)


def _conv_runs(model):
    """A :class:`_Run` for every Conv2d / ConvTranspose2d child in ``model``."""
    for parent_name, parent in model.named_modules():
        names, modules = list(parent._modules), list(parent._modules.values())
        for i, child in enumerate(modules):
            if not isinstance(child, _CONVS):
                continue
            run = _run_at(modules, i)
            if type(parent) in (nn.Sequential, FusedSequential):
                reason = _why_not_fusable(*run, lazy_ok=True)
            elif isinstance(parent, _ConvBN):
                reason = f"inside a {type(parent).__name__}, which is already fused"
            elif isinstance(parent, nn.Sequential):
                reason = (f"inside {type(parent).__name__}, a subclass of nn.Sequential (its "
                          "forward may differ; only plain nn.Sequential is rewritten)")
            else:
                reason = f"inside {type(parent).__name__}, not an nn.Sequential"
            end = i + _run_length(run) if reason is None else i + 1
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


def _chains(fused):
    """(first module, last module, layers) of each chain of several layers a forward will run
    (FusedSequential.forward): maximal groups of fused runs that follow one another in one
    Sequential, a conv bias ending one, a trailing Tanh included."""
    groups, last, ended = [], None, True
    for run in fused:
        modules = list(run.parent._modules.values())
        start = modules.index(run.modules[0])
        follows = (last is not None and last.parent is run.parent
                   and modules.index(last.modules[-1]) + 1 == start)
        if follows and not ended:
            groups[-1].append(run)
        else:
            groups.append([run])
        last, ended = run, run.modules[0].bias is not None
    described = []
    for chain_runs in (g for g in groups if len(g) > 1):
        tail = chain_runs[-1]
        modules = list(tail.parent._modules.values())
        end = modules.index(tail.modules[-1]) + 1
        last = tail.names[-1]
        if len(tail.modules) == 1 and _trailing_tanh(modules, end):  # the Tanh joins the chain
            last = last.rsplit(".", 1)[0] + "." + list(tail.parent._modules)[end] if "." in last \
                else list(tail.parent._modules)[end]
        described.append((chain_runs[0].names[0], last, len(chain_runs)))
    return described


def _print_report(runs, losses):
    fused = [run for run in runs if run.reason is None]
    print(f"aigc_fast.fuse: fused {len(fused)} convolution run(s) and {len(losses)} BCE loss(es); "
          f"left {len(runs) - len(fused)} convolution(s) as they are")
    for run in fused:
        lazy = _uninitialized_lazy(*run.modules)
        print(f"  fused {run.describe()}"
              + (" (from its second call: the first initialises its lazy modules)" if lazy else ""))
    for name, loss in losses:
        print(f"  fused {name} ({type(loss).__name__})")
    for run in runs:
        if run.reason is not None:
            print(f"  left  {run.names[0]}: {run.reason}")
    global_hooks = _why_global_hooks()
    if fused and global_hooks is not None:
        print(f"  note: {global_hooks}: every fused run runs unfused while one is registered")
    links = chain.ops.CHAIN_MAX_LAYERS
    for first, last, layers in _chains(fused):
        print(f"  chain: {first} .. {last}, {layers} layers as "
              + ("one op" if layers <= links
                 else f"{-(-layers // links)} ops of <= {links} layers"))
    if fused:
        print("  (a fused run runs fused when its nn.Sequential is called; if its modules are "
              "called one by one, it runs unfused and warns)")


# Set on a convolution whose contiguous weight fuse() made channels-last, for unfuse() to restore.
# An attribute of the module, so that a deepcopy or a torch.load-ed copy carries it too.
_RESTRIDED = "_aigc_fast_weight_was_contiguous"


def _stored_weight(conv):
    """The Parameter that holds a convolution's weight values: ``weight``, or a parametrized
    weight's ``original`` (spectral norm's), read without running the parametrization (which in
    training advances its state: a power iteration); None for other parametrizations."""
    if not parametrize.is_parametrized(conv, "weight"):
        return conv.weight
    return getattr(conv.parametrizations.weight, "original", None)


def _weight_channels_last(conv):
    """Give a fused convolution's weight channels-last strides in place (values, Parameter and
    state_dict unchanged, as ``module.to(memory_format=torch.channels_last)`` does): the kernels
    then read its GEMM operand tiles as contiguous rows (with asynchronous copies), where other
    strides cost scattered loads or a packed copy of the weight at every call. Spectral norm's
    ``original`` too: its weight, original / sigma, keeps the strides."""
    weight = None if _uninitialized_lazy(conv) else _stored_weight(conv)
    if weight is not None and weight.dim() == 4 and not weight.is_contiguous(
            memory_format=torch.channels_last):
        if weight.is_contiguous():
            setattr(conv, _RESTRIDED, True)
        with torch.no_grad():
            weight.data = weight.data.contiguous(memory_format=torch.channels_last)


def fuse(model, verbose=False):
    """Rewrite ``model`` in place, and return it, so that every Conv2d / ConvTranspose2d [->
    BatchNorm2d] [-> ReLU / LeakyReLU] run inside an nn.Sequential, at any depth (a lone convolution
    too), runs as one fused op when that Sequential is called,
    and every nn.BCEWithLogitsLoss / nn.BCELoss module in it (or ``model`` itself being one) runs
    the fused loss. No module moves, so the state_dict keys are unchanged (checkpoints load both
    ways with strict=True). Runs the fused op cannot reproduce exactly (groups or dilation != 1,
    padding modes other than zeros, affine=False or non-tracking BatchNorm, mismatched channels,
    LeakyReLU with a negative slope, subclasses overriding forward, modules with hooks) are left as
    they are; lazy modules fuse from their second call. While a global module hook is registered
    (torch.nn.modules.module.register_module_*_hook) every fused run runs eagerly, so that the hook
    sees every module. Fusing changes no state: a parametrized weight (spectral norm) is not read,
    so its power iteration runs once per training forward, as in the unfused model. Consecutive
    fused runs run as one chain (:func:`aigc_fast.chain.conv_chain`, which also takes a Tanh that
    ends them; a conv bias ends one). Fused convolutions' weights (spectral norm's ``original``)
    get channels-last strides (as ``model.to(memory_format=torch.channels_last)`` gives them).
    ``verbose=True`` prints what was fused and what was left, and why, and the chains. A fused
    run whose modules are called one by one (a parent that iterates over the Sequential) runs
    unfused and warns once. Calling it twice is harmless."""
    _check_model(model)
    runs = list(_conv_runs(model))
    for run in runs:
        if run.reason is None:
            _weight_channels_last(run.modules[0])
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
    """Undo :func:`fuse` in place and return ``model``: it runs eagerly again, state unchanged
    (weights that fuse() made channels-last are contiguous again)."""
    _check_model(model)
    for module in model.modules():
        if getattr(module, _RESTRIDED, False):
            delattr(module, _RESTRIDED)
            weight = _stored_weight(module)
            with torch.no_grad():
                weight.data = weight.data.contiguous()
        if type(module) in _UNFUSED:
            module.__class__ = _UNFUSED[type(module)]
        for key in _run_warnings(module):
            del module._forward_pre_hooks[key]
    return model
