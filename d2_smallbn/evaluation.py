"""COCO evaluation of a results file, checked up front, printed in the papers' layout.

The command is ``d2-smallbn-eval`` (also ``python -m d2_smallbn.evaluation``, ``tools/coco_eval.py``);
from Python::

    summary = evaluate_files("results.json", "instances_val.json", config="mask_rcnn_R50_FPN_cbn.yaml")

A results file is COCO's: a JSON list of detections ``{image_id, category_id, score, bbox}``
(bbox is [x, y, width, height]) and/or ``{..., segmentation}`` (an RLE ``{size: [h, w], counts}``).
Everything pycocotools would trip over (or silently get wrong) is checked first and reported as a
``EvalFileError``: one line naming the file, the problem and the fix.

Metrics are COCO's AP, AP50, AP75, APs, APm, APl, in percent (x100). A metric that COCO leaves
undefined (no ground truth in that area range) is ``None`` and prints as "-".
"""
import contextlib
import copy
import difflib
import io
import json
import math
import os
import sys

from .paths import check_output_paths

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
TASKS = ("bbox", "segm")
TASK_KEY = {"bbox": "bbox", "segm": "segmentation"}  # the detection key each task needs
TASK_TITLE = {"bbox": "box", "segm": "mask"}
REQUIRED_KEYS = ("image_id", "category_id", "score")
RESULTS_FIX = ("a results file is a JSON list of {image_id, category_id, score, bbox: [x, y, w, h]} "
               "and/or {..., segmentation: RLE}, as detectron2's COCOEvaluator writes "
               "(coco_instances_results.json)")


REWRITE_FIX = {
    "results file": "re-write the file completely (e.g. re-run inference); a partly written file cannot be evaluated",
    "annotation file": "restore the complete annotation file of the dataset (copy or download it again; the "
                       "built-in smallbn_shapes: `d2-smallbn-dataset` regenerates a damaged one); a partly "
                       "written file cannot be evaluated against",
}
NO_DETECTIONS = ("no detections (an empty list): every AP is nan, as detectron2's COCOEvaluator reports a model "
                 "without predictions; check that inference ran on this dataset")


class EvalFileError(Exception):
    """An input or output file that cannot be used; ``str()`` is one line: file, problem, fix."""

    def __init__(self, path, problem, fix):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{self.path}: {problem}. Fix: {fix}")


# ---- reading and checking ---------------------------------------------------------------------

def read_json(path, role):
    """Parses a JSON file; ``role`` ("results file", "annotation file") goes into the messages."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise EvalFileError(path, f"{role} not found", "check the path") from None
    except IsADirectoryError:
        raise EvalFileError(path, f"{role} is a directory", "pass the JSON file inside it") from None
    except OSError as e:
        raise EvalFileError(path, f"{role} cannot be read ({e.strerror or e})",
                            "check the path and permissions") from None
    if not raw.strip():
        raise EvalFileError(path, f"{role} is empty (0 bytes of JSON)",
                            "re-run the step that writes it; the run that wrote it probably died")
    try:
        return json.loads(raw)
    except UnicodeDecodeError:
        raise EvalFileError(path, f"{role} is not UTF-8 text (a binary file?)", "pass the JSON file") from None
    except json.JSONDecodeError as e:
        where = f"line {e.lineno} column {e.colno}"
        truncated = e.pos >= len(raw.rstrip()) - 1
        what = "ends in the middle of the JSON (truncated)" if truncated else f"is not valid JSON ({e.msg} at {where})"
        raise EvalFileError(path, f"{role} {what}", REWRITE_FIX.get(role, REWRITE_FIX["results file"])) from None


def _plural(n, word):
    return f"{n} {word}{'' if n == 1 else 's'}"  # regular plurals only


def _examples(values, limit=5):
    """Distinct values (hashable or not), sorted, the first ``limit`` shown."""
    distinct = sorted({repr(v): v for v in values})
    shown = ", ".join(distinct[:limit])
    return shown + (f", ... ({len(distinct)} distinct)" if len(distinct) > limit else "")


def _is_number(x):
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def load_annotations(path):
    """A pycocotools ``COCO`` object for a COCO annotation file, checked for the basics."""
    from pycocotools.coco import COCO

    data = read_json(path, "annotation file")
    fix = "pass a COCO instances annotation file (a JSON object with images, annotations and categories)"
    if not isinstance(data, dict):
        raise EvalFileError(path, f"annotation file holds a JSON {type(data).__name__}, not an object", fix)
    for key in ("images", "annotations", "categories"):
        if not isinstance(data.get(key), list):
            raise EvalFileError(path, f"annotation file has no '{key}' list", fix)
    if not data["images"]:
        raise EvalFileError(path, "annotation file lists no images", fix)
    if not data["categories"]:
        raise EvalFileError(path, "annotation file lists no categories", fix)
    for i, img in enumerate(data["images"]):
        if not isinstance(img, dict) or "id" not in img:
            raise EvalFileError(path, f"images[{i}] has no 'id'", fix)
    for i, cat in enumerate(data["categories"]):
        if not isinstance(cat, dict) or "id" not in cat:
            raise EvalFileError(path, f"categories[{i}] has no 'id'", fix)
    image_ids = {img["id"] for img in data["images"]}
    for i, ann in enumerate(data["annotations"]):
        missing = [k for k in ("id", "image_id", "category_id", "area") if not isinstance(ann, dict) or k not in ann]
        if missing:
            raise EvalFileError(path, f"annotations[{i}] has no {', '.join(map(repr, missing))}",
                                "every annotation needs id, image_id, category_id, area and bbox "
                                "(and segmentation to evaluate masks)")
        if ann["image_id"] not in image_ids:
            raise EvalFileError(path, f"annotations[{i}] refers to image_id {ann['image_id']!r}, which is not "
                                "in its images", "fix the annotation file")
    gt = COCO()
    gt.dataset = data
    with contextlib.redirect_stdout(io.StringIO()):
        gt.createIndex()
    return gt


def check_annotations_for(path, gt, tasks):
    """Checks that the annotation file has what ``tasks`` need (boxes; masks and image sizes)."""
    for t in tasks:
        for i, ann in enumerate(gt.dataset["annotations"]):
            if TASK_KEY[t] not in ann:
                raise EvalFileError(path, f"annotations[{i}] has no '{TASK_KEY[t]}', needed to evaluate {t}",
                                    f"use an annotation file with {TASK_KEY[t]} for every object, or evaluate "
                                    "only the other task (--tasks)")
    if "segm" in tasks:
        for i, img in enumerate(gt.dataset["images"]):
            if "height" not in img or "width" not in img:
                raise EvalFileError(path, f"images[{i}] has no height/width, needed to evaluate masks",
                                    "write each image's height and width into the annotation file")


def detect_tasks(detections):
    """The tasks every detection supports: "bbox" if all have a bbox, "segm" if all have a segmentation."""
    return [t for t in TASKS if all(isinstance(d, dict) and TASK_KEY[t] in d for d in detections)]


def load_results(path, gt, tasks=None):
    """Reads and checks a results file against the annotations ``gt``. Returns (detections, tasks)."""
    dets = read_json(path, "results file")
    if isinstance(dets, dict):
        hint = (" (this looks like an annotation file, not results)" if "annotations" in dets and "images" in dets
                else "")
        raise EvalFileError(path, f"results file holds a JSON object{hint}, not a list of detections", RESULTS_FIX)
    if not isinstance(dets, list):
        raise EvalFileError(path, f"results file holds a JSON {type(dets).__name__}, not a list of detections",
                            RESULTS_FIX)
    if not dets:  # evaluated as detectron2 does: AP nan for each task the annotations support
        if tasks is None:
            anns, imgs = gt.dataset["annotations"], gt.dataset["images"]
            tasks = [t for t in TASKS if all(TASK_KEY[t] in a for a in anns)
                     and (t == "bbox" or all("height" in i and "width" in i for i in imgs))]
        return dets, list(tasks)
    for i, d in enumerate(dets):
        if not isinstance(d, dict):
            raise EvalFileError(path, f"detection #{i} is a JSON {type(d).__name__}, not an object", RESULTS_FIX)
        missing = [k for k in REQUIRED_KEYS if k not in d]
        if missing:
            raise EvalFileError(path, f"detection #{i} has no {', '.join(map(repr, missing))}", RESULTS_FIX)
    if tasks is None:
        tasks = detect_tasks(dets)
        if not tasks:
            bare = [i for i, d in enumerate(dets) if "bbox" not in d and "segmentation" not in d]
            problem = (f"detection #{bare[0]} has neither 'bbox' nor 'segmentation'" if bare else
                       "some detections have only 'bbox' and others only 'segmentation'")
            raise EvalFileError(path, problem, RESULTS_FIX + "; every detection needs the same keys")
    else:
        for t in tasks:
            if t not in TASKS:
                raise ValueError(f"unknown task {t!r}; use {TASKS}")
            for i, d in enumerate(dets):
                if TASK_KEY[t] not in d:
                    present = " ".join(detect_tasks(dets)) or "..."
                    raise EvalFileError(path, f"detection #{i} has no '{TASK_KEY[t]}', needed to evaluate {t}",
                                        f"evaluate only the tasks the file has (--tasks {present}) or write the "
                                        "missing key")
    _check_ids(path, dets, gt)
    for i, d in enumerate(dets):
        if not _is_number(d["score"]):
            raise EvalFileError(path, f"detection #{i} has score {d['score']!r}, not a finite number", RESULTS_FIX)
        if "bbox" in tasks:
            _check_bbox(path, i, d["bbox"])
        if "segm" in tasks:
            _check_rle(path, i, d["segmentation"], gt.imgs[d["image_id"]])
    return dets, list(tasks)


def _check_ids(path, dets, gt):
    img_ids, cat_ids = set(gt.getImgIds()), set(gt.getCatIds())
    bad = [d["image_id"] for d in dets if not _hashable_in(d["image_id"], img_ids)]
    if bad:
        raise EvalFileError(path, f"{len(bad)} of {len(dets)} detections refer to image ids that are not in the "
                            f"annotation file: {_examples(bad)} (the annotation file has {_id_range(img_ids)})",
                            "evaluate against the annotation file of the dataset the results were computed on; "
                            "image_id must be one of its images[].id")
    bad = [d["category_id"] for d in dets if not _hashable_in(d["category_id"], cat_ids)]
    if bad:
        raise EvalFileError(path, f"{len(bad)} of {len(dets)} detections use category ids that are not in the "
                            f"annotation file: {_examples(bad)} (the annotation file has {_id_range(cat_ids)})",
                            "write the dataset's category ids, not the model's contiguous class indices "
                            "(detectron2 maps them back with metadata.thing_dataset_id_to_contiguous_id)")


def _hashable_in(value, ids):
    try:
        return value in ids
    except TypeError:  # a list or dict as an id
        return False


def _id_range(ids):
    if ids and all(isinstance(i, int) for i in ids):
        return f"{len(ids)} ids in {min(ids)}..{max(ids)}"
    return f"{len(ids)} ids: {_examples(ids, 3)}"


def _check_bbox(path, i, box):
    if not isinstance(box, (list, tuple)) or len(box) != 4 or not all(_is_number(v) for v in box):
        shown = f"{len(box)} values" if isinstance(box, (list, tuple)) else f"a {type(box).__name__}"
        raise EvalFileError(path, f"detection #{i} has bbox {json.dumps(box)[:80]} ({shown}), not 4 finite numbers",
                            "write bbox as [x, y, width, height] in pixels (COCO's XYWH)")
    if box[2] < 0 or box[3] < 0:
        raise EvalFileError(path, f"detection #{i} has bbox {box} with a negative width or height",
                            "write bbox as [x, y, width, height] (COCO's XYWH), not [x1, y1, x2, y2]")


def _check_rle(path, i, seg, img):
    from pycocotools import mask as mask_utils

    fix = "write segmentation as an RLE {size: [height, width], counts} of the image (pycocotools.mask.encode)"
    if not isinstance(seg, dict) or "size" not in seg or "counts" not in seg:
        kind = "a polygon list" if isinstance(seg, list) else f"a {type(seg).__name__}"
        raise EvalFileError(path, f"detection #{i} has a segmentation that is {kind}, not an RLE with size and counts",
                            fix)
    size = seg["size"]
    known = "height" in img and "width" in img  # if not, check_annotations_for reports it
    if not isinstance(size, (list, tuple)) or len(size) != 2 or (known and list(size) != [img["height"], img["width"]]):
        raise EvalFileError(path, f"detection #{i} has a mask of size {size} on image {img['id']}, which is "
                            f"{img.get('height')}x{img.get('width')} in the annotation file",
                            "encode masks at the image's original resolution (height, width)")
    try:
        rle = _compressed_rle(seg)
        mask_utils.area([rle])
    except Exception as e:  # pycocotools raises assorted errors on bad counts
        raise EvalFileError(path, f"detection #{i} has an RLE whose counts cannot be decoded ({e})", fix) from None


def _compressed_rle(seg):
    """A fresh compressed RLE dict (counts as str) from a compressed or uncompressed one."""
    from pycocotools import mask as mask_utils

    counts = seg["counts"]
    h, w = seg["size"]
    if isinstance(counts, list):
        rle = mask_utils.frPyObjects({"size": [h, w], "counts": counts}, h, w)
    else:
        rle = {"size": [h, w], "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    return rle


# ---- evaluation -------------------------------------------------------------------------------

def _task_detections(dets, task):
    """A fresh list holding only what ``task`` needs: pycocotools' loadRes mutates its input (adds
    area/id/iscrowd, turns bbox into arrays), and with both a bbox and a segmentation it would take
    the box area for masks (detectron2's evaluator drops the bbox for segm for the same reason)."""
    out = []
    for d in dets:
        e = {"image_id": d["image_id"], "category_id": d["category_id"], "score": float(d["score"])}
        if task == "bbox":
            e["bbox"] = [float(v) for v in d["bbox"]]
        else:
            e["segmentation"] = _compressed_rle(d["segmentation"])
        out.append(e)
    return out


def evaluate(gt, dets, tasks, verbose=False):
    """COCOeval per task. Returns {task: {metric: percent or None}}; with no detections every
    metric is nan (pycocotools cannot load an empty list; detectron2 reports nan)."""
    from pycocotools.cocoeval import COCOeval

    results = {}
    for task in tasks:
        if not dets:
            results[task] = {m: math.nan for m in METRICS}
            continue
        sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
        with sink:
            dt = gt.loadRes(_task_detections(dets, task))
            ev = COCOeval(gt, dt, task)
            ev.evaluate()
            ev.accumulate()
            ev.summarize()
        results[task] = {m: (None if v < 0 else float(v) * 100.0) for m, v in zip(METRICS, ev.stats[:6])}
    return results


# ---- presentation -----------------------------------------------------------------------------

def _fmt(v, signed=False):
    if v is None:
        return "-"
    if math.isnan(v):
        return "nan"
    return f"{v:+.1f}" if signed else f"{v:.1f}"


def format_table(measured, tasks, paper=None):
    """The papers' layout: one column block per task (AP^box, AP^mask) with AP, AP50, AP75, APs, APm,
    APl; a row for the measured numbers and, given the paper's row, that row and the difference."""
    rows = [("measured", measured, False)]
    if paper is not None:
        label = "paper"
        if paper.get("paper") or paper.get("table"):
            label += f" ({paper.get('paper', '?')}, Table {paper.get('table', '?')})"
        reported = {t: paper.get(t) or {} for t in tasks}
        diff = {t: {m: (measured[t][m] - reported[t][m]
                        if measured[t].get(m) is not None and reported[t].get(m) is not None else None)
                    for m in METRICS} for t in tasks}
        rows += [(label, reported, False), ("measured - paper", diff, True)]
    width = max(len(label) for label, _, _ in rows)
    block_width = len(METRICS) * 8 - 2
    lines = [
        " " * width + " | " + " | ".join(f"{'AP^' + TASK_TITLE[t]:^{block_width}}" for t in tasks),
        " " * width + " | " + " | ".join("  ".join(f"{m:>6}" for m in METRICS) for _ in tasks),
        "-" * width + "-+-" + "-+-".join("-" * block_width for _ in tasks),
    ]
    for label, values, signed in rows:
        cells = ["  ".join(f"{_fmt(values.get(t, {}).get(m), signed):>6}" for m in METRICS) for t in tasks]
        lines.append(f"{label:<{width}} | " + " | ".join(cells))
    if paper is not None and paper.get("row"):
        lines.append(f"paper row: {paper['row']}")
    return "\n".join(lines)


def default_output_path(results_path):
    root, _ = os.path.splitext(os.path.abspath(results_path))
    return root + ".eval.json"


def lookup_paper(config):
    """(paper row or None, message or None) for a config name (``paper_results.paper_result``);
    when there is no row the message says why (ambiguous file name, closest names)."""
    from .paper_results import PAPER_RESULTS, paper_result

    row = paper_result(config)
    if row is not None:
        return row, None
    base = os.path.basename(config.replace("\\", "/"))
    same_base = sorted(k for k in PAPER_RESULTS if os.path.basename(k) == base)
    if len(same_base) > 1:
        hint = f"the file name is ambiguous, pass one of: {', '.join(same_base)}"
    else:
        close = difflib.get_close_matches(config, sorted(PAPER_RESULTS), n=3, cutoff=0.6)
        hint = (f"closest: {', '.join(close)}" if close else
                f"{len(PAPER_RESULTS)} configs are recorded, see d2_smallbn/paper_results.py")
    return None, (f"note: no paper result is recorded for config {config!r} in d2_smallbn.paper_results "
                  f"({hint}); showing the measured row only")


def evaluate_files(results_path, annotations_path, tasks=None, config=None, output=None, verbose=False,
                   echo=print):
    """Checks, evaluates, prints the table and writes the JSON summary. Returns the summary dict.
    Raises ``EvalFileError`` for a bad input file, an unwritable output, or an output that is an input
    (or a folder holding one; checked before anything is read or written)."""
    output = output or default_output_path(results_path)
    check_output_paths([("--output", output)], [("results file", results_path), ("annotation file", annotations_path)],
                       error=EvalFileError)
    if tasks is not None:
        tasks = [t for t in TASKS if t in tasks]  # canonical order, no repeats
    gt = load_annotations(annotations_path)
    if tasks is not None:
        check_annotations_for(annotations_path, gt, tasks)
    dets, tasks = load_results(results_path, gt, tasks)
    check_annotations_for(annotations_path, gt, tasks)
    measured = evaluate(gt, dets, tasks, verbose=verbose)
    warnings = [] if dets else [f"{results_path}: {NO_DETECTIONS}"]
    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)

    paper, note = (None, None)
    if config:
        paper, note = lookup_paper(config)
    echo(f"COCO evaluation of {results_path} ({_plural(len(dets), 'detection')}) against {annotations_path} "
         f"({_plural(len(gt.getImgIds()), 'image')}, {len(gt.getCatIds())} categories)")
    if config:
        echo(f"config: {config}")
    echo(format_table(measured, tasks, paper))
    if note:
        echo(note)

    summary = {
        "results_file": os.path.abspath(results_path),
        "annotation_file": os.path.abspath(annotations_path),
        "tasks": tasks,
        "units": "percent (COCO AP x 100); null where COCO leaves a metric undefined",
        "num_detections": len(dets),
        "num_images": len(gt.getImgIds()),
        "num_categories": len(gt.getCatIds()),
        "metrics": measured,
        "warnings": warnings,
        "config": config,
        "paper": copy.deepcopy(paper),
        "summary_file": os.path.abspath(output),
    }
    try:
        with open(output, "w") as f:
            # JSON has no nan: null there, explained in "warnings"
            json.dump({**summary, "metrics": {t: {m: (None if v is not None and math.isnan(v) else v)
                                                  for m, v in ms.items()} for t, ms in measured.items()}},
                      f, indent=2)
            f.write("\n")
    except OSError as e:
        raise EvalFileError(output, f"the JSON summary cannot be written ({e.strerror or e})",
                            "pass --output with a writable path") from None
    echo(f"summary written to {output}")
    return summary


def main(argv=None):
    """The command line of d2-smallbn-eval; returns the exit code (2 for a bad file)."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(
        prog="d2-smallbn-eval",
        description="COCO box/mask AP of a results file against an annotation file, in the papers' layout, "
                    "optionally beside the paper's reported row for a config.")
    parser.add_argument("results", help="COCO results JSON (a list of detections), e.g. coco_instances_results.json")
    parser.add_argument("annotations", help="COCO annotation JSON of the evaluated images")
    parser.add_argument("--tasks", nargs="+", choices=TASKS,
                        help="tasks to evaluate (default: bbox if every detection has a bbox, segm if every "
                             "detection has a segmentation)")
    parser.add_argument("--config", help="config name (e.g. mask_rcnn_R50_FPN_cbn.yaml) whose paper row to show")
    parser.add_argument("--output", help="JSON summary path (default: RESULTS with .eval.json)")
    parser.add_argument("--verbose", action="store_true", help="also print pycocotools' own output")
    args = parser.parse_args(argv)
    try:
        evaluate_files(args.results, args.annotations, tasks=args.tasks, config=args.config, output=args.output,
                       verbose=args.verbose)
    except EvalFileError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
