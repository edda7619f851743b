"""How the service reports errors: every failure is a JSON body ``{"error": {"code": ..., "message": ...}}`` with
its HTTP status, whether a route raised it, the library did (bad image, bad option), FastAPI's validation did,
Starlette did (404, 405) or something broke (500)."""
from __future__ import annotations

import logging
from typing import Dict, Optional

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import (ConfigError, ImageError, ImageTooLargeError, InputError, VideoError, VideoTooLongError,
                      VlfuseError)

log = logging.getLogger(__name__)

# the codes of the errors Starlette raises itself, by status
HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
              413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_parameter",
              503: "unavailable", 504: "timeout"}


class ServiceError(Exception):
    """An HTTP error with a machine-readable code and a message that says what was wrong."""

    def __init__(self, status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    """The service's error body as a response."""
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def library_error(exc: VlfuseError) -> ServiceError:
    """The HTTP error for an error the library raised on a request's input."""
    if isinstance(exc, ImageTooLargeError):
        return ServiceError(413, "image_too_large", str(exc))
    if isinstance(exc, ImageError):
        return ServiceError(400, "bad_image", str(exc))
    if isinstance(exc, VideoTooLongError):
        return ServiceError(413, "video_too_large", str(exc))
    if isinstance(exc, VideoError):
        return ServiceError(400, "bad_video", str(exc))
    if isinstance(exc, (InputError, ConfigError)):
        return ServiceError(422, "invalid_parameter", str(exc))
    return ServiceError(400, "bad_request", str(exc))


def validation_message(exc: RequestValidationError) -> str:
    """FastAPI's validation errors as one line: ``field: what is wrong; ...``."""
    parts = []
    for err in exc.errors():
        loc = [str(x) for x in err.get("loc", ())]
        if loc and loc[0] in ("body", "query", "path", "header"):
            loc = loc[1:]
        field = ".".join(loc) or "request"
        msg = err.get("msg", "invalid")
        if err.get("type") == "missing":
            msg = "this field is required"
        parts.append(f"{field}: {msg}")
    return "; ".join(parts) or "invalid request"


def install_error_handlers(app: FastAPI) -> None:
    """Make every error ``app`` answers the service's JSON error body."""

    @app.exception_handler(ServiceError)
    async def _service(_, exc: ServiceError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(VlfuseError)
    async def _vlfuse(_, exc: VlfuseError):
        err = library_error(exc)
        return error_response(err.status, err.code, err.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, exc: RequestValidationError):
        return error_response(422, "invalid_parameter", validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        return error_response(exc.status_code, HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail),
                              getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_, exc: Exception):
        log.exception("internal error")
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log")
