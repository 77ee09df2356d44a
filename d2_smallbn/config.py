"""``add_smallbn_config(cfg)``: the MODEL.SMALLBN section, with every hyper-parameter of the
three methods, and its validation."""
from detectron2.config import CfgNode as CN

CONV_TYPES = ("auto", "plain", "ws", "centered")
SMALLBN_NORMS = ("CBN", "MABN", "BCN")


def add_smallbn_config(cfg):
    """Adds MODEL.SMALLBN (idempotent). Defaults are the papers' / released code's."""
    if "SMALLBN" in cfg.MODEL:
        return cfg
    _c = cfg.MODEL.SMALLBN = CN()
    # Conv type of every conv whose output feeds a norm. "auto": follows the norm
    # (CBN -> CBNConv2d, MABN -> CenteredConv2d, BCN -> WSConv2d, others unchanged);
    # "ws" / "centered" / "plain": that weight transform for every normed conv (GN+WS baselines).
    _c.CONV = "auto"
    # Initialization when training from scratch: "" keeps detectron2's; "he" re-initializes
    # every normed conv with He (fan_out, ReLU) and every norm with gamma 1, beta 0.
    _c.INIT = ""
    # The paper's images per GPU; training warns when a process gets a different number (0: no check).
    _c.PAPER_IMS_PER_GPU = 0

    _c.CBN = CN()
    _c.CBN.WINDOW_SIZE = 4          # k, counting the current iteration; k * images/GPU ~= 16
    _c.CBN.BURNIN_ITERS = 0         # iterations of plain BN before the window is used
    _c.CBN.BURNIN_EPOCHS = 0.0      # if > 0, overrides BURNIN_ITERS: epochs * dataset size / IMS_PER_BATCH
    _c.CBN.RHO = 1.0                # Taylor weight; 0 = "Naive CBN"
    _c.CBN.MOMENTUM = 0.1           # EMA of the statistics used in training, for eval
    _c.CBN.EPS = 1e-5

    _c.MABN = CN()
    _c.MABN.MOMENTUM = 0.98         # alpha of the EMA
    _c.MABN.BUFFER_SIZE = 16        # m, iterations in the simple moving averages
    _c.MABN.WARMUP_ITERS = 100      # batch statistics before this iteration (backbone)
    _c.MABN.FPN_WARMUP_ITERS = 100  # the same for the FPN
    _c.MABN.HEADS_WARMUP_ITERS = 100  # the same for the heads (the paper's detection runs: 10000)
    _c.MABN.CLIP_LAMBDA = 5.0       # r is clipped to [1/lambda, lambda]
    _c.MABN.CLIP_WARMUP_ITERS = 1000  # r = 1 until this iteration
    _c.MABN.EPS = 1e-5

    _c.BCN = CN()
    _c.BCN.NUM_GROUPS = 32
    _c.BCN.EPS = 1e-5
    # The running estimates' update rate r. "lr": the current learning rate of the layer's parameters,
    # every iteration (the paper); "fixed": BCN.UPDATE_RATE. Two keys of fixed types, so that either
    # choice loads from YAML, the command line and a dumped config.yaml (as CLIP_TYPE / CLIP_VALUE do).
    _c.BCN.UPDATE_RATE_MODE = "lr"
    _c.BCN.UPDATE_RATE = 0.0        # used with UPDATE_RATE_MODE "fixed": a number in (0, 1]
    _c.WS = CN()
    _c.WS.EPS = 1e-5
    _c.WS.MODE = "std"              # "std": released checkpoints; "var": paper eq. 7
    return cfg


def _require(ok, key, value, what):
    if not ok:
        raise ValueError(f"MODEL.SMALLBN.{key} = {value!r} is invalid: {what}")


def check_smallbn_config(cfg):
    """Raises ValueError naming the key and the valid range for every invalid value."""
    s = cfg.MODEL.SMALLBN
    num = (int, float)
    _require(s.CONV in CONV_TYPES, "CONV", s.CONV, f"use one of {CONV_TYPES}")
    _require(s.INIT in ("", "he"), "INIT", s.INIT, "use '' (detectron2's init) or 'he'")
    _require(isinstance(s.PAPER_IMS_PER_GPU, int) and s.PAPER_IMS_PER_GPU >= 0, "PAPER_IMS_PER_GPU",
             s.PAPER_IMS_PER_GPU, "an integer >= 0 (0 disables the check)")
    c = s.CBN
    _require(isinstance(c.WINDOW_SIZE, int) and c.WINDOW_SIZE >= 1, "CBN.WINDOW_SIZE", c.WINDOW_SIZE,
             "an integer >= 1 (1 is plain BN)")
    _require(isinstance(c.BURNIN_ITERS, int) and c.BURNIN_ITERS >= 0, "CBN.BURNIN_ITERS", c.BURNIN_ITERS,
             "an integer >= 0")
    _require(isinstance(c.BURNIN_EPOCHS, num) and c.BURNIN_EPOCHS >= 0, "CBN.BURNIN_EPOCHS", c.BURNIN_EPOCHS,
             "a number >= 0")
    _require(isinstance(c.RHO, num) and c.RHO >= 0, "CBN.RHO", c.RHO, "a number >= 0")
    _require(isinstance(c.MOMENTUM, num) and 0 < c.MOMENTUM <= 1, "CBN.MOMENTUM", c.MOMENTUM, "a number in (0, 1]")
    m = s.MABN
    _require(isinstance(m.MOMENTUM, num) and 0 <= m.MOMENTUM < 1, "MABN.MOMENTUM", m.MOMENTUM, "a number in [0, 1)")
    _require(isinstance(m.BUFFER_SIZE, int) and m.BUFFER_SIZE >= 1, "MABN.BUFFER_SIZE", m.BUFFER_SIZE,
             "an integer >= 1")
    for key in ("WARMUP_ITERS", "FPN_WARMUP_ITERS", "HEADS_WARMUP_ITERS", "CLIP_WARMUP_ITERS"):
        _require(isinstance(m[key], int) and m[key] >= 0, "MABN." + key, m[key], "an integer >= 0")
    _require(isinstance(m.CLIP_LAMBDA, num) and m.CLIP_LAMBDA >= 1, "MABN.CLIP_LAMBDA", m.CLIP_LAMBDA,
             "a number >= 1 (r is clipped to [1/lambda, lambda])")
    b = s.BCN
    _require(isinstance(b.NUM_GROUPS, int) and b.NUM_GROUPS >= 1, "BCN.NUM_GROUPS", b.NUM_GROUPS, "an integer >= 1")
    _require(b.UPDATE_RATE_MODE in ("lr", "fixed"), "BCN.UPDATE_RATE_MODE", b.UPDATE_RATE_MODE,
             "'lr' (the current learning rate) or 'fixed' (BCN.UPDATE_RATE)")
    if b.UPDATE_RATE_MODE == "fixed":
        _require(isinstance(b.UPDATE_RATE, num) and 0 < b.UPDATE_RATE <= 1, "BCN.UPDATE_RATE", b.UPDATE_RATE,
                 "with UPDATE_RATE_MODE 'fixed', a number in (0, 1] (0 would freeze the estimates: GN plus a "
                 "fixed affine)")
    else:
        _require(isinstance(b.UPDATE_RATE, num) and b.UPDATE_RATE == 0, "BCN.UPDATE_RATE", b.UPDATE_RATE,
                 "it is used only with MODEL.SMALLBN.BCN.UPDATE_RATE_MODE 'fixed', and the mode is 'lr'. Fix: add "
                 "MODEL.SMALLBN.BCN.UPDATE_RATE_MODE fixed, or leave UPDATE_RATE at 0.0 to follow the learning rate")
    _require(s.WS.MODE in ("std", "var"), "WS.MODE", s.WS.MODE, "'std' (released checkpoints) or 'var' (eq. 7)")
    for key, value in (("CBN.EPS", c.EPS), ("MABN.EPS", m.EPS), ("BCN.EPS", b.EPS), ("WS.EPS", s.WS.EPS)):
        _require(isinstance(value, num) and value > 0, key, value, "a number > 0")
    _require(not (s.CONV == "ws" and "CBN" in _norm_names(cfg)), "CONV", s.CONV,
             "CBN needs its own conv (CBNConv2d); WS convs with CBN are not supported")
    return cfg


def _norm_names(cfg):
    m = cfg.MODEL
    return {m.RESNETS.NORM, m.FPN.NORM, m.ROI_BOX_HEAD.NORM, m.ROI_MASK_HEAD.NORM, m.RETINANET.NORM}
