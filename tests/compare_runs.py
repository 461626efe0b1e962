"""Assertions that two runs wrote the same outputs (CAM stores, label PNG folders)."""
import numpy as np

from storage import fs
from storage.cam_store import CamStore


def assert_same_cam_stores(url: str, other: str) -> None:
    """Both stores hold the same images with identical keys, P and K."""
    ours, theirs = CamStore.open(url), CamStore.open(other)
    assert sorted(ours.ids()) == sorted(theirs.ids()) and len(theirs.ids()) > 0
    for image_id in theirs.ids():
        for a, b in zip(ours.load(image_id), theirs.load(image_id)):
            np.testing.assert_array_equal(a, b)


def assert_same_label_pngs(folder: str, other: str) -> None:
    """Both folders hold the same label PNGs, byte for byte."""
    names = sorted(n for n in fs.listdir(other) if n.endswith(".png"))
    assert names and names == sorted(n for n in fs.listdir(folder) if n.endswith(".png"))
    for name in names:
        assert fs.read_bytes(f"{folder}/{name}") == fs.read_bytes(f"{other}/{name}"), name
