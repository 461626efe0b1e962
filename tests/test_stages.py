"""The stage table: one name per stage, and wiring that fails before any work when a stage reads a key its inputs'
manifests do not declare."""
import dataclasses

import pytest

from flows.config import PipelineConfig, load_config
from flows.stages import STAGES, check_manifest, check_wiring, example_manifest
from tasks.runtime.manifests import CONTRACTS


@pytest.mark.parametrize("config", ["configs/synthetic.yaml", "configs/voc.yaml", "configs/coco.yaml"])
def test_every_stage_reads_only_declared_keys(config):
    cfg = load_config(config, ["make_pseudo_labels.method=irn"])
    check_wiring(list(STAGES), cfg)


def test_one_name_per_stage():
    sections = set(PipelineConfig.model_fields) - {"run", "tracking"}
    for stage in STAGES:
        assert stage.task.name == stage.name == stage.module.__name__.removeprefix("tasks.")
        assert stage.name in sections or stage.name == "eval_pseudo_labels"
        assert stage.name in CONTRACTS
    assert sections <= {stage.name for stage in STAGES}


def test_a_misspelt_key_fails_before_any_work(monkeypatch):
    cfg = load_config("configs/synthetic.yaml")
    stage = next(s for s in STAGES if s.name == "eval_cam")
    module = type(stage.module)("fake_eval_cam")
    module.arguments = lambda section, run, inputs: {"store_url": inputs["infer_cams"]["stor"]}
    with pytest.raises(RuntimeError, match="eval_cam reads 'stor'"):
        check_wiring([dataclasses.replace(stage, module=module)], cfg)


def test_a_manifest_must_hold_its_contract():
    check_manifest("infer_cams", example_manifest("infer_cams"))
    with pytest.raises(RuntimeError, match="infer_cams returned a manifest without store"):
        check_manifest("infer_cams", {"images": 3})
