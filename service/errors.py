"""Domain errors. Service code raises these; `service.api.errors` maps them to HTTP
and the CLI to one-line messages, so neither side needs the other's types."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

# A field path names user input (an unknown key can be any size): each step is cut to
# this, so an error never echoes a megabyte key back.
MAX_FIELD_STEP = 100


def dotted(parts: Sequence[Any]) -> str:
    """('search_space', 'lr', 'low') -> 'search_space.lr.low', long steps shortened."""
    steps = (str(p) for p in parts)
    return ".".join(s if len(s) <= MAX_FIELD_STEP else s[: MAX_FIELD_STEP - 1] + "…" for s in steps)


class DomainError(Exception):
    """Base of every error the service reports to a caller.

    `field` (optional) names the input the error is about, e.g. `study_id` for a
    study that is not found; `Invalid` always has one.
    """

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field


class Invalid(DomainError):
    """Input that cannot be accepted: names the field (dotted path) and the reason. HTTP 422."""

    def __init__(self, field: str, reason: str, *, more: Sequence[tuple[str, str]] = ()) -> None:
        super().__init__(f"{field}: {reason}", field=field)
        self.field: str = field
        self.reason = reason
        # Every problem found at once (a schema check reports all of them), first one included.
        self.items: list[tuple[str, str]] = [(field, reason), *more]


class NotFound(DomainError):
    """No such resource, or not one the caller may see. HTTP 404."""


class Conflict(DomainError):
    """The request clashes with stored state (duplicate name, wrong state). HTTP 409."""


class LeaseLost(Conflict):
    """A write from a lease that expired or belongs to someone else. HTTP 409."""


class Unauthorized(DomainError):
    """Missing or unknown token. HTTP 401."""


class Forbidden(DomainError):
    """A known token whose role may not do this. HTTP 403."""


class Unavailable(DomainError):
    """The database cannot be reached or stayed locked after retries. HTTP 503."""
