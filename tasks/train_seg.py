"""Train a DeepLab segmenter on the pseudo labels (deeplab-pytorch's VOC recipe, docs/method.md section 9),
validating against ground truth, resumable from checkpoints."""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Literal

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.backbone import BACKBONES, NORMS
from models.deeplab import ARCHS, MSC_SCALES, V2_RATES, DeepLab, msc_cross_entropy, msc_outputs
from models.metrics import ConfusionMatrix
from models.optim import poly_schedule
from storage import checkpoints, fs
from storage.datasets.cam_training import repeat_factors
from storage.datasets.segmentation import SegTrainingSet, check_label_maps, pseudo_label_urls
from storage.datasets.split_files import load_split_file, load_split_with_masks
from storage.datasets.voc_layout import Split
from storage.errors import DataError
from storage.reports import class_metrics, format_table
from storage.tracking import Tracker
from storage.transforms import SCALE_INTERPOLATIONS, SEG_SCALES, SegScaling
from tasks.engine import training
from tasks.engine.distributed import seeded_model, sync_grads
from tasks.engine.loop_settings import LOOP_SETTINGS
from tasks.engine.resume import LOSS_WINDOW, finished_manifest, loss_summary
from tasks.engine.seg_prediction import SegPrediction, predict_probs, read_target
from tasks.engine.training import Checkpointer, EvalHook, Solver, StepLogger, StepResult, Trainer
from tasks.runtime.context import RunContext
from tasks.runtime.device import amp_enabled
from tasks.runtime.hashing import config_hash
from tasks.runtime.manifests import Inputs
from tasks.runtime.settings import Scales
from tasks.runtime.weights import (
    CAM_WEIGHTS,
    WEIGHTS_FORMATS,
    load_segmenter_weights,
    resolve_cam_weights,
    unresolved_cam_weights,
)

log = logging.getLogger(__name__)

MANIFEST = "train_seg.json"
FINAL = "final.pt"


class TrainSegConfig(BaseModel):
    """Segmentation training; defaults are deeplab-pytorch's DeepLabV2-ResNet-101-MSC on VOC."""

    model_config = ConfigDict(extra="forbid")
    arch: Literal[ARCHS] = Field(  # type: ignore[valid-type]
        "deeplabv2", description="deeplabv2: deeplab-pytorch's ASPP of summed dilated convolutions; deeplabv3: "
        "torchvision's DeepLab-v3 head")
    backbone: Literal[BACKBONES] = Field("resnet101", description=LOOP_SETTINGS["backbone"])  # type: ignore[valid-type]
    weights: str | None = Field(
        None, description="initialisation (path or fsspec URL): a file in weights_format, or 'cam': the backbone "
                          "of this run's CAM network (runs without ImageNet weights, such as the demo)")
    weights_format: Literal[WEIGHTS_FORMATS] = Field(  # type: ignore[valid-type]
        "torchvision", description="torchvision: a torchvision ResNet state dict (or a CAM checkpoint); "
        "deeplab-pytorch: a deeplab-pytorch DeepLabV2 checkpoint such as its COCO-pretrained initialisation "
        "deeplabv1_resnet101-coco.pth, read with its caffe ResNet (stride on the 1x1 convolutions, BGR 0..255 "
        "input); its ASPP is used only if it fits the classes (docs/reproduce.md)")
    norm: Literal[NORMS] = Field(  # type: ignore[valid-type]
        "frozen", description="frozen: backbone BN with running statistics, not trained (deeplab); batch: trained")
    output_stride: Literal[8, 16] = Field(8, description="8: layer3/layer4 dilated 2/4 (DeepLab); 16: layer4 only")
    aspp_rates: tuple[int, ...] = Field(
        V2_RATES, min_length=1, description="deeplabv2: dilation rates of the ASPP branches (deeplab-pytorch: 6, "
        "12, 18, 24 for 321-pixel crops, whose output-stride-8 maps are 41 wide)")
    msc_scales: tuple[float, ...] = Field(
        MSC_SCALES, description="MSC training: extra input scales whose logits (and their max) are also supervised")
    crop: int = Field(321, ge=16, description=LOOP_SETTINGS["crop"] + " (padded with ignore where the image is "
                                                                     "smaller)")
    scales: Scales = Field(
        SEG_SCALES, description="scale augmentation: one factor per crop, drawn uniformly from this set (deeplab)")
    scale_range: tuple[float, float] | None = Field(
        None, description="when set, the factor is drawn from U(low, high) instead of from scales (deviation)")
    scale_interpolation: Literal[SCALE_INTERPOLATIONS] = Field(  # type: ignore[valid-type]
        "linear", description="image resize of the scale augmentation: linear = OpenCV INTER_LINEAR as deeplab "
                              "(no antialiasing); pil_bilinear = PIL's antialiased bilinear (deviation)")
    loss_at_input_size: bool = Field(
        False, description="false: labels shrunk to the logits' size (deeplab); true: logits upsampled to the "
        "crop's size (finer boundaries on small images; deviation)")
    repeat_threshold: float | None = Field(
        None, gt=0, le=1, description="repeat-factor sampling on the image-level labels: images with classes "
        "rarer than this fraction of the images come more often (null: every image once per epoch, as deeplab)")
    batch_size: int = Field(5, ge=1, description="images per forward and process (global batch: x processes)")
    iter_size: int = Field(2, ge=1, description="forwards accumulated per optimiser step")
    max_steps: int = Field(20000, ge=1, description="optimiser steps")
    lr: float = Field(2.5e-4, gt=0, description=LOOP_SETTINGS["lr"] + " of the backbone")
    head_lr_mult: float = Field(10.0, gt=0, description="head weights' lr multiplier")
    head_bias_lr_mult: float = Field(20.0, gt=0, description="head biases' lr multiplier (no weight decay)")
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum")
    weight_decay: float = Field(5e-4, ge=0, description=LOOP_SETTINGS["weight_decay"])
    poly_power: float = Field(0.9, ge=0, description=LOOP_SETTINGS["poly_power"])
    num_workers: int = Field(2, ge=0, description=LOOP_SETTINGS["num_workers"])
    checkpoint_every: int = Field(1000, ge=1, description=LOOP_SETTINGS["checkpoint_every"])
    keep_checkpoints: int = Field(2, ge=1, description=LOOP_SETTINGS["keep_checkpoints"])
    log_every: int = Field(10, ge=1, description=LOOP_SETTINGS["log_every"])
    val_every: int = Field(0, ge=0, description="single-scale val mIoU every N steps; 0: at the end only")
    val_size: int = Field(513, ge=16, description="padded input side of the validation (as eval_seg.test_size)")
    val_max_images: int | None = Field(None, ge=1, description="limit the images of the validation")
    amp: bool = Field(False, description="mixed precision (CUDA only)")
    channels_last: bool = Field(False, description=LOOP_SETTINGS["channels_last"])

    @field_validator("msc_scales")
    @classmethod
    def _msc_scales(cls, scales: tuple[float, ...]) -> tuple[float, ...]:
        if any(not 0 < s < 1 for s in scales):
            raise ValueError(f"msc_scales must lie in (0, 1), got {list(scales)}")
        return scales

    @model_validator(mode="after")
    def _scale_range(self) -> TrainSegConfig:
        if self.scale_range is not None and not 0 < self.scale_range[0] <= self.scale_range[1]:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {list(self.scale_range)}")
        return self

    @model_validator(mode="after")
    def _weights_format(self) -> TrainSegConfig:
        if self.weights_format == "deeplab-pytorch":
            if self.backbone not in ("resnet50", "resnet101"):
                raise ValueError(f"weights_format deeplab-pytorch needs backbone resnet101 (or resnet50), "
                                 f"got {self.backbone}")
            if self.weights in (None, CAM_WEIGHTS):
                raise ValueError("weights_format deeplab-pytorch needs weights: the path of a deeplab-pytorch file")
        return self

    @property
    def style(self) -> str:
        """The backbone's style: deeplab-pytorch's files come from caffe ResNets."""
        return "caffe" if self.weights_format == "deeplab-pytorch" else "torchvision"

    @property
    def scaling(self) -> SegScaling:
        return SegScaling(self.scales, self.scale_range, self.scale_interpolation)


def build_segmenter(cfg: TrainSegConfig, num_labels: int) -> DeepLab:
    """A randomly initialised segmenter for ``num_labels`` classes (background included), with the configured
    weights loaded."""
    model = DeepLab(num_labels, cfg.arch, cfg.backbone, cfg.norm, cfg.output_stride, cfg.aspp_rates, cfg.style)
    unresolved_cam_weights("train_seg", cfg.weights)
    if cfg.weights:
        log.info("train_seg.weights %s: %s", cfg.weights, load_segmenter_weights(model, cfg.weights,
                                                                                 cfg.weights_format))
    return model


def segmentation_sgd(model: DeepLab, cfg: TrainSegConfig) -> torch.optim.SGD:
    """SGD over deeplab-pytorch's groups: backbone at lr, head weights at ``head_lr_mult`` x lr, head biases at
    ``head_bias_lr_mult`` x lr without weight decay."""
    backbone, head_weights, head_biases = model.parameter_groups()
    return torch.optim.SGD([
        {"params": backbone, "lr": cfg.lr},
        {"params": head_weights, "lr": cfg.lr * cfg.head_lr_mult},
        {"params": head_biases, "lr": cfg.lr * cfg.head_bias_lr_mult, "weight_decay": 0.0},
    ], lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@torch.no_grad()
def validate_segmenter(model: torch.nn.Module, split: Split, cfg: TrainSegConfig, device: torch.device) -> dict:
    """Single-scale, no-flip, no-CRF scores of the model on the split's ground truth."""
    settings = SegPrediction(scales=(1.0,), flip=False, test_size=cfg.val_size, batch_size=cfg.batch_size,
                             num_workers=cfg.num_workers, amp=cfg.amp)
    ids = split.ids[:cfg.val_max_images]
    matrix = ConfusionMatrix(len(split.class_names))
    model.eval()
    for image_id, probs in predict_probs(model, split, ids, settings, device):
        prediction = probs.argmax(axis=0)
        matrix.update(read_target(split, image_id, prediction.shape), prediction)
    model.train()
    return matrix.scores(split.class_names)


def train_seg(cfg: TrainSegConfig, train_split_url: str, pseudo_label_dir: str, val_split_url: str | None,
              out_dir: str, seed: int, device: str = "auto", tracker: Tracker | None = None) -> dict:
    """Train a segmenter on ``<pseudo_label_dir>/<id>.png`` for the images of the training split; validate on the
    validation split's ground truth every ``val_every`` steps and at the end. Returns the stage manifest (also
    written to ``out_dir``).

    Step checkpoints hold model, optimiser, scheduler, grad scaler, step, sampler position and RNG states, so a
    killed run resumes from the last one to the same weights. A finished stage (manifest with the same config hash,
    which covers the seed, the image list and the decoded pseudo labels) is returned without training. Under
    torchrun the ranks split each global batch; rank 0 alone validates and writes checkpoints, outputs and MLflow
    records (see tasks/engine/training.py). A non-finite loss or gradient stops it with
    TrainingDivergedError before anything of that step is saved.
    """
    split = load_split_file(train_split_url)
    num_labels = len(split.class_names)
    label_urls = pseudo_label_urls(split, pseudo_label_dir)
    labels_digest = check_label_maps(list(label_urls.values()), num_labels)
    val_split = load_split_with_masks(val_split_url, "validation") if val_split_url else None
    if val_split is not None and val_split.class_names != split.class_names:
        raise DataError(f"{val_split_url}: classes differ from those of the training split {train_split_url}")
    # worker count does not change the data order or the weights, so it may differ on resume
    cfg_hash = config_hash(cfg.model_copy(update={"num_workers": 0}), str(seed), ",".join(split.ids), labels_digest)
    manifest_url = fs.join(out_dir, MANIFEST)
    if (finished := finished_manifest(manifest_url, cfg_hash, "segmentation training")) is not None:
        return finished

    ranks, torch_device, tracker = training.setup(device, tracker)
    use_amp = amp_enabled(cfg.amp, torch_device)
    model = seeded_model(lambda: build_segmenter(cfg, num_labels), seed, torch_device, ranks, cfg.channels_last)
    optimizer = segmentation_sgd(model, cfg)
    solver = Solver(model, optimizer, poly_schedule(optimizer, cfg.max_steps, cfg.poly_power),
                    torch.amp.GradScaler("cuda", enabled=use_amp))

    trainer = Trainer("train_seg", solver, ranks, torch_device, tracker, cfg.max_steps, out_dir, cfg_hash)
    state, _ = trainer.resume()
    validations: list[dict] = state.get("validations", [])
    train_model = ranks.wrap(model, torch_device)
    tracker.log_params({"train_seg": cfg.model_dump(mode="json"), "seed": seed, "train_images": len(split.ids),
                        "pseudo_labels": pseudo_label_dir, "pseudo_label_digest": labels_digest})

    repeats = repeat_factors(split.labels, cfg.repeat_threshold) if cfg.repeat_threshold else None
    loader = trainer.loader(SegTrainingSet(split, label_urls, cfg.crop, cfg.scaling), seed, cfg.batch_size,
                            cfg.num_workers, cfg.iter_size, repeats,
                            torch.Generator())  # own generator: the global RNG (dropout) stays resumable

    def loss_step(batches: Iterator[dict]) -> StepResult:
        step_loss, images_seen = torch.zeros((), device=torch_device), 0
        for index in range(cfg.iter_size):
            batch = next(batches)
            images = batch["image"].to(torch_device, non_blocking=True)
            labels = batch["label"].to(torch_device, non_blocking=True)
            if cfg.channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            with sync_grads(train_model, index == cfg.iter_size - 1):
                with torch.autocast(torch_device.type, enabled=use_amp):
                    outputs = msc_outputs(train_model, images, cfg.msc_scales)
                loss = msc_cross_entropy(outputs, labels, cfg.loss_at_input_size) / cfg.iter_size
                trainer.backward(loss)
            step_loss += loss.detach()
            images_seen += images.shape[0]
        return StepResult({"loss": float(step_loss)}, images_seen)

    validated = {*range(cfg.val_every, cfg.max_steps, cfg.val_every), cfg.max_steps} if cfg.val_every \
        else {cfg.max_steps}
    trainer.train(loader, loss_step, [
        StepLogger(("lr_backbone", "lr_head"), cfg.log_every),
        EvalHook(validated if val_split is not None else (),
                 lambda step: validations.append(_validate(model, val_split, cfg, torch_device, tracker, step))),
        Checkpointer(cfg.checkpoint_every, cfg.keep_checkpoints, extra=lambda step: {
            "sampler": {"seed": seed, "batch_size": cfg.batch_size, "position": step * cfg.iter_size},
            "validations": validations}),
    ])
    if not ranks.is_main:
        return ranks.broadcast(None)  # rank 0's manifest, once it has written the outputs

    final_url = fs.join(out_dir, FINAL)
    meta = {"kind": "segmenter", "arch": cfg.arch, "backbone": cfg.backbone, "norm": cfg.norm,
            "output_stride": cfg.output_stride, "aspp_rates": list(cfg.aspp_rates), "style": cfg.style,
            "class_names": list(split.class_names), "config_hash": cfg_hash}
    checkpoints.save(final_url, {"model": model.state_dict(), "meta": meta, "step": cfg.max_steps})
    losses = loss_summary(trainer.history, max(1, min(LOSS_WINDOW, len(trainer.history) // 2)))  # half the steps
    first, last = losses["first_losses"], losses["last_losses"]
    manifest = {
        "config_hash": cfg_hash, "steps": cfg.max_steps, "checkpoint": final_url,
        "pseudo_labels": pseudo_label_dir, "pseudo_label_digest": labels_digest,
        "train_seconds": trainer.seconds, "images_per_second": trainer.images_per_second,
        "first_loss": first["loss"] if first else None, "last_loss": last["loss"] if last else None,
        "validation": validations,
    }
    tracker.log_metrics({"train_seconds": trainer.seconds, "images_per_second": manifest["images_per_second"] or 0.0})
    tracker.set_tags({"seg_checkpoint": final_url})
    return trainer.publish(manifest_url, manifest)


def _validate(model: torch.nn.Module, split: Split, cfg: TrainSegConfig, device: torch.device, tracker: Tracker,
              step: int) -> dict:
    scores = validate_segmenter(model, split, cfg, device)
    tracker.log_metrics(class_metrics(scores, "val"), step=step)
    tracker.log_text(format_table(scores), f"train_seg/val_step{step}.txt")
    log.info("\n%s", format_table(scores, f"segmentation val at step {step} (single scale, no CRF)"))
    return {"step": step, "miou": scores["miou"], "pixel_accuracy": scores["pixel_accuracy"]}


def arguments(cfg: TrainSegConfig, run: RunContext, inputs: Inputs) -> dict[str, Any]:
    """The stage function's keyword arguments in a pipeline run, less the tracker."""
    splits = inputs["prepare_data"]["splits"]
    return {"cfg": resolve_cam_weights(cfg, inputs), "train_split_url": splits["train"],
            "pseudo_label_dir": inputs["make_pseudo_labels"]["out_dir"], "val_split_url": splits["val"],
            "out_dir": run.out_dir("train_seg"), "seed": run.seed, "device": run.device}


train_seg_task = task(train_seg, name="train_seg", cache_policy=NO_CACHE)
