"""Train SFC's CAM network (MSDW losses + image bank re-sampling), resumable from checkpoints."""
from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from typing import Any, Literal

import torch
import torch.nn.functional as F
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from torch.utils.data import DataLoader

from models.backbone import BACKBONES, NORMS
from models.cam_eval import ThresholdSweep
from models.class_weights import WEIGHT_MODES, distribution_weights
from models.image_bank import ImageBank
from models.losses import LossWeights, sfc_step_losses
from models.metrics import ConfusionMatrix
from models.optim import poly_sgd
from models.sfc import SFCNet, max_normalize
from storage import checkpoints, fs
from storage.datasets.cam_training import CAMTrainingSet, FullImageSet
from storage.datasets.split_files import load_split_file
from storage.datasets.voc_layout import Split
from storage.errors import ConfigError
from storage.reports import class_metrics, format_table
from storage.tracking import Tracker
from tasks.engine import training
from tasks.engine.distributed import seeded_model
from tasks.engine.loop_settings import LOOP_SETTINGS
from tasks.engine.resume import finished_manifest, loss_summary
from tasks.engine.training import Checkpointer, EvalHook, Solver, StepLogger, StepResult, Trainer
from tasks.runtime.context import RunContext
from tasks.runtime.device import amp_enabled
from tasks.runtime.hashing import config_hash
from tasks.runtime.manifests import Inputs
from tasks.runtime.weights import load_backbone_weights

log = logging.getLogger(__name__)

MANIFEST = "train_cam.json"
FINAL = "final.pt"
BEST = "best.pt"
VAL_SCORES = "val_scores.json"


class IBRConfig(BaseModel):
    """Image bank re-sampling."""

    model_config = ConfigDict(extra="forbid")
    enabled: bool = Field(True, description="false: no image bank re-sampling (an ablation)")
    n_resample: int = Field(4, ge=1, description="images re-sampled from the bank per step")
    skip_empty_slots: bool = Field(False, description="deviation: never draw a class slot not yet filled")


class TrainCamConfig(BaseModel):
    """CAM training (docs/method.md sections 3-5); defaults are the reference's."""

    model_config = ConfigDict(extra="forbid")
    method: Literal["sfc", "baseline"] = Field(
        "sfc", description="baseline: classification loss only, no consistency terms, no image bank")
    backbone: Literal[BACKBONES] = Field("resnet50", description=LOOP_SETTINGS["backbone"])  # type: ignore[valid-type]
    weights: str | None = Field(None, description="backbone init (path or fsspec URL): a torchvision ResNet state "
                                                  "dict, or a CAM checkpoint's backbone; null: random")
    trainable_from: int = Field(3, ge=0, le=4, description="first trainable backbone stage (3: layer3)")
    norm: Literal[NORMS] = Field(  # type: ignore[valid-type]
        "frozen", description="frozen: BN with running statistics (reference); batch: trainable BN (random init)")
    crop: int = Field(512, ge=32, le=2048, description=LOOP_SETTINGS["crop"] + " (a multiple of 32)")
    resize_long: tuple[int, int] = Field(
        (320, 640), description="each image's long side first resized to a length drawn uniformly from this range")
    batch_size: int = Field(16, ge=1, description="images per process and step (global batch: x processes)")
    epochs: int = Field(6, ge=1, description=LOOP_SETTINGS["epochs"])
    max_steps: int | None = Field(None, ge=1, description="overrides epochs when set")
    lr: float = Field(0.1, gt=0, description=LOOP_SETTINGS["lr"] + " of the trained backbone stages")
    new_layer_lr_mult: float = Field(10.0, gt=0, description="lr multiplier of the new layers (classifier, side "
                                                             "and f9 heads)")
    weight_decay: float = Field(1e-4, ge=0, description=LOOP_SETTINGS["weight_decay"])
    momentum: float = Field(1e-4, ge=0, lt=1, description="reference quirk: weight decay passed as momentum")
    poly_power: float = Field(0.9, ge=0, description=LOOP_SETTINGS["poly_power"])
    clip_grad_norm: float = Field(1.0, gt=0, description="gradients clipped to this global norm")
    loss_proto_weight: float = Field(1.6, ge=0, description="weight of the prototype-CAM consistency loss (MSDW)")
    loss_scale_weight: float = Field(0.8, ge=0, description="weight of the cross-scale consistency loss (MSDW)")
    bg_seed_scale: float = Field(0.3, ge=0, description="background seed of the prototypes: this x the maximum "
                                                        "foreground CAM response")
    class_weights: Literal[WEIGHT_MODES] = Field(  # type: ignore[valid-type]
        "voc", description="distribution coefficients of MSDW: voc (the reference's constants), counts (1 / (N_c + "
        "R) from the split's class counts), uniform (all 1)")
    ibr: IBRConfig = IBRConfig()
    num_workers: int = Field(2, ge=0, description=LOOP_SETTINGS["num_workers"])
    checkpoint_every: int = Field(300, ge=1, description=LOOP_SETTINGS["checkpoint_every"])
    keep_checkpoints: int = Field(2, ge=1, description=LOOP_SETTINGS["keep_checkpoints"])
    log_every: int = Field(1, ge=1, description=LOOP_SETTINGS["log_every"])
    validate_every: int = Field(
        0, ge=0, description="selection final: single-scale CAM mIoU sweep on the val split every N steps (0: at "
                             "the end only); best_gt: the reference's selection validation every N steps")
    val_max_images: int | None = Field(None, ge=1, description="limit the images of either validation")
    selection: Literal["final", "best_gt"] = Field(
        "final", description="final: the last model; best_gt: the reference's best.pth, chosen on the seed split's "
                             "ground truth (argmax mIoU of K + of P, after steps 1 + n x validate_every above 10)")
    amp: bool = Field(False, description="mixed precision (CUDA only)")
    channels_last: bool = Field(False, description=LOOP_SETTINGS["channels_last"])

    @field_validator("crop")
    @classmethod
    def _crop_multiple_of_32(cls, crop: int) -> int:
        if crop % 32:
            raise ValueError(f"crop must be a multiple of 32 (the 0.5-scale CAM must be half the full one), got {crop}")
        return crop

    @model_validator(mode="after")
    def _selection_validates(self) -> TrainCamConfig:
        if self.selection == "best_gt" and not self.validate_every:
            raise ValueError("selection best_gt chooses among the validated steps: set validate_every (the "
                             "reference: 300)")
        return self

    @model_validator(mode="after")
    def _sizes_consistent(self) -> TrainCamConfig:
        low, high = self.resize_long
        if not 16 <= low <= high:
            raise ValueError(f"resize_long must satisfy 16 <= low <= high, got {self.resize_long}")
        if self.crop > high:
            raise ValueError(f"crop {self.crop} is larger than allowed: at most resize_long's upper bound {high}")
        return self


def build_model(cfg: TrainCamConfig, num_classes: int) -> SFCNet:
    model = SFCNet(num_classes, cfg.backbone, cfg.trainable_from, cfg.bg_seed_scale, cfg.norm)
    if cfg.weights:
        log.info("train_cam.weights %s: %s", cfg.weights, load_backbone_weights(model.backbone, cfg.weights))
    return model


@torch.no_grad()
def validate_cams(model: SFCNet, split: Split, device: torch.device, max_images: int | None = None) -> dict:
    """Single-scale CAM quality on a split with masks: the threshold sweep of the PCM CAM (K) and prototype CAM
    (P), each max-normalised and label-masked, plus the all-background baseline mIoU."""
    model.eval()
    names = split.class_names
    sweeps = {"cam": ThresholdSweep(len(names)), "proto_cam": ThresholdSweep(len(names))}
    background = ThresholdSweep(len(names), thresholds=(float("inf"),))
    loader = DataLoader(FullImageSet(split), batch_size=1, num_workers=0)
    for index, batch in enumerate(loader):
        if max_images is not None and index >= max_images:
            break
        image, label, mask = batch["image"].to(device), batch["label"].to(device), batch["mask"][0]
        label_bg = torch.cat([label.new_ones(1, 1), label], dim=1)[:, :, None, None]
        out = model(image, label_bg)
        for key, sweep in sweeps.items():
            cam = max_normalize(getattr(out, key)[:, 1:]) * label[:, :, None, None]
            cam = F.interpolate(cam, size=mask.shape, mode="bilinear", align_corners=False)[0]
            sweep.update(mask, cam.cpu())
        background.update(mask, torch.zeros((1, *mask.shape)))
    model.train()
    results = {key: sweep.results(names) for key, sweep in sweeps.items()}
    results["all_background_miou"] = background.results(names)["best"]["miou"]
    return results


@torch.no_grad()
def reference_validation(model: SFCNet, split: Split, device: torch.device, max_images: int | None = None) -> dict:
    """The reference's train-time validation (docs/method.md section 4): each image whole, single scale, no flip,
    its label with background as the valid mask; the PCM CAM (K) and the prototype CAM (P) each upsampled to the
    image (bilinear), divided by their spatial maximum + 1e-5 and argmaxed over all channels. Returns both mIoUs and
    their sum, the selection score."""
    model.eval()
    matrices = {key: ConfusionMatrix(len(split.class_names)) for key in ("cam", "proto_cam")}
    loader = DataLoader(FullImageSet(split), batch_size=1, num_workers=0)
    for index, batch in enumerate(loader):
        if max_images is not None and index >= max_images:
            break
        image, label, mask = batch["image"].to(device), batch["label"].to(device), batch["mask"][0]
        out = model(image, torch.cat([label.new_ones(1, 1), label], dim=1)[:, :, None, None])
        for key, matrix in matrices.items():
            cam = F.interpolate(getattr(out, key), size=mask.shape, mode="bilinear", align_corners=False)
            matrix.update(mask, max_normalize(cam)[0].argmax(0).cpu())
    model.train()
    mious = {key: matrix.scores(split.class_names)["miou"] for key, matrix in matrices.items()}
    return {"miou_cam": mious["cam"], "miou_proto": mious["proto_cam"], "score": mious["cam"] + mious["proto_cam"]}


def selection_steps(total_steps: int, every: int) -> list[int]:
    """The steps after which the reference validates for ``best.pth``: k > 10 with (k - 1) % every == 0 (its log
    prints them as k - 1: 300, 600, ...); the final model is not a candidate unless it is one of them."""
    return [k for k in range(every + 1, total_steps + 1, every) if k > 10]


def train_cam(
    cfg: TrainCamConfig,
    train_split_url: str,
    val_split_url: str | None,
    out_dir: str,
    seed: int,
    device: str = "auto",
    tracker: Tracker | None = None,
    seed_split_url: str | None = None,
) -> dict:
    """Train the CAM network on the training split; returns the stage manifest (also written to ``out_dir``).

    With ``selection: best_gt`` the model is validated as the reference does on the seed split (masks) after each
    of :func:`selection_steps`, and the best one is kept as ``best.pt`` and handed on.

    Periodic checkpoints hold model, optimiser, scheduler, step, RNG states and the image bank, so a killed run
    resumes from the last one and ends with the same weights. A finished stage (manifest with the same config
    hash) is returned without training. Under torchrun the ranks split each global batch of
    ``batch_size x processes`` images and keep their own image bank; rank 0 alone validates and writes the
    checkpoints, outputs and MLflow records (see tasks/engine/training.py). A non-finite loss or gradient stops it with
    TrainingDivergedError before anything of that step is saved.
    """
    split = load_split_file(train_split_url)
    cfg_hash = config_hash(cfg, str(seed), ",".join(split.ids))
    manifest_url = fs.join(out_dir, MANIFEST)
    if (finished := finished_manifest(manifest_url, cfg_hash, "CAM training")) is not None:
        return finished

    ranks, torch_device, tracker = training.setup(device, tracker)
    use_amp = amp_enabled(cfg.amp, torch_device)
    model = seeded_model(lambda: build_model(cfg, split.num_classes), seed, torch_device, ranks, cfg.channels_last)
    epoch_steps = training.steps_per_epoch(len(split.ids), cfg.batch_size, ranks, train_split_url)
    total_steps = cfg.max_steps or cfg.epochs * epoch_steps
    class_weights = distribution_weights(  # every rank's bank re-samples n_resample images per step
        cfg.class_weights, split.class_names[1:], split.class_counts(), epoch_steps * ranks.world_size,
        cfg.ibr.n_resample)
    weights_t = torch.from_numpy(class_weights).to(torch_device)
    optimizer, scheduler = poly_sgd(model.parameter_groups(), cfg.lr, cfg.new_layer_lr_mult, cfg.weight_decay,
                                    cfg.momentum, total_steps, cfg.poly_power)
    solver = Solver(model, optimizer, scheduler, torch.amp.GradScaler("cuda", enabled=use_amp), cfg.clip_grad_norm)
    sfc = cfg.method == "sfc"
    bank = ImageBank(split.num_classes, cfg.crop, cfg.ibr.n_resample, cfg.ibr.skip_empty_slots,
                     ranks.rank_seed(seed)) \
        if sfc and cfg.ibr.enabled else None
    loss_weights = LossWeights(cfg.loss_proto_weight, cfg.loss_scale_weight) if sfc else LossWeights(0.0, 0.0)

    trainer = Trainer("train_cam", solver, ranks, torch_device, tracker, total_steps, out_dir, cfg_hash)
    state, own = trainer.resume()
    if state and bank is not None:
        bank.load_state_dict(own["image_bank"])
    selection = state.get("selection") or {"best_step": None, "best_score": 0.0, "history": []}
    train_model = ranks.wrap(model, torch_device)

    tracker.log_params({"train_cam": cfg.model_dump(), "seed": seed, "total_steps": total_steps,
                        "train_images": len(split.ids)})
    tracker.log_metrics({f"class_weight/{n}": float(w) for n, w in zip(split.class_names[1:], class_weights)})

    loader = trainer.loader(CAMTrainingSet(split, cfg.crop, cfg.resize_long), seed, cfg.batch_size, cfg.num_workers)
    val_split = load_split_file(val_split_url) if val_split_url else None
    seed_split, candidates = _selection_plan(cfg, seed_split_url, total_steps)
    meta = {"backbone": cfg.backbone, "norm": cfg.norm, "trainable_from": cfg.trainable_from,
            "bg_seed_scale": cfg.bg_seed_scale, "num_classes": split.num_classes,
            "class_names": list(split.class_names), "config_hash": cfg_hash}
    best_url = fs.join(out_dir, BEST)

    def loss_step(batches: Iterator[dict]) -> StepResult:
        batch = next(batches)
        images, valid, labels = batch["image"], batch["valid"], batch["label"]
        if bank is not None:
            images, valid, labels = bank.extend_batch(images, valid, labels)
        images, valid, labels = (t.to(torch_device, non_blocking=True) for t in (images, valid, labels))
        if cfg.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(torch_device.type, enabled=use_amp):
            losses = sfc_step_losses(train_model, images, valid, labels, weights_t, loss_weights)
        trainer.backward(losses.total)
        return StepResult(losses.as_floats(), images.shape[0])

    validated = range(cfg.validate_every, total_steps, cfg.validate_every) \
        if val_split is not None and cfg.selection == "final" and cfg.validate_every else ()
    trainer.train(loader, loss_step, [
        StepLogger(("lr_backbone", "lr_new_layers"), cfg.log_every),
        EvalHook(candidates, lambda step: _select(model, seed_split, torch_device, cfg, tracker, step, selection,
                                                  best_url, meta)),
        Checkpointer(cfg.checkpoint_every, cfg.keep_checkpoints, per_rank=("image_bank",),
                     extra=lambda step: {"image_bank": bank.state_dict() if bank is not None else None,
                                         "selection": selection}),
        EvalHook(validated, lambda step: _validate(model, val_split, torch_device, cfg, tracker, step, out_dir)),
    ])
    if not ranks.is_main:
        return ranks.broadcast(None)  # rank 0's manifest, once it has written the outputs

    final_url = fs.join(out_dir, FINAL)
    _save_model(final_url, model, meta, total_steps)
    manifest = {
        "config_hash": cfg_hash, "steps": total_steps, "final_checkpoint": final_url, "checkpoint": final_url,
        "class_weights": dict(zip(split.class_names[1:], class_weights.tolist())),
        "train_seconds": trainer.seconds, "images_per_second": trainer.images_per_second,
        **loss_summary(trainer.history),
    }
    if val_split is not None:
        _validate(model, val_split, torch_device, cfg, tracker, total_steps, out_dir)
        manifest["validation"] = json.loads(fs.read_text(fs.join(out_dir, VAL_SCORES)))["summary"]
    if cfg.selection == "best_gt":
        if selection["best_step"] is None:
            raise ConfigError(f"selection best_gt: no validated step scored above 0 on split {seed_split.name!r}")
        manifest["checkpoint"] = best_url
        manifest["selection"] = {"split": seed_split.name, **selection}
    tracker.log_metrics({"train_seconds": trainer.seconds, "images_per_second": manifest["images_per_second"] or 0.0})
    tracker.set_tags({"final_checkpoint": final_url, "selected_checkpoint": manifest["checkpoint"]})
    return trainer.publish(manifest_url, manifest)


def _save_model(url: str, model: SFCNet, meta: dict, step: int) -> None:
    checkpoints.save(url, {"model": model.state_dict(), "meta": meta, "step": step})


def _selection_plan(cfg: TrainCamConfig, seed_split_url: str | None,
                    total_steps: int) -> tuple[Split | None, list[int]]:
    """The seed split and the steps validated for ``selection: best_gt`` (none for ``final``); a plan that
    cannot select (no seed split, no validated step) is an error before training."""
    if cfg.selection != "best_gt":
        return None, []
    if not seed_split_url:
        raise ConfigError("train_cam.selection best_gt validates on the seed split (prepare_data.seed_split); none "
                          "was given")
    candidates = selection_steps(total_steps, cfg.validate_every)
    if not candidates:
        raise ConfigError(f"train_cam.selection best_gt: no step of {total_steps} is validated with validate_every="
                          f"{cfg.validate_every} (the reference validates after steps k > 10 with (k - 1) % N == 0)")
    return load_split_file(seed_split_url), candidates


def _select(model: SFCNet, split: Split, device: torch.device, cfg: TrainCamConfig, tracker: Tracker, step: int,
            selection: dict, best_url: str, meta: dict) -> None:
    """The reference's validation after ``step``, added to ``selection``; the model becomes ``best_url`` when its
    score beats the best so far (strictly, starting from 0, as the reference)."""
    result = reference_validation(model, split, device, cfg.val_max_images)
    tracker.log_metrics({f"select_{key}": value for key, value in result.items()}, step=step)
    log.info("selection on %s after step %d: mIoU K %.4f + P %.4f", split.name, step, result["miou_cam"],
             result["miou_proto"])
    selection["history"].append({"step": step, **result})
    if result["score"] > selection["best_score"]:
        _save_model(best_url, model, meta, step)
        selection.update(best_step=step, best_score=result["score"])


def _validate(model: SFCNet, split: Split, device: torch.device, cfg: TrainCamConfig, tracker: Tracker, step: int,
              out_dir: str) -> None:
    """Validate (threshold sweeps of K and P), log, and write the scores to ``out_dir``."""
    results = validate_cams(model, split, device, cfg.val_max_images)
    summary = {
        "val_miou_cam": results["cam"]["best"]["miou"],
        "val_threshold_cam": results["cam"]["best_threshold"],
        "val_miou_proto": results["proto_cam"]["best"]["miou"],
        "val_threshold_proto": results["proto_cam"]["best_threshold"],
        "val_all_background_miou": results["all_background_miou"],
    }
    tracker.log_metrics(summary, step=step)
    for key in ("cam", "proto_cam"):
        tracker.log_metrics(class_metrics(results[key]["best"], f"val_{key}"), step=step)
    log.info("\n%s", format_table(results["cam"]["best"],
                                   f"val: PCM CAM at step {step}, threshold {summary['val_threshold_cam']}"))
    fs.write_text(fs.join(out_dir, VAL_SCORES), json.dumps({"step": step, "summary": summary, **results}, indent=2))
    tracker.log_text(format_table(results["cam"]["best"]), f"train_cam/val_cam_step{step}.txt")


def arguments(cfg: TrainCamConfig, run: RunContext, inputs: Inputs) -> dict[str, Any]:
    """The stage function's keyword arguments in a pipeline run, less the tracker."""
    splits = inputs["prepare_data"]["splits"]
    return {"cfg": cfg, "train_split_url": splits["train"], "val_split_url": splits["val"],
            "seed_split_url": splits.get("seed"), "out_dir": run.out_dir("train_cam"), "seed": run.seed,
            "device": run.device}


train_cam_task = task(train_cam, name="train_cam", cache_policy=NO_CACHE)
