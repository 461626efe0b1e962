"""Setting types several stages' config sections share, validated where the configuration is loaded."""
from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator


def _positive(scales: tuple[float, ...]) -> tuple[float, ...]:
    if not scales or any(s <= 0 for s in scales):
        raise ValueError(f"scales must be a non-empty list of positive numbers, got {list(scales)}")
    return scales


Scales = Annotated[tuple[float, ...], AfterValidator(_positive)]  # image scales, e.g. multi-scale inference
