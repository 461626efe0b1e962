"""Content hashes of a stage's outputs, recorded when it finishes and checked before a finished stage is trusted.

Outputs are hashed in *units*, the smallest pieces a stage can redo on its own: a file; every file of a plain
directory (one label PNG); for a Zarr group (the CAM store), its own ``zarr.json`` (under the group's URL: damaged,
the whole store is redone) and each of its child nodes (one image's CAMs, over all the node's files). A damaged
unit is removed, and the stage's own resume rewrites just that piece.
"""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Iterable

from storage import fs

log = logging.getLogger(__name__)

ZARR_METADATA = "zarr.json"


def file_digest(url: str) -> str:
    """A short SHA-256 of a file's bytes, naming it when missing."""
    if not fs.exists(url):
        raise FileNotFoundError(f"{url} not found")
    return hashlib.sha256(fs.read_bytes(url)).hexdigest()[:16]


def _is_zarr_group(url: str) -> bool:
    metadata = fs.join(url, ZARR_METADATA)
    if not fs.exists(metadata):
        return False
    try:
        return json.loads(fs.read_text(metadata)).get("node_type") == "group"
    except (ValueError, UnicodeDecodeError):
        return False


def _tree_digest(url: str) -> str:
    """One digest over the names and contents of every file under the directory ``url``."""
    lines = [f"{rel}\0{file_digest(fs.join(url, rel))}" for rel in fs.find(url)]
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def unit_digest(url: str) -> str | None:
    """The digest of one unit (see the module docstring); None if it is gone."""
    if not fs.exists(url):
        return None
    if not fs.isdir(url):
        return file_digest(url)
    if _is_zarr_group(url):
        return file_digest(fs.join(url, ZARR_METADATA))
    return _tree_digest(url)


def _units(url: str) -> list[str]:
    if not fs.isdir(url):
        return [url]
    if _is_zarr_group(url):
        children = [fs.join(url, name) for name in fs.listdir(url) if name != ZARR_METADATA]
        return [url, *(unit for child in children for unit in (_units(child) if _is_zarr_group(child) else [child]))]
    return [fs.join(url, rel) for rel in fs.find(url)]


def content_digests(urls: Iterable[str]) -> dict[str, str | None]:
    """{unit URL: digest} for every unit of the given files and directories (missing ones are skipped)."""
    digests: dict[str, str | None] = {}
    for url in urls:
        if not fs.exists(url):
            log.warning("%s is named as an output but does not exist; not hashed", url)
            continue
        digests.update({unit: unit_digest(unit) for unit in _units(url)})
    return digests


def combined_digest(digests: dict[str, str | None]) -> str:
    """One digest for a whole set of units: equal when every unit's location and content are equal."""
    text = json.dumps(digests, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def damaged_units(digests: dict[str, str | None]) -> list[str]:
    """The units that are gone, that were already gone when they were recorded (digest None), or whose content no
    longer matches the recorded digest."""
    return [url for url, digest in digests.items() if digest is None or unit_digest(url) != digest]
