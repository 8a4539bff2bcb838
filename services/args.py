"""`AppArgs`: the arguments of `services.app:build_app` (the `args:` block of a Serve config), read by both
deployments."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from services.schemas import Strict


class AppArgs(Strict):
    """Arguments of `build_app` (the `args:` block of a Serve config). Unknown keys are errors."""

    model_uri: str = Field(min_length=1, description="models:/NAME@ALIAS, models:/NAME/VERSION or runs:/RUN/model")
    tracking_uri: str | None = Field(None, description="MLflow tracking (and registry) URI; None: $MLFLOW_TRACKING_URI")
    max_batch_size: int = Field(16, ge=1, description="requests merged into one batched reverse process")
    batch_wait_timeout_s: float = Field(0.05, ge=0.0)
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: the replica's GPU when it reserves one "
                                                   "(num_gpus), else the CPU")
    max_num_images: int = Field(64, ge=1)
    request_timeout_s: float = Field(300.0, gt=0.0)
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    # Beyond the contract's fields (all optional):
    num_cpus: float = Field(1.0, ge=0.0, description="CPUs reserved per SamplerDeployment replica")
    num_gpus: float = Field(0.0, ge=0.0, description="GPUs reserved per SamplerDeployment replica (device auto then "
                                                     "samples on it; device cuda alone reserves 1)")
    torch_threads: int | None = Field(None, ge=1, description="torch intra-op threads per replica (None: Ray's "
                                                              "OMP_NUM_THREADS, i.e. num_cpus)")
    ingress_replicas: int = Field(1, ge=1)
    max_body_bytes: int = Field(4 * 2**20, ge=1024, description="larger request bodies get 413")
    max_likelihood_images: int = Field(16, ge=1)
    max_images_per_forward: int = Field(1024, ge=1, description="larger in-flight sets run the model in chunks")

    def model_post_init(self, _context: Any) -> None:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
