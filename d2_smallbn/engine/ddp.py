"""DDP for this project's trainers. detectron2 0.7's ``create_ddp_model`` always passes
``device_ids=[local_rank]``, which torch rejects for a CPU model (gloo), so ``DefaultTrainer``
cannot start two CPU processes. The fix stays inside this project: ``create_ddp_model`` here
drops ``device_ids`` for CPU models, and ``cpu_safe_ddp()`` uses it for detectron2's
``DefaultTrainer.__init__`` only while one of our trainers is being constructed (detectron2
itself is left as it is)."""
import contextlib

import detectron2.engine.defaults as d2_defaults


def create_ddp_model(model, *, fp16_compression=False, **kwargs):
    """detectron2's ``create_ddp_model``, without ``device_ids`` for a CPU model."""
    first = next(model.parameters(), None)
    if "device_ids" not in kwargs and first is not None and first.device.type == "cpu":
        kwargs["device_ids"] = None
    return _original(model, fp16_compression=fp16_compression, **kwargs)


_original = d2_defaults.create_ddp_model


@contextlib.contextmanager
def cpu_safe_ddp():
    d2_defaults.create_ddp_model = create_ddp_model
    try:
        yield
    finally:
        d2_defaults.create_ddp_model = _original
