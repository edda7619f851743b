"""``POST /v1/vqa``: answer a question about an uploaded photo."""
from __future__ import annotations

from fastapi import APIRouter, File, Form, UploadFile

from ..errors import ServiceError
from ..schemas import ERRORS, VQAResponse
from ..service import Service
from ..uploads import ACCEPTED_TYPES, read_image_upload


def router(service: Service) -> APIRouter:
    models, settings = service.models, service.settings
    r = APIRouter()

    @r.post("/v1/vqa", summary="Answer a question about an uploaded photo", response_model=VQAResponse,
            responses=ERRORS)
    async def vqa(image: UploadFile = File(..., description=f"the photo ({ACCEPTED_TYPES})"),
                  question: str = Form(..., description=f"at most {settings.max_question_chars} characters"),
                  top_k: int = Form(3, ge=1, le=settings.max_top_k, description="how many ranked answers")):
        b = service.batcher("vqa")
        question = question.strip()
        if not question:
            raise ServiceError(422, "invalid_parameter", "question: is empty; type a question about the photo")
        if len(question) > settings.max_question_chars:
            raise ServiceError(422, "invalid_parameter", f"question: is {len(question)} characters long, over the "
                               f"limit of {settings.max_question_chars}")
        pixels = await read_image_upload(image, settings, service.offload, prepare=models.vqa_pixels)
        ans = await service.within_timeout(b.submit((pixels, question), key=top_k))
        return {"question": question, "answer": ans.answer, "probability": float(ans.probability),
                "top": [{"answer": a, "probability": float(p)} for a, p in ans.top],
                "sure": ans.sure, "doubt": ans.doubt,
                "model": models.names.get("vqa", "")}

    return r
