"""``POST /v1/search``: search the image index by text or by photo; ``GET /v1/thumbnail``: an indexed image's
thumbnail."""
from __future__ import annotations

import json
from typing import Any, Sequence
from urllib.parse import urlencode

from fastapi import APIRouter, Query, Request
from fastapi.responses import Response

from ..errors import ServiceError
from ..schemas import ERRORS, SEARCH_REQUEST_BODY, ErrorResponse, SearchResponse
from ..service import Service
from ..settings import ServeSettings
from ..uploads import read_image_upload


def router(service: Service) -> APIRouter:
    models, settings = service.models, service.settings
    r = APIRouter()

    @r.post("/v1/search", summary="Search the image index by text (JSON) or by an uploaded photo (multipart)",
            response_model=SearchResponse, responses=ERRORS, openapi_extra=SEARCH_REQUEST_BODY)
    async def search(request: Request):
        b = service.batcher("search")
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise ServiceError(400, "bad_request", f"body is not valid JSON ({exc})") from None
            if not isinstance(body, dict):
                raise ServiceError(422, "invalid_parameter", 'body must be a JSON object {"text": ..., "k": ...}')
            unknown = sorted(set(body) - {"text", "k", "lang"})
            if unknown:
                raise ServiceError(422, "invalid_parameter", f"unknown field(s) {unknown}; expected text, k and lang")
            text, k = body.get("text"), check_k(body.get("k", 5), settings)
            lang = check_lang(body.get("lang", "auto"), models.search_languages())
            if not isinstance(text, str) or not text.strip():
                raise ServiceError(422, "invalid_parameter", "text: give a non-empty search text")
            text = text.strip()
            if len(text) > settings.max_query_chars:
                raise ServiceError(422, "invalid_parameter", f"text: is {len(text)} characters long, over the "
                                   f"limit of {settings.max_query_chars}")
            kind, query, echo = ("text", None if lang == "auto" else lang), text, {"text": text, "k": k, "lang": lang}
        elif ctype == "multipart/form-data":
            form = await request.form(max_files=1, max_fields=4)
            if "image" not in form:
                raise ServiceError(422, "invalid_parameter", "image: this field is required")
            k = check_k(form.get("k", 5), settings)
            query = await read_image_upload(form["image"], settings, service.offload)
            kind, echo = ("image", None), {"image": getattr(form["image"], "filename", None) or "image", "k": k}
        else:
            raise ServiceError(415, "unsupported_media_type", "send application/json {\"text\": ..., \"k\": ...} "
                               "or multipart/form-data with an image field")
        hits = await service.within_timeout(b.submit((query, k), key=kind))
        return {"query": echo, "model": models.names.get("retrieval", ""),
                "hits": [{"path": h.path, "score": float(h.score),
                          "thumbnail": "/v1/thumbnail?" + urlencode({"path": h.path})}
                         for h in hits]}

    @r.get("/v1/thumbnail", name="thumbnail", summary="JPEG thumbnail of an indexed image",
           response_class=Response, responses={404: {"model": ErrorResponse}, 200: {"content": {"image/jpeg": {}}}})
    async def thumbnail(path: str = Query(..., description="a path exactly as returned in search hits")):
        service.batcher("search")  # 503 when retrieval is not loaded
        if not models.in_index(path):
            raise ServiceError(404, "not_found", "no such image in the index (thumbnails are served only for "
                               "indexed images)")
        data = await service.offload(models.thumbnail, path)
        return Response(data, media_type="image/jpeg", headers={"Cache-Control": "private, max-age=3600"})

    return r


def check_k(value: Any, settings: ServeSettings) -> int:
    """A search's ``k`` (JSON number or form string) as a whole number within the limit, or ServiceError 422."""
    try:
        k = int(value)
        if isinstance(value, float) and k != value or isinstance(value, bool):
            raise ValueError
    except (TypeError, ValueError):
        raise ServiceError(422, "invalid_parameter", f"k: must be a whole number, got {value!r}") from None
    if not 1 <= k <= settings.max_k:
        raise ServiceError(422, "invalid_parameter", f"k: must be between 1 and {settings.max_k}, got {k}")
    return k


def check_lang(value: Any, languages: Sequence[str]) -> str:
    """A text search's ``lang``: 'auto' (told from the text) or one of the languages the served model reads."""
    if value == "auto" or value in languages:
        return value
    raise ServiceError(422, "invalid_parameter", f"lang: must be 'auto' or one of {', '.join(languages)}, got {value!r}")
