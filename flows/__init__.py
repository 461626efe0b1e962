"""Pipeline flow, configuration and CLI.

Importing this package fixes the environment defaults Prefect and MLflow read at import time: a project-local
Prefect home, no telemetry (there is no network). Explicit environment settings win.
"""
import os
from pathlib import Path

os.environ.setdefault("PREFECT_HOME", str(Path.cwd() / ".prefect"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
