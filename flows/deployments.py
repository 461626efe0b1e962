"""Static checks of the Prefect deployments in ``prefect.yaml``, without a Prefect server.

Each problem is returned as a sentence naming the deployment and the offending value, so that a broken deployment
is found by ``tests/test_deployment.py`` (and before ``bench/deployment_check.py`` starts a server), not by a
flow run that crashes in a worker.
"""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import yaml

from flows.stages import STAGE_NAMES
from storage.errors import ConfigError

PULL_STEP = "prefect.deployments.steps.set_working_directory"


def load_prefect_yaml(path: Path) -> dict[str, Any]:
    """The parsed project file (YAML anchors resolved); a ``ValueError`` if it is not a mapping."""
    tree = yaml.safe_load(path.read_text())
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} is not a YAML mapping")
    return tree


def _flow_parameters(entrypoint: str, project_dir: Path) -> tuple[set[str] | None, list[str]]:
    """The parameter names of the flow an entrypoint (``path.py:function``) names, loaded as a worker would."""
    from prefect.flows import load_flow_from_entrypoint

    path, _, function = entrypoint.rpartition(":")
    if not path or not function:
        return None, [f"entrypoint {entrypoint!r} is not of the form path/to/file.py:function"]
    if not (project_dir / path).is_file():
        return None, [f"entrypoint file {path} does not exist in {project_dir}"]
    try:
        flow = load_flow_from_entrypoint(f"{project_dir / path}:{function}", use_placeholder_flow=False)
    except Exception as err:
        return None, [f"entrypoint {entrypoint!r} does not load: {type(err).__name__}: {err}"]
    return set(inspect.signature(flow.fn).parameters), []


def _stage_problems(parameters: dict[str, Any]) -> list[str]:
    stages, start = parameters.get("stages"), parameters.get("start")
    problems = []
    if stages is not None:
        if not isinstance(stages, list) or not stages:
            problems.append(f"stages must be a non-empty list of stage names (got {stages!r})")
        else:
            problems += [f"unknown stage {name!r} in stages; stages: {', '.join(STAGE_NAMES)}"
                         for name in stages if name not in STAGE_NAMES]
    if start is not None and start not in STAGE_NAMES:
        problems.append(f"unknown start stage {start!r}; stages: {', '.join(STAGE_NAMES)}")
    if stages and start:
        problems.append("give either stages or start, not both")
    return problems


def _pull_problems(steps: Any) -> list[str]:
    if not steps:
        return ["no pull steps: add a set_working_directory step to the project directory"]
    if not any(isinstance(step, dict) and PULL_STEP in step for step in steps):
        return [f"the pull steps have no {PULL_STEP} step to the project directory"]
    return []


def check_deployment(deployment: dict[str, Any], project_dir: Path, pull: Any) -> list[str]:
    """Problems of one deployment: entrypoint, parameters, stage names, config file, work pool, pull steps."""
    problems = _pull_problems(deployment.get("pull", pull))
    if not (deployment.get("work_pool") or {}).get("name"):
        problems.append("no work_pool.name")
    entrypoint = deployment.get("entrypoint")
    accepted: set[str] | None = None
    if not entrypoint:
        problems.append("no entrypoint")
    else:
        accepted, entry_problems = _flow_parameters(entrypoint, project_dir)
        problems += entry_problems
    parameters = deployment.get("parameters") or {}
    if accepted is not None:
        problems += [f"parameter {name!r} is not a parameter of {entrypoint} (it takes {', '.join(sorted(accepted))})"
                     for name in parameters if name not in accepted]
    problems += _stage_problems(parameters)
    config_path = parameters.get("config_path")
    if config_path is not None and not (project_dir / config_path).is_file():
        problems.append(f"config file {config_path} does not exist in {project_dir}")
    overrides = parameters.get("overrides")
    if overrides is not None and not (isinstance(overrides, list)
                                      and all(isinstance(o, str) and "=" in o for o in overrides)):
        problems.append(f"overrides must be a list of 'key=value' strings (got {overrides!r})")
    return problems


def check_prefect_yaml(prefect_file: Path, project_dir: Path | None = None) -> list[str]:
    """Every problem of the deployments in ``prefect_file``, each prefixed with the deployment's name; empty when
    fine. Entrypoints and config paths are relative to ``project_dir`` (by default the file's folder)."""
    project_dir = project_dir or prefect_file.parent
    try:
        tree = load_prefect_yaml(prefect_file)
    except (OSError, ValueError, yaml.YAMLError) as err:
        return [f"{prefect_file}: {err}"]
    deployments = tree.get("deployments")
    if not isinstance(deployments, list) or not deployments:
        return [f"{prefect_file}: no deployments"]
    problems = []
    names = [d.get("name") for d in deployments]
    problems += [f"deployment name {name!r} is used more than once" for name in sorted(set(names), key=str)
                 if names.count(name) > 1]
    for index, deployment in enumerate(deployments):
        label = deployment.get("name") or f"deployments[{index}]"
        problems += [f"deployment {label}: {p}" for p in check_deployment(deployment, project_dir, tree.get("pull"))]
    return problems
