"""The FastAPI application: endpoints, error format, auth and body limits, metrics, batching, the web page.

``create_app(models, settings, keys)`` builds an app over already-loaded :class:`ServiceModels`; the CLI
(``vlfuse serve``) loads the models once and runs the app under uvicorn.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import logging
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Dict, List, Optional
from urllib.parse import urlencode

import anyio
from fastapi import FastAPI, File, Form, Query, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, Response
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel
from starlette.datastructures import UploadFile as StarletteUploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..data.images import load_image
from ..errors import (
    ConfigError,
    ImageError,
    ImageTooLargeError,
    InputError,
    VlfuseError,
)
from .batching import Batcher
from .metrics import ServiceMetrics
from .models import ServiceModels
from .settings import APIKeys, ServeSettings

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).parent / "static"

KNOWN_ENDPOINTS = {"/", "/healthz", "/readyz", "/metrics", "/docs", "/openapi.json", "/v1/models", "/v1/caption",
                   "/v1/vqa", "/v1/search", "/v1/thumbnail"}
MULTIPART_SLACK = 64 * 1024  # form boundaries and small fields around the one uploaded image
IMAGE_SIGNATURES = (  # the types we accept, by their first bytes (the client's content-type is not trusted)
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)
ACCEPTED_TYPES = "JPEG, PNG, GIF, BMP, WebP or TIFF"


# -- errors ---------------------------------------------------------------------------------------------
class ServiceError(Exception):
    """An HTTP error with a machine-readable code and a message that says what was wrong."""

    def __init__(self, status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers


def error_response(status: int, code: str, message: str, headers: Optional[Dict[str, str]] = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _library_error(exc: VlfuseError) -> ServiceError:
    if isinstance(exc, ImageTooLargeError):
        return ServiceError(413, "image_too_large", str(exc))
    if isinstance(exc, ImageError):
        return ServiceError(400, "bad_image", str(exc))
    if isinstance(exc, (InputError, ConfigError)):
        return ServiceError(422, "invalid_parameter", str(exc))
    return ServiceError(400, "bad_request", str(exc))


HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
              413: "payload_too_large", 415: "unsupported_media_type", 422: "invalid_parameter",
              503: "unavailable", 504: "timeout"}


def _validation_message(exc: RequestValidationError) -> str:
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
    @app.exception_handler(ServiceError)
    async def _service(_, exc: ServiceError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.exception_handler(VlfuseError)
    async def _vlfuse(_, exc: VlfuseError):
        err = _library_error(exc)
        return error_response(err.status, err.code, err.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(_, exc: RequestValidationError):
        return error_response(422, "invalid_parameter", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(_, exc: StarletteHTTPException):
        return error_response(exc.status_code, HTTP_CODES.get(exc.status_code, "http_error"), str(exc.detail),
                              getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _internal(_, exc: Exception):
        log.exception("internal error")
        return error_response(500, "internal_error", f"internal error ({type(exc).__name__}); see the server log")


# -- ASGI middleware: metrics (outermost), then auth and body limit --------------------------------------
def _endpoint_label(path: str) -> str:
    if path in KNOWN_ENDPOINTS:
        return path
    return "/static" if path.startswith("/static/") else "other"


class MetricsMiddleware:
    def __init__(self, app, metrics: ServiceMetrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = _endpoint_label(scope["path"])
        status = {"code": 500}
        start = time.perf_counter()

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.inc(endpoint=endpoint, method=scope["method"], status=str(status["code"]))
            self.metrics.latency.observe(time.perf_counter() - start, endpoint=endpoint)


class GuardMiddleware:
    """401 before any work for protected paths; 413 for bodies over the limit (read at most limit+1 bytes)."""

    def __init__(self, app, keys: APIKeys, max_body_bytes: int):
        self.app, self.keys, self.max_body = app, keys, max_body_bytes

    @staticmethod
    def _presented_key(scope) -> Optional[str]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        auth = headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            return auth[7:].strip()
        return headers.get("x-api-key")

    def _protected(self, path: str) -> bool:
        return self.keys.enabled and (path.startswith("/v1/") or path == "/metrics")

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self._protected(scope["path"]) and not self.keys.check(self._presented_key(scope)):
            has_key = self._presented_key(scope) is not None
            msg = ("API key not accepted" if has_key else
                   "missing API key: send 'Authorization: Bearer KEY' or 'X-API-Key: KEY'")
            resp = error_response(401, "unauthorized", msg, {"WWW-Authenticate": "Bearer"})
            return await resp(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")

        def too_large():  # built only when needed: most requests are not
            return error_response(413, "payload_too_large",
                                  f"request body is over the limit of {self.max_body:,} bytes")

        if length is not None and length.isdigit() and int(length) > self.max_body:
            return await too_large()(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > self.max_body:
                    return await too_large()(scope, receive, send)
                chunks.append(chunk)
                more = message.get("more_body", False)
            body = b"".join(chunks)
            sent = False

            async def replay():
                nonlocal sent
                if not sent:
                    sent = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)


# -- request helpers --------------------------------------------------------------------------------------
def sniff_image_type(data: bytes) -> Optional[str]:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, kind in IMAGE_SIGNATURES:
        if data.startswith(magic):
            return kind
    return None


async def read_image_upload(upload: Any, settings: ServeSettings, offload, field: str = "image",
                            prepare: Optional[Callable[[Any], Any]] = None):
    """An uploaded file -> decoded RGB PIL image (decoded by ``offload``, off the event loop), or ServiceError
    400/413/415. With ``prepare`` (e.g. a model's preprocessing), ``prepare(image)`` instead, computed in the same
    worker-thread hop as the decoding (one handoff per request, not two)."""
    if not isinstance(upload, StarletteUploadFile):
        raise ServiceError(422, "invalid_parameter", f"{field}: must be an uploaded file (multipart/form-data)")
    data = await upload.read(settings.max_upload_bytes + 1)
    name = upload.filename or field
    if len(data) > settings.max_upload_bytes:
        raise ServiceError(413, "upload_too_large",
                           f"{name}: upload is over the limit of {settings.max_upload_bytes:,} bytes")
    if not data:
        raise ServiceError(400, "bad_image", f"{name}: file is empty (0 bytes)")
    if sniff_image_type(data) is None:
        raise ServiceError(415, "unsupported_media_type",
                           f"{name}: not a supported image type (content-type {upload.content_type or 'unknown'}); "
                           f"send {ACCEPTED_TYPES}")
    try:
        if prepare is None:
            return await offload(load_image, data, settings.max_pixels)
        return await offload(lambda: prepare(load_image(data, settings.max_pixels)))
    except ImageError as exc:  # name the upload, not "<N bytes>"
        raise _library_error(type(exc)(str(exc).replace(f"<{len(data)} bytes>", name))) from None


# -- response models (for the OpenAPI docs) ---------------------------------------------------------------
class CaptionResponse(BaseModel):
    caption: str
    score: float
    tokens: List[str]
    beam: int
    model: str


class AnswerScore(BaseModel):
    answer: str
    probability: float


class VQAResponse(BaseModel):
    question: str
    answer: str
    probability: float
    top: List[AnswerScore]
    model: str


class SearchHitModel(BaseModel):
    path: str
    score: float
    thumbnail: str


class SearchResponse(BaseModel):
    query: Dict[str, Any]
    hits: List[SearchHitModel]
    model: str


class SearchRequest(BaseModel):
    text: str
    k: int = 5


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 413, 415, 422, 503, 504)}


# -- the app ----------------------------------------------------------------------------------------------
def create_app(models: ServiceModels, settings: Optional[ServeSettings] = None,
               keys: Optional[APIKeys] = None) -> FastAPI:
    settings = settings or ServeSettings()
    keys = keys or APIKeys([])
    metrics = ServiceMetrics()
    for task, ok in models.loaded().items():
        metrics.model_loaded.set(1.0 if ok else 0.0, model=task)
    state: Dict[str, Any] = {"ready": False, "batchers": {}, "limiter": None}

    async def offload(fn, *args):
        """Run CPU work (image decoding, preprocessing, thumbnails) in a worker thread; a few at a time, so
        bursts of uploads neither oversubscribe the cores nor multiply memory."""
        return await anyio.to_thread.run_sync(fn, *args, limiter=state["limiter"])

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        # inference workers: each runs one batch at a time with torch's own threads (``--threads``); several
        # workers keep several cores busy with whole batches, since small decoding steps hardly parallelise
        workers = settings.inference_workers
        executor = concurrent.futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="vlfuse-infer")
        wait_s = settings.batch_wait_ms / 1000.0
        batchers = {}
        if models.captioner is not None:
            batchers["caption"] = Batcher(
                "caption", models.caption_batch,
                executor, settings.max_batch_size, wait_s, metrics, workers)
        if models.vqa is not None:
            batchers["vqa"] = Batcher("vqa", models.vqa_batch, executor, settings.max_batch_size, wait_s, metrics,
                                      workers)
        if models.loaded()["retrieval"]:
            batchers["search"] = Batcher("search", models.search_batch, executor, settings.max_batch_size, wait_s,
                                         metrics, workers)
        for b in batchers.values():
            b.start()
        state["batchers"] = batchers
        state["limiter"] = anyio.CapacityLimiter(settings.image_workers)
        state["ready"] = True
        try:
            yield
        finally:
            state["ready"] = False
            for b in batchers.values():
                await b.stop()
            executor.shutdown(wait=True)

    app = FastAPI(title="vlfuse", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="Caption photos, answer questions about them and search an image index. "
                              "Send the API key as `Authorization: Bearer KEY` or `X-API-Key: KEY`. "
                              "Errors are JSON: `{\"error\": {\"code\": ..., \"message\": ...}}`.")
    install_error_handlers(app)
    app.add_middleware(GuardMiddleware, keys=keys, max_body_bytes=settings.max_upload_bytes + MULTIPART_SLACK)
    app.add_middleware(MetricsMiddleware, metrics=metrics)
    app.state.metrics, app.state.models, app.state.settings = metrics, models, settings
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    def batcher(task: str) -> Batcher:
        b = state["batchers"].get(task)
        if b is None:
            model_task = "retrieval" if task == "search" else task
            reason = models.describe()[model_task].get("reason", "not loaded")
            raise ServiceError(503, "model_not_loaded", f"the {model_task} model is not loaded: {reason}")
        return b

    async def within_timeout(work: Awaitable):
        try:
            return await asyncio.wait_for(work, settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise ServiceError(504, "timeout",
                               f"request took longer than {settings.request_timeout_s:g} s and was abandoned") from None

    # -- pages and probes ----------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def index_page():
        return FileResponse(STATIC_DIR / "index.html")

    @app.get("/docs", include_in_schema=False)
    async def docs_page():
        return FileResponse(STATIC_DIR / "docs.html")

    @app.get("/healthz", summary="Liveness: the process is up (no auth)")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: models are loaded and batching runs",
             responses={503: {"model": ErrorResponse}})
    async def readyz():
        loaded = models.loaded()
        if not state["ready"] or not any(loaded.values()):
            return error_response(503, "not_ready", "no model is loaded" if state["ready"] else "starting up")
        return {"ready": True, "models": loaded}

    @app.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics_page():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", summary="Which models are loaded, and the request limits")
    async def list_models():
        return {"models": models.describe(),
                "limits": {"max_upload_bytes": settings.max_upload_bytes, "max_pixels": settings.max_pixels,
                           "max_beam": settings.max_beam, "max_top_k": settings.max_top_k, "max_k": settings.max_k,
                           "max_question_chars": settings.max_question_chars,
                           "max_query_chars": settings.max_query_chars,
                           "request_timeout_s": settings.request_timeout_s},
                "batching": {"max_batch_size": settings.max_batch_size, "batch_wait_ms": settings.batch_wait_ms,
                             "inference_workers": settings.inference_workers},
                "version": __version__}

    # -- captioning ------------------------------------------------------------------------------------
    @app.post("/v1/caption", summary="Caption an uploaded photo", response_model=CaptionResponse, responses=ERRORS)
    async def caption(image: UploadFile = File(..., description=f"the photo ({ACCEPTED_TYPES})"),
                      beam: Optional[int] = Form(None, ge=1, le=settings.max_beam,
                                                 description="beam width, 1 = greedy (default: the model's own "
                                                             "decoding, see /v1/models)"),
                      max_len: Optional[int] = Form(None, ge=1, le=50,
                                                    description="at most this many words (default: the model's)")):
        b = batcher("caption")
        decode = models.caption_decode(beam, max_len)  # batched with the requests that decode alike
        pixels = await read_image_upload(image, settings, offload, prepare=models.caption_pixels)
        result = await within_timeout(b.submit(pixels, key=decode))
        return {"caption": result.caption, "score": float(result.score), "tokens": list(result.tokens),
                "beam": decode.width, "model": models.names.get("caption", "")}

    # -- VQA -------------------------------------------------------------------------------------------
    @app.post("/v1/vqa", summary="Answer a question about an uploaded photo", response_model=VQAResponse,
              responses=ERRORS)
    async def vqa(image: UploadFile = File(..., description=f"the photo ({ACCEPTED_TYPES})"),
                  question: str = Form(..., description=f"at most {settings.max_question_chars} characters"),
                  top_k: int = Form(3, ge=1, le=settings.max_top_k, description="how many ranked answers")):
        b = batcher("vqa")
        question = question.strip()
        if not question:
            raise ServiceError(422, "invalid_parameter", "question: is empty; type a question about the photo")
        if len(question) > settings.max_question_chars:
            raise ServiceError(422, "invalid_parameter", f"question: is {len(question)} characters long, over the "
                               f"limit of {settings.max_question_chars}")
        pixels = await read_image_upload(image, settings, offload, prepare=models.vqa_pixels)
        ans = await within_timeout(b.submit((pixels, question), key=top_k))
        return {"question": question, "answer": ans.answer, "probability": float(ans.probability),
                "top": [{"answer": a, "probability": float(p)} for a, p in ans.top],
                "model": models.names.get("vqa", "")}

    # -- retrieval -------------------------------------------------------------------------------------
    search_body = {"requestBody": {"required": True, "content": {
        "application/json": {"schema": SearchRequest.model_json_schema()},
        "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
            "image": {"type": "string", "format": "binary"}, "k": {"type": "integer", "default": 5}}}}}}}

    @app.post("/v1/search", summary="Search the image index by text (JSON) or by an uploaded photo (multipart)",
              response_model=SearchResponse, responses=ERRORS, openapi_extra=search_body)
    async def search(request: Request):
        b = batcher("search")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ServiceError(400, "bad_request", f"body is not valid JSON ({exc})") from None
            if not isinstance(body, dict):
                raise ServiceError(422, "invalid_parameter", 'body must be a JSON object {"text": ..., "k": ...}')
            unknown = sorted(set(body) - {"text", "k"})
            if unknown:
                raise ServiceError(422, "invalid_parameter", f"unknown field(s) {unknown}; expected text and k")
            text, k = body.get("text"), _check_k(body.get("k", 5), settings)
            if not isinstance(text, str) or not text.strip():
                raise ServiceError(422, "invalid_parameter", "text: give a non-empty search text")
            text = text.strip()
            if len(text) > settings.max_query_chars:
                raise ServiceError(422, "invalid_parameter", f"text: is {len(text)} characters long, over the "
                                   f"limit of {settings.max_query_chars}")
            kind, query, echo = "text", text, {"text": text, "k": k}
        elif ctype == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=4)
            if "image" not in form:
                raise ServiceError(422, "invalid_parameter", "image: this field is required")
            k = _check_k(form.get("k", 5), settings)
            query = await read_image_upload(form["image"], settings, offload)
            kind, echo = "image", {"image": getattr(form["image"], "filename", None) or "image", "k": k}
        else:
            raise ServiceError(415, "unsupported_media_type", "send application/json {\"text\": ..., \"k\": ...} "
                               "or multipart/form-data with an image field")
        hits = await within_timeout(b.submit((query, k), key=kind))
        return {"query": echo, "model": models.names.get("retrieval", ""),
                "hits": [{"path": h.path, "score": float(h.score),
                          "thumbnail": "/v1/thumbnail?" + urlencode({"path": h.path})}
                         for h in hits]}

    @app.get("/v1/thumbnail", name="thumbnail", summary="JPEG thumbnail of an indexed image",
             response_class=Response, responses={404: {"model": ErrorResponse}, 200: {"content": {"image/jpeg": {}}}})
    async def thumbnail(path: str = Query(..., description="a path exactly as returned in search hits")):
        batcher("search")  # 503 when retrieval is not loaded
        if not models.in_index(path):
            raise ServiceError(404, "not_found", "no such image in the index (thumbnails are served only for "
                               "indexed images)")
        data = await offload(models.thumbnail, path)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    return app


def _check_k(value: Any, settings: ServeSettings) -> int:
    try:
        k = int(value)
        if isinstance(value, float) and k != value or isinstance(value, bool):
            raise ValueError
    except (TypeError, ValueError):
        raise ServiceError(422, "invalid_parameter", f"k: must be a whole number, got {value!r}") from None
    if not 1 <= k <= settings.max_k:
        raise ServiceError(422, "invalid_parameter", f"k: must be between 1 and {settings.max_k}, got {k}")
    return k
