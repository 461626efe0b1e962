"""Test isolation: a private Prefect home and no telemetry, set before prefect or mlflow are imported."""
import os
import tempfile

_HOME = tempfile.mkdtemp(prefix="sfc-prefect-")
os.environ["PREFECT_HOME"] = _HOME
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ["PREFECT_LOGGING_TO_API_ENABLED"] = "false"
os.environ["MLFLOW_DISABLE_TELEMETRY"] = "true"
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")  # a loaded machine starts it slowly

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_flush_denormal(True)

# Fixtures that start a Prefect server or run a whole flow: every test using one is in the slow tier.
SLOW_FIXTURES = {"prefect_harness", "finished_run"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark the tests that need a Prefect server or a flow as ``slow`` (``make test-fast`` leaves them out)."""
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def prefect_harness():
    """A temporary Prefect server for tests that run flows."""
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=180):  # slow to start on a loaded 2-core machine
        yield


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory, prefect_harness):
    """The tiny synthetic pipeline run (tests/tiny_flow.py), with IRN: (config, flow summary, overrides)."""
    from flows.config import load_config
    from flows.pipeline import sfc_pipeline
    from tests.tiny_flow import TINY

    tmp = tmp_path_factory.mktemp("flow")
    overrides = [*TINY, f"run.root={tmp / 'runs'}", f"prepare_data.root={tmp / 'data'}", "run.name=tiny"]
    cfg = load_config("configs/synthetic.yaml", overrides)
    return cfg, sfc_pipeline(cfg.model_dump(mode="json")), overrides
