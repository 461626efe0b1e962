"""The training stages' results as MLflow models: the segmenter and the CAM network as PyTorch-flavour models
(loadable with ``mlflow.pytorch.load_model``), the IRN's final weights as an artifact (``tracking.log_models``)."""
from __future__ import annotations

import logging
from pathlib import Path

import models
from flows.config import PipelineConfig
from models.exported import ImageClassifier, SegmentationPredictor
from storage import checkpoints, fs
from storage.tracking import Tracker
from storage.transforms import IMAGENET_MEAN, IMAGENET_STD
from tasks.eval_seg import load_segmenter
from tasks.infer_cams import load_cam_network

log = logging.getLogger(__name__)

MODEL_NAME = "model"  # the logged model's name in its stage run


def log_trained_model(stage: str, cfg: PipelineConfig, manifest: dict, tracker: Tracker) -> str | None:
    """Log the final weights of training stage ``stage`` to its run; returns the MLflow model URI (None for IRN,
    whose weights are logged as ``model/<file>``)."""
    checkpoint = manifest["checkpoint"]
    if stage == "train_irn":
        tracker.log_bytes(fs.read_bytes(checkpoint), f"model/{checkpoint.rsplit('/', 1)[-1]}")
        return None
    class_names = tuple(checkpoints.load(checkpoint)["meta"]["class_names"])  # background included
    mean, std = IMAGENET_MEAN.tolist(), IMAGENET_STD.tolist()
    if stage == "train_seg":
        model = SegmentationPredictor(load_segmenter(checkpoint, class_names), class_names, mean, std)
        output_shape, registered = (-1, len(class_names), -1, -1), cfg.tracking.register_as
    else:
        network, _ = load_cam_network(checkpoint, class_names)
        model = ImageClassifier(network, class_names[1:], mean, std)
        output_shape = (-1, len(class_names) - 1)
        registered = f"{cfg.tracking.register_as}-cam" if cfg.tracking.register_as else None
    metadata = {"stage": stage, "class_names": list(model.class_names), "checkpoint": checkpoint,
                "config_digest": cfg.digest(), "input": "RGB float32 (N, 3, H, W) in [0, 255]"}
    uri = tracker.log_pytorch_model(model, MODEL_NAME, (-1, 3, -1, -1), output_shape,
                                    {"config.yaml": cfg.to_yaml()}, metadata, str(Path(models.__file__).parent),
                                    registered)
    log.info("stage %s: logged MLflow model %s%s", stage, uri, f" (registered as {registered})" if registered else "")
    return uri
