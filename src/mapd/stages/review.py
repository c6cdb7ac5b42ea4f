"""Simulated peer review: every other teacher scores each rationale 1-5; acceptance rule."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field


class ReviewConfig(BaseModel):
    """How rationales are reviewed and accepted (METHOD.md step 4)."""

    enabled: bool = Field(True, description="Peer review on; off accepts every rationale (an ablation).")
    threshold: float = Field(3.0, description="Acceptance threshold on the aggregated valid scores.")
    comparison: Literal[">", ">="] = Field(">", description="Accept when aggregate > threshold (the paper) or >=.")
    aggregator: Literal["mean", "median", "min"] = Field("mean", description="How valid scores are combined.")
    max_reviewers: int | None = Field(None, ge=1, description="Use at most this many other teachers as reviewers.")
    require_gold_answer: bool = Field(
        False, description="Also require the rationale's own final answer to equal the gold answer (off: faithful to the paper)."
    )

    model_config = {"extra": "forbid"}
