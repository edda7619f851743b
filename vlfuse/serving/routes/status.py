"""The web page, the API docs, the probes (liveness, readiness), Prometheus metrics and the list of models."""
from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import FileResponse, PlainTextResponse, Response

from ... import __version__
from ..errors import error_response
from ..schemas import ErrorResponse
from ..service import Service

STATIC_DIR = Path(__file__).resolve().parents[1] / "static"


def router(service: Service) -> APIRouter:
    models, settings = service.models, service.settings
    r = APIRouter()

    @r.get("/", include_in_schema=False)
    async def index_page():
        return FileResponse(STATIC_DIR / "index.html")

    @r.get("/docs", include_in_schema=False)
    async def docs_page():
        return FileResponse(STATIC_DIR / "docs.html")

    @r.get("/healthz", summary="Liveness: the process is up (no auth)")
    async def healthz():
        return {"status": "ok"}

    @r.get("/readyz", summary="Readiness: models are loaded and batching runs",
           responses={503: {"model": ErrorResponse}})
    async def readyz():
        loaded = models.loaded()
        if not service.ready or not any(loaded.values()):
            return error_response(503, "not_ready", "no model is loaded" if service.ready else "starting up")
        return {"ready": True, "models": loaded}

    @r.get("/metrics", summary="Prometheus metrics", response_class=PlainTextResponse)
    async def metrics_page(request: Request):
        body, content_type = service.metrics.render(request.headers.get("accept", ""))
        return Response(body, media_type=content_type)

    @r.get("/v1/models", summary="Which models are loaded, and the request limits")
    async def list_models():
        return {"models": models.describe(),
                "limits": {"max_upload_bytes": settings.max_upload_bytes, "max_pixels": settings.max_pixels,
                           "max_beam": settings.max_beam, "max_top_k": settings.max_top_k, "max_k": settings.max_k,
                           "max_question_chars": settings.max_question_chars,
                           "max_query_chars": settings.max_query_chars,
                           "max_video_bytes": settings.max_video_bytes,
                           "max_video_seconds": settings.max_video_seconds,
                           "request_timeout_s": settings.request_timeout_s},
                "batching": {"max_batch_size": settings.max_batch_size, "batch_wait_ms": settings.batch_wait_ms,
                             "inference_workers": settings.inference_workers},
                "version": __version__}

    return r
