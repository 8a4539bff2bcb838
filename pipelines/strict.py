"""The base of every pipelines configuration model: unknown keys are errors and validated values are immutable."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class StrictConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
