"""The command line of weight conversion: ``d2-smallbn-convert-weights`` (``python -m d2_smallbn.weights``;
its former name ``d2-smallbn-convert``, ``python -m d2_smallbn.convert``, is an alias)."""
import argparse
import json
import sys
from collections import Counter

from ..norms import add_norm_module_flag, import_requested_norm_modules
from .hints import WEIGHT_TRANSFORMS
from .layouts import targets
from .reading import ConvertError
from .writing import convert_file

COMMAND = "d2-smallbn-convert-weights"


def format_report(report):
    """The report of ``convert_file`` as the lines the command prints."""
    lines = [f"converted {report['source']} -> {report['output']}",
             f"  {report['num_output_keys']} tensors written from {report['num_source_keys']} keys"
             + (f" ('module.' removed from {report['module_prefix_stripped']})" if report["module_prefix_stripped"]
                else ""),
             "  norms found: " + (", ".join(f"{k} x{n}" for k, n in sorted(report["source_norm_layouts"].items()))
                                  or "none")
             + "; written for: " + (", ".join(f"{t} x{n}" for t, n in sorted(report["targets_used"].items()))
                                    or "-")]
    lines.append(f"  convs trained with weight transform: {report['weight_transform']}"
                 + (" (--conv not given: fine-tuning cannot check WS/centring)"
                    if report["weight_transform"] == "unknown" else ""))
    derived = Counter(m["how"] for m in report["mapped"] if m["how"] != "copy")
    for how, n in sorted(derived.items()):
        lines.append(f"  {n} x {how}")
    for note in report["notes"]:
        lines.append(f"  note: {note}")
    hints = report.get("config_hints") or {}
    if hints:
        lines.append("  config for these weights (input settings: if trained with torchvision's preprocessing):")
        lines += [f"    {k}: {json.dumps(v)}" for k, v in hints.items()]
    reasons = Counter(d["reason"] for d in report["dropped"])
    for reason, n in sorted(reasons.items()):
        lines.append(f"  dropped {n} key{'s' if n > 1 else ''}: {reason}")
    if report["expected_missing_on_load"]:
        lines.append("  loading will list as missing (state the layer starts fresh): "
                     + ", ".join(report["expected_missing_on_load"]))
    if report["unmapped"]:
        lines.append(f"UNMAPPED: {len(report['unmapped'])} key(s) could not be mapped:")
        lines += [f"  {u['key']}: {u['reason']}" for u in report["unmapped"]]
    else:
        lines.append("every key was mapped")
    lines.append(f"report: {report['report']}")
    return "\n".join(lines)


def parser():
    """The command's arguments; --target-norm offers the norms registered when it is called."""
    p = argparse.ArgumentParser(
        prog=COMMAND,
        description="Convert a torchvision-style ResNet checkpoint (BN, GN+WS, BCN+WS, weight-centralized) "
                    "into a detectron2 .pkl for d2_smallbn's norms. Also available as d2-smallbn-convert.")
    p.add_argument("input", help="torch checkpoint (.pth/.pt/.tar), optionally DataParallel ('module.')")
    p.add_argument("output", help="detectron2 weights to write (*.pkl), for MODEL.WEIGHTS")
    p.add_argument("--target-norm", default="auto", choices=targets(),
                   help="MODEL.RESNETS.NORM of the model that will load the weights (auto: BN->bn, GN->gn, "
                        "a norm's own layout (BCN, MABN) -> that norm); bn/frozenbn/syncbn/cbn keep the BN statistics "
                        "(num_batches_tracked only for bn/syncbn); mabn writes running_sqmean = running_var + "
                        "running_mean^2; a norm of yours once --norm-module registers it")
    p.add_argument("--num-groups", type=int, default=32,
                   help="BCN groups (MODEL.SMALLBN.BCN.NUM_GROUPS), to reduce a per-channel group affine")
    p.add_argument("--conv", default="unknown", choices=WEIGHT_TRANSFORMS,
                   help="what the checkpoint's convs did to their weights in training: ws (weight "
                        "standardization, e.g. GN+WS / BCN+WS), centered (weight centralization, MABN), "
                        "plain; recorded in the .pkl so that fine-tuning checks the config's convs "
                        "(MODEL.SMALLBN.CONV); unknown (default): not checked")
    p.add_argument("--keep-classifier", action="store_true", help="write fc.* as linear.* instead of dropping it")
    p.add_argument("--report", help="JSON report path (default: OUTPUT with .report.json)")
    p.add_argument("--strict", action="store_true", help="exit with 1 if any key could not be mapped")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow checkpoints with arbitrary pickled objects (unpickling can run code)")
    add_norm_module_flag(p, "so that --target-norm takes them")
    return p


def import_requested_norms(argv):
    """Imports the modules of --norm-module in ``argv`` and of D2_SMALLBN_NORM_MODULES, before the
    parser lists --target-norm's choices; a module that cannot be imported is a usage error."""
    modules = argparse.ArgumentParser(add_help=False)
    add_norm_module_flag(modules, "")
    import_requested_norm_modules(parser(), modules.parse_known_args(argv)[0].norm_module)


def main(argv=None):
    """Exit codes: 0 done; 1 unmapped keys with --strict (the output is still written); 2 unusable
    input or output, or bad arguments."""
    argv = sys.argv[1:] if argv is None else list(argv)
    import_requested_norms(argv)
    arguments = parser()
    args = arguments.parse_args(argv)
    if args.num_groups < 1:
        arguments.error("--num-groups must be >= 1")
    try:
        report = convert_file(args.input, args.output, args.target_norm, args.num_groups, args.keep_classifier,
                              args.report, args.trust_pickle, args.conv)
    except ConvertError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.strict and report["unmapped"]:
        print(f"error: {len(report['unmapped'])} key(s) of {args.input} could not be mapped (--strict)",
              file=sys.stderr)
        return 1
    return 0
