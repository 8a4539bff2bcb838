"""Parameters of the deploy stage (unknown keys are errors)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipelines.strict import StrictConfig


class DeployConfig(StrictConfig):
    """app: "module:attr" of a Serve application builder, called with a dict of arguments (model_uri, tracking_uri,
    max_batch_size, min_replicas, max_replicas) as Serve config files call `import_path` with their `args:`."""

    model: Literal["champion", "registered"] = "champion"
    app: str = Field("services.app:build_app", pattern=r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*$")
    route: str = Field("/", pattern=r"^/")
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    replicas: int = Field(1, ge=1)
    max_batch_size: int = Field(16, ge=1)
    name: str = Field("raydiff", min_length=1)
