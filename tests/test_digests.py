"""Content hashes of outputs: the units they are taken over, and finding the damaged ones."""
import numpy as np
import pytest

from storage import fs
from storage.cam_store import CamStore
from storage.digests import combined_digest, content_digests, damaged_units, file_digest

CLASSES = ["background", "aeroplane", "bicycle"]


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    return str(tmp_path) if request.param == "local" else f"memory://digests-{tmp_path.name}"


def _store(root: str) -> str:
    url = fs.join(root, "cams.zarr")
    store = CamStore.create(url, "cfg", "ckpt", CLASSES)
    planes = np.random.default_rng(0).random((2, 8, 10)).astype(np.float32)
    for image_id in ("a", "b"):
        store.write(image_id, np.array([0, 1]), planes, planes)
    return url


def _flip_a_byte(url: str) -> None:
    data = bytearray(fs.read_bytes(url))
    data[len(data) // 2] ^= 0xFF
    fs.write_bytes(url, bytes(data))


def test_a_zarr_store_is_hashed_per_image_and_a_damaged_chunk_names_its_image(root):
    url = _store(root)
    digests = content_digests([url])
    assert sorted(digests) == [url, f"{url}/a", f"{url}/b"]
    assert damaged_units(digests) == []
    chunk = next(f"{url}/b/{p}" for p in fs.find(f"{url}/b") if p.startswith("c/"))
    _flip_a_byte(chunk)
    assert damaged_units(digests) == [f"{url}/b"]


def test_damaged_store_metadata_names_the_whole_store(root):
    url = _store(root)
    digests = content_digests([url])
    fs.write_text(f"{url}/zarr.json", "{}")
    assert damaged_units(digests) == [url]


def test_files_and_folders_are_hashed_per_file_and_missing_ones_count_as_damaged(root):
    labels, weights = fs.join(root, "labels"), fs.join(root, "final.pt")
    for name in ("x.png", "y.png"):
        fs.write_bytes(f"{labels}/{name}", name.encode())
    fs.write_bytes(weights, b"weights")
    digests = content_digests([labels, weights, fs.join(root, "never-written.json")])
    assert sorted(digests) == [weights, f"{labels}/x.png", f"{labels}/y.png"]
    assert digests[weights] == file_digest(weights)
    fs.remove(f"{labels}/x.png")
    fs.write_bytes(weights, b"other weights")
    assert sorted(damaged_units(digests)) == [weights, f"{labels}/x.png"]


def test_combined_digest_follows_content_and_location():
    one = {"run/a.png": "1", "run/b.png": "2"}
    assert combined_digest(one) == combined_digest(dict(reversed(one.items())))
    assert combined_digest(one) != combined_digest({**one, "run/b.png": "3"})
    assert combined_digest(one) != combined_digest({"other/a.png": "1", "other/b.png": "2"})


def test_a_unit_gone_while_it_was_recorded_counts_as_damaged(root):
    url = fs.join(root, "labels")
    fs.write_bytes(fs.join(url, "a.png"), b"a")
    digests = {**content_digests([url]), fs.join(url, "b.png"): None}  # b vanished between listing and hashing
    assert damaged_units(digests) == [fs.join(url, "b.png")]
