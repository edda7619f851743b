"""The FastAPI application, composed of the parts beside it:

- ``service``    the loaded models (``models``), batching and upload workers the routes share;
- ``routes/``    the endpoints, one router per concern (status and page, caption, VQA, search, tags, subtitle);
- ``middleware`` metrics, then the API-key and body-size guard, around every request;
- ``errors``     every failure as ``{"error": {"code", "message"}}``; ``schemas`` the bodies' OpenAPI shapes.

``create_app(models, settings, keys)`` builds an app over already-loaded :class:`ServiceModels`; the CLI
(``vlfuse serve``) loads the models once and runs the app under uvicorn.
"""
from __future__ import annotations

from typing import Optional

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from .. import __version__
from .errors import install_error_handlers
from .metrics import ServiceMetrics
from .middleware import GuardMiddleware, MetricsMiddleware
from .models import ServiceModels
from .routes import caption, search, status, subtitle, tags, vqa
from .routes.status import STATIC_DIR
from .service import Service
from .settings import APIKeys, ServeSettings

MULTIPART_SLACK = 64 * 1024  # form boundaries and small fields around the one uploaded image

DESCRIPTION = ("Caption photos, answer questions about them, tag them with the concepts they show, search an "
               "image index and subtitle videos shot by shot. "
               "Send the API key as `Authorization: Bearer KEY` or `X-API-Key: KEY`. "
               "Errors are JSON: `{\"error\": {\"code\": ..., \"message\": ...}}`.")


def create_app(models: ServiceModels, settings: Optional[ServeSettings] = None,
               keys: Optional[APIKeys] = None) -> FastAPI:
    """The ASGI app serving ``models`` within ``settings``' limits; with ``keys``, /v1/* and /metrics need one."""
    settings = settings or ServeSettings()
    keys = keys or APIKeys([])
    service = Service(models, settings, ServiceMetrics())
    app = FastAPI(title="vlfuse", version=__version__, lifespan=lambda _app: service.running(),
                  docs_url=None, redoc_url=None, description=DESCRIPTION)
    install_error_handlers(app)
    # added last = outermost: metrics see every request, the refused ones too
    app.add_middleware(GuardMiddleware, keys=keys, max_body_bytes=settings.max_upload_bytes + MULTIPART_SLACK,
                       path_limits={"/v1/subtitle": settings.max_video_bytes + MULTIPART_SLACK})
    app.add_middleware(MetricsMiddleware, metrics=service.metrics)
    app.state.service = service
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    for routes in (status, caption, vqa, search, tags, subtitle):
        app.include_router(routes.router(service))
    return app
