"""d2_smallbn.model_zoo as a user without a GPU meets it, and a user's YAML config naming a model-zoo
config as its ``_BASE_``."""
import pytest
import torch

import d2_smallbn  # noqa: F401  (registration)
from d2_smallbn import model_zoo
from d2_smallbn.engine.defaults import build_config

ZOO_NAME = "quickstart/mask_rcnn_R18_FPN_gn.yaml"


def test_get_of_a_lazy_config_falls_back_to_cpu_without_cuda(monkeypatch):
    """The LazyConfigs say train.device="cuda"; get() moved the model there and failed with "Found no
    NVIDIA driver". detectron2's model_zoo.get falls back to CPU, and so must ours."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    model = model_zoo.get("lazy/mask_rcnn_R50_FPN_cbn.py")
    assert {p.device.type for p in model.parameters()} == {"cpu"}
    assert {b.device.type for b in model.buffers()} == {"cpu"}


def _user_config(tmp_path, base):
    path = tmp_path / "my_config.yaml"
    path.write_text(f'_BASE_: "{base}"\nSOLVER:\n  MAX_ITER: 10\n')
    return path


def test_base_naming_a_model_zoo_config_says_base_takes_a_path_and_gives_it(tmp_path):
    """A bare FileNotFoundError for <folder of the file>/quickstart/... used to be all the user got."""
    path = _user_config(tmp_path, ZOO_NAME)
    with pytest.raises(FileNotFoundError) as info:
        build_config(str(path))
    message = str(info.value)
    assert "\n" not in message and str(path) in message and "_BASE_ takes a path" in message, message
    assert f'_BASE_: "{model_zoo.get_config_file(ZOO_NAME)}"' in message, message


def test_the_zoo_path_the_message_gives_works(tmp_path):
    path = _user_config(tmp_path, model_zoo.get_config_file(ZOO_NAME))
    assert build_config(str(path)).SOLVER.MAX_ITER == 10


def test_a_missing_base_that_is_no_zoo_name_names_the_file_and_where_it_was_looked_for(tmp_path):
    (tmp_path / "configs").mkdir()
    middle = tmp_path / "configs" / "middle.yaml"
    middle.write_text('_BASE_: "../bases/missing.yaml"\n')
    path = _user_config(tmp_path, "configs/middle.yaml")
    with pytest.raises(FileNotFoundError) as info:
        build_config(str(path))
    message = str(info.value)
    assert "\n" not in message and f"{middle}: _BASE_ " in message, message
    assert str(tmp_path / "bases" / "missing.yaml") in message and "relative to" in message, message
    assert "model-zoo" not in message, message
