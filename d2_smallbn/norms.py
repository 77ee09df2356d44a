"""THE table of norms. Everything that needs to know about one of this project's norms reads it:
building by name, the conversion pass, the config section ``MODEL.SMALLBN`` and its validation,
the optimizer's norm-parameter rule, weight conversion's targets (``d2_smallbn.weights``), the
benchmarks and studies.

Each entry (``NormSpec``) says:
- ``layer``: the norm's module class (pure PyTorch, ``d2_smallbn.layers``);
- ``conv``: the conv class a conv feeding it must have (None: the conv stays as it is), and
  whether that class is ``required`` (CBN's window needs its conv) or only the default of
  ``MODEL.SMALLBN.CONV: auto`` (MABN's weight centring, BCN's WS);
- ``settings``: its section ``MODEL.SMALLBN.<name>``: key -> ``Setting(default, check, doc)``;
- ``kwargs(section, scope)``: the layer's constructor arguments read from that section
  (``scope`` is "backbone", "fpn" or "heads", for settings given per scope);
- how a BatchNorm checkpoint maps onto it, and its own training state: the layer's
  ``map_bn_state`` and ``own_state`` (see ``layers/_common.py``), reached through ``layer``; a
  checkpoint layout of its own, which weight conversion reads (``d2_smallbn.weights``): the layer's
  ``is_own_layout``, ``map_own_layout``, ``own_layout_example`` and ``own_layout_batch_prefix``;
- ``checkpoint_hints(model, num_groups)``: config values that weights converted for it need, read
  from the converted state dict (BCN's groups), for the conversion's report;
- ``after_build(layer, settings)``: anything a new layer needs beyond its arguments (BCN's update
  rate starts at the base learning rate: never silently GN);
- ``before_train(layers, section, run)``: what a layer needs from the training run (``Run``: the dataset
  size, images per iteration) before the first step, returning lines to log (CBN's burn-in given in
  epochs); ``needs_dataset_size(section)``: whether it reads ``run.dataset_size`` (the trainers
  count the dataset only then);
- ``check_channels(section, {module name: channels})``: a problem with the channel counts of all its
  layers in a model, before any is built (BCN's groups must divide them), or None;
- ``update_rate(section)``: what ``NormStateDriver`` gives the layers whose statistics move at a rate
  (BCN): "lr" (their param group's learning rate) or a fixed rate;
- ``phases(section)``: its own iteration counts (warmups, burn-in, ramps) and the least each may be
  (``Phase``): what ``scale_phases`` (the study, the quickstart's ``--iters``) and ``short_phases``
  (the trainer hook's warning) read; ``paper_phases``: those counts as its paper set them, for the
  schedule the paper ran (``PaperPhases``), which the studies scale to theirs.

Adding a norm = one layer file + one entry in ``NORMS``; from a user's own code,
``register_norm(NormSpec(...))`` (``d2_smallbn.register_norm``) adds the entry, and a command learns it
by importing the user's module (``import_norm_modules``: ``--norm-module``, ``D2_SMALLBN_NORM_MODULES``).
Everything above reads the live table. This module imports no detectron2.
"""
import functools
import math
from typing import Callable, Dict, NamedTuple, Optional

from torch import nn

from .layers import (BatchChannelNorm2d, CBNConv2d, CenteredConv2d, CrossIterationBatchNorm2d,
                     MovingAverageBatchNorm2d, WSConv2d)
from .layers._common import int_problem, number_problem
from .layers.brn import BatchRenorm2d


# ---- settings: defaults and checks ------------------------------------------------------------

class Setting(NamedTuple):
    default: object
    check: Callable  # value -> None if valid, else what a valid value is
    doc: str = ""


def integer(minimum):
    return functools.partial(int_problem, minimum=minimum)


def number(low, high=math.inf, low_open=False, high_open=False):
    return functools.partial(number_problem, low=low, high=high, low_open=low_open, high_open=high_open)


def choice(*options, doc=None):
    def check(v):
        return None if isinstance(v, str) and v in options else (doc or f"one of {options}")
    return check


EPS = Setting(1e-5, number(0, low_open=True), "added to the variance")

# Conv classes selected by MODEL.SMALLBN.CONV for every normed conv ("auto": the norm's own).
CONV_TYPES = {"auto": None, "plain": None, "ws": WSConv2d, "centered": CenteredConv2d}

# Settings shared by every norm, at the top of MODEL.SMALLBN.
COMMON = {
    "CONV": Setting("auto", choice(*CONV_TYPES), "conv type of every conv whose output feeds a norm: 'auto' follows "
                    "the norm; 'ws' / 'centered' / 'plain' that weight transform for every normed conv"),
    "INIT": Setting("", choice("", "he", doc="'' (detectron2's init) or 'he'"),
                    "'he': He (fan_out) init of every normed conv, norms at gamma 1, beta 0 (from scratch)"),
    "PAPER_IMS_PER_GPU": Setting(0, integer(0), "the paper's images per GPU; training warns on a different "
                                 "number (0: no check)"),
    "WS": {
        "EPS": Setting(1e-5, number(0, low_open=True), "WS epsilon"),
        "MODE": Setting("std", choice("std", "var", doc="'std' (released checkpoints) or 'var' (eq. 7)"),
                        "'std': (W - mean) / (std + eps), as the released checkpoints; 'var': paper eq. 7"),
    },
}


def conv_kwargs(cls, s):
    """Constructor arguments of conv class ``cls`` beyond torch's, from the settings ``s``."""
    if issubclass(cls, WSConv2d):
        return {"ws_eps": s.WS.EPS, "ws_mode": s.WS.MODE}
    return {}


# ---- the table --------------------------------------------------------------------------------

class NormSpec(NamedTuple):
    name: str
    layer: type
    conv: Optional[type]
    conv_required: bool
    settings: Dict[str, Setting]
    kwargs: Callable  # (section, scope) -> layer kwargs
    after_build: Optional[Callable] = None  # (layer, settings) -> None
    doc: str = ""
    check_section: Optional[Callable] = None  # (section) -> [problems] across keys of its section
    phases: Optional[Callable] = None  # (section) -> [Phase]: its iteration counts and their minimums
    before_train: Optional[Callable] = None  # (layers, section, Run) -> [lines to log]
    needs_dataset_size: Optional[Callable] = None  # (section) -> bool: before_train reads run.dataset_size
    update_rate: Optional[Callable] = None  # (section) -> "lr" or a fixed rate, for NormStateDriver
    check_channels: Optional[Callable] = None  # (section, {module name: channels}) -> problem or None

    paper_phases: Optional["PaperPhases"] = None  # its paper's own iteration counts, for scaled schedules
    checkpoint_hints: Optional[Callable] = None  # (converted state dict, num_groups) -> {config key: value}

    def build(self, channels, s, scope="backbone"):
        """A new layer for ``channels`` channels from resolved settings ``s`` (see ``resolve``)."""
        layer = self.layer(channels, **self.kwargs(s[self.name], scope))
        if self.after_build is not None:
            self.after_build(layer, s)
        return layer

    @property
    def checkpoint_target(self):
        """Its name for ``d2-smallbn-convert-weights --target-norm``."""
        return self.name.lower()


class PaperPhases(NamedTuple):
    """A norm's iteration counts as its paper set them (``counts``: key -> value) for a schedule of
    ``length`` (in the same unit), and where they come from: what the studies scale to their own
    schedules by ``scale_phases``."""
    counts: Dict[str, int]
    length: float
    source: str


PAPER_COCO_ITERS = 180000  # the MABN paper's COCO schedule (2x), which MABN's and BRN's counts belong to


class Run(NamedTuple):
    """What a training run knows beyond the settings, for a norm's ``before_train`` (None: unknown)."""
    dataset_size: Optional[int] = None
    ims_per_batch: Optional[int] = None


def _cbn_burnin_epochs(layers, c, run):
    """BURNIN_EPOCHS > 0 overrides BURNIN_ITERS: epochs * dataset size / images per iteration."""
    if c.BURNIN_EPOCHS <= 0:
        return []
    if run.dataset_size is None or run.ims_per_batch is None:
        raise ValueError("MODEL.SMALLBN.CBN.BURNIN_EPOCHS needs the dataset size and the images per iteration: "
                         "pass dataset_size and ims_per_batch to SmallBNHook (SmallBNTrainer does), or give "
                         "BURNIN_ITERS instead")
    iters = int(math.ceil(c.BURNIN_EPOCHS * run.dataset_size / run.ims_per_batch))
    for layer in layers:
        layer.burnin_iters = iters
    return [f"CBN burn-in: {c.BURNIN_EPOCHS:g} epochs x {run.dataset_size} images / {run.ims_per_batch} per "
            f"iteration = {iters} iterations"]


def _bcn_update_rate(b):
    return "lr" if b.UPDATE_RATE_MODE == "lr" else b.UPDATE_RATE


def _bcn_start_rate(layer, s):
    # with "lr", None when the settings carry no learning rate: the trainer hook sets it
    rate = s.BCN.UPDATE_RATE if s.BCN.UPDATE_RATE_MODE == "fixed" else s.base_lr
    if rate is not None:
        layer.set_update_rate(float(rate))


def _bcn_unfit_groups(b, channels):
    """NUM_GROUPS must divide the channels of every BCN layer: all that it does not, and divisors that fit."""
    groups = b.NUM_GROUPS
    unfit = [(name, c) for name, c in channels.items() if c % groups]
    if not unfit:
        return None
    common = math.gcd(*channels.values())
    divisors = [d for d in range(min(common, groups), 0, -1) if common % d == 0][:4]
    listed = ", ".join(f"{name} ({c} channels)" for name, c in unfit[:6])
    return (f"MODEL.SMALLBN.BCN.NUM_GROUPS = {groups} does not divide the channels of {len(unfit)} BCN layer(s): "
            f"{listed}" + (", ..." if len(unfit) > 6 else "") + ". Fix: set MODEL.SMALLBN.BCN.NUM_GROUPS to a divisor "
            f"of every BCN layer's channels (here: {', '.join(map(str, divisors))}), or change those layers' channels")


def _bcn_checkpoint_hints(model, num_groups):
    """The groups of the converted group affines (``num_groups`` when there are none, or several counts)."""
    sizes = {v.numel() for k, v in model.items() if k.endswith(".norm.group_weight")}
    return {"MODEL.SMALLBN.BCN.NUM_GROUPS": sizes.pop() if len(sizes) == 1 else num_groups}


def _bcn_rate_keys(b):
    """UPDATE_RATE is used only in "fixed" mode; a rate given without the mode is an error, not ignored."""
    if b.UPDATE_RATE_MODE == "fixed" and not b.UPDATE_RATE > 0:
        return [f"MODEL.SMALLBN.BCN.UPDATE_RATE = {b.UPDATE_RATE!r} is invalid: with UPDATE_RATE_MODE 'fixed', "
                "a number in (0, 1] (0 would freeze the estimates: GN plus a fixed affine)"]
    if b.UPDATE_RATE_MODE == "lr" and b.UPDATE_RATE != 0:
        return [f"MODEL.SMALLBN.BCN.UPDATE_RATE = {b.UPDATE_RATE!r} is invalid: it is used only with "
                "MODEL.SMALLBN.BCN.UPDATE_RATE_MODE 'fixed', and the mode is 'lr'. Fix: add "
                "MODEL.SMALLBN.BCN.UPDATE_RATE_MODE fixed, or leave UPDATE_RATE at 0.0 to follow the learning rate"]
    return []


# ---- phases: a norm's own iteration counts, and the least each may be ----------------------------

SETTLING_TIME_CONSTANTS = 3  # an EMA keeps exp(-3) = 5% of its starting value after 3 time constants


def settling_iters(momentum):
    """Iterations an EMA ``e <- momentum * e + (1 - momentum) * x`` needs before it stops reflecting its
    starting value: 3 time constants, 3 / (1 - momentum) (150 at the papers' 0.98)."""
    return math.ceil(round(SETTLING_TIME_CONSTANTS / (1.0 - momentum), 6))


class Phase(NamedTuple):
    """One iteration count of a norm's section (``key``) and the least it may be (``minimum``, with
    ``reason``). ``after``: the key of the phase it follows (a ramp's end): its value is then a length
    after that phase, at least ``minimum``, and is scaled as a length."""
    key: str
    minimum: int
    reason: str
    after: Optional[str] = None


def _ema_reason(what, momentum):
    return (f"{what} an EMA of momentum {momentum}, which needs {SETTLING_TIME_CONSTANTS} time constants, "
            f"{SETTLING_TIME_CONSTANTS} / (1 - {momentum}) = {settling_iters(momentum)} iterations, to forget "
            "its starting value")


def _mabn_phases(m):
    sma = f"the simple moving averages of BUFFER_SIZE {m.BUFFER_SIZE} iterations replace batch statistics, so it " \
          "must not end before the buffer is full"
    ema = _ema_reason("from here r renormalizes towards", m.MOMENTUM)
    return [Phase("WARMUP_ITERS", m.BUFFER_SIZE, sma), Phase("FPN_WARMUP_ITERS", m.BUFFER_SIZE, sma),
            Phase("HEADS_WARMUP_ITERS", m.BUFFER_SIZE, sma),
            Phase("CLIP_WARMUP_ITERS", max(settling_iters(m.MOMENTUM), m.BUFFER_SIZE),
                  f"{ema} (and no less than BUFFER_SIZE {m.BUFFER_SIZE})")]


def _brn_phases(b):
    return [Phase("WARMUP_ITERS", settling_iters(b.MOMENTUM), _ema_reason("from here r and d renormalize towards",
                                                                         b.MOMENTUM)),
            Phase("D_MAX_ITERS", 0, "d_max's ramp, after the warmup", after="WARMUP_ITERS"),
            Phase("R_MAX_ITERS", 0, "r_max's ramp, after the warmup", after="WARMUP_ITERS")]


def _cbn_phases(c):
    # The window holds only iterations after the burn-in and averages them with equal weights: it
    # has no estimate that must forget a starting value, so the burn-in has no minimum.
    return [Phase("BURNIN_ITERS", 0, "the window is filled only after it, so it needs no minimum")]


def _mabn_warmup(m, scope):
    return {"backbone": m.WARMUP_ITERS, "fpn": m.FPN_WARMUP_ITERS, "heads": m.HEADS_WARMUP_ITERS}[scope]


NORMS = {spec.name: spec for spec in (
    NormSpec(
        "CBN", CrossIterationBatchNorm2d, CBNConv2d, True,
        {"WINDOW_SIZE": Setting(4, integer(1), "k, counting the current iteration; k * images/GPU ~= 16"),
         "BURNIN_ITERS": Setting(0, integer(0), "iterations of plain BN before the window is used"),
         "BURNIN_EPOCHS": Setting(0.0, number(0), "if > 0, overrides BURNIN_ITERS: epochs * dataset size / "
                                  "IMS_PER_BATCH (the trainer hook converts it)"),
         "RHO": Setting(1.0, number(0), "Taylor weight; 0 = 'Naive CBN'"),
         "MOMENTUM": Setting(0.1, number(0, 1, low_open=True), "EMA of the statistics used in training, for eval"),
         "EPS": EPS},
        lambda c, scope: dict(window_size=c.WINDOW_SIZE, burnin_iters=c.BURNIN_ITERS, rho=c.RHO, eps=c.EPS,
                              momentum=c.MOMENTUM),
        phases=_cbn_phases, before_train=_cbn_burnin_epochs, needs_dataset_size=lambda c: c.BURNIN_EPOCHS > 0,
        paper_phases=PaperPhases({"BURNIN_ITERS": 3}, 12, "3 of 12 epochs (CBN paper's COCO burn-in)"),
        doc="Cross-Iteration BN (CBN paper); its conv CBNConv2d feeds it the conv input and weight"),
    NormSpec(
        "MABN", MovingAverageBatchNorm2d, CenteredConv2d, False,
        {"MOMENTUM": Setting(0.98, number(0, 1, high_open=True), "alpha of the EMA"),
         "BUFFER_SIZE": Setting(16, integer(1), "m, iterations in the simple moving averages"),
         "WARMUP_ITERS": Setting(100, integer(0), "batch statistics before this iteration (backbone)"),
         "FPN_WARMUP_ITERS": Setting(100, integer(0), "the same for the FPN"),
         "HEADS_WARMUP_ITERS": Setting(100, integer(0), "the same for the heads (the paper's detection runs: 10000)"),
         "CLIP_LAMBDA": Setting(5.0, number(1), "r is clipped to [1/lambda, lambda]"),
         "CLIP_WARMUP_ITERS": Setting(1000, integer(0), "r = 1 until this iteration"),
         "EPS": EPS},
        lambda m, scope: dict(momentum=m.MOMENTUM, buffer_size=m.BUFFER_SIZE, warmup_iters=_mabn_warmup(m, scope),
                              clip_lambda=m.CLIP_LAMBDA, clip_warmup_iters=m.CLIP_WARMUP_ITERS, eps=m.EPS),
        phases=_mabn_phases, doc="Moving Average BN (MABN paper) with weight-centralized convs",
        paper_phases=PaperPhases({"WARMUP_ITERS": 100, "FPN_WARMUP_ITERS": 100, "HEADS_WARMUP_ITERS": 10000,
                                  "CLIP_WARMUP_ITERS": 1000}, PAPER_COCO_ITERS,
                                 "MABN paper, 180k iterations (heads: appendix B.3)")),
    NormSpec(
        "BCN", BatchChannelNorm2d, WSConv2d, False,
        {"NUM_GROUPS": Setting(32, integer(1), "groups of the GN step"),
         "EPS": EPS,
         # Two keys of fixed types, so that either choice loads from YAML, the command line and a dumped
         # config.yaml (as detectron2's CLIP_TYPE / CLIP_VALUE do).
         "UPDATE_RATE_MODE": Setting("lr", choice("lr", "fixed", doc="'lr' (the current learning rate) or 'fixed' "
                                                 "(BCN.UPDATE_RATE)"),
                                     "'lr': the running estimates' rate is the current learning rate of the "
                                     "layer's parameters, every iteration (the paper); 'fixed': BCN.UPDATE_RATE"),
         "UPDATE_RATE": Setting(0.0, number(0, 1), "the rate with UPDATE_RATE_MODE 'fixed', in (0, 1]")},
        lambda b, scope: dict(num_groups=b.NUM_GROUPS, eps=b.EPS),
        after_build=_bcn_start_rate, check_section=_bcn_rate_keys, update_rate=_bcn_update_rate,
        check_channels=_bcn_unfit_groups, checkpoint_hints=_bcn_checkpoint_hints,
        doc="micro-batch Batch-Channel Norm (BCN+WS paper) with WS convs"),
    NormSpec(
        "BRN", BatchRenorm2d, None, False,
        {"MOMENTUM": Setting(0.98, number(0, 1, high_open=True), "EMA decay of the running statistics (the MABN "
                             "paper's COCO runs: 0.98)"),
         "R_MAX": Setting(3.0, number(1), "final r_max (Ioffe: 3)"),
         "D_MAX": Setting(5.0, number(0), "final d_max (Ioffe: 5)"),
         "WARMUP_ITERS": Setting(5000, integer(0), "plain BN (r_max 1, d_max 0) before this iteration"),
         "R_MAX_ITERS": Setting(40000, integer(0), "r_max reaches R_MAX here, linearly from WARMUP_ITERS"),
         "D_MAX_ITERS": Setting(25000, integer(0), "d_max reaches D_MAX here, linearly from WARMUP_ITERS"),
         "EPS": EPS},
        lambda b, scope: dict(momentum=b.MOMENTUM, r_max=b.R_MAX, d_max=b.D_MAX, warmup_iters=b.WARMUP_ITERS,
                              r_max_iters=b.R_MAX_ITERS, d_max_iters=b.D_MAX_ITERS, eps=b.EPS),
        phases=_brn_phases, doc="Batch Renormalization (Ioffe 2017), the MABN paper's baseline; plain convs",
        paper_phases=PaperPhases({"WARMUP_ITERS": 5000, "D_MAX_ITERS": 25000, "R_MAX_ITERS": 40000},
                                 PAPER_COCO_ITERS, "Ioffe's steps as fractions of the MABN paper's 180k")),
)}

# detectron2's own norm names (get_norm's): a registered norm may not take one, in any case.
STOCK_NORMS = ("BN", "SyncBN", "FrozenBN", "GN", "nnSyncBN", "naiveSyncBN", "naiveSyncBN_N", "LN")


def norm_types():
    """The layer classes of the table's norms, as it is now."""
    return tuple(spec.layer for spec in NORMS.values())


def __getattr__(name):
    if name == "NORM_TYPES":  # the former module-level snapshot, now read from the live table
        return norm_types()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# ---- registering a norm from outside the package ----------------------------------------------

def _setting_problems(node, path):
    problems = []
    if not isinstance(node, dict) or not node:
        return [f"{path} must be a non-empty dict of key -> Setting"]
    for key, item in node.items():
        where = f"{path}.{key}"
        if not (isinstance(key, str) and key.isupper()):
            problems.append(f"{where}: keys are upper-case strings, as detectron2's config keys")
        elif isinstance(item, dict):
            problems += _setting_problems(item, where)
        elif not isinstance(item, Setting):
            problems.append(f"{where} must be a Setting(default, check, doc), got {type(item).__name__}")
        elif item.check(item.default):
            problems.append(f"{where}'s default {item.default!r} fails its own check: {item.check(item.default)}")
    return problems


def _name_problems(name):
    if not (isinstance(name, str) and name.isidentifier() and name.isupper()):
        return [f"name {name!r} must be an upper-case identifier (it is the config's norm name and the key "
                "MODEL.SMALLBN.<name>)"]
    taken = {n.lower(): f"detectron2's norm {n!r}" for n in STOCK_NORMS}
    taken.update({n.lower(): f"the shared setting MODEL.SMALLBN.{n}" for n in COMMON})
    taken.update({n.lower(): f"the registered norm {n!r}" for n in NORMS})
    taken["auto"] = "weight conversion's --target-norm 'auto'"
    if name.lower() in taken:
        return [f"name {name!r} is taken by {taken[name.lower()]} (names are compared ignoring case); "
                f"pick another name"]
    return []


def _spec_problems(spec):
    if not isinstance(spec, NormSpec):
        return [f"register_norm takes a NormSpec (d2_smallbn.norms.NormSpec), got {type(spec).__name__}"]
    problems = _name_problems(spec.name)
    if not (isinstance(spec.layer, type) and issubclass(spec.layer, nn.Module)):
        problems.append(f"layer must be an nn.Module class, got {spec.layer!r}")
    elif spec.layer in norm_types():
        problems.append(f"layer {spec.layer.__name__} is already the layer of {spec_of_type(spec.layer).name}")
    if spec.conv is not None and not (isinstance(spec.conv, type) and issubclass(spec.conv, nn.Conv2d)):
        problems.append(f"conv must be None or an nn.Conv2d subclass, got {spec.conv!r}")
    if spec.conv_required and spec.conv is None:
        problems.append("conv_required is True but conv is None: name the conv class the norm needs")
    problems += _setting_problems(spec.settings, f"MODEL.SMALLBN.{spec.name}")
    for field in ("kwargs", "after_build", "check_section", "phases", "before_train", "needs_dataset_size",
                  "update_rate", "check_channels", "checkpoint_hints"):
        value = getattr(spec, field)
        if not (callable(value) or (value is None and field != "kwargs")):
            problems.append(f"{field} must be callable{'' if field == 'kwargs' else ' or None'}, got {value!r}")
    return problems


def register_norm(spec):
    """Adds ``spec`` (a ``NormSpec``) to the table of norms, for every path that reads it: the config
    name (``MODEL.RESNETS.NORM``, LazyConfig ``norm=``), ``MODEL.SMALLBN.<name>`` and its checks,
    conversion, the trainer hook and optimizer, weight conversion's target ``name.lower()``,
    folding. Raises ValueError listing every problem of the spec (a name already taken included).
    Returns ``spec``. ``unregister_norm(name)`` removes it again."""
    problems = _spec_problems(spec)
    if problems:
        raise ValueError("register_norm: " + "; ".join(problems))
    NORMS[spec.name] = spec  # in place: every module holding NORMS sees it
    return spec


def unregister_norm(name):
    """Removes a norm ``register_norm`` added; the built-in norms stay."""
    if name in BUILTIN_NORMS:
        raise ValueError(f"{name} is a built-in norm of d2_smallbn and cannot be removed")
    if name not in NORMS:
        raise KeyError(f"no registered norm {name!r}; registered: {', '.join(sorted(set(NORMS) - BUILTIN_NORMS))}")
    del NORMS[name]


NORM_MODULES_ENV = "D2_SMALLBN_NORM_MODULES"


def import_norm_modules(modules=()):
    """Imports ``modules`` and the modules named (comma-separated) in the environment variable
    ``D2_SMALLBN_NORM_MODULES``: a user's modules that call ``register_norm`` when imported, so that a
    command knows the user's norms by name. Adds ``modules`` to that variable, so that the processes the
    command starts import them too. Returns the names imported."""
    import importlib
    import os

    listed = [m.strip() for m in os.environ.get(NORM_MODULES_ENV, "").split(",") if m.strip()]
    names = list(dict.fromkeys(listed + [m.strip() for m in modules if m.strip()]))
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ImportError(f"cannot import the norm module {name!r} (named by --norm-module or "
                              f"{NORM_MODULES_ENV}): {e}. Fix: put the folder that holds it on PYTHONPATH, or "
                              "correct the module name (dotted, without .py)") from e
    if names:
        os.environ[NORM_MODULES_ENV] = ",".join(names)
    return names


def add_norm_module_flag(parser, purpose):
    """A command's ``--norm-module MODULE`` (repeatable): modules of the user's that register norms,
    imported by ``import_norm_modules`` before the command uses norm names; ``purpose`` ends the help."""
    parser.add_argument("--norm-module", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (repeatable): a module of yours that registers norms with "
                             f"d2_smallbn.register_norm, {purpose}; {NORM_MODULES_ENV}=MODULE[,MODULE] does the "
                             "same, also for the processes the command starts")


def import_requested_norm_modules(parser, modules):
    """``import_norm_modules(modules)``; a module that cannot be imported is ``parser``'s usage error."""
    try:
        import_norm_modules(modules)
    except ImportError as e:
        parser.error(str(e))


def spec_of_type(layer_class):
    """The table entry whose layer class is ``layer_class`` (or None)."""
    return next((spec for spec in NORMS.values() if spec.layer is layer_class), None)


BUILTIN_NORMS = frozenset(NORMS)


def spec_of(module):
    """The table entry of a norm module (or None)."""
    return spec_of_type(type(module))


def needs_dataset_size(s):
    """Whether any norm's ``before_train`` reads the dataset size with resolved settings ``s``."""
    return any(spec.needs_dataset_size(s[name]) for name, spec in NORMS.items() if spec.needs_dataset_size)


def driver_update_rate(s, names):
    """The ``update_rate`` for ``NormStateDriver`` that norms ``names`` ask for with settings ``s`` ("lr"
    when none asks)."""
    rates = {NORMS[n].update_rate(s[n]) for n in names if NORMS[n].update_rate is not None}
    if len(rates) > 1:
        raise ValueError(f"norms {sorted(names)} ask for different update rates {sorted(map(str, rates))}; "
                         "NormStateDriver gives one rate to every rate-driven layer")
    return rates.pop() if rates else "lr"


def conv_class_for(name, conv_type="auto"):
    """The conv class a conv feeding norm ``name`` must have (None: keep the conv)."""
    if conv_type not in CONV_TYPES:
        raise ValueError(f"conv type must be one of {tuple(CONV_TYPES)}, got {conv_type!r}")
    spec = NORMS.get(name)
    if spec is not None and spec.conv_required:
        if conv_type in ("ws", "centered"):
            raise ValueError(f"{name} needs its own conv ({spec.conv.__name__}); MODEL.SMALLBN.CONV = {conv_type!r} "
                             "is not supported with it")
        return spec.conv
    if conv_type == "auto":
        return spec.conv if spec is not None else None
    return CONV_TYPES[conv_type]


# ---- reading settings of any config type ------------------------------------------------------

def schema():
    """MODEL.SMALLBN's keys: {key: Setting or nested dict}."""
    return {**COMMON, **{name: spec.settings for name, spec in NORMS.items()}}


def defaults(node=None):
    """The default values as nested plain dicts."""
    node = schema() if node is None else node
    return {k: defaults(v) if isinstance(v, dict) else v.default for k, v in node.items()}


class Section(dict):
    """A read-only dict of settings that also reads as attributes (``s.CBN.WINDOW_SIZE``)."""

    def __getattr__(self, key):
        try:
            return self[key]
        except KeyError:
            raise AttributeError(key) from None


def _is_omegaconf(obj):
    return type(obj).__module__.startswith("omegaconf")


def _plain(obj):
    """A yacs CfgNode, an OmegaConf node or a mapping as nested plain dicts/lists."""
    if _is_omegaconf(obj):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(obj, resolve=True)
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    return obj


def _get(node, key):
    """``node[key]`` for a mapping or an OmegaConf node, or None."""
    try:
        return node[key] if key in node else None
    except TypeError:
        return None


def locate(settings):
    """(the MODEL.SMALLBN values, the base learning rate or None) of ``settings``:
    a whole detectron2 config (yacs ``CfgNode`` or OmegaConf, e.g. ``OmegaConf.create(cfg.dump())``),
    a LazyConfig root (its ``smallbn`` node; the LR from ``optimizer.lr``), the values themselves
    (a dict / CfgNode / DictConfig of MODEL.SMALLBN keys), or None (the defaults)."""
    if settings is None:
        return {}, None
    if not (isinstance(settings, dict) or _is_omegaconf(settings)):
        raise TypeError(f"settings must be a detectron2 config (CfgNode / DictConfig), a LazyConfig, a dict of "
                        f"MODEL.SMALLBN values or None, got {type(settings).__name__}")
    model = _get(settings, "MODEL")
    if model is not None:  # a whole detectron2 config
        solver = _get(settings, "SOLVER")
        return _plain(_get(model, "SMALLBN") or {}), (_plain(_get(solver, "BASE_LR")) if solver is not None else None)
    if _get(settings, "model") is not None or _get(settings, "optimizer") is not None:  # a LazyConfig root
        optimizer = _get(settings, "optimizer")
        lr = _get(optimizer, "lr") if optimizer is not None else None
        return _plain(_get(settings, "smallbn") or {}), _plain(lr)
    return _plain(settings), None


def _merge(values, node, path, errors):
    out = Section()
    if not isinstance(values, dict):
        errors.append(f"{path} = {values!r} is invalid: a section of settings ({', '.join(node)})")
        values = {}
    for key in values:
        if key not in node:
            errors.append(f"{path}.{key} is not a setting; valid keys of {path}: {', '.join(node)}")
    for key, item in node.items():
        name = f"{path}.{key}"
        if isinstance(item, dict):
            out[key] = _merge(values.get(key, {}), item, name, errors)
            continue
        value = values.get(key, item.default)
        if isinstance(value, list):
            value = tuple(value)
        problem = item.check(value)
        if problem:
            errors.append(f"{name} = {value!r} is invalid: use {problem}")
        out[key] = value
    return out


def resolve(settings=None, base_lr=None):
    """The complete, validated settings: a ``Section`` with every MODEL.SMALLBN key (defaults for
    the missing ones) and ``base_lr``. Raises ValueError naming each invalid or unknown key."""
    values, found_lr = locate(settings)
    errors = []
    s = _merge(values, schema(), "MODEL.SMALLBN", errors)
    for name, spec in NORMS.items():
        if spec.check_section is not None and not errors:
            errors += spec.check_section(s[name])
    if errors:
        raise ValueError("; ".join(errors))
    s["base_lr"] = base_lr if base_lr is not None else found_lr
    return s


# ---- scaling and checking phases ----------------------------------------------------------------

def scale_phases(name, section, counts, factor):
    """Norm ``name``'s iteration counts for a schedule ``factor`` times as long as the one they were set
    for. ``counts``: {key: iterations} (a subset of the norm's phases); ``section``: its resolved
    settings (momentum, buffer size). Each count is scaled, then raised to its phase's minimum; a
    ramp's end keeps its scaled length after its (possibly raised) start. Returns
    {key: (value, how it was chosen)}; the momentum is never changed (see docs/study.md)."""
    phases = NORMS[name].phases(section) if NORMS[name].phases else []
    unknown = set(counts) - {p.key for p in phases}
    if unknown:
        raise KeyError(f"{name} has no phase {sorted(unknown)}; its phases: {[p.key for p in phases]}")
    out = {}
    for p in (p for p in phases if p.key in counts):
        if p.after:  # a ramp: its length after the start is what scales
            start = out[p.after][0] if p.after in out else section[p.after]
            old_start = counts.get(p.after, section[p.after])
            length = round((counts[p.key] - old_start) * factor)
            value, raised = start + max(length, p.minimum), length < p.minimum
            how = f"{p.after} {start} + ({counts[p.key]} - {old_start}) x {factor:.4g} = {start + length}"
        else:
            scaled = round(counts[p.key] * factor)
            value, raised = max(scaled, p.minimum), scaled < p.minimum
            how = f"{counts[p.key]} x {factor:.4g} = {scaled}"
        out[p.key] = (value, how + (f", raised to {value}: {p.reason}" if raised else ""))
    return out


def short_phases(s, names):
    """[(name, key, value, least, reason)]: the phases of norms ``names`` that resolved settings ``s``
    set shorter than their rule allows."""
    short = []
    for name in names:
        spec, section = NORMS[name], s[name]
        for p in spec.phases(section) if spec.phases else ():
            least = p.minimum + (section[p.after] if p.after else 0)
            if section[p.key] < least:
                short.append((name, p.key, section[p.key], least, p.reason))
    return short
