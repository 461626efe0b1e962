"""The process-pool fan-out returns in-order results and surfaces worker errors."""
import functools
import sys
import types

import pytest

from tasks.engine.parallel import parallel_map


def _scaled(factor: int, value: int) -> int:
    if value < 0:
        raise ValueError(f"negative value {value}")
    return factor * value


@pytest.mark.parametrize("workers", [1, 2])
def test_parallel_map_keeps_order(workers):
    assert list(parallel_map(functools.partial(_scaled, 3), list(range(10)), workers)) == [3 * v for v in range(10)]


def test_parallel_map_reraises_worker_errors():
    with pytest.raises(ValueError, match="negative value -1"):
        list(parallel_map(functools.partial(_scaled, 1), [1, 2, -1, 3], workers=2, chunksize=1))


def test_workers_do_not_run_the_main_script(tmp_path, monkeypatch):
    script = tmp_path / "main_script.py"
    script.write_text("raise SystemExit('a worker ran the main script')\n")
    main = types.ModuleType("__main__")
    main.__file__ = str(script)
    monkeypatch.setitem(sys.modules, "__main__", main)
    assert list(parallel_map(functools.partial(_scaled, 2), [1, 2, 3], workers=2, chunksize=1)) == [2, 4, 6]
