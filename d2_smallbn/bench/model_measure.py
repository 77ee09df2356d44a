"""The model benchmark's measurements: training, inference and memory steps of each setting's model,
interleaved round-robin, after priming every model into its steady state and checking its folded
model; and the profiled step of ``--profile``."""
import sys

import torch

from .common import CpuShare
from .measure import SavedTensorBytes, cuda_peak, profile_table, rotated, timed
from .model_build import MeasuredModel, build_cfg, fixed_proposals, make_inputs, pseudo_pretrained_backbone
from .model_fold import check_fold
from .model_settings import setting
from ..modeling import fold_model

PRIMING_SEED = 10_000  # the RNG seeds of the priming steps start here, away from the rounds'


def _begin_step(s, round_seed):
    """Training mode, the trainer hook's per-iteration state, and the round's RNG seed (RoI sampling
    draws the same numbers in every setting)."""
    s.model.train()
    s.before_step()
    torch.manual_seed(round_seed)


def _end_step(s):
    s.optimizer.zero_grad(set_to_none=True)
    s.iteration += 1


def train_step(s, inputs, round_seed, device, timed_step=True):
    """One training step of ``s`` (a ``MeasuredModel``); returns its duration in seconds, from the forward
    to the end of the optimizer's step."""
    _begin_step(s, round_seed)
    losses = []

    def step():
        losses.append(sum(s.model(inputs).values()))
        losses[0].backward()
        s.optimizer.step()

    with s.storage:
        s.storage.iter = s.iteration
        elapsed = timed(device, step)
    _end_step(s)
    loss = float(losses[0].detach())
    if not torch.isfinite(torch.tensor(loss)):
        raise FloatingPointError(f"{s.key}: training loss is {loss} at iteration {s.iteration - 1}; lower --lr")
    if timed_step:
        fg = s.storage.latest().get("roi_head/num_fg_samples")
        if fg is not None:
            s.num_fg.append(float(fg[0]))
    return elapsed


def infer_step(model, inputs, device):
    def step():
        with torch.no_grad():
            model.inference(inputs, do_postprocess=False)
    return timed(device, step)


def memory_step(s, inputs, round_seed, device):
    """An untimed training step measuring the saved-for-backward bytes and the CUDA peak."""
    state = s.state_bytes()
    saved = SavedTensorBytes(exclude=list(s.model.parameters()) + list(s.model.buffers()))
    _begin_step(s, round_seed)
    with cuda_peak(device) as peak:
        with s.storage:
            s.storage.iter = s.iteration
            with saved:
                losses = sum(s.model(inputs).values())
            losses.backward()
            s.optimizer.step()
    entry = {"saved_bytes": saved.bytes, "state_bytes": state, "grad_bytes": s.grad_bytes()}
    entry["cpu_metric_bytes"] = entry["saved_bytes"] + state + entry["grad_bytes"]
    if peak["bytes"] is not None:
        entry["cuda_step_peak_delta_bytes"] = peak["bytes"]
        entry["metric_bytes"] = peak["bytes"] + state
    else:
        entry["metric_bytes"] = entry["cpu_metric_bytes"]
    _end_step(s)
    return entry


def profile_step(s, inputs, round_seed, device, out):
    """One more (untimed) training step of ``s`` under torch.profiler; writes its ops sorted by
    self time to DIR/profile_<setting>.txt and returns the path."""
    table = profile_table(device, lambda: train_step(s, inputs, round_seed, device, timed_step=False),
                          row_limit=40, max_name_column_width=60)
    path = out / f"profile_{s.key}.txt"
    path.write_text(f"{s.key}: {setting(s.key).label}; one training step\n{table}\n")
    return str(path)


def build_models(args, device, keys):
    """The inputs (training, inference, priming) and a primed ``MeasuredModel`` per setting, with the
    priming steps each took."""
    h, w = args.size
    num_classes = 5 if args.tiny else 80
    train_inputs, infer_inputs = make_inputs(h, w, num_classes, device, args.seed, args.batch)
    prime_inputs, _ = make_inputs(min(h, 128), min(w, 192), num_classes, device, args.seed + 1, args.batch)
    backbone_state = pseudo_pretrained_backbone(args, infer_inputs)
    count = build_cfg(keys[0], args).MODEL.RPN.POST_NMS_TOPK_TRAIN
    proposals = {tuple(tuple(x["image"].shape[-2:]) for x in batch): fixed_proposals(batch, count, args.seed + i)
                 for i, batch in enumerate((train_inputs, prime_inputs))}
    models = {}
    for key in keys:
        if args.verbose:
            print(f"building {key}", file=sys.stderr, flush=True)
        models[key] = MeasuredModel(key, args, backbone_state, proposals)
        models[key].model.to(device)
    primed = {}
    for key, s in models.items():
        primed[key] = s.prime_steps()
        for i in range(primed[key]):
            train_step(s, prime_inputs, PRIMING_SEED + i, device, timed_step=False)
        s.check_steady_state()
    return (train_inputs, infer_inputs), models, primed


def fold_and_check(models, inputs):
    """Folds every model (after the warmup rounds: statistics have moved off their initial values) and
    checks each folded model against its unfolded one; returns the checks' reports."""
    report = {}
    for key, s in models.items():
        s.folded = fold_model(s.model)
        s.folded.requires_grad_(False)
        report[key] = check_fold(s, inputs)
    return report


def run(args, device, keys):
    """Every measurement of the settings ``keys``: warmup rounds, timed rounds (training steps, then
    inference unfolded and folded), memory rounds; then the profiled steps."""
    (train_inputs, infer_inputs), models, primed = build_models(args, device, keys)
    rounds = args.warmup + args.iters
    train_t = {k: [] for k in keys}
    infer_t = {(k, f): [] for k in keys for f in (False, True)}
    memory = {k: [] for k in keys}
    fold_report, share = {}, None
    for r in range(rounds + args.memory_rounds):
        timed_round = args.warmup <= r < rounds
        if r == args.warmup:
            fold_report = fold_and_check(models, infer_inputs)
            share = CpuShare()
        if r == rounds:
            contention = share.result()  # the timing phase only
        for key in rotated(keys, r):
            if r >= rounds:
                memory[key].append(memory_step(models[key], train_inputs, r, device))
                continue
            t = train_step(models[key], train_inputs, r, device, timed_step=timed_round)
            if timed_round:
                train_t[key].append(t)
        if timed_round:
            for key, folded in rotated([(k, f) for k in keys for f in (False, True)], r):
                s = models[key]
                model = s.folded if folded else s.model.eval()
                infer_t[(key, folded)].append(infer_step(model, infer_inputs, device))
                s.model.train()
        if args.verbose:
            print(f"round {r + 1}/{rounds + args.memory_rounds}", file=sys.stderr, flush=True)
    profiles = {key: profile_step(models[key], train_inputs, rounds + args.memory_rounds, device, args.out)
                for key in args.profile}
    return {"train": train_t, "infer": infer_t, "memory": memory, "fold": fold_report, "primed": primed,
            "contention": contention, "settings": models, "profiles": profiles}
