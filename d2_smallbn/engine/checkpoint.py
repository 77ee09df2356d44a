"""A checkpoint that cannot be read, explained: which file, why it is probably damaged, and which
earlier checkpoints of the run could be used instead."""
import contextlib
import os
import re

from ..weights.reading import first_line
from .weights_check import WeightsMismatchError


class CheckpointError(RuntimeError):
    """A checkpoint file cannot be read; the message names the file, the earlier ones and the fix."""


@contextlib.contextmanager
def explain_unreadable_checkpoint(checkpointer, weights, resume):
    """Around ``checkpointer.resume_or_load(weights, resume=resume)``: if loading fails because the
    file cannot be read at all (a truncated save of a killed run, a partial copy), raises
    ``CheckpointError`` naming it and, when resuming, the run's earlier ``model_*.pth``. Any other
    error passes through unchanged."""
    try:
        yield
    except WeightsMismatchError:
        raise  # the file was read: it does not fit the model
    except Exception as err:
        resuming = resume and checkpointer.has_checkpoint()
        path = checkpointer.get_checkpoint_file() if resuming else weights
        if not path or not os.path.isfile(path):
            raise
        try:
            checkpointer._load_file(path)  # the checkpointer's own reader (fvcore's override point)
        except Exception as read_err:
            unreadable = f"{type(read_err).__name__}: {first_line(read_err)}"
        else:
            raise  # the file reads: the failure is elsewhere
        if not resuming:
            raise CheckpointError(f"{path}: MODEL.WEIGHTS cannot be read ({unreadable}); the file is probably "
                                  "truncated or not a checkpoint. Fix: copy or download it again, or point "
                                  "MODEL.WEIGHTS at another file") from err
        folder = os.path.dirname(os.path.abspath(path))
        earlier = sorted((f for f in os.listdir(folder) if re.fullmatch(r"model_\d+\.pth", f)
                          and os.path.join(folder, f) != os.path.abspath(path)), reverse=True)
        marker = os.path.join(folder, "last_checkpoint")
        if earlier:
            fix = (f"resume from the newest earlier checkpoint: write its name into {marker} (e.g. `echo {earlier[0]} "
                   f"> {marker}`) and run with --resume again; earlier checkpoints here: {', '.join(earlier[:5])}"
                   + (", ..." if len(earlier) > 5 else ""))
        else:
            fix = (f"there is no earlier model_*.pth in {folder}: remove {marker} to start again from MODEL.WEIGHTS, "
                   "or train without --resume")
        raise CheckpointError(f"{path}: the last checkpoint of the run (named in {marker}) cannot be read "
                              f"({unreadable}); it is probably truncated (was the run killed while saving it?). "
                              f"Fix: {fix}") from err
