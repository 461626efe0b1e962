"""Plumbing shared by the stages that write one label PNG per image from the CAM store (IR labels, pseudo labels):
input checks, resume, per-image loading in worker processes, atomic PNG writing, label statistics."""
from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable, Sequence
from functools import lru_cache

import numpy as np

from storage import fs
from storage.cam_store import CamStore, CamStoreError
from storage.datasets.split_files import load_split_file
from storage.datasets.voc_layout import Split
from storage.errors import DataError, UserError
from storage.images import IGNORE_INDEX, read_rgb, write_mask
from tasks.engine.parallel import parallel_map
from tasks.engine.shards import merge_counts, shard_items

log = logging.getLogger(__name__)

LABEL_KINDS = ("background", "foreground", "ignore")

TMP_MARK = ".png.tmp-"  # fs.atomic_open's temporary siblings of <id>.png
SETTINGS = "_settings.json"


class LabelDirError(UserError, ValueError):
    """A label directory that already holds labels made with other settings."""


def open_inputs(store_url: str, split_url: str) -> tuple[CamStore, Split]:
    """The split and its CAM store, checked to belong together: same class names, CAMs for every listed image."""
    split = load_split_file(split_url)
    store = CamStore.open(store_url)
    if store.class_names != list(split.class_names):
        raise CamStoreError(f"CAM store {store_url} holds classes {store.class_names[:4]}... "
                            f"({len(store.class_names)}), split {split.name!r} ({split_url}) has "
                            f"{list(split.class_names[:4])}... ({len(split.class_names)}): another dataset?")
    done = store.completed_ids()
    missing = [image_id for image_id in split.ids if image_id not in done]
    if missing:
        raise CamStoreError(f"CAM store {store_url} has no complete CAMs for {len(missing)} image(s) of split "
                            f"{split.name!r}: {', '.join(missing[:5])}{' ...' if len(missing) > 5 else ''} "
                            "(run CAM inference on this split first)")
    return store, split


def claim_out_dir(out_dir: str, settings: dict) -> str:
    """Record in ``<out_dir>/_settings.json`` what the labels are made from (stage config, CAM store hashes, ...),
    or check that a resumed run uses the same; labels of different settings never mix in one directory. Returns a
    short digest of the settings (for manifests)."""
    url = fs.join(out_dir, SETTINGS)
    wanted = json.loads(json.dumps(settings))
    if fs.exists(url):
        found = json.loads(fs.read_text(url))
        if found != wanted:
            changed = sorted(k for k in set(found) | set(wanted) if found.get(k) != wanted.get(k))
            raise LabelDirError(f"{out_dir} holds labels made with other settings (see {url}; differing: "
                                f"{', '.join(changed)}); write to another directory or delete this one")
    else:
        fs.write_text(url, json.dumps(wanted, indent=2, sort_keys=True))
    return hashlib.sha256(json.dumps(wanted, sort_keys=True).encode()).hexdigest()[:16]


def label_url(out_dir: str, image_id: str) -> str:
    return fs.join(out_dir, f"{image_id}.png")


def pending_ids(out_dir: str, ids: Sequence[str]) -> list[str]:
    """The ids without ``<out_dir>/<id>.png`` yet (writes are atomic: an existing PNG is complete). Temporary
    files a killed run left for these ids are removed (other shards' files in progress are not touched)."""
    if not fs.isdir(out_dir):
        return list(ids)
    names = fs.listdir(out_dir)
    mine = set(ids)
    leftovers = [name for name in names if TMP_MARK in name and name.split(".png", 1)[0] in mine]
    for name in leftovers:
        fs.remove(fs.join(out_dir, name))
    if leftovers:
        log.info("removed %d temporary files of an interrupted run from %s", len(leftovers), out_dir)
    present = set(names)
    return [image_id for image_id in ids if f"{image_id}.png" not in present]


@lru_cache(maxsize=2)
def _store(url: str) -> CamStore:
    """One open store per worker process."""
    return CamStore.open(url)


def load_image_and_cams(store_url: str, image_id: str,
                        image_url: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(RGB uint8 (H, W, 3), keys, P, K) of one image; an image whose size differs from its CAMs is an error."""
    keys, proto_cam, cam = _store(store_url).load(image_id)
    image = read_rgb(image_url)
    if image.shape[:2] != cam.shape[1:]:
        raise DataError(f"image {image_id!r} ({image_url}) is {image.shape[0]}x{image.shape[1]} but its CAMs in "
                        f"{store_url} are {cam.shape[1]}x{cam.shape[2]}: the store belongs to other images")
    return image, keys, proto_cam, cam


def write_labels(out_dir: str, image_id: str, labels: np.ndarray) -> np.ndarray:
    """Write ``<out_dir>/<id>.png`` atomically; return the pixel counts (background, foreground, ignore)."""
    write_mask(label_url(out_dir, image_id), labels)
    background = int((labels == 0).sum())
    ignore = int((labels == IGNORE_INDEX).sum())
    return np.array([background, labels.size - background - ignore, ignore], dtype=np.int64)


def write_all(job: Callable[[tuple[str, str]], np.ndarray], split: Split, out_dir: str, workers: int | None,
              desc: str, shard: str | None = None) -> dict:
    """Run ``job((image_id, image_url))`` for every image of ``split`` (or of its ``shard`` 'i/n') not written
    yet; return counts, timing and the pixel counts and fractions of the labels written by this call."""
    ids = shard_items(split.ids, shard)
    todo = pending_ids(out_dir, ids)
    log.info("%s: %d images, %d already written in %s", desc, len(ids), len(ids) - len(todo), out_dir)
    started = time.perf_counter()
    counts = np.zeros(3, dtype=np.int64)
    for image_counts in parallel_map(job, [(i, split.image_url(i)) for i in todo], workers, desc):
        counts += image_counts
    seconds = time.perf_counter() - started
    pixels = dict(zip(LABEL_KINDS, counts.tolist()))
    return {
        "out_dir": out_dir, "split": split.name, "images": len(ids), "written": len(todo),
        "skipped": len(ids) - len(todo), "seconds": seconds,
        "images_per_second": len(todo) / seconds if todo and seconds > 0 else None,
        "pixel_counts": pixels, "label_fractions": _fractions(pixels),
    }


def _fractions(pixels: dict[str, int]) -> dict[str, float]:
    total = max(1, sum(pixels.values()))
    return {kind: pixels[kind] / total for kind in LABEL_KINDS}


def merge_label_manifests(manifests: list[dict]) -> dict:
    """The stage manifest of labels written by several shards."""
    merged = merge_counts(manifests, ("images", "written", "skipped"), ("out_dir", "split"))
    pixels = {kind: sum(m["pixel_counts"][kind] for m in manifests) for kind in LABEL_KINDS}
    extra = {k: v for k, v in manifests[0].items() if k not in merged and k not in ("pixel_counts", "label_fractions")}
    return {**extra, **merged, "pixel_counts": pixels, "label_fractions": _fractions(pixels)}
