"""Process-pool fan-out for CPU-heavy per-image work (CRF, label writing), with a progress bar."""
from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """One worker per available core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int | None = None, desc: str = "",
                 chunksize: int = 4) -> Iterator[R]:
    """Yield ``fn(item)`` for every item, in order, computed by ``workers`` processes (in-process when <= 1).

    ``fn`` must be picklable (a module-level function or a ``functools.partial`` of one). Workers start with
    ``forkserver`` so a parent that already ran torch threads cannot deadlock them. An exception in ``fn`` is
    re-raised here, after which the pool is shut down.
    """
    workers = default_workers() if workers is None else workers
    progress = tqdm(total=len(items), desc=desc, unit="img", disable=not desc)
    with progress:
        if workers <= 1 or len(items) <= 1:
            for item in items:
                yield fn(item)
                progress.update()
            return
        context = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(max_workers=workers, mp_context=context) as pool:
            for result in pool.map(fn, items, chunksize=max(1, chunksize)):
                yield result
                progress.update()
