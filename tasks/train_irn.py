"""Train the inter-pixel relation network (IRN) on IR labels, resumable from checkpoints
(docs/method.md section 7.2).

Deviations available as options (reference defaults): ``scale_range`` (the reference's effective U[0.5, 1.0]; IRN
and SIPE use [0.5, 1.5]), ``weights`` may name a CAM checkpoint of this project instead of ImageNet weights (the
CPU demo has no pretrained weights), ``mean_shift_images`` (the reference averages over VOC train, 1464 images).
"""
from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Literal

import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch.utils.data import DataLoader, Subset
from tqdm import tqdm

from models.backbone import BACKBONES
from models.irn import STRIDE, IRNet, PathIndex, feature_size, irn_losses
from models.optim import poly_sgd
from storage import checkpoints, fs
from storage.datasets.irn import IRNTrainingSet, TopLeftCropSet, ir_label_digest
from storage.datasets.split_files import load_split_file
from storage.datasets.voc_layout import Split
from storage.tracking import Tracker
from tasks.engine import training
from tasks.engine.distributed import seeded_model
from tasks.engine.irn_checkpoint import KIND
from tasks.engine.loop_settings import LOOP_SETTINGS
from tasks.engine.resume import finished_manifest, loss_summary
from tasks.engine.training import Checkpointer, Solver, StepLogger, StepResult, Trainer
from tasks.runtime.context import RunContext
from tasks.runtime.hashing import config_hash
from tasks.runtime.manifests import Inputs
from tasks.runtime.weights import load_backbone_weights, resolve_cam_weights, unresolved_cam_weights

log = logging.getLogger(__name__)

MANIFEST = "train_irn.json"
FINAL = "irn.pt"


class TrainIrnConfig(BaseModel):
    """IRN training (docs/method.md section 7.2); defaults are the reference's."""

    model_config = ConfigDict(extra="forbid")
    backbone: Literal[BACKBONES] = Field("resnet50", description=LOOP_SETTINGS["backbone"])  # type: ignore[valid-type]
    weights: str | None = Field(
        None, description="frozen backbone weights: a torchvision ResNet state dict, or a CAM checkpoint of this "
                          "project (its backbone is used; a deviation for runs without ImageNet weights); in the "
                          "pipeline 'cam' names this run's CAM checkpoint")
    crop: int = Field(512, ge=32, le=2048, description=LOOP_SETTINGS["crop"] + " (a multiple of 4)")
    scale_range: tuple[float, float] = Field(
        (0.5, 1.0), description="random rescale range; the reference's effective [0.5, 1.0] (IRN/SIPE: [0.5, 1.5])")
    radius: int = Field(10, ge=2, description="pairs within this radius at stride 4")
    batch_size: int = Field(32, ge=1, description="images per process and step (global batch: x processes)")
    epochs: int = Field(3, ge=1, description=LOOP_SETTINGS["epochs"])
    max_steps: int | None = Field(None, ge=1, description="overrides epochs when set")
    lr: float = Field(0.1, gt=0, description="edge branch learning rate")
    displacement_lr_mult: float = Field(10.0, gt=0, description="displacement branch lr = lr x this")
    backbone_lr_mult: float = Field(
        0, ge=0, description="0: the backbone stays frozen (the reference); > 0: it is trained too, with lr x this "
                             "(a deviation for backbones without ImageNet features, docs/demo.md)")
    weight_decay: float = Field(1e-4, ge=0, description=LOOP_SETTINGS["weight_decay"])
    momentum: float = Field(1e-4, ge=0, lt=1, description="reference quirk: weight decay passed as momentum")
    poly_power: float = Field(0.9, ge=0, description=LOOP_SETTINGS["poly_power"])
    mean_shift_images: int | None = Field(
        None, ge=1, description="first N training images for the mean displacement (None: all)")
    num_workers: int = Field(2, ge=0, description=LOOP_SETTINGS["num_workers"])
    checkpoint_every: int = Field(100, ge=1, description=LOOP_SETTINGS["checkpoint_every"])
    keep_checkpoints: int = Field(2, ge=1, description=LOOP_SETTINGS["keep_checkpoints"])
    log_every: int = Field(1, ge=1, description=LOOP_SETTINGS["log_every"])

    @model_validator(mode="after")
    def _sizes_consistent(self) -> TrainIrnConfig:
        if self.crop % STRIDE:
            raise ValueError(f"crop must be a multiple of {STRIDE}, got {self.crop}")
        side = self.crop // 4
        if side <= 2 * (self.radius - 1):
            raise ValueError(f"radius {self.radius} is too large for crop {self.crop}: the stride-4 crop side "
                             f"{side} must exceed 2 x (radius - 1)")
        low, high = self.scale_range
        if not 0 < low <= high:
            raise ValueError(f"scale_range must satisfy 0 < low <= high, got {self.scale_range}")
        return self


def build_model(cfg: TrainIrnConfig) -> IRNet:
    model = IRNet(cfg.backbone, train_backbone=cfg.backbone_lr_mult > 0)
    unresolved_cam_weights("train_irn", cfg.weights)
    if cfg.weights:
        load_backbone_weights(model.backbone, cfg.weights)
    return model


@torch.no_grad()
def mean_displacement(model: IRNet, split: Split, cfg: TrainIrnConfig, device: torch.device) -> torch.Tensor:
    """Mean displacement (2,) over the training images, each top-left cropped into a ``crop`` canvas (the whole
    canvas averaged, as the reference), with the mean shift at zero; images weigh equally."""
    model.eval()
    model.mean_shift.running_mean.zero_()
    dataset = TopLeftCropSet(split, cfg.crop)
    if cfg.mean_shift_images is not None:
        dataset = Subset(dataset, range(min(cfg.mean_shift_images, len(dataset))))
    loader = DataLoader(dataset, batch_size=cfg.batch_size, num_workers=cfg.num_workers)
    total = torch.zeros(2, dtype=torch.float64)
    for images in tqdm(loader, desc="irn mean shift", unit="batch", dynamic_ncols=True):
        _, displacement = model(images.to(device))
        total += displacement.mean(dim=(2, 3)).double().sum(dim=0).cpu()
    return (total / len(dataset)).float()


def train_irn(
    cfg: TrainIrnConfig,
    ir_label_dir: str,
    split_url: str,
    out_dir: str,
    seed: int,
    device: str = "auto",
    tracker: Tracker | None = None,
) -> dict:
    """Train IRN on the IR labels ``<ir_label_dir>/<image_id>.png`` of the split's images, then store the mean
    displacement in the model; returns the stage manifest (also written to ``out_dir``).

    Step checkpoints hold model, optimiser, scheduler, step and RNG states, so a killed run resumes from the last
    one and ends with the same weights. A finished stage (manifest with the same config hash, which covers the
    config, seed, image ids and IR label contents) is returned without training. Under torchrun the ranks split
    each global batch; rank 0 alone computes the mean displacement and writes checkpoints, outputs and MLflow
    records (see tasks/engine/training.py). A non-finite loss or gradient stops it with
    TrainingDivergedError before anything of that step is saved.
    """
    split = load_split_file(split_url)
    label_digest = ir_label_digest(ir_label_dir, split.ids)
    cfg_hash = config_hash(cfg, str(seed), ",".join(split.ids), label_digest)
    manifest_url = fs.join(out_dir, MANIFEST)
    if (finished := finished_manifest(manifest_url, cfg_hash, "IRN training")) is not None:
        return finished

    ranks, torch_device, tracker = training.setup(device, tracker)
    model = seeded_model(lambda: build_model(cfg), seed, torch_device, ranks)
    total_steps = cfg.max_steps or cfg.epochs * training.steps_per_epoch(len(split.ids), cfg.batch_size, ranks,
                                                                         split_url)
    optimizer, scheduler = poly_sgd(model.parameter_groups(), cfg.lr, cfg.displacement_lr_mult, cfg.weight_decay,
                                    cfg.momentum, total_steps, cfg.poly_power,
                                    extra_groups=[(model.backbone_parameters(), cfg.backbone_lr_mult)]
                                    if model.train_backbone else ())
    paths = PathIndex(cfg.radius, feature_size(cfg.crop, cfg.crop)).to(torch_device)
    num_labels = len(split.class_names)

    # a frozen backbone is left out of step checkpoints (it is rebuilt identically)
    solver = Solver(model, optimizer, scheduler, frozen_prefix=None if model.train_backbone else "backbone.")
    trainer = Trainer("train_irn", solver, ranks, torch_device, tracker, total_steps, out_dir, cfg_hash)
    trainer.resume()
    train_model = ranks.wrap(model, torch_device)

    tracker.log_params({"train_irn": cfg.model_dump(), "seed": seed, "total_steps": total_steps,
                        "train_images": len(split.ids), "ir_label_dir": ir_label_dir,
                        "ir_label_digest": label_digest, "pair_directions": paths.num_directions})
    loader = trainer.loader(IRNTrainingSet(split, ir_label_dir, cfg.crop, cfg.scale_range), seed, cfg.batch_size,
                            cfg.num_workers)

    def loss_step(batches: Iterator[dict]) -> StepResult:
        batch = next(batches)
        images = batch["image"].to(torch_device, non_blocking=True)
        labels = batch["label"].to(torch_device, non_blocking=True)
        edge, displacement = train_model(images)
        losses = irn_losses(edge, displacement, labels, paths, num_labels)
        trainer.backward(losses.total)
        return StepResult(losses.as_floats(), images.shape[0])

    trainer.train(loader, loss_step, [StepLogger(("lr_edge", "lr_displacement"), cfg.log_every),
                                      Checkpointer(cfg.checkpoint_every, cfg.keep_checkpoints, at_end=True)])
    if not ranks.is_main:
        return ranks.broadcast(None)  # rank 0's manifest, once it has written the outputs

    shift = mean_displacement(model, split, cfg, torch_device)
    model.mean_shift.running_mean.copy_(shift.to(torch_device))
    log.info("IRN mean displacement (dy, dx): %.4f, %.4f", *shift.tolist())
    final_url = fs.join(out_dir, FINAL)
    meta = {"kind": KIND, "backbone": cfg.backbone, "radius": cfg.radius, "crop": cfg.crop,
            "class_names": list(split.class_names), "mean_shift": shift.tolist(), "config_hash": cfg_hash}
    checkpoints.save(final_url, {"model": model.state_dict(), "meta": meta, "step": total_steps})
    manifest = {
        "config_hash": cfg_hash, "steps": total_steps, "checkpoint": final_url, "mean_shift": shift.tolist(),
        "ir_label_digest": label_digest, "train_seconds": trainer.seconds,
        "images_per_second": trainer.images_per_second, **loss_summary(trainer.history),
    }
    tracker.log_metrics({"train_seconds": trainer.seconds, "mean_shift_dy": shift[0].item(),
                         "mean_shift_dx": shift[1].item()})
    tracker.set_tags({"irn_checkpoint": final_url})
    return trainer.publish(manifest_url, manifest)


def arguments(cfg: TrainIrnConfig, run: RunContext, inputs: Inputs) -> dict[str, Any]:
    """The stage function's keyword arguments in a pipeline run, less the tracker."""
    return {"cfg": resolve_cam_weights(cfg, inputs), "ir_label_dir": inputs["make_ir_labels"]["out_dir"],
            "split_url": inputs["prepare_data"]["splits"]["train"], "out_dir": run.out_dir("train_irn"),
            "seed": run.seed, "device": run.device}


train_irn_task = task(train_irn, name="train_irn", cache_policy=NO_CACHE)
