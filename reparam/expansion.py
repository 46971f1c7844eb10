"""`expand`: the inverse of `fuse`. A plain model becomes a training-time over-parameterized one.

    train_model = expand(model, block="dbb")     # every eligible KxK conv (+ BN) becomes a block
    ...train train_model...
    deploy_model = reparam.fuse(train_model.eval())   # back to the original conv structure

Each eligible `nn.Conv2d`, together with the `nn.BatchNorm2d` that directly follows it (when the
model traces with torch.fx and that BN is the conv's only user), is replaced by a training-time
block with the same channels, stride, groups and padding: ACNet's `ACBlock` ("acb"), the Diverse
Branch Block ("dbb"), `RepVGGBlock` without its ReLU ("repvgg"), `MobileOneBlock` without its
ReLU ("mobileone"), or a block built by an expander the user registered. The absorbed BN is
replaced by `nn.Identity`; the block's own BatchNorms take its role.

`init="preserve"` (the default) makes the expanded model compute the same function as the
input, in eval and in train mode: the main KxK branch is a copy of the original conv and its BN
(no BN when none followed), and every other branch ends in a BN with weight 0 and bias 0, so it
contributes exactly zero until training moves it. `init="random"` keeps the blocks' standard
PyTorch initialization.

Convs a block cannot express exactly (see each expander's rules), and convs whose use the
rewrite could change (shared modules, weights read directly, convs never called) are left as
they are and listed in the `ExpandReport` with the reason.
"""

from __future__ import annotations

import copy
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

import torch
import torch.fx
from torch import nn

from .blocks import ACBlock, DilatedReparamBlock, DiverseBranchBlock, MobileOneBlock, RepLKBlock, RepVGGBlock
from .errors import ReparamError
from .sharing import deep_copy

__all__ = [
    "ExpandReport",
    "Expander",
    "ExpanderOverwriteWarning",
    "Expansion",
    "Ineligible",
    "Skip",
    "SkipReason",
    "expand",
    "expand_with_report",
    "mobileone_expander",
    "register_expander",
    "registered_expanders",
    "unregister_expander",
]

INITS = ("preserve", "random")

Expander = Callable[[nn.Conv2d, "nn.BatchNorm2d | None", str], nn.Module]
"""`build(conv, bn_or_None, init) -> nn.Module`: a module replacing `conv` (and `bn`, when given).

With `init="preserve"` the module must compute what `bn(conv(x))` (or `conv(x)`) computes. A
conv the expander cannot express is refused by raising `Ineligible`; the conv is then left as
it is and reported. `conv` and `bn` belong to the copy being expanded: copy them before reusing
them inside the new module if they must not be shared.
"""


class SkipReason(str, Enum):
    """Why a conv was left as it was. The value is the short code shown in reports."""

    NOT_CONV2D = "not a plain Conv2d"
    KERNEL = "kernel size"
    PADDING = "padding"
    PADDING_MODE = "padding mode"
    DILATION = "dilation"
    SHARED = "shared module"
    DIRECT_USE = "parameters read directly"
    CALL = "called with extra arguments"
    NOT_CALLED = "not called"
    IN_BLOCK = "already a training-time block"
    UNSUPPORTED = "not expressible"


class ExpanderOverwriteWarning(UserWarning):
    """`register_expander` replaced an expander registered under the same name."""


class Ineligible(ReparamError):
    """Raised by an expander for a conv its block cannot express exactly; `expand` skips that conv."""

    def __init__(self, message: str, reason: SkipReason = SkipReason.UNSUPPORTED) -> None:
        super().__init__(f"{reason.value}: {message}")
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Expansion:
    """A conv (at `module`, where the block now is) replaced by a block; `batchnorm`: the BN it absorbed."""

    module: str
    block: str
    block_type: str
    batchnorm: str | None
    traced: bool
    note: str = ""


@dataclass(frozen=True)
class Skip:
    """A conv (or an existing training-time block) left as it was, and why."""

    module: str
    reason: SkipReason
    message: str


@dataclass
class ExpandReport:
    """The record of one `expand` call. `str(report)` is a readable table."""

    block: str
    init: str
    traced: bool
    replaced: list[Expansion] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)
    trace_error: str = ""

    def skipped_for(self, reason: SkipReason) -> list[Skip]:
        """The skips with this reason."""
        return [s for s in self.skipped if s.reason is reason]

    def __str__(self) -> str:
        how = "traced with torch.fx" if self.traced else f"not traceable ({self.trace_error}); modules replaced"
        lines = [
            (
                f"expand(block={self.block!r}, init={self.init!r}): {len(self.replaced)} replaced, "
                f"{len(self.skipped)} skipped; {how}"
            )
        ]
        for e in self.replaced:
            absorbed = f" + {e.batchnorm}" if e.batchnorm else ""
            note = f"  ({e.note})" if e.note else ""
            lines.append(f"  replaced {(e.module or '<root>') + absorbed:<36} -> {e.block_type}{note}")
        for s in self.skipped:
            lines.append(f"  skipped  {s.module or '<root>':<36} {s.reason.value}: {s.message}")
        return "\n".join(lines)


# --------------------------------------------------------------------------- registry

_EXPANDERS: dict[str, Expander] = {}


def register_expander(name: str, build: Expander) -> None:
    """Make `expand(model, block=name)` build blocks with `build(conv, bn_or_None, init)`.

    Registering a name again replaces the earlier expander, with a warning.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"an expander name must be a non-empty string, got {name!r}")
    if not callable(build):
        raise TypeError(f"an expander must be callable as build(conv, bn, init), got {build!r}")
    if name in _EXPANDERS:
        warnings.warn(
            f"register_expander: the expander registered as {name!r} was replaced by a new registration",
            ExpanderOverwriteWarning,
            stacklevel=2,
        )
    _EXPANDERS[name] = build


def unregister_expander(name: str) -> None:
    """Remove a registered expander (built-in ones included)."""
    if name not in _EXPANDERS:
        raise ValueError(f"no expander is registered as {name!r}; registered: {', '.join(registered_expanders())}")
    del _EXPANDERS[name]


def registered_expanders() -> tuple[str, ...]:
    """The names `expand(..., block=name)` accepts, sorted."""
    return tuple(sorted(_EXPANDERS))


def _resolve(block: str | Expander) -> tuple[str, Expander]:
    if isinstance(block, str):
        if block not in _EXPANDERS:
            raise ValueError(f"unknown block {block!r}; registered expanders: {', '.join(registered_expanders())}")
        return block, _EXPANDERS[block]
    if callable(block):
        return getattr(block, "__name__", type(block).__name__), block
    raise TypeError(f"block must be a registered name or an expander function, got {block!r}")


# --------------------------------------------------------------------------- expand


def expand(model: nn.Module, block: str | Expander = "dbb", init: str = "preserve") -> nn.Module:
    """Return a copy of `model` with every eligible KxK `nn.Conv2d` (+ its BN) replaced by a training block.

    `block` is a registered expander name ("acb", "dbb", "repvgg", "mobileone", or one added
    with `register_expander`) or an expander function. `init="preserve"` starts from the
    function of `model` (exactly, in eval and train mode); `init="random"` uses the blocks'
    standard initialization. `model` is left as it was. `reparam.fuse(expand(model).eval())`
    has the conv structure of `reparam.fuse(model)` again (same convs, same weight shapes).

    See `expand_with_report` for what was replaced and what was skipped, and why.
    """
    return expand_with_report(model, block, init)[0]


def expand_with_report(
    model: nn.Module, block: str | Expander = "dbb", init: str = "preserve"
) -> tuple[nn.Module, ExpandReport]:
    """`expand`, also returning the `ExpandReport`: each replacement, and each skip with its reason."""
    name, build = _resolve(block)
    if init not in INITS:
        raise ValueError(f"init must be one of {', '.join(map(repr, INITS))}, got {init!r}")
    result = deep_copy(model)
    plan = _plan(result)
    report = ExpandReport(name, init, plan.traced, skipped=list(plan.skipped), trace_error=plan.trace_error)
    for candidate in plan.candidates:
        conv = result.get_submodule(candidate.conv)
        bn = result.get_submodule(candidate.bn) if candidate.bn is not None else None
        try:
            new = build(conv, bn, init)
        except Ineligible as refusal:
            report.skipped.append(Skip(candidate.conv, refusal.reason, refusal.message))
            continue
        except Exception as error:
            error.add_note(f"while expanding {candidate.conv or type(conv).__name__!r} with expander {name!r}")
            raise
        if not isinstance(new, nn.Module):
            raise TypeError(f"expander {name!r} returned {type(new).__name__}, not an nn.Module")
        new.train(conv.training)
        if candidate.conv == "":
            result = new
        else:
            _replace(result, candidate.conv, new)
        if candidate.bn is not None:
            _replace(result, candidate.bn, nn.Identity())
        report.replaced.append(
            Expansion(candidate.conv, name, type(new).__name__, candidate.bn, plan.traced, candidate.note)
        )
    order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    report.skipped.sort(key=lambda s: order.get(s.module, -1))
    return result, report


def _replace(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(root.get_submodule(parent), attr, module)


# --------------------------------------------------------------------------- finding candidates


@dataclass(frozen=True)
class _Candidate:
    conv: str
    bn: str | None
    note: str = ""


@dataclass
class _Plan:
    traced: bool
    trace_error: str = ""
    candidates: list[_Candidate] = field(default_factory=list)
    skipped: list[Skip] = field(default_factory=list)


def _training_block_types() -> tuple[type[nn.Module], ...]:
    return (ACBlock, DiverseBranchBlock, RepVGGBlock, MobileOneBlock, RepLKBlock, DilatedReparamBlock)


def _plan(model: nn.Module) -> _Plan:
    """The convs to expand (with the BN each absorbs) and the ones skipped before any expander is asked."""
    names: dict[int, list[str]] = defaultdict(list)
    for path, module in model.named_modules(remove_duplicate=False):
        names[id(module)].append(path)

    if type(model) is nn.Conv2d:
        return _Plan(True, candidates=[_Candidate("", None)])

    plan = _Plan(traced=False)
    blocks = _training_block_types()
    inside_block: list[str] = []
    convs: list[tuple[str, nn.Module]] = []
    for path, module in model.named_modules():
        if any(_under(path, prefix) for prefix in inside_block):
            continue
        if isinstance(module, blocks):
            inside_block.append(path)
            plan.skipped.append(Skip(path, SkipReason.IN_BLOCK, f"{type(module).__name__}; its convs are left alone"))
        elif isinstance(module, nn.modules.conv._ConvNd):
            convs.append((path, module))

    candidates: list[str] = []
    for path, module in convs:
        if type(module) is not nn.Conv2d:
            plan.skipped.append(
                Skip(
                    path, SkipReason.NOT_CONV2D, f"a {type(module).__name__}; only plain nn.Conv2d layers are expanded"
                )
            )
        elif len(names[id(module)]) > 1:
            plan.skipped.append(
                Skip(
                    path, SkipReason.SHARED, f"the same module is also registered as {', '.join(names[id(module)][1:])}"
                )
            )
        else:
            candidates.append(path)

    try:
        graph = torch.fx.Tracer().trace(model)
    except Exception as error:  # noqa: BLE001 (untraceable: replace modules one by one, never absorbing a BN)
        plan.trace_error = f"{type(error).__name__}: {error}".splitlines()[0][:200]
        note = "BN not absorbed: the model does not trace with torch.fx"
        plan.candidates = [_Candidate(path, None, note) for path in candidates]
        return plan

    plan.traced = True
    modules = dict(model.named_modules())
    calls: Counter[str] = Counter(n.target for n in graph.nodes if n.op == "call_module")
    read_directly = {str(n.target).rpartition(".")[0] for n in graph.nodes if n.op == "get_attr"}
    read_directly |= {str(n.target) for n in graph.nodes if n.op == "get_attr"}
    nodes = {n.target: n for n in graph.nodes if n.op == "call_module"}
    for path in candidates:
        if path in read_directly:
            plan.skipped.append(
                Skip(path, SkipReason.DIRECT_USE, "forward reads its weight or bias directly; a block has neither")
            )
        elif calls[path] == 0:
            plan.skipped.append(Skip(path, SkipReason.NOT_CALLED, "not called as a module by the traced forward"))
        elif calls[path] > 1:
            plan.skipped.append(
                Skip(path, SkipReason.SHARED, f"called {calls[path]} times; one block per call site would change it")
            )
        elif len(nodes[path].args) != 1 or nodes[path].kwargs:
            plan.skipped.append(Skip(path, SkipReason.CALL, "not called with exactly one tensor argument"))
        else:
            bn, note = _following_batchnorm(nodes[path], modules, names, calls, read_directly, inside_block)
            plan.candidates.append(_Candidate(path, bn, note))
    return plan


def _under(path: str, prefix: str) -> bool:
    """True if the module at `path` lies inside the module at `prefix` ("" is the root)."""
    return prefix == "" or path.startswith(prefix + ".")


def _following_batchnorm(
    node: torch.fx.Node,
    modules: dict[str, nn.Module],
    names: dict[int, list[str]],
    calls: Counter[str],
    read_directly: set[str],
    inside_block: list[str],
) -> tuple[str | None, str]:
    """The path of the BN the conv's block may absorb (or None), and a note when a BN is not absorbed."""
    bn_users = [u for u in node.users if u.op == "call_module" and type(modules.get(u.target)) is nn.BatchNorm2d]
    if not bn_users:
        return None, ""
    if len(node.users) > 1:
        return None, "BN not absorbed: the conv's output is also used elsewhere"
    [user] = bn_users
    path = str(user.target)
    bn = modules[path]
    if user.args != (node,) or user.kwargs or calls[path] != 1 or len(names[id(bn)]) > 1:
        return None, "BN not absorbed: the BN module is shared or called with other arguments"
    if path in read_directly:
        return None, "BN not absorbed: forward reads its parameters directly"
    if any(_under(path, prefix) for prefix in inside_block):
        return None, "BN not absorbed: it belongs to a training-time block"
    if bn.running_mean is None or bn.running_var is None:
        return None, "BN not absorbed: it keeps no running statistics (track_running_stats=False)"
    return path, ""


# --------------------------------------------------------------------------- the built-in expanders


def _same_padding(conv: nn.Conv2d) -> tuple[int, int]:
    if conv.padding == "valid":
        return (0, 0)
    if conv.padding == "same":
        return tuple(d * (k - 1) // 2 for d, k in zip(conv.dilation, conv.kernel_size))  # type: ignore[return-value]
    return tuple(conv.padding)  # type: ignore[return-value]


def check_geometry(conv: nn.Conv2d, kind: str, kernel_sizes: Callable[[int], bool], wanted: str) -> int:
    """Refuse (`Ineligible`) a conv that is not a square, odd, 'same'-padded, undilated zero-padded conv.

    `kernel_sizes(k)` says which sizes K the block supports (`wanted` describes them). Returns K.
    """
    if conv.padding_mode != "zeros":
        raise Ineligible(
            f"padding_mode={conv.padding_mode!r}; the {kind} branches pad with zeros", SkipReason.PADDING_MODE
        )
    kh, kw = conv.kernel_size
    if kh != kw:
        raise Ineligible(f"a {kh}x{kw} kernel; {kind} blocks are KxK", SkipReason.KERNEL)
    if kh % 2 == 0:
        raise Ineligible(f"an even {kh}x{kh} kernel has no centre pixel for the other branches", SkipReason.KERNEL)
    if not kernel_sizes(kh):
        raise Ineligible(f"a {kh}x{kh} kernel; {kind} blocks need {wanted}", SkipReason.KERNEL)
    if tuple(conv.dilation) != (1, 1):
        raise Ineligible(f"dilation {tuple(conv.dilation)}; {kind} blocks are not dilated", SkipReason.DILATION)
    padding = _same_padding(conv)
    if padding != (kh // 2, kh // 2):
        raise Ineligible(
            f"padding {padding} on a {kh}x{kh} kernel; {kind} blocks pad K//2 = {kh // 2} ('same' geometry)",
            SkipReason.PADDING,
        )
    return kh


def _stride(conv: nn.Conv2d) -> int | tuple[int, int]:
    sh, sw = conv.stride
    return sh if sh == sw else (sh, sw)


def _finish(
    block: nn.Module,
    main: nn.Sequential,
    zeroed: list[nn.BatchNorm2d | None],
    conv: nn.Conv2d,
    bn: nn.BatchNorm2d | None,
    init: str,
) -> nn.Module:
    """Common tail of the built-in expanders: BN settings, the preserving init, dtype and device.

    `main` is the block's `Sequential(conv=..., bn=...)` KxK branch; `zeroed` the last BN of every
    other branch.
    """
    if bn is not None:  # the new BNs follow the conventions of the BN they replace
        for module in block.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.eps, module.momentum = bn.eps, bn.momentum
    block = block.to(device=conv.weight.device, dtype=conv.weight.dtype)
    if init == "preserve":
        main.conv = copy.deepcopy(conv)
        main.bn = copy.deepcopy(bn) if bn is not None else nn.Identity()
        with torch.no_grad():
            for last in zeroed:
                if last is not None:
                    last.weight.zero_()
                    last.bias.zero_()
    return block


def acb_expander(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, init: str) -> nn.Module:
    """ACNet: KxK + 1xK + Kx1 conv-BN branches (`reparam.blocks.ACBlock`). K odd, at least 3."""
    k = check_geometry(conv, "acb", lambda k: k >= 3, "K >= 3 (the 1xK and Kx1 branches of a 1x1 are 1x1 too)")
    block = ACBlock(conv.in_channels, conv.out_channels, k, _stride(conv), conv.groups)  # type: ignore[arg-type]
    return _finish(block, block.square, [block.hor.bn, block.ver.bn], conv, bn, init)


def dbb_expander(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, init: str) -> nn.Module:
    """The Diverse Branch Block: KxK, 1x1, 1x1-avg and 1x1-KxK branches (`DiverseBranchBlock`). K odd, >= 3."""
    k = check_geometry(conv, "dbb", lambda k: k >= 3, "K >= 3")
    stride = _stride(conv)
    block = DiverseBranchBlock(conv.in_channels, conv.out_channels, k, stride, conv.groups)  # type: ignore[arg-type]
    zeroed = [block.pointwise.bn if block.pointwise is not None else None, block.avg.avgbn, block.kxk.bn2]
    return _finish(block, block.origin, zeroed, conv, bn, init)


def repvgg_expander(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, init: str) -> nn.Module:
    """RepVGG: 3x3 + 1x1 conv-BN branches and a BN identity branch (`RepVGGBlock` with no ReLU). 3x3 only."""
    check_geometry(conv, "repvgg", lambda k: k == 3, "a 3x3 kernel (block='mobileone' takes any odd K)")
    block = RepVGGBlock(conv.in_channels, conv.out_channels, _stride(conv), conv.groups)  # type: ignore[arg-type]
    block.act = nn.Identity()
    return _finish(block, block.dense, [block.pointwise.bn, block.identity], conv, bn, init)


def mobileone_expander(num_branches: int = 4) -> Expander:
    """An expander for MobileOne blocks with `num_branches` KxK branches (`MobileOneBlock` with no ReLU).

    Branches: `num_branches` KxK conv-BN, a 1x1 conv-BN when K > 1, a BN identity when the
    shape is kept. Any odd K, 1x1 included (MobileOne over-parameterizes its pointwise convs
    too). The registered "mobileone" uses 4 branches, MobileOne-S0's setting.
    """
    if num_branches < 1:
        raise ValueError(f"num_branches must be at least 1, got {num_branches}")

    def build(conv: nn.Conv2d, bn: nn.BatchNorm2d | None, init: str) -> nn.Module:
        k = check_geometry(conv, "mobileone", lambda k: k >= 1, "an odd K")
        block = MobileOneBlock(
            conv.in_channels,
            conv.out_channels,
            k,
            _stride(conv),
            conv.groups,
            num_branches,  # type: ignore[arg-type]
        )
        block.act = nn.Identity()
        zeroed = [branch.bn for branch in block.branches[1:]]
        zeroed += [block.scale.bn if block.scale is not None else None, block.identity]
        return _finish(block, block.branches[0], zeroed, conv, bn, init)

    build.__name__ = f"mobileone_expander({num_branches})"
    return build


for _name, _build in {
    "acb": acb_expander,
    "dbb": dbb_expander,
    "repvgg": repvgg_expander,
    "mobileone": mobileone_expander(4),
}.items():
    register_expander(_name, _build)
del _name, _build
