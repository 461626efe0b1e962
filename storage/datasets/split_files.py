"""A validated split written by the prepare_data stage (ids, labels, file URLs) and read by every later stage."""
from __future__ import annotations

import json

import numpy as np

from storage import fs
from storage.datasets.voc_layout import Split
from storage.errors import DataError


def save_split(url: str, split: Split) -> None:
    payload = {
        "root": split.root,
        "name": split.name,
        "class_names": list(split.class_names),
        "ids": split.ids,
        "labels": [np.flatnonzero(row).tolist() for row in split.labels],
        "mask_urls": split.mask_urls,
    }
    fs.write_text(url, json.dumps(payload))


def load_split_file(url: str) -> Split:
    if not fs.exists(url):
        raise DataError(f"split file {url} not found (run the prepare_data stage first)")
    try:
        data = json.loads(fs.read_text(url))
        labels = np.zeros((len(data["ids"]), len(data["class_names"]) - 1), dtype=np.float32)
        for row, classes in enumerate(data["labels"]):
            labels[row, classes] = 1
        return Split(data["root"], data["name"], tuple(data["class_names"]), data["ids"], labels, data["mask_urls"])
    except (KeyError, ValueError, IndexError) as err:
        raise DataError(f"{url}: not a valid split file ({err})") from err


def load_split_with_masks(url: str, purpose: str) -> Split:
    """A split file whose images all have ground-truth masks; ``purpose`` names what needs them in the error."""
    split = load_split_file(url)
    if not split.has_masks:
        raise DataError(f"{purpose} needs masks; split {split.name!r} ({url}) has images without")
    return split
