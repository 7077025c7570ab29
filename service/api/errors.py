"""The one place that turns errors into HTTP responses.

Every 4xx body has the same shape, so clients read one format:

    {"detail": [{"field": "spec.search_space.learning_rate.low", "reason": "must be > 0 for a log range"}]}

Domain errors map by type (Invalid 422, NotFound 404, Conflict/LeaseLost 409,
Unauthorized 401, Forbidden 403, Unavailable 503); FastAPI's request validation
errors (including malformed JSON) become the same 422 shape; an oversized body is
a 413; anything else is a logged 500 with a generic message. A 503 and a 500 never
carry exception text (database driver messages name hosts, ports and roles): the
log has it, the body has a fixed sentence.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Sequence
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from optuna.exceptions import StorageInternalError
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError, SQLAlchemyError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from service.errors import (
    Conflict,
    DomainError,
    Forbidden,
    Invalid,
    NotFound,
    Unauthorized,
    Unavailable,
    dotted,
)

log = logging.getLogger(__name__)

# Most specific first: LeaseLost is a Conflict.
_STATUS: tuple[tuple[type[DomainError], int], ...] = (
    (Invalid, 422),
    (NotFound, 404),
    (Conflict, 409),
    (Unauthorized, 401),
    (Forbidden, 403),
    (Unavailable, 503),
)
# The only text a 503 carries (see _domain_error).
UNAVAILABLE_REASON = "database unavailable; retry later"
_LOC_SOURCES = {"body", "query", "path", "header", "cookie"}
_MSG_PREFIXES = ("Value error, ", "Assertion failed, ")


def problem(
    status: int, items: Sequence[tuple[str | None, str]], headers: dict[str, str] | None = None
) -> JSONResponse:
    # Fields and reasons quote user input (keys, values); neither may echo a huge one back.
    detail = [
        {"field": None if field is None else dotted(field.split(".")), "reason": _cut(reason, MAX_REASON)}
        for field, reason in items[:MAX_ITEMS]
    ]
    return JSONResponse({"detail": detail}, status_code=status, headers=headers)


MAX_REASON = 2000
MAX_ITEMS = 50


def _cut(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def status_for(exc: DomainError) -> int:
    for cls, status in _STATUS:
        if isinstance(exc, cls):
            return status
    return 400


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, DomainError)
    status = status_for(exc)
    if isinstance(exc, Invalid):
        return problem(status, list(exc.items))
    field, reason = exc.field, exc.message
    headers = None
    if isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": "Bearer"}
        field = field or "authorization"
    elif isinstance(exc, Forbidden):
        field = field or "authorization"
    elif isinstance(exc, Unavailable):
        # The message may carry the driver's text (host, port, role, database names):
        # it goes to the server log only; an unauthenticated caller (/readyz) learns
        # nothing about the deployment.
        log.warning("unavailable on %s %s: %s", request.method, request.url.path, " ".join(exc.message.split()))
        field, reason = None, UNAVAILABLE_REASON
        headers = {"Retry-After": "5"}
    return problem(status, [(field, reason)], headers)


def dotted_field(loc: Sequence[str | int]) -> str:
    """('body', 'spec', 'search_space', 'lr', 'low') -> 'spec.search_space.lr.low'."""
    parts = list(loc)
    if parts and parts[0] in _LOC_SOURCES:
        source = str(parts.pop(0))
        if not parts:
            return source
    return dotted(parts)


def validation_items(errors: Sequence[Any]) -> list[tuple[str | None, str]]:
    items: list[tuple[str | None, str]] = []
    for err in errors:
        kind = err.get("type", "")
        loc = tuple(err.get("loc", ()))
        msg = str(err.get("msg", "invalid"))
        if kind == "json_invalid":
            # loc is ('body', character offset); say where and what, not just "decode error"
            pos = loc[1] if len(loc) > 1 else "?"
            detail = (err.get("ctx") or {}).get("error", "not valid JSON")
            items.append(("body", f"malformed JSON at character {pos}: {detail}"))
            continue
        for prefix in _MSG_PREFIXES:
            if msg.startswith(prefix):
                msg = msg[len(prefix):]
        if kind == "extra_forbidden":
            msg = "unknown field (not allowed here; check the spelling)"
        elif kind == "missing" and loc == ("body",):
            msg = "a JSON request body is required"
        items.append((dotted_field(loc), msg))
    return items or [("body", "invalid request")]


async def _request_validation(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return problem(422, validation_items(exc.errors()))


def _unparsable(cause: BaseException) -> str:
    if isinstance(cause, UnicodeDecodeError):
        return f"not UTF-8 text (byte {cause.start})"
    if isinstance(cause, RecursionError):
        return "nested too deeply"
    if isinstance(cause, ValueError) and "digits" in str(cause):
        return "a number has too many digits"  # Python refuses int strings over 4300 digits
    return "cannot be read as JSON"


async def _http_exception(_request: Request, exc: Exception) -> JSONResponse:
    # Starlette's own (404 for an unknown route, 405, our 413 from the body limit).
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 400 and exc.__cause__ is not None:
        # FastAPI's body reader failed below JSON syntax: the body is malformed JSON like
        # any other (422 naming the body), and the client learns which limit it broke.
        return problem(422, [("body", f"malformed JSON: {_unparsable(exc.__cause__)}")])
    field = "body" if exc.status_code == 413 else None
    return problem(exc.status_code, [(field, str(exc.detail))], dict(exc.headers or {}) or None)


def _database_outage(exc: BaseException | None) -> bool:
    """Whether `exc` (or what it wraps) says the database could not be reached."""
    while exc is not None:
        if isinstance(exc, OperationalError | InterfaceError | PoolTimeout):
            return True
        if isinstance(exc, DBAPIError) and exc.connection_invalidated:
            return True
        exc = exc.__cause__
    return False


async def _storage_error(request: Request, exc: Exception) -> JSONResponse:
    # Optuna's storage (and SQLAlchemy under it) raise their own types, not our
    # Unavailable: a dropped connection there is an outage like any other (503), and
    # the worker's client retries it; anything else is a bug (500).
    if _database_outage(exc):
        return await _domain_error(request, Unavailable(f"database unavailable: {exc.__cause__ or exc}"))
    return await _internal_error(request, exc)


async def _internal_error(request: Request, exc: Exception) -> JSONResponse:
    # Registered for Exception: Starlette calls it from its outermost middleware for
    # anything no other handler took. The client learns nothing internal; the log does.
    log.error("internal error on %s %s", request.method, request.url.path, exc_info=exc)
    return problem(500, [(None, "internal server error; the server log has the details")])


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(DomainError, _domain_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)
    for storage_error in (StorageInternalError, SQLAlchemyError):
        app.add_exception_handler(storage_error, _storage_error)
    app.add_exception_handler(Exception, _internal_error)


class BodyTooLarge(StarletteHTTPException):
    def __init__(self, limit: int) -> None:
        super().__init__(status_code=413, detail=f"request body larger than {limit} bytes")


class BodySizeLimit:
    """Pure ASGI middleware: refuse a body over the limit with 413.

    Checks the declared Content-Length first (refused before reading a byte), then
    counts the bytes actually streamed, since a chunked body declares no length.
    `limit_for(scope)` picks the limit per request, so an upload route can allow more.
    """

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int]) -> None:
        self.app = app
        self.limit_for = limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = _content_length(scope)
        if declared == -1:
            await _send_json(send, 400, "body", "Content-Length header is not a number")
            return
        if declared is not None and declared > limit:
            await _send_json(send, 413, "body", BodyTooLarge(limit).detail)
            return

        received = 0
        started = False

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    # An HTTPException, so FastAPI's body reader re-raises it and the
                    # handler above renders the usual 413 body.
                    raise BodyTooLarge(limit)
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge as exc:
            # Read outside a route (no handler ran): answer here unless a response began.
            if started:
                raise
            await _send_json(send, 413, "body", exc.detail)


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            try:
                return int(value)
            except ValueError:
                return -1
    return None


async def _send_json(send: Send, status: int, field: str | None, reason: str) -> None:
    body = json.dumps({"detail": [{"field": field, "reason": reason}]}).encode()
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": body})
