"""Run directories, datasets and the CAM store on an S3-compatible object store (a moto server on 127.0.0.1)."""
import json
import os
import uuid

import pytest

from flows.config import load_config
from flows.records import manifest_url
from flows.stages import STAGE_NAMES
from storage import fs
from tests.test_flow import TINY

BUCKET = "sfc-test"
_S3_ENV = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3_server():
    """A local S3-compatible server with an empty bucket; the AWS variables point boto/s3fs at it."""
    boto3 = pytest.importorskip("boto3")
    from moto.server import ThreadedMotoServer

    saved = {k: os.environ.get(k) for k in [*_S3_ENV, "AWS_ENDPOINT_URL"]}
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    os.environ.update(_S3_ENV, AWS_ENDPOINT_URL=f"http://{host}:{port}")
    boto3.client("s3", endpoint_url=os.environ["AWS_ENDPOINT_URL"]).create_bucket(Bucket=BUCKET)
    yield f"s3://{BUCKET}"
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


@pytest.fixture(scope="module")
def s3_run(s3_server, tmp_path_factory, prefect_harness):
    from flows.pipeline import sfc_pipeline

    local = tmp_path_factory.mktemp("s3-local")
    name = f"on-s3-{uuid.uuid4().hex[:8]}"  # Prefect's cache records of remote runs stay in ./runs: one per session
    overrides = [*TINY, f"run.root={s3_server}/runs", f"prepare_data.root={s3_server}/data", f"run.name={name}",
                 f"tracking.uri=sqlite:///{local / 'mlflow.db'}"]
    cfg = load_config("configs/synthetic.yaml", overrides)
    return cfg, sfc_pipeline(cfg.model_dump(mode="json"))


def test_pipeline_writes_every_stage_to_the_object_store(s3_run):
    from storage.cam_store import CamStore
    from storage.datasets.split_files import load_split_file

    cfg, summary = s3_run
    run_dir = summary["run_dir"]
    assert run_dir == f"s3://{BUCKET}/runs/{cfg.run.name}"
    assert fs.exists(f"{run_dir}/pipeline.json") and fs.exists(f"{run_dir}/config.yaml")
    assert all(fs.exists(manifest_url(run_dir, name)) for name in STAGE_NAMES)
    train_ids = load_split_file(summary["stages"]["prepare_data"]["splits"]["train"]).ids
    store = CamStore.open(summary["stages"]["infer_cams"]["store"])
    assert summary["stages"]["infer_cams"]["store"].startswith("s3://") and sorted(store.ids()) == sorted(train_ids)
    keys, P, K = store.load(train_ids[0])
    assert P.shape == K.shape and P.shape[0] == len(keys)
    labels = [n for n in fs.listdir(f"{run_dir}/make_pseudo_labels") if n.endswith(".png")]
    assert sorted(labels) == sorted(f"{i}.png" for i in train_ids)
    assert fs.exists(summary["stages"]["train_seg"]["checkpoint"])
    assert json.loads(fs.read_text(summary["stages"]["eval_seg"]["results"]))["val"]["images"] > 0


def test_rerun_on_the_object_store_takes_every_stage_from_the_cache(s3_run):
    from flows.pipeline import sfc_pipeline

    cfg, first = s3_run
    finished = {n: json.loads(fs.read_text(manifest_url(cfg.run_dir, n)))["finished"] for n in STAGE_NAMES}
    again = sfc_pipeline(cfg.model_dump(mode="json"))
    assert again["stages"] == first["stages"] and again["mlflow_run_id"] == first["mlflow_run_id"]
    assert {n: json.loads(fs.read_text(manifest_url(cfg.run_dir, n)))["finished"] for n in STAGE_NAMES} == finished
