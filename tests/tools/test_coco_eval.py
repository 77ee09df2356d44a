"""d2-smallbn-eval (d2_smallbn.evaluation): COCO AP on a tiny hand-made ground truth with
known answers, the paper's row beside the measured one, and one-line errors (exit code 2) for
malformed or mismatched files.

Ground truth: 4 images (160x200), categories 1 and 3 (not contiguous on purpose), one object of
each category per image: a triangle (category 1) and a quadrilateral (category 3), both of
"medium" area, with polygon masks. Known answers (COCO: 101 recall points 0, 0.01, ..., 1; the
precision at a recall point is the best precision at any recall >= it, 0 past the last recall):

- every object detected exactly, score 1: precision 1 up to recall 1 -> AP 100 at every IoU.
- exactly half of the objects of each category detected exactly (category 1 in images 0, 1;
  category 3 in images 2, 3), nothing else: recall reaches 0.5 = 2/4 with precision 1; recall
  points 0.00..0.50 (51 of 101) have precision 1, the rest 0 -> AP = 100 * 51/101 = 50.495...
  at every IoU threshold (the boxes/masks are exact), so AP = AP50 = AP75 = APm.
- the same plus, for every missed object, a false positive shifted 120 px (IoU 0) with a HIGHER
  score (0.9 vs 0.8): ranked FP, FP, TP, TP per category, precision 0, 0, 1/3, 2/4 -> interpolated
  0.5 for every recall point up to 0.5 -> AP = 100 * 0.5 * 51/101 = 25.247...
- APs and APl are undefined (no small or large objects): None in the API, "-" in the table.
"""
import contextlib
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from pycocotools import mask as mask_utils

from d2_smallbn import evaluation
from d2_smallbn.evaluation import EvalFileError, evaluate_files

REPO_ROOT = Path(__file__).resolve().parents[2]
COMMAND = [sys.executable, "-m", "d2_smallbn.evaluation"]
H, W = 160, 200
CATS = (1, 3)
SHIFT = 120
HALF = 100.0 * 51 / 101          # 50.495...
HALF_WITH_FP = 100.0 * 0.5 * 51 / 101  # 25.247...


def _polygon(cat, dx=0):
    if cat == 1:  # triangle in a 60x60 box at (10, 10)
        pts = [10, 10, 70, 10, 40, 70]
    else:  # quadrilateral in a 50x40 box at (10, 90)
        pts = [10, 90, 60, 95, 55, 130, 15, 125]
    return [float(v + (dx if i % 2 == 0 else 0)) for i, v in enumerate(pts)]


def _bbox(poly):
    xs, ys = poly[0::2], poly[1::2]
    return [min(xs), min(ys), max(xs) - min(xs), max(ys) - min(ys)]


def _shoelace(poly):
    xs, ys = poly[0::2], poly[1::2]
    n = len(xs)
    return abs(sum(xs[i] * ys[(i + 1) % n] - xs[(i + 1) % n] * ys[i] for i in range(n))) / 2


def _rle(poly):
    rle = mask_utils.merge(mask_utils.frPyObjects([poly], H, W))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def make_gt():
    images, annotations = [], []
    for img_id in range(4):
        images.append({"id": img_id, "file_name": f"{img_id}.png", "height": H, "width": W})
        for cat in CATS:
            poly = _polygon(cat)
            annotations.append({"id": len(annotations) + 1, "image_id": img_id, "category_id": cat,
                                "bbox": _bbox(poly), "segmentation": [poly], "area": _shoelace(poly),
                                "iscrowd": 0})
    assert all(32 ** 2 < a["area"] < 96 ** 2 for a in annotations)  # all "medium"
    return {"images": images, "annotations": annotations,
            "categories": [{"id": c, "name": f"c{c}"} for c in CATS]}


def _det(img_id, cat, score, dx=0):
    poly = _polygon(cat, dx)
    return {"image_id": img_id, "category_id": cat, "score": score, "bbox": _bbox(poly), "segmentation": _rle(poly)}


def perfect_dets():
    return [_det(i, c, 1.0) for i in range(4) for c in CATS]


def half_dets(with_fp=False):
    detected = {(0, 1), (1, 1), (2, 3), (3, 3)}  # half of each category, half of each image
    dets = []
    for i in range(4):
        for c in CATS:
            if (i, c) in detected:
                dets.append(_det(i, c, 0.8 if with_fp else 1.0))
            elif with_fp:
                dets.append(_det(i, c, 0.9, dx=SHIFT))
    return dets


def _write(path, obj):
    path.write_text(json.dumps(obj))
    return path


@pytest.fixture(scope="module")
def gt_file(tmp_path_factory):
    return _write(tmp_path_factory.mktemp("gt") / "instances.json", make_gt())


def _quiet(*_args, **_kwargs):
    pass


def _check_all(metrics, value):
    for task in ("bbox", "segm"):
        m = metrics[task]
        for key in ("AP", "AP50", "AP75", "APm"):
            assert m[key] == pytest.approx(value, abs=1e-9), (task, key, m)
        assert m["APs"] is None and m["APl"] is None, m


def test_perfect_detections_give_100(tmp_path, gt_file):
    res = _write(tmp_path / "res.json", perfect_dets())
    summary = evaluate_files(str(res), str(gt_file), echo=_quiet)
    assert summary["tasks"] == ["bbox", "segm"]  # auto-detected from the keys
    _check_all(summary["metrics"], 100.0)
    assert json.loads((tmp_path / "res.eval.json").read_text())["metrics"] == summary["metrics"]


@pytest.mark.parametrize("with_fp,expected", [(False, HALF), (True, HALF_WITH_FP)])
def test_half_detected_gives_known_ap(tmp_path, gt_file, with_fp, expected):
    res = _write(tmp_path / "res.json", half_dets(with_fp))
    summary = evaluate_files(str(res), str(gt_file), output=str(tmp_path / "s.json"), echo=_quiet)
    _check_all(summary["metrics"], expected)


def test_loadres_mutation_does_not_leak_between_tasks(tmp_path, gt_file):
    """Both tasks from one list, twice in a row: pycocotools mutates what it is given."""
    dets = half_dets(True)
    gt = evaluation.load_annotations(str(gt_file))
    first = evaluation.evaluate(gt, dets, ["bbox", "segm"])
    second = evaluation.evaluate(gt, dets, ["segm", "bbox"])
    assert first == second
    assert dets == half_dets(True)  # the caller's detections are untouched


def test_tasks_option_and_box_only_results(tmp_path, gt_file):
    box_only = [{k: v for k, v in d.items() if k != "segmentation"} for d in perfect_dets()]
    res = _write(tmp_path / "boxes.json", box_only)
    summary = evaluate_files(str(res), str(gt_file), echo=_quiet)
    assert summary["tasks"] == ["bbox"] and set(summary["metrics"]) == {"bbox"}
    both = _write(tmp_path / "both.json", perfect_dets())
    summary = evaluate_files(str(both), str(gt_file), tasks=["segm"], echo=_quiet)
    assert summary["tasks"] == ["segm"] and summary["metrics"]["segm"]["AP"] == pytest.approx(100.0)


def test_table_layout_and_paper_row(tmp_path, gt_file, monkeypatch):
    import d2_smallbn.paper_results as pr

    row = {"paper": "TEST", "table": "9", "row": "a test row",
           "bbox": {"AP": 40.0, "AP50": 60.0}, "segm": {"AP": 30.0}}
    monkeypatch.setitem(pr.PAPER_RESULTS, "test_config.yaml", row)
    res = _write(tmp_path / "res.json", half_dets())
    lines = []
    summary = evaluate_files(str(res), str(gt_file), config="configs/test_config.yaml", echo=lines.append)
    text = "\n".join(lines)
    assert "AP^box" in text and "AP^mask" in text
    table = {line.split("|")[0].strip(): [c.split() for c in line.split("|")[1:]] for line in text.splitlines()
             if "|" in line}
    assert table["measured"] == [["50.5", "50.5", "50.5", "-", "50.5", "-"]] * 2
    assert table["paper (TEST, Table 9)"] == [["40.0", "60.0", "-", "-", "-", "-"], ["30.0", "-", "-", "-", "-", "-"]]
    assert table["measured - paper"] == [["+10.5", "-9.5", "-", "-", "-", "-"], ["+20.5", "-", "-", "-", "-", "-"]]
    assert "paper row: a test row" in text
    assert summary["paper"] == row and summary["config"] == "configs/test_config.yaml"


def test_unknown_config_is_a_note_not_an_error(tmp_path, gt_file):
    res = _write(tmp_path / "res.json", perfect_dets())
    lines = []
    summary = evaluate_files(str(res), str(gt_file), config="no_such_config.yaml", echo=lines.append)
    assert summary["paper"] is None
    note = [line for line in lines if "no paper result" in line]
    assert note and "no_such_config.yaml" in note[0]
    assert not any(line.startswith("paper") for line in lines)


def test_config_lookup_by_bare_file_name(monkeypatch):
    import d2_smallbn.paper_results as pr

    rows = {"a/x.yaml": {"bbox": {"AP": 1.0}}, "a/y.yaml": {"bbox": {"AP": 2.0}}, "b/y.yaml": {"bbox": {"AP": 3.0}}}
    monkeypatch.setattr(pr, "PAPER_RESULTS", rows)
    assert evaluation.lookup_paper("a/x.yaml") == (rows["a/x.yaml"], None)
    assert evaluation.lookup_paper("/somewhere/configs/b/y.yaml") == (rows["b/y.yaml"], None)
    assert evaluation.lookup_paper("x.yaml")[0] is rows["a/x.yaml"]  # a unique file name
    row, note = evaluation.lookup_paper("y.yaml")
    assert row is None and "a/y.yaml" in note and "b/y.yaml" in note


@pytest.mark.slow
def test_cli_with_paper_row_from_any_directory(tmp_path, gt_file):
    from d2_smallbn.paper_results import PAPER_RESULTS, paper_result

    config = sorted(PAPER_RESULTS)[0]
    paper = paper_result(config)
    res = _write(tmp_path / "results.json", perfect_dets())
    out = tmp_path / "out" / "summary.json"
    out.parent.mkdir()
    cmd = [*COMMAND, str(res), str(gt_file), "--config", config, "--output", str(out)]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = {line.split("|")[0].strip(): line for line in proc.stdout.splitlines() if "|" in line}
    paper_rows = [label for label in rows if label.startswith("paper")]
    assert "measured" in rows and len(paper_rows) == 1
    cells = [c.split() for c in rows[paper_rows[0]].split("|")[1:]]
    assert cells == [[evaluation._fmt((paper.get(t) or {}).get(m)) for m in evaluation.METRICS]
                     for t in ("bbox", "segm")]
    summary = json.loads(out.read_text())
    assert summary["paper"] == paper and summary["config"] == config
    assert summary["results_file"] == str(res) and summary["annotation_file"] == str(gt_file)
    assert summary["metrics"]["bbox"]["AP"] == pytest.approx(100.0)


# ---- bad files: one line, file + problem + fix, exit code 2 -----------------------------------

def _bad_cases(d, gt_file):
    good = perfect_dets()
    text = json.dumps(good)
    cases = {}

    def case(name, content, fragment, *extra, target="results"):
        path = d / f"{name}.json"
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif content is not None:
            path.write_text(content if isinstance(content, str) else json.dumps(content))
        results, gt = (path, gt_file) if target == "results" else (d / "ok.json", path)
        cases[name] = ([str(results), str(gt), *extra], str(path), fragment)

    _write(d / "ok.json", good)
    case("truncated", text[: len(text) // 2], "truncated")
    case("not_json", "detections: none", "not valid JSON")
    case("binary", b"\x80\x81\x00\xff" * 8, "not UTF-8")
    case("missing_file", None, "not found")
    case("wrong_top_level", {"annotations": good, "images": []}, "JSON object")
    case("number_top_level", 3, "JSON int")
    case("missing_score", [{k: v for k, v in good[0].items() if k != "score"}] + good[1:], "has no 'score'")
    case("missing_image_id", good[:3] + [{k: v for k, v in good[3].items() if k != "image_id"}], "has no 'image_id'")
    case("no_box_no_mask", [{k: good[0][k] for k in ("image_id", "category_id", "score")}] + good[1:],
         "neither 'bbox' nor 'segmentation'")
    case("task_key_missing", [{k: v for k, v in g.items() if k != "segmentation"} for g in good],
         "has no 'segmentation'", "--tasks", "segm")
    case("unknown_image", good + [dict(good[0], image_id=99)], "image ids that are not in the annotation file")
    case("list_image_id", [dict(good[0], image_id=[0])] + good[1:], "image ids that are not in the annotation file")
    case("unknown_category", [dict(g, category_id=0) for g in good], "category ids that are not in the annotation file")
    case("bbox_length", [dict(good[0], bbox=[1.0, 2.0, 3.0])] + good[1:], "not 4 finite numbers")
    case("bbox_negative", [dict(good[0], bbox=[50.0, 50.0, -20.0, 10.0])] + good[1:], "negative width or height")
    case("mask_size", [dict(good[0], segmentation=dict(good[0]["segmentation"], size=[10, 10]))] + good[1:],
         "mask of size")
    case("polygon_result", [dict(good[0], segmentation=[_polygon(1)])] + good[1:], "not an RLE")
    case("gt_truncated", json.dumps(make_gt())[:200], "annotation file ends in the middle", target="gt")
    case("gt_is_list", [make_gt()], "annotation file holds a JSON list", target="gt")
    return cases


class _Run:
    def __init__(self, returncode, stdout, stderr):
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory, gt_file):
    """All bad-file runs, through the CLI's main() in this process (one case also as a real
    subprocess below)."""
    d = tmp_path_factory.mktemp("bad")
    runs = {}
    for name, (args, path, fragment) in _bad_cases(d, gt_file).items():
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = evaluation.main([*args, "--output", str(d / f"{name}.summary.json")])
        runs[name] = (_Run(code, out.getvalue(), err.getvalue()), path, fragment)
    return runs


@pytest.mark.slow
def test_bad_file_from_the_command_line(tmp_path, gt_file):
    bad = tmp_path / "truncated.json"
    bad.write_text(json.dumps(perfect_dets())[:50])
    proc = subprocess.run([*COMMAND, str(bad), str(gt_file)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith(f"error: {bad}: ") and ". Fix: " in proc.stderr


BAD_CASES = ["truncated", "not_json", "binary", "missing_file", "wrong_top_level", "number_top_level",
             "missing_score", "missing_image_id", "no_box_no_mask", "task_key_missing", "unknown_image",
             "list_image_id",
             "unknown_category", "bbox_length", "bbox_negative", "mask_size", "polygon_result", "gt_truncated",
             "gt_is_list"]


@pytest.mark.parametrize("name", BAD_CASES)
def test_bad_file_gives_one_line_error_and_exit_2(bad_runs, name):
    proc, path, fragment = bad_runs[name]
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[0].startswith(f"error: {path}: "), lines[0]
    assert fragment in lines[0] and ". Fix: " in lines[0], lines[0]
    assert proc.stdout == ""  # nothing evaluated, no half-printed table


def test_bad_cases_are_all_listed(tmp_path, gt_file):
    assert set(_bad_cases(tmp_path, gt_file)) == set(BAD_CASES)


def test_api_raises_eval_file_error(tmp_path, gt_file):
    res = _write(tmp_path / "res.json", [dict(d, category_id=2) for d in perfect_dets()])
    with pytest.raises(EvalFileError) as info:
        evaluate_files(str(res), str(gt_file), echo=_quiet)
    assert info.value.path == str(res) and "2" in info.value.problem and "1..3" in info.value.problem


def test_truncated_annotation_file_is_not_blamed_on_inference(bad_runs):
    proc, path, _ = bad_runs["gt_truncated"]
    fix = proc.stderr.split(". Fix: ", 1)[1]
    assert "annotation file" in fix and "inference" not in fix, fix
    results_fix = bad_runs["truncated"][0].stderr.split(". Fix: ", 1)[1]
    assert "inference" in results_fix  # a truncated results file does come from inference


def test_empty_results_give_nan_with_a_warning_as_detectron2_does(tmp_path, gt_file, capsys):
    """detectron2's COCOEvaluator logs "No predictions from the model!" and reports every AP as nan."""
    res = _write(tmp_path / "empty.json", [])
    assert evaluation.main([str(res), str(gt_file)]) == 0
    captured = capsys.readouterr()
    assert captured.err.startswith(f"warning: {res}: no detections") and "nan" in captured.err
    table = [line for line in captured.out.splitlines() if line.startswith("measured")]
    assert len(table) == 1 and table[0].split("|")[1].split() == ["nan"] * 6 and table[0].count("nan") == 12
    summary = json.loads((tmp_path / "empty.eval.json").read_text())
    assert summary["num_detections"] == 0 and summary["tasks"] == ["bbox", "segm"]
    assert summary["metrics"] == {t: {m: None for m in evaluation.METRICS} for t in ("bbox", "segm")}
    assert len(summary["warnings"]) == 1 and "no detections" in summary["warnings"][0]
    api = evaluate_files(str(res), str(gt_file), tasks=["bbox"], output=str(tmp_path / "api.json"), echo=_quiet)
    assert list(api["metrics"]) == ["bbox"] and all(math.isnan(v) for v in api["metrics"]["bbox"].values())
    capsys.readouterr()


@pytest.mark.parametrize("clobbered", ["results", "annotations", "folder holding the results"])
def test_output_that_is_or_holds_an_input_is_refused_before_anything_is_written(tmp_path, gt_file, capsys,
                                                                               clobbered):
    """`d2-smallbn-eval RES ANN --output RES` (or ANN) used to overwrite that input with the summary, exit 0."""
    res = _write(tmp_path / "res.json", perfect_dets())
    ann = _write(tmp_path / "instances.json", json.loads(gt_file.read_text()))
    output = {"results": res, "annotations": ann, "folder holding the results": tmp_path}[clobbered]
    before = {p: p.read_bytes() for p in (res, ann)}
    code = evaluation.main([str(res), str(ann), "--output", str(output)])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == "", captured.out + captured.err  # nothing evaluated
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {output}: the --output ") and ". Fix: " in lines[0], lines
    role = "annotation file" if clobbered == "annotations" else "results file"
    assert role in lines[0], lines[0]
    assert {p: p.read_bytes() for p in (res, ann)} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["instances.json", "res.json"]
