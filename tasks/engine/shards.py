"""Splitting a stage's images into shards (``i/n``: every n-th image from i) that separate processes, mapped
Prefect tasks or Dask workers compute independently, and merging the shards' manifests into the stage's.

Evaluations shard through *partial states*: each shard saves what it accumulated over its images (confusion
matrices, counts, seconds, pictures such as overlays) under ``<out_dir>/shards/<name>/``; the merge adds them up
and reports once, exactly as one pass over all images would.
"""
from __future__ import annotations

import logging
import re
from collections.abc import Callable, Sequence
from typing import TypeVar

from storage import checkpoints, fs

log = logging.getLogger(__name__)

T = TypeVar("T")

_SHARD = re.compile(r"^(\d+)/(\d+)$")


def parse_shard(shard: str | None) -> tuple[int, int]:
    """'i/n' -> (i, n), with 0 <= i < n; None -> (0, 1)."""
    if shard is None:
        return 0, 1
    match = _SHARD.match(shard)
    if not match or not int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"shard must look like i/n with 0 <= i < n, got {shard!r}")
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


def empty_partial() -> dict:
    """An evaluation's accumulated state: {matrices: {name: counts tensor}, counts: {name: number},
    seconds: {name: float}, pictures: {name: PNG bytes}}."""
    return {"matrices": {}, "counts": {}, "seconds": {}, "pictures": {}}


def partial_dir(out_dir: str, name: str) -> str:
    return fs.join(out_dir, "shards", name)


def save_partial(out_dir: str, name: str, shard: str, accumulate: Callable[[], dict]) -> dict:
    """Run ``accumulate`` for one shard and save its partial state atomically; a shard whose state an interrupted
    attempt already saved is not recomputed. Returns the shard's manifest."""
    index, count = parse_shard(shard)
    url = fs.join(partial_dir(out_dir, name), f"{index}-of-{count}.pt")
    if fs.exists(url):
        log.info("%s, shard %s: finished by an earlier attempt (%s)", name, shard, url)
    else:
        checkpoints.save(url, accumulate())
    return {"partial": url, "shard": shard}


def add_partials(states: Sequence[dict]) -> dict:
    """One state from several shards': matrices and counts added, seconds the slowest shard's, pictures united."""
    total = empty_partial()
    for state in states:
        for key, value in state["matrices"].items():
            total["matrices"][key] = total["matrices"][key] + value if key in total["matrices"] else value
        for key, value in state["counts"].items():
            total["counts"][key] = total["counts"].get(key, 0) + value
        for key, value in state["seconds"].items():
            total["seconds"][key] = max(total["seconds"].get(key, 0.0), value)
        total["pictures"].update(state["pictures"])
    return total


def merge_partials(manifests: Sequence[dict], out_dir: str, name: str, report: Callable[[dict], dict]) -> dict:
    """The stage manifest of a sharded evaluation: ``report`` on the sum of the shards' partial states, which are
    removed afterwards."""
    state = add_partials([checkpoints.load(m["partial"]) for m in manifests])
    manifest = {**report(state), "shards": len(manifests)}
    fs.remove(partial_dir(out_dir, name))
    return manifest
