"""Predict on your own images and draw the predictions with detectron2's Visualizer.

    d2-smallbn-demo --config-file mask_rcnn_R50_FPN_cbn.yaml --weights model_final.pth --input a.jpg photos/
    d2-smallbn-demo --config-file lazy/mask_rcnn_R50_FPN_cbn.py --weights model_final.pth --input photos/ \\
        --output out/ --confidence-threshold 0.3 --opts train.device=cpu

Also ``python -m d2_smallbn.demo``. The config is a path or a model-zoo name (``.yaml`` or ``.py``),
``--weights`` a checkpoint of that model (e.g. OUTPUT_DIR/model_final.pth of ``d2-smallbn-train``;
default: the config's MODEL.WEIGHTS / train.init_checkpoint). Inputs are image files and folders
(their .jpg/.jpeg/.png/.bmp/.webp files, not recursive). For each image it writes OUTPUT/<name>.png:
the image with the predictions scoring at least the threshold (boxes, class names, scores, masks),
and OUTPUT/predictions.json with those predictions per image (boxes XYXY in pixels of the input).
Class names come from the config's first test dataset when it is registered. An image that cannot
be read is named and skipped, and the exit code is then 1; a bad config, weights or input is 2, and
so is an ``--output`` that is, holds or lies inside an input (images, folders, config, weights):
the demo refuses it before anything is written.
"""
import argparse
import json
import logging
import os
import sys

from .paths import check_output_paths

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
logger = logging.getLogger("d2_smallbn.demo")


class DemoError(Exception):
    """A bad command line: the message names the problem and the fix."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-file", required=True, help="config path or model-zoo name (.yaml or .py)")
    p.add_argument("--weights", default=None, help="checkpoint to load (default: the config's weights)")
    p.add_argument("--input", nargs="+", required=True, help="image files and/or folders of images")
    p.add_argument("--output", default="output/demo", help="output folder (default: output/demo)")
    p.add_argument("--confidence-threshold", type=float, default=0.5,
                   help="lowest score drawn and listed (default: 0.5)")
    p.add_argument("--opts", nargs=argparse.REMAINDER, default=[],
                   help="config overrides: KEY VALUE pairs for .yaml, key=value for .py")
    return p.parse_args(argv)


def image_paths(inputs):
    """The images named by ``inputs`` (files, and the image files of folders), in order."""
    paths = []
    for item in inputs:
        if os.path.isdir(item):
            found = sorted(os.path.join(item, f) for f in os.listdir(item) if f.lower().endswith(IMAGE_EXTENSIONS))
            if not found:
                raise DemoError(f"--input folder {item} has no image files ({', '.join(IMAGE_EXTENSIONS)})")
            paths += found
        elif os.path.isfile(item):
            paths.append(item)
        else:
            raise DemoError(f"--input {item} is neither an image file nor a folder")
    return paths


def input_roles(args):
    """``(role, path)`` of every file or folder the demo reads: images, folders, config, weights."""
    roles = [("--input folder" if os.path.isdir(item) else "--input image", item) for item in args.input]
    roles.append(("--config-file", args.config_file if os.path.exists(args.config_file) else None))
    roles.append(("--weights", args.weights if args.weights and "://" not in args.weights else None))
    return roles


class Predictor:
    """A converted model in eval mode with its weights, the config's test-time resize and input format,
    and the class names; ``predictor(bgr)`` gives detectron2 ``Instances`` in input pixels."""

    def __init__(self, config_file, weights=None, threshold=0.5, opts=()):
        if not 0.0 <= threshold <= 1.0:
            raise DemoError(f"--confidence-threshold must be in [0, 1], got {threshold}")
        from detectron2.checkpoint import DetectionCheckpointer

        lazy = config_file.endswith(".py")
        build = self._from_lazy_config if lazy else self._from_yaml_config
        self.model, self.resize, self.input_format, dataset, config_weights = build(config_file, threshold, opts)
        weights = config_weights if weights is None else weights
        key = "train.init_checkpoint" if lazy else "MODEL.WEIGHTS"
        if not weights:
            raise DemoError(f"no weights: neither --weights nor the config's {key} names a checkpoint. Pass "
                            "--weights PATH, e.g. OUTPUT_DIR/model_final.pth written by d2-smallbn-train")
        if "://" not in weights and not os.path.isfile(weights):
            raise DemoError(f"weights {weights} do not exist: pass --weights with an existing checkpoint")
        DetectionCheckpointer(self.model).load(weights)
        self.model.eval()
        self.metadata = self._metadata(dataset)

    @staticmethod
    def _from_yaml_config(config_file, threshold, opts):
        from detectron2.data import transforms as T
        from detectron2.modeling import build_model  # converts once (the plugin's patch)

        from .engine.defaults import build_config

        cfg = build_config(config_file, list(opts) + ["MODEL.ROI_HEADS.SCORE_THRESH_TEST", str(threshold),
                                                      "MODEL.RETINANET.SCORE_THRESH_TEST", str(threshold)])
        resize = T.ResizeShortestEdge([cfg.INPUT.MIN_SIZE_TEST] * 2, cfg.INPUT.MAX_SIZE_TEST)
        dataset = cfg.DATASETS.TEST[0] if cfg.DATASETS.TEST else None
        return build_model(cfg), [resize], cfg.INPUT.FORMAT, dataset, cfg.MODEL.WEIGHTS

    @staticmethod
    def _from_lazy_config(config_file, threshold, opts):
        from detectron2.config import instantiate

        from .engine.lazy import build_model, load_config

        cfg = load_config(config_file, opts)
        cfg.model.roi_heads.box_predictor.test_score_thresh = threshold
        test = cfg.dataloader.get("test", {})
        augmentations = instantiate(test.mapper.augmentations) if "mapper" in test else []
        names = test.get("dataset", {}).get("names")
        dataset = names if isinstance(names, str) else (names[0] if names else None)
        return build_model(cfg), augmentations, cfg.model.input_format, dataset, cfg.train.init_checkpoint

    @staticmethod
    def _metadata(dataset):
        from detectron2.data import DatasetCatalog, MetadataCatalog

        if dataset and dataset in DatasetCatalog.list():
            return MetadataCatalog.get(dataset)
        return MetadataCatalog.get("__d2_smallbn_demo_unnamed")  # class indices instead of names

    def __call__(self, bgr):
        import torch
        from detectron2.data import transforms as T

        image = bgr[:, :, ::-1] if self.input_format == "RGB" else bgr
        image = T.AugmentationList(self.resize)(T.AugInput(image)).apply_image(image) if self.resize else image
        tensor = torch.as_tensor(image.astype("float32").transpose(2, 0, 1))
        with torch.no_grad():
            out = self.model([{"image": tensor, "height": bgr.shape[0], "width": bgr.shape[1]}])[0]
        return out["instances"].to("cpu")


def read_bgr(path):
    """The image at ``path`` as an HxWx3 uint8 BGR array (EXIF orientation applied), or a DemoError."""
    from detectron2.data.detection_utils import read_image

    try:
        return read_image(path, format="BGR")
    except Exception as e:  # PIL raises several types for a damaged or non-image file
        raise DemoError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def draw(bgr, instances, metadata):
    from detectron2.utils.visualizer import Visualizer

    return Visualizer(bgr[:, :, ::-1], metadata).draw_instance_predictions(instances).get_image()[:, :, ::-1]


def listed(instances, metadata):
    """The JSON form of one image's predictions."""
    names = metadata.get("thing_classes", None)
    return [{"box_xyxy": [round(float(v), 2) for v in box], "score": round(float(score), 4), "class": int(c),
             "class_name": names[int(c)] if names else str(int(c))}
            for box, score, c in zip(instances.pred_boxes.tensor.tolist(), instances.scores.tolist(),
                                     instances.pred_classes.tolist())]


def output_names(paths):
    """One output file name per input, unique even where two inputs share a file name."""
    names, used = [], set()
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        name, n = f"{stem}.png", 1
        while name in used:
            name, n = f"{stem}_{n}.png", n + 1
        used.add(name)
        names.append(name)
    return names


def run(args):
    """Predicts and draws every input; returns ({input: predictions}, [unreadable inputs' messages])."""
    import cv2

    paths = image_paths(args.input)
    check_output_paths([("--output", args.output)], input_roles(args))
    predictor = Predictor(args.config_file, args.weights, args.confidence_threshold, args.opts)
    os.makedirs(args.output, exist_ok=True)
    predictions, failures = {}, []
    for path, name in zip(paths, output_names(paths)):
        try:
            bgr = read_bgr(path)
        except DemoError as e:
            failures.append(str(e))
            logger.error("%s (skipped)", e)
            continue
        instances = predictor(bgr)
        out = os.path.join(args.output, name)
        cv2.imwrite(out, draw(bgr, instances, predictor.metadata))
        predictions[path] = {"output": out, "height": bgr.shape[0], "width": bgr.shape[1],
                             "instances": listed(instances, predictor.metadata)}
        logger.info("%s: %d predictions -> %s", path, len(instances), out)
    with open(os.path.join(args.output, "predictions.json"), "w") as f:
        json.dump({"config_file": args.config_file, "confidence_threshold": args.confidence_threshold,
                   "images": predictions, "unreadable": failures}, f, indent=2)
    return predictions, failures


def main(argv=None):
    from detectron2.utils.logger import setup_logger

    args = parse_args(argv)
    setup_logger(name="d2_smallbn")
    setup_logger(name="detectron2")
    try:
        predictions, failures = run(args)
    except (DemoError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{len(predictions)} images drawn into {args.output} (predictions.json lists the predictions)"
          + (f"; {len(failures)} unreadable, skipped:\n  " + "\n  ".join(failures) if failures else ""))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
