"""Configuration: YAML + dotted overrides, and clear errors before any work starts."""
from pathlib import Path

import pytest

from flows.config import load_config
from storage.errors import ConfigError
from storage.tracking import flatten

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


@pytest.mark.parametrize("name", ["synthetic", "voc", "coco"])
def test_shipped_configs_parse(name, tmp_path):
    weights = _fake_weights(tmp_path)
    overrides = [] if name == "synthetic" else [f"train_cam.weights={weights}", f"train_seg.weights={weights}"]
    cfg = load_config(str(CONFIGS / f"{name}.yaml"), overrides)
    assert cfg.prepare_data.kind == name


def _fake_weights(tmp_path):
    path = tmp_path / "w.pth"
    path.write_bytes(b"x")
    return str(path)


def test_overrides_are_typed():
    cfg = load_config(str(CONFIGS / "synthetic.yaml"),
                      ["train_cam.max_steps=7", "train_cam.ibr.enabled=false", "run.name=x1"])
    assert cfg.train_cam.max_steps == 7 and cfg.train_cam.ibr.enabled is False and cfg.run.name == "x1"
    assert cfg.run_dir == "runs/x1"


@pytest.mark.parametrize("override, fragment", [
    ("train_cam.max_stepz=3", "train_cam.max_stepz: unknown key; allowed keys here:"),
    ("train_cam.max_steps=-1", "train_cam.max_steps"),
    ("train_cam.batch_size=abc", "train_cam.batch_size"),
    ("train_cam.crop=100", "multiple of 32"),
    ("train_cam.crop=256", "crop 256 is larger than allowed"),
    ("train_cam.backbone=vgg16", "'resnet_mini', 'resnet18', 'resnet34', 'resnet50' or 'resnet101'"),
    ("make_pseudo_labels.edge_canvas=100", "edge_canvas must be 0 or a multiple of 16"),
    ("prepare_data.kind=imagenet", "prepare_data.kind"),
    ("run.device=gpu0", "allowed: auto, cpu"),
    ("nonsense", "must look like section.key=value"),
])
def test_bad_values_name_the_key(override, fragment):
    with pytest.raises(ConfigError) as err:
        load_config(str(CONFIGS / "synthetic.yaml"), [override])
    assert fragment in str(err.value)


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_config(str(tmp_path / "nope.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("run: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(str(bad))


def test_renamed_sections_still_load_with_a_warning(tmp_path, caplog):
    old = tmp_path / "old.yaml"
    old.write_text("data:\n  kind: synthetic\n  root: somewhere\npseudo_labels:\n  method: irn\n"
                   "ir_labels:\n  workers: 1\n")
    cfg = load_config(str(old), ["pseudo_labels.beta=8"])
    assert cfg.prepare_data.root == "somewhere" and cfg.make_ir_labels.workers == 1
    assert cfg.make_pseudo_labels.method == "irn" and cfg.make_pseudo_labels.beta == 8
    deprecated = {r.getMessage() for r in caplog.records if "deprecated" in r.getMessage()}
    assert any("'data' is deprecated; call it 'prepare_data'" in m for m in deprecated)
    assert any("'pseudo_labels' is deprecated; call it 'make_pseudo_labels'" in m for m in deprecated)
    old.write_text("data:\n  kind: synthetic\nprepare_data:\n  kind: synthetic\n")
    with pytest.raises(ConfigError, match=f"config file {old}: sections 'data' and 'prepare_data' are the same"):
        load_config(str(old))


def test_scales_are_checked_in_every_section():
    with pytest.raises(ConfigError) as err:
        load_config(str(CONFIGS / "synthetic.yaml"), ["eval_seg.scales=[]", "infer_cams.scales=[-1]",
                                                      "train_seg.scales=[0]"])
    for section in ("eval_seg", "infer_cams", "train_seg"):
        assert f"{section}.scales: scales must be a non-empty list of positive numbers" in str(err.value)


def test_show_config_explain_comments_every_field_and_loads_back(tmp_path):
    cfg = load_config(str(CONFIGS / "synthetic.yaml"), ["train_seg.lr=0.02"])
    text = cfg.to_explained_yaml()
    lines = text.splitlines()
    fields = [i for i, line in enumerate(lines) if not line.lstrip().startswith("#") and not line.endswith(":")]
    assert len(fields) == len(flatten(cfg.model_dump(mode="json")))
    assert all(lines[i - 1].lstrip().startswith("#") for i in fields)
    assert "  # base learning rate of the poly schedule of the backbone\n  # default: 0.00025\n  lr: 0.02\n" in text
    path = tmp_path / "explained.yaml"
    path.write_text(text)
    assert load_config(str(path)) == cfg
