"""The shipped configs/local.yaml, shrunk with --set overrides to a tiny model, end to end on real Ray, MLflow and
Ray Serve: first run computes everything, the second is all cached, a changed train parameter reruns everything
downstream of ingest but not ingest."""

from pathlib import Path

import pytest
import requests
from mlflow.tracking import MlflowClient

from pipelines.runner.execute import run_pipeline
from pipelines.spec import load_spec
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parents[2]
STAGES = ["ingest", "train", "evaluate", "register", "deploy"]
pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _spec_tracking_uri_wins(monkeypatch):
    """MLFLOW_TRACKING_URI overrides the pipeline file; another test's mlflow.set_tracking_uri may have set it."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)

TINY = [
    "ingest.image.size=8", "train.model.preset=tiny", "train.schedule.num_timesteps=100", "steps=30",
    "train.batch_size=32", "train.warmup_steps=10", "train.checkpoint_every=15", "train.sample_grid=4",
    "train.sample_ddpm_steps=2", "train.sample_ddim_steps=2", "train.eval_batches=1", "train.eval_batch_size=16",
    "evaluate.bpd_batches=1", "evaluate.bpd_batch_size=16", "evaluate.samplers=[ddim-2]",
    "evaluate.num_fid_samples=16", "evaluate.sample_batch_size=16", "evaluate.guidance_scales=[1, 3]",
    "evaluate.guidance_sampler=ddim-2", "register.model_name=digits-e2e",
    "deploy.name=raydiff-e2e",
]


def stage_runs(client: MlflowClient, parent) -> dict:
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'")
    return {run.data.tags["raydiff.stage"]: run for run in children}


def test_local_pipeline_end_to_end_cached_then_train_change(ray_session, tmp_path, mlflow_uri):
    port = free_port()
    sets = [*TINY, f"tracking.uri={mlflow_uri}", f"storage.root={tmp_path / 'store'}", f"port={port}"]
    client = MlflowClient(mlflow_uri)
    try:
        first = run_pipeline(load_spec(ROOT / "configs" / "local.yaml", sets), log=print)
        assert first.status == dict.fromkeys(STAGES, "done")
        parent = client.get_run(first.run_id)
        assert parent.info.status == "FINISHED" and parent.data.tags["raydiff.pipeline"] == "digits-local"
        assert {a.path for a in client.list_artifacts(first.run_id, "pipeline")} == {
            "pipeline/pipeline.yaml", "pipeline/resolved.yaml", "pipeline/dag.mmd"}
        runs = stage_runs(client, parent)
        assert set(runs) == set(STAGES)
        assert all(r.data.tags["raydiff.cache_hit"] == "false" for r in runs.values())
        train = runs["train"]  # the train stage's own run, nested under the pipeline run
        assert train.info.run_id == first.records["train"].run_id and train.data.params["train.steps"] == "30"
        assert train.data.params["unet.num_classes"] == "10"  # the default is conditional on the digit label
        evaluate = runs["evaluate"]
        assert evaluate.data.metrics["test_bpd"] > 0 and evaluate.data.params["samplers"] == '["ddim-2"]'
        assert {"class_accuracy_s1", "class_accuracy_s3", "fid_guided_s3"} <= set(evaluate.data.metrics)
        assert "samples_ddim-2.png" in {a.path for a in client.list_artifacts(evaluate.info.run_id)}
        assert Path(first.records["evaluate"].values["samples"][0]).is_file()
        assert str(client.get_model_version_by_alias("digits-e2e", "champion").version) == "1"
        url = first.records["deploy"].values["url"]
        assert parent.data.tags["raydiff.endpoint"] == url and f":{port}" in url
        ready = requests.get(url.rstrip("/") + "/readyz", timeout=60)
        assert ready.status_code == 200 and "digits-e2e" in ready.json()["model"], ready.text
        reply = requests.post(url.rstrip("/") + "/v1/samples", json={"num_images": 2, "steps": 2, "seed": 0},
                              timeout=120)
        assert reply.status_code == 200 and len(reply.json()["images"]) == 2, reply.text
        models = requests.get(url.rstrip("/") + "/v1/models", timeout=30).json()[0]
        assert models["class_names"] == [str(k) for k in range(10)], models
        reply = requests.post(url.rstrip("/") + "/v1/samples", json={"num_images": 2, "steps": 2, "seed": 0,
                                                                    "class_labels": [7], "guidance_scale": 3},
                              timeout=120)
        assert reply.status_code == 200 and reply.json()["class_labels"] == [7, 7], reply.text

        again = run_pipeline(load_spec(ROOT / "configs" / "local.yaml", sets), log=print)
        assert again.status == dict.fromkeys(STAGES, "cached")
        cached = stage_runs(client, client.get_run(again.run_id))
        assert all(r.data.tags["raydiff.cache_hit"] == "true" for r in cached.values())
        assert cached["evaluate"].data.metrics["test_bpd"] == evaluate.data.metrics["test_bpd"]
        assert requests.get(url.rstrip("/") + "/healthz", timeout=30).status_code == 200

        changed = run_pipeline(load_spec(ROOT / "configs" / "local.yaml", [*sets, "steps=40"]), log=print)
        assert changed.status == {"ingest": "cached", **dict.fromkeys(STAGES[1:], "done")}
        assert changed.records["train"].values["final_step"] == 40
        registration = changed.records["register"].values
        assert registration["version"] == "2" and registration["previous_champion"] == "1"
        champion = str(client.get_model_version_by_alias("digits-e2e", "champion").version)
        assert champion == ("2" if registration["promoted"] else "1") == registration["champion_version"]
        assert changed.records["deploy"].values["model_uri"] == f"models:/digits-e2e/{champion}"
        assert requests.get(url.rstrip("/") + "/healthz", timeout=30).status_code == 200
    finally:
        from ray import serve

        serve.delete("raydiff-e2e")
