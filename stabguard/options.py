"""The base of every guard's options model."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class GuardOptions(BaseModel):
    """Options of one guard, read from the recipe's ``[guards.<name>]`` table.

    Subclass it and declare fields with defaults; unknown keys are rejected with the allowed names.
    Values are strict: ``max_consecutive = "5"`` is an error, not 5 (an integer is still taken for a
    float). ``enabled = false`` in the recipe switches the guard off.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, strict=True)

    enabled: bool = Field(default=True, description="false: the guard is not registered for the run")
