"""Parameters of the deploy stage (unknown keys are errors)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipelines.strict import StrictConfig


class DeployConfig(StrictConfig):
    """app: "module:attr" of a Serve application builder, called with a dict of arguments (model_uri, tracking_uri,
    max_batch_size, min_replicas, max_replicas, device, num_gpus, num_cpus) as Serve config files call `import_path`
    with their `args:`. A replica's GPUs come from this file; a request the cluster cannot meet yet waits
    `resource_wait_s` for the autoscaler (with a notice), then fails naming what is missing."""

    model: Literal["champion", "registered"] = "champion"
    app: str = Field("services.app:build_app", pattern=r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
    route: str = Field("/", pattern=r"^/")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    replicas: int = Field(1, ge=1)
    max_batch_size: int = Field(16, ge=1)
    name: str = Field("raydiff", min_length=1)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: the replica's GPU when it reserves one, "
                                                   "else the CPU")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs per replica, from this file only (never from the "
                                                     "cluster's current size); device cuda alone means 1")
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs per replica")
    resource_wait_s: float = Field(600.0, ge=0.0, description="how long a GPU request the cluster cannot meet yet "
                                                              "waits for the autoscaler before it fails")

    def replica_gpus(self) -> float:
        if self.device == "cpu":
            return 0.0
        return self.num_gpus or (1.0 if self.device == "cuda" else 0.0)
