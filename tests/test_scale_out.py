"""Scale-out: per-image stages fanned out as mapped Prefect tasks over shards, on threads or a local Dask cluster,
give exactly the outputs of one unsharded task."""
import json

import pytest

from flows.config import load_config
from storage import fs
from tasks.shards import all_shards, merge_counts, shard_items
from tests.compare_runs import assert_same_cam_stores, assert_same_label_pngs
from tests.test_flow import TINY

STAGES = ["prepare_data", "train_cam", "infer_cams", "make_pseudo_labels"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prefect_harness):
    """The same CRF-refined run twice: one task per stage, and 2 shards per image stage on a local Dask cluster."""
    from flows.pipeline import run_pipeline

    tmp = tmp_path_factory.mktemp("scale")
    common = [*TINY, f"run.root={tmp / 'runs'}", f"data.root={tmp / 'data'}", "pseudo_labels.method=crf"]
    whole = load_config("configs/synthetic.yaml", [*common, "run.name=whole"])
    sharded = load_config("configs/synthetic.yaml", [*common, "run.name=sharded", "run.shards=2",
                                                     "run.task_runner=dask", "run.dask_workers=2"])
    return run_pipeline(whole, STAGES), run_pipeline(sharded, STAGES), sharded


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


def test_sharded_stage_is_taken_from_its_record_on_rerun(runs):
    from flows.pipeline import run_pipeline
    from flows.stages import manifest_url

    _, first, cfg = runs
    before = json.loads(fs.read_text(manifest_url(cfg.run_dir, "make_pseudo_labels")))["finished"]
    again = run_pipeline(cfg.model_copy(update={"run": cfg.run.model_copy(update={"task_runner": "threads"})}),
                         STAGES)
    assert again["stages"]["make_pseudo_labels"] == first["stages"]["make_pseudo_labels"]
    assert json.loads(fs.read_text(manifest_url(cfg.run_dir, "make_pseudo_labels")))["finished"] == before


def test_shards_partition_the_images():
    items = list(range(11))
    parts = [shard_items(items, s) for s in all_shards(3)]
    assert sorted(sum(parts, [])) == items and all(parts)
    with pytest.raises(ValueError, match="shards disagree on out_dir"):
        merge_counts([{"out_dir": "a", "seconds": 1}, {"out_dir": "b", "seconds": 1}], (), ("out_dir",))
