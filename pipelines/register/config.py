"""Parameters of the register stage (unknown keys are errors)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from pipelines.strict import StrictConfig


class PromoteIf(StrictConfig):
    metric: str = "test_bpd"
    mode: Literal["min", "max"] = "min"


class RegisterConfig(StrictConfig):
    model_name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    alias: str = Field("champion", pattern=r"^[A-Za-z_][A-Za-z0-9_-]*$")
    promote_if: PromoteIf = PromoteIf()
    tags: dict[str, str] = {}
