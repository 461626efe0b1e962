"""Splitting a stage's images into shards (``i/n``: every n-th image from i) that separate processes, mapped
Prefect tasks or Dask workers compute independently, and merging the shards' manifests into the stage's.

Evaluations shard through *partial states*: each shard saves what it accumulated over its images under
``<out_dir>/shards/<name>/`` (:mod:`tasks.engine.evaluation` merges them and reports once).
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

from storage import checkpoints, fs
from storage.errors import ConfigError

log = logging.getLogger(__name__)

T = TypeVar("T")

_SHARD = re.compile(r"^(\d+)/(\d+)$")


def parse_shard(shard: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n), with 0 <= i < n; None -> (0, 1)."""
    if shard is None:
        return 0, 1
    match = _SHARD.match(shard)
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise ConfigError(f"shard must look like i/n with 0 <= i < n, got {shard!r}")
    return int(match.group(1)), int(match.group(2))


def shard_items(items: Sequence[T], shard: str | None) -> list[T]:
    """The items of one shard: every n-th from i."""
    index, count = parse_shard(shard)
    return list(items[index::count])


def all_shards(count: int) -> list[str]:
    return [f"{i}/{count}" for i in range(count)]


def merge_counts(manifests: Sequence[dict], summed: Sequence[str], same: Sequence[str]) -> dict:
    """One manifest for the whole stage from its shards': ``summed`` keys added up, ``same`` keys taken from the
    first shard (and checked to agree), seconds the slowest shard's, throughput recomputed."""
    first = manifests[0]
    for key in same:
        values = {str(m[key]) for m in manifests}
        if len(values) > 1:
            raise ValueError(f"shards disagree on {key}: {sorted(values)}")
    merged = {key: first[key] for key in same}
    merged.update({key: sum(m[key] for m in manifests) for key in summed})
    merged["seconds"] = max(m["seconds"] for m in manifests)
    written = merged.get("written", 0)
    merged["images_per_second"] = written / merged["seconds"] if written and merged["seconds"] > 0 else None
    merged["shards"] = len(manifests)
    return merged


def partial_dir(out_dir: str, name: str) -> str:
    return fs.join(out_dir, "shards", name)


def remove_partials(out_dir: str, name: str) -> None:
    """Remove the saved partials of ``name``, and ``<out_dir>/shards/`` when nothing else is left in it."""
    fs.remove(partial_dir(out_dir, name))
    shards = fs.join(out_dir, "shards")
    if fs.isdir(shards) and not fs.listdir(shards):
        fs.remove(shards)


def save_partial(out_dir: str, name: str, shard: str, compute: Callable[[], dict]) -> dict:
    """Save what ``compute`` returns for one shard (its partial state) atomically; a shard whose state an
    interrupted attempt already saved is not recomputed. Returns the shard's manifest."""
    index, count = parse_shard(shard)
    url = fs.join(partial_dir(out_dir, name), f"{index}-of-{count}.pt")
    if fs.exists(url):
        log.info("%s, shard %s: finished by an earlier attempt (%s)", name, shard, url)
    else:
        checkpoints.save(url, compute())
    return {"partial": url, "shard": shard}


def load_partials(manifests: Sequence[dict]) -> list[dict]:
    """The partial states the shards (``manifests``: what :func:`save_partial` returned) saved."""
    return [checkpoints.load(m["partial"]) for m in manifests]
