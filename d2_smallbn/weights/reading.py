"""Reading a checkpoint file: the state dict inside it, DataParallel's ``module.`` prefixes removed."""
import os
import pickle

import torch

_STATE_DICT_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "net", "network")


class ConvertError(Exception):
    """A checkpoint or output that cannot be used; ``str()`` is one line: file, problem, fix."""

    def __init__(self, path, problem, fix):
        self.path, self.problem, self.fix = str(path), problem, fix
        super().__init__(f"{self.path}: {problem}. Fix: {fix}")


def first_line(error):
    """The first line of an exception's message (at most 200 characters), or its class name."""
    text = str(error).strip().splitlines()
    return text[0][:200] if text else type(error).__name__


def load_checkpoint(path, trust_pickle=False):
    """The state dict (name -> tensor) of a torch checkpoint file. The file is read with
    ``torch.load(weights_only=True)``; ``trust_pickle`` allows arbitrary pickled objects (only
    for files you trust: unpickling can run code)."""
    if not os.path.isfile(path):
        raise ConvertError(path, "checkpoint not found" if not os.path.exists(path) else "checkpoint is not a file",
                           "check the path")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as e:
        if trust_pickle:
            raise ConvertError(path, f"checkpoint cannot be unpickled ({first_line(e)})",
                               "pass a file written by torch.save") from None
        raise ConvertError(path, f"checkpoint holds objects other than tensors and containers ({first_line(e)})",
                           "re-run with --trust-pickle if you trust the file (unpickling can run code)") from None
    except Exception as e:  # torch raises RuntimeError / EOFError / ValueError for damaged files
        raise ConvertError(path, f"checkpoint cannot be read by torch.load ({type(e).__name__}: {first_line(e)})",
                           "pass a complete checkpoint written by torch.save (a truncated download?)") from None
    state = find_state_dict(obj)
    if state is None:
        top = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
        raise ConvertError(path, f"no state dict of tensors found (top level: {top})",
                           "pass a checkpoint holding a model's state_dict (directly or under 'state_dict' / "
                           "'model')")
    return state


def find_state_dict(obj, depth=0):
    """The name -> tensor mapping inside a loaded checkpoint: the object itself, or one found under
    state_dict / model / model_state / net (nested at most 3 deep). None if there is none."""
    if not isinstance(obj, dict) or depth > 3:
        return None
    if obj and sum(torch.is_tensor(v) for v in obj.values()) * 2 > len(obj):
        return dict(obj)
    for key in _STATE_DICT_KEYS:
        found = find_state_dict(obj.get(key), depth + 1)
        if found is not None:
            return found
    return None


def strip_module_prefix(state):
    """Removes DataParallel's leading ``module.`` (repeated) from every key. Returns (state, count)."""
    out, stripped = {}, 0
    for key, value in state.items():
        new = key
        while new.startswith("module."):
            new = new[len("module."):]
        stripped += new != key
        if new in out:
            raise ValueError(f"keys {key!r} and another one both become {new!r} without 'module.'")
        out[new] = value
    return out, stripped
