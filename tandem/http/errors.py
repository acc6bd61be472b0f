"""OpenAI-shaped errors: every failure a client sees has the body OpenAI's SDKs expect.

`{"error": {"message", "type", "param", "code"}}` lets the official clients raise the right
exception class and show the message; FastAPI's own `{"detail": ...}` 422s would not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import msgspec
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

_TYPE_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "server_error",
}


class APIError(Exception):
    """An error to return to the client as an OpenAI-shaped JSON body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        error_type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        default_type = "server_error" if status >= 500 else "invalid_request_error"
        self.type = error_type or _TYPE_BY_STATUS.get(status, default_type)
        self.headers = headers

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def response(self) -> Response:
        return Response(
            content=msgspec.json.encode(self.body()),
            status_code=self.status,
            media_type="application/json",
            headers=self.headers,
        )


def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)


# Pydantic names union branches and wrappers in error locations ("prompt", "list[int]", 0);
# a client wants the path through its own JSON ("prompt.0").
def _param_from_loc(loc: Sequence[int | str]) -> str | None:
    parts: list[str] = []
    for item in loc:
        if item == "body":
            continue
        if isinstance(item, int):
            parts.append(str(item))
        elif "[" in item or "-" in item or item in {"str", "int", "float", "bool", "list", "dict"}:
            continue
        else:
            parts.append(item)
    return ".".join(parts) or None


def from_validation_errors(errors: Sequence[Any]) -> APIError:
    """Turn pydantic's error list into one 400 that names the offending field."""
    if not errors:
        return bad_request("invalid request body")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = first.get("ctx", {}).get("error", first.get("msg", ""))
        return bad_request(
            f"We could not parse the JSON body of your request ({detail}). The body must be a "
            "valid JSON object.",
            code="invalid_json",
        )
    param = _param_from_loc(first.get("loc", ()))
    kind = first.get("type", "")
    msg = first.get("msg", "invalid value")
    if kind == "missing":
        text = f"Missing required parameter: '{param}'."
        return bad_request(text, param=param, code="missing_required_parameter")
    if kind == "extra_forbidden":
        return bad_request(f"Unrecognized request argument: '{param}'.", param=param)
    if param is None:
        return bad_request(f"Invalid request body: {msg}.", code="invalid_type")
    return bad_request(f"Invalid value for '{param}': {msg}.", param=param, code="invalid_type")


def install_handlers(app: FastAPI) -> None:
    """Route every error path (ours, FastAPI's validation, 404/405, crashes) to one shape."""

    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> Response:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _request_validation(_: Request, exc: RequestValidationError) -> Response:
        return from_validation_errors(exc.errors()).response()

    @app.exception_handler(ValidationError)
    async def _validation(_: Request, exc: ValidationError) -> Response:
        return from_validation_errors(exc.errors()).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> Response:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        return APIError(exc.status_code, message, headers=exc.headers).response()

    @app.exception_handler(Exception)
    async def _crash(_: Request, exc: Exception) -> Response:
        return APIError(500, f"internal server error: {type(exc).__name__}: {exc}").response()
