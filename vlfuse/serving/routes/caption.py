"""``POST /v1/caption``: caption an uploaded photo."""
from __future__ import annotations

import functools

from fastapi import APIRouter, File, Form, UploadFile

from ..schemas import ERRORS, CaptionResponse
from ..service import Service
from ..uploads import ACCEPTED_TYPES, read_image_upload


def router(service: Service) -> APIRouter:
    models, settings = service.models, service.settings
    r = APIRouter()

    @r.post("/v1/caption", summary="Caption an uploaded photo", response_model=CaptionResponse, responses=ERRORS)
    # optional fields are typed without None: a form cannot send a null (the schema would offer one, and "null"
    # was then refused with a 422), an absent field is the default
    async def caption(image: UploadFile = File(..., description=f"the photo ({ACCEPTED_TYPES})"),
                      beam: int = Form(None, ge=1, le=settings.max_beam,
                                       description="beam width, 1 = greedy (default: the model's own decoding, see "
                                                   "/v1/models)"),
                      max_len: int = Form(None, ge=1, le=50, description="at most this many words (default: the "
                                                                         "model's)"),
                      lang: str = Form(None, max_length=16,
                                       description="the caption's language: en, zh (default: the caption model's; "
                                                   "/v1/models lists those served)")):
        b = service.batcher("caption")
        lang = models.caption_lang(lang)  # ConfigError -> 422 naming the languages served
        decode = models.caption_decode(lang, beam, max_len)  # batched with the requests that decode alike
        pixels = await read_image_upload(image, settings, service.offload,
                                         prepare=functools.partial(models.caption_pixels, lang))
        result = await service.within_timeout(b.submit(pixels, key=(lang, decode)))
        return {"caption": result.caption, "score": float(result.score), "tokens": list(result.tokens),
                "beam": decode.width, "lang": lang, "model": models.caption_names.get(lang, "")}

    return r
