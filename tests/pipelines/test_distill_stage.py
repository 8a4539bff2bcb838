"""The distill stage end to end on the digits at 8×8 with tiny sizes: a conditional teacher trained by the train stage,
two progressive-distillation rounds (8 → 4 → 2 steps) with real local Ray Train, a real sqlite MLflow store and real
webdataset shards; the student is logged in the project's model format with its provenance and samples in 2 steps."""

import pytest
import torch
from mlflow.tracking import MlflowClient
from pydantic import ValidationError

from diffusion.samplers import sample
from pipelines.distill.config import DistillConfig
from pipelines.distill.stage import run_distillation
from pipelines.ingest.config import IngestConfig
from pipelines.ingest.stage import run_ingest
from pipelines.modelstore import load_model
from pipelines.tracking import use_tracking_uri
from pipelines.train.config import TrainConfig
from pipelines.train.stage import run_training
from tests.pipelines.test_train import run_killing_a_worker

TEACHER = {"model": {"preset": "tiny", "num_classes": "auto", "prediction": "v"}, "batch_size": 32, "workers": 1,
           "lr": 1e-3, "warmup_steps": 10, "log_every": 20, "checkpoint_every": 60, "eval_every": 0,
           "sample_grid": 4, "sample_ddpm_steps": 5, "sample_ddim_steps": 5, "steps": 60,
           "ema": {"half_life_steps": 10}, "system_metrics_interval_s": 0}
DISTILL = {"teacher_steps": 8, "target_steps": 2, "steps_per_round": 30, "batch_size": 32, "lr": 3e-4,
           "checkpoint_every": 10, "log_every": 10, "sample_grid": 10, "guidance_scale": 2.0}


def test_bad_configs_fail_naming_the_field():
    for bad, message in [({"teacher_steps": 12, "target_steps": 4}, "power of two"),
                         ({"method": "consistency"}, "method"), ({"target_step": 4}, "target_step")]:
        with pytest.raises(ValidationError, match=message):
            DistillConfig.model_validate(bad)
    assert DistillConfig.model_validate({"teacher_steps": 64, "target_steps": 4}).rounds == [32, 16, 8, 4]


@pytest.fixture(scope="module")
def teacher(ray_session, tmp_path_factory):
    root = tmp_path_factory.mktemp("distill")
    splits = run_ingest(IngestConfig.model_validate({"image": {"size": 8, "channels": 1}}), root / "shards",
                        progress=False).splits
    uri = f"sqlite:///{root / 'mlruns.db'}"
    result = run_training(TrainConfig.model_validate(TEACHER), splits["train"], None, root / "train", uri, "distill")
    return result.model_uri, splits, uri, root


def test_two_rounds_give_a_logged_two_step_student(teacher):
    teacher_uri, splits, uri, root = teacher
    values = run_distillation(DistillConfig.model_validate({**DISTILL, "num_fid_samples": 64}), teacher_uri,
                              splits["train"], root / "out", uri, "distill", test_uri=splits["test"])
    client = MlflowClient(uri)
    run = client.get_run(values["run_id"])
    assert run.info.status == "FINISHED" and values["steps"] == 2
    losses = [m.value for m in client.get_metric_history(values["run_id"], "loss")]
    assert len(losses) == 6 and all(loss == loss for loss in losses)
    assert [m.value for m in client.get_metric_history(values["run_id"], "student_steps")] == [4] * 3 + [2] * 3
    assert {a.path for a in client.list_artifacts(values["run_id"], "samples")} == {
        "samples/distilled-4_round1.png", "samples/distilled-2_round2.png"}
    assert run.data.params["distill.teacher_steps"] == "8"
    fids = client.get_metric_history(values["run_id"], "fid")  # each round's student, at its step count
    assert [m.step for m in fids] == [4, 2] and all(m.value > 0 for m in fids)
    assert [m.step for m in client.get_metric_history(values["run_id"], "kid")] == [4, 2]
    with use_tracking_uri(uri):  # leaves MLflow's process-wide URI as it was for later tests
        student = load_model(values["model_uri"])
    assert student.metadata["distilled"] is True and student.metadata["distilled_steps"] == 2
    assert student.metadata["teacher"] == teacher_uri and student.prediction == "v"
    assert student.num_classes == 10 and student.metadata["distilled_guidance_scale"] == 2.0
    assert student.metadata["sampler"] == "distilled"
    images = sample(student, student.schedule(), (4, 1, 8, 8), "distilled", 2,
                    y=torch.tensor([0, 1, 2, 3]), generator=torch.Generator().manual_seed(0))
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()


def test_a_killed_worker_resumes_from_the_last_checkpoint(teacher):
    teacher_uri, splits, uri, root = teacher
    out, outcome = root / "killed", {}
    config = DistillConfig.model_validate({**DISTILL, "steps_per_round": 60, "num_fid_samples": 0})
    run_killing_a_worker(lambda: outcome.setdefault("values", run_distillation(
        config, teacher_uri, splits["train"], out, uri, "distill")), out / "ray" / "distill")
    values = outcome["values"]
    starts = [m.value for m in MlflowClient(uri).get_metric_history(values["run_id"], "start_step")]
    assert starts[0] == 0 and len(starts) == 2 and starts[1] >= 10, starts  # continued, not restarted
    assert MlflowClient(uri).get_run(values["run_id"]).info.status == "FINISHED" and values["steps"] == 2
