"""The shapes of the service's JSON bodies, for the OpenAPI schema (and so for /docs)."""
from __future__ import annotations

from typing import Any, Dict, List

from pydantic import BaseModel, Field


class CaptionResponse(BaseModel):
    caption: str
    score: float
    tokens: List[str]
    beam: int
    lang: str = Field(description="the caption's language (en, zh)")
    model: str


class ConceptScore(BaseModel):
    index: int = Field(description="the ImageNet-1k class, 0-999")
    name: str = Field(description="its display name, e.g. 'golden retriever'")
    word: str = Field(description="the word that stands for it in a caption, e.g. 'dog'")
    probability: float = Field(description="the classifier's softmax probability")


class TagsResponse(BaseModel):
    concepts: List[ConceptScore] = Field(description="at most `top`, most probable first; only those at or above "
                                                     "`threshold` (possibly none, as for a blank image)")
    top: int
    threshold: float
    model: str = Field(description="the backbone whose ImageNet classifier tagged the photo")


class AnswerScore(BaseModel):
    answer: str
    probability: float


class VQAResponse(BaseModel):
    question: str
    answer: str
    probability: float
    top: List[AnswerScore]
    sure: bool = Field(description="false when the answer should not be trusted; doubt says why")
    doubt: str = Field(description="why the answer should not be trusted (empty when sure)")
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
    lang: str = Field("auto", description="the text's language: 'auto' (told from its script) or one the retrieval "
                                          "model reads (en, zh)")


class ErrorBody(BaseModel):
    code: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorBody


# the error statuses a model endpoint may answer, each with the error body
ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 413, 415, 422, 503, 504)}

# /v1/search reads its body itself (JSON text query or a multipart photo), so its two bodies are described here
SEARCH_REQUEST_BODY = {"requestBody": {"required": True, "content": {
    "application/json": {"schema": SearchRequest.model_json_schema()},
    "multipart/form-data": {"schema": {"type": "object", "required": ["image"], "properties": {
        "image": {"type": "string", "format": "binary"}, "k": {"type": "integer", "default": 5}}}}}}}
