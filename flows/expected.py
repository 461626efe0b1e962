"""The figures the docs state for each shipped configuration, which the dry run prints for a run of that dataset:
as expected when the run's settings are the shipped ones, with the settings that differ otherwise."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from flows.config import PipelineConfig, load_config
from storage.tracking import flatten

ROOT = Path(__file__).resolve().parents[1]
# Settings that say where a run lives and reads from and how it is scheduled, not what it computes
NEUTRAL_SECTIONS = ("tracking.",)
NEUTRAL_FIELDS = ("run.root", "run.name", "run.device", "prepare_data.root")
NEUTRAL_LEAVES = ("weights", "num_workers", "workers", "checkpoint_every", "keep_checkpoints", "log_every")
SHOWN = 5


@dataclass(frozen=True)
class Expected:
    config: str  # the shipped configuration, relative to the repository
    doc: str  # where the figures are stated, with how they were obtained
    figures: str


EXPECTED = (
    Expected("configs/synthetic.yaml", "README.md, docs/demo.md",
             "CAM seeds 63-64 mIoU, pseudo labels 75.5-77.5, segmentation val 73-75.5 (77.5-80 with CRF), test "
             "73-76 (measured; runs on different CPUs differ by up to 2 points, reruns on one machine are identical)"),
    Expected("configs/voc.yaml", "docs/reproduce.md",
             "the paper's CAM seeds 64.7 mIoU (VOC train), pseudo masks about 73.5 (unconfirmed), segmentation val "
             "71.2, test 72.5 (VOC server); SFC's own log has seeds 63.1 (not measured by this project)"),
    Expected("configs/coco.yaml", "docs/datasets.md", "the paper's COCO 2014 val 46.8 mIoU (not measured by this "
                                                      "project)"),
)


def _relevant(cfg: PipelineConfig) -> dict[str, object]:
    return {key: value for key, value in flatten(cfg.model_dump(mode="json")).items()
            if not key.startswith(NEUTRAL_SECTIONS) and key not in NEUTRAL_FIELDS
            and key.rpartition(".")[2] not in NEUTRAL_LEAVES}


def differences(cfg: PipelineConfig, shipped: PipelineConfig) -> list[str]:
    """The figure-relevant settings in which ``cfg`` differs from ``shipped``, as ``key=value``."""
    ours, theirs = _relevant(cfg), _relevant(shipped)
    return [f"{key}={ours.get(key)}" for key in sorted(ours.keys() | theirs.keys()) if ours.get(key) != theirs.get(key)]


def expected_figures(cfg: PipelineConfig) -> list[str]:
    """Lines for the dry run: the documented figures of the shipped configuration of ``cfg``'s dataset kind."""
    for expected in EXPECTED:
        path = ROOT / expected.config
        if not path.exists():
            continue
        shipped = load_config(str(path))
        if shipped.prepare_data.kind != cfg.prepare_data.kind:
            continue
        diff = differences(cfg, shipped)
        if not diff:
            return [f"expected figures ({expected.doc}): {expected.figures}"]
        shown = ", ".join(diff[:SHOWN]) + (f" and {len(diff) - SHOWN} more" if len(diff) > SHOWN else "")
        return [f"expected figures of {expected.config} ({expected.doc}): {expected.figures}; this configuration "
                f"differs in {len(diff)} settings ({shown}), so its figures may differ"]
    return []
