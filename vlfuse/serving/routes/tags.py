"""``POST /v1/tags``: the concepts an uploaded photo shows, from the backbone's ImageNet classifier."""
from __future__ import annotations

from fastapi import APIRouter, File, Form, UploadFile

from ...nn.concepts import CONCEPT_THRESHOLD
from ..schemas import ERRORS, TagsResponse
from ..service import Service
from ..uploads import ACCEPTED_TYPES, read_image_upload


def router(service: Service) -> APIRouter:
    models, settings = service.models, service.settings
    r = APIRouter()

    @r.post("/v1/tags", summary="Tag an uploaded photo with the concepts it shows", response_model=TagsResponse,
            responses=ERRORS)
    async def tags(image: UploadFile = File(..., description=f"the photo ({ACCEPTED_TYPES})"),
                   top: int = Form(5, ge=1, le=settings.max_top_k, description="at most this many concepts"),
                   threshold: float = Form(CONCEPT_THRESHOLD, ge=0.0, le=1.0,
                                           description=f"only concepts at least this probable (default "
                                                       f"{CONCEPT_THRESHOLD}: a blank or noise image reaches "
                                                       f"none; 0 = the top ones whatever their probability)")):
        b = service.batcher("tags")
        pixels = await read_image_upload(image, settings, service.offload, prepare=models.tag_pixels)
        probabilities = await service.within_timeout(b.submit(pixels))
        concepts = models.tagger.concepts(probabilities[None], top, threshold)[0]  # (1, C) -> that row's tags
        return {"concepts": [c.to_dict() for c in concepts], "top": top, "threshold": threshold,
                "model": models.names.get("tagging", "")}

    return r
