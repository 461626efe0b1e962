"""Process-pool fan-out for CPU-heavy per-image work (CRF, label writing), with a progress bar."""
from __future__ import annotations

import multiprocessing
import os
import sys
import types
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

from tqdm import tqdm

T = TypeVar("T")
R = TypeVar("R")


def default_workers() -> int:
    """One worker per available core."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def _main_hidden() -> Iterator[None]:
    """Hide the parent's ``__main__`` while workers start: CPython's forkserver/spawn children re-run the parent's
    main script (a ``sfc`` CLI or a benchmark importing prefect, torch, mlflow: seconds per worker), although they
    only need the modules that unpickling ``fn`` imports."""
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


def parallel_map(fn: Callable[[T], R], items: Sequence[T], workers: int | None = None, desc: str = "",
                 chunksize: int = 4) -> Iterator[R]:
    """Yield ``fn(item)`` for every item, in order, computed by ``workers`` processes (in-process when <= 1).

    ``fn`` must be picklable from a module other than ``__main__`` (a module-level function, a ``functools.partial``
    of one, or an instance of a module-level class), since workers do not run the main script. Workers start with
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
            with _main_hidden():  # workers are started by the submissions inside map()
                results = pool.map(fn, items, chunksize=max(1, chunksize))
            for result in results:
                yield result
                progress.update()
