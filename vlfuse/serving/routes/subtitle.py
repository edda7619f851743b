"""``POST /v1/subtitle``: subtitles for an uploaded video, shot by shot, as WebVTT, SRT or JSON."""
from __future__ import annotations

import dataclasses
import tempfile
from pathlib import Path

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import Response

from ...data.video import VideoLimits
from ...errors import VideoError
from ...tasks.subtitle.formats import FORMATS
from ...tasks.subtitle.pipeline import Subtitler, SubtitleOptions
from ..errors import library_error
from ..schemas import ERRORS
from ..service import Service
from ..uploads import save_video_upload


def router(service: Service) -> APIRouter:
    models, settings = service.models, service.settings
    r = APIRouter()
    options = SubtitleOptions(limits=VideoLimits(max_duration_s=settings.max_video_seconds))
    formats = "|".join(sorted(FORMATS))

    @r.post("/v1/subtitle", summary="Subtitle an uploaded video: what each shot shows, by the caption model",
            response_class=Response, responses={**ERRORS, 200: {"content": {f.media_type: {} for f in
                                                                            FORMATS.values()}}})
    async def subtitle(video: UploadFile = File(..., description=f"the video (MP4, WebM, MKV, MOV, ...; at most "
                                                             f"{settings.max_video_bytes:,} bytes and "
                                                             f"{settings.max_video_seconds:g} s)"),
                       format: str = Form("vtt", pattern=f"^({formats})$", description="vtt (default), srt or json"),
                       lang: str = Form(None, description="the subtitles' language: one the service captions in "
                                                          "(/v1/models: caption.langs); default the caption model's")):
        service.batcher("caption")  # 503 when no caption model is loaded
        lang = models.caption_lang(lang)  # ConfigError (422) for a language not served
        subtitler = Subtitler(models.captioners[lang], lang, options, model_name=models.caption_names.get(lang, ""))
        name = video.filename or "video"
        with tempfile.TemporaryDirectory(prefix="vlfuse-upload-") as folder:
            path = await save_video_upload(video, settings, Path(folder))
            try:
                subs = await service.within_timeout(service.offload_video(subtitler, path), settings.video_timeout_s)
            except VideoError as exc:  # name the upload, not the temporary file
                raise library_error(type(exc)(str(exc).replace(str(path), name))) from None
        subs.video = dataclasses.replace(subs.video, path=name)
        subs.warnings = [w.replace(str(path), name) for w in subs.warnings]
        fmt = FORMATS[format]
        headers = {"X-Subtitle-Warnings": str(len(subs.warnings))}
        return Response(fmt.write(subs), media_type=f"{fmt.media_type}; charset=utf-8", headers=headers)

    return r
