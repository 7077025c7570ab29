"""What the agent sends stays inside what the service accepts: a diverged metric, an
exception text with NUL bytes or a huge traceback never turns the trial's end into a 422."""

from __future__ import annotations

import math

import pytest
from pydantic import ValidationError

from trainer.protocol import (
    MAX_MESSAGE,
    MAX_METRIC_NAME,
    MAX_METRICS,
    MAX_STEP,
    MAX_TRACEBACK,
    CompleteRequest,
    FailRequest,
    FailureReason,
    ReportRequest,
    clean_text,
    finite_metrics,
)


def test_finite_metrics_drops_what_the_schema_refuses() -> None:
    metrics = {
        "accuracy": 0.5,
        "loss": math.nan,
        "train_loss": math.inf,
        "f1\x00": 0.1,
        "m" * (MAX_METRIC_NAME + 1): 0.2,
        "": 0.3,
    }
    assert finite_metrics(metrics) == {"accuracy": 0.5}
    many = {f"m{i}": float(i) for i in range(MAX_METRICS + 10)}
    kept = finite_metrics(many)
    assert len(kept) == MAX_METRICS
    ReportRequest(step=1, metrics=kept)
    CompleteRequest(step=1, metrics=finite_metrics(metrics), duration_s=1.0)


def test_schema_refuses_what_finite_metrics_drops() -> None:
    with pytest.raises(ValidationError):
        ReportRequest(step=1, metrics={"loss": math.nan})
    with pytest.raises(ValidationError):
        ReportRequest(step=MAX_STEP + 1, metrics={})
    with pytest.raises(ValidationError):
        CompleteRequest(step=1, metrics={}, duration_s=math.inf)


def test_clean_text_makes_any_exception_text_sendable() -> None:
    message = "bad byte \x00 bell \x07 surrogate \ud800 tab\tline\n" * 2000
    traceback = "Traceback (most recent call last):\n" + "  frame\n" * 100_000 + "ValueError: \x00the end"
    request = FailRequest(
        reason=FailureReason.NAN,
        message=clean_text(message, MAX_MESSAGE),
        traceback=clean_text(traceback, MAX_TRACEBACK, keep_end=True),
        step=3,
    )
    assert len(request.message) <= MAX_MESSAGE and "\t" in request.message and "\n" in request.message
    assert request.traceback is not None and request.traceback.endswith("ValueError: \ufffdthe end")
    with pytest.raises(ValidationError):
        FailRequest(reason=FailureReason.ERROR, message=message[:100])
