"""Resources a stage asks for come from the pipeline file, never from the cluster's current size; what the cluster
cannot give yet is waited for (a notice, a request to the autoscaler) and then refused with an error naming it.
Real local Ray (CPU only), so a GPU request is the one that cannot be met."""

import time

import pytest

from pipelines.deploy.config import DeployConfig
from pipelines.resources import ResourcesUnavailable, shortfall, wait_for_resources
from services.app import replica_gpus
from services.args import AppArgs


def test_a_gpu_request_on_a_cluster_without_gpus_waits_then_fails_naming_it(ray_session):
    lines, start = [], time.monotonic()
    with pytest.raises(ResourcesUnavailable, match=r"stages.deploy needs 1 GPU but after 1.5 s the cluster has 0 GPU"):
        wait_for_resources({"GPU": 1.0}, 1.5, "stages.deploy", lines.append, poll_s=0.2)
    assert time.monotonic() - start >= 1.5
    assert any("waiting up to 1.5 s for the autoscaler" in line for line in lines), lines


def test_what_the_cluster_has_returns_at_once(ray_session):
    lines, start = [], time.monotonic()
    wait_for_resources({"CPU": 1.0}, 60.0, "stages.deploy", lines.append)
    assert lines == [] and time.monotonic() - start < 1.0
    assert shortfall({"CPU": 1.0, "GPU": 2.0}, {"CPU": 4.0, "GPU": 0.5}) == {"GPU": 1.5}


def test_replica_gpus_come_from_the_arguments_alone():
    assert DeployConfig().replica_gpus() == 0.0 and DeployConfig(device="cuda").replica_gpus() == 1.0
    assert DeployConfig(num_gpus=0.5).replica_gpus() == 0.5 and DeployConfig(device="cpu", num_gpus=1).replica_gpus() == 0
    assert replica_gpus(AppArgs(model_uri="models:/m/1")) == 0.0
    assert replica_gpus(AppArgs(model_uri="models:/m/1", device="cuda")) == 1.0
    assert replica_gpus(AppArgs(model_uri="models:/m/1", num_gpus=2)) == 2.0
