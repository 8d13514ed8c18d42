"""Errors in OpenAI's shape, so that every client library reports them as it would OpenAI's:

    HTTP 400  {"error": {"message": "...", "type": "invalid_request_error", "param": "...", "code": null}}

`APIError` is raised anywhere in the server; `install_error_handlers` turns it, request
validation failures (malformed JSON, wrong field types), `UserError`s from the layers below,
and unexpected exceptions into that shape. The server answers every request; none kills it.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from visto.errors import UserError

log = logging.getLogger("visto.serve")

# HTTP status -> OpenAI's error `type`.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout",
    413: "invalid_request_error",
    415: "invalid_request_error",
    429: "rate_limit_exceeded",
    500: "server_error",
    501: "server_error",
    503: "server_error",
    504: "timeout",
}
RETRY_AFTER_S = 1  # seconds a client is told to wait after a 429 or 503


class APIError(Exception):
    """An error answered to the client: `status` and the fields of OpenAI's error object."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    kind = ERROR_TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> JSONResponse:
    headers = None
    if status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    elif status in (429, 503):
        # A busy server is a passing state: clients (the openai SDK among them) wait this
        # many seconds before their retry instead of their own backoff guess.
        headers = {"Retry-After": str(RETRY_AFTER_S)}
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def _location(loc: tuple[Any, ...]) -> str:
    """('body', 'messages', 0, 'content') -> 'messages[0].content'."""
    out = ""
    for part in loc:
        if part == "body":
            continue
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """A one-line message for the first problem pydantic found, and the field it concerns."""
    errors = exc.errors()
    if not errors:
        return "the request body is not valid", None
    first = errors[0]
    if first.get("type") == "json_invalid":
        return (
            "the request body is not valid JSON "
            f"({first.get('ctx', {}).get('error', 'parse error')}); send a JSON object",
            None,
        )
    param = _location(tuple(first.get("loc", ()))) or None
    if param is None:
        return "the request body must be a JSON object (send Content-Type: application/json)", None
    msg = first.get("msg", "invalid value")
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    where = f"{param}: " if param else ""
    return f"{where}{msg}{more}", param


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    @app.exception_handler(UserError)
    async def _user_error(_: Request, exc: UserError) -> JSONResponse:
        return error_response(400, str(exc))

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = validation_message(exc)
        return error_response(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404 and message == "Not Found":
            message = "no such endpoint; see GET /docs for the API"
        return error_response(exc.status_code, message)

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error while serving a request")
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}")
