"""The pipeline configuration: one typed object composed of the stages' own sections, loaded from YAML and
overridden by dotted ``key.sub=value`` arguments. Invalid configurations fail before any work starts."""
from __future__ import annotations

import hashlib
import logging
import re
import textwrap
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import to_jsonable_python

from storage import fs
from storage.errors import ConfigError
from tasks.eval_cam import EvalCamConfig
from tasks.eval_seg import EvalSegConfig
from tasks.infer_cams import InferCamsConfig
from tasks.make_ir_labels import MakeIrLabelsConfig
from tasks.make_pseudo_labels import MakePseudoLabelsConfig
from tasks.prepare_data import PrepareDataConfig
from tasks.runtime.context import RunContext
from tasks.train_cam import TrainCamConfig
from tasks.train_irn import TrainIrnConfig
from tasks.train_seg import TrainSegConfig

log = logging.getLogger(__name__)

# Section names of earlier releases -> the stage's name; configs and run directories written with them still load.
RENAMED_SECTIONS = {"data": "prepare_data", "ir_labels": "make_ir_labels", "pseudo_labels": "make_pseudo_labels"}

_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class RunConfig(BaseModel):
    """Where the run lives, its seed and device, and how its tasks are scheduled."""

    model_config = ConfigDict(extra="forbid")
    name: str = Field("demo", description="the run's directory under root and its MLflow run name")
    root: str = Field("runs", description="folder (path or fsspec URL) holding one directory per run")
    seed: int = Field(10, description="seed of every random choice: initialisation, data order, augmentation")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps")
    retries: int = Field(1, ge=0, description="Prefect retries of a stage after a transient I/O error")
    retry_delay_s: float = Field(10.0, ge=0, description="seconds between such retries")
    shards: int = Field(1, ge=1, description="per-image stages (CAM inference, IR labels, pseudo labels, the three "
                        "evaluations) fan out as this many mapped Prefect tasks")
    task_runner: Literal["threads", "dask"] = Field(
        "threads", description="where mapped shard tasks run: threads of the flow process, or a Dask cluster")
    dask_address: str | None = Field(None, description="scheduler of an existing Dask cluster (tcp://host:8786); "
                                     "null: a local cluster started for the run")
    dask_workers: int = Field(2, ge=1, description="worker processes of the local Dask cluster")
    verify_outputs: bool = Field(
        True, description="record content hashes of every stage's outputs and check them before a finished stage "
        "is trusted (reads all outputs back once; false: only check that they exist)")

    @field_validator("name")
    @classmethod
    def _name(cls, name: str) -> str:
        if not _RUN_NAME.match(name):
            raise ValueError(f"run name {name!r} may only hold letters, digits, '_', '.', '-'")
        return name

    @field_validator("device")
    @classmethod
    def _device(cls, device: str) -> str:
        if not _DEVICE.match(device):
            raise ValueError(f"device {device!r}; allowed: auto, cpu, cuda, cuda:N, mps")
        return device


class TrackingConfig(BaseModel):
    """MLflow: where runs are recorded and what is logged with them."""

    model_config = ConfigDict(extra="forbid")
    uri: str | None = Field(None, description="MLflow tracking URI; default: SQLite store in the runs folder")
    experiment: str = Field("sfc", description="MLflow experiment of the runs (tagged as a model-training one)")
    log_models: bool = Field(
        True, description="log the trained CAM network and segmenter as MLflow models (PyTorch flavour, loadable "
        "with mlflow.pytorch.load_model) and the IRN's final weights as an artifact")
    register_as: str | None = Field(
        None, description="also register the segmenter in MLflow's model registry under this name (the CAM "
        "network as <name>-cam); null: no registration")
    ceiling_val_miou: float | None = Field(
        None, gt=0, le=1, description="val mIoU of the same segmenter trained on ground-truth masks "
        "(bench/ceiling.py); the parent run then carries ceiling_ratio = seg_val_miou / this")
    ceiling_val_miou_crf: float | None = Field(
        None, gt=0, le=1, description="the same with CRF; gives ceiling_ratio_crf")


class PipelineConfig(BaseModel):
    """The whole pipeline: one section per stage that has settings, plus run and tracking."""

    model_config = ConfigDict(extra="forbid")
    run: RunConfig = RunConfig()
    tracking: TrackingConfig = TrackingConfig()
    prepare_data: PrepareDataConfig
    train_cam: TrainCamConfig = TrainCamConfig()
    infer_cams: InferCamsConfig = InferCamsConfig()
    eval_cam: EvalCamConfig = EvalCamConfig()
    make_ir_labels: MakeIrLabelsConfig = MakeIrLabelsConfig()
    train_irn: TrainIrnConfig = TrainIrnConfig()
    make_pseudo_labels: MakePseudoLabelsConfig = MakePseudoLabelsConfig()
    train_seg: TrainSegConfig = TrainSegConfig()
    eval_seg: EvalSegConfig = EvalSegConfig()

    @model_validator(mode="before")
    @classmethod
    def _renamed_sections(cls, tree: Any) -> Any:
        return rename_sections(tree) if isinstance(tree, dict) else tree

    @property
    def run_dir(self) -> str:
        return fs.join(self.run.root, self.run.name)

    @property
    def cache_dir(self) -> str:
        return fs.join(self.run.root, "_cache")

    def run_context(self) -> RunContext:
        """What the stages know of the run beside their own section."""
        return RunContext(self.run_dir, self.cache_dir, self.run.seed, self.run.device)

    @property
    def local_dir(self) -> Path:
        """A local folder for what must stay on local disk (MLflow store, Prefect cache records) when the runs
        folder is remote: the runs folder itself when it is local."""
        return _local_root(self.run.root)

    def tracking_uri(self) -> str:
        return self.tracking.uri or default_tracking_uri(self.run.root)

    def artifact_root(self) -> str:
        return (_local_root(self.run.root) / "mlartifacts").as_uri()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)

    def to_explained_yaml(self) -> str:
        """The resolved YAML with each section's docstring and each field's description as comments above it,
        and the default where the value differs (detectron2's commented defaults). Loads back to the same config."""
        return "".join(_explained(self, 0))

    def digest(self) -> str:
        return hashlib.sha256(self.model_dump_json().encode()).hexdigest()[:16]

    def parent_run_tags(self) -> dict[str, str]:
        """The tags that identify the run's MLflow parent run (a changed configuration gets a new one)."""
        return {"run_dir": self.run_dir, "config_digest": self.digest(), "sfc.kind": "pipeline"}


_COMMENT_WIDTH = 116


def _comment(text: str, indent: int) -> list[str]:
    pad = " " * indent
    return [f"{pad}# {line}\n" for line in textwrap.wrap(" ".join(text.split()), _COMMENT_WIDTH - indent)]


def _scalar(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True, width=10**6).removesuffix("\n...\n").strip()


def _explained(section: BaseModel, indent: int) -> list[str]:
    lines, pad = [], " " * indent
    for name, field in type(section).model_fields.items():
        value = getattr(section, name)
        if isinstance(value, BaseModel):
            doc = (type(value).__doc__ or "").strip().split("\n\n")[0]
            lines += [*_comment(doc, indent), f"{pad}{name}:\n", *_explained(value, indent + 2)]
            continue
        dumped = section.model_dump(mode="json", include={name})[name]
        lines += _comment(field.description or "", indent)
        if not field.is_required() and (default := to_jsonable_python(field.get_default(
                call_default_factory=True))) != dumped:
            lines += _comment(f"default: {_scalar(default)}", indent)
        lines.append(f"{pad}{name}: {_scalar(dumped)}\n")
    return lines


def section_name(name: str) -> str:
    """The current name of a config section: a section of an earlier release under its stage's name, with a
    deprecation warning."""
    if name not in RENAMED_SECTIONS:
        return name
    log.warning("config section %r is deprecated; call it %r (the name of its stage)", name, RENAMED_SECTIONS[name])
    return RENAMED_SECTIONS[name]


def rename_sections(tree: dict) -> dict:
    """``tree`` with the sections of earlier releases under their stage's name (see :func:`section_name`); a
    section given under both names is an error."""
    renamed: dict = {}
    for name, section in tree.items():
        current = section_name(name)
        if current in renamed or (current != name and current in tree):
            raise ConfigError(f"sections {name!r} and {current!r} are the same; keep only {current!r}")
        renamed[current] = section
    return renamed


def default_tracking_uri(root: str) -> str:
    """The MLflow store of a runs folder: SQLite next to the run directories."""
    return f"sqlite:///{_local_root(root) / 'mlflow.db'}"


def _local_root(root: str) -> Path:
    """The runs folder on local disk (MLflow's default store and artifacts live there)."""
    if not fs.is_local(root):
        return Path("runs").resolve()
    path = Path(root.removeprefix("file://")).resolve()
    path.mkdir(parents=True, exist_ok=True)
    return path


def apply_override(tree: dict, assignment: str) -> None:
    """Apply one ``a.b.c=value`` override; the value is parsed as YAML (numbers, booleans, lists, null)."""
    key, sep, value = assignment.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {assignment!r} must look like section.key=value")
    *parents, leaf = key.split(".")
    if parents:
        parents[0] = section_name(parents[0])
    node = tree
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {assignment!r}: {part!r} is not a section")
        node = child
    node[leaf] = yaml.safe_load(value) if value else ""


def _allowed_keys(loc: tuple) -> list[str]:
    model: Any = PipelineConfig
    for part in loc:
        field = getattr(model, "model_fields", {}).get(part)
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return sorted(model.model_fields)


def format_validation_error(err: ValidationError) -> str:
    lines = []
    for problem in err.errors():
        loc = tuple(str(p) for p in problem["loc"])
        key = ".".join(loc) or "<root>"
        if problem["type"] == "extra_forbidden":
            allowed = ", ".join(_allowed_keys(loc[:-1]))
            lines.append(f"{key}: unknown key; allowed keys here: {allowed}")
        else:
            msg = problem["msg"].removeprefix("Value error, ")
            lines.append(f"{key}: {msg} (got {problem.get('input')!r})")
    return "invalid configuration:\n  " + "\n  ".join(lines)


def load_config(path: str | None = None, overrides: list[str] | tuple[str, ...] = ()) -> PipelineConfig:
    """Load a YAML config (path or URL), apply dotted overrides, validate."""
    tree: dict = {}
    if path:
        try:
            tree = yaml.safe_load(fs.read_text(path)) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} not found") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"config file {path} must hold a mapping of sections")
        try:
            tree = rename_sections(tree)
        except ConfigError as err:
            raise ConfigError(f"config file {path}: {err}") from None
    for assignment in overrides:
        apply_override(tree, assignment)
    try:
        return PipelineConfig.model_validate(tree)
    except ValidationError as err:
        raise ConfigError(format_validation_error(err)) from None
