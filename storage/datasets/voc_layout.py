"""Datasets in the PASCAL VOC 2012 directory layout (VOC itself, COCO converted for WSSS, the synthetic set).

    root/JPEGImages/<id>.jpg
    root/Annotations/<id>.xml                    (optional: image-level labels come from masks without it)
    root/SegmentationClass/<id>.png              (VOC masks, preferred where both exist)
    root/SegmentationClassAug/<id>.png           (SBD-augmented masks, optional)
    root/ImageSets/Segmentation/<split>.txt      (one id per line, or the reference's
                                                  /JPEGImages/<id>.jpg /SegmentationClassAug/<id>.png)
    root/class_names.txt                         (optional, background first)
"""
from __future__ import annotations

import json
import logging
import posixpath
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from storage import fs
from storage.datasets.catalog import CLASS_NAMES_FILE, DEFAULT_CLASSES
from storage.errors import DataError
from storage.images import IGNORE_INDEX, BadImageError, image_size, read_mask, values_outside

log = logging.getLogger(__name__)

TRAIN_AUG = "train_aug"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
MASK_FOLDERS = ("SegmentationClass", "SegmentationClassAug")  # an image's mask: the first folder holding it


def list_entry_id(line: str) -> str:
    """The image id of one split-list line: ``<id>``, or the reference's ``/JPEGImages/<id>.jpg
    /SegmentationClassAug/<id>.png`` (the first path's file name without its image extension)."""
    name = posixpath.basename(line.split()[0])
    stem, extension = posixpath.splitext(name)
    return stem if extension.lower() in IMAGE_EXTENSIONS else name


def read_id_list(url: str) -> list[str]:
    """The image ids of a split list file (one entry per line, see :func:`list_entry_id`)."""
    if not fs.exists(url):
        raise DataError(f"split list {url} not found")
    ids = [list_entry_id(line) for line in fs.read_text(url).splitlines() if line.strip()]
    if not ids:
        raise DataError(f"split list {url} is empty")
    return ids


@dataclass
class Split:
    """One split: its image ids, image-level labels (N, C) multi-hot over foreground classes, and file URLs."""

    root: str
    name: str
    class_names: tuple[str, ...]
    ids: list[str]
    labels: np.ndarray
    mask_urls: dict[str, str] = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        """Foreground classes (background excluded)."""
        return len(self.class_names) - 1

    def image_url(self, image_id: str) -> str:
        return fs.join(self.root, "JPEGImages", f"{image_id}.jpg")

    def mask_url(self, image_id: str) -> str:
        try:
            return self.mask_urls[image_id]
        except KeyError:
            raise DataError(f"split {self.name!r} has no mask for image {image_id!r} under {self.root}") from None

    @property
    def has_masks(self) -> bool:
        return bool(self.ids) and all(i in self.mask_urls for i in self.ids)

    def class_counts(self) -> np.ndarray:
        """N_c: the number of images whose label contains class c."""
        return self.labels.sum(axis=0).astype(np.int64)


class VOCLayoutDataset:
    """Reader of a VOC-layout dataset root (any fsspec URL)."""

    def __init__(self, root: str, kind: str, label_cache: str | None = None):
        if not fs.isdir(root):
            raise DataError(f"dataset root {root} does not exist or is not a directory")
        self.root = root.rstrip("/")
        self.kind = kind
        self.label_cache = label_cache
        self.class_names = self._read_class_names()
        self._index = {name: i for i, name in enumerate(self.class_names)}
        # VOC's own masks first, SBD's as the fallback: the reference scores seeds, pseudo labels and val against
        # SegmentationClass, and SBD's masks of the same images differ (docs/method.md section 8)
        self._mask_dirs = {d: self._listing(d, ".png") for d in MASK_FOLDERS}
        self._annotations = self._listing("Annotations", ".xml")

    def _read_class_names(self) -> tuple[str, ...]:
        url = fs.join(self.root, CLASS_NAMES_FILE)
        if fs.exists(url):
            names = tuple(line.strip() for line in fs.read_text(url).splitlines() if line.strip())
            if len(names) < 2 or names[0] != "background":
                raise DataError(f"{url}: must list 'background' first and at least one class")
            return names
        return DEFAULT_CLASSES[self.kind]

    def _listing(self, folder: str, suffix: str) -> set[str]:
        url = fs.join(self.root, folder)
        if not fs.isdir(url):
            return set()
        return {name[: -len(suffix)] for name in fs.listdir(url) if name.endswith(suffix)}

    def _read_list(self, split: str) -> list[str]:
        return read_id_list(fs.join(self.root, "ImageSets", "Segmentation", f"{split}.txt"))

    def split_ids(self, split: str) -> list[str]:
        """Ids of a split; ``train_aug`` is read from its list if present, else derived from what is on disk:
        SBD (SegmentationClassAug) + VOC train, minus VOC val."""
        aug_list = fs.join(self.root, "ImageSets", "Segmentation", f"{TRAIN_AUG}.txt")
        if split != TRAIN_AUG or fs.exists(aug_list):
            return self._read_list(split)
        val = set(self._read_list("val"))
        ids = sorted((self._mask_dirs["SegmentationClassAug"] | set(self._read_list("train"))) - val)
        if not ids:
            raise DataError(f"{self.root}: cannot derive train_aug (no SegmentationClassAug masks, empty train list)")
        return ids

    def mask_url(self, image_id: str) -> str | None:
        """The image's mask in the first of :data:`MASK_FOLDERS` that holds one; None without."""
        for folder, ids in self._mask_dirs.items():
            if image_id in ids:
                return fs.join(self.root, folder, f"{image_id}.png")
        return None

    def load_split(self, split: str, on_bad_data: str = "error", labels_required: bool = True) -> Split:
        """Ids, labels and mask URLs of ``split``. With ``on_bad_data='skip'`` images that are missing or have no
        label are dropped and counted in the log; with ``'error'`` the first one raises a :class:`DataError`.
        ``labels_required=False`` (a test split) keeps images without labels, with an all-zero label row."""
        ids = self.split_ids(split)
        labels, problems = self.image_labels(ids)
        if not labels_required:
            labels.update({i: np.zeros(len(self.class_names) - 1, dtype=np.float32) for i in problems})
            problems = {}
        if problems:
            first = next(iter(problems.values()))
            if on_bad_data == "error":
                raise DataError(first)
            log.warning("split %s: skipped %d bad images (first: %s)", split, len(problems), first)
        kept = [i for i in ids if i in labels]
        if not kept:
            raise DataError(f"split {split!r} of {self.root} has no usable images")
        rows = [labels[i] for i in kept]
        mask_urls = {i: url for i in kept if (url := self.mask_url(i)) is not None}
        return Split(self.root, split, self.class_names, kept, np.stack(rows).astype(np.float32), mask_urls)

    def image_labels(self, ids: Sequence[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
        """The image-level labels of ``ids`` (multi-hot rows), and {id: 'file: problem'} for those whose label
        cannot be read or is empty."""
        labels: dict[str, np.ndarray] = {}
        problems: dict[str, str] = {}
        for image_id, row in self._labels(ids).items():
            if not isinstance(row, str) and row.any():
                labels[image_id] = row
            else:
                problem = row if isinstance(row, str) else "image has no class label"
                problems[image_id] = f"{self._label_source(image_id)}: {problem}"
        return labels, problems

    def _label_source(self, image_id: str) -> str:
        if image_id in self._annotations:
            return fs.join(self.root, "Annotations", f"{image_id}.xml")
        return self.mask_url(image_id) or fs.join(self.root, "JPEGImages", f"{image_id}.jpg")

    def _labels(self, ids: Sequence[str]) -> dict[str, np.ndarray | str]:
        """Image-level labels per id (or an error string), from XML annotations, else masks; cached as JSON."""
        cached = self._read_cache()
        todo = [i for i in ids if i not in cached]
        if todo:
            with ThreadPoolExecutor(8) as pool:
                for image_id, value in zip(todo, pool.map(self._derive_label, todo)):
                    cached[image_id] = value
            self._write_cache({k: v for k, v in cached.items() if isinstance(v, list)})
        out: dict[str, np.ndarray | str] = {}
        for image_id in ids:
            value = cached[image_id]
            if isinstance(value, str):
                out[image_id] = value
            else:
                row = np.zeros(len(self.class_names) - 1, dtype=np.float32)
                row[[c - 1 for c in value]] = 1
                out[image_id] = row
        return out

    def _derive_label(self, image_id: str) -> list[int] | str:
        try:
            if image_id in self._annotations:
                return self._label_from_xml(fs.join(self.root, "Annotations", f"{image_id}.xml"))
            mask_url = self.mask_url(image_id)
            if mask_url is None:
                return "no XML annotation and no mask to derive the image-level label from"
            values = np.unique(read_mask(mask_url))
            return sorted(int(v) for v in values if 0 < v < len(self.class_names))
        except (BadImageError, DataError) as err:
            return str(err)

    def _label_from_xml(self, url: str) -> list[int]:
        try:
            tree = ET.fromstring(fs.read_bytes(url))
        except ET.ParseError as err:
            raise DataError(f"{url}: malformed XML ({err})") from err
        classes = set()
        for node in tree.iter("object"):
            name = (node.findtext("name") or "").strip()
            if name not in self._index or name == "background":
                raise DataError(f"{url}: unknown class {name!r}; known: {', '.join(self.class_names[1:])}")
            classes.add(self._index[name])
        return sorted(classes)

    def _read_cache(self) -> dict[str, list[int] | str]:
        if not self.label_cache or not fs.exists(self.label_cache):
            return {}
        data = json.loads(fs.read_text(self.label_cache))
        if data.get("root") != self.root or data.get("classes") != list(self.class_names):
            return {}
        return data["labels"]

    def _write_cache(self, labels: dict[str, list[int]]) -> None:
        if self.label_cache:
            payload = {"root": self.root, "classes": list(self.class_names), "labels": labels}
            fs.write_text(self.label_cache, json.dumps(payload))

    def validate_split_files(self, split: Split, workers: int = 8) -> dict[str, str]:
        """Check that every image decodes and every mask holds only class indices and 255.

        Returns {image id: problem} for the bad images (empty when all is well).
        """
        def check(image_id: str) -> str | None:
            try:
                image_size(split.image_url(image_id))
                if image_id in split.mask_urls:
                    mask = read_mask(split.mask_urls[image_id])
                    bad = values_outside(mask, len(self.class_names))
                    if bad:
                        return (f"{split.mask_urls[image_id]}: mask values {bad} outside the "
                                f"{len(self.class_names)} classes and {IGNORE_INDEX}")
            except BadImageError as err:
                return str(err)
            return None

        with ThreadPoolExecutor(workers) as pool:
            return {i: problem for i, problem in zip(split.ids, pool.map(check, split.ids)) if problem}
