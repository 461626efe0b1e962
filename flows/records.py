"""Run records: the files in ``<run_dir>/manifests/`` that say what each stage of a run has done.

- ``<stage>.json``: the stage finished. It holds the cache key it ran under, its manifest (what it returned, with
  ``content_hash``) and, with ``run.verify_outputs``, the content hashes of its own outputs.
- ``<stage>.started.json``: the cache key a stage is running under, kept until it finishes; what an interrupted
  stage left belongs to it.
- ``<stage>.failed.json``: the stage's last error, kept until it finishes.

This module is their only reader and writer. The identity terms (cache key, content hash, code version ...) are
explained in docs/operations.md.
"""
from __future__ import annotations

import json
import time
from collections.abc import Mapping
from typing import Any

from storage import fs
from storage.digests import combined_digest, content_digests, damaged_units


def manifest_url(run_dir: str, stage: str) -> str:
    return fs.join(run_dir, "manifests", f"{stage}.json")


def started_url(run_dir: str, stage: str) -> str:
    return fs.join(run_dir, "manifests", f"{stage}.started.json")


def failure_url(run_dir: str, stage: str) -> str:
    return fs.join(run_dir, "manifests", f"{stage}.failed.json")


def read_record(run_dir: str, stage: str) -> dict | None:
    """The stage's finished record, or None."""
    url = manifest_url(run_dir, stage)
    return json.loads(fs.read_text(url)) if fs.exists(url) else None


def read_manifest(run_dir: str, stage: str) -> dict:
    """The manifest of a finished stage; a clear error when it has not finished."""
    record = read_record(run_dir, stage)
    if record is None:
        raise FileNotFoundError(f"stage {stage!r} has not finished in {run_dir} ({manifest_url(run_dir, stage)} is "
                                f"missing): run it first or include it in the selected stages")
    return record["manifest"]


def started_key(run_dir: str, stage: str) -> str | None:
    """The cache key the stage was started under and has not finished with, or None."""
    url = started_url(run_dir, stage)
    return json.loads(fs.read_text(url))["cache_key"] if fs.exists(url) else None


def mark_started(run_dir: str, stage: str, key: str) -> None:
    fs.write_text(started_url(run_dir, stage), json.dumps({"stage": stage, "cache_key": key, "time": time.time()}))


def remove_record(run_dir: str, stage: str) -> None:
    fs.remove(manifest_url(run_dir, stage))


def write_record(run_dir: str, stage: str, key: str, manifest: dict, own_outputs: list[str] | None,
                 seconds: float | None = None) -> dict:
    """Record the stage as finished under ``key`` after ``seconds`` of work and clear its started marker. With
    ``own_outputs`` (verified runs) their content hashes are recorded and combined into the manifest's
    ``content_hash``. Returns the manifest as recorded."""
    record: dict[str, Any] = {"stage": stage, "cache_key": key, "finished": time.time(), "seconds": seconds}
    if own_outputs is not None:
        record["outputs"] = content_digests(own_outputs)
        manifest = {**manifest, "content_hash": combined_digest(record["outputs"])}
    record["manifest"] = manifest
    fs.write_text(manifest_url(run_dir, stage), json.dumps(record, indent=2, default=str))
    fs.remove(started_url(run_dir, stage))
    return manifest


def write_failure(run_dir: str, stage: str, err: BaseException) -> None:
    fs.write_text(failure_url(run_dir, stage), json.dumps({"stage": stage, "error": f"{type(err).__name__}: {err}",
                                                           "time": time.time()}, indent=2))


def read_failure(run_dir: str, stage: str) -> str | None:
    """The stage's last error, if its last attempt failed."""
    url = failure_url(run_dir, stage)
    return json.loads(fs.read_text(url))["error"] if fs.exists(url) else None


def clear_failure(run_dir: str, stage: str) -> None:
    if fs.exists(url := failure_url(run_dir, stage)):
        fs.remove(url)


def output_paths(manifest: Any, run_dir: str) -> list[str]:
    """Every location inside the run directory that a manifest names (checked before a cached result is trusted)."""
    if isinstance(manifest, Mapping):
        return [p for value in manifest.values() for p in output_paths(value, run_dir)]
    if isinstance(manifest, (list, tuple)):
        return [p for value in manifest for p in output_paths(value, run_dir)]
    if isinstance(manifest, str) and manifest.startswith(run_dir.rstrip("/") + "/"):
        return [manifest]
    return []


def damaged_outputs(record: dict, run_dir: str, verify: bool) -> list[str]:
    """A finished stage's recorded outputs that are gone or, with ``verify``, whose content changed."""
    if verify and "outputs" in record:
        return damaged_units(record["outputs"])
    return [p for p in output_paths(record["manifest"], run_dir) if not fs.exists(p)]


def input_identity(manifest: dict | None) -> Any:
    """What a stage's cache key takes from an input's manifest: its content hash and its strings (locations, names,
    ids), not its figures (counts, timings, scores), which differ between equal reruns and which the content hash
    covers. A manifest without content hash (``run.verify_outputs: false``) counts as a whole."""
    if not manifest or "content_hash" not in manifest:
        return manifest
    return {"content_hash": manifest["content_hash"], "strings": sorted(_strings(manifest))}


def _strings(value: Any, prefix: str = "") -> list[str]:
    if isinstance(value, Mapping):
        return [s for key, item in value.items() for s in _strings(item, f"{prefix}{key}.")]
    if isinstance(value, (list, tuple)):
        return [s for i, item in enumerate(value) for s in _strings(item, f"{prefix}{i}.")]
    return [f"{prefix}{value}"] if isinstance(value, str) else []
