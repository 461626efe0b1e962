"""Scale-out: per-image stages (CAM inference, labels, the three evaluations) fanned out as mapped Prefect tasks
over shards, on threads or a local Dask cluster, give exactly the outputs of one unsharded task."""
import json

import pytest

from flows.config import load_config
from storage import fs
from tasks.engine.evaluation import EvalState
from tasks.engine.shards import all_shards, merge_counts, partial_dir, save_partial, shard_items
from tests.compare_runs import assert_same_cam_stores, assert_same_label_pngs
from tests.test_flow import TINY


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prefect_harness):
    """The same CRF-refined pipeline twice: one task per stage, and 2 shards per image stage on a local Dask
    cluster."""
    from flows.pipeline import run_pipeline

    tmp = tmp_path_factory.mktemp("scale")
    common = [*TINY, f"run.root={tmp / 'runs'}", f"prepare_data.root={tmp / 'data'}", "make_pseudo_labels.method=crf"]
    whole = load_config("configs/synthetic.yaml", [*common, "run.name=whole"])
    sharded = load_config("configs/synthetic.yaml", [*common, "run.name=sharded", "run.shards=2",
                                                     "run.task_runner=dask", "run.dask_workers=2"])
    return run_pipeline(whole), run_pipeline(sharded), sharded


def test_sharded_stages_on_dask_equal_one_task(runs):
    whole, sharded, _ = runs
    assert_same_cam_stores(sharded["stages"]["infer_cams"]["store"], whole["stages"]["infer_cams"]["store"])
    assert_same_label_pngs(sharded["stages"]["make_pseudo_labels"]["out_dir"],
                           whole["stages"]["make_pseudo_labels"]["out_dir"])


def test_merged_manifests_count_every_image_once(runs):
    whole, sharded, _ = runs
    for stage in ("infer_cams", "make_pseudo_labels"):
        merged, single = sharded["stages"][stage], whole["stages"][stage]
        assert merged["shards"] == 2 and merged["images"] == merged["written"] == single["images"]
    fractions = sharded["stages"]["make_pseudo_labels"]["label_fractions"]
    assert fractions == pytest.approx(whole["stages"]["make_pseudo_labels"]["label_fractions"])


def _scores(results_url: str, *path: str) -> str:
    """One part of an evaluation's results as JSON text (NaN IoUs of absent classes compare equal as text)."""
    results = json.loads(fs.read_text(results_url))
    for key in path:
        results = results[key]
    return json.dumps(results, sort_keys=True)


def test_sharded_evaluations_equal_one_pass(runs):
    whole, sharded, _ = runs
    assert all(sharded["stages"][s]["shards"] == 2 for s in ("eval_cam", "eval_pseudo_labels", "eval_seg"))
    cam = [r["stages"]["eval_cam"]["results"] for r in (whole, sharded)]
    assert fs.read_text(cam[0]) == fs.read_text(cam[1])
    labels = [r["stages"]["eval_pseudo_labels"]["results"] for r in (whole, sharded)]
    assert _scores(labels[0], "scores") == _scores(labels[1], "scores")
    seg = [r["stages"]["eval_seg"] for r in (whole, sharded)]
    for split in ("val", "test"):
        for variant in ("no_crf", "crf"):
            assert _scores(seg[0]["results"], split, variant) == _scores(seg[1]["results"], split, variant)
    val_ids = json.loads(fs.read_text(sharded["stages"]["prepare_data"]["splits"]["val"]))["ids"]
    assert json.loads(fs.read_text(seg[1]["results"]))["val"]["images"] == len(val_ids)
    assert fs.read_bytes(seg[0]["archive"]) == fs.read_bytes(seg[1]["archive"])  # the VOC server tar, byte for byte
    pictures = {stage: [sorted(p for p in fs.find(f"{r['run_dir']}/{stage}") if p.endswith(".png"))
                        for r in (whole, sharded)] for stage in ("eval_cam", "eval_pseudo_labels", "eval_seg")}
    assert all(whole_run == sharded_run for whole_run, sharded_run in pictures.values())
    assert any("overlays/" in p for whole_run, _ in pictures.values() for p in whole_run)
    for stage, (names, _) in pictures.items():
        for picture in (p for p in names if "overlays/" in p):  # charts name their run's folders in the title
            folders = [f"{r['run_dir']}/{stage}" for r in (whole, sharded)]
            assert fs.read_bytes(f"{folders[0]}/{picture}") == fs.read_bytes(f"{folders[1]}/{picture}"), picture
        assert not fs.exists(f"{sharded['run_dir']}/{stage}/shards")  # the partial states are merged and gone


def test_a_saved_shard_is_not_recomputed(tmp_path):
    state = EvalState(counts={"images": 3}).to_dict()
    manifest = save_partial(str(tmp_path), "eval", "1/2", lambda: state)

    def recompute() -> dict:
        raise AssertionError("the shard's saved state should have been reused")

    assert save_partial(str(tmp_path), "eval", "1/2", recompute) == manifest
    assert fs.exists(f"{partial_dir(str(tmp_path), 'eval')}/1-of-2.pt")


def test_partial_states_add_up():
    import torch

    one = EvalState(matrices={"m": torch.ones(2, 2, dtype=torch.int64)}, counts={"n": 2}, seconds={"val": 3.0},
                    pictures={"a.png": b"a"})
    two = EvalState(matrices={"m": torch.eye(2, dtype=torch.int64)}, counts={"n": 1}, seconds={"val": 5.0},
                    pictures={"b.png": b"b"})
    total = EvalState()
    for state in (one, two):
        total.merge(state)
    assert total.matrices["m"].tolist() == [[2, 1], [1, 2]] and total.counts == {"n": 3}
    assert total.seconds == {"val": 5.0} and set(total.pictures) == {"a.png", "b.png"}


def test_sharded_stage_is_taken_from_its_record_on_rerun(runs):
    from flows.pipeline import run_pipeline
    from flows.records import manifest_url

    _, first, cfg = runs
    before = json.loads(fs.read_text(manifest_url(cfg.run_dir, "make_pseudo_labels")))["finished"]
    again = run_pipeline(cfg.model_copy(update={"run": cfg.run.model_copy(update={"task_runner": "threads"})}))
    assert again["stages"]["make_pseudo_labels"] == first["stages"]["make_pseudo_labels"]
    assert json.loads(fs.read_text(manifest_url(cfg.run_dir, "make_pseudo_labels")))["finished"] == before


def test_shards_partition_the_images():
    items = list(range(11))
    parts = [shard_items(items, s) for s in all_shards(3)]
    assert sorted(sum(parts, [])) == items and all(parts)
    with pytest.raises(ValueError, match="shards disagree on out_dir"):
        merge_counts([{"out_dir": "a", "seconds": 1}, {"out_dir": "b", "seconds": 1}], (), ("out_dir",))
