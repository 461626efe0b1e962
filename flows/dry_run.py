"""``sfc run --dry-run``: check a configuration's data folder and weights files in seconds, without running a
stage, and say what the run would do (stages, image counts, training steps, disk for the CAM store) and which
figures the docs expect of it.

Images are listed, not decoded (prepare_data decodes them); XML annotations are parsed for the image-level labels;
weights files are read and their keys and shapes checked against the network that will load them (built on the
meta device). Every problem found is reported, not just the first.
"""
from __future__ import annotations

import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from flows.config import PipelineConfig
from flows.expected import expected_figures
from flows.stages import STAGE_NAMES, TRAINING_STAGES, select_stages
from storage import checkpoints, fs
from storage.datasets.catalog import DEFAULT_CLASSES
from storage.datasets.voc_layout import MASK_FOLDERS, TRAIN_AUG, VOCLayoutDataset
from storage.errors import CheckpointError, ConfigError, DataError
from storage.images import BadImageError, image_size
from tasks.infer_cams import store_url
from tasks.prepare_data import SYNTHETIC_MARKER
from tasks.runtime.weights import CAM_WEIGHTS, fit_weights

# Size of the CAM store over its raw float16 payload, Blosc-LZ4 on CAM-like data (bench/cam_store.py: 17.6% of the
# reference's float32 bytes)
STORE_RATIO = 0.35
SIZE_SAMPLE = 200  # images whose size is read to estimate the store's size
VOC_TRAIN_AUG = 10582  # train_aug of the official VOC2012 + SBD downloads


@dataclass
class DryRun:
    """What a run would do (``lines``) and what stops it (``problems``)."""

    lines: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    store_bytes: float | None = None  # the CAM store's estimated raw float16 payload

    def text(self) -> str:
        found = [f"problems ({len(self.problems)}):", *(f"  - {p}" for p in self.problems)] if self.problems \
            else ["no problems found"]
        return "\n".join([*self.lines, *found]) + "\n"


def _selected(cfg: PipelineConfig, stages: Sequence[str] | None, start: str | None) -> list[str]:
    return [s.name for s in select_stages(list(stages) if stages else None, start) if s.enabled(cfg)]


def _weights(cfg: PipelineConfig, stage: str) -> str | None:
    url = getattr(cfg, stage).weights
    return None if url == CAM_WEIGHTS else url


def weights_problems(cfg: PipelineConfig, stages: Sequence[str] | None = None, start: str | None = None) -> list[str]:
    """A message for every weights file that the selected training stages name and that does not exist or does not
    fit the network its stage builds (wrong kind, architecture, truncated file)."""
    selected = _selected(cfg, stages, start)
    num_classes = len(DEFAULT_CLASSES[cfg.prepare_data.kind]) - 1  # the head's size never stops a load
    return [problem for stage in TRAINING_STAGES if stage in selected
            if (problem := _stage_weights(cfg, stage, num_classes)[1])]


def _network(cfg: PipelineConfig, stage: str, num_classes: int) -> torch.nn.Module:
    """The network the stage's weights go into, built on the meta device (no memory, no initialisation cost)."""
    section = getattr(cfg, stage).model_copy(update={"weights": None})
    with torch.device("meta"):
        if stage == "train_cam":
            from tasks.train_cam import build_model
            return build_model(section, num_classes).backbone
        if stage == "train_irn":
            from tasks.train_irn import build_model as build_irn
            return build_irn(section).backbone
        from tasks.train_seg import build_segmenter
        return build_segmenter(section, num_classes + 1)


def _stage_weights(cfg: PipelineConfig, stage: str, num_classes: int) -> tuple[str, str | None]:
    """The dry run's line for a stage's weights and the problem with them, if any: the file is read and its keys
    and shapes checked against the network the stage builds."""
    url = _weights(cfg, stage)
    if getattr(cfg, stage).weights == CAM_WEIGHTS:
        return f"  {stage}.weights: the backbone of this run's trained CAM network", None
    if url is None:
        return f"  {stage}.weights: none, random initialisation", None
    if not fs.exists(url):
        return f"  {stage}.weights: {url} MISSING", f"{stage}.weights: weights file {url} does not exist"
    try:
        fitted = fit_weights(url, checkpoints.load_pretrained(url), _network(cfg, stage, num_classes),
                             getattr(getattr(cfg, stage), "weights_format", "torchvision"))
    except (CheckpointError, ConfigError) as err:
        return f"  {stage}.weights: {url} DOES NOT FIT", f"{stage}.weights: {err}"
    return f"  {stage}.weights: {url}: {fitted.summary}", None


def _check_weights(cfg: PipelineConfig, selected: list[str], num_classes: int, report: DryRun) -> None:
    report.lines.append("weights:")
    for stage in (s for s in TRAINING_STAGES if s in selected):
        line, problem = _stage_weights(cfg, stage, num_classes)
        report.lines.append(line)
        if problem:
            report.problems.append(problem)


def _first(ids: Sequence[str], limit: int = 3) -> str:
    shown = ", ".join(list(ids)[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def _check_split(dataset: VOCLayoutDataset, cfg: PipelineConfig, role: str, name: str, images: set[str],
                 report: DryRun) -> tuple[list[str], dict[str, np.ndarray]]:
    """The split's ids and labels; its missing images, masks and labels go to ``report.problems``."""
    try:
        ids = dataset.split_ids(name)
    except DataError as err:
        report.problems.append(f"{role} split {name!r}: {err}")
        return [], {}
    facts = [f"{len(ids)} images"]
    missing = [i for i in ids if i not in images]
    if missing:
        report.problems.append(f"{role} split {name!r}: {len(missing)} images missing from "
                               f"{fs.join(dataset.root, 'JPEGImages')}: {_first(missing)}")
    labels, bad = dataset.image_labels(ids) if role != "test" else ({}, {})
    if bad:
        message = f"{role} split {name!r}: {len(bad)} images without a usable label, e.g. {next(iter(bad.values()))}"
        if cfg.prepare_data.on_bad_data == "skip":
            facts.append(f"{len(bad)} without a label, skipped (prepare_data.on_bad_data=skip)")
        else:
            report.problems.append(message)
    if role in ("val", "seed"):
        masks = {i: dataset.mask_url(i) for i in ids}
        without = [i for i, url in masks.items() if url is None]
        if without:
            report.problems.append(f"{role} split {name!r} needs masks; none in {' or '.join(MASK_FOLDERS)} for "
                                   f"{len(without)} images: {_first(without)}")
        by_folder = {f: sum(1 for u in masks.values() if u and f"/{f}/" in u) for f in MASK_FOLDERS}
        facts.append("masks: " + ", ".join(f"{n} in {f}" for f, n in by_folder.items() if n))
    if role == "train" and name == TRAIN_AUG and cfg.prepare_data.kind == "voc" and len(ids) != VOC_TRAIN_AUG:
        facts.append(f"the official VOC2012 + SBD train_aug has {VOC_TRAIN_AUG}; SBD missing? (sfc convert-sbd)")
    report.lines.append(f"  {role:<6} {name:<10} " + "; ".join(facts))
    return ids, labels


Found = dict[str, tuple[list[str], dict[str, np.ndarray]]]  # role -> (ids, labels)


def _check_data(cfg: PipelineConfig, report: DryRun) -> tuple[tuple[str, ...], Found]:
    """The class names and each role's ids and labels (none when the data cannot be read)."""
    data = cfg.prepare_data
    if data.kind == "synthetic" and not fs.exists(fs.join(data.root, SYNTHETIC_MARKER)):
        report.lines.append(f"data: synthetic, generated at {data.root} by the prepare_data stage "
                            f"({data.synthetic.num_images} images)")
        return DEFAULT_CLASSES["synthetic"], {}
    try:
        dataset = VOCLayoutDataset(data.root, data.kind)
    except DataError as err:
        report.problems.append(f"prepare_data.root: {err}")
        return DEFAULT_CLASSES[data.kind], {}
    report.lines.append(f"data: {data.kind} at {data.root}, {len(dataset.class_names) - 1} classes")
    jpegs = fs.join(data.root, "JPEGImages")
    images = {n[:-4] for n in fs.listdir(jpegs) if n.endswith(".jpg")} if fs.isdir(jpegs) else set()
    roles = {"train": data.train_split, "val": data.val_split, "seed": data.seed_split, "test": data.test_split}
    found = {role: _check_split(dataset, cfg, role, name, images, report) for role, name in roles.items() if name}
    outside = sorted(set(found.get("seed", ([], {}))[0]) - set(found.get("train", ([], {}))[0]))
    if found.get("train", ([], {}))[0] and outside:
        report.problems.append(f"seed split {data.seed_split!r} must lie inside train split {data.train_split!r}; "
                               f"not in it: {_first(outside)}")
    return dataset.class_names, found


def _steps(cfg: PipelineConfig, stage: str, train_images: int, report: DryRun) -> str:
    if stage == "train_seg":
        c = cfg.train_seg
        return f"{c.max_steps} steps of {c.batch_size} x {c.iter_size} images"
    c = getattr(cfg, stage)
    per_epoch = train_images // c.batch_size
    if train_images and not per_epoch:
        report.problems.append(f"{stage}.batch_size: {c.batch_size} is more than the {train_images} training images")
    if c.max_steps:
        return f"{c.max_steps} steps of {c.batch_size} images (max_steps)"
    return f"{c.epochs * per_epoch} steps of {c.batch_size} images ({c.epochs} epochs x {per_epoch})"


def _stage_work(cfg: PipelineConfig, stage: str, counts: dict[str, int], report: DryRun) -> str:
    train, seed, val, test = (counts.get(r, 0) for r in ("train", "seed", "val", "test"))
    work = {
        "prepare_data": "check every image and mask, write the splits and class statistics",
        "infer_cams": f"{train} images x {len(cfg.infer_cams.scales)} scales + flips into the CAM store",
        "eval_cam": f"{seed} seed images",
        "make_ir_labels": f"{train} IR labels (two dense CRFs each)",
        "make_pseudo_labels": f"{train} pseudo labels ({cfg.make_pseudo_labels.method})",
        "eval_pseudo_labels": f"{seed} seed images",
        "eval_seg": f"{val} val images" + (f", {test} test images exported" if test else ""),
    }
    return work.get(stage) or _steps(cfg, stage, train, report)


def _store_estimate(cfg: PipelineConfig, ids: list[str], labels: dict[str, np.ndarray], report: DryRun) -> None:
    """The CAM store's raw float16 size (P and K of background + each image's classes at full resolution) from
    the sizes of up to SIZE_SAMPLE images, and the free space where the run directory lives."""
    sample = [ids[k] for k in np.linspace(0, len(ids) - 1, min(SIZE_SAMPLE, len(ids))).astype(int)]
    per_image = []
    for image_id in sample:
        if image_id not in labels:
            continue
        try:
            height, width = image_size(fs.join(cfg.prepare_data.root, "JPEGImages", f"{image_id}.jpg"))
        except BadImageError:
            continue
        per_image.append(2 * (1 + int(labels[image_id].sum())) * height * width * 2)
    if not per_image:
        return
    raw = report.store_bytes = float(np.mean(per_image)) * len(ids)
    line = (f"CAM store: {store_url(cfg.run_context())}: about {_size(raw * STORE_RATIO)} "
            f"({_size(raw)} of float16 before compression; from the sizes of {len(per_image)} images)")
    if fs.is_local(cfg.run.root):
        existing = Path(cfg.run.root.removeprefix("file://")).resolve()
        while not existing.exists():
            existing = existing.parent
        free = shutil.disk_usage(existing).free
        line += f"; {_size(free)} free at {existing}"
        if free < raw * STORE_RATIO:
            report.problems.append(f"run.root: {_size(free)} free at {existing}, the CAM store needs about "
                                   f"{_size(raw * STORE_RATIO)}")
    report.lines.append(line)


def _size(num_bytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if num_bytes >= scale:
            return f"{num_bytes / scale:.1f} {unit}"
    return f"{num_bytes / 1e3:.1f} kB"


def dry_run(cfg: PipelineConfig, stages: Sequence[str] | None = None, start: str | None = None) -> DryRun:
    """Check the data folder, the weights files and the device; describe the stages the run would execute."""
    from flows.runs import run_status

    report = DryRun([f"dry run of {cfg.run.name} in {cfg.run_dir} (config {cfg.digest()}): nothing is run"])
    try:
        selected, enabled = _selected(cfg, stages, start), _selected(cfg, None, None)
    except ValueError as err:
        report.problems.append(str(err))
        return report
    cuda = torch.cuda.is_available()
    report.lines.append(f"device: {cfg.run.device}" + (f" (CUDA {'available' if cuda else 'not available'})"))
    if cfg.run.device.startswith("cuda") and not cuda:
        report.problems.append(f"run.device: {cfg.run.device} requested, but torch sees no CUDA device")
    class_names, found = _check_data(cfg, report)
    counts = {role: len(ids) for role, (ids, _) in found.items()}
    _check_weights(cfg, selected, len(class_names) - 1, report)
    states = {s.name: s.state for s in run_status(cfg)} if fs.exists(cfg.run_dir) else {}
    report.lines.append("stages:")
    for name in STAGE_NAMES:
        if name not in selected:
            what = "not run" if name in enabled else "not run (disabled by this configuration)"
        elif states.get(name) == "done":
            what = "done: taken from the cache"
        else:
            what = _stage_work(cfg, name, counts, report)
        report.lines.append(f"  {name:<20} {what}")
    if "infer_cams" in selected and found.get("train", ([], {}))[0]:
        _store_estimate(cfg, *found["train"], report)
    report.lines.extend(expected_figures(cfg))
    return report
