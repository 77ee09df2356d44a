"""The rule every command follows (d2_smallbn.paths): an output path may not be an input, hold one, or
lie inside an input folder, and two outputs may not be one file; paths are compared after resolving
relative paths, ``..`` and symbolic links. d2-smallbn-train: a hand-written config at
OUTPUT_DIR/config.yaml is not replaced by the run's dump of its merged config.

The commands' own refusals are tested with each command (test_coco_eval, test_convert_weights,
test_demo, tests/data/test_dataset)."""
import os

import pytest

from d2_smallbn.paths import OutputPathError, check_output_paths


@pytest.fixture
def files(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes(b"image")
    os.symlink(tmp_path / "photos", tmp_path / "link")
    return tmp_path


@pytest.mark.parametrize("output, relation", [
    ("photos", "is the --input folder"),
    ("./photos/../photos", "is the --input folder"),
    ("link", "is the --input folder"),
    (".", "is a folder holding the --input folder"),
    ("photos/drawn", "lies inside the --input folder"),
    ("link/drawn", "lies inside the --input folder"),
])
def test_an_output_that_is_holds_or_lies_inside_an_input_is_refused(files, output, relation):
    with pytest.raises(OutputPathError) as info:
        check_output_paths([("--output", output)], [("--input folder", "photos")])
    message = str(info.value)
    assert message.startswith(f"{output}: the --output {relation} photos") and ". Fix: " in message, message
    assert "\n" not in message


def test_outputs_apart_from_the_inputs_and_from_each_other_pass(files):
    check_output_paths([("--output", "drawn"), ("--report", "drawn.json"), ("unused", None)],
                       [("--input folder", "photos"), ("--input image", "photos/a.png"), ("--weights", None)])
    check_output_paths([("--output", "photos-drawn")], [("--input folder", "photos")])  # a shared prefix only


def test_two_outputs_that_are_one_file_are_refused_with_the_callers_error(files):
    class CommandError(Exception):
        def __init__(self, path, problem, fix):
            super().__init__(f"{path}: {problem}. Fix: {fix}")

    with pytest.raises(CommandError, match=r"^\./out.pkl: the --report is the output out.pkl: one would replace the "
                                           r"other. Fix: pass different paths"):
        check_output_paths([("output", "out.pkl"), ("--report", "./out.pkl")], [("input checkpoint", "in.pth")],
                           error=CommandError)


def test_train_keeps_a_hand_written_config_in_output_dir(tmp_path, capsys):
    """Every run writes its merged config to OUTPUT_DIR/config.yaml: a user's config of that name there was
    replaced by the dump (its _BASE_ and comments lost). A run's own dump may still be read and rewritten
    (--eval-only on a run's config.yaml, docs/configs.md)."""
    from d2_smallbn import model_zoo
    from d2_smallbn.engine.defaults import build_config
    from d2_smallbn.train_net import main as train_main

    out = tmp_path / "out"
    out.mkdir()
    mine = out / "config.yaml"
    text = (f'_BASE_: "{model_zoo.get_config_file("quickstart/mask_rcnn_R18_FPN_gn.yaml")}"\n'
            "# my experiment\nSOLVER:\n  MAX_ITER: 1\n")
    mine.write_text(text)
    code = train_main(["--config-file", str(mine), "OUTPUT_DIR", str(out), "DATASETS.TRAIN", "()",
                       "DATASETS.TEST", "()"])
    err = capsys.readouterr().err
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {mine}: ") and ". Fix: " in lines[0], lines
    assert "OUTPUT_DIR" in lines[0].split(". Fix: ")[1]
    assert mine.read_text() == text and sorted(os.listdir(out)) == ["config.yaml"]

    from d2_smallbn.train_net import check_config_kept

    mine.write_text(build_config(str(mine), ["OUTPUT_DIR", str(out)]).dump())  # what a run writes
    check_config_kept(str(mine), ["MODEL.WEIGHTS", str(out / "model_final.pth")])  # its dump: allowed
