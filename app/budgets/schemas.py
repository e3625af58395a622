"""What the budgets API takes and returns: the tenant's caps and run limits, and usage."""

from __future__ import annotations

from decimal import Decimal
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer

from app.budgets.service import DEFAULT_LIMITS, USD_DIGITS, USD_PLACES, usd_text
from app.runs.schemas import RunLimits

# What the column holds (refused past it, never rounded), read back as written.
Usd = Annotated[
    Decimal,
    Field(ge=0, max_digits=USD_DIGITS, decimal_places=USD_PLACES),
    PlainSerializer(usd_text, return_type=str, when_used="json"),
]


class BudgetSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    hourly_usd: Usd | None = Field(default=None, description="Cap on the tenant's spend per clock hour (UTC)")
    daily_usd: Usd | None = Field(default=None, description="Cap on the tenant's spend per day (UTC)")
    on_exhausted: Literal["pause", "fail"] = Field(
        default="pause", description="What a run does when a limit or cap is hit: pause (resume later) or fail"
    )
    run_defaults: RunLimits = Field(
        default_factory=RunLimits, description=f"Defaults for runs (built in: {DEFAULT_LIMITS})"
    )
    run_maximums: RunLimits = Field(default_factory=RunLimits, description="What workflows and runs may ask for")

    @classmethod
    def from_row(cls, row: dict[str, Any] | None) -> BudgetSettings:
        """The settings stored in a ``budget`` row (the defaults when there is none)."""
        if row is None:
            return cls()
        return cls(
            hourly_usd=row["hourly_usd"],
            daily_usd=row["daily_usd"],
            on_exhausted=row["on_exhausted"],
            run_defaults=RunLimits(**row["run_defaults"]),
            run_maximums=RunLimits(**row["run_maximums"]),
        )


class Usage(BaseModel):
    hour: dict[str, Any]
    day: dict[str, Any]
    run: dict[str, Any] | None = Field(
        default=None, description="With ?run=: its limits and usage; tool_calls counts what max_steps limits "
        "(agents' model turns and the tool calls they chose; not tool steps or map items)",
    )
