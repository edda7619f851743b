"""Uploads: photos checked (size, type by their first bytes) before they are decoded, decoded off the event loop;
videos saved to a temporary file (PyAV reads files) within the size limit, then read by the video reader, which
names what is wrong with one."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Awaitable, Callable, Optional

from starlette.datastructures import UploadFile

from ..data.images import load_image
from ..errors import ImageError
from .errors import ServiceError, library_error
from .settings import ServeSettings

IMAGE_SIGNATURES = (  # the types we accept, by their first bytes (the client's content-type is not trusted)
    (b"\xff\xd8\xff", "JPEG"), (b"\x89PNG\r\n\x1a\n", "PNG"), (b"GIF87a", "GIF"), (b"GIF89a", "GIF"),
    (b"BM", "BMP"), (b"II*\x00", "TIFF"), (b"MM\x00*", "TIFF"),
)
ACCEPTED_TYPES = "JPEG, PNG, GIF, BMP, WebP or TIFF"

Offload = Callable[..., Awaitable[Any]]  # runs fn(*args) in a worker thread: ``Service.offload``


def sniff_image_type(data: bytes) -> Optional[str]:
    """"JPEG", "PNG", ... from the file's first bytes, or None for a type the service does not accept."""
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    for magic, kind in IMAGE_SIGNATURES:
        if data.startswith(magic):
            return kind
    return None


async def read_image_upload(upload: Any, settings: ServeSettings, offload: Offload, field: str = "image",
                            prepare: Optional[Callable[[Any], Any]] = None):
    """An uploaded file -> decoded RGB PIL image (decoded by ``offload``, off the event loop), or ServiceError
    400/413/415. With ``prepare`` (e.g. a model's preprocessing), ``prepare(image)`` instead, computed in the same
    worker-thread hop as the decoding (one handoff per request, not two)."""
    if not isinstance(upload, UploadFile):
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
        raise library_error(type(exc)(str(exc).replace(f"<{len(data)} bytes>", name))) from None


VIDEO_CHUNK = 1024 * 1024


async def save_video_upload(upload: Any, settings: ServeSettings, folder: Path, field: str = "video") -> Path:
    """Write an uploaded video into ``folder`` (as ``video`` + the upload's suffix) -> its path, or ServiceError
    413 (over ``max_video_bytes``), 400 (empty) or 422 (not a file)."""
    if not isinstance(upload, UploadFile):
        raise ServiceError(422, "invalid_parameter", f"{field}: must be an uploaded file (multipart/form-data)")
    name = upload.filename or field
    path = folder / ("video" + Path(name).suffix.lower()[:8])
    size = 0
    with open(path, "wb") as out:
        while chunk := await upload.read(VIDEO_CHUNK):
            size += len(chunk)
            if size > settings.max_video_bytes:
                raise ServiceError(413, "video_too_large",
                                   f"{name}: upload is over the limit of {settings.max_video_bytes:,} bytes")
            out.write(chunk)
    if size == 0:
        raise ServiceError(400, "bad_video", f"{name}: file is empty (0 bytes)")
    return path
