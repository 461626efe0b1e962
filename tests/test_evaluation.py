"""The evaluator protocol (tasks/engine/evaluation.py): the states two shards accumulate, merged, are the state of
one pass over all images, for a toy evaluator through the drivers and for each of the three evaluations; the
state survives being saved as a partial; no stage module imports another, and the engine imports none."""
import ast
from pathlib import Path

import numpy as np
import pytest
import torch

import tasks.eval_seg as eval_seg_module
from storage import checkpoints, fs
from storage.datasets.split_files import load_split_file
from storage.images import read_mask, write_mask
from tasks.engine.evaluation import EvalState, Evaluator, accumulate, evaluate, merge_shards
from tasks.engine.shards import all_shards, partial_dir, shard_items
from tasks.eval_cam import CamEvaluator, EvalCamConfig
from tasks.eval_pseudo_labels import PSEUDO_LABEL_EVAL, LabelEvaluator
from tasks.eval_seg import EvalSegConfig, SegEvaluator
from tests.fake_cams import fake_cam_store
from tests.single_thread import one_torch_thread  # noqa: F401  (autouse fixture)
from tests.synthetic_splits import synthetic_split_files

ROOT = Path(__file__).resolve().parents[1]


class Histogram(Evaluator[int]):
    """A toy evaluation: a histogram of numbers 0..3 as a (1, 4) matrix, their sum and a picture per odd one."""

    name = "toy"

    def __init__(self, out_dir: str, numbers: list[int]):
        self.out_dir, self.numbers = out_dir, numbers
        self.reset()

    def outputs(self, shard: str | None) -> list[int]:
        return shard_items(self.numbers, shard)

    def process(self, output: int) -> None:
        self.state.add_matrix("histogram", torch.nn.functional.one_hot(torch.tensor([output]), 4))
        self.state.add_count("sum", output)
        self.state.seconds["slowest"] = max(self.state.seconds.get("slowest", 0.0), float(output))
        if output % 2:
            self.state.pictures[f"{output}.png"] = bytes([output])

    def report(self) -> dict:
        return {"histogram": self.state.matrices["histogram"].tolist(), "sum": self.state.counts["sum"],
                "slowest": self.state.seconds["slowest"], "pictures": list(self.state.pictures_of(["1.png", "3.png"]))}


def test_merged_shards_report_what_one_pass_reports(tmp_path):
    numbers = [3, 1, 0, 2, 3, 3, 1]
    whole = evaluate(Histogram(str(tmp_path / "whole"), numbers))
    assert whole == {"histogram": [[1, 2, 1, 3]], "sum": 13, "slowest": 3.0, "pictures": ["1.png", "3.png"]}
    out_dir = str(tmp_path / "sharded")
    shards = [evaluate(Histogram(out_dir, numbers), shard) for shard in all_shards(3)]
    assert all(fs.exists(m["partial"]) for m in shards)
    assert merge_shards(Histogram(out_dir, numbers), shards) == {**whole, "shards": 3}
    assert not fs.exists(partial_dir(out_dir, "toy")) and not fs.exists(f"{out_dir}/shards")


def test_a_state_survives_its_partial(tmp_path):
    state = EvalState(matrices={"m": torch.arange(8).view(2, 2, 2)}, counts={"n": 3}, seconds={"val": 1.5},
                      pictures={"a.png": b"\x89PNG"})
    url = str(tmp_path / "partial.pt")
    checkpoints.save(url, state.to_dict())
    loaded = EvalState.from_dict(checkpoints.load(url))  # weights_only, as the merge loads it
    assert torch.equal(loaded.matrices["m"], state.matrices["m"])
    assert (loaded.counts, loaded.seconds, loaded.pictures) == (state.counts, state.seconds, state.pictures)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Synthetic val/test splits, fake CAMs of the val images and noisy labels (some 255) of them."""
    root = tmp_path_factory.mktemp("evaluation")
    urls = synthetic_split_files(root, ("val", "test"), 24, 7, 48, 64)
    val = load_split_file(urls["val"])
    fake_cam_store(str(root / "cams.zarr"), val, seed=1)
    rng = np.random.default_rng(0)
    for image_id in val.ids:
        labels = read_mask(val.mask_url(image_id)).copy()
        noise = rng.random(labels.shape)
        labels[noise < 0.1], labels[(noise > 0.1) & (noise < 0.2)] = 255, 0
        write_mask(str(root / "labels" / f"{image_id}.png"), labels)
    return {**urls, "root": root}


class _NoSegmenter(torch.nn.Module):
    backbone = None  # the predictions come from _noisy_probs


def _noisy_probs(model, split, ids, settings, device):
    """Probabilities peaked on the ground truth, with noise seeded by the image: the same whichever shard asks."""
    for image_id in ids:
        mask = read_mask(split.mask_url(image_id)).astype(np.int64) if split.has_masks else None
        rng = np.random.default_rng(int(image_id.split("_")[-1]))
        shape = mask.shape if mask is not None else (40, 40)
        probs = rng.random((len(split.class_names), *shape)).astype(np.float32)
        if mask is not None:
            probs += 2 * np.eye(len(split.class_names), dtype=np.float32)[np.where(mask == 255, 0, mask)].transpose(
                2, 0, 1)
        yield image_id, probs / probs.sum(0, keepdims=True)


def _evaluators(data, monkeypatch):
    root = data["root"]
    monkeypatch.setattr(eval_seg_module, "load_segmenter", lambda url, names: _NoSegmenter())
    monkeypatch.setattr(eval_seg_module, "fold_batchnorm", lambda backbone: backbone)
    monkeypatch.setattr(eval_seg_module, "predict_probs", _noisy_probs)
    seg_cfg = EvalSegConfig(crf_workers=1, crf_chunk=2, num_workers=0, overlays=3)
    return {
        "eval_cam": lambda: CamEvaluator(EvalCamConfig(overlays=3), str(root / "cams.zarr"), data["val"],
                                         str(root / "cam"), None),
        "eval_pseudo_labels": lambda: LabelEvaluator(data["val"], str(root / "labels"), str(root / "labels_eval"),
                                                     None, PSEUDO_LABEL_EVAL, 3),
        "eval_seg": lambda: SegEvaluator(seg_cfg, "segmenter.pt", data["val"], data["test"], "cpu",
                                         str(root / "seg"), None),
    }


@pytest.mark.parametrize("evaluation", ["eval_cam", "eval_pseudo_labels", "eval_seg"])
def test_merged_halves_equal_everything_at_once(data, monkeypatch, evaluation):
    make = _evaluators(data, monkeypatch)[evaluation]
    whole = accumulate(make())
    merged = make()
    for shard in all_shards(2):
        merged.merge(EvalState.from_dict(accumulate(make(), shard).to_dict()))
    assert merged.state.matrices.keys() == whole.matrices.keys() and whole.matrices
    assert all(torch.equal(merged.state.matrices[k], whole.matrices[k]) for k in whole.matrices)
    assert merged.state.counts == whole.counts and merged.state.pictures == whole.pictures
    assert merged.state.seconds.keys() == whole.seconds.keys()
    assert any("overlays/" in name for name in whole.pictures)


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_stages_import_no_other_stage_and_the_engine_no_stage():
    stages = {f"tasks.{p.stem}" for p in (ROOT / "tasks").glob("*.py") if p.stem != "__init__"}
    found = set()
    for path in [*(ROOT / "tasks").glob("*.py"), *(ROOT / "tasks" / "engine").glob("*.py")]:
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        found |= {(module, name) for name in _imported_modules(path) & stages if name != module}
    assert not found, sorted(found)
