"""Multi-scale + flip CAM inference of the trained network into the run's Zarr CAM store."""
from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import DataLoader
from tqdm import tqdm

from models.cam_inference import DEFAULT_SCALES, infer_to_writer, prepare_for_inference
from models.sfc import SFCNet
from storage import checkpoints, fs
from storage.cam_store import DEFAULT_COMPRESSOR, DEFAULT_MANTISSA_BITS, CamStore
from storage.datasets.cam_inference import MultiScaleSet
from storage.datasets.split_files import load_split_file
from storage.datasets.voc_layout import Split
from storage.errors import CheckpointError, DataError
from storage.tracking import Tracker
from tasks.engine.shards import merge_counts, parse_shard
from tasks.runtime.context import RunContext
from tasks.runtime.device import resolve_device
from tasks.runtime.hashing import config_hash
from tasks.runtime.manifests import Inputs
from tasks.runtime.settings import Scales

log = logging.getLogger(__name__)


class InferCamsConfig(BaseModel):
    """CAM inference (docs/method.md section 6)."""

    model_config = ConfigDict(extra="forbid")
    scales: Scales = Field(DEFAULT_SCALES, description="input scales whose CAMs (each with its flip) are summed")
    num_workers: int = Field(2, ge=0, description="DataLoader worker processes decoding and rescaling images")
    amp: bool = Field(False, description="fp16 autocast on CUDA (parity tests and CPU runs use fp32)")
    cpu_streams: int = Field(0, ge=0, description="CPU: images computed at once, each with threads/streams "
                                                  "intra-op threads; 0 = one per intra-op thread")
    compressor: str = Field(DEFAULT_COMPRESSOR, description="CAM store codec: delta-blosc-zstd (lossless delta of the "
                                                            "float16 bit patterns, then Blosc-Zstd), blosc-zstd, "
                                                            "blosc-lz4, zstd or none (bench/cam_store.py measures "
                                                            "them on trained CAMs)")
    mantissa_bits: int = Field(
        DEFAULT_MANTISSA_BITS, ge=1, le=10,
        description="float16 mantissa bits kept in the CAM store: relative error <= 2**-(bits + 1) + 2**-11 "
                    "(plus 2**(9 - bits) subnormal steps below 6.1e-5, storage.cam_store.error_bound); "
                    "10 = plain float16 (the default)")


def union_of_splits(splits: list[Split]) -> Split:
    """One split holding every image of ``splits`` once (first occurrence wins)."""
    first = splits[0]
    seen: set[str] = set()
    ids, rows, masks = [], [], {}
    for split in splits:
        if split.class_names != first.class_names:
            raise DataError(f"splits {first.name!r} and {split.name!r} have different classes")
        for row, image_id in enumerate(split.ids):
            if image_id not in seen:
                seen.add(image_id)
                ids.append(image_id)
                rows.append(split.labels[row])
        masks.update(split.mask_urls)
    return Split(first.root, "+".join(s.name for s in splits), first.class_names, ids, np.stack(rows), masks)


def load_cam_network(checkpoint_url: str, class_names: tuple[str, ...],
                     device: torch.device = torch.device("cpu")) -> tuple[SFCNet, str]:
    """The trained network of a ``final.pt``/``best.pt`` checkpoint, prepared for inference on ``device``
    (``models.cam_inference.prepare_for_inference``), and the hash of the checkpoint's bytes.

    A checkpoint for other classes or another architecture is a clear error naming the file.
    """
    state, digest = checkpoints.load_with_digest(checkpoint_url)
    meta = state.get("meta")
    if not isinstance(meta, dict) or "model" not in state:
        raise CheckpointError(f"{checkpoint_url}: not a CAM network checkpoint (no 'model' and 'meta')")
    if tuple(meta["class_names"]) != tuple(class_names):
        raise CheckpointError(f"{checkpoint_url} was trained for {len(meta['class_names']) - 1} classes "
                              f"({', '.join(meta['class_names'][1:4])}, ...), the dataset has {len(class_names) - 1}")
    model = SFCNet(len(class_names) - 1, meta["backbone"], meta["trainable_from"], meta["bg_seed_scale"],
                   meta.get("norm", "frozen"))
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as err:
        raise CheckpointError(f"{checkpoint_url} does not match a {meta['backbone']} SFC network: {err}") from None
    return prepare_for_inference(model, device), digest


def infer_cams(
    cfg: InferCamsConfig,
    checkpoint_url: str,
    split_urls: list[str],
    store_url: str,
    device: str = "auto",
    shard: str | None = None,
    tracker: Tracker | None = None,
) -> dict:
    """Write the fused P and K CAMs of every image of ``split_urls`` into the store at ``store_url``.

    Images already complete in the store are skipped (resume); ``shard='i/n'`` processes every n-th image
    starting at i, so several processes can share the work.
    """
    tracker = tracker or Tracker.null()
    index, count = parse_shard(shard)
    split = union_of_splits([load_split_file(url) for url in split_urls])
    torch_device = resolve_device(device)
    model, checkpoint_hash = load_cam_network(checkpoint_url, split.class_names, torch_device)
    cfg_hash = config_hash(cfg.model_copy(update={"num_workers": 0, "cpu_streams": 0}))
    store = CamStore.create(store_url, cfg_hash, checkpoint_hash, split.class_names, compressor=cfg.compressor,
                             mantissa_bits=cfg.mantissa_bits)
    mine = split.ids[index::count]
    done = store.completed_ids()
    todo = [i for i in mine if i not in done]
    log.info("CAM inference: %d images in shard %d/%d, %d already in the store", len(mine), index, count,
             len(mine) - len(todo))
    loader = DataLoader(MultiScaleSet(split, todo, cfg.scales), batch_size=None, num_workers=cfg.num_workers,
                        pin_memory=torch_device.type == "cuda")
    started = time.perf_counter()
    infer_to_writer(model, tqdm(loader, total=len(todo), desc="infer_cams", unit="img", dynamic_ncols=True),
                    store.write, torch_device, cfg.amp, cfg.cpu_streams or torch.get_num_threads())
    seconds = time.perf_counter() - started
    manifest = {
        "store": store_url, "images": len(mine), "written": len(todo), "shard": f"{index}/{count}",
        "config_hash": cfg_hash, "checkpoint_hash": checkpoint_hash, "seconds": seconds,
        "images_per_second": len(todo) / seconds if todo and seconds > 0 else None,
    }
    tracker.log_params({"infer_cams": cfg.model_dump(mode="json"), "checkpoint": checkpoint_url})
    tracker.log_metrics({"images": len(mine), "written": len(todo), "seconds": seconds,
                         "images_per_second": manifest["images_per_second"] or 0.0})
    return manifest


def merge_infer_manifests(manifests: list[dict]) -> dict:
    """The stage manifest of a sharded inference."""
    merged = merge_counts(manifests, ("images", "written"), ("store", "config_hash", "checkpoint_hash"))
    return {**merged, "shard": "0/1"}


def store_url(run: RunContext) -> str:
    """The run's CAM store."""
    return fs.join(run.out_dir("infer_cams"), "cams.zarr")


def arguments(cfg: InferCamsConfig, run: RunContext, inputs: Inputs) -> dict[str, Any]:
    """The stage function's keyword arguments in a pipeline run, less the tracker."""
    return {"cfg": cfg, "checkpoint_url": inputs["train_cam"]["checkpoint"],
            "split_urls": [inputs["prepare_data"]["splits"]["train"]], "store_url": store_url(run),
            "device": run.device}


infer_cams_task = task(infer_cams, name="infer_cams", cache_policy=NO_CACHE)
