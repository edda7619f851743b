"""Service settings, API keys and the loopback rule. This module (with ``cli``) may read environment variables."""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import ipaddress
import os
from pathlib import Path
from typing import Iterable, List, Optional, Tuple

from ..errors import ConfigError

API_KEYS_ENV = "VLFUSE_API_KEYS"          # comma-separated keys
API_KEYS_FILE_ENV = "VLFUSE_API_KEYS_FILE"  # path of a keys file


@dataclasses.dataclass
class ServeSettings:
    """Limits and batching knobs of the HTTP service (the models are loaded separately, see ``models``)."""

    max_upload_bytes: int = 10 * 1024 * 1024   # one uploaded image; larger -> 413
    max_pixels: int = 40_000_000               # decoded width*height; larger (decompression bombs) -> 413
    max_question_chars: int = 200
    max_query_chars: int = 500
    max_k: int = 50
    max_beam: int = 8
    max_top_k: int = 10
    request_timeout_s: float = 30.0
    max_video_bytes: int = 100 * 1024 * 1024   # one uploaded video (/v1/subtitle); larger -> 413
    max_video_seconds: float = 300.0           # its duration; longer -> 413
    video_timeout_s: float = 300.0             # a video is subtitled within this (a 5-minute one takes ~20 s)
    batch_wait_ms: float = 5.0                 # how long the first request of a batch waits for company
    max_batch_size: int = 16
    thumbnail_size: int = 192
    image_workers: int = 2                     # threads decoding/preprocessing uploads at once
    inference_workers: int = 1                 # batches running at once (each with torch's --threads threads)

    def __post_init__(self):
        for name in ("max_upload_bytes", "max_pixels", "max_question_chars", "max_query_chars", "max_k",
                     "max_beam", "max_top_k", "max_batch_size", "thumbnail_size", "image_workers",
                     "inference_workers"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("request_timeout_s", "max_video_bytes", "max_video_seconds", "video_timeout_s"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
        if self.batch_wait_ms < 0:
            raise ConfigError(f"batch_wait_ms must be >= 0, got {self.batch_wait_ms}")


class APIKeys:
    """A set of API keys checked in constant time. Keys are kept only as SHA-256 digests, so the comparison
    time depends neither on where a guess first differs nor on its length."""

    def __init__(self, keys: Iterable[str]):
        self._digests: Tuple[bytes, ...] = tuple(_digest(k) for k in keys)

    def __len__(self) -> int:
        return len(self._digests)

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, candidate: Optional[str]) -> bool:
        if candidate is None:
            return False
        probe = _digest(candidate)
        ok = False
        for d in self._digests:  # no early exit: every key is compared every time
            ok |= hmac.compare_digest(probe, d)
        return ok


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8")).digest()


def read_keys_file(path: str | os.PathLike) -> List[str]:
    """One key per line; blank lines and lines starting with '#' are ignored."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"API keys file {p} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"API keys file {p} cannot be read ({exc})") from None
    keys = [line.strip() for line in text.splitlines()]
    keys = [k for k in keys if k and not k.startswith("#")]
    if not keys:
        raise ConfigError(f"API keys file {p} holds no keys (one key per line)")
    short = [k for k in keys if len(k) < 16]
    if short:
        raise ConfigError(f"API keys file {p}: {len(short)} key(s) shorter than 16 characters; use long random keys "
                          "(e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`)")
    return keys


def load_api_keys(keys_file: Optional[str] = None, environ: Optional[dict] = None) -> APIKeys:
    """Keys from ``keys_file`` (or $VLFUSE_API_KEYS_FILE) plus the comma-separated $VLFUSE_API_KEYS."""
    env = os.environ if environ is None else environ
    keys: List[str] = []
    keys_file = keys_file or env.get(API_KEYS_FILE_ENV)
    if keys_file:
        keys += read_keys_file(keys_file)
    keys += [k.strip() for k in env.get(API_KEYS_ENV, "").split(",") if k.strip()]
    return APIKeys(keys)


def is_loopback(host: str) -> bool:
    """True for 'localhost' and loopback IP addresses (127.0.0.0/8, ::1)."""
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def check_bind_allowed(host: str, keys: APIKeys) -> None:
    """Refuse to expose an unauthenticated service beyond this machine."""
    if not keys.enabled and not is_loopback(host):
        raise ConfigError(
            f"refusing to listen on {host} without API keys: give --api-keys-file FILE or set ${API_KEYS_ENV}, "
            "or listen on 127.0.0.1")
